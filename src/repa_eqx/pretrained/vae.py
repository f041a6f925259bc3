"""The Stable Diffusion VAE (diffusers `AutoencoderKL`: stabilityai/sd-vae-ft-mse and
sd-vae-ft-ema), encoder and decoder, ported from the diffusers checkpoints on the Hub.

REPA trains on the posterior mean and std of sd-vae-ft-mse and decodes its samples with
sd-vae-ft-ema. `from_state_dict` fills a shape-only skeleton from a diffusers state dict (the
converter pattern; `registry.load_vae` finds the files). `AutoencoderKL` encodes or decodes
one example; `encode` and `decode` take batches. The latent space built on it (scaling,
sampling the posterior, decoding to uint8) is `spaces.SDVAELatents`.

On GPUs, XLA's default float32 precision runs convolutions in TF32, as PyTorch's cuDNN
default does: outputs then differ from a full-float32 run by about 5e-3 (under one uint8
level). `jax.default_matmul_precision("highest")` gives full float32, several times slower.
"""

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ..core.errors import ConfigError
from ..nn.layers import multihead_attention
from . import ldm_vae
from ._convert import HubConfig, Port, Target, fill

SCALING_FACTOR = 0.18215  # SD's latent scale: brings the latents to about unit variance
_EPS = 1e-6  # every GroupNorm of the VAE
_LOGVAR_MIN, _LOGVAR_MAX = -30.0, 20.0  # diffusers' clamp of the posterior log-variance


_PLAIN_DOWN, _ATTN_DOWN = "DownEncoderBlock2D", "AttnDownEncoderBlock2D"
_PLAIN_UP, _ATTN_UP = "UpDecoderBlock2D", "AttnUpDecoderBlock2D"


@dataclasses.dataclass(frozen=True)
class VAEConfig(HubConfig):
    """The architecture fields of a diffusers `AutoencoderKL` `config.json`, and the latent
    statistics it publishes.

    `down_attention` / `up_attention` are the indices of the encoder's down blocks / the
    decoder's up blocks (decoder order: lowest resolution first) of diffusers' `Attn*` kind,
    whose every resnet is followed by self-attention (VA-VAE's f16d32 has it at its 16x16
    level). `latents_mean`, `latents_std` (per channel) and `shift_factor` are what the
    checkpoint publishes for normalising its latents; the network never applies them, the
    latent space that normalises does.
    """

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = SCALING_FACTOR
    sample_size: int | tuple[int, ...] = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    down_attention: tuple[int, ...] = ()
    up_attention: tuple[int, ...] = ()
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    shift_factor: float | None = None

    def __post_init__(self):
        if not self.block_out_channels or self.layers_per_block < 1:
            raise ConfigError("a VAE needs at least one block of at least one layer")
        uneven = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if uneven:
            raise ConfigError(f"block_out_channels {uneven} not divisible by norm_num_groups")
        levels = range(len(self.block_out_channels))
        for name in ("down_attention", "up_attention"):
            if any(i not in levels for i in getattr(self, name)):
                raise ConfigError(f"{name} {list(getattr(self, name))} outside blocks {levels}")
        for name in ("latents_mean", "latents_std"):
            values = getattr(self, name)
            if values is not None and len(values) != self.latent_channels:
                raise ConfigError(
                    f"{name} has {len(values)} values for {self.latent_channels} latent channels"
                )
        if self.latents_std is not None and not all(s > 0 for s in self.latents_std):
            raise ConfigError(f"latents_std {list(self.latents_std)} is not positive")

    @property
    def down_block_types(self) -> tuple[str, ...]:
        """The encoder's blocks as diffusers names them."""
        levels = range(len(self.block_out_channels))
        return tuple(_ATTN_DOWN if i in self.down_attention else _PLAIN_DOWN for i in levels)

    @property
    def up_block_types(self) -> tuple[str, ...]:
        """The decoder's blocks as diffusers names them."""
        levels = range(len(self.block_out_channels))
        return tuple(_ATTN_UP if i in self.up_attention else _PLAIN_UP for i in levels)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "VAEConfig":
        """From the parsed `config.json`; fields only diffusers uses are ignored."""
        if raw.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ConfigError(
                f"_class_name {raw['_class_name']!r}: only AutoencoderKL is supported"
            )
        if raw.get("act_fn", "silu") != "silu":
            raise ConfigError(f"act_fn {raw['act_fn']!r}: only 'silu' is supported")
        absent = [name for name in ("block_out_channels", "layers_per_block") if name not in raw]
        if absent:
            raise ConfigError(f"config lacks {absent}")
        blocks = len(raw["block_out_channels"])
        values = {
            f.name: raw[f.name] for f in dataclasses.fields(cls) if raw.get(f.name) is not None
        }
        kinds = {
            "down_block_types": (_PLAIN_DOWN, _ATTN_DOWN),
            "up_block_types": (_PLAIN_UP, _ATTN_UP),
        }
        for key, (plain, attn) in kinds.items():
            types = list(raw.get(key, [plain] * blocks))
            if len(types) != blocks or not set(types) <= {plain, attn}:
                raise ConfigError(f"{key} {types}: only {blocks} x {plain!r} or {attn!r}")
            values[key.split("_")[0] + "_attention"] = tuple(
                i for i, kind in enumerate(types) if kind == attn
            )
        values["block_out_channels"] = tuple(int(c) for c in values["block_out_channels"])
        for key in ("latents_mean", "latents_std"):
            if key in values:
                values[key] = tuple(float(v) for v in np.ravel(values[key]))
        if isinstance(values.get("sample_size"), list):
            values["sample_size"] = tuple(values["sample_size"])
        return cls(**values)


