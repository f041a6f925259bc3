"""SiT: a diffusion transformer with adaLN-Zero conditioning (Ma et al. 2024), as REPA uses it.

The same network is DiT (Peebles & Xie 2023) with `learn_sigma`: its output has twice the input
channels (the noise, then the variance interpolation of `diffusion/ddpm.py`) and it is fed the
integer DDPM timestep 0..999 instead of t in [0, 1]. "DiT-XL/2" names set `learn_sigma`.

LightningDiT (Yao et al. 2025, hustvl/LightningDiT) is the same network with switches of the
config (`mlp`, `norm`, `rope`, `qk_norm`, `wo_shift`); "LightningDiT-XL/1" names set the ones its
released models use. Its checkpoints were trained on SiT's original time (t = 1 at the data):
`data_at_t1` feeds such a network 1 - t and negates its velocity, so callers see REPA's time.

One unbatched example per call; callers `jax.vmap`. The transformer blocks are one stacked
pytree run with `lax.scan`, split at `encoder_depth` so the hidden state REPA aligns comes out
without keeping every layer's activations.
"""

import dataclasses
import functools
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
    rms_norm,
    xavier_linear,
)

# name -> (depth, hidden size, heads); REPA aligns after block 4 (S, B) or 8 (L, XL and
# LightningDiT's 1.0B and 1.6B sizes).
SIZES = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
    "1p0B": (24, 1536, 24),
    "1p6B": (28, 1792, 28),
}
ENCODER_DEPTHS = {"S": 4, "B": 4, "L": 8, "XL": 8, "1p0B": 8, "1p6B": 8}
# The switches a "LightningDiT-*" name turns on: those of its released XL/1 models.
LIGHTNINGDIT = {"mlp": "swiglu", "norm": "rmsnorm", "rope": True}
MLPS = ("gelu", "swiglu")
NORMS = ("layernorm", "rmsnorm")
_LN_EPS = 1e-6
_QK_LN_EPS = 1e-5  # LightningDiT's q/k LayerNorm is torch's default nn.LayerNorm


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
    # LightningDiT's switches (defaults: SiT). "swiglu": a SiLU-gated MLP of hidden width
    # int(2/3 * int(mlp_ratio * hidden)); "rmsnorm": affine RMSNorms (eps 1e-6) for the block,
    # final and q/k norms; `rope`: EVA's 2-D rotary embedding of q and k per head (the
    # sin-cos table is still added); `qk_norm`: q and k normalised per head (LayerNorm, or
    # RMSNorm with "rmsnorm"), before the rotation; `wo_shift`: block adaLN without shifts.
    mlp: str = "gelu"
    norm: str = "layernorm"
    rope: bool = False
    qk_norm: bool = False
    wo_shift: bool = False
    # Trained on SiT's original time (t = 1 at the data, velocity towards it): fed 1 - t,
    # its output negated, so it answers in REPA's time like every SiT here.
    data_at_t1: bool = False

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
        if self.mlp not in MLPS:
            raise ConfigError(f"mlp {self.mlp!r}: choose from {MLPS}")
        if self.norm not in NORMS:
            raise ConfigError(f"norm {self.norm!r}: choose from {NORMS}")
        if self.rope and (self.hidden_size // self.num_heads) % 4:
            raise ConfigError(
                f"rope needs a head dim divisible by 4, got {self.hidden_size // self.num_heads}"
            )
        if self.rope and self.cls_dim:
            raise ConfigError("rope rotates the patch grid: it has no place for REG's CLS token")
        if self.data_at_t1 and (self.learn_sigma or self.cls_dim):
            raise ConfigError("data_at_t1 is for velocity SiTs, not DiTs or REG's")

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

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        """The MLP's hidden width (SwiGLU: of each of its two halves), LightningDiT's rule."""
        width = int(self.hidden_size * self.mlp_ratio)
        return int(2 / 3 * width) if self.mlp == "swiglu" else width

    @classmethod
    def from_name(cls, name: str, **overrides) -> "SiTConfig":
        """`SiTConfig.from_name("SiT-B/2", in_channels=4, input_size=32)`; "DiT-B/2" is the
        same shape with `learn_sigma=True`; "LightningDiT-XL/1" has the `LIGHTNINGDIT`
        switches on (sizes also 1p0B, 1p6B)."""
        match = re.fullmatch(r"(SiT|DiT|LightningDiT)-(S|B|L|XL|1p0B|1p6B)/(1|2|4|8)", name)
        if match is None:
            raise ConfigError(
                f"unknown model name {name!r}: expected SiT-{{S,B,L,XL}}/{{1,2,4,8}}, DiT-... "
                "or LightningDiT-{S,B,L,XL,1p0B,1p6B}/{1,2,4,8}"
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
        if family == "LightningDiT":
            base |= LIGHTNINGDIT
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
    return x * (1 + scale) if shift is None else x * (1 + scale) + shift


@functools.cache
def rope_tables(head_dim: int, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """LightningDiT's 2-D rotary embedding (EVA-02's VisionRotaryEmbeddingFast): cos and sin
    tables (grid*grid, head_dim), tokens in row-major order. The first half of a head rotates
    by the row index, the second by the column; within each half, pair (2i, 2i+1) turns at
    frequency 10000^(-4i / head_dim). float32 like the reference's buffers."""
    half = head_dim // 2
    freqs = 1.0 / np.float32(10000) ** (np.arange(0, half, 2, dtype=np.float32) / half)
    pos = np.arange(grid, dtype=np.float32) / grid * grid
    angles = np.repeat(np.outer(pos, freqs).astype(np.float32), 2, axis=1)  # (grid, half)
    rows = np.broadcast_to(angles[:, None, :], (grid, grid, half))
    cols = np.broadcast_to(angles[None, :, :], (grid, grid, half))
    table = np.concatenate([rows, cols], axis=-1).reshape(grid * grid, head_dim)
    return np.cos(table), np.sin(table)


def apply_rope(
    x: Float[Array, "tokens heads hd"], cos: np.ndarray, sin: np.ndarray
) -> Float[Array, "tokens heads hd"]:
    """x * cos + rotate_half(x) * sin in float32, where rotate_half turns each pair
    (x_2i, x_2i+1) into (-x_2i+1, x_2i)."""
    x32 = x.astype(jnp.float32)
    pairs = x32.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    out = x32 * jnp.asarray(cos)[:, None] + rotated * jnp.asarray(sin)[:, None]
    return out.astype(x.dtype)


class Norm(eqx.Module):
    """An affine norm over the last axis, in float32: RMSNorm (no bias) or LayerNorm."""

    weight: Float[Array, " dim"]
    bias: Float[Array, " dim"] | None
    eps: float = eqx.field(static=True)

    def __init__(self, dim: int, kind: str, eps: float = _LN_EPS):
        self.weight = jnp.ones(dim)
        self.bias = jnp.zeros(dim) if kind == "layernorm" else None
        self.eps = eps

    def __call__(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
        if self.bias is None:
            return rms_norm(x, self.eps, self.weight)
        return layer_norm(x, self.eps, self.weight, self.bias)


def _block_norm(x, norm: Norm | None):
    """A block's pre-norm: SiT's LayerNorm without affine, or LightningDiT's RMSNorm."""
    return layer_norm(x, _LN_EPS) if norm is None else norm(x)


class SiTBlock(eqx.Module):
    """adaLN-Zero block: LN -> modulate -> attention -> gate; LN -> modulate -> MLP -> gate.

    With LightningDiT's switches (`SiTConfig`): RMSNorms, q/k norms, 2-D RoPE of q and k,
    SwiGLU (`fc1` gives the gate half, then the value half; `fc2` maps back) and adaLN
    without shifts."""

    qkv: eqx.nn.Linear
    proj: eqx.nn.Linear
    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear
    adaln: eqx.nn.Linear
    norm1: Norm | None  # "rmsnorm" only; SiT's block norms have no parameters
    norm2: Norm | None
    q_norm: Norm | None  # qk_norm only
    k_norm: Norm | None
    num_heads: int = eqx.field(static=True)
    swiglu: bool = eqx.field(static=True)
    rope_grid: int = eqx.field(static=True)  # 0: no RoPE
    wo_shift: bool = eqx.field(static=True)

    def __init__(self, config: SiTConfig, *, key: PRNGKeyArray):
        c = config
        hidden, mlp_hidden = c.hidden_size, c.mlp_hidden
        swiglu = c.mlp == "swiglu"
        k = jax.random.split(key, 5)
        self.qkv = xavier_linear(hidden, 3 * hidden, key=k[0])
        self.proj = xavier_linear(hidden, hidden, key=k[1])
        self.fc1 = xavier_linear(hidden, (2 if swiglu else 1) * mlp_hidden, key=k[2])
        self.fc2 = xavier_linear(mlp_hidden, hidden, key=k[3])
        self.adaln = xavier_linear(hidden, (4 if c.wo_shift else 6) * hidden, key=k[4], zero=True)
        rms = c.norm == "rmsnorm"
        self.norm1 = Norm(hidden, c.norm) if rms else None
        self.norm2 = Norm(hidden, c.norm) if rms else None
        qk_eps = _LN_EPS if rms else _QK_LN_EPS
        self.q_norm = Norm(c.head_dim, c.norm, qk_eps) if c.qk_norm else None
        self.k_norm = Norm(c.head_dim, c.norm, qk_eps) if c.qk_norm else None
        self.num_heads = c.num_heads
        self.swiglu = swiglu
        self.rope_grid = c.grid_size if c.rope else 0
        self.wo_shift = c.wo_shift

    def mlp(self, h: Float[Array, "tokens hidden"]) -> Float[Array, "tokens hidden"]:
        h = dense(self.fc1, h)
        if self.swiglu:
            gate, value = jnp.split(h, 2, axis=-1)
            return dense(self.fc2, jax.nn.silu(gate) * value)
        return dense(self.fc2, jax.nn.gelu(h, approximate=True))

    def __call__(
        self, x: Float[Array, "tokens hidden"], c: Float[Array, " hidden"]
    ) -> Float[Array, "tokens hidden"]:
        return self.attend(x, c, logits=False)[0]

    def attend(
        self, x: Float[Array, "tokens hidden"], c: Float[Array, " hidden"], logits: bool = True
    ) -> tuple[Float[Array, "tokens hidden"], Float[Array, "heads tokens tokens"] | None]:
        """The block's output and (`logits`) its attention logits q.k / sqrt(head_dim) in
        float32, before the softmax: what HASTE distils."""
        modulation = dense(self.adaln, jax.nn.silu(c))
        if self.wo_shift:
            scale_a, gate_a, scale_m, gate_m = jnp.split(modulation, 4)
            shift_a = shift_m = None
        else:
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(modulation, 6)
        tokens, hidden = x.shape
        h = modulate(_block_norm(x, self.norm1), shift_a, scale_a)
        qkv = dense(self.qkv, h).reshape(tokens, 3, self.num_heads, -1)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_grid:
            cos, sin = rope_tables(q.shape[-1], self.rope_grid)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attn = multihead_attention(q, k, v).reshape(tokens, hidden)
        x = x + gate_a * dense(self.proj, attn)
        h = self.mlp(modulate(_block_norm(x, self.norm2), shift_m, scale_m))
        if not logits:
            return x + gate_m * h, None
        scale = q.shape[-1] ** -0.5
        lg = jnp.einsum("qhd,khd->hqk", q, k, preferred_element_type=jnp.float32)
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
    final_norm: Norm | None  # "rmsnorm" only
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
        self.blocks = eqx.filter_vmap(lambda kk: SiTBlock(c, key=kk))(
            jax.random.split(k[4], c.depth)
        )
        kf = jax.random.split(k[5])
        self.final_adaln = xavier_linear(c.hidden_size, 2 * c.hidden_size, key=kf[0], zero=True)
        self.final_linear = xavier_linear(
            c.hidden_size, c.patch_size**2 * c.out_channels, key=kf[1], zero=True
        )
        self.final_norm = Norm(c.hidden_size, c.norm) if c.norm == "rmsnorm" else None
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
        c = self.embed(1 - t if cfg.data_at_t1 else t, y, key=key)

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
        final = modulate(_block_norm(tokens, self.final_norm), shift, scale)
        cls_velocity = None
        if self.cls_token is not None:
            cls_velocity, final = dense(self.cls_token.out, final[0]), final[1:]
        output = self.unpatchify(dense(self.final_linear, final))
        return SiTOutputs(
            -output if cfg.data_at_t1 else output,
            tuple(hidden[k] for k in depths),
            tuple(logits[a] for a in attention),
            cls_velocity,
        )
