"""The training objective of one batch: noise the data, run the model, the denoising loss of
the recipe's objective plus lambda (times the schedule's weight at this step) times the
alignment method's loss, plus the terms the recipe adds: HASTE's attention distillation (also
scheduled), REG's CLS-token flow loss, the dispersive loss, LightningDiT's cosine velocity
loss.

SiT's interpolant objective (`repa_objective`) and DiT's DDPM objective (`ddpm_objective`)
share everything but the noising and the denoising loss."""

import dataclasses
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ..alignment import REG, REPA, AlignmentMethod, AttentionDistillation, Dispersive
from ..diffusion import ddpm, interpolants
from ..diffusion.losses import cosine_loss, denoising_loss
from ..model.repa import ModelOutputs, REPAModel


def cast(tree, dtype):
    """Every floating array of `tree` in `dtype`."""
    return jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, tree)


def _predict(
    model: REPAModel,
    x_t,
    t,
    y,
    key: PRNGKeyArray,
    compute_dtype,
    remat: str,
    taps,
    attention,
    cls_t=None,
) -> ModelOutputs:
    """The model on a noisy batch, each example with its own label-dropout key: the output,
    the projected hidden states, the hidden states after blocks `taps`, the attention
    logits of blocks `attention` (and with REG's noisy CLS tokens `cls_t`, their velocity).
    bf16 compute keeps fp32 master weights: the cast is part of the differentiated function."""
    run = cast(model, compute_dtype)
    keys = jax.random.split(key, x_t.shape[0])

    def one(xi, ti, yi, ki, ci):
        return run.forward(xi, ti, yi, key=ki, remat=remat, taps=taps, attention=attention, cls=ci)

    cls_in = None if cls_t is None else cls_t.astype(compute_dtype)
    return jax.vmap(one)(x_t.astype(compute_dtype), t, y, keys, cls_in)


@dataclasses.dataclass(frozen=True)
class Terms:
    """What the objective adds to the denoising loss (the recipe's `loss` section)."""

    alignment: AlignmentMethod = REPA()
    proj_coeff: float = 0.5
    dispersive: Dispersive | None = None
    distillation: AttentionDistillation | None = None
    reg: REG | None = None
    # LightningDiT's cosine velocity term (interpolant objective), added as coeff * cos_loss.
    cosine_coeff: float = 0.0

    @property
    def taps(self) -> tuple[int, ...]:
        return (self.dispersive.block,) if self.dispersive is not None else ()

    @property
    def attention(self) -> tuple[int, ...]:
        return self.distillation.sit_blocks if self.distillation is not None else ()


DEFAULT_TERMS = Terms()  # REPA, lambda 0.5


def _terms(denoise, out: ModelOutputs, targets, teacher_attention, aux: dict, terms: Terms, weight):
    """denoising + weight(step) * (lambda * alignment + HASTE's attention term) + REG's CLS
    term and the cosine term (in `aux` already) + the dispersive term, and the parts."""
    total = denoise
    if "cls_loss" in aux:
        total = total + terms.reg.coeff * aux["cls_loss"]
    if "cos_loss" in aux:
        total = total + terms.cosine_coeff * aux["cos_loss"]
    align_coeff = terms.proj_coeff if weight is None else terms.proj_coeff * weight
    if targets:
        method = terms.alignment
        align = method.loss(out.projected, method.targets(targets))
        aux[method.loss_name] = align
        if terms.proj_coeff != 0:
            total = total + align_coeff * align
    if terms.distillation is not None:
        attn = terms.distillation.loss(out.attention, teacher_attention)
        aux["attn_loss"] = attn
        coeff = terms.distillation.coeff
        total = total + (coeff if weight is None else coeff * weight) * attn
    if weight is not None:
        aux["align_weight"] = jnp.asarray(weight, jnp.float32)
    if terms.dispersive is not None:
        disp = terms.dispersive.loss(out.hidden[0])
        aux["dispersive_loss"] = disp
        total = total + terms.dispersive.coeff * disp
    return total, {"denoise_loss": denoise, **aux}


def repa_objective(
    model: REPAModel,
    x: Float[Array, "batch c h w"],
    y: Int[Array, " batch"],
    targets: Sequence[Float[Array, "batch tokens _dim"]],
    key: PRNGKeyArray,
    *,
    path: interpolants.PathType,
    weighting: interpolants.Weighting,
    terms: Terms = DEFAULT_TERMS,
    compute_dtype=jnp.float32,
    remat: str = "none",
    align_weight: Float[Array, ""] | None = None,
    teacher_attention: Sequence[Array] = (),
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """Total loss for one batch (and its parts), SiT's interpolant objective. `align_weight`:
    the schedule's factor on the alignment terms at this step (None: 1);
    `teacher_attention`: the teacher's attention logits HASTE distils."""
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    t = interpolants.sample_t(k_t, (x.shape[0],), path, weighting)
    noise = jax.random.normal(k_noise, x.shape)
    x_t, v_target = interpolants.interpolate(path, x, noise, t)
    cls_t = cls_target = None
    if terms.reg is not None:  # REG: the teacher's CLS at the same t, with its own noise
        cls = terms.reg.teacher_cls(targets[0])
        cls_noise = jax.random.normal(jax.random.fold_in(key, 3), cls.shape)
        cls_t, cls_target = interpolants.interpolate(path, cls, cls_noise, t)
    out = _predict(
        model, x_t, t.astype(compute_dtype), y, k_drop, compute_dtype, remat, terms.taps,
        terms.attention, cls_t,
    )  # fmt: skip
    denoise = denoising_loss(out.output, v_target)
    aux = {} if cls_target is None else {"cls_loss": denoising_loss(out.cls, cls_target)}
    if terms.cosine_coeff != 0:
        aux["cos_loss"] = cosine_loss(out.output, v_target)
    return _terms(denoise, out, targets, teacher_attention, aux, terms, align_weight)


def ddpm_objective(
    model: REPAModel,
    x: Float[Array, "batch c h w"],
    y: Int[Array, " batch"],
    targets: Sequence[Float[Array, "batch tokens _dim"]],
    key: PRNGKeyArray,
    *,
    terms: Terms = DEFAULT_TERMS,
    compute_dtype=jnp.float32,
    remat: str = "none",
    align_weight: Float[Array, ""] | None = None,
    teacher_attention: Sequence[Array] = (),
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """Total loss for one batch (and its parts), DiT's objective: a step k uniform in
    0..999, the noise MSE plus the variational bound on the learned variance
    (`ddpm.training_losses`), batch means. The step reaches the network as a float32
    integer (bf16 cannot hold 0..999 exactly)."""
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    schedule = ddpm.Schedule.linear()
    k = jax.random.randint(k_t, (x.shape[0],), 0, len(schedule))
    noise = jax.random.normal(k_noise, x.shape)
    x_k = ddpm.q_sample(schedule, x, k, noise)
    out = _predict(
        model, x_k, k.astype(jnp.float32), y, k_drop, compute_dtype, remat, terms.taps,
        terms.attention,
    )  # fmt: skip
    mse, vb = ddpm.training_losses(schedule, out.output, x, x_k, k, noise)
    aux = {"mse_loss": mse.mean(), "vb_loss": vb.mean()}
    return _terms((mse + vb).mean(), out, targets, teacher_attention, aux, terms, align_weight)
