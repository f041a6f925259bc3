"""What `repa sample` does, as one library function: find the model (a run, one of its
checkpoints, a checkpoint file, an export or a Hub repository), choose the sampler's defaults
for it, decode latents with the VAE, name the output folder, and sample."""

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp

from ..core.errors import ConfigError
from ..core.version import version
from ..pretrained import load_vae
from ..sampling.samples import SamplerSpec, Samples, choose_labels, generate
from ..spaces import LatentNorm, Pixels, SDVAELatents, Space, VAELatents, space_of
from .export import NotAnExport, from_pretrained
from .load import DEFAULT_RUNS_DIR, SamplingModel, download_official, latest_run, load_for_sampling

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"  # decodes SD-VAE latent samples, as REPA does


@dataclasses.dataclass
class SampleRun:
    model: SamplingModel
    spec: SamplerSpec
    samples: Samples


def find_model(
    ckpt: str | Path | None = None,
    *,
    from_hub: str | None = None,
    revision: str | None = None,
    official_args: Mapping[str, object] | None = None,
    runs_dir: str | Path = DEFAULT_RUNS_DIR,
) -> SamplingModel:
    """The model to sample: `ckpt` (a run, `RUN/checkpoints/STEP`, an official REPA or a DiT
    checkpoint file), else `from_hub` (an export, or a repository holding an official
    checkpoint), else the most recent run under `runs_dir`."""
    if ckpt is not None and from_hub is not None:
        raise ConfigError("give --ckpt or --from-hub, not both")
    official = dict(official_args or {})
    if from_hub is not None:
        try:
            return from_pretrained(from_hub, revision=revision)
        except NotAnExport:
            source = download_official(from_hub, revision=revision)
            return load_for_sampling(source, official_args=official)
    return load_for_sampling(ckpt or latest_run(runs_dir), official_args=official)


SAMPLE_PRECISIONS = ("fp32", "bf16")


def decoding_space(model: SamplingModel, vae: str | None = None) -> tuple[Space, str]:
    """(the space that decodes the model's samples, its decoder's name): `vae`, else the
    decoder the run recorded (else sd-vae-ft-ema); the run's normalisation is undone first.
    A `vae` of another latent space than the run's, or with another channel count than the
    model's input, is refused."""
    if not model.latent:
        return Pixels(), "pixels"
    latents = model.latents
    if latents is None:  # SD-VAE latents scaled by the VAE's scaling_factor
        decoder = vae or DEFAULT_VAE
    else:
        decoder = vae or latents["decoder"]
        if space_of(decoder) != latents["space"]:
            raise ConfigError(
                f"--vae {decoder!r} decodes latent space {space_of(decoder)!r}, but "
                f"{model.source} was trained on {latents['space']!r} (latents of "
                f"{latents['encoder']!r}); leave --vae out to decode with {latents['decoder']!r}"
            )
    loaded = load_vae(decoder)
    channels = model.sit.config.in_channels
    if loaded.config.latent_channels != channels:
        raise ConfigError(
            f"--vae {decoder!r} decodes {loaded.config.latent_channels}-channel latents, but "
            f"{model.source} samples {channels} channels"
        )
    if latents is None or latents["stats"] is None:
        return SDVAELatents(loaded), decoder
    stats = latents["stats"]
    norm = LatentNorm.from_arrays(stats["source"], stats["mean"], stats["std"], stats["multiplier"])
    return VAELatents(norm, loaded), decoder


def default_steps(mode: str) -> int:
    return 250 if mode in ("sde", "ddpm") else 50


def sample_model(
    model: SamplingModel,
    *,
    mode: str | None = None,
    steps: int | None = None,
    solver: str = "euler",
    cfg: float = 1.0,
    interval: tuple[float, float] = (0.0, 1.0),
    cfg_channels: int | None = None,
    cls_cfg: float | None = None,
    shift: float = 1.0,
    precision: str = "fp32",
    num: int = 64,
    classes: Sequence[int] | None = None,
    class_balanced: bool = False,
    seed: int = 0,
    batch: int = 64,
    out: str | Path | None = None,
    vae: str | None = None,
    png: bool = True,
    from_hub: str | None = None,
    progress: bool = True,
    console=None,
) -> SampleRun:
    """`num` samples of `model` written as PNGs, a grid and an ADM `.npz`.

    `mode` defaults to the model's ("ode" for a SiT, "ddpm" for a DiT) and `steps` to 50
    (ODE, DDIM) or 250 (SDE, DDPM). Latent-space models are decoded with `vae` (default: the
    run's decoder; see `decoding_space`), their normalisation undone first. The output
    folder defaults to RUN/samples/SETTINGS, or samples/NAME-SETTINGS in the working
    directory for a checkpoint file or a Hub model (`from_hub` names it).

    `precision` "bf16" runs the network on bf16 copies of the weights (the sampler's state and
    the integration stay float32). In `just bench-sample` on this project's CPU (AMX), bf16
    SiT-B/2 and XL/2 samples came 1.6-2.7x faster than fp32 and differed from them by at most
    0.02-0.05 (mean 0.005-0.009) in latent units. The folder name and the card say so.

    `shift` (ODE): LightningDiT's timestep shift (its `timestep_shift`; 1: none); with its
    `cfg_interval_start` c as `interval` (0, 1 - c) and `cfg_channels` 3, its sampler."""
    if precision not in SAMPLE_PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(SAMPLE_PRECISIONS)}: {precision!r}")
    mode = mode or model.default_mode
    spec = SamplerSpec(
        mode,
        default_steps(mode) if steps is None else steps,
        solver=solver,
        cfg_scale=cfg,
        interval=interval,
        path=model.path,
        cfg_channels=cfg_channels,
        cls_cfg_scale=cls_cfg if model.sit.config.cls_dim else None,
        shift=shift,
    )
    if cls_cfg is not None and not model.sit.config.cls_dim:
        raise ConfigError("--cls-cfg is for REG models (a CLS token); this one has none")
    labels = choose_labels(
        num, model.sit.config.num_classes, seed=seed, classes=classes, balanced=class_balanced
    )
    space, decoder = decoding_space(model, vae)
    name = f"{spec.name}-seed{seed}-n{num}" + ("" if precision == "fp32" else f"-{precision}")
    if out is not None:
        folder = Path(out)
    elif from_hub is not None:  # not inside the Hub cache
        folder = Path("samples") / f"{from_hub.replace('/', '--')}-{name}"
    elif model.source.is_file():  # an official checkpoint: beside the working directory
        folder = Path("samples") / f"{model.source.stem}-{name}"
    else:
        folder = model.source / "samples" / name
    if classes is not None:
        label_rule = {"classes": [int(c) for c in classes]}
    else:
        label_rule = "class-balanced" if class_balanced else "uniform at random per example"
    card = {
        "model": {
            "source": str(from_hub or model.source),
            "step": model.step,
            "weights": "EMA",
            "objective": model.objective,
        },
        "sampler": dataclasses.asdict(spec),
        "precision": precision,
        "labels": label_rule,
        "num": num,
        "seed": seed,
        "decoder": decoder,
        "latents": model.latents,
        "repa_eqx": version(),
    }
    sit = model.sit
    if precision == "bf16":
        sit = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if eqx.is_inexact_array(a) else a, sit)
    samples = generate(
        sit,
        spec,
        num=num,
        labels=labels,
        seed=seed,
        batch_size=batch,
        space=space,
        out=folder,
        png=png,
        progress=progress,
        console=console,
        card=card,
    )
    return SampleRun(model, spec, samples)
