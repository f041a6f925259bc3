"""CLIP's vision tower (openai/clip-vit-large-patch14 in the transformers layout), one of the
target encoders REPA compares.

REPA's CLIP encoder (`UpdatedVisionTransformer` in the reference's `models/clip_vit.py`)
runs OpenAI's ViT up to the last residual block and drops the CLS token: no `ln_post`, no
projection. Its input (`preprocess_raw_image` in `train.py`) is /255, bicubic resize to
224 px (no antialias), *then* CLIP normalisation. `ClipVision` computes exactly that; the
checkpoint's `post_layernorm` (applied by transformers to the pooled CLS only) is unused.
"""

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, UInt8

from ..core.errors import ConfigError
from ..nn.resize import resize_bicubic
from ._convert import HubConfig, Port, Target, config_from_dict, fill
from ._vit import Block, PatchEmbed, PatchGrid, embed_patches, gelu, run_blocks, table_grid

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def quick_gelu(x: Array) -> Array:
    """OpenAI CLIP's GELU approximation, x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu}


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig(PatchGrid, HubConfig):
    """The fields of a transformers `CLIPVisionConfig`: a `clip_vision_model` config.json,
    or the `vision_config` of a full `clip` one."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    patch_size: int
    image_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ClipVisionConfig":
        model_type = raw.get("model_type")
        if model_type == "clip":
            # Older configs also carry `vision_config_dict`, which transformers lets win.
            raw = {**raw.get("vision_config", {}), **(raw.get("vision_config_dict") or {})}
        elif model_type != "clip_vision_model":
            raise ConfigError(f"model_type {model_type!r} is not 'clip' or 'clip_vision_model'")
        config = config_from_dict(cls, raw)
        if config.hidden_act not in _ACTIVATIONS:
            raise ConfigError(
                f"hidden_act {config.hidden_act!r} is not one of {list(_ACTIVATIONS)}"
            )
        return config


class ClipVision(eqx.Module):
    """CLIP's ViT on one image at one fixed patch grid, up to the last block; vmap it."""

    patch_embed: PatchEmbed  # CLIP's patch conv has no bias: loaded with a zero one
    cls_token: Float[Array, " dim"]
    pos_embed: Float[Array, "positions dim"]  # CLS entry, then the grid row by row
    pre_norm: eqx.nn.LayerNorm
    layers: Block  # all blocks stacked on a leading axis

    def __init__(self, config: ClipVisionConfig, *, key: PRNGKeyArray):
        dim, grid = config.hidden_size, config.grid
        pkey, ckey, tkey, lkey = jr.split(key, 4)
        self.patch_embed = PatchEmbed(config.num_channels, dim, config.patch_size, key=pkey)
        self.cls_token = 0.02 * jr.normal(ckey, (dim,))
        self.pos_embed = 0.02 * jr.normal(tkey, (1 + grid * grid, dim))
        self.pre_norm = eqx.nn.LayerNorm(dim, eps=config.layer_norm_eps)

        def block(k: PRNGKeyArray) -> Block:
            return Block(
                dim,
                config.num_attention_heads,
                config.intermediate_size,
                eps=config.layer_norm_eps,
                qkv_bias=True,
                activation=_ACTIVATIONS[config.hidden_act],
                key=k,
            )

        self.layers = eqx.filter_vmap(block)(jr.split(lkey, config.num_hidden_layers))

    @property
    def grid(self) -> int:
        return table_grid(self.pos_embed)

    def __call__(self, image: Float[Array, "3 H W"]) -> Float[Array, "patches dim"]:
        """The last block's patch tokens (transformers' `last_hidden_state[1:]`)."""
        x = embed_patches(self, image)
        return run_blocks(self.layers, jax.vmap(self.pre_norm)(x))[1:]


