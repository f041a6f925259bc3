"""The REPA projector: maps SiT hidden states onto a target encoder's feature space."""

import equinox as eqx
import jax
from jaxtyping import Array, Float, PRNGKeyArray

from ._layers import dense, xavier_linear


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
