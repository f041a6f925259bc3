"""The REPA training step in plain PyTorch: the baseline `bench_train_step.py --torch` times.

Written from SPEC.md to do what the reference (sihyun-yu/REPA) does per step: SiT with
adaLN-Zero, one projector on the hidden state after block `encoder_depth`, linear interpolant
with uniform t, v-prediction MSE + proj_coeff * negative cosine against precomputed target
features, AdamW with grad-norm clipping, EMA of every trained parameter. Eager mode, attention
through `F.scaled_dot_product_attention` (the reference's default `fused_attn=True`), bf16 via
`torch.autocast` around the model's forward (as accelerate's mixed precision does); the losses
are computed in fp32 outside it. For comparison only: the library never imports this file.
"""

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def architecture(config) -> dict:
    """The SiT's shape arguments of `REPASiT` from one of our `SiTConfig`s."""
    names = ("depth", "hidden_size", "num_heads", "encoder_depth", "input_size", "patch_size")
    names += ("in_channels", "num_classes")
    return {name: getattr(config, name) for name in names}


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """MAE 2-D sin-cos table (grid*grid, dim): first half column index, second half row."""

    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([one_axis(dim // 2, cols), one_axis(dim // 2, rows)], axis=1)


def timestep_frequencies(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.fc1 = nn.Linear(hidden, int(hidden * mlp_ratio))
        self.fc2 = nn.Linear(int(hidden * mlp_ratio), hidden)
        self.adaln = nn.Linear(hidden, 6 * hidden)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaln(F.silu(c)).chunk(6, -1)
        n, tokens, hidden = x.shape
        h = modulate(F.layer_norm(x, (hidden,), eps=1e-6), shift_a, scale_a)
        q, k, v = self.qkv(h).reshape(n, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, tokens, hidden)
        x = x + gate_a[:, None] * self.proj(attn)
        h = modulate(F.layer_norm(x, (hidden,), eps=1e-6), shift_m, scale_m)
        return x + gate_m[:, None] * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


class REPASiT(nn.Module):
    """SiT + one projector; returns (velocity, projected hidden state after `encoder_depth`)."""

    def __init__(
        self,
        *,
        depth: int,
        hidden_size: int,
        num_heads: int,
        encoder_depth: int,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        num_classes: int = 1000,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        z_dim: int = 768,
        projector_dim: int = 2048,
    ):
        super().__init__()
        h, p = hidden_size, patch_size
        self.patch_size, self.in_channels = p, in_channels
        self.num_classes, self.class_dropout_prob = num_classes, class_dropout_prob
        self.encoder_depth = encoder_depth
        self.patch = nn.Conv2d(in_channels, h, kernel_size=p, stride=p)
        # A buffer, not a Parameter: the table is never trained (nor EMA'd, nor counted).
        pos = sincos_pos_embed_2d(h, input_size // p)
        self.register_buffer("pos_embed", torch.from_numpy(pos).float()[None], persistent=False)
        self.t_mlp = nn.Sequential(nn.Linear(256, h), nn.SiLU(), nn.Linear(h, h))
        self.label_table = nn.Embedding(num_classes + 1, h)  # last row: the null class
        self.blocks = nn.ModuleList(Block(h, num_heads, mlp_ratio) for _ in range(depth))
        self.projector = nn.Sequential(
            nn.Linear(h, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, z_dim),
        )
        self.final_adaln = nn.Linear(h, 2 * h)
        self.final_linear = nn.Linear(h, p * p * in_channels)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch.weight.view(self.patch.weight.shape[0], -1))
        nn.init.zeros_(self.patch.bias)
        nn.init.normal_(self.label_table.weight, std=0.02)
        for lin in (self.t_mlp[0], self.t_mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        zero = [b.adaln for b in self.blocks] + [self.final_adaln, self.final_linear]
        for lin in zero:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, project: bool = True):
        """(velocity, projected hidden state); `project=False` skips the projector (None)."""
        n, c, size, _ = x.shape
        p, g = self.patch_size, size // self.patch_size
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos_embed
        if self.training and self.class_dropout_prob > 0:
            drop = torch.rand(n, device=y.device) < self.class_dropout_prob
            y = torch.where(drop, self.num_classes, y)
        cond = self.t_mlp(timestep_frequencies(t).to(tokens.dtype)) + self.label_table(y)
        for i, block in enumerate(self.blocks, start=1):
            tokens = block(tokens, cond)
            if i == self.encoder_depth:
                projected = self.projector(tokens) if project else None
        shift, scale = self.final_adaln(F.silu(cond)).chunk(2, -1)
        hidden = tokens.shape[-1]
        out = self.final_linear(modulate(F.layer_norm(tokens, (hidden,), eps=1e-6), shift, scale))
        out = out.reshape(n, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, size, size)
        return out, projected


class REPAStep:
    """One training step: forward + REPA loss, backward, clip, AdamW, EMA. Mutates the model."""

    def __init__(
        self,
        model: REPASiT,
        precision: str = "fp32",
        *,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        max_grad_norm: float = 1.0,
        ema_decay: float = 0.9999,
        proj_coeff: float = 0.5,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}: choose from {list(PRECISIONS)}")
        self.model = model.train()
        self.ema = copy.deepcopy(model).requires_grad_(False)
        self.autocast_dtype = PRECISIONS[precision]
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay
        )
        self.max_grad_norm, self.ema_decay, self.proj_coeff = max_grad_norm, ema_decay, proj_coeff

    def loss(self, x: torch.Tensor, y: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        t = torch.rand(x.shape[0])
        noise = torch.randn_like(x)
        tb = t[:, None, None, None]
        x_t, v_target = (1 - tb) * x + tb * noise, noise - x  # linear path, t = 1 is noise
        if self.autocast_dtype is None:
            v_pred, projected = self.model(x_t, t, y)
        else:
            with torch.autocast("cpu", dtype=self.autocast_dtype):
                v_pred, projected = self.model(x_t, t, y)
        denoise = (v_pred.float() - v_target).square().mean(dim=(1, 2, 3)).mean()
        # Normalise in fp32: the reference's fp16 normalisation NaNs late in training.
        cos = (F.normalize(projected.float(), dim=-1) * F.normalize(features, dim=-1)).sum(-1)
        return denoise + self.proj_coeff * (-cos.mean())

    def __call__(self, x: torch.Tensor, y: torch.Tensor, features: torch.Tensor) -> float:
        """Returns the loss before the update."""
        loss = self.loss(x, y, features)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters(), strict=True):
                e.lerp_(p, 1.0 - self.ema_decay)  # decay * e + (1 - decay) * p
        return loss.item()
