"""repa-eqx: REPA (representation alignment) for diffusion transformers in JAX/Equinox.

The package is a house of rooms, each a subpackage with one job; imports run one way, from
the rooms above to the rooms below (checked by import-linter's layers contract, see
ARCHITECTURE.md), and no room uses another's private (underscore) names:

    runs         a run as a whole: load it for sampling, `repa sample`'s policy, export, Hub
    training     recipe, objective, jitted step, loop, checkpoints, mesh, metrics logs
    evaluation   ADM's suite (FID ...), FD-DINOv2, the MNIST classifier, CKNNA, linear probe
    sampling     a trained model -> images and ADM .npz files, batched over devices
    data         datasets, the latent-shard format, its writer (`repa preprocess`), the
                 grain pipeline, target features cached per dataset
    spaces       the space a model denoises: pixels, SD-VAE latents (scaled), a VAE's latents
                 normalised channel-wise (dataset or published statistics)
    pretrained   ported networks (DINOv2, CLIP, MAE, SD-VAE, Inception, REPA and DiT
                 checkpoints), one registry of names, the conversion cache
    model        the SiT / DiT and `REPAModel` (a SiT with alignment heads)
    diffusion    interpolants, losses, DDPM, samplers: pure functions
    alignment    alignment methods (REPA): heads, targets, loss
    nn           layers shared by trained and ported networks
    core         errors, cache folder, atomic files, flat pytrees, batched loops, progress

Expected errors derive from `RepaError` (core.errors). Importing repa_eqx starts no XLA
backend (call `jax.distributed.initialize` first on several hosts) and imports no
matplotlib. The names below are the public API; submodules hold the rest.
"""

from .alignment import Projector, repa_loss
from .core.errors import ConfigError, RepaError
from .diffusion.interpolants import coefficients, interpolate, sample_t
from .diffusion.losses import denoising_loss, total_loss
from .diffusion.samplers import ode_sample, sde_sample
from .evaluation.adm import Statistics, compute_metrics, frechet_distance
from .evaluation.representation import cknna, linear_probe, sit_features
from .evaluation.suite import build_reference
from .model import REPAModel, SiT, SiTConfig
from .pretrained import (
    AutoencoderKL,
    ClipVision,
    ClipVisionConfig,
    Dinov2,
    Dinov2Config,
    InceptionV3,
    Mae,
    MaeConfig,
    VAEConfig,
    WeightsMismatch,
    export_official,
    load_clip_vision,
    load_converted,
    load_dinov2,
    load_inception,
    load_mae,
    load_official,
    load_vae,
)
from .runs import export_run, from_pretrained
from .sampling.samples import SamplerSpec
from .training.recipe import Recipe, RecipeError, load_recipe

__all__ = [
    "AutoencoderKL",
    "ClipVision",
    "ClipVisionConfig",
    "ConfigError",
    "Dinov2",
    "Dinov2Config",
    "InceptionV3",
    "Mae",
    "MaeConfig",
    "Projector",
    "Recipe",
    "RecipeError",
    "REPAModel",
    "RepaError",
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
]
