"""The training loop: everything around the jitted step (`step.py`). It prepares the run
(folder, encoders, data, evaluation, state, mesh), then moves data, logs, checkpoints, draws
sample grids and evaluates, and keeps the work done when interrupted."""

import dataclasses
import datetime
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..core.errors import ConfigError, RepaError, StorageError
from ..core.files import storage_errors, write_json
from ..core.images import save_grid
from ..core.progress import progress_bar
from ..data.datasets import PIXEL_DATASETS, ImageDataset, load_pixel_dataset
from ..data.features import precompute_features
from ..data.pipeline import Batches, LatentSource, PixelSource, Source, batch_dataset
from ..data.shards import manifest_space, read_manifest
from ..model.sit import SiTConfig
from ..pretrained.encoders import EncoderError, TargetEncoder, load_target_encoder
from ..pretrained.registry import load_vae, locate
from ..sampling.samples import SamplerSpec, example_inputs, sample_jit
from ..spaces import (
    LatentNorm,
    Pixels,
    SDVAELatents,
    Space,
    VAELatents,
    default_decoder,
    published_norm,
    space_of,
)
from .checkpoint import Checkpointer, NonFiniteState
from .lock import LOCK, RunLock
from .metrics_log import MetricsLog, plot_eval, plot_metrics
from .monitor import Monitor
from .parallel import (
    batch_sharding,
    check_batch,
    describe,
    global_batch,
    make_mesh,
    place,
    replicated,
    state_shardings,
)
from .precision import resolve_precision
from .recipe import (
    EncoderSpec,
    Recipe,
    RecipeError,
    alignment_method,
    attention_distillation,
    dispersive_term,
    dump_recipe,
    load_recipe,
    recipe_to_dict,
    reg_term,
    schedule_points,
    sit_config,
)
from .step import StepConfig, init_state, make_optimizer, make_train_step


