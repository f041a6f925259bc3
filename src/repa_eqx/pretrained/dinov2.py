"""DINOv2 (with or without registers), the target encoder of REPA, ported from the
transformers checkpoints on the Hub (facebook/dinov2-{small,base,large,giant}[-with-registers]).

`from_state_dict` fills a shape-only skeleton from the Hub file layout (the converter
pattern of esm2quinox); `registry.load_dinov2` finds the files and resamples the position
table once to the patch grid the caller will use (`at_grid`). `Dinov2` maps one image to
its patch tokens after the final LayerNorm (`Dinov2.tokens`: with the CLS and register
tokens); `cls_features` gives FD-DINOv2's.
"""

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, UInt8

from ..core.batching import map_batches
from ..core.errors import ConfigError
from ._convert import HubConfig, Port, Target, config_from_dict, fill
from ._vit import (
    PatchEmbed,
    PatchGrid,
    PosInterp,
    SelfAttention,
    check_interp,
    embed_patches,
    preprocess,
    resample_pos_embed,
    run_blocks,
    slice_layers,
    table_grid,
)

_MODEL_TYPES = ("dinov2", "dinov2_with_registers")


@dataclasses.dataclass(frozen=True)
class Dinov2Config(PatchGrid, HubConfig):
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
            raise ConfigError(f"model_type {raw.get('model_type')!r} is not one of {_MODEL_TYPES}")
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ConfigError(f"hidden_act {raw['hidden_act']!r}: only 'gelu' is supported")
        # Each value is cast to its field's type (transformers writes mlp_ratio as 4).
        return config_from_dict(cls, raw)

    @property
    def mlp_hidden_size(self) -> int:
        hidden = int(self.hidden_size * self.mlp_ratio)
        if self.use_swiglu_ffn:
            # SwiGLU keeps two thirds of the width, rounded up to a multiple of 8.
            return (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden


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
        return self.attend(x)[0]

    def attend(
        self, x: Float[Array, "tokens dim"]
    ) -> tuple[Float[Array, "tokens dim"], Float[Array, "heads tokens tokens"]]:
        """The block's output and its attention logits (before the softmax)."""
        attended, logits = self.attention.attend(jax.vmap(self.norm1)(x))
        x = x + self.layer_scale1[None, :] * attended
        return x + jax.vmap(lambda t: self.layer_scale2 * self.mlp(self.norm2(t)))(x), logits


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
        return table_grid(self.pos_embed)

    def __call__(self, image: Float[Array, "3 H W"]) -> Float[Array, "patches dim"]:
        return self.tokens(image)[1 + self.register_tokens.shape[0] :]

    def tokens(self, image: Float[Array, "3 H W"]) -> Float[Array, "tokens dim"]:
        """Every token after the final LayerNorm: CLS, then the registers, then the patches."""
        x = embed_patches(self, image)
        # Registers carry no position embedding; they sit between CLS and the patches.
        x = jnp.concatenate([x[:1], self.register_tokens, x[1:]])
        return jax.vmap(self.norm)(run_blocks(self.layers, x))

    def tokens_and_attention(
        self, image: Float[Array, "3 H W"], layers: tuple[int, ...]
    ) -> tuple[Float[Array, "tokens dim"], Float[Array, "layers heads tokens tokens"]]:
        """`tokens` and the attention logits (q.k / sqrt(head_dim), every token: CLS,
        registers, patches) of the blocks `layers` (1-based), in that order. The blocks
        between them run in one scan each, as `tokens` runs them all."""
        depth = jax.tree.leaves(eqx.filter(self.layers, eqx.is_array))[0].shape[0]
        if not all(1 <= n <= depth for n in layers):
            raise ConfigError(f"attention of layers {layers} asked, the DINOv2 has {depth}")
        x = embed_patches(self, image)
        x = jnp.concatenate([x[:1], self.register_tokens, x[1:]])
        logits, done = {}, 0
        for n in sorted(set(layers)):
            if n - 1 > done:
                x = run_blocks(slice_layers(self.layers, done, n - 1), x)
            layer = jax.tree.map(lambda a, i=n - 1: a[i] if eqx.is_array(a) else a, self.layers)
            x, logits[n] = layer.attend(x)
            done = n
        if done < depth:
            x = run_blocks(slice_layers(self.layers, done, depth), x)
        return jax.vmap(self.norm)(x), jnp.stack([logits[n] for n in layers])


@eqx.filter_jit
def encode(
    model: Dinov2, images: UInt8[Array, "batch C H W"], resolution: int
) -> Float[Array, "batch patches dim"]:
    """DINOv2 patch features of a batch of uint8 images, preprocessed as REPA does."""
    return jax.vmap(lambda image: model(preprocess(image, resolution)))(images)


@eqx.filter_jit
def encode_with_cls(
    model: Dinov2, images: UInt8[Array, "batch C H W"], resolution: int
) -> Float[Array, "batch tokens dim"]:
    """The normalised CLS token (`x_norm_clstoken`) then `encode`'s patch features (the
    registers dropped): REG's targets, and its CLS input."""
    first = 1 + model.register_tokens.shape[0]

    def one(image):
        tokens = model.tokens(preprocess(image, resolution))
        return jnp.concatenate([tokens[:1], tokens[first:]])

    return jax.vmap(one)(images)


@eqx.filter_jit
def encode_with_attention(
    model: Dinov2, images: UInt8[Array, "batch C H W"], resolution: int, layers: tuple[int, ...]
) -> tuple[Float[Array, "batch patches dim"], Float[Array, "batch layers heads patches patches"]]:
    """`encode`'s patch features, and the attention logits of `layers` (1-based) between the
    patches alone (the CLS and register rows and columns dropped), as HASTE distils them."""
    first = 1 + model.register_tokens.shape[0]

    def one(image):
        tokens, logits = model.tokens_and_attention(preprocess(image, resolution), layers)
        return tokens[first:], logits[:, :, first:, first:]

    return jax.vmap(one)(images)


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
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ConfigError(f"expected uint8 NCHW images, got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise ConfigError("no images")
    return map_batches(
        lambda batch: _cls_batch(model, jnp.asarray(batch), resolution, antialias),
        images,
        batch_size=batch_size,
        label="dinov2 cls",
        progress=progress,
    )


def targets(config: Dinov2Config) -> list[Target]:
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
    return fill(skeleton, tensors, targets(config), what=what, ignored=_IGNORED)


def at_grid(
    model: Dinov2, config: Dinov2Config, grid: int | None, pos_interp: PosInterp = "timm"
) -> Dinov2:
    """`model` with its position table resampled once to `grid` x `grid` (None: unchanged).
    `"timm"` resamples as the REPA reference does (timm's `resample_abs_pos_embed`: bicubic
    with antialias); `"transformers"` as `transformers.Dinov2Model` does on the fly (bicubic
    without antialias; `Dinov2WithRegistersModel` uses antialias), for exact parity with it."""
    check_interp(pos_interp)
    if grid is None or grid == model.grid:
        return model
    antialias = pos_interp == "timm" or config.model_type == "dinov2_with_registers"
    pos_embed = resample_pos_embed(model.pos_embed, grid, antialias=antialias)
    return eqx.tree_at(lambda m: m.pos_embed, model, pos_embed)


PORT = Port(
    family="dinov2",
    model_types=_MODEL_TYPES,
    config=Dinov2Config,
    build=lambda config: Dinov2(config, key=jr.key(0)),
    targets=targets,
    from_state_dict=from_state_dict,
    encode=encode,
)
