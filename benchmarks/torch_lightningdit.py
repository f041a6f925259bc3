"""LightningDiT (hustvl/LightningDiT, models/lightningdit.py) in plain PyTorch, for parity tests.

A compact transcription of the reference network with its module names, so `state_dict()`
has the released checkpoints' key layout: `x_embedder.proj` (patch conv), `t_embedder.mlp.{0,2}`,
`y_embedder.embedding_table`, `pos_embed` (frozen sin-cos), `feat_rope.freqs_{cos,sin}`
(buffers, with `use_rope`), and per block `norm1`/`norm2` (RMSNorm weights, with
`use_rmsnorm`), `attn.qkv`, `attn.q_norm`/`attn.k_norm` (with `use_qknorm`), `attn.proj`,
`mlp.fc1`/`mlp.fc2` (GELU-tanh) or `mlp.w12`/`mlp.w3` (SwiGLU), `adaLN_modulation.1`; then
`final_layer.norm_final` (RMSNorm), `final_layer.linear`, `final_layer.adaLN_modulation.1`.
Time is the reference's: t = 1 at the data. No torch.compile, no checkpointing, eval only
(no label dropout). The library never imports this file.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch_repa_step import sincos_pos_embed_2d  # the same frozen table, beside this file


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


class Rope2d(nn.Module):
    """EVA-02's fast vision RoPE as LightningDiT builds it: `dim` = head_dim / 2 per axis."""

    def __init__(self, dim: int, grid: int, theta: float = 10000.0):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        pos = torch.arange(grid) / grid * grid
        angles = torch.einsum("n,f->nf", pos, freqs).repeat_interleave(2, dim=-1)
        rows = angles[:, None, :].expand(grid, grid, -1)
        cols = angles[None, :, :].expand(grid, grid, -1)
        table = torch.cat([rows, cols], dim=-1).reshape(grid * grid, -1)
        self.register_buffer("freqs_cos", table.cos())
        self.register_buffer("freqs_sin", table.sin())

    def forward(self, x):
        pairs = x.reshape(*x.shape[:-1], -1, 2)
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).reshape(x.shape)
        return x * self.freqs_cos + rotated * self.freqs_sin


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool, rmsnorm: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        norm = (lambda d: RMSNorm(d)) if rmsnorm else (lambda d: nn.LayerNorm(d))
        self.q_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope=None):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SwiGLUFFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


def _modulate(x, shift, scale):
    x = x * (1 + scale[:, None])
    return x if shift is None else x + shift[:, None]


class Block(nn.Module):
    def __init__(self, hidden, num_heads, mlp_ratio, qk_norm, swiglu, rmsnorm, wo_shift):
        super().__init__()
        if rmsnorm:
            self.norm1, self.norm2 = RMSNorm(hidden), RMSNorm(hidden)
        else:
            self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
            self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads, qk_norm, rmsnorm)
        width = int(hidden * mlp_ratio)
        self.mlp = SwiGLUFFN(hidden, int(2 / 3 * width)) if swiglu else Mlp(hidden, width)
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden, (4 if wo_shift else 6) * hidden)
        )
        self.wo_shift = wo_shift

    def forward(self, x, c, rope=None):
        chunks = self.adaLN_modulation(c).chunk(4 if self.wo_shift else 6, dim=1)
        if self.wo_shift:
            (scale_a, gate_a, scale_m, gate_m), shift_a, shift_m = chunks, None, None
        else:
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = chunks
        x = x + gate_a[:, None] * self.attn(_modulate(self.norm1(x), shift_a, scale_a), rope)
        return x + gate_m[:, None] * self.mlp(_modulate(self.norm2(x), shift_m, scale_m))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, channels: int, hidden: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, hidden, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)  # + the null class

    def forward(self, y):
        return self.embedding_table(y)


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_channels: int, rmsnorm: bool):
        super().__init__()
        self.norm_final = (
            RMSNorm(hidden) if rmsnorm else nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        )
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class LightningDiT(nn.Module):
    def __init__(
        self,
        input_size=16,
        patch_size=1,
        in_channels=32,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        num_classes=1000,
        use_qknorm=False,
        use_swiglu=False,
        use_rope=False,
        use_rmsnorm=False,
        wo_shift=False,
    ):
        super().__init__()
        self.patch_size, self.out_channels = patch_size, in_channels
        grid = input_size // patch_size
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        table = torch.from_numpy(sincos_pos_embed_2d(hidden_size, grid)).float()[None]
        self.pos_embed = nn.Parameter(table, requires_grad=False)
        self.feat_rope = Rope2d(hidden_size // num_heads // 2, grid) if use_rope else None
        self.blocks = nn.ModuleList(
            Block(hidden_size, num_heads, mlp_ratio, use_qknorm, use_swiglu, use_rmsnorm, wo_shift)
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels, use_rmsnorm)

    def forward(self, x, t, y):
        n, _, h, _ = x.shape
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            tokens = block(tokens, c, self.feat_rope)
        out = self.final_layer(tokens, c)
        p, g = self.patch_size, h // self.patch_size
        out = out.reshape(n, g, g, p, p, self.out_channels)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(n, self.out_channels, h, h)
