"""Finding training runs and loading their EMA model for sampling."""

import dataclasses
import json
from pathlib import Path

import equinox as eqx
import jax
import numpy as np

from ..core.errors import RepaError
from ..core.pytree import unflatten
from ..diffusion.interpolants import PathType
from ..model.sit import SiT
from ..pretrained import PretrainedNotFound, download, load_official
from ..pretrained.dit import is_dit_checkpoint, load_dit
from ..pretrained.lightningdit import is_lightningdit_checkpoint, load_lightningdit
from ..spaces import published_norm, space_of
from ..training.checkpoint import Checkpointer
from ..training.recipe import load_recipe, sit_config

DEFAULT_RUNS_DIR = Path("runs")


class RunNotFound(RepaError, ValueError):
    """No usable run or checkpoint where one was asked for."""


@dataclasses.dataclass
class SamplingModel:
    """A SiT ready to sample, and what sampling needs to know about how it was trained."""

    sit: SiT
    path: PathType  # the interpolant it was trained on (a DiT's is unused)
    latent: bool  # samples are a VAE's latents, not pixels
    source: Path
    step: int | None
    # How the run's latents were made and normalised (RUN/latents.json: space, encoder,
    # decoder, norm, scale, stats); None: SD-VAE latents scaled by 0.18215 (official
    # checkpoints, DiTs, runs trained before it was recorded).
    latents: dict | None = None

    @property
    def objective(self) -> str:
        """The objective it was trained with: "ddpm" for a DiT (learned variance; sampled by
        "ddpm" or "ddim"), "interpolant" for a SiT ("ode" or "sde"). A recipe's
        loss.objective is tied to its arch (recipe.py): this is the run's objective."""
        return "ddpm" if self.sit.config.learn_sigma else "interpolant"

    @property
    def default_mode(self) -> str:
        return "ddpm" if self.objective == "ddpm" else "ode"


def _checkpoint_steps(run_dir: Path) -> list[int]:
    ckpt = run_dir / "checkpoints"
    if not ckpt.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt.iterdir() if p.is_dir() and p.name.isdigit())


def latest_run(root: str | Path = DEFAULT_RUNS_DIR) -> Path:
    """The run under `root` whose newest checkpoint was written last."""
    root = Path(root)
    runs = [
        p
        for p in (root.iterdir() if root.is_dir() else [])
        if (p / "recipe.toml").is_file() and _checkpoint_steps(p)
    ]
    if not runs:
        raise RunNotFound(
            f"no run with checkpoints under {root}/: train one with `repa train RECIPE`, or "
            "name a checkpoint with --ckpt"
        )

    def written(run: Path) -> float:
        return (run / "checkpoints" / str(_checkpoint_steps(run)[-1])).stat().st_mtime

    return max(runs, key=written)


def load_run(path: str | Path, *, step: int | None = None, ema: bool = True) -> SamplingModel:
    """The (EMA) SiT of a run directory, or of one checkpoint `RUN/checkpoints/STEP`."""
    path = Path(path)
    if path.parent.name == "checkpoints" and path.name.isdigit():
        path, step = path.parent.parent, int(path.name)
    if not (path / "recipe.toml").is_file():
        raise RunNotFound(f"{path} is not a run directory (it has no recipe.toml)")
    steps = _checkpoint_steps(path)
    if not steps:
        raise RunNotFound(f"{path} has no checkpoint yet")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise RunNotFound(f"{path} has no checkpoint at step {step} (it has {steps})")
    recipe = load_recipe(path / "recipe.toml")
    flat, _ = Checkpointer(path / "checkpoints", read_only=True).restore_flat(step)
    prefix = ("ema" if ema else "model") + "/sit/"
    weights = {k[len(prefix) :]: np.asarray(v) for k, v in flat.items() if k.startswith(prefix)}
    if "label_table" not in weights:
        raise RunNotFound(f"{path}/checkpoints/{step} holds no {prefix[:-1]} weights")
    cls = weights.get("cls_token/embed/weight")  # REG: (hidden, CLS width)
    config = sit_config(
        recipe,
        num_classes=weights["label_table"].shape[0] - 1,
        cls_dim=0 if cls is None else cls.shape[1],
    )
    skeleton = eqx.filter_eval_shape(SiT, config, key=jax.random.key(0))
    sit = unflatten(weights, skeleton)
    latents = path / "latents.json"
    return SamplingModel(
        sit,
        path=recipe.loss.path,
        latent=recipe.data.dataset == "imagenet-latents",
        source=path,
        step=step,
        latents=json.loads(latents.read_text()) if latents.is_file() else None,
    )


