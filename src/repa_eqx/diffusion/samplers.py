"""Samplers of the probability-flow ODE and the reverse SDE, as pure functions over a batched
velocity field `v(x, t, y)`, with classifier-free guidance restricted to a time interval.

Conventions are those of the REPA reference (`samplers.py`): t runs from 1 (noise) to 0
(data); the ODE takes `num_steps` equal steps (Heun skips its correction on the last); the
SDE is Euler-Maruyama on linspace(1, 0.04, num_steps) then 0, with diffusion w(t) = 2t and a
final deterministic step. Guidance `u + w (c - u)` applies on all channels, to v (ODE) or to
the drift (SDE), at the grid times t with low <= t <= high only; elsewhere one conditional
call. The time grid and the guided steps are fixed on the host in float64, exactly as the
reference compares them. Since the guided steps are known on the host, the loop is one
`lax.scan` per run of equally guided steps (with [low, high] an interval, at most three): a
guided run calls the model on the doubled batch at every step, an unguided one on the batch,
with no branch inside the loop. Compiled once per shape.

LightningDiT's ODE options: `shift` s moves the ODE grid by tau -> tau / (s + (1 - s) tau)
(`shift_times`), which is its `timestep_shift` s (t -> s t / (1 + (s - 1) t) in its time t = 1
- tau; s < 1 spends more steps near the noise; FLUX's / SD3's shift is 1 / s); `guided_channels`
guides only the first channels, as its `forward_with_cfg` (3 of its 32 latent channels). Its
`cfg_interval_start` c is our interval (0, 1 - c). Its `num_sampling_steps` N counts grid points
(N - 1 Euler steps): our num_steps = N - 1.

The state may be a pytree of arrays that share the batch axis: REG integrates the image and
its CLS token jointly, `field((x, cls), t, y) -> (v, v_cls)`, each leaf with its own guidance
scale (`cfg_scale` a tuple; a scale <= 0 keeps that leaf's conditional output, as REG's
`--cls-cfg-scale 0`) and its own SDE noise, exactly as REG's `euler_maruyama_sampler`.
"""

from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, Key, PyTree

from ..core.errors import ConfigError
from .interpolants import PathType, coefficients

State = PyTree[Float[Array, "batch ..."]]  # one array, or e.g. REG's (image, CLS token)
Velocity = Callable[[State, Float[Array, " batch"], Int[Array, " batch"]], State]
Scale = float | tuple[float, ...]  # one guidance scale, or one per leaf of a tuple state
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


def shift_times(times: np.ndarray, shift: float) -> np.ndarray:
    """LightningDiT's timestep shift of a grid, in our time: tau / (s + (1 - s) tau) (float64);
    s = 1 keeps the grid as it is (the same array)."""
    if shift <= 0:
        raise ConfigError(f"shift must be > 0 (1: none), got {shift}")
    if shift == 1:
        return times
    return times / (shift + (1 - shift) * times)


def sde_times(num_steps: int) -> np.ndarray:
    """The SDE grid: linspace(1, 0.04, num_steps), then 0 (float64)."""
    return np.concatenate([linspace(1.0, 0.04, num_steps), [0.0]])


def _main_scale(cfg_scale: Scale) -> float:
    """The scale that decides whether steps are guided: the first leaf's (the image's)."""
    return float(cfg_scale[0] if isinstance(cfg_scale, tuple) else cfg_scale)


def guided_steps(
    times: Sequence[float] | np.ndarray, cfg_scale: Scale, interval: tuple[float, float]
) -> np.ndarray:
    """For each step's start time, whether that step is guided."""
    low, high = interval
    times = np.asarray(times, np.float64)
    return (_main_scale(cfg_scale) > 1.0) & (times >= low) & (times <= high)


def check_guidance(cfg_scale: Scale, interval: tuple[float, float], num_steps: int) -> None:
    if _main_scale(cfg_scale) < 1.0:
        raise ConfigError(f"cfg_scale must be >= 1 (1 = no guidance), got {cfg_scale}")
    low, high = interval
    if not 0.0 <= low <= high <= 1.0:
        raise ConfigError(f"guidance interval must satisfy 0 <= low <= high <= 1, got {interval}")
    if num_steps < 1:
        raise ConfigError(f"num_steps must be >= 1, got {num_steps}")