class GroupNorm(eqx.Module):
    """GroupNorm of one (channels, H, W) example, computed in float32."""

    weight: Float[Array, " channels"]
    bias: Float[Array, " channels"]
    groups: int = eqx.field(static=True)

    def __init__(self, groups: int, channels: int):
        self.weight = jnp.ones(channels)
        self.bias = jnp.zeros(channels)
        self.groups = groups

    def __call__(self, x: Float[Array, "channels H W"]) -> Float[Array, "channels H W"]:
        _, height, width = x.shape
        # Split the channel axis only: merging it with H, W is a reshape that explicitly
        # sharded batches refuse.
        grouped = x.astype(jnp.float32).reshape(self.groups, -1, height, width)
        mean = grouped.mean((1, 2, 3), keepdims=True)
        var = jnp.square(grouped - mean).mean((1, 2, 3), keepdims=True)
        y = ((grouped - mean) * jax.lax.rsqrt(var + _EPS)).reshape(x.shape)
        y = y * self.weight.astype(jnp.float32)[:, None, None]
        return (y + self.bias.astype(jnp.float32)[:, None, None]).astype(x.dtype)


def _conv3x3(cin: int, cout: int, *, key: PRNGKeyArray, stride: int = 1, padding=1):
    return eqx.nn.Conv2d(cin, cout, 3, stride=stride, padding=padding, key=key)