class TrainingDiverged(RepaError, RuntimeError):
    """The loss or the state became non-finite; the message names the step and the last good
    checkpoint."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; `message` says truthfully what was saved."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    step: int
    last: dict[str, float]


@dataclasses.dataclass
class TrainData:
    source: Source
    num_classes: int
    dataset: ImageDataset | None  # pixel datasets (in memory)
    features: Sequence[np.ndarray] | None  # cached target features
    latent_scale: float
    latent_norm: LatentNorm | None = None  # channel-wise normalisation (else latent_scale)
    latents: dict | None = None  # the run's record of its latent space (RUN/latents.json)


def _with_cls(recipe: Recipe, index: int, encoder: TargetEncoder) -> TargetEncoder:
    try:
        return dataclasses.replace(encoder, cls_token=True)
    except EncoderError as e:
        raise RecipeError(f"recipe key 'encoders[{index}].{e.field}' (loss.reg): {e}") from None


def load_encoders(specs: Sequence[EncoderSpec], grid: int) -> tuple[TargetEncoder, ...]:
    """One frozen target encoder per recipe entry, its position table resampled to `grid`."""
    encoders = []
    for i, spec in enumerate(specs):
        try:
            encoder = load_target_encoder(
                spec.id, resolution=spec.resolution, grid=grid, revision=spec.revision
            )
        except EncoderError as e:
            raise RecipeError(f"recipe key 'encoders[{i}].{e.field}': {e}") from None
        encoders.append(encoder)
    return tuple(encoders)


def _load_data(
    recipe: Recipe,
    encoders: Sequence[TargetEncoder],
    config: SiTConfig,
    *,
    in_step: bool,
    progress,
    console,
) -> TrainData:
    """The training data; with `in_step` False the encoders serve evaluation only (their
    cached features go to the Monitor, not into the batches)."""
    d = recipe.data
    if d.dataset in PIXEL_DATASETS:
        dataset = load_pixel_dataset(d.dataset, recipe.model.input_size)
        if dataset.images.shape[1] != config.in_channels:
            raise RecipeError(
                f"recipe key 'model.in_channels': {config.in_channels}, but {d.dataset} has "
                f"{dataset.images.shape[1]} channels"
            )
        features = None
        if encoders and d.precompute_features:
            features = precompute_features(encoders, dataset, progress=progress, console=console)
        source = PixelSource(
            dataset,
            keep_image=bool(encoders) and in_step,
            features=features if in_step else None,
        )
        return TrainData(source, dataset.num_classes, dataset, features, 1.0)
    pixel = ", ".join(PIXEL_DATASETS)
    if d.precompute_features:
        raise RecipeError(
            f"recipe key 'data.precompute_features' is for the pixel datasets ({pixel}) only"
        )
    if recipe.eval.every:
        raise RecipeError(
            f"recipe key 'eval.every': in-training evaluation needs a pixel dataset ({pixel})"
        )
    source = LatentSource(d.path, keep_image=bool(encoders) and in_step)
    expected = (config.in_channels, config.input_size, config.input_size)
    if source.latent_shape != expected:
        raise RecipeError(
            f"recipe section 'model': in_channels/input_size {expected} do not match the "
            f"latents {source.latent_shape} in {d.path}"
        )
    manifest = source.manifest
    space, encoder = manifest_space(manifest), manifest["vae"]["source"]
    decoder = d.vae or default_decoder(encoder)
    if d.latent_space is not None:
        if space_of(d.latent_space) != space:
            raise RecipeError(
                f"recipe key 'data.latent_space': {d.latent_space!r} is latent space "
                f"{space_of(d.latent_space)!r}, but the shards in {d.path} hold {space!r} "
                f"(written by {encoder!r})"
            )
        if space_of(decoder) != space:
            raise RecipeError(
                f"recipe key 'data.vae': {decoder!r} decodes latent space {space_of(decoder)!r}, "
                f"but data.latent_space {d.latent_space!r} is {space!r}"
            )
    norm = _latent_norm(d, manifest, encoder)
    if norm is not None and norm.channels != config.in_channels:
        raise RecipeError(
            f"recipe key 'data.latent_norm': {d.latent_norm!r} statistics have "
            f"{norm.channels} channels, the latents in {d.path} {config.in_channels}"
        )
    scale = float(manifest.get("latent_scale", 0.18215))
    latents = {
        "space": space,
        "encoder": encoder,
        "decoder": decoder,
        "resolution": manifest["resolution"],
        "norm": d.latent_norm,
        "scale": scale if norm is None else None,
        "stats": None if norm is None else dataclasses.asdict(norm),
    }
    return TrainData(source, source.num_classes, None, None, scale, norm, latents)


def _latent_norm(d, manifest: dict, encoder: str) -> LatentNorm | None:
    """The channel-wise normalisation `data.latent_norm` asks for (None: "scale")."""
    if d.latent_norm == "scale":
        return None
    if d.latent_norm == "published":
        try:
            return published_norm(encoder, d.latent_multiplier)
        except ConfigError as e:
            raise RecipeError(f"recipe key 'data.latent_norm' = 'published': {e}") from None
    stats = manifest.get("latent_stats")
    if not stats:
        raise RecipeError(
            f"recipe key 'data.latent_norm' = 'dataset': {d.path}/manifest.json has no "
            "latent_stats (written by an older repa-eqx): `repa preprocess --finalize` adds them"
        )
    return LatentNorm.from_arrays("dataset", stats["mean"], stats["std"], d.latent_multiplier)


def _with_decoder(recipe: Recipe) -> Recipe:
    """`data.vae` filled in where unset: the default decoder of the shards' latent space."""
    d = recipe.data
    if d.dataset != "imagenet-latents" or d.vae is not None:
        return recipe
    decoder = default_decoder(read_manifest(d.path)["vae"]["source"])
    return dataclasses.replace(recipe, data=dataclasses.replace(d, vae=decoder))


