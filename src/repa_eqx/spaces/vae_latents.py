"""A VAE's latent space normalised channel by channel, as LightningDiT (VA-VAE) and REPA-E
do: datasets store the posterior's mean and std, the training step samples
z = mean + std * eps (or takes the mean) and feeds the model
z_norm = (z - mean_c) / std_c * multiplier; samples are denormalised (the inverse) before the
VAE decodes them. The statistics are data: the dataset's (`repa preprocess` writes them into
the manifest) or the VAE's published `latents_mean` / `latents_std`.

A latent space is named by the VAE that encoded it (`space_of`); decoders trained on one
encoder's latents share its space (REPA encodes with sd-vae-ft-mse and decodes with
sd-vae-ft-ema), listed in `SHARED_SPACES`.
"""

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, UInt8

from ..core.errors import ConfigError
from ..pretrained.registry import locate
from ..pretrained.vae import AutoencoderKL
from .base import Space
from .sd_vae import encode_uint8, to_latents, to_uint8

# Latent spaces several VAEs share: {space: (its VAEs, the decoder used by default first)}.
SHARED_SPACES: dict[str, tuple[str, ...]] = {
    "sd-vae": ("stabilityai/sd-vae-ft-ema", "stabilityai/sd-vae-ft-mse"),
}
_SPACE_OF = {vae: space for space, vaes in SHARED_SPACES.items() for vae in vaes}


def space_of(vae: str | Path) -> str:
    """The latent space a VAE (Hub id or local folder) encodes to or decodes from: its shared
    space's name, else the VAE itself; a local folder or checkpoint file (a latent-diffusion
    `.pt`) by the hash of its files ("local-..."), so that a copy elsewhere is the same space."""
    vae = str(vae)
    if vae in _SPACE_OF:
        return _SPACE_OF[vae]
    return locate(vae).tag() if Path(vae).expanduser().exists() else vae


def default_decoder(encoder: str) -> str:
    """The VAE that decodes the samples of a space `encoder` encoded to, unless told
    otherwise: its shared space's first, else the encoder itself."""
    space = _SPACE_OF.get(str(encoder))
    return SHARED_SPACES[space][0] if space is not None else str(encoder)


@dataclasses.dataclass(frozen=True)
class LatentNorm:
    """Channel-wise z_norm = (z - mean_c) / std_c * multiplier; `source` says where the
    statistics come from ("dataset": the preprocessed set's, "published": the VAE config's)."""

    source: Literal["dataset", "published"]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    multiplier: float = 1.0

    def __post_init__(self):
        if len(self.mean) != len(self.std) or not self.mean:
            raise ConfigError(
                f"latent statistics need one mean and one std per channel, got "
                f"{len(self.mean)} means and {len(self.std)} stds"
            )
        if not all(math.isfinite(m) for m in self.mean) or not all(
            math.isfinite(s) and s > 0 for s in self.std
        ):
            raise ConfigError("latent statistics must be finite, with every std > 0")
        if not (math.isfinite(self.multiplier) and self.multiplier > 0):
            raise ConfigError(f"latent multiplier must be > 0, got {self.multiplier}")

    @classmethod
    def from_arrays(
        cls, source: str, mean: Sequence[Any], std: Sequence[Any], multiplier: float = 1.0
    ) -> "LatentNorm":
        """From per-channel values in any shape (diffusers' lists, LightningDiT's (1, C, 1, 1))."""
        flat = lambda a: tuple(float(v) for v in np.asarray(a, np.float64).reshape(-1))
        return cls(source, flat(mean), flat(std), float(multiplier))

    @property
    def channels(self) -> int:
        return len(self.mean)

    def _stats(self, dtype) -> tuple[Array, Array]:
        shape = (1, self.channels, 1, 1)  # batch c h w
        mean = jnp.asarray(self.mean, jnp.float32).reshape(shape).astype(dtype)
        std = jnp.asarray(self.std, jnp.float32).reshape(shape).astype(dtype)
        return mean, std

    def normalise(self, z: Float[Array, "batch c h w"]) -> Float[Array, "batch c h w"]:
        mean, std = self._stats(z.dtype)
        return (z - mean) / std * self.multiplier

    def denormalise(self, x: Float[Array, "batch c h w"]) -> Float[Array, "batch c h w"]:
        mean, std = self._stats(x.dtype)
        return x / self.multiplier * std + mean


def published_norm(vae: str | Path, multiplier: float = 1.0) -> LatentNorm:
    """The statistics a VAE's config.json publishes (`latents_mean`, `latents_std`: the
    diffusers convention), read without its weights."""
    config = locate(vae).config
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is None or std is None:
        raise ConfigError(
            f"{vae}: its config.json publishes no latents_mean / latents_std (channel-wise "
            "latent statistics)"
        )
    return LatentNorm.from_arrays("published", mean, std, multiplier)


@eqx.filter_jit
def _decode(
    vae: AutoencoderKL, norm: LatentNorm, x: Float[Array, "batch c h w"]
) -> UInt8[Array, "batch H W C"]:
    return to_uint8(jax.vmap(vae.decode)(norm.denormalise(x)))


@dataclasses.dataclass(frozen=True, eq=False)
class VAELatents(Space):
    """`vae` encodes (preprocessing) or decodes (sampling); the training step needs only
    `norm`."""

    norm: LatentNorm
    vae: AutoencoderKL | None = None

    name = "vae-latents"
    latent = True

    def _need_vae(self) -> AutoencoderKL:
        if self.vae is None:
            raise ValueError("this latent space was built without its VAE")
        return self.vae

    def encode(self, images):
        return encode_uint8(self._need_vae(), jnp.asarray(images))

    def normalise(self, stored, *, key=None):
        mean, std = jnp.split(stored, 2, axis=1)
        return self.norm.normalise(to_latents(mean, std, key=key, scale=1.0))

    def decode(self, x) -> UInt8[np.ndarray, "batch H W C"]:
        return np.asarray(_decode(self._need_vae(), self.norm, x))
