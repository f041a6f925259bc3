"""The latent space of the Stable Diffusion VAE, as REPA uses it: datasets store the
posterior's mean and std of each image (`repa preprocess`), the training step samples
z = (mean + std * eps) * 0.18215, and samples are decoded by the VAE (sd-vae-ft-ema) and
truncated to uint8 as the reference's generate.py does."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, UInt8

from ..pretrained.vae import SCALING_FACTOR, AutoencoderKL
from .base import Space


def to_latents(
    mean: Float[Array, "*shape"],
    std: Float[Array, "*shape"],
    *,
    key: PRNGKeyArray | None = None,
    scale: float = SCALING_FACTOR,
) -> Float[Array, "*shape"]:
    """Scaled latents: a posterior sample `(mean + std * eps) * scale`, or `mean * scale`
    without a key."""
    if key is None:
        return mean * scale
    return (mean + std * jr.normal(key, mean.shape, mean.dtype)) * scale


def to_uint8(images: Float[Array, "batch C H W"]) -> UInt8[Array, "batch H W C"]:
    """[-1, 1] images to uint8 NHWC as REPA's generate.py does: (x + 1) / 2 * 255, clipped,
    then truncated (a float-to-uint8 cast), not rounded."""
    pixels = jnp.clip(255.0 * ((images.astype(jnp.float32) + 1) / 2), 0, 255)
    return pixels.astype(jnp.uint8).transpose(0, 2, 3, 1)


@eqx.filter_jit
def latents_to_uint8(
    vae: AutoencoderKL, latents: Float[Array, "batch latent h w"]
) -> UInt8[Array, "batch H W C"]:
    """Scaled latents (a diffusion model's samples) to uint8 NHWC images."""
    return to_uint8(jax.vmap(vae.decode)(latents / vae.config.scaling_factor))


@eqx.filter_jit
def encode_uint8(
    vae: AutoencoderKL, images: UInt8[Array, "batch 3 H W"]
) -> Float[Array, "batch moments h w"]:
    """Posterior mean and std, concatenated on the channel axis, of uint8 images scaled to
    [-1, 1] as the reference does (x / 127.5 - 1)."""
    mean, std = jax.vmap(vae.encode)(images.astype(jnp.float32) / 127.5 - 1)
    return jnp.concatenate([mean, std], axis=1)


@dataclasses.dataclass(frozen=True, eq=False)
class SDVAELatents(Space):
    """`vae` encodes (preprocessing) or decodes (sampling); the training step needs only
    `scale`, the dataset's (0.18215 for the SD-VAEs)."""

    vae: AutoencoderKL | None = None
    scale: float | None = None

    name = "sd-vae"
    latent = True

    @property
    def factor(self) -> float:
        if self.scale is not None:
            return self.scale
        return self.vae.config.scaling_factor if self.vae is not None else SCALING_FACTOR

    def _need_vae(self) -> AutoencoderKL:
        if self.vae is None:
            raise ValueError("this latent space was built without its VAE")
        return self.vae

    def encode(self, images):
        return encode_uint8(self._need_vae(), jnp.asarray(images))

    def normalise(self, stored, *, key=None):
        mean, std = jnp.split(stored, 2, axis=1)
        return to_latents(mean, std, key=key, scale=self.factor)

    def decode(self, x) -> UInt8[np.ndarray, "batch H W C"]:
        return np.asarray(latents_to_uint8(self._need_vae(), x))
