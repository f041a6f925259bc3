"""MAE ViT (facebook/vit-mae-{base,large,huge} in the transformers `ViTMAE` layout), one of
the target encoders REPA compares.

REPA's MAE encoder (`models/mae_vit.py` of the reference) is timm's plain ViT run on the
whole image, no masking: 256-px images with ImageNet normalisation, the checkpoint's fixed
sin-cos position table resampled once from 14x14 to 16x16 by timm's
`resample_abs_pos_embed`, and its `forward_features` returns the last block's tokens
*without* the final LayerNorm, CLS dropped. `Mae` computes exactly that.
"""

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, UInt8

from ..core.errors import ConfigError
from ._convert import HubConfig, Port, Target, config_from_dict, fill
from ._vit import (
    Block,
    PatchEmbed,
    PatchGrid,
    embed_patches,
    gelu,
    preprocess,
    run_blocks,
    table_grid,
)


@dataclasses.dataclass(frozen=True)
class MaeConfig(PatchGrid, HubConfig):
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
            raise ConfigError(f"model_type {raw.get('model_type')!r} is not 'vit_mae'")
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ConfigError(f"hidden_act {raw['hidden_act']!r}: only 'gelu' is supported")
        return config_from_dict(cls, raw)


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
        return run_blocks(self.layers, embed_patches(self, image))[1:]


@eqx.filter_jit
def encode(
    model: Mae, images: UInt8[Array, "batch C H W"], resolution: int
) -> Float[Array, "batch patches dim"]:
    """MAE patch features of a batch of uint8 images. REPA feeds MAE its 256-px images as
    they are, /255 and ImageNet-normalised (DINOv2's `preprocess`, whose resize is the
    identity at that size); other sizes are resized bicubically to `resolution`."""
    return jax.vmap(lambda image: model(preprocess(image, resolution)))(images)


def targets(config: MaeConfig) -> list[Target]:
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
    return fill(skeleton, tensors, targets(config), what=what, ignored=ignored)


PORT = Port(
    family="vit-mae",
    model_types=("vit_mae",),
    config=MaeConfig,
    build=lambda config: Mae(config, key=jr.key(0)),
    targets=targets,
    from_state_dict=from_state_dict,
    encode=encode,
)
