"""The training objective of one batch: noise the data, run the model, the denoising loss of
the recipe's objective plus lambda times the alignment method's loss.

SiT's interpolant objective (`repa_objective`) and DiT's DDPM objective (`ddpm_objective`)
share everything but the noising and the denoising loss."""

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ..alignment import get_method
from ..diffusion import ddpm, interpolants
from ..diffusion.losses import denoising_loss, total_loss
from ..model.repa import REPAModel


def cast(tree, dtype):
    """Every floating array of `tree` in `dtype`."""
    return jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, tree)


def _predict(model: REPAModel, x_t, t, y, key: PRNGKeyArray, compute_dtype, remat: str):
    """The model on a noisy batch, each example with its own label-dropout key. bf16 compute
    keeps fp32 master weights: the cast is part of the differentiated function."""
    run = cast(model, compute_dtype)
    keys = jax.random.split(key, x_t.shape[0])
    return jax.vmap(lambda xi, ti, yi, ki: run(xi, ti, yi, key=ki, remat=remat))(
        x_t.astype(compute_dtype), t, y, keys
    )


def _with_alignment(denoise, projected, targets, proj_coeff: float, aux: dict, alignment: str):
    """denoising + lambda * alignment, and the parts."""
    method = get_method(alignment)
    align = method.loss(projected, method.targets(targets)) if targets else None
    if align is not None:
        aux[method.loss_name] = align
    return total_loss(denoise, align, proj_coeff), {"denoise_loss": denoise, **aux}


def repa_objective(
    model: REPAModel,
    x: Float[Array, "batch c h w"],
    y: Int[Array, " batch"],
    targets: Sequence[Float[Array, "batch tokens _dim"]],
    key: PRNGKeyArray,
    *,
    path: interpolants.PathType,
    weighting: interpolants.Weighting,
    proj_coeff: float,
    compute_dtype=jnp.float32,
    remat: str = "none",
    alignment: str = "repa",
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """Total loss for one batch (and its parts), SiT's interpolant objective."""
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    t = interpolants.sample_t(k_t, (x.shape[0],), path, weighting)
    noise = jax.random.normal(k_noise, x.shape)
    x_t, v_target = interpolants.interpolate(path, x, noise, t)
    v_pred, projected = _predict(
        model, x_t, t.astype(compute_dtype), y, k_drop, compute_dtype, remat
    )
    denoise = denoising_loss(v_pred, v_target)
    return _with_alignment(denoise, projected, targets, proj_coeff, {}, alignment)


def ddpm_objective(
    model: REPAModel,
    x: Float[Array, "batch c h w"],
    y: Int[Array, " batch"],
    targets: Sequence[Float[Array, "batch tokens _dim"]],
    key: PRNGKeyArray,
    *,
    proj_coeff: float,
    compute_dtype=jnp.float32,
    remat: str = "none",
    alignment: str = "repa",
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
    out, projected = _predict(model, x_k, k.astype(jnp.float32), y, k_drop, compute_dtype, remat)
    mse, vb = ddpm.training_losses(schedule, out, x, x_k, k, noise)
    aux = {"mse_loss": mse.mean(), "vb_loss": vb.mean()}
    return _with_alignment((mse + vb).mean(), projected, targets, proj_coeff, aux, alignment)