class ResnetBlock(eqx.Module):
    """norm-silu-conv twice plus a skip, 1x1-projected when the width changes."""

    norm1: GroupNorm
    conv1: eqx.nn.Conv2d
    norm2: GroupNorm
    conv2: eqx.nn.Conv2d
    conv_shortcut: eqx.nn.Conv2d | None

    def __init__(self, cin: int, cout: int, groups: int, *, key: PRNGKeyArray):
        key1, key2, key3 = jr.split(key, 3)
        self.norm1 = GroupNorm(groups, cin)
        self.conv1 = _conv3x3(cin, cout, key=key1)
        self.norm2 = GroupNorm(groups, cout)
        self.conv2 = _conv3x3(cout, cout, key=key2)
        self.conv_shortcut = eqx.nn.Conv2d(cin, cout, 1, key=key3) if cin != cout else None

    def __call__(self, x: Float[Array, "cin H W"]) -> Float[Array, "cout H W"]:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Attention(eqx.Module):
    """Single-head self-attention over the H*W positions, added to its input."""

    group_norm: GroupNorm
    to_q: eqx.nn.Linear
    to_k: eqx.nn.Linear
    to_v: eqx.nn.Linear
    to_out: eqx.nn.Linear

    def __init__(self, channels: int, groups: int, *, key: PRNGKeyArray):
        qkey, kkey, vkey, okey = jr.split(key, 4)
        self.group_norm = GroupNorm(groups, channels)
        self.to_q = eqx.nn.Linear(channels, channels, key=qkey)
        self.to_k = eqx.nn.Linear(channels, channels, key=kkey)
        self.to_v = eqx.nn.Linear(channels, channels, key=vkey)
        self.to_out = eqx.nn.Linear(channels, channels, key=okey)

    def __call__(self, x: Float[Array, "channels H W"]) -> Float[Array, "channels H W"]:
        channels = x.shape[0]
        tokens = self.group_norm(x).reshape(channels, -1).T

        def one_head(linear: eqx.nn.Linear) -> Float[Array, "tokens 1 channels"]:
            return jax.vmap(linear)(tokens)[:, None, :]

        out = multihead_attention(one_head(self.to_q), one_head(self.to_k), one_head(self.to_v))
        return x + jax.vmap(self.to_out)(out[:, 0, :]).T.reshape(x.shape)


class MidBlock(eqx.Module):
    resnets: tuple[ResnetBlock, ResnetBlock]
    attention: Attention | None

    def __init__(self, channels: int, groups: int, add_attention: bool, *, key: PRNGKeyArray):
        key1, key2, akey = jr.split(key, 3)
        self.resnets = (
            ResnetBlock(channels, channels, groups, key=key1),
            ResnetBlock(channels, channels, groups, key=key2),
        )
        self.attention = Attention(channels, groups, key=akey) if add_attention else None

    def __call__(self, x: Float[Array, "channels H W"]) -> Float[Array, "channels H W"]:
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)


def _widths(channels: tuple[int, ...]) -> list[tuple[int, int]]:
    """(input, output) width of each block of a chain; the first keeps its input width."""
    return list(zip((channels[0], *channels[:-1]), channels, strict=True))


def _resnet_chain(cin: int, cout: int, groups: int, layers: int, key: PRNGKeyArray):
    keys = jr.split(key, layers)
    return tuple(
        ResnetBlock(cin if i == 0 else cout, cout, groups, key=k) for i, k in enumerate(keys)
    )


def _attention_chain(channels: int, groups: int, layers: int, add: bool, key: PRNGKeyArray):
    """One attention after each resnet of an `Attn*` block; none otherwise."""
    keys = jr.split(key, layers) if add else []
    return tuple(Attention(channels, groups, key=k) for k in keys)


def _resnets_then_attentions(block, x):
    """Each resnet, followed by its attention when the block has them."""
    for i, resnet in enumerate(block.resnets):
        x = resnet(x)
        if block.attentions:
            x = block.attentions[i](x)
    return x


class DownBlock(eqx.Module):
    resnets: tuple[ResnetBlock, ...]
    attentions: tuple[Attention, ...]
    downsample: eqx.nn.Conv2d | None

    def __init__(
        self,
        cin: int,
        cout: int,
        groups: int,
        layers: int,
        downsample: bool,
        attention: bool = False,
        *,
        key: PRNGKeyArray,
    ):
        rkey, dkey, akey = jr.split(key, 3)
        self.resnets = _resnet_chain(cin, cout, groups, layers, rkey)
        self.attentions = _attention_chain(cout, groups, layers, attention, akey)
        # Padding only at the bottom and right, then a valid stride-2 conv, as diffusers does.
        pad = ((0, 1), (0, 1))
        self.downsample = (
            _conv3x3(cout, cout, stride=2, padding=pad, key=dkey) if downsample else None
        )

    def __call__(self, x: Float[Array, "cin H W"]) -> Float[Array, "cout h w"]:
        x = _resnets_then_attentions(self, x)
        return x if self.downsample is None else self.downsample(x)


