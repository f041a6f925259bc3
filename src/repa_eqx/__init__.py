"""repa-eqx: REPA (representation alignment) for diffusion transformers in JAX/Equinox.

Functions named like their module (`convert`, `evaluate`, `fd_dinov2`, `generate`) are not
re-exported here, so `import repa_eqx.convert` stays the module."""

from ._convert import WeightsMismatch
from .alignment import cknna, linear_probe, sit_features
from .clip import ClipVision, ClipVisionConfig, load_clip_vision
from .convert import load_converted
from .dinov2 import Dinov2, Dinov2Config, load_dinov2
from .evaluate import build_reference
from .export import export_run, from_pretrained
from .generate import SamplerSpec
from .inception import InceptionV3, load_inception
from .interpolants import coefficients, interpolate, sample_t
from .losses import denoising_loss, repa_loss, total_loss
from .mae import Mae, MaeConfig, load_mae
from .metrics import Statistics, compute_metrics, frechet_distance
from .model import REPAModel
from .official import export_official, load_official
from .projector import Projector
from .recipe import Recipe, RecipeError, load_recipe
from .samplers import ode_sample, sde_sample
from .sit import SiT, SiTConfig
from .train import train
from .vae import AutoencoderKL, VAEConfig, load_vae

__all__ = [
    "AutoencoderKL",
    "ClipVision",
    "ClipVisionConfig",
    "Dinov2",
    "Dinov2Config",
    "InceptionV3",
    "Mae",
    "MaeConfig",
    "Projector",
    "Recipe",
    "RecipeError",
    "REPAModel",
    "SamplerSpec",
    "SiT",
    "SiTConfig",
    "Statistics",
    "VAEConfig",
    "WeightsMismatch",
    "build_reference",
    "cknna",
    "coefficients",
    "compute_metrics",
    "denoising_loss",
    "export_official",
    "export_run",
    "frechet_distance",
    "from_pretrained",
    "interpolate",
    "linear_probe",
    "load_clip_vision",
    "load_converted",
    "load_dinov2",
    "load_inception",
    "load_mae",
    "load_official",
    "load_recipe",
    "load_vae",
    "ode_sample",
    "repa_loss",
    "sample_t",
    "sde_sample",
    "sit_features",
    "total_loss",
    "train",
]
