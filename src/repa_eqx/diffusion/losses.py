"""The training losses of the interpolant objective: the velocity MSE, LightningDiT's cosine
term, and the total denoising + lambda * alignment (the alignment terms themselves are in
`alignment`)."""

import jax.numpy as jnp
from jaxtyping import Array, Float


def denoising_loss(
    v_pred: Float[Array, "batch ..."], v_target: Float[Array, "batch ..."]
) -> Float[Array, ""]:
    """Mean over C, H, W of the squared velocity error, then mean over the batch (in fp32)."""
    err = jnp.square(v_pred.astype(jnp.float32) - v_target.astype(jnp.float32))
    return err.reshape(err.shape[0], -1).mean(axis=1).mean()


def cosine_loss(
    v_pred: Float[Array, "batch c ..."], v_target: Float[Array, "batch c ..."], eps: float = 1e-8
) -> Float[Array, ""]:
    """LightningDiT's `use_cosine_loss` term: 1 - the cosine similarity of the predicted and
    target velocities over the channels (axis 1) at every position, each vector divided by
    max(its norm, eps) first (`torch.nn.functional.cosine_similarity`); mean over the
    positions, then the batch (in fp32). Invariant to the sign convention of v. The norm is
    sqrt(max(|v|^2, eps^2)): at v = 0 (a zero-initialised output layer's first step) the
    gradient is torch's, finite (of order 1 / eps; clipping tames it), where that of
    max(|v|, eps) is NaN."""

    def unit(v):
        v = v.astype(jnp.float32)
        squared = jnp.sum(jnp.square(v), axis=1, keepdims=True)
        return v / jnp.sqrt(jnp.maximum(squared, eps**2))

    cos = jnp.sum(unit(v_pred) * unit(v_target), axis=1)
    return (1 - cos).reshape(cos.shape[0], -1).mean(axis=1).mean()


def total_loss(
    denoise: Float[Array, ""], align: Float[Array, ""] | None, proj_coeff: float
) -> Float[Array, ""]:
    """denoising + lambda * REPA; lambda = 0 or no encoder is the vanilla SiT objective."""
    if align is None or proj_coeff == 0:
        return denoise
    return denoise + proj_coeff * align
