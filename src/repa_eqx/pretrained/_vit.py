"""The ViT parts the ported encoders share (DINOv2, MAE, CLIP's vision tower): patch
embedding, attention, timm's plain block, the scan over stacked blocks, position tables and
their resampling, and the ImageNet-normalised input."""

import math
from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray, UInt8

from ..core.errors import ConfigError
from ..nn.resize import resize_bicubic

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PosInterp = Literal["timm", "transformers"]


class PatchGrid:
    """For the configs of the ViT ports: the side of the checkpoint's position table."""

    image_size: int
    patch_size: int

    @property
    def grid(self) -> int:
        """Side of the checkpoint's position table, in patches."""
        return self.image_size // self.patch_size


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
        return self.attend(x)[0]

    def attend(
        self, x: Float[Array, "tokens dim"]
    ) -> tuple[Float[Array, "tokens dim"], Float[Array, "heads tokens tokens"]]:
        """The output and the attention logits q.k / sqrt(head_dim) (before the softmax)."""
        tokens, dim = x.shape

        def heads(proj: eqx.nn.Linear) -> Float[Array, "heads tokens head_dim"]:
            # Heads leading: XLA runs these batched matmuls faster on CPU this way.
            y = jax.vmap(proj)(x).reshape(tokens, self.num_heads, dim // self.num_heads)
            return y.transpose(1, 0, 2)

        q, k, v = heads(self.query_proj), heads(self.key_proj), heads(self.value_proj)
        logits = jnp.einsum("hqd,hkd->hqk", q, k) / math.sqrt(dim // self.num_heads)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
        out = jnp.einsum("hqk,hkd->qhd", weights, v).reshape(tokens, dim)
        return jax.vmap(self.out_proj)(out), logits


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


def slice_layers(blocks: eqx.Module, start: int, stop: int) -> eqx.Module:
    """Blocks start..stop-1 of blocks stacked on a leading axis."""
    return jax.tree.map(lambda a: a[start:stop] if eqx.is_array(a) else a, blocks)


def run_blocks(blocks: eqx.Module, x: Float[Array, "tokens dim"]) -> Float[Array, "tokens dim"]:
    """Blocks stacked on a leading axis (`filter_vmap`), applied in order with one scan."""
    dynamic, static = eqx.partition(blocks, eqx.is_array)

    def step(x, layer):
        return eqx.combine(layer, static)(x), None

    return jax.lax.scan(step, x, dynamic)[0]


def embed_patches(model, image: Float[Array, "3 H W"]) -> Float[Array, "tokens dim"]:
    """A ViT's input tokens: the CLS token, then the patches, plus the position table (the
    model has `patch_embed`, `cls_token` and `pos_embed`); the image's patch grid must be the
    table's."""
    check_patch_grid(image, model.patch_embed.patch_size, table_grid(model.pos_embed))
    x = model.patch_embed(image)
    return jnp.concatenate([model.cls_token[None, :], x]) + model.pos_embed


def check_patch_grid(image: Float[Array, "3 H W"], patch: int, grid: int) -> None:
    """Refuse an image whose patch grid is not the one the position table was built for."""
    _, height, width = image.shape
    if (height // patch, width // patch) != (grid, grid):
        raise ConfigError(
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
        raise ConfigError(f"expected 1 or 3 channels, got an image of shape {image.shape}")
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)[:, None, None]
    std = jnp.asarray(IMAGENET_STD, jnp.float32)[:, None, None]
    x = (image.astype(jnp.float32) / 255 - mean) / std
    return resize_bicubic(x, (resolution, resolution), antialias=antialias)


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


def check_interp(pos_interp: str) -> None:
    if pos_interp not in ("timm", "transformers"):
        raise ConfigError(f"pos_interp must be 'timm' or 'transformers', got {pos_interp!r}")


def with_grid(model, grid: int | None, pos_interp: PosInterp):
    """`model` with its position table resampled to `grid` x `grid` (None: unchanged).

    `"timm"` resamples as the REPA reference does (timm's `resample_abs_pos_embed`: bicubic
    with antialias); `"transformers"` as the transformers models' `interpolate_pos_encoding`
    (bicubic without antialias), for exact parity with them.
    """
    check_interp(pos_interp)
    if grid is None or grid == model.grid:
        return model
    table = resample_pos_embed(model.pos_embed, grid, antialias=pos_interp == "timm")
    return eqx.tree_at(lambda m: m.pos_embed, model, table)
