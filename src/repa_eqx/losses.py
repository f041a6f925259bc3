"""The REPA objective: denoising loss + lambda * representation-alignment loss."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def denoising_loss(
    v_pred: Float[Array, "batch ..."], v_target: Float[Array, "batch ..."]
) -> Float[Array, ""]:
    """Mean over C, H, W of the squared velocity error, then mean over the batch (in fp32)."""
    err = jnp.square(v_pred.astype(jnp.float32) - v_target.astype(jnp.float32))
    return err.reshape(err.shape[0], -1).mean(axis=1).mean()


def _l2_normalise(z: Float[Array, "... dim"], eps: float = 1e-12) -> Float[Array, "... dim"]:
    # fp32 always: the reference's fp16 normalisation NaNs late in training.
    # z / max(|z|, eps) written via the squared norm: `linalg.norm` has a NaN gradient at z = 0.
    z = z.astype(jnp.float32)
    sq_norm = jnp.sum(jnp.square(z), axis=-1, keepdims=True)
    return z * jax.lax.rsqrt(jnp.maximum(sq_norm, eps**2))


def repa_loss(
    projected: Sequence[Float[Array, "batch tokens dim"]],
    targets: Sequence[Float[Array, "batch tokens dim"]],
) -> Float[Array, ""]:
    """Minus the cosine similarity of projector outputs and encoder features, averaged over
    patches, batch and encoders. In [-1, 1]; -1 when perfectly aligned."""
    if len(projected) != len(targets) or not projected:
        raise ValueError(f"{len(projected)} projector outputs for {len(targets)} encoders")
    per_encoder = [
        -jnp.sum(_l2_normalise(p) * _l2_normalise(t), axis=-1).mean()
        for p, t in zip(projected, targets, strict=True)
    ]
    return jnp.mean(jnp.stack(per_encoder))


def total_loss(
    denoise: Float[Array, ""], align: Float[Array, ""] | None, proj_coeff: float
) -> Float[Array, ""]:
    """denoising + lambda * REPA; lambda = 0 or no encoder is the vanilla SiT objective."""
    if align is None or proj_coeff == 0:
        return denoise
    return denoise + proj_coeff * align
