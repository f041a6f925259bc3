"""The REPA training step and loop.

The step is one jitted function: forward, gradients, AdamW with grad-norm clipping, and the EMA
update of every trained parameter (the projectors included). The loop around it only moves data,
logs, checkpoints and draws sample grids.
"""

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from . import diffusion, interpolants
from ._progress import progress_bar
from .checkpoint import Checkpointer
from .data import ImageDataset, from_model_space, load_mnist_5k
from .encoders import TargetEncoder, load_encoders, precompute_features
from .generate import SamplerSpec, example_inputs, sample_jit
from .images import save_grid
from .losses import denoising_loss, repa_loss, total_loss
from .metrics_log import MetricsLog, plot_eval, plot_metrics
from .model import REPAModel
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
from .pipeline import Batches, LatentSource, PixelSource, Source, batch_dataset
from .recipe import Recipe, RecipeError, dump_recipe, load_recipe, recipe_to_dict
from .sit import SiTConfig
from .vae import latents_to_uint8, to_latents


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


def _predict(model: REPAModel, x_t, t, y, key: PRNGKeyArray, compute_dtype, remat: str):
    """The model on a noisy batch, each example with its own label-dropout key. bf16 compute
    keeps fp32 master weights: the cast is part of the differentiated function."""
    run = _cast(model, compute_dtype)
    keys = jax.random.split(key, x_t.shape[0])
    return jax.vmap(lambda xi, ti, yi, ki: run(xi, ti, yi, key=ki, remat=remat))(
        x_t.astype(compute_dtype), t, y, keys
    )


def _with_alignment(denoise, projected, targets, proj_coeff: float, aux: dict):
    """denoising + lambda * REPA, and the parts."""
    align = repa_loss(projected, targets) if targets else None
    if align is not None:
        aux["repa_loss"] = align
    return total_loss(denoise, align, proj_coeff), {"denoise_loss": denoise, **aux}


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
    remat: str = "none",
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """Total REPA loss for one batch (and its parts), SiT's interpolant objective."""
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    t = interpolants.sample_t(k_t, (x.shape[0],), path, weighting)
    noise = jax.random.normal(k_noise, x.shape)
    x_t, v_target = interpolants.interpolate(path, x, noise, t)
    v_pred, projected = _predict(
        model, x_t, t.astype(compute_dtype), y, k_drop, compute_dtype, remat
    )
    return _with_alignment(denoising_loss(v_pred, v_target), projected, targets, proj_coeff, {})


