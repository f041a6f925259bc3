"""The face of a space a diffusion model denoises, and the way between it and images.

A dataset stores what `encode` makes of uint8 images; `normalise` turns one stored batch into
the model's input (on device, inside the training step); `decode` turns the model's samples
back into uint8 images. Pixels store the model's input itself; a VAE's latent space stores
the posterior's moments, samples them and scales them.
"""

import abc

import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, UInt8


class Space(abc.ABC):
    name: str
    latent: bool  # samples are latents that a VAE decodes, not pixels

    @abc.abstractmethod
    def encode(
        self, images: UInt8[np.ndarray, "batch C H W"]
    ) -> Float[Array | np.ndarray, "batch ..."]:
        """What a dataset stores for a batch of uint8 images."""

    @abc.abstractmethod
    def normalise(
        self, stored: Float[Array, "batch ..."], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "batch c h w"]:
        """The model's input from a stored batch (`key`: for a posterior sample)."""

    @abc.abstractmethod
    def decode(self, x: Float[Array, "batch c h w"]) -> UInt8[np.ndarray, "batch H W c"]:
        """uint8 NHWC images from the model's samples."""