class UpBlock(eqx.Module):
    resnets: tuple[ResnetBlock, ...]
    attentions: tuple[Attention, ...]
    upsample: eqx.nn.Conv2d | None

    def __init__(
        self,
        cin: int,
        cout: int,
        groups: int,
        layers: int,
        upsample: bool,
        attention: bool = False,
        *,
        key: PRNGKeyArray,
    ):
        rkey, ukey, akey = jr.split(key, 3)
        self.resnets = _resnet_chain(cin, cout, groups, layers, rkey)
        self.attentions = _attention_chain(cout, groups, layers, attention, akey)
        self.upsample = _conv3x3(cout, cout, key=ukey) if upsample else None

    def __call__(self, x: Float[Array, "cin h w"]) -> Float[Array, "cout H W"]:
        x = _resnets_then_attentions(self, x)
        if self.upsample is None:
            return x
        nearest = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest-neighbour x2
        return self.upsample(nearest)


class Encoder(eqx.Module):
    conv_in: eqx.nn.Conv2d
    down_blocks: tuple[DownBlock, ...]
    mid_block: MidBlock
    conv_norm_out: GroupNorm
    conv_out: eqx.nn.Conv2d

    def __init__(self, config: VAEConfig, *, key: PRNGKeyArray):
        channels, groups = config.block_out_channels, config.norm_num_groups
        ikey, dkey, mkey, okey = jr.split(key, 4)
        self.conv_in = _conv3x3(config.in_channels, channels[0], key=ikey)
        keys, last = jr.split(dkey, len(channels)), len(channels) - 1
        self.down_blocks = tuple(
            DownBlock(
                cin,
                cout,
                groups,
                config.layers_per_block,
                i < last,
                i in config.down_attention,
                key=keys[i],
            )
            for i, (cin, cout) in enumerate(_widths(channels))
        )
        add_attention = config.mid_block_add_attention
        self.mid_block = MidBlock(channels[-1], groups, add_attention, key=mkey)
        self.conv_norm_out = GroupNorm(groups, channels[-1])
        # Mean and log-variance, stacked on the channel axis.
        self.conv_out = _conv3x3(channels[-1], 2 * config.latent_channels, key=okey)

    def __call__(self, image: Float[Array, "cin H W"]) -> Float[Array, "moments h w"]:
        x = self.conv_in(image)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(eqx.Module):
    conv_in: eqx.nn.Conv2d
    mid_block: MidBlock
    up_blocks: tuple[UpBlock, ...]
    conv_norm_out: GroupNorm
    conv_out: eqx.nn.Conv2d

    def __init__(self, config: VAEConfig, *, key: PRNGKeyArray):
        channels, groups = config.block_out_channels[::-1], config.norm_num_groups
        ikey, mkey, ukey, okey = jr.split(key, 4)
        self.conv_in = _conv3x3(config.latent_channels, channels[0], key=ikey)
        add_attention = config.mid_block_add_attention
        self.mid_block = MidBlock(channels[0], groups, add_attention, key=mkey)
        keys, last = jr.split(ukey, len(channels)), len(channels) - 1
        # One resnet more per block than the encoder has.
        self.up_blocks = tuple(
            UpBlock(
                cin,
                cout,
                groups,
                config.layers_per_block + 1,
                i < last,
                i in config.up_attention,
                key=keys[i],
            )
            for i, (cin, cout) in enumerate(_widths(channels))
        )
        self.conv_norm_out = GroupNorm(groups, channels[-1])
        self.conv_out = _conv3x3(channels[-1], config.out_channels, key=okey)

    def __call__(self, latent: Float[Array, "latent h w"]) -> Float[Array, "cout H W"]:
        x = self.mid_block(self.conv_in(latent))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(eqx.Module):
    """The KL autoencoder for one example; `encode`, `decode` and friends batch it."""

    encoder: Encoder
    decoder: Decoder
    quant_conv: eqx.nn.Conv2d | None
    post_quant_conv: eqx.nn.Conv2d | None
    config: VAEConfig = eqx.field(static=True)

    def __init__(self, config: VAEConfig, *, key: PRNGKeyArray):
        ekey, dkey, qkey, pkey = jr.split(key, 4)
        latent = config.latent_channels
        self.encoder = Encoder(config, key=ekey)
        self.decoder = Decoder(config, key=dkey)
        self.quant_conv = (
            eqx.nn.Conv2d(2 * latent, 2 * latent, 1, key=qkey) if config.use_quant_conv else None
        )
        self.post_quant_conv = (
            eqx.nn.Conv2d(latent, latent, 1, key=pkey) if config.use_post_quant_conv else None
        )
        self.config = config

    def encode(
        self, image: Float[Array, "cin H W"]
    ) -> tuple[Float[Array, "latent h w"], Float[Array, "latent h w"]]:
        """Mean and std of the diagonal Gaussian posterior of one image in [-1, 1]."""
        moments = self.encoder(image)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2)
        std = jnp.exp(0.5 * jnp.clip(logvar, _LOGVAR_MIN, _LOGVAR_MAX))
        return mean, std

    def decode(self, latent: Float[Array, "latent h w"]) -> Float[Array, "cout H W"]:
        """One image, about [-1, 1], from an unscaled latent."""
        if self.post_quant_conv is not None:
            latent = self.post_quant_conv(latent)
        return self.decoder(latent)