def ddpm_objective(
    model: REPAModel,
    x: Float[Array, "batch c h w"],
    y: Int[Array, " batch"],
    targets: Sequence[Float[Array, "batch tokens dim"]],
    key: PRNGKeyArray,
    *,
    proj_coeff: float,
    compute_dtype=jnp.float32,
    remat: str = "none",
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """Total REPA loss for one batch (and its parts), DiT's objective: a step k uniform in
    0..999, the noise MSE plus the variational bound on the learned variance
    (`diffusion.training_losses`), batch means. The step reaches the network as a float32
    integer (bf16 cannot hold 0..999 exactly)."""
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    schedule = diffusion.Schedule.linear()
    k = jax.random.randint(k_t, (x.shape[0],), 0, len(schedule))
    noise = jax.random.normal(k_noise, x.shape)
    x_k = diffusion.q_sample(schedule, x, k, noise)
    out, projected = _predict(model, x_k, k.astype(jnp.float32), y, k_drop, compute_dtype, remat)
    mse, vb = diffusion.training_losses(schedule, out, x, x_k, k, noise)
    aux = {"mse_loss": mse.mean(), "vb_loss": vb.mean()}
    return _with_alignment((mse + vb).mean(), projected, targets, proj_coeff, aux)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    path: str
    weighting: str
    proj_coeff: float
    ema_decay: float
    precision: str
    # imagenet-latents: z = (mean + std * eps) * latent_scale, sampled in the step.
    latent_scale: float = 0.18215
    objective: str = "interpolant"  # or "ddpm" (recipe key loss.objective)
    remat: str = "dots"  # what the SiT blocks keep for the backward pass (sit.REMAT_POLICIES)

    def objective_fn(self) -> Callable:
        """`(model, x, y, targets, key, *, proj_coeff, compute_dtype, remat) -> (loss, parts)`."""
        if self.objective == "ddpm":
            return ddpm_objective
        return functools.partial(repa_objective, path=self.path, weighting=self.weighting)


def make_train_step(
    optimizer: optax.GradientTransformation,
    step_cfg: StepConfig,
    static_state,
    static_enc,
    shardings: tuple | None = None,
) -> Callable:
    """A jitted `(state_arrays, batch, encoder_arrays) -> (state_arrays, metrics)`.

    The state's buffers are donated. `batch` holds `y` and either `x` (the model's input) or
    `moments` (SD-VAE posterior mean and std, sampled here on device), plus either `features`
    (a tuple, one array per encoder, precomputed) or `image` (uint8, for the frozen encoders
    in-step). `shardings` = (state, batch, replicated) places everything on a mesh.
    """
    compute_dtype = jnp.bfloat16 if step_cfg.precision == "bf16" else jnp.float32
    objective = step_cfg.objective_fn()

    def step(state_arrays, batch, encoder_arrays):
        state: TrainState = eqx.combine(state_arrays, static_state)
        if "features" in batch:
            targets = batch["features"]
        else:
            encoders = eqx.combine(encoder_arrays, static_enc)
            targets = tuple(jax.lax.stop_gradient(e(batch["image"])) for e in encoders)
        key, step_key = jax.random.split(state.key)
        if "moments" in batch:
            mean, std = jnp.split(batch["moments"], 2, axis=1)
            x = to_latents(
                mean, std, key=jax.random.fold_in(step_key, 1), scale=step_cfg.latent_scale
            )
        else:
            x = batch["x"]
        params, static_model = eqx.partition(state.model, eqx.is_inexact_array)

        def loss_fn(p):
            return objective(
                eqx.combine(p, static_model),
                x,
                batch["y"],
                targets,
                step_key,
                proj_coeff=step_cfg.proj_coeff,
                compute_dtype=compute_dtype,
                remat=step_cfg.remat,
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

    if shardings is None:
        return jax.jit(step, donate_argnums=0)
    state_sh, batch_sh, replicated = shardings
    return jax.jit(
        step,
        in_shardings=(state_sh, batch_sh, replicated),
        out_shardings=(state_sh, replicated),
        donate_argnums=0,
    )


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
    features: tuple[np.ndarray, ...] | None  # cached target features
    latent_scale: float


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
    if d.dataset == "mnist-5k":
        dataset = load_mnist_5k(recipe.model.input_size)
        features = None
        if encoders and d.precompute_features:
            features = precompute_features(encoders, dataset, progress=progress, console=console)
        source = PixelSource(
            dataset,
            keep_image=bool(encoders) and in_step,
            features=features if in_step else None,
        )
        return TrainData(source, dataset.num_classes, dataset, features, 1.0)
    if d.precompute_features:
        raise RecipeError("recipe key 'data.precompute_features' is for mnist-5k only")
    if recipe.eval.every:
        raise RecipeError("recipe key 'eval.every': in-training evaluation needs mnist-5k")
    source = LatentSource(d.path, keep_image=bool(encoders) and in_step)
    expected = (config.in_channels, config.input_size, config.input_size)
    if source.latent_shape != expected:
        raise RecipeError(
            f"recipe section 'model': in_channels/input_size {expected} do not match the "
            f"latents {source.latent_shape} in {d.path}"
        )
    scale = float(source.manifest.get("latent_scale", 0.18215))
    return TrainData(source, source.num_classes, None, None, scale)


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
        "train.remat",
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
    """Train per `recipe` on every device (the recipe's mesh); outputs go to
    `recipe.output.dir`. `stop_after` ends the loop early (after that many steps of this call)
    as if interrupted, for tests."""
    from rich.console import Console

    console = console or Console(stderr=True)
    lead = jax.process_index() == 0  # writes logs, plots and grids; every process checkpoints
    run_dir = Path(recipe.output.dir)
    ckpt_dir = run_dir / "checkpoints"
    if not resume and ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        raise RecipeError(
            f"{run_dir} already holds checkpoints: pass --resume to continue it, or choose "
            "another output.dir"
        )
    if resume:
        _check_saved_recipe(run_dir, recipe)
    mesh = make_mesh(recipe.mesh.data, recipe.mesh.fsdp)
    check_batch(recipe.data.batch_size, mesh)
    if lead:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.toml").write_text(dump_recipe(recipe))

    config = sit_config(recipe)
    use_repa = bool(recipe.encoders) and recipe.loss.proj_coeff != 0
    # With lambda = 0 the encoders are loaded only when the evaluation scores CKNNA against
    # them: a vanilla baseline measured exactly like its REPA twin.
    eval_only = (
        not use_repa
        and bool(recipe.encoders)
        and bool(recipe.eval.every)
        and "cknna" in recipe.eval.metrics
    )
    loaded: tuple[TargetEncoder, ...] = (
        load_encoders(recipe.encoders, grid=config.grid_size) if use_repa or eval_only else ()
    )
    encoders = loaded if use_repa else ()  # the ones the training step uses
    data = _load_data(recipe, loaded, config, in_step=use_repa, progress=progress, console=console)
    config = sit_config(recipe, num_classes=data.num_classes)

    monitor = None
    if recipe.eval.every:
        from .monitor import Monitor

        console.print("evaluation: preparing the reference features")
        monitor = Monitor(
            recipe,
            data.dataset,
            target_features=data.features[0] if data.features else None,
            encoder=loaded[0] if loaded else None,
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
    state_sh = state_shardings(state, mesh, recipe.mesh.fsdp_min_size)
    batch_sh, repl = batch_sharding(mesh), replicated(mesh)
    checkpointer = Checkpointer(
        ckpt_dir, keep=recipe.train.keep_checkpoints, keep_every=recipe.train.keep_every
    )
    start, data_state = 0, None
    restored = None
    if resume:
        restored = checkpointer.restore_latest(
            state, state_sh, report=lambda m: console.print(f"[yellow]{m}")
        )
    if restored is not None:
        start, state, meta = restored
        data_state = meta.get("data")
        console.print(f"resumed {run_dir} from step {start}")
    console.print(describe(mesh, recipe.data.batch_size))

    metrics_log = MetricsLog(run_dir, tensorboard=recipe.output.tensorboard and lead)
    if lead:
        metrics_log.truncate_after(start)  # lines logged after the checkpoint we start from
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
        objective=recipe.loss.objective,
        remat=recipe.train.remat,
    )
    step_fn = make_train_step(
        optimizer, step_cfg, static_state, static_enc, shardings=(state_sh, batch_sh, repl)
    )
    batches = Batches(
        batch_dataset(
            data.source,
            batch_size=recipe.data.batch_size,
            seed=recipe.train.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        ),
        start,
        threads=recipe.data.num_threads,
        prefetch=recipe.data.prefetch,
        place=lambda host: global_batch(host, batch_sh),
    )
    if data_state is not None:
        if int(data_state.get("next_index", -1)) != start:
            raise RecipeError(
                f"checkpoint {start}: its data iterator state {data_state} does not match its step"
            )
        batches.restore(data_state)

    saved = [start]

    def save(step: int, arrays) -> None:
        if step != saved[-1]:
            meta = {"step": step, "data": batches.state()}
            checkpointer.save(step, eqx.combine(arrays, static_state), meta)
            saved.append(step)

    grid_sampler = SamplerSpec(
        "ddpm" if recipe.loss.objective == "ddpm" else "ode",
        recipe.train.sample_steps,
        cfg_scale=recipe.train.sample_cfg,
        path=recipe.loss.path,
    )
    noise_shape = (config.in_channels, config.input_size, config.input_size)
    decoder = []  # the VAE, loaded at the first grid of a latent-space run

    def to_images(x) -> np.ndarray:
        if data.dataset is not None:
            return from_model_space(x)
        if not decoder:
            from .vae import load_vae

            decoder.append(load_vae(recipe.data.vae))
        return np.asarray(latents_to_uint8(decoder[0], x)).transpose(0, 3, 1, 2)

    def draw(step: int, arrays) -> None:
        ema = eqx.combine(arrays, static_state).ema
        n = recipe.train.num_samples
        labels = jnp.arange(n) % config.num_classes
        # The same noise every time, so the grids of successive steps are comparable.
        noise, keys = example_inputs(recipe.train.seed + 1, jnp.arange(n), noise_shape)
        images = to_images(sample_jit(ema.sit, grid_sampler, noise, labels, keys))
        if not lead:  # every process samples (the weights may be split over hosts)
            return
        nrow = config.num_classes if config.num_classes <= 16 else 8
        scale = max(1, 64 // images.shape[-1])
        save_grid(images, run_dir / "samples" / f"step_{step:07d}.png", nrow=nrow, scale=scale)
        save_grid(images, run_dir / "samples.png", nrow=nrow, scale=scale)

    total = recipe.train.steps
    end = total if stop_after is None else min(total, start + stop_after)
    last: dict[str, float] = {}
    bar = progress_bar("train", console=console, disable=not (progress and lead), bar_width=12)
    t_last, step_last = time.perf_counter(), start
    completed = start
    try:
        with bar:
            task = bar.add_task("train", total=total, completed=start, rate="", info="")
            for step in range(start, end):
                batch = next(batches)
                state_arrays, metrics = step_fn(state_arrays, batch, enc_arrays)
                completed = done = step + 1
                if done % recipe.train.log_every == 0 or done == end:
                    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    if not all(np.isfinite(v) for v in values.values()):
                        checkpointer.wait()
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
                    if lead:
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
                    if lead:
                        plot_metrics(metrics_log.path, run_dir / "loss.png")
                if monitor and (done % recipe.eval.every == 0 or done == total):
                    ema = eqx.combine(state_arrays, static_state).ema
                    scores = monitor(ema.sit, done)
                    if lead:
                        metrics_log.write(done, scores)
                        plot_eval(metrics_log.path, run_dir / "eval.png")
                    bar.console.print(
                        f"eval @ {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items())
                    )
    except KeyboardInterrupt:
        # Keep the work done so far; --resume continues from here.
        if completed > start:
            # The batch of the interrupted step was handed out already: rewind the data
            # position to the state's step before saving both.
            batches.restore({"next_index": completed})
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
    if lead and metrics_log.path.exists():
        plot_metrics(metrics_log.path, run_dir / "loss.png")
    return TrainResult(run_dir, end, last)