def _leaves_scales(x: State, cfg_scale: Scale) -> list[float]:
    leaves = jax.tree.leaves(x)
    if not isinstance(cfg_scale, tuple):
        return [float(cfg_scale)] * len(leaves)
    if len(cfg_scale) != len(leaves):
        raise ConfigError(f"{len(cfg_scale)} guidance scales for a state of {len(leaves)} arrays")
    return [float(c) for c in cfg_scale]


def _batch(x: State) -> tuple[int, jnp.dtype]:
    first = jax.tree.leaves(x)[0]
    return first.shape[0], first.dtype


def guided_call(
    field: Field,
    x: State,
    t: Float[Array, ""],
    y: Int[Array, " batch"],
    guided: Bool[Array, ""] | bool | None,
    cfg_scale: Scale,
    null_label: int,
    guided_channels: int | None = None,
) -> State:
    """`field` at (x, t, y), guided when `guided` is true: the conditional and null-label
    halves in one batched call of twice the size, else one conditional call. A Python bool
    (or None: unguided) decides while tracing; an array, at run time (`lax.cond`). With
    `guided_channels`, only the first that many channels (axis 1) are guided; the rest are
    the conditional output's (DiT: the noise is guided, the variance is not). A tuple
    `cfg_scale` gives each leaf of the state its own scale (<= 0: the conditional output)."""
    n, dtype = _batch(x)
    ts = jnp.full((n,), t, dtype)
    scales = _leaves_scales(x, cfg_scale)

    def plain():
        return field(x, ts, y)

    def mix(cond, uncond, scale):
        if scale <= 0:
            return cond
        mixed = uncond + scale * (cond - uncond)
        if guided_channels is None:
            return mixed
        return jnp.concatenate([mixed[:, :guided_channels], cond[:, guided_channels:]], axis=1)

    def cfg():
        both = field(
            jax.tree.map(lambda a: jnp.concatenate([a, a]), x),
            jnp.concatenate([ts, ts]),
            jnp.concatenate([y, jnp.full_like(y, null_label)]),
        )
        leaves, tree = jax.tree.flatten(both)
        return jax.tree.unflatten(
            tree, [mix(a[:n], a[n:], scale) for a, scale in zip(leaves, scales, strict=True)]
        )

    if guided is None or isinstance(guided, bool):
        return cfg() if guided else plain()
    return jax.lax.cond(guided, cfg, plain)


def guided_runs(guided: np.ndarray) -> list[tuple[int, int, bool]]:
    """The steps as runs of equal guidance: (first step, end, guided), in order."""
    runs, start = [], 0
    for i in range(1, len(guided) + 1):
        if i == len(guided) or guided[i] != guided[start]:
            runs.append((start, i, bool(guided[start])))
            start = i
    return runs


def _scan_runs(step, x: State, guided: np.ndarray, *inputs: np.ndarray, dtype) -> State:
    """`step(g)(x, (i, *inputs[i]))` over every step, one `lax.scan` per run of equal
    guidance `g` (a Python bool)."""
    for start, end, g in guided_runs(guided):
        xs = (jnp.arange(start, end), *(jnp.asarray(a[start:end], dtype) for a in inputs))
        x = jax.lax.scan(step(g), x, xs)[0]
    return x


def _axpy(x: State, a, d: State) -> State:
    """x + a d, leaf by leaf."""
    return jax.tree.map(lambda xi, di: xi + a * di, x, d)