def preprocess(image: UInt8[Array, "C H W"], resolution: int) -> Float[Array, "3 R R"]:
    """REPA's CLIP input: /255, bicubic resize (no antialias) to `resolution` x `resolution`,
    *then* CLIP normalisation. Grey images are repeated to 3 channels."""
    if image.shape[0] == 1:
        image = jnp.repeat(image, 3, axis=0)
    if image.shape[0] != 3:
        raise ConfigError(f"expected 1 or 3 channels, got an image of shape {image.shape}")
    x = resize_bicubic(image.astype(jnp.float32) / 255, (resolution, resolution), antialias=False)
    mean = jnp.asarray(CLIP_MEAN, jnp.float32)[:, None, None]
    std = jnp.asarray(CLIP_STD, jnp.float32)[:, None, None]
    return (x - mean) / std


@eqx.filter_jit
def encode(
    model: ClipVision, images: UInt8[Array, "batch C H W"], resolution: int
) -> Float[Array, "batch patches dim"]:
    """CLIP patch features of a batch of uint8 images, preprocessed as REPA does."""
    return jax.vmap(lambda image: model(preprocess(image, resolution)))(images)


def targets(config: ClipVisionConfig) -> list[Target]:
    """Where each tensor of a `CLIPVisionModel` state dict goes in the model."""
    targets = [
        Target("embeddings.class_embedding", lambda m: m.cls_token),
        Target("embeddings.position_embedding.weight", lambda m: m.pos_embed),
        Target("embeddings.patch_embedding.weight", lambda m: m.patch_embed.weight),
        Target("pre_layrnorm.weight", lambda m: m.pre_norm.weight),  # sic, transformers' name
        Target("pre_layrnorm.bias", lambda m: m.pre_norm.bias),
    ]
    per_layer = [
        ("layer_norm1", lambda m: m.layers.norm1),
        ("self_attn.q_proj", lambda m: m.layers.attention.query_proj),
        ("self_attn.k_proj", lambda m: m.layers.attention.key_proj),
        ("self_attn.v_proj", lambda m: m.layers.attention.value_proj),
        ("self_attn.out_proj", lambda m: m.layers.attention.out_proj),
        ("layer_norm2", lambda m: m.layers.norm2),
        ("mlp.fc1", lambda m: m.layers.fc1),
        ("mlp.fc2", lambda m: m.layers.fc2),
    ]
    layers = range(config.num_hidden_layers)
    for name, module in per_layer:
        for leaf in ("weight", "bias"):
            names = [f"encoder.layers.{i}.{name}.{leaf}" for i in layers]
            targets.append(Target(names, lambda m, f=module, a=leaf: getattr(f(m), a)))
    return targets


# Unused by the patch features: the pooled-CLS head, the text tower of a full CLIPModel, and
# the position-id buffers older transformers saved.
_UNUSED_PREFIXES = ("post_layernorm.", "text_model.", "embeddings.position_ids")
_UNUSED = frozenset({"logit_scale", "text_projection.weight", "visual_projection.weight"})


def from_state_dict(config: ClipVisionConfig, tensors: dict[str, np.ndarray]) -> ClipVision:
    """A `ClipVision` at the checkpoint's own grid, every leaf filled from `tensors`: a
    `CLIPVisionModel` state dict, its keys bare or under `vision_model.` (transformers < 5,
    and a full `CLIPModel`, whose other tensors are ignored)."""
    tensors = {name.removeprefix("vision_model."): value for name, value in tensors.items()}
    ignored = _UNUSED | {name for name in tensors if name.startswith(_UNUSED_PREFIXES)}
    skeleton = jax.eval_shape(lambda: ClipVision(config, key=jr.key(0)))
    zero_bias = jnp.zeros((config.hidden_size,))
    skeleton = eqx.tree_at(lambda m: m.patch_embed.bias, skeleton, zero_bias)
    what = (
        f"a CLIP vision tower with {config.num_hidden_layers} layers of width {config.hidden_size}"
    )
    return fill(skeleton, tensors, targets(config), what=what, ignored=ignored)


PORT = Port(
    family="clip-vision",
    model_types=("clip", "clip_vision_model"),
    config=ClipVisionConfig,
    build=lambda config: ClipVision(config, key=jr.key(0)),
    targets=targets,
    from_state_dict=from_state_dict,
    encode=encode,
)
