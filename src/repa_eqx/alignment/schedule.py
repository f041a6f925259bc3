"""The alignment weight as a function of the training step: the factor on lambda times the
alignment loss at each update.

`points` (step, weight) pairs are joined linearly (constant before the first and after the
last; none: weight 1), and from step `stop` on the weight is 0. HASTE's second phase is
`stop`: its reference trains with alignment while `global_step < stop` (the number of updates
done before this one, our state's step), so exactly `stop` updates are aligned. A warm-up is
`points = [[0, 0.0], [5000, 1.0]]`, a REED-style phase-out `[[100000, 1.0], [150000, 0.0]]`.
The step is part of the checkpointed state, so a resumed run switches at the same step.
"""

from collections.abc import Sequence

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ..core.errors import ConfigError


def check_schedule(points: Sequence[tuple[int, float]], stop: int | None) -> None:
    steps = [s for s, _ in points]
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)) or any(s < 0 for s in steps):
        raise ConfigError(f"schedule points need increasing steps >= 0, got {steps}")
    if stop is not None and stop < 0:
        raise ConfigError(f"schedule stop must be >= 0, got {stop}")


def alignment_weight(
    step: Int[Array, ""], points: Sequence[tuple[int, float]] = (), stop: int | None = None
) -> Float[Array, ""]:
    """The weight at `step` (the number of updates already done)."""
    check_schedule(points, stop)
    if points:
        xs = jnp.asarray([s for s, _ in points], jnp.float32)
        ys = jnp.asarray([w for _, w in points], jnp.float32)
        weight = jnp.interp(step.astype(jnp.float32), xs, ys)
    else:
        weight = jnp.ones((), jnp.float32)
    if stop is not None:
        weight = jnp.where(step < stop, weight, jnp.zeros((), jnp.float32))
    return weight