def ode_sample(
    velocity: Velocity,
    noise: State,
    labels: Int[Array, " batch"],
    *,
    num_steps: int = 50,
    solver: Literal["euler", "heun"] = "euler",
    cfg_scale: Scale = 1.0,
    interval: tuple[float, float] = (0.0, 1.0),
    null_label: int = 1000,
    shift: float = 1.0,
    guided_channels: int | None = None,
) -> State:
    """Integrate dx/dt = v(x, t, y) from t = 1 (`noise`) to t = 0.

    Euler: num_steps model calls; Heun: 2 num_steps - 1 (no correction on the last step).
    Each call is doubled on guided steps; Heun's correction is guided when its step is.
    `shift`: the grid's timestep shift (`shift_times`; 1: equal steps); the interval applies
    to the shifted times. `guided_channels`: guide the first that many channels only.
    """
    check_guidance(cfg_scale, interval, num_steps)
    if solver not in ("euler", "heun"):
        raise ConfigError(f"solver must be 'euler' or 'heun', got {solver!r}")
    times = shift_times(ode_times(num_steps), shift)
    guided = guided_steps(times[:-1], cfg_scale, interval)
    _, dtype = _batch(noise)

    def step(g: bool):
        def run(x, inputs):
            i, t, t_next = inputs
            dt = t_next - t
            d = guided_call(velocity, x, t, labels, g, cfg_scale, null_label, guided_channels)
            x_euler = _axpy(x, dt, d)
            if solver == "euler":
                return x_euler, None

            def correct():
                d_next = guided_call(
                    velocity, x_euler, t_next, labels, g, cfg_scale, null_label, guided_channels
                )
                return _axpy(x, dt, jax.tree.map(lambda a, b: 0.5 * a + 0.5 * b, d, d_next))

            return jax.lax.cond(i < num_steps - 1, correct, lambda: x_euler), None

        return run

    return _scan_runs(step, noise, guided, times[:-1], times[1:], dtype=dtype)


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
    """The reverse-SDE drift with diffusion w(t) = 2t: d = v - (w / 2) score, leaf by leaf."""

    def drift(x, t, y):
        def one(v, x):
            w = (2 * t).reshape(t.shape + (1,) * (x.ndim - 1))
            return v - 0.5 * w * score_from_velocity(v, x, t, path)

        return jax.tree.map(one, velocity(x, t, y), x)

    return drift


def step_noise(keys: Key[Array, " batch"], i, x: State) -> State:
    """Step i's Gaussian noise for every leaf: leaf 0 from fold_in(key, i) (as a plain
    array's), leaf j > 0 from fold_in(fold_in(key, i), j); each example from its own key."""
    leaves, tree = jax.tree.flatten(x)

    def draw(j, a):
        def one(k):
            k = jax.random.fold_in(k, i)
            return jax.random.normal(
                k if j == 0 else jax.random.fold_in(k, j), a.shape[1:], a.dtype
            )

        return jax.vmap(one)(keys)

    return jax.tree.unflatten(tree, [draw(j, a) for j, a in enumerate(leaves)])


def sde_sample(
    velocity: Velocity,
    noise: State,
    labels: Int[Array, " batch"],
    keys: Key[Array, " batch"],
    *,
    num_steps: int = 250,
    cfg_scale: Scale = 1.0,
    interval: tuple[float, float] = (0.0, 1.0),
    path: PathType = "linear",
    null_label: int = 1000,
) -> State:
    """Euler-Maruyama from t = 1 (`noise`) to t = 0: num_steps model calls, the last step
    deterministic. `keys` holds one key per example (shape (batch,)): the noise an example
    sees depends on its own key alone, so results do not depend on how examples are batched.
    """
    check_guidance(cfg_scale, interval, num_steps)
    n, dtype = _batch(noise)
    if keys.shape != (n,):
        raise ConfigError(f"keys must hold one key per example: {keys.shape} vs {(n,)}")
    times = sde_times(num_steps)
    guided = guided_steps(times[:-1], cfg_scale, interval)
    drift = sde_drift(velocity, path)

    def step(g: bool):
        def run(x, inputs):
            i, t, t_next = inputs
            dt = t_next - t
            d = guided_call(drift, x, t, labels, g, cfg_scale, null_label)
            eps = step_noise(keys, i, x)
            # x += d dt + sqrt(w) sqrt(|dt|) eps, with w = 2t
            return jax.tree.map(
                lambda x, d, e: x + d * dt + jnp.sqrt(2 * t) * jnp.sqrt(jnp.abs(dt)) * e,
                x,
                d,
                eps,
            ), None

        return run

    x = _scan_runs(step, noise, guided[:-1], times[:-2], times[1:-1], dtype=dtype)
    t, t_next = times[-2], times[-1]
    d = guided_call(
        drift, x, jnp.asarray(t, dtype), labels, bool(guided[-1]), cfg_scale, null_label
    )
    return _axpy(x, t_next - t, d)
