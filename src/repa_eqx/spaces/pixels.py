"""Pixel space: uint8 images scaled to [-1, 1], the model's input as they are."""

import numpy as np
from jaxtyping import Float, UInt8

from .base import Space


class Pixels(Space):
    name = "pixels"
    latent = False

    def encode(self, images: UInt8[np.ndarray, "batch C H W"]) -> Float[np.ndarray, "batch C H W"]:
        """x / 127.5 - 1, on the host."""
        return images.astype(np.float32) / 127.5 - 1.0

    def normalise(self, stored, *, key=None):
        return stored

    def decode(self, x) -> UInt8[np.ndarray, "batch H W C"]:
        """Rounded to the nearest level and clipped, channels last (grey stays one channel)."""
        levels = np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255)
        return levels.astype(np.uint8).transpose(0, 2, 3, 1)