def load_official_for_sampling(path: str | Path, **args) -> SamplingModel:
    """The EMA SiT of an official REPA checkpoint (`.pt` from sihyun-yu/REPA, or our
    `.safetensors` export of that layout); `args` supply what the file's `args` lack."""
    model, info = load_official(path, **args)
    return SamplingModel(
        model.sit,
        path=info.args.get("path_type", "linear"),
        latent=True,  # the reference trains on SD-VAE latents only
        source=Path(path),
        step=info.steps,
    )


def load_dit_for_sampling(path: str | Path, **hints) -> SamplingModel:
    """A public DiT checkpoint (facebookresearch/DiT's DiT-XL-2-256x256.pt, or one of its
    train.py's); `hints` supply what the tensors and the file name do not tell (`dit_config`)."""
    sit, _ = load_dit(path, **hints)
    return SamplingModel(sit, path="linear", latent=True, source=Path(path), step=None)


# LightningDiT's 32-channel models sample VA-VAE f16d32 latents, normalised channel-wise by
# the statistics published beside that VAE (latents_stats.pt), latent_multiplier 1.
LIGHTNINGDIT_VAE = "hustvl/vavae-imagenet256-f16d32-dinov2"
_F16D32_CHANNELS = 32


def lightningdit_latents() -> dict:
    """How LightningDiT's released models' latents were made (RUN/latents.json's keys): the
    VA-VAE's, normalised by its published statistics (fetched once: a small file)."""
    norm = published_norm(LIGHTNINGDIT_VAE)
    return {
        "space": space_of(LIGHTNINGDIT_VAE),
        "encoder": LIGHTNINGDIT_VAE,
        "decoder": LIGHTNINGDIT_VAE,
        "resolution": 256,
        "norm": "published",
        "scale": None,
        "stats": dataclasses.asdict(norm),
    }


def load_lightningdit_for_sampling(path: str | Path, **hints) -> SamplingModel:
    """A LightningDiT checkpoint (hustvl/LightningDiT's released .pt or its train.py's), in
    REPA's time (`data_at_t1`); `hints`: see `pretrained.lightningdit.lightningdit_config`.
    A 32-channel one samples VA-VAE f16d32 latents (`lightningdit_latents`)."""
    sit, _ = load_lightningdit(path, **hints)
    latents = lightningdit_latents() if sit.config.in_channels == _F16D32_CHANNELS else None
    return SamplingModel(
        sit, path="linear", latent=True, source=Path(path), step=None, latents=latents
    )


def load_for_sampling(
    source: str | Path, *, step: int | None = None, official_args: dict | None = None
) -> SamplingModel:
    """A run directory, one of its checkpoints, or a checkpoint file: a DiT's (told by its
    learned-variance output layer), a LightningDiT's (told by its switches' tensors) or an
    official REPA one."""
    source = Path(source)
    if source.is_file():
        if is_dit_checkpoint(source):
            return load_dit_for_sampling(source, **(official_args or {}))
        if is_lightningdit_checkpoint(source):
            return load_lightningdit_for_sampling(source, **(official_args or {}))
        return load_official_for_sampling(source, **(official_args or {}))
    if official_args:
        raise RunNotFound(f"{source} is a run directory; official args apply to .pt files only")
    return load_run(source, step=step)


def download_official(repo_id: str, *, revision: str | None = None) -> Path:
    """The one official checkpoint file (`*.pt`, else `*.safetensors`) of a Hub repository,
    fetched into the Hub cache (read from the cache alone under `HF_HUB_OFFLINE=1`)."""
    folder = download(
        repo_id,
        revision=revision,
        allow_patterns=["*.pt", "*.safetensors", "*.json"],
        local_hint="a local file with --ckpt",
    )
    for pattern in ("*.pt", "*.safetensors"):
        files = sorted(folder.rglob(pattern))
        if len(files) == 1:
            return files[0]
        if len(files) > 1:
            names = ", ".join(f.name for f in files)
            raise PretrainedNotFound(f"{repo_id!r} holds several checkpoints ({names})")
    raise PretrainedNotFound(f"{repo_id!r} holds no .pt or .safetensors checkpoint")
