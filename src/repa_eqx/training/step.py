"""The jitted training step: forward, gradients, AdamW with grad-norm clipping, and the EMA
update of every trained parameter (the alignment heads included).

With the non-finite policy "skip" (recipe key train.nonfinite) a step whose loss or gradient
norm is NaN or Inf changes neither the weights, the optimiser state (its update count
included) nor the EMA; the step counter and the key advance (the step counts batches drawn:
the data position, the alignment schedule and the checkpoint names follow it), and the metric
`skipped` is 1. Under the other policies the step holds no such guard."""

import dataclasses
import functools
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Int, PRNGKeyArray

from ..alignment import (
    REG,
    REPA,
    AlignmentMethod,
    AttentionDistillation,
    Dispersive,
    alignment_weight,
)
from ..model.repa import REPAModel
from ..model.sit import SiTConfig
from ..spaces import LatentNorm, SDVAELatents, VAELatents
from .objective import Terms, ddpm_objective, repa_objective
from .precision import resolve_precision
from .recipe import Recipe


class TrainState(eqx.Module):
    model: REPAModel
    ema: REPAModel
    opt_state: optax.OptState
    step: Int[Array, ""]
    key: PRNGKeyArray


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
    alignment: str | AlignmentMethod = "repa",
) -> TrainState:
    k_model, k_train = jax.random.split(jax.random.key(seed))
    model = REPAModel(config, tuple(z_dims), projector_dim, key=k_model, alignment=alignment)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    # The EMA starts as a copy of the initial weights, as in the reference (its own buffers:
    # the step donates both).
    ema = jax.tree.map(lambda a: jnp.copy(a) if eqx.is_array(a) else a, model)
    return TrainState(model, ema, opt_state, jnp.zeros((), jnp.int32), k_train)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    path: str
    weighting: str
    proj_coeff: float
    ema_decay: float
    precision: str  # "fp32", "bf16" or "auto" (training.precision)
    # imagenet-latents: z = (mean + std * eps) * latent_scale, sampled in the step.
    latent_scale: float = 0.18215
    # Or channel-wise: z_norm = (z - mean_c) / std_c * multiplier (recipe key data.latent_norm).
    latent_norm: LatentNorm | None = None
    objective: str = "interpolant"  # or "ddpm" (recipe key loss.objective)
    remat: str = "dots"  # what the SiT blocks keep for the backward pass (model.sit.REMAT_POLICIES)
    alignment: AlignmentMethod = REPA()  # the alignment method (recipe key loss.alignment)
    # The alignment weight by step (recipe section loss.schedule): (step, weight) points, stop.
    schedule: tuple[tuple[int, float], ...] = ()
    schedule_stop: int | None = None
    dispersive: Dispersive | None = None  # recipe section loss.dispersive
    distillation: AttentionDistillation | None = None  # recipe section loss.haste
    reg: REG | None = None  # recipe section loss.reg (the targets then start with the CLS)
    cosine_coeff: float = 0.0  # recipe key loss.cosine_coeff (LightningDiT's cosine term)
    nonfinite: str = "stop"  # recipe key train.nonfinite: "skip" guards the update in the step

    @property
    def terms(self) -> Terms:
        return Terms(
            self.alignment,
            self.proj_coeff,
            self.dispersive,
            self.distillation,
            self.reg,
            cosine_coeff=self.cosine_coeff,
        )

    def objective_fn(self) -> Callable:
        """`(model, x, y, targets, key, *, terms, compute_dtype, remat, align_weight,
        teacher_attention) -> (loss, parts)`."""
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
    `moments` (a VAE's posterior mean and std, sampled and normalised here on device), plus
    either `features` (a tuple, one array per encoder, precomputed) or `image` (uint8, for the
    frozen encoders in-step). `shardings` = (state, batch, replicated) places everything on a mesh.
    """
    precision, _ = resolve_precision(step_cfg.precision)  # "auto": what the hardware runs best
    compute_dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    objective = step_cfg.objective_fn()
    terms = step_cfg.terms
    if step_cfg.latent_norm is None:
        latents = SDVAELatents(scale=step_cfg.latent_scale)
    else:
        latents = VAELatents(step_cfg.latent_norm)

    def step(state_arrays, batch, encoder_arrays):
        state: TrainState = eqx.combine(state_arrays, static_state)
        teacher_attention = ()
        if "features" in batch:
            targets = batch["features"]
        else:
            encoders = eqx.combine(encoder_arrays, static_enc)
            targets = [e(batch["image"]) for e in encoders[1:]]
            distill = step_cfg.distillation
            if distill is None:
                targets.insert(0, encoders[0](batch["image"]) if encoders else None)
            else:  # HASTE: the first encoder's features and attention maps in one pass
                first, maps = encoders[0].with_attention(batch["image"], distill.teacher_layers)
                targets.insert(0, first)
                teacher_attention = jax.lax.stop_gradient(tuple(jnp.moveaxis(maps, 1, 0)))
            targets = tuple(jax.lax.stop_gradient(t) for t in targets if t is not None)
        key, step_key = jax.random.split(state.key)
        if "moments" in batch:
            x = latents.normalise(batch["moments"], key=jax.random.fold_in(step_key, 1))
        else:
            x = batch["x"]
        params, static_model = eqx.partition(state.model, eqx.is_inexact_array)
        scheduled = step_cfg.schedule or step_cfg.schedule_stop is not None
        align_weight = (
            alignment_weight(state.step, step_cfg.schedule, step_cfg.schedule_stop)
            if scheduled
            else None
        )

        def loss_fn(p):
            return objective(
                eqx.combine(p, static_model),
                x,
                batch["y"],
                targets,
                step_key,
                terms=terms,
                compute_dtype=compute_dtype,
                remat=step_cfg.remat,
                align_weight=align_weight,
                teacher_attention=teacher_attention,
            )

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        grad_norm = optax.tree.norm(grads)
        old = (params, state.opt_state, eqx.filter(state.ema, eqx.is_inexact_array))
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        params = optax.apply_updates(params, updates)
        ema_params = optax.incremental_update(params, old[2], 1.0 - step_cfg.ema_decay)
        if step_cfg.nonfinite == "skip":
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            params, opt_state, ema_params = jax.tree.map(
                lambda new, kept: jnp.where(finite, new, kept),
                (params, opt_state, ema_params),
                old,
            )
            aux["skipped"] = jnp.logical_not(finite).astype(jnp.int32)
        new_state = TrainState(
            eqx.combine(params, static_model),
            eqx.combine(ema_params, static_model),
            opt_state,
            state.step + 1,
            key,
        )
        metrics = {"loss": loss, "grad_norm": grad_norm, **aux}
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