LATENTS = "latents.json"  # the run's latent space: space, encoder, decoder, normalisation


def _record_latents(run_dir: Path, latents: dict, resume: bool) -> None:
    """Write RUN/latents.json; a resume must find the same (the statistics included)."""
    path = run_dir / LATENTS
    if resume and path.is_file():
        saved = json.loads(path.read_text())
        changed = sorted(k for k in saved.keys() | latents.keys() if saved.get(k) != latents.get(k))
        if changed:
            raise RecipeError(
                f"--resume: the latents differ from {path} at {', '.join(changed)} (the "
                "shards or their statistics changed)"
            )
    write_json(path, latents, indent=1)


def _flat_keys(table: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        out.update(_flat_keys(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


# Keys a resumed run may change (recorded in RUN/resumes.jsonl): they change how long, how
# fast or how it is logged, not what is trained (the optimiser's settings keep its state).
_MUTABLE_ON_RESUME = (
    "optim.",
    "train.steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.sample_every",
    "train.keep_checkpoints",
    "train.num_samples",
    "train.sample_steps",
    "train.sample_cfg",
    "train.sample_shift",
    "train.nonfinite",
    "train.max_rollbacks",
    "train.remat",
    "eval.",
    "output.",
)


def _check_saved_recipe(run_dir: Path, recipe: Recipe) -> dict[str, list]:
    """{key: [saved, now]} of the keys a resume changes; resuming with a different model,
    objective or data would silently mix two runs, so those are refused."""
    saved_path = run_dir / "recipe.toml"
    if not saved_path.exists():
        return {}
    saved = _flat_keys(recipe_to_dict(load_recipe(saved_path)))
    now = _flat_keys(recipe_to_dict(recipe))
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    refused = [k for k in changed if not k.startswith(_MUTABLE_ON_RESUME)]
    if refused:
        raise RecipeError(
            f"--resume: the recipe differs from {saved_path} at " + ", ".join(refused)
        )
    return {k: [saved.get(k), now.get(k)] for k in changed}


def _prepare_run_dir(recipe: Recipe, *, resume: bool) -> tuple[Path, dict[str, list]]:
    """The run's folder and what a resume changes in its recipe; refuses to overwrite a run,
    and to resume one that is not there."""
    run_dir = Path(recipe.output.dir)
    ckpt_dir = run_dir / "checkpoints"
    if not resume and ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        raise RecipeError(
            f"{run_dir} already holds checkpoints: pass --resume to continue it, or choose "
            "another output.dir"
        )
    if resume and not (run_dir / "recipe.toml").is_file():
        raise RecipeError(f"--resume: {run_dir} is not a run (it has no recipe.toml)")
    return run_dir, _check_saved_recipe(run_dir, recipe) if resume else {}


def _preflight(recipe: Recipe, run_dir: Path, state_bytes: int, latent: bool) -> None:
    """What the loop will need later, checked before step 1: a writable output folder with
    room for a checkpoint, and the VAE that decodes the sample grids of a latent run."""
    ckpt_dir = run_dir / "checkpoints"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        probe = ckpt_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise StorageError(f"output.dir {run_dir} is not writable: {e.strerror}") from None
    free = shutil.disk_usage(ckpt_dir).free
    # A new checkpoint is complete on disk before the oldest kept one goes.
    need = 2 * state_bytes + (64 << 20)
    if free < need:
        raise StorageError(
            f"output.dir {run_dir}: {free / 2**30:.2f} GiB free, but checkpoints of this run "
            f"need about {need / 2**30:.2f} GiB (two of {state_bytes / 2**30:.2f} GiB): free "
            "some space or choose another output.dir"
        )
    if latent:
        locate(recipe.data.vae).folder()  # the grids' decoder: present (or downloadable) now
    if recipe.output.wandb is not None and importlib.util.find_spec("wandb") is None:
        raise RecipeError(
            "recipe key 'output.wandb' needs the wandb package: pip install 'repa-eqx[wandb]'"
        )


def _record_resume(run_dir: Path, step: int, changed: dict[str, list]) -> None:
    """What a resume changed, appended to RUN/resumes.jsonl."""
    record = {
        "step": step,
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "changed": changed,
    }
    with (run_dir / "resumes.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


def _grid_drawer(
    recipe: Recipe, config: SiTConfig, space: Callable[[], Space], run_dir: Path, lead: bool
) -> Callable[[int, eqx.Module], None]:
    """`draw(step, ema_model)`: the EMA model's sample grid, the same noise every time so
    that the grids of successive steps are comparable."""
    sampler = SamplerSpec(
        "ddpm" if recipe.loss.objective == "ddpm" else "ode",
        recipe.train.sample_steps,
        cfg_scale=recipe.train.sample_cfg,
        path=recipe.loss.path,
        shift=recipe.train.sample_shift,
    )
    n = recipe.train.num_samples
    labels = jnp.arange(n) % config.num_classes
    shape = (config.in_channels, config.input_size, config.input_size)
    nrow = config.num_classes if config.num_classes <= 16 else 8

    def draw(step: int, ema) -> None:
        noise, keys = example_inputs(recipe.train.seed + 1, jnp.arange(n), shape)
        x = sample_jit(ema.sit, sampler, noise, labels, keys)
        images = space().decode(x).transpose(0, 3, 1, 2)
        if not lead:  # every process samples (the weights may be split over hosts)
            return
        scale = max(1, 64 // images.shape[-1])
        save_grid(images, run_dir / "samples" / f"step_{step:07d}.png", nrow=nrow, scale=scale)
        save_grid(images, run_dir / "samples.png", nrow=nrow, scale=scale)

    return draw


def _space(recipe: Recipe, data: TrainData) -> Callable[[], Space]:
    """The space the run denoises, built on first use: a latent space loads its decoder
    (`data.vae`) only when the first grid is drawn."""
    built: list[Space] = []

    def get() -> Space:
        if not built:
            if data.dataset is not None:
                built.append(Pixels())
            elif data.latent_norm is None:
                built.append(SDVAELatents(load_vae(recipe.data.vae)))
            else:
                built.append(VAELatents(data.latent_norm, load_vae(recipe.data.vae)))
        return built[0]

    return get


def _restore(checkpointer: Checkpointer, state, shardings, run_dir: Path, console):
    """(step, state, metadata: the data iterator state, ...) of the newest readable
    checkpoint; none is an error (a resume never restarts from step 0 in silence)."""
    restored = checkpointer.restore_latest(
        state, shardings, report=lambda m: console.print(f"[yellow]{m}")
    )
    if restored is None:
        aside = sorted(p.name for p in checkpointer.directory.glob("corrupt-*"))
        why = (
            f"every checkpoint is unreadable (set aside: {', '.join(aside)})"
            if aside
            else ("it holds no checkpoint")
        )
        raise RecipeError(
            f"--resume: nothing to resume in {run_dir}: {why}; start it again without --resume "
            "(after moving it away) or choose another output.dir"
        )
    start, state, meta = restored
    console.print(f"resumed {run_dir} from step {start}")
    return start, state, meta


def _batches(recipe: Recipe, source: Source, start: int, data_state, sharding) -> Batches:
    """This process's batches from step `start` on, placed on the mesh as global arrays; a
    restored iterator state must be that of step `start`."""
    batches = Batches(
        batch_dataset(
            source,
            batch_size=recipe.data.batch_size,
            seed=recipe.train.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        ),
        start,
        threads=recipe.data.num_threads,
        prefetch=recipe.data.prefetch,
        place=lambda host: global_batch(host, sharding),
    )
    if data_state is not None:
        if int(data_state.get("next_index", -1)) != start:
            raise RecipeError(
                f"checkpoint {start}: its data iterator state {data_state} does not match its step"
            )
        batches.restore(data_state)
    return batches


def _check_teacher(recipe: Recipe, teacher) -> None:
    """HASTE's teacher has the layers and heads the recipe pairs with the SiT's."""
    haste = recipe.loss.haste
    if not all(1 <= n <= teacher.num_layers for n in haste.teacher_layers):
        raise RecipeError(
            f"recipe key 'loss.haste.teacher_layers': {list(haste.teacher_layers)} not all in "
            f"[1, {teacher.num_layers}] ({teacher.name} has {teacher.num_layers} layers)"
        )
    if haste.heads > teacher.num_heads:
        raise RecipeError(
            f"recipe key 'loss.haste.heads': {haste.heads} heads, {teacher.name} has "
            f"{teacher.num_heads}"
        )


class _Speed:
    """Steps and images per second since the previous call (the first: since `step`), logged
    with the losses; an interval holds whatever else ran in it (evaluation, grids, compiles)."""

    def __init__(self, step: int, batch_size: int):
        self.time, self.step, self.batch_size = time.perf_counter(), step, batch_size

    def __call__(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        rate = (step - self.step) / max(now - self.time, 1e-9)
        self.time, self.step = now, step
        return {"steps_per_s": rate, "images_per_s": rate * self.batch_size}


def _record_rollback(run_dir: Path, record: dict) -> None:
    """One rollback of train.nonfinite "rollback", appended to RUN/rollbacks.jsonl."""
    record = {**record, "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    with storage_errors(run_dir / "rollbacks.jsonl"), (run_dir / "rollbacks.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


def _log_line(values: dict[str, float]) -> str:
    info = f"loss {values['loss']:.4f}" if "loss" in values else "loss skipped"
    if values.get("skipped_steps"):
        info += f"  skipped {values['skipped_steps']:.0f}"
    if "repa_loss" in values:
        info += f"  repa {values['repa_loss']:+.4f}"
    if "attn_loss" in values:
        info += f"  attn {values['attn_loss']:.4f}"
    if "dispersive_loss" in values:
        info += f"  disp {values['dispersive_loss']:+.4f}"
    if "cos_loss" in values:
        info += f"  cos {values['cos_loss']:.4f}"
    return info


def train(
    recipe: Recipe,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    console=None,
) -> TrainResult:
    """Train per `recipe` on every device (the recipe's mesh); outputs go to
    `recipe.output.dir`, which this process holds locked while it trains. `stop_after` ends the
    loop early (after that many steps of this call) as if interrupted, for tests."""
    from rich.console import Console

    console = console or Console(stderr=True)
    lead = jax.process_index() == 0  # writes logs, plots and grids; every process checkpoints
    # "auto" becomes what this hardware runs best; the run records (and a resume compares)
    # the resolved value.
    precision, why = resolve_precision(recipe.train.precision)
    recipe = dataclasses.replace(
        recipe, train=dataclasses.replace(recipe.train, precision=precision)
    )
    recipe = _with_decoder(recipe)
    with storage_errors(recipe.output.dir):
        run_dir, changed = _prepare_run_dir(recipe, resume=resume)
    mesh = make_mesh(recipe.mesh.data, recipe.mesh.fsdp)
    check_batch(recipe.data.batch_size, mesh)
    lock = RunLock(run_dir) if lead else None
    if lock is not None:
        with storage_errors(run_dir / LOCK):
            took_over = lock.acquire()
        if took_over:
            console.print(f"[yellow]{run_dir}: {took_over}")
    try:
        return _train(
            recipe, run_dir, mesh, changed, lead, resume, progress, stop_after, console, why
        )
    finally:
        if lock is not None:
            lock.release()


def _train(recipe, run_dir, mesh, changed, lead, resume, progress, stop_after, console, why):
    if lead:
        (run_dir / "recipe.toml").write_text(dump_recipe(recipe))

    config = sit_config(recipe)
    reg = reg_term(recipe)
    use_repa = bool(recipe.encoders) and (recipe.loss.proj_coeff != 0 or reg is not None)
    # With lambda = 0 the encoders are loaded only when the evaluation scores CKNNA against
    # them: a vanilla baseline measured exactly like its REPA twin.
    eval_only = (
        not use_repa
        and bool(recipe.encoders)
        and bool(recipe.eval.every)
        and "cknna" in recipe.eval.metrics
    )
    loaded = load_encoders(recipe.encoders, config.grid_size) if use_repa or eval_only else ()
    plain = loaded  # what the evaluation compares with: patch features alone
    if reg is not None:  # REG: each target starts with the teacher's CLS token
        loaded = tuple(_with_cls(recipe, i, e) for i, e in enumerate(loaded))
    encoders = loaded if use_repa else ()  # the ones the training step uses
    if encoders and recipe.loss.haste is not None:
        _check_teacher(recipe, encoders[0])
    data = _load_data(recipe, loaded, config, in_step=use_repa, progress=progress, console=console)
    if lead and data.latents is not None:
        _record_latents(run_dir, data.latents, resume)
    config = sit_config(
        recipe, num_classes=data.num_classes, cls_dim=encoders[0].dim if reg is not None else 0
    )

    monitor = None
    if recipe.eval.every:
        console.print("evaluation: preparing the reference features")
        monitor = Monitor(
            recipe,
            data.dataset,
            target_features=(
                data.features[0][:, 1 if reg is not None else 0 :] if data.features else None
            ),
            encoder=plain[0] if plain else None,
            progress=progress,
            out_dir=run_dir / "eval" if lead else None,
        )

    optimizer = make_optimizer(recipe)
    state = init_state(
        config,
        [e.dim for e in encoders],
        recipe.model.projector_dim,
        optimizer,
        recipe.train.seed,
        alignment=alignment_method(recipe),
    )
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(eqx.filter(state, eqx.is_array)))
    _preflight(recipe, run_dir, state_bytes, latent=data.dataset is None)
    state_sh = state_shardings(state, mesh, recipe.mesh.fsdp_min_size)
    batch_sh, repl = batch_sharding(mesh), replicated(mesh)
    checkpointer = Checkpointer(
        run_dir / "checkpoints",
        keep=recipe.train.keep_checkpoints,
        keep_every=recipe.train.keep_every,
    )
    start, start_meta = 0, {}
    if resume:
        start, state, start_meta = _restore(checkpointer, state, state_sh, run_dir, console)
        if lead:
            _record_resume(run_dir, start, changed)
    total = recipe.train.steps
    if start >= total:
        console.print(
            f"{run_dir} is at step {start}, train.steps is {total}: nothing to train "
            "(raise train.steps to continue)"
        )
        checkpointer.close()
        return TrainResult(run_dir, start, {})
    console.print(describe(mesh, recipe.data.batch_size))
    # Printed with the devices, once the inputs are read (a bad input stays a one-line error).
    console.print(f"precision: {recipe.train.precision} ({why})")

    metrics_log = MetricsLog(
        run_dir,
        tensorboard=recipe.output.tensorboard and lead,
        wandb=recipe.output.wandb if lead else None,
        config=recipe_to_dict(recipe),
    )
    if lead:
        metrics_log.truncate_after(start)  # lines logged after the checkpoint we start from
        if monitor is not None:
            metrics_log.card("eval_card", monitor.card)
    state_arrays, static_state = eqx.partition(state, eqx.is_array)
    state_arrays = place(state_arrays, state_sh)
    enc_arrays, static_enc = eqx.partition(encoders, eqx.is_array)
    enc_arrays = place(enc_arrays, repl)
    step_cfg = StepConfig(
        recipe.loss.path,
        recipe.loss.weighting,
        recipe.loss.proj_coeff if encoders else 0.0,
        recipe.optim.ema_decay,
        recipe.train.precision,
        latent_scale=data.latent_scale,
        latent_norm=data.latent_norm,
        objective=recipe.loss.objective,
        remat=recipe.train.remat,
        alignment=alignment_method(recipe),
        schedule=schedule_points(recipe),
        schedule_stop=recipe.loss.schedule.stop,
        dispersive=dispersive_term(recipe, config),
        distillation=attention_distillation(recipe) if encoders else None,
        reg=reg,
        cosine_coeff=recipe.loss.cosine_coeff,
        nonfinite=recipe.train.nonfinite,
    )
    step_fn = make_train_step(
        optimizer, step_cfg, static_state, static_enc, shardings=(state_sh, batch_sh, repl)
    )
    batches = _batches(recipe, data.source, start, start_meta.get("data"), batch_sh)
    policy = recipe.train.nonfinite
    # "skip": the skipped steps so far (kept with each checkpoint); summed on device.
    skips = [int(start_meta.get("skipped_steps", 0))]

    saved = [start]

    def save(step: int, arrays) -> None:
        if step != saved[-1]:
            meta = {"step": step, "data": batches.state()}
            if data.latents is not None:  # the latent space and statistics it was trained on
                meta["latents"] = data.latents
            if policy == "skip":
                meta["skipped_steps"] = int(skips[0])
            checkpointer.save(step, eqx.combine(arrays, static_state), meta)
            saved.append(step)

    def last_good() -> str:
        checkpointer.wait()
        step = checkpointer.latest_step()
        return f"step {step} in {checkpointer.directory}" if step is not None else "none"

    draw = _grid_drawer(recipe, config, _space(recipe, data), run_dir, lead)

    def ema_of(arrays):
        return eqx.combine(arrays, static_state).ema

    def log(step: int, metrics, speed: Callable[[int], dict] | None = None) -> dict[str, float]:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}  # waits for the step
        if policy == "skip":  # a skipped step's losses are not logged; the state is unchanged
            values = {k: v for k, v in values.items() if np.isfinite(v) and k != "skipped"}
            values["skipped_steps"] = float(skips[0])
        elif not all(np.isfinite(v) for v in values.values()):
            raise TrainingDiverged(
                f"non-finite loss at step {step} ({values}); last good checkpoint: {last_good()}"
            )
        if speed is not None:
            values |= speed(step)
        if lead:
            metrics_log.write(step, values)
        return values

    def roll_back(failed: int, count: int, why: TrainingDiverged, arrays):
        """Policy "rollback": (step, state arrays) of the last good checkpoint, its data
        position restored and its key folded with `count` (the NaN is not replayed as it was)."""
        checkpointer.wait()
        like = eqx.combine(arrays, static_state)
        report = lambda m: console.print(f"[yellow]{m}")  # noqa: E731
        restored = checkpointer.restore_latest(like, state_sh, report=report)
        if restored is None:
            raise TrainingDiverged(f"{why} (train.nonfinite: no checkpoint to roll back to)")
        step, state, meta = restored
        key = jax.jit(lambda k: jax.random.fold_in(k, count), out_shardings=repl)(state.key)
        state = eqx.tree_at(lambda s: s.key, state, key)
        batches.restore(meta["data"])
        saved.append(step)
        if lead:
            metrics_log.truncate_after(step)
            _record_rollback(
                run_dir, {"step": failed, "restored": step, "rollback": count, "reason": str(why)}
            )
        console.print(
            f"[yellow]non-finite at step {failed}: rolled back to checkpoint {step} ({count} of "
            f"{recipe.train.max_rollbacks} rollbacks), with a fresh key"
        )
        return step, eqx.filter(state, eqx.is_array)

    end = total if stop_after is None else min(total, start + stop_after)
    last: dict[str, float] = {}
    bar = progress_bar("train", console=console, disable=not (progress and lead), bar_width=12)
    speed = _Speed(start, recipe.data.batch_size)
    completed, unlogged = start, None
    try:
        with bar:
            task = bar.add_task("train", total=total, completed=start, rate="", info="")
            step, rollbacks = start, 0
            while step < end:
                try:
                    batch = next(batches)
                    state_arrays, metrics = step_fn(state_arrays, batch, enc_arrays)
                    completed = done = step + 1
                    if policy == "skip":
                        skips[0] = skips[0] + metrics["skipped"]  # on device: no wait
                    unlogged = (done, metrics)
                    if done % recipe.train.log_every == 0 or done == end:
                        values = log(done, metrics, speed)
                        unlogged = None
                        last = values
                        rate = values["steps_per_s"]
                        bar.update(task, rate=f"{rate:.2f} it/s", info=_log_line(values))
                    bar.update(task, completed=done)
                    if done % recipe.train.checkpoint_every == 0 or done == total:
                        try:
                            save(done, state_arrays)
                        except NonFiniteState as e:
                            raise TrainingDiverged(
                                f"{e}; last good checkpoint: {last_good()}"
                            ) from None
                    if done % recipe.train.sample_every == 0 or done == total:
                        draw(done, ema_of(state_arrays))
                        if lead:
                            plot_metrics(metrics_log.path, run_dir / "loss.png")
                            metrics_log.image("samples", run_dir / "samples.png", done)
                    if monitor and (done % recipe.eval.every == 0 or done == total):
                        scores = monitor(ema_of(state_arrays).sit, done)
                        if lead:
                            metrics_log.write(done, scores)
                            plot_eval(metrics_log.path, run_dir / "eval.png")
                        bar.console.print(
                            f"eval @ {done}: "
                            + ", ".join(f"{k} {v:.4g}" for k, v in scores.items())
                        )
                except TrainingDiverged as diverged:
                    if policy != "rollback":
                        raise
                    if rollbacks == recipe.train.max_rollbacks:
                        raise TrainingDiverged(
                            f"{diverged} (after {rollbacks} rollbacks: train.max_rollbacks)"
                        ) from None
                    rollbacks += 1
                    step, state_arrays = roll_back(done, rollbacks, diverged, state_arrays)
                    completed, unlogged = step, None
                    speed = _Speed(step, recipe.data.batch_size)
                    bar.update(task, completed=step)
                    continue
                step = done
            save(end, state_arrays)
    except BaseException as error:
        message = _keep_the_work(
            error, state_arrays, completed, saved, unlogged, log, save, batches, last_good
        )
        console.print(f"[yellow]{message}")
        checkpointer.wait()
        metrics_log.close()
        if isinstance(error, KeyboardInterrupt):
            raise TrainingInterrupted(f"interrupted: {message}") from None
        raise
    checkpointer.wait()
    checkpointer.close()
    metrics_log.close()
    if lead and metrics_log.path.exists():
        plot_metrics(metrics_log.path, run_dir / "loss.png")
    return TrainResult(run_dir, end, last)


def _keep_the_work(error, arrays, completed, saved, unlogged, log, save, batches, last_good) -> str:
    """After any exception in the loop: the last step's metrics line and an emergency
    checkpoint of its state, if that state is finite and still there; what was kept, said
    truthfully."""
    if isinstance(error, TrainingDiverged):
        return "the state is not finite: no emergency checkpoint was written"
    if unlogged is not None and unlogged[0] == completed:
        try:
            log(*unlogged)
        except Exception:  # a non-finite or lost metrics line: the checkpoint matters more
            pass
    if completed == saved[-1]:
        return f"nothing new since the last checkpoint ({last_good()})"
    # The batch of the interrupted step was handed out already: the data position goes back
    # to the state's step before both are saved.
    batches.restore({"next_index": completed})
    try:
        save(completed, arrays)
    except Exception as e:  # donated buffers of a step cut short, a full disk, NaN, ...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return (
            f"no emergency checkpoint could be written ({reason}); last checkpoint: {last_good()}"
        )
    return f"saved an emergency checkpoint: {last_good()}; continue with --resume"
