"""MAE ViT (facebook/vit-mae-{base,large,huge} in the transformers `ViTMAE` layout), one of
the target encoders REPA compares, and the plain ViT parts CLIP's vision tower shares.

REPA's MAE encoder (`models/mae_vit.py` of the reference) is timm's plain ViT run on the
whole image, no masking: 256-px images with ImageNet normalisation, the checkpoint's fixed
sin-cos position table resampled once from 14x14 to 16x16 by timm's
`resample_abs_pos_embed`, and its `forward_features` returns the last block's tokens
*without* the final LayerNorm, CLS dropped. `Mae` computes exactly that.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, UInt8

from ._convert import HubConfig, Target, fill
from .dinov2 import PatchEmbed, SelfAttention, preprocess, resample_pos_embed
from .hub import load_safetensors, resolve_pretrained

Config = TypeVar("Config")
PosInterp = Literal["timm", "transformers"]


def config_from_dict(cls: type[Config], raw: dict[str, Any]) -> Config:
    """A config dataclass from a parsed `config.json`: every field without a default must be
    there, each value is cast to its field's type, other keys are ignored."""
    fields = dataclasses.fields(cls)
    absent = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in raw]
    if absent:
        raise ValueError(f"config lacks {absent}")
    return cls(**{f.name: f.type(raw[f.name]) for f in fields if f.name in raw})


@dataclasses.dataclass(frozen=True)
class MaeConfig(HubConfig):
    """The encoder fields of a transformers ViTMAE `config.json` (the decoder's are unused)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    patch_size: int
    image_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "MaeConfig":
        if raw.get("model_type") != "vit_mae":
            raise ValueError(f"model_type {raw.get('model_type')!r} is not 'vit_mae'")
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"hidden_act {raw['hidden_act']!r}: only 'gelu' is supported")
        return config_from_dict(cls, raw)

    @property
    def grid(self) -> int:
        """Side of the checkpoint's position table, in patches."""
        return self.image_size // self.patch_size


class Block(eqx.Module):
    """timm's plain pre-norm ViT block (no LayerScale): MAE's, and CLIP's with quick-GELU."""

    norm1: eqx.nn.LayerNorm
    attention: SelfAttention
    norm2: eqx.nn.LayerNorm
    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear
    activation: Callable[[Array], Array] = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden: int,
        *,
        eps: float,
        qkv_bias: bool,
        activation: Callable[[Array], Array],
        key: PRNGKeyArray,
    ):
        akey, key1, key2 = jr.split(key, 3)
        self.norm1 = eqx.nn.LayerNorm(dim, eps=eps)
        self.attention = SelfAttention(dim, num_heads, qkv_bias, key=akey)
        self.norm2 = eqx.nn.LayerNorm(dim, eps=eps)
        self.fc1 = eqx.nn.Linear(dim, mlp_hidden, key=key1)
        self.fc2 = eqx.nn.Linear(mlp_hidden, dim, key=key2)
        self.activation = activation

    def __call__(self, x: Float[Array, "tokens dim"]) -> Float[Array, "tokens dim"]:
        x = x + self.attention(jax.vmap(self.norm1)(x))
        return x + jax.vmap(lambda t: self.fc2(self.activation(self.fc1(self.norm2(t)))))(x)


def run_blocks(blocks: Block, x: Float[Array, "tokens dim"]) -> Float[Array, "tokens dim"]:
    """Blocks stacked on a leading axis (`filter_vmap`), applied in order with one scan."""
    dynamic, static = eqx.partition(blocks, eqx.is_array)

    def step(x, layer):
        return eqx.combine(layer, static)(x), None

    return jax.lax.scan(step, x, dynamic)[0]


