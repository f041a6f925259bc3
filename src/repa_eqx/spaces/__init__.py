"""The spaces a model denoises: pixels, the SD-VAE's latents (scaled), and a VAE's latents
normalised channel by channel. Each has one face (`Space`: encode images to what a dataset
stores, normalise that to the model's input, decode samples to uint8 images)."""

from .base import Space as Space
from .pixels import Pixels as Pixels
from .sd_vae import SDVAELatents as SDVAELatents
from .vae_latents import SHARED_SPACES as SHARED_SPACES
from .vae_latents import LatentNorm as LatentNorm
from .vae_latents import VAELatents as VAELatents
from .vae_latents import default_decoder as default_decoder
from .vae_latents import published_norm as published_norm
from .vae_latents import space_of as space_of
