"""REPA (Yu et al. 2024): an MLP projector per target encoder on the SiT's hidden state, and
minus the cosine similarity of its outputs to the encoder's patch features."""

import dataclasses
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ..nn.layers import dense, xavier_linear
from .base import AlignmentMethod


class Projector(eqx.Module):
    """Linear(h, 2048) -> SiLU -> Linear(2048, 2048) -> SiLU -> Linear(2048, z_dim), per token."""

    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear
    fc3: eqx.nn.Linear

    def __init__(self, hidden: int, z_dim: int, width: int = 2048, *, key: PRNGKeyArray):
        k1, k2, k3 = jax.random.split(key, 3)
        self.fc1 = xavier_linear(hidden, width, key=k1)
        self.fc2 = xavier_linear(width, width, key=k2)
        self.fc3 = xavier_linear(width, z_dim, key=k3)

    def __call__(self, h: Float[Array, "tokens hidden"]) -> Float[Array, "tokens z_dim"]:
        h = jax.nn.silu(dense(self.fc1, h))
        h = jax.nn.silu(dense(self.fc2, h))
        return dense(self.fc3, h)


def _l2_normalise(z: Float[Array, "... dim"], eps: float = 1e-12) -> Float[Array, "... dim"]:
    # fp32 always: the reference's fp16 normalisation NaNs late in training.
    # z / max(|z|, eps) written via the squared norm: `linalg.norm` has a NaN gradient at z = 0.
    z = z.astype(jnp.float32)
    sq_norm = jnp.sum(jnp.square(z), axis=-1, keepdims=True)
    return z * jax.lax.rsqrt(jnp.maximum(sq_norm, eps**2))


def repa_loss(
    projected: Sequence[Float[Array, "batch tokens _dim"]],
    targets: Sequence[Float[Array, "batch tokens _dim"]],
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


@dataclasses.dataclass(frozen=True)
class REPA(AlignmentMethod):
    """The reference's method: `Projector` heads, features as they are, `repa_loss`."""

    name = "repa"
    loss_name = "repa_loss"

    def heads(self, hidden_size, z_dims, width, *, key):
        keys = jax.random.split(key, len(z_dims))
        return tuple(
            Projector(hidden_size, z, width, key=k) for z, k in zip(z_dims, keys, strict=True)
        )

    def loss(self, projected, targets):
        return repa_loss(projected, targets)