def check_patch_grid(image: Float[Array, "3 H W"], patch: int, grid: int) -> None:
    """Refuse an image whose patch grid is not the one the position table was built for."""
    _, height, width = image.shape
    if (height // patch, width // patch) != (grid, grid):
        raise ValueError(
            f"a {height}x{width} image makes a {height // patch}x{width // patch} patch grid "
            f"but this model's position table is {grid}x{grid}: resize images to "
            f"{grid * patch}x{grid * patch} or load the model with grid={height // patch}"
        )


def table_grid(pos_embed: Float[Array, "positions dim"]) -> int:
    """Side of the patch grid of a position table whose first entry is the CLS token's."""
    return math.isqrt(pos_embed.shape[0] - 1)


def gelu(x: Array) -> Array:
    """The exact (erf) GELU of MAE, DINOv2 and transformers' "gelu"."""
    return jax.nn.gelu(x, approximate=False)


class Mae(eqx.Module):
    """MAE's ViT encoder on one unmasked image at one fixed patch grid; vmap it over a batch."""

    patch_embed: PatchEmbed
    cls_token: Float[Array, " dim"]
    pos_embed: Float[Array, "positions dim"]  # CLS entry (zeros in MAE), then the grid
    layers: Block  # all blocks stacked on a leading axis

    def __init__(self, config: MaeConfig, *, key: PRNGKeyArray):
        dim, grid = config.hidden_size, config.grid
        pkey, ckey, tkey, lkey = jr.split(key, 4)
        self.patch_embed = PatchEmbed(config.num_channels, dim, config.patch_size, key=pkey)
        self.cls_token = 0.02 * jr.normal(ckey, (dim,))
        self.pos_embed = 0.02 * jr.normal(tkey, (1 + grid * grid, dim))

        def block(k: PRNGKeyArray) -> Block:
            return Block(
                dim,
                config.num_attention_heads,
                config.intermediate_size,
                eps=config.layer_norm_eps,
                qkv_bias=config.qkv_bias,
                activation=gelu,
                key=k,
            )

        self.layers = eqx.filter_vmap(block)(jr.split(lkey, config.num_hidden_layers))

    @property
    def grid(self) -> int:
        return table_grid(self.pos_embed)

    def __call__(self, image: Float[Array, "3 H W"]) -> Float[Array, "patches dim"]:
        """The last block's patch tokens: no final LayerNorm, as REPA's `forward_features`."""
        check_patch_grid(image, self.patch_embed.patch_size, self.grid)
        x = self.patch_embed(image)
        x = jnp.concatenate([self.cls_token[None, :], x]) + self.pos_embed
        return run_blocks(self.layers, x)[1:]


@eqx.filter_jit
def encode(
    model: Mae, images: UInt8[Array, "batch C H W"], resolution: int
) -> Float[Array, "batch patches dim"]:
    """MAE patch features of a batch of uint8 images. REPA feeds MAE its 256-px images as
    they are, /255 and ImageNet-normalised (DINOv2's `preprocess`, whose resize is the
    identity at that size); other sizes are resized bicubically to `resolution`."""
    return jax.vmap(lambda image: model(preprocess(image, resolution)))(images)


def with_grid(model, grid: int | None, pos_interp: PosInterp):
    """`model` with its position table resampled to `grid` x `grid` (None: unchanged).

    `"timm"` resamples as the REPA reference does (timm's `resample_abs_pos_embed`: bicubic
    with antialias); `"transformers"` as the transformers models' `interpolate_pos_encoding`
    (bicubic without antialias), for exact parity with them.
    """
    if pos_interp not in ("timm", "transformers"):
        raise ValueError(f"pos_interp must be 'timm' or 'transformers', got {pos_interp!r}")
    if grid is None or grid == model.grid:
        return model
    table = resample_pos_embed(model.pos_embed, grid, antialias=pos_interp == "timm")
    return eqx.tree_at(lambda m: m.pos_embed, model, table)


def _targets(config: MaeConfig) -> list[Target]:
    """Where each tensor of a `ViTMAEModel` state dict goes in the model."""
    targets = [
        Target("embeddings.cls_token", lambda m: m.cls_token),
        Target("embeddings.position_embeddings", lambda m: m.pos_embed),
        Target("embeddings.patch_embeddings.projection.weight", lambda m: m.patch_embed.weight),
        Target("embeddings.patch_embeddings.projection.bias", lambda m: m.patch_embed.bias),
    ]
    attn = "attention.attention"
    per_layer = [
        ("layernorm_before.weight", lambda m: m.layers.norm1.weight),
        ("layernorm_before.bias", lambda m: m.layers.norm1.bias),
        (f"{attn}.query.weight", lambda m: m.layers.attention.query_proj.weight),
        (f"{attn}.key.weight", lambda m: m.layers.attention.key_proj.weight),
        (f"{attn}.value.weight", lambda m: m.layers.attention.value_proj.weight),
        ("attention.output.dense.weight", lambda m: m.layers.attention.out_proj.weight),
        ("attention.output.dense.bias", lambda m: m.layers.attention.out_proj.bias),
        ("layernorm_after.weight", lambda m: m.layers.norm2.weight),
        ("layernorm_after.bias", lambda m: m.layers.norm2.bias),
        ("intermediate.dense.weight", lambda m: m.layers.fc1.weight),
        ("intermediate.dense.bias", lambda m: m.layers.fc1.bias),
        ("output.dense.weight", lambda m: m.layers.fc2.weight),
        ("output.dense.bias", lambda m: m.layers.fc2.bias),
    ]
    if config.qkv_bias:
        per_layer += [
            (f"{attn}.query.bias", lambda m: m.layers.attention.query_proj.bias),
            (f"{attn}.key.bias", lambda m: m.layers.attention.key_proj.bias),
            (f"{attn}.value.bias", lambda m: m.layers.attention.value_proj.bias),
        ]
    layers = range(config.num_hidden_layers)
    return targets + [
        Target([f"encoder.layer.{i}.{name}" for i in layers], where) for name, where in per_layer
    ]


# The final LayerNorm is not applied by REPA's MAE features.
_UNUSED = frozenset({"layernorm.weight", "layernorm.bias"})


def from_state_dict(config: MaeConfig, tensors: dict[str, np.ndarray]) -> Mae:
    """A `Mae` at the checkpoint's own grid, every leaf filled from `tensors`: a `ViTMAEModel`
    state dict, or a `ViTMAEForPreTraining` one (the Hub's: encoder under `vit.`, decoder
    ignored)."""
    tensors = {name.removeprefix("vit."): value for name, value in tensors.items()}
    ignored = _UNUSED | {name for name in tensors if name.startswith("decoder.")}
    skeleton = jax.eval_shape(lambda: Mae(config, key=jr.key(0)))
    what = f"an MAE ViT with {config.num_hidden_layers} layers of width {config.hidden_size}"
    return fill(skeleton, tensors, _targets(config), what=what, ignored=ignored)


def load_mae(
    name_or_path: str,
    *,
    grid: int | None = None,
    pos_interp: PosInterp = "timm",
    revision: str | None = None,
) -> Mae:
    """Load an MAE checkpoint (Hub id such as facebook/vit-mae-large, or a local folder).

    The position table is resampled once from the checkpoint's grid to `grid` x `grid`
    (default: keep it; REPA uses 16x16, 256 px, from the 14x14 table), see `with_grid`.
    """
    folder = resolve_pretrained(name_or_path, revision=revision)
    config = MaeConfig.from_json(folder / "config.json")
    return with_grid(from_state_dict(config, load_safetensors(folder)), grid, pos_interp)
