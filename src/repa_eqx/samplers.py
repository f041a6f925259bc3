"""Samplers: pure functions over a batched velocity callable v(x, t) -> dx/dt."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

Velocity = Callable[[Float[Array, "batch ..."], Float[Array, " batch"]], Float[Array, "batch ..."]]


def euler_ode(
    velocity: Velocity, noise: Float[Array, "batch ..."], num_steps: int
) -> Float[Array, "batch ..."]:
    """Integrate dx/dt = v from t = 1 (noise) to t = 0 (data) in `num_steps` equal Euler steps."""
    ts = jnp.linspace(1.0, 0.0, num_steps + 1)

    def step(x, i):
        t, t_next = ts[i], ts[i + 1]
        v = velocity(x, jnp.full((x.shape[0],), t, x.dtype))
        return x + (t_next - t) * v, None

    return jax.lax.scan(step, noise, jnp.arange(num_steps))[0]
