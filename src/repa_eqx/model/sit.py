"""SiT: a diffusion transformer with adaLN-Zero conditioning (Ma et al. 2024), as REPA uses it.

The same network is DiT (Peebles & Xie 2023) with `learn_sigma`: its output has twice the input
channels (the noise, then the variance interpolation of `diffusion/ddpm.py`) and it is fed the
integer DDPM timestep 0..999 instead of t in [0, 1]. "DiT-XL/2" names set `learn_sigma`.

One unbatched example per call; callers `jax.vmap`. The transformer blocks are one stacked
pytree run with `lax.scan`, split at `encoder_depth` so the hidden state REPA aligns comes out
without keeping every layer's activations.
"""

import dataclasses
import math
import re
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ..core.errors import ConfigError
from ..nn.layers import (
    dense,
    lay_out_for_lowp,
    layer_norm,
    multihead_attention,
    normal_linear,
    xavier_linear,
)

# name -> (depth, hidden size, heads); REPA aligns after block 4 (S, B) or 8 (L, XL).
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
ENCODER_DEPTHS = {"S": 4, "B": 4, "L": 8, "XL": 8}
_LN_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class SiTConfig:
    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    encoder_depth: int = 8
    learn_sigma: bool = False  # DiT: output 2C channels, noise then variance
    # REG (Wu et al. 2025): the width of the teacher's CLS token that enters as one extra
    # token in front of the patches and whose velocity the SiT predicts too; 0: no such token.
    cls_dim: int = 0

    def __post_init__(self):
        if self.input_size % self.patch_size:
            raise ConfigError(
                f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads")
        if self.hidden_size % 4:
            raise ConfigError("hidden_size must be a multiple of 4 (2-D sin-cos embedding)")
        if not 1 <= self.encoder_depth <= self.depth:
            raise ConfigError(f"encoder_depth {self.encoder_depth} not in [1, depth={self.depth}]")
        if self.cls_dim < 0 or (self.cls_dim and self.learn_sigma):
            raise ConfigError(f"cls_dim {self.cls_dim}: REG's CLS token is for SiTs (>= 0)")

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Patch tokens (REG's CLS token not counted)."""
        return self.grid_size**2

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @classmethod
    def from_name(cls, name: str, **overrides) -> "SiTConfig":
        """`SiTConfig.from_name("SiT-B/2", in_channels=4, input_size=32)`; "DiT-B/2" is the
        same shape with `learn_sigma=True`."""
        match = re.fullmatch(r"(SiT|DiT)-(S|B|L|XL)/(2|4|8)", name)
        if match is None:
            raise ConfigError(
                f"unknown model name {name!r}: expected SiT-{{S,B,L,XL}}/{{2,4,8}} or DiT-..."
            )
        family, size, patch = match.groups()
        depth, hidden, heads = SIZES[size]
        base = dict(
            depth=depth,
            hidden_size=hidden,
            num_heads=heads,
            patch_size=int(patch),
            encoder_depth=ENCODER_DEPTHS[size],
            learn_sigma=family == "DiT",
        )
        return cls(**(base | overrides))


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed MAE-style 2-D sin-cos table (grid*grid, dim), tokens in row-major order: the first
    half of the features encodes the column index, the second the row; sin then cos in each."""

    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([one_axis(dim // 2, cols), one_axis(dim // 2, rows)], axis=1).astype(
        np.float32
    )


def timestep_frequencies(t: Float[Array, ""], dim: int = 256, max_period: float = 10000.0):
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32) * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)])


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class SiTBlock(eqx.Module):
    """adaLN-Zero block: LN -> modulate -> attention -> gate; LN -> modulate -> MLP -> gate."""

    qkv: eqx.nn.Linear
    proj: eqx.nn.Linear
    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear
    adaln: eqx.nn.Linear
    num_heads: int = eqx.field(static=True)

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, *, key: PRNGKeyArray):
        k = jax.random.split(key, 5)
        mlp_hidden = int(hidden * mlp_ratio)
        self.qkv = xavier_linear(hidden, 3 * hidden, key=k[0])
        self.proj = xavier_linear(hidden, hidden, key=k[1])
        self.fc1 = xavier_linear(hidden, mlp_hidden, key=k[2])
        self.fc2 = xavier_linear(mlp_hidden, hidden, key=k[3])
        self.adaln = xavier_linear(hidden, 6 * hidden, key=k[4], zero=True)
        self.num_heads = num_heads

    def __call__(
        self, x: Float[Array, "tokens hidden"], c: Float[Array, " hidden"]
    ) -> Float[Array, "tokens hidden"]:
        return self.attend(x, c, logits=False)[0]

    def attend(
        self, x: Float[Array, "tokens hidden"], c: Float[Array, " hidden"], logits: bool = True
    ) -> tuple[Float[Array, "tokens hidden"], Float[Array, "heads tokens tokens"] | None]:
        """The block's output and (`logits`) its attention logits q.k / sqrt(head_dim) in
        float32, before the softmax: what HASTE distils."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(
            dense(self.adaln, jax.nn.silu(c)), 6
        )
        tokens, hidden = x.shape
        h = modulate(layer_norm(x, _LN_EPS), shift_a, scale_a)
        q, k, v = jnp.split(dense(self.qkv, h).reshape(tokens, 3, self.num_heads, -1), 3, axis=1)
        attn = multihead_attention(q[:, 0], k[:, 0], v[:, 0]).reshape(tokens, hidden)
        x = x + gate_a * dense(self.proj, attn)
        h = modulate(layer_norm(x, _LN_EPS), shift_m, scale_m)
        h = dense(self.fc2, jax.nn.gelu(dense(self.fc1, h), approximate=True))
        if not logits:
            return x + gate_m * h, None
        scale = q.shape[-1] ** -0.5
        lg = jnp.einsum("qhd,khd->hqk", q[:, 0], k[:, 0], preferred_element_type=jnp.float32)
        return x + gate_m * h, lg * scale


# What a block keeps for the backward pass (`jax.checkpoint` policies), per recipe key
# `train.remat`. "none": every intermediate, JAX's default. "dots": only matmul outputs; the
# layer norms, modulations, softmax and GELU are recomputed from them in the backward pass, so
# far less memory is written and read for a little elementwise work (measured 8-12 % faster
# training steps on CPU, where the step is memory-bound outside the matmuls). "full": only each
# block's input; the whole block is recomputed (the least memory, about a third more FLOPs).
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def _run_blocks(blocks, x, c, remat: str = "none", logits: bool = False):
    """The blocks in one scan; with `logits`, also each block's attention logits (stacked).
    A tuple of single blocks (`unstack_blocks`) runs as a Python loop instead."""
    if remat not in REMAT_POLICIES:
        raise ConfigError(f"unknown remat {remat!r}: choose from {sorted(REMAT_POLICIES)}")
    if isinstance(blocks, tuple):
        stacked = []
        for b in lay_out_for_lowp(blocks):
            x, lg = b.attend(x, c, logits=logits)
            stacked.append(lg)
        return (x, jnp.stack(stacked)) if logits else x
    # bf16 weights also travel laid out (in, out) for the forward products: transposed once
    # here, outside the scan (a no-op in float32).
    params, static = eqx.partition(lay_out_for_lowp(blocks), eqx.is_array)

    def block(x, block_params, c):
        return eqx.combine(block_params, static).attend(x, c, logits=logits)

    if remat != "none":
        block = jax.checkpoint(block, policy=REMAT_POLICIES[remat])

    def step(x, block_params):
        return block(x, block_params, c)

    x, stacked = jax.lax.scan(step, x, params)
    return (x, stacked) if logits else x


def slice_blocks(blocks, start: int, stop: int):
    """Blocks start..stop-1 of a stacked block pytree (or of a tuple of single blocks)."""
    if isinstance(blocks, tuple):
        return blocks[start:stop]
    return jax.tree.map(lambda a: a[start:stop] if eqx.is_array(a) else a, blocks)


def unstack_blocks(blocks: SiTBlock) -> tuple[SiTBlock, ...]:
    """The stacked blocks as a tuple of single blocks. A SiT holding them runs its blocks as an
    unrolled Python loop: each block reads its own weight arrays, where the scan over the
    stack copies every layer's slice of it at every call (XLA:CPU materialises the dynamic
    slice). For inference, where the forward runs at every sampler step."""
    depth = jax.tree.leaves(blocks)[0].shape[0]
    return tuple(
        jax.tree.map(lambda a, i=i: a[i] if eqx.is_array(a) else a, blocks) for i in range(depth)
    )


class SiTOutputs(NamedTuple):
    output: Float[Array, "c_out h w"]  # the velocity (DiT: noise and variance)
    # After each block asked; with REG's CLS token, it is token 0 (then the patches).
    hidden: tuple[Float[Array, "tokens hidden"], ...]
    attention: tuple[Float[Array, "heads tokens tokens"], ...]  # logits of each block asked
    cls: Float[Array, " cls_dim"] | None = None  # REG: the CLS token's velocity


class CLSToken(eqx.Module):
    """REG's CLS path: the noisy teacher CLS token -> Linear (xavier) -> LayerNorm (affine,
    eps 1e-6) as token 0; the final layer's shared norm and modulation, then a zero-initialised
    Linear back to the teacher's width for its velocity."""

    embed: eqx.nn.Linear
    norm_weight: Float[Array, " hidden"]
    norm_bias: Float[Array, " hidden"]
    out: eqx.nn.Linear

    def __init__(self, cls_dim: int, hidden: int, *, key: PRNGKeyArray):
        k_in, k_out = jax.random.split(key)
        self.embed = xavier_linear(cls_dim, hidden, key=k_in)
        self.norm_weight = jnp.ones(hidden)
        self.norm_bias = jnp.zeros(hidden)
        self.out = xavier_linear(hidden, cls_dim, key=k_out, zero=True)

    def token(self, cls: Float[Array, " cls_dim"], dtype) -> Float[Array, " hidden"]:
        h = dense(self.embed, cls.astype(dtype))
        return layer_norm(h, _LN_EPS, self.norm_weight, self.norm_bias).astype(dtype)


class SiT(eqx.Module):
    """Returns the velocity prediction (DiT: noise and variance, 2C channels) and the hidden
    state after block `encoder_depth`."""

    patch_weight: Float[Array, "hidden c p p"]
    patch_bias: Float[Array, " hidden"]
    t_fc1: eqx.nn.Linear
    t_fc2: eqx.nn.Linear
    label_table: Float[Array, "classes_plus_null hidden"]
    blocks: SiTBlock  # stacked: every array has a leading `depth` axis
    final_adaln: eqx.nn.Linear
    final_linear: eqx.nn.Linear
    cls_token: CLSToken | None  # REG only
    config: SiTConfig = eqx.field(static=True)

    def __init__(self, config: SiTConfig, *, key: PRNGKeyArray):
        c = config
        k = jax.random.split(key, 6)
        fan_in = c.in_channels * c.patch_size**2
        bound = float(np.sqrt(6.0 / (fan_in + c.hidden_size)))
        # Conv kernel initialised like the flattened Linear it is.
        self.patch_weight = jax.random.uniform(
            k[0],
            (c.hidden_size, c.in_channels, c.patch_size, c.patch_size),
            minval=-bound,
            maxval=bound,
        )
        self.patch_bias = jnp.zeros(c.hidden_size)
        self.t_fc1 = normal_linear(256, c.hidden_size, key=k[1], std=0.02)
        self.t_fc2 = normal_linear(c.hidden_size, c.hidden_size, key=k[2], std=0.02)
        self.label_table = 0.02 * jax.random.normal(k[3], (c.num_classes + 1, c.hidden_size))
        self.blocks = eqx.filter_vmap(
            lambda kk: SiTBlock(c.hidden_size, c.num_heads, c.mlp_ratio, key=kk)
        )(jax.random.split(k[4], c.depth))
        kf = jax.random.split(k[5])
        self.final_adaln = xavier_linear(c.hidden_size, 2 * c.hidden_size, key=kf[0], zero=True)
        self.final_linear = xavier_linear(
            c.hidden_size, c.patch_size**2 * c.out_channels, key=kf[1], zero=True
        )
        # Its own key, so a SiT without the token is initialised as it always was.
        self.cls_token = (
            CLSToken(c.cls_dim, c.hidden_size, key=jax.random.fold_in(key, 7))
            if c.cls_dim
            else None
        )
        self.config = config

    @property
    def null_label(self) -> int:
        return self.config.num_classes

    def patchify(self, x: Float[Array, "c h w"]) -> Float[Array, "tokens patch_dim"]:
        c, h, w = x.shape
        p = self.config.patch_size
        x = x.reshape(c, h // p, p, w // p, p).transpose(1, 3, 0, 2, 4)
        return x.reshape((h // p) * (w // p), c * p * p)

    def unpatchify(self, x: Float[Array, "tokens patch_dim"]) -> Float[Array, "c h w"]:
        p, c, g = self.config.patch_size, self.config.out_channels, self.config.grid_size
        x = x.reshape(g, g, p, p, c).transpose(4, 0, 2, 1, 3)
        return x.reshape(c, g * p, g * p)

    def embed(
        self, t: Float[Array, ""], y: Int[Array, ""], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " hidden"]:
        """Conditioning c = t_emb + y_emb; with `key`, the label becomes null with p = dropout."""
        if key is not None and self.config.class_dropout_prob > 0:
            drop = jax.random.bernoulli(key, self.config.class_dropout_prob)
            y = jnp.where(drop, self.null_label, y)
        dtype = self.t_fc1.weight.dtype
        t_emb = dense(self.t_fc1, timestep_frequencies(t).astype(dtype))
        t_emb = dense(self.t_fc2, jax.nn.silu(t_emb))
        return t_emb + self.label_table[y]

    def __call__(
        self,
        x: Float[Array, "c h w"],
        t: Float[Array, ""],
        y: Int[Array, ""],
        *,
        key: PRNGKeyArray | None = None,
        remat: str = "none",
        cls: Float[Array, " cls_dim"] | None = None,
    ) -> tuple[Float[Array, "c_out h w"], Float[Array, "tokens hidden"]]:
        """`remat` only changes what training keeps for the backward pass (`REMAT_POLICIES`),
        never the result. `cls`: REG's noisy CLS token (REG models only)."""
        out = self.forward(x, t, y, key=key, remat=remat, cls=cls)
        return out.output, out.hidden[0]

    def forward(
        self,
        x: Float[Array, "c h w"],
        t: Float[Array, ""],
        y: Int[Array, ""],
        *,
        key: PRNGKeyArray | None = None,
        remat: str = "none",
        depths: tuple[int, ...] | None = None,
        attention: tuple[int, ...] = (),
        cls: Float[Array, " cls_dim"] | None = None,
    ) -> "SiTOutputs":
        """The output, the hidden states after each block of `depths` (1-based; default:
        `encoder_depth` alone) and the attention logits of the blocks `attention` (1-based).
        The block stack is scanned in one segment between each two of those blocks.

        A REG model (`config.cls_dim`) needs `cls`, the noisy teacher CLS token at the same
        t: it enters as token 0 (position row zero, as REG's table), every block sees it, and
        `SiTOutputs.cls` is its predicted velocity."""
        cfg = self.config
        if (cls is None) != (self.cls_token is None):
            raise ConfigError(
                "a REG SiT (cls_dim > 0) needs its noisy CLS token `cls`"
                if cls is None
                else "`cls` is for REG SiTs (cls_dim > 0); this SiT has no CLS token"
            )
        depths = (cfg.encoder_depth,) if depths is None else tuple(depths)
        if not all(1 <= d <= cfg.depth for d in (*depths, *attention)):
            raise ConfigError(
                f"blocks {depths} and attention {attention} asked, the SiT has {cfg.depth}"
            )
        if x.shape != (cfg.in_channels, cfg.input_size, cfg.input_size):
            raise ConfigError(
                f"SiT expects input {(cfg.in_channels, cfg.input_size, cfg.input_size)}, "
                f"got {x.shape}"
            )
        dtype = self.patch_weight.dtype
        w = self.patch_weight.reshape(cfg.hidden_size, -1)
        tokens = self.patchify(x.astype(dtype)) @ w.T + self.patch_bias
        # The position table is a constant: it never receives a gradient.
        tokens = tokens + jnp.asarray(sincos_pos_embed_2d(cfg.hidden_size, cfg.grid_size), dtype)
        if self.cls_token is not None:  # its position row is zero
            tokens = jnp.concatenate([self.cls_token.token(cls, dtype)[None], tokens])
        c = self.embed(t, y, key=key)

        hidden, logits = {}, {}
        # Segment ends: each depth asked, and each attention block alone (its logits out).
        ends = sorted({*depths, *attention, *(a - 1 for a in attention), cfg.depth} - {0})
        done = 0
        for end in ends:
            segment = slice_blocks(self.blocks, done, end)
            if end in attention and end - done == 1:
                tokens, stacked = _run_blocks(segment, tokens, c, remat, logits=True)
                logits[end] = stacked[0]
            else:
                tokens = _run_blocks(segment, tokens, c, remat)
            hidden[end], done = tokens, end

        shift, scale = jnp.split(dense(self.final_adaln, jax.nn.silu(c)), 2)
        final = modulate(layer_norm(tokens, _LN_EPS), shift, scale)
        cls_velocity = None
        if self.cls_token is not None:
            cls_velocity, final = dense(self.cls_token.out, final[0]), final[1:]
        return SiTOutputs(
            self.unpatchify(dense(self.final_linear, final)),
            tuple(hidden[k] for k in depths),
            tuple(logits[a] for a in attention),
            cls_velocity,
        )