@eqx.filter_jit
def encode(
    vae: AutoencoderKL, images: Float[Array, "batch cin H W"]
) -> tuple[Float[Array, "batch latent h w"], Float[Array, "batch latent h w"]]:
    """Posterior mean and std of a batch of images in [-1, 1]."""
    return jax.vmap(vae.encode)(images)


@eqx.filter_jit
def decode(
    vae: AutoencoderKL, latents: Float[Array, "batch latent h w"]
) -> Float[Array, "batch cout H W"]:
    """Images, about [-1, 1], from a batch of unscaled latents."""
    return jax.vmap(vae.decode)(latents)


def _affine(name: str, get: Callable) -> list[Target]:
    """The weight and bias of a conv, linear or norm."""
    return [
        Target(f"{name}.weight", lambda m: get(m).weight),
        Target(f"{name}.bias", lambda m: get(m).bias),
    ]


def _item(get: Callable, index: int) -> Callable:
    return lambda m: get(m)[index]


def _resnet_at(name: str, get: Callable, cin: int, cout: int) -> list[Target]:
    targets = []
    for part in ("norm1", "conv1", "norm2", "conv2"):
        targets += _affine(f"{name}.{part}", lambda m, p=part: getattr(get(m), p))
    if cin != cout:
        targets += _affine(f"{name}.conv_shortcut", lambda m: get(m).conv_shortcut)
    return targets


def _resnets_at(name: str, get: Callable, cin: int, cout: int, layers: int) -> list[Target]:
    targets = []
    for i in range(layers):
        at = _item(lambda m: get(m).resnets, i)
        targets += _resnet_at(f"{name}.resnets.{i}", at, cin if i == 0 else cout, cout)
    return targets


def _attention_at(name: str, get: Callable) -> list[Target]:
    # Checkpoint names; the output projection is the first entry of a Sequential.
    parts = ("group_norm", "to_q", "to_k", "to_v", "to_out")
    targets = []
    for ours, theirs in zip(parts, (*parts[:-1], "to_out.0"), strict=True):
        targets += _affine(f"{name}.{theirs}", lambda m, o=ours: getattr(get(m), o))
    return targets


def _attentions_at(name: str, get: Callable, layers: int) -> list[Target]:
    targets = []
    for i in range(layers):
        targets += _attention_at(f"{name}.attentions.{i}", _item(lambda m: get(m).attentions, i))
    return targets


def _mid_block_at(name: str, get: Callable, config: VAEConfig) -> list[Target]:
    width = config.block_out_channels[-1]
    targets = _resnets_at(name, get, width, width, 2)
    if config.mid_block_add_attention:
        targets += _attention_at(f"{name}.attentions.0", lambda m: get(m).attention)
    return targets


