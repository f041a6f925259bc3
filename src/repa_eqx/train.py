"""The REPA training step and loop.

The step is one jitted function: forward, gradients, AdamW with grad-norm clipping, and the EMA
update of every trained parameter (the projectors included). The loop around it only moves data,
logs, checkpoints and draws sample grids.
"""

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from . import interpolants
from .checkpoint import Checkpointer
from .data import ImageDataset, batch_indices, from_model_space, load_mnist_5k, to_model_space
from .encoders import TargetEncoder, load_encoders, precompute_features
from .generate import SamplerSpec, example_inputs, sample_jit
from .images import save_grid
from .losses import denoising_loss, repa_loss, total_loss
from .metrics_log import MetricsLog, plot_eval, plot_metrics
from .model import REPAModel
from .recipe import Recipe, RecipeError, dump_recipe, load_recipe, recipe_to_dict
from .sit import SiTConfig


class TrainingDiverged(RuntimeError):
    pass


class TrainState(eqx.Module):
    model: REPAModel
    ema: REPAModel
    opt_state: optax.OptState
    step: Int[Array, ""]
    key: PRNGKeyArray


def sit_config(recipe: Recipe, num_classes: int | None = None) -> SiTConfig:
    m = recipe.model
    overrides = {
        k: v
        for k, v in dict(
            depth=m.depth,
            hidden_size=m.hidden_size,
            num_heads=m.num_heads,
            encoder_depth=m.encoder_depth,
        ).items()
        if v is not None
    }
    try:
        return SiTConfig.from_name(
            m.arch,
            input_size=m.input_size,
            in_channels=m.in_channels,
            num_classes=num_classes or m.num_classes,
            class_dropout_prob=m.class_dropout_prob,
            **overrides,
        )
    except ValueError as e:
        raise RecipeError(f"recipe section 'model': {e}") from None


def make_optimizer(recipe: Recipe) -> optax.GradientTransformation:
    o = recipe.optim
    return optax.chain(
        optax.clip_by_global_norm(o.max_grad_norm),
        optax.adamw(o.lr, b1=o.beta1, b2=o.beta2, eps=o.eps, weight_decay=o.weight_decay),
    )


def init_state(
    config: SiTConfig,
    z_dims: Sequence[int],
    projector_dim: int,
    optimizer: optax.GradientTransformation,
    seed: int,
) -> TrainState:
    k_model, k_train = jax.random.split(jax.random.key(seed))
    model = REPAModel(config, tuple(z_dims), projector_dim, key=k_model)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    # The EMA starts as a copy of the initial weights, as in the reference (its own buffers:
    # the step donates both).
    ema = jax.tree.map(lambda a: jnp.copy(a) if eqx.is_array(a) else a, model)
    return TrainState(model, ema, opt_state, jnp.zeros((), jnp.int32), k_train)


def _cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, tree)


