"""Samplers of the probability-flow ODE and the reverse SDE, as pure functions over a batched
velocity field `v(x, t, y)`, with classifier-free guidance restricted to a time interval.

Conventions are those of the REPA reference (`samplers.py`): t runs from 1 (noise) to 0
(data); the ODE takes `num_steps` equal steps (Heun skips its correction on the last); the
SDE is Euler-Maruyama on linspace(1, 0.04, num_steps) then 0, with diffusion w(t) = 2t and a
final deterministic step. Guidance `u + w (c - u)` applies on all channels, to v (ODE) or to
the drift (SDE), at the grid times t with low <= t <= high only; elsewhere one conditional
call. The time grid and the guided steps are fixed on the host in float64, exactly as the
reference compares them; the loop is one `lax.scan`, compiled once.
"""

from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, Key

from ..core.errors import ConfigError
from .interpolants import PathType, coefficients

Velocity = Callable[
    [Float[Array, "batch ..."], Float[Array, " batch"], Int[Array, " batch"]],
    Float[Array, "batch ..."],
]
Field = Velocity  # any batched field f(x, t, y): the velocity, or the SDE's drift


def linspace(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace` in float64, bit for bit: points before the middle are start + step i,
    the rest end - step (steps - 1 - i), each rounded once (torch's CPU kernel fuses the
    multiply-add). NumPy's points differ in the last bit, enough to move a grid time across a
    guidance-interval edge such as 0.7."""
    if steps == 1:
        return np.array([start], np.float64)
    step = (end - start) / (steps - 1)
    exact_step, half = Fraction(step), steps // 2
    points = [
        Fraction(start) + exact_step * i
        if i < half
        else Fraction(end) - exact_step * (steps - 1 - i)
        for i in range(steps)
    ]
    return np.array([float(p) for p in points], np.float64)


def ode_times(num_steps: int) -> np.ndarray:
    """The ODE grid: num_steps + 1 equal steps' ends from 1 to 0 (float64)."""
    return linspace(1.0, 0.0, num_steps + 1)


def sde_times(num_steps: int) -> np.ndarray:
    """The SDE grid: linspace(1, 0.04, num_steps), then 0 (float64)."""
    return np.concatenate([linspace(1.0, 0.04, num_steps), [0.0]])


def guided_steps(
    times: Sequence[float] | np.ndarray, cfg_scale: float, interval: tuple[float, float]
) -> np.ndarray:
    """For each step's start time, whether that step is guided."""
    low, high = interval
    times = np.asarray(times, np.float64)
    return (cfg_scale > 1.0) & (times >= low) & (times <= high)


def check_guidance(cfg_scale: float, interval: tuple[float, float], num_steps: int) -> None:
    if cfg_scale < 1.0:
        raise ConfigError(f"cfg_scale must be >= 1 (1 = no guidance), got {cfg_scale}")
    low, high = interval
    if not 0.0 <= low <= high <= 1.0:
        raise ConfigError(f"guidance interval must satisfy 0 <= low <= high <= 1, got {interval}")
    if num_steps < 1:
        raise ConfigError(f"num_steps must be >= 1, got {num_steps}")


def guided_call(
    field: Field,
    x: Float[Array, "batch ..."],
    t: Float[Array, ""],
    y: Int[Array, " batch"],
    guided: Bool[Array, ""] | None,
    cfg_scale: float,
    null_label: int,
    guided_channels: int | None = None,
) -> Float[Array, "batch ..."]:
    """`field` at (x, t, y), guided when `guided` is true: the conditional and null-label
    halves in one batched call of twice the size, else one conditional call. With
    `guided_channels`, only the first that many channels (axis 1) are guided; the rest are
    the conditional output's (DiT: the noise is guided, the variance is not)."""
    n = x.shape[0]
    ts = jnp.full((n,), t, x.dtype)

    def plain():
        return field(x, ts, y)

    def cfg():
        both = field(
            jnp.concatenate([x, x]),
            jnp.concatenate([ts, ts]),
            jnp.concatenate([y, jnp.full_like(y, null_label)]),
        )
        cond, uncond = both[:n], both[n:]
        mixed = uncond + cfg_scale * (cond - uncond)
        if guided_channels is None:
            return mixed
        return jnp.concatenate([mixed[:, :guided_channels], cond[:, guided_channels:]], axis=1)

    if guided is None:
        return plain()
    return jax.lax.cond(guided, cfg, plain)


def ode_sample(
    velocity: Velocity,
    noise: Float[Array, "batch ..."],
    labels: Int[Array, " batch"],
    *,
    num_steps: int = 50,
    solver: Literal["euler", "heun"] = "euler",
    cfg_scale: float = 1.0,
    interval: tuple[float, float] = (0.0, 1.0),
    null_label: int = 1000,
) -> Float[Array, "batch ..."]:
    """Integrate dx/dt = v(x, t, y) from t = 1 (`noise`) to t = 0.

    Euler: num_steps model calls; Heun: 2 num_steps - 1 (no correction on the last step).
    Each call is doubled on guided steps; Heun's correction is guided when its step is.
    """
    check_guidance(cfg_scale, interval, num_steps)
    if solver not in ("euler", "heun"):
        raise ConfigError(f"solver must be 'euler' or 'heun', got {solver!r}")
    times = ode_times(num_steps)
    guided = guided_steps(times[:-1], cfg_scale, interval)
    any_guided = bool(guided.any())
    dtype = noise.dtype

    def step(x, inputs):
        i, t, t_next, g = inputs
        g = g if any_guided else None
        dt = t_next - t
        d = guided_call(velocity, x, t, labels, g, cfg_scale, null_label)
        x_euler = x + dt * d
        if solver == "euler":
            return x_euler, None

        def correct():
            d_next = guided_call(velocity, x_euler, t_next, labels, g, cfg_scale, null_label)
            return x + dt * (0.5 * d + 0.5 * d_next)

        return jax.lax.cond(i < num_steps - 1, correct, lambda: x_euler), None

    inputs = (
        jnp.arange(num_steps),
        jnp.asarray(times[:-1], dtype),
        jnp.asarray(times[1:], dtype),
        jnp.asarray(guided),
    )
    return jax.lax.scan(step, noise, inputs)[0]


def score_from_velocity(
    v: Float[Array, "batch ..."],
    x: Float[Array, "batch ..."],
    t: Float[Array, " batch"],
    path: PathType,
) -> Float[Array, "batch ..."]:
    """The score of x_t implied by the velocity: for x_t = a x + s eps with v = a' x + s' eps,
    score = (a/a' v - x) / (s^2 - a/a' s' s)."""
    c = coefficients(path, t.reshape(t.shape + (1,) * (x.ndim - 1)))
    ratio = c.alpha / c.d_alpha
    variance = c.sigma**2 - ratio * c.d_sigma * c.sigma
    return (ratio * v - x) / variance


def sde_drift(velocity: Velocity, path: PathType) -> Field:
    """The reverse-SDE drift with diffusion w(t) = 2t: d = v - (w / 2) score."""

    def drift(x, t, y):
        v = velocity(x, t, y)
        w = (2 * t).reshape(t.shape + (1,) * (x.ndim - 1))
        return v - 0.5 * w * score_from_velocity(v, x, t, path)

    return drift


def sde_sample(
    velocity: Velocity,
    noise: Float[Array, "batch ..."],
    labels: Int[Array, " batch"],
    keys: Key[Array, " batch"],
    *,
    num_steps: int = 250,
    cfg_scale: float = 1.0,
    interval: tuple[float, float] = (0.0, 1.0),
    path: PathType = "linear",
    null_label: int = 1000,
) -> Float[Array, "batch ..."]:
    """Euler-Maruyama from t = 1 (`noise`) to t = 0: num_steps model calls, the last step
    deterministic. `keys` holds one key per example (shape (batch,)): the noise an example
    sees depends on its own key alone, so results do not depend on how examples are batched.
    """
    check_guidance(cfg_scale, interval, num_steps)
    if keys.shape != noise.shape[:1]:
        raise ConfigError(f"keys must hold one key per example: {keys.shape} vs {noise.shape[:1]}")
    times = sde_times(num_steps)
    guided = guided_steps(times[:-1], cfg_scale, interval)
    any_guided = bool(guided.any())
    drift = sde_drift(velocity, path)
    dtype = noise.dtype

    def step(x, inputs):
        i, t, t_next, g = inputs
        dt = t_next - t
        d = guided_call(drift, x, t, labels, g if any_guided else None, cfg_scale, null_label)
        eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:], dtype))(
            keys
        )
        # x += d dt + sqrt(w) sqrt(|dt|) eps, with w = 2t
        return x + d * dt + jnp.sqrt(2 * t) * jnp.sqrt(jnp.abs(dt)) * eps, None

    inputs = (
        jnp.arange(num_steps - 1),
        jnp.asarray(times[:-2], dtype),
        jnp.asarray(times[1:-1], dtype),
        jnp.asarray(guided[:-1]),
    )
    x = jax.lax.scan(step, noise, inputs)[0]
    t, t_next = times[-2], times[-1]
    g = jnp.asarray(guided[-1]) if any_guided else None
    d = guided_call(drift, x, jnp.asarray(t, dtype), labels, g, cfg_scale, null_label)
    return x + (t_next - t) * d