def targets(config: VAEConfig) -> list[Target]:
    """Where each diffusers tensor goes in the model."""
    layers = config.layers_per_block
    last = len(config.block_out_channels) - 1
    targets = _affine("encoder.conv_in", lambda m: m.encoder.conv_in)
    channels = config.block_out_channels
    for i, (cin, cout) in enumerate(_widths(channels)):
        name, get = f"encoder.down_blocks.{i}", _item(lambda m: m.encoder.down_blocks, i)
        targets += _resnets_at(name, get, cin, cout, layers)
        if i in config.down_attention:
            targets += _attentions_at(name, get, layers)
        if i < last:
            targets += _affine(f"{name}.downsamplers.0.conv", lambda m, g=get: g(m).downsample)
    targets += _mid_block_at("encoder.mid_block", lambda m: m.encoder.mid_block, config)
    targets += _affine("encoder.conv_norm_out", lambda m: m.encoder.conv_norm_out)
    targets += _affine("encoder.conv_out", lambda m: m.encoder.conv_out)

    targets += _affine("decoder.conv_in", lambda m: m.decoder.conv_in)
    targets += _mid_block_at("decoder.mid_block", lambda m: m.decoder.mid_block, config)
    channels = channels[::-1]
    for i, (cin, cout) in enumerate(_widths(channels)):
        name, get = f"decoder.up_blocks.{i}", _item(lambda m: m.decoder.up_blocks, i)
        targets += _resnets_at(name, get, cin, cout, layers + 1)
        if i in config.up_attention:
            targets += _attentions_at(name, get, layers + 1)
        if i < last:
            targets += _affine(f"{name}.upsamplers.0.conv", lambda m, g=get: g(m).upsample)
    targets += _affine("decoder.conv_norm_out", lambda m: m.decoder.conv_norm_out)
    targets += _affine("decoder.conv_out", lambda m: m.decoder.conv_out)

    if config.use_quant_conv:
        targets += _affine("quant_conv", lambda m: m.quant_conv)
    if config.use_post_quant_conv:
        targets += _affine("post_quant_conv", lambda m: m.post_quant_conv)
    return targets


# Checkpoints saved before diffusers 0.14 (sd-vae-ft-mse and sd-vae-ft-ema among them) name
# the mid-block attention projections so.
_LEGACY = re.compile(
    r"(?P<at>(en|de)coder\.mid_block\.attentions\.0)\."
    r"(?P<old>query|key|value|proj_attn)\.(?P<kind>weight|bias)"
)
_RENAMED = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _current_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`tensors` with legacy attention names renamed, unless the new name is also present
    (then the old one is left to be reported as unexpected)."""
    renamed = {}
    for name, value in tensors.items():
        match = _LEGACY.fullmatch(name)
        if match is not None:
            new = f"{match['at']}.{_RENAMED[match['old']]}.{match['kind']}"
            name = name if new in tensors else new
        renamed[name] = value
    return renamed


def from_state_dict(config: VAEConfig, tensors: dict[str, np.ndarray]) -> AutoencoderKL:
    """An `AutoencoderKL` with every leaf filled from a diffusers state dict, or from a
    latent-diffusion one (`ldm_vae`: its loss and foundation-model tensors are ignored)."""
    skeleton = jax.eval_shape(lambda: AutoencoderKL(config, key=jr.key(0)))
    what = (
        f"an AutoencoderKL with blocks {list(config.block_out_channels)} of "
        f"{config.layers_per_block} layers"
    )
    if ldm_vae.is_ldm(tensors):
        levels = len(config.block_out_channels)
        renamed = [
            dataclasses.replace(t, names=ldm_vae.ldm_name(t.names, levels)) for t in targets(config)
        ]
        return fill(skeleton, tensors, renamed, what=what, ignored=ldm_vae.not_vae(tensors))
    return fill(skeleton, _current_names(tensors), targets(config), what=what)


PORT = Port(
    family="sd-vae",
    model_types=("AutoencoderKL",),
    config=VAEConfig,
    build=lambda config: AutoencoderKL(config, key=jr.key(0)),
    targets=targets,
    from_state_dict=from_state_dict,
)