def repa_objective(
    model: REPAModel,
    x: Float[Array, "batch c h w"],
    y: Int[Array, " batch"],
    targets: Sequence[Float[Array, "batch tokens dim"]],
    key: PRNGKeyArray,
    *,
    path: interpolants.PathType,
    weighting: interpolants.Weighting,
    proj_coeff: float,
    compute_dtype=jnp.float32,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """Total REPA loss for one batch (and its parts). bf16 compute keeps fp32 master weights:
    the cast is part of the differentiated function."""
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    batch = x.shape[0]
    t = interpolants.sample_t(k_t, (batch,), path, weighting)
    noise = jax.random.normal(k_noise, x.shape)
    x_t, v_target = interpolants.interpolate(path, x, noise, t)
    run = _cast(model, compute_dtype)
    v_pred, projected = jax.vmap(lambda xi, ti, yi, ki: run(xi, ti, yi, key=ki))(
        x_t.astype(compute_dtype), t.astype(compute_dtype), y, jax.random.split(k_drop, batch)
    )
    denoise = denoising_loss(v_pred, v_target)
    align = repa_loss(projected, targets) if targets else None
    loss = total_loss(denoise, align, proj_coeff)
    aux = {"denoise_loss": denoise}
    if align is not None:
        aux["repa_loss"] = align
    return loss, aux


@dataclasses.dataclass(frozen=True)
class StepConfig:
    path: str
    weighting: str
    proj_coeff: float
    ema_decay: float
    precision: str


def make_train_step(
    optimizer: optax.GradientTransformation, step_cfg: StepConfig, static_state, static_enc
) -> Callable:
    """A jitted `(state_arrays, batch, encoder_arrays) -> (state_arrays, metrics)`.

    The state's buffers are donated. `batch` holds `x` and `y`, plus either `features` (a tuple,
    one array per encoder, precomputed) or `image` (uint8, for the frozen encoders in-step).
    """
    compute_dtype = jnp.bfloat16 if step_cfg.precision == "bf16" else jnp.float32

    def step(state_arrays, batch, encoder_arrays):
        state: TrainState = eqx.combine(state_arrays, static_state)
        if "features" in batch:
            targets = batch["features"]
        else:
            encoders = eqx.combine(encoder_arrays, static_enc)
            targets = tuple(jax.lax.stop_gradient(e(batch["image"])) for e in encoders)
        key, step_key = jax.random.split(state.key)
        params, static_model = eqx.partition(state.model, eqx.is_inexact_array)

        def loss_fn(p):
            return repa_objective(
                eqx.combine(p, static_model),
                batch["x"],
                batch["y"],
                targets,
                step_key,
                path=step_cfg.path,
                weighting=step_cfg.weighting,
                proj_coeff=step_cfg.proj_coeff,
                compute_dtype=compute_dtype,
            )

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        params = optax.apply_updates(params, updates)
        ema_params = optax.incremental_update(
            params, eqx.filter(state.ema, eqx.is_inexact_array), 1.0 - step_cfg.ema_decay
        )
        new_state = TrainState(
            eqx.combine(params, static_model),
            eqx.combine(ema_params, static_model),
            opt_state,
            state.step + 1,
            key,
        )
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        return eqx.filter(new_state, eqx.is_array), metrics

    return jax.jit(step, donate_argnums=0)


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    step: int
    last: dict[str, float]


def _load_dataset(recipe: Recipe) -> ImageDataset:
    if recipe.data.dataset == "mnist-5k":
        return load_mnist_5k(recipe.model.input_size)
    raise RecipeError(
        f"recipe key 'data.dataset': {recipe.data.dataset!r} needs preprocessed ImageNet latents "
        "and the SD-VAE, which this version cannot read yet (only 'mnist-5k' trains today)"
    )


def _flat_keys(table: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        out.update(_flat_keys(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def _check_saved_recipe(run_dir: Path, recipe: Recipe) -> None:
    """Resuming with a different model, objective or data would silently mix two runs."""
    saved_path = run_dir / "recipe.toml"
    if not saved_path.exists():
        return
    saved = _flat_keys(recipe_to_dict(load_recipe(saved_path)))
    now = _flat_keys(recipe_to_dict(recipe))
    mutable = (
        "train.steps",
        "train.log_every",
        "train.checkpoint_every",
        "train.sample_every",
        "train.keep_checkpoints",
        "train.num_samples",
        "train.sample_steps",
        "train.sample_cfg",
        "eval.",
        "output.",
    )
    changed = sorted(
        k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and not k.startswith(mutable)
    )
    if changed:
        raise RecipeError(
            f"--resume: the recipe differs from {saved_path} at " + ", ".join(changed)
        )


def train(
    recipe: Recipe,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    console=None,
) -> TrainResult:
    """Train per `recipe`; outputs go to `recipe.output.dir`. `stop_after` ends the loop early
    (after that many steps of this call) as if interrupted, for tests."""
    from rich.console import Console

    console = console or Console(stderr=True)
    run_dir = Path(recipe.output.dir)
    ckpt_dir = run_dir / "checkpoints"
    if not resume and ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        raise RecipeError(
            f"{run_dir} already holds checkpoints: pass --resume to continue it, or choose "
            "another output.dir"
        )
    if resume:
        _check_saved_recipe(run_dir, recipe)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.toml").write_text(dump_recipe(recipe))

    dataset = _load_dataset(recipe)
    config = sit_config(recipe, num_classes=dataset.num_classes)
    use_repa = bool(recipe.encoders) and recipe.loss.proj_coeff != 0
    encoders: tuple[TargetEncoder, ...] = (
        load_encoders(recipe.encoders, grid=config.grid_size) if use_repa else ()
    )
    features = None
    if encoders and recipe.data.precompute_features:
        features = precompute_features(encoders, dataset, progress=progress, console=console)

    monitor = None
    if recipe.eval.every:
        from .monitor import Monitor

        console.print("evaluation: preparing the reference features")
        monitor = Monitor(
            recipe,
            dataset,
            target_features=features[0] if features else None,
            encoder=encoders[0] if encoders else None,
            progress=progress,
        )

    optimizer = make_optimizer(recipe)
    state = init_state(
        config,
        [e.dim for e in encoders],
        recipe.model.projector_dim,
        optimizer,
        recipe.train.seed,
    )
    checkpointer = Checkpointer(ckpt_dir, keep=recipe.train.keep_checkpoints)
    metrics_log = MetricsLog(run_dir, tensorboard=recipe.output.tensorboard)
    start = 0
    if resume and checkpointer.latest_step() is not None:
        start = checkpointer.latest_step()
        state, _ = checkpointer.restore(start, state)
        console.print(f"resumed {run_dir} from step {start}")

    metrics_log.truncate_after(start)  # lines logged after the checkpoint we start from
    state_arrays, static_state = eqx.partition(state, eqx.is_array)
    enc_arrays, static_enc = eqx.partition(encoders, eqx.is_array)
    step_cfg = StepConfig(
        recipe.loss.path,
        recipe.loss.weighting,
        recipe.loss.proj_coeff if encoders else 0.0,
        recipe.optim.ema_decay,
        recipe.train.precision,
    )
    step_fn = make_train_step(optimizer, step_cfg, static_state, static_enc)

    def get_batch(step: int) -> dict:
        idx = batch_indices(step, recipe.data.batch_size, len(dataset), recipe.train.seed)
        batch = {"x": to_model_space(dataset.images[idx]), "y": dataset.labels[idx]}
        if features is not None:
            batch["features"] = tuple(f[idx] for f in features)
        elif encoders:
            batch["image"] = dataset.images[idx]
        return batch

    saved = [start]

    def save(step: int, arrays) -> None:
        if step != saved[-1]:
            checkpointer.save(step, eqx.combine(arrays, static_state), {"step": step})
            saved.append(step)

    grid_sampler = SamplerSpec(
        "ode",
        recipe.train.sample_steps,
        cfg_scale=recipe.train.sample_cfg,
        path=recipe.loss.path,
    )
    noise_shape = (config.in_channels, config.input_size, config.input_size)

    def draw(step: int, arrays) -> None:
        ema = eqx.combine(arrays, static_state).ema
        n = recipe.train.num_samples
        labels = jnp.arange(n) % config.num_classes
        # The same noise every time, so the grids of successive steps are comparable.
        noise, keys = example_inputs(recipe.train.seed + 1, jnp.arange(n), noise_shape)
        images = from_model_space(sample_jit(ema.sit, grid_sampler, noise, labels, keys))
        nrow = config.num_classes if config.num_classes <= 16 else 8
        save_grid(images, run_dir / "samples" / f"step_{step:07d}.png", nrow=nrow, scale=2)
        save_grid(images, run_dir / "samples.png", nrow=nrow, scale=2)

    total = recipe.train.steps
    end = total if stop_after is None else min(total, start + stop_after)
    last: dict[str, float] = {}
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = [
        TextColumn("[bold]train"),
        BarColumn(bar_width=12),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    ]
    bar = Progress(*columns, console=console, disable=not progress, refresh_per_second=4)
    t_last, step_last = time.perf_counter(), start
    completed = start
    try:
        with bar:
            task = bar.add_task("train", total=total, completed=start, rate="", info="")
            next_batch = get_batch(start) if start < end else None
            for step in range(start, end):
                state_arrays, metrics = step_fn(state_arrays, next_batch, enc_arrays)
                completed = done = step + 1
                if done < end:
                    next_batch = get_batch(done)  # host work overlaps the async device step
                if done % recipe.train.log_every == 0 or done == end:
                    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    if not all(np.isfinite(v) for v in values.values()):
                        last_ckpt = checkpointer.latest_step()
                        raise TrainingDiverged(
                            f"non-finite loss at step {done} ({values}); last good checkpoint: "
                            f"{'step ' + str(last_ckpt) if last_ckpt is not None else 'none'}"
                        )
                    now = time.perf_counter()
                    rate = (done - step_last) / max(now - t_last, 1e-9)
                    t_last, step_last = now, done
                    values["steps_per_s"] = rate
                    values["images_per_s"] = rate * recipe.data.batch_size
                    metrics_log.write(done, values)
                    last = values
                    info = f"loss {values['loss']:.4f}"
                    if "repa_loss" in values:
                        info += f"  repa {values['repa_loss']:+.4f}"
                    bar.update(task, rate=f"{rate:.2f} it/s", info=info)
                bar.update(task, completed=done)
                if done % recipe.train.checkpoint_every == 0 or done == total:
                    save(done, state_arrays)
                if done % recipe.train.sample_every == 0 or done == total:
                    draw(done, state_arrays)
                    plot_metrics(metrics_log.path, run_dir / "loss.png")
                if monitor and (done % recipe.eval.every == 0 or done == total):
                    ema = eqx.combine(state_arrays, static_state).ema
                    scores = monitor(ema.sit, done)
                    metrics_log.write(done, scores)
                    plot_eval(metrics_log.path, run_dir / "eval.png")
                    bar.console.print(
                        f"eval @ {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items())
                    )
    except KeyboardInterrupt:
        # Keep the work done so far; --resume continues from here.
        if completed > start:
            try:
                save(completed, state_arrays)
            except Exception:  # buffers donated mid-step: the last periodic checkpoint remains
                pass
        checkpointer.wait()
        raise
    save(end, state_arrays)
    checkpointer.wait()
    checkpointer.close()
    metrics_log.close()
    if metrics_log.path.exists():
        plot_metrics(metrics_log.path, run_dir / "loss.png")
    return TrainResult(run_dir, end, last)
