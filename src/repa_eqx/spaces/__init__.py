"""The spaces a model denoises: pixels, and the SD-VAE's latents. Each has one face
(`Space`: encode images to what a dataset stores, normalise that to the model's input, decode
samples to uint8 images)."""

from .base import Space as Space
from .pixels import Pixels as Pixels
from .sd_vae import SDVAELatents as SDVAELatents
