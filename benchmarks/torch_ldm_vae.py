"""The latent-diffusion ("VQGAN-KL") AutoencoderKL in PyTorch, for the parity tests of the
LDM-format checkpoint reader (tests/test_ldm_vae.py); torch only, never imported by the library.

Written from the network of VA-VAE (hustvl/LightningDiT `tokenizer/autoencoder.py`) and REPA-E
(`models/autoencoder.py`), which share CompVis latent-diffusion's layout and state-dict names:
`encoder.down.{level}.block.{i}` / `.attn.{i}` / `.downsample.conv`, `encoder.mid.block_1` /
`attn_1` / `block_2`, `norm_out`, `conv_out`; the decoder's `up.{level}` lists are stored in
level order (highest resolution first) but run from the last; attention blocks are 1x1 convs
`q`, `k`, `v`, `proj_out` after `norm`; a level at a resolution in `attn_resolutions` runs an
attention after each of its resnets. VA-VAE's f16d32 is `ch=128, ch_mult=(1, 1, 2, 2, 4),
num_res_blocks=2, z_channels=32, attn_resolutions=(16,), resolution=256`.
"""

import torch
import torch.nn.functional as F
from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)  # every norm: 32 groups


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        b, c, height, width = x.shape
        h = self.norm(x)
        q = self.q(h).flatten(2).transpose(1, 2)  # b, hw, c
        k, v = self.k(h).flatten(2), self.v(h).flatten(2)  # b, c, hw
        weights = torch.softmax(q @ k * c**-0.5, dim=2)  # b, hw (queries), hw (keys)
        out = (v @ weights.transpose(1, 2)).reshape(b, c, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = (
        ResnetBlock(channels, channels),
        AttnBlock(channels),
        ResnetBlock(channels, channels),
    )
    return mid


def _run_mid(mid: nn.Module, x):
    return mid.block_2(mid.attn_1(mid.block_1(x)))


def _run_level(level: nn.Module, x):
    for i, block in enumerate(level.block):
        x = block(x)
        if len(level.attn):
            x = level.attn[i](x)
    return x


class Encoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, attn_resolutions, resolution):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        width, res = ch, resolution
        for i, mult in enumerate(ch_mult):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(width, ch * mult))
                width = ch * mult
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(width))
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(width)
                res //= 2
            self.down.append(level)
        self.mid = _mid(width)
        self.norm_out = _norm(width)
        self.conv_out = nn.Conv2d(width, 2 * z_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for level in self.down:
            x = _run_level(level, x)
            if hasattr(level, "downsample"):
                x = level.downsample(x)
        x = _run_mid(self.mid, x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, attn_resolutions, resolution):
        super().__init__()
        width = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.mid = _mid(width)
        levels = []
        for i in reversed(range(len(ch_mult))):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(width, ch * ch_mult[i]))
                width = ch * ch_mult[i]
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(width))
            if i != 0:
                level.upsample = Upsample(width)
                res *= 2
            levels.insert(0, level)  # stored in level order, run from the last
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(width)
        self.conv_out = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, z):
        x = _run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            x = _run_level(level, x)
            if hasattr(level, "upsample"):
                x = level.upsample(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, attn_resolutions, resolution):
        super().__init__()
        shape = (ch, ch_mult, num_res_blocks, z_channels, attn_resolutions, resolution)
        self.encoder, self.decoder = Encoder(*shape), Decoder(*shape)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)

    def encode(self, x):
        """Posterior mean and std (log-variance clamped to [-30, 20])."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every tensor moved off its init (unit norm scales, zero biases) at its own scale."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_((param.std() if param.ndim > 1 else 0.1) * torch.randn_like(param))
    return model.eval()
