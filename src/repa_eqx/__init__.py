"""repa-eqx: REPA (representation alignment) for diffusion transformers in JAX/Equinox."""

from ._convert import WeightsMismatch
from .dinov2 import Dinov2, Dinov2Config, load_dinov2
from .generate import SamplerSpec, generate
from .interpolants import coefficients, interpolate, sample_t
from .losses import denoising_loss, repa_loss, total_loss
from .model import REPAModel
from .projector import Projector
from .recipe import Recipe, RecipeError, load_recipe
from .samplers import ode_sample, sde_sample
from .sit import SiT, SiTConfig
from .train import train

__all__ = [
    "Dinov2",
    "Dinov2Config",
    "Projector",
    "REPAModel",
    "Recipe",
    "RecipeError",
    "SiT",
    "SiTConfig",
    "coefficients",
    "denoising_loss",
    "generate",
    "ode_sample",
    "sde_sample",
    "SamplerSpec",
    "interpolate",
    "load_dinov2",
    "load_recipe",
    "repa_loss",
    "sample_t",
    "total_loss",
    "train",
    "WeightsMismatch",
]
