"""Samplers against closed forms: for Gaussian data the exact velocity field is known, so the
samplers' outputs, convergence orders and guidance bookkeeping can be checked with numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repa_eqx.diffusion.interpolants import coefficients
from repa_eqx.diffusion.samplers import (
    guided_runs,
    guided_steps,
    linspace,
    ode_sample,
    ode_times,
    score_from_velocity,
    sde_sample,
    sde_times,
)

pytestmark = pytest.mark.standard_promotion

SHAPE = (2, 3, 3)  # (c, h, w) of one example
MU = jnp.linspace(-1.5, 1.5, 18).reshape(SHAPE)
STD = jnp.linspace(0.5, 1.5, 18).reshape(SHAPE)


def gaussian_velocity(mu, std, path):
    """E[v | x_t] for data N(mu, diag(std^2)): x_t = a x + s eps, v = a' x + s' eps."""

    def velocity(x, t, y):
        c = coefficients(path, t.reshape(-1, 1, 1, 1))
        m = mu(y) if callable(mu) else mu
        var = c.alpha**2 * std**2 + c.sigma**2
        centred = x - c.alpha * m
        mean_x = m + c.alpha * std**2 / var * centred
        mean_eps = c.sigma / var * centred
        return c.d_alpha * mean_x + c.d_sigma * mean_eps

    return velocity


def exact_endpoint(noise):
    # The exact flow is affine: x_t = a_t mu + sqrt(a_t^2 std^2 + s_t^2) z, so x_0 = mu + std z.
    return MU + STD * noise


def noise_and_labels(n, seed=0):
    noise = jax.random.normal(jax.random.key(seed), (n, *SHAPE))
    return noise, jnp.zeros(n, jnp.int32)


def test_linspace_is_torch_linspace_bit_for_bit():
    torch = pytest.importorskip("torch")
    for start, end in ((1.0, 0.0), (1.0, 0.04), (0.3, 2.7)):
        for steps in (1, 2, 11, 51, 250, 251, 333):
            ours = linspace(start, end, steps)
            theirs = torch.linspace(start, end, steps, dtype=torch.float64).numpy()
            np.testing.assert_array_equal(ours, theirs)
    # NumPy differs, and across a guidance edge it matters: torch's grid has 0.7 at step 15
    # of 50 exactly as the reference compares it.
    assert (np.linspace(1.0, 0.04, 250) != linspace(1.0, 0.04, 250)).any()


def test_guided_runs_split_the_steps_where_guidance_changes():
    assert guided_runs(np.array([False, False, True, True, True, False])) == [
        (0, 2, False),
        (2, 5, True),
        (5, 6, False),
    ]
    assert guided_runs(np.array([True])) == [(0, 1, True)]
    assert guided_runs(np.array([], bool)) == []
    # The ODE-50 grid with CFG on [0, 0.7]: 15 unguided steps, then 35 guided (t = 0.7 included).
    assert guided_runs(guided_steps(ode_times(50)[:-1], 1.8, (0.0, 0.7))) == [
        (0, 15, False),
        (15, 50, True),
    ]


def test_time_grids():
    np.testing.assert_allclose(ode_times(4), [1, 0.75, 0.5, 0.25, 0])
    sde = sde_times(5)
    np.testing.assert_allclose(sde, [1, 0.76, 0.52, 0.28, 0.04, 0])


@pytest.mark.parametrize("path", ["linear", "cosine"])
@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_ode_maps_noise_to_the_target_gaussian(path, solver):
    noise, y = noise_and_labels(4000)
    x = ode_sample(gaussian_velocity(MU, STD, path), noise, y, num_steps=64, solver=solver)
    # Same noise, same endpoint: the flow map is close to exact ...
    np.testing.assert_allclose(x, exact_endpoint(noise), atol=0.2 if solver == "euler" else 5e-3)
    # ... and the samples have the target's statistics.
    flat = np.asarray(x).reshape(len(x), -1)
    np.testing.assert_allclose(flat.mean(0), np.ravel(MU), atol=0.1)
    np.testing.assert_allclose(flat.std(0), np.ravel(STD), rtol=0.06)
    off_diagonal = np.corrcoef(flat.T) - np.eye(flat.shape[1])
    assert np.abs(off_diagonal).max() < 0.08


@pytest.mark.parametrize("path", ["linear", "cosine"])
@pytest.mark.parametrize(("solver", "order"), [("euler", 1), ("heun", 2)])
def test_ode_error_falls_with_the_solver_order(path, solver, order):
    noise, y = noise_and_labels(256)
    velocity = gaussian_velocity(MU, STD, path)
    with jax.enable_x64():
        noise64 = noise.astype(jnp.float64)
        errors = [
            float(
                jnp.abs(
                    ode_sample(velocity, noise64, y, num_steps=n, solver=solver)
                    - exact_endpoint(noise64)
                ).max()
            )
            for n in (16, 32, 64)
        ]
    ratios = np.array(errors[:-1]) / np.array(errors[1:])
    np.testing.assert_allclose(ratios, 2.0**order, rtol=0.15)


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_score_from_velocity_is_the_gaussian_score(path):
    # x_t ~ N(a mu, a^2 std^2 + s^2): score = -(x - a mu) / var.
    x = jax.random.normal(jax.random.key(1), (5, *SHAPE)) * 2
    t = jnp.array([0.1, 0.3, 0.5, 0.7, 0.9])
    v = gaussian_velocity(MU, STD, path)(x, t, None)
    c = coefficients(path, t.reshape(-1, 1, 1, 1))
    expected = -(x - c.alpha * MU) / (c.alpha**2 * STD**2 + c.sigma**2)
    np.testing.assert_allclose(score_from_velocity(v, x, t, path), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_sde_reaches_the_target_gaussian(path):
    n = 4000
    noise, y = noise_and_labels(n)
    keys = jax.random.split(jax.random.key(7), n)
    x = sde_sample(gaussian_velocity(MU, STD, path), noise, y, keys, num_steps=250, path=path)
    flat = np.asarray(x).reshape(n, -1)
    np.testing.assert_allclose(flat.mean(0), np.ravel(MU), atol=0.1)
    np.testing.assert_allclose(flat.std(0), np.ravel(STD), rtol=0.07)
    # Stochastic: not the ODE's deterministic map of the same noise.
    assert np.abs(np.asarray(x) - np.asarray(exact_endpoint(noise))).mean() > 0.1


def test_sde_noise_of_an_example_depends_on_its_key_alone():
    noise, y = noise_and_labels(6)
    keys = jax.random.split(jax.random.key(3), 6)
    velocity = gaussian_velocity(MU, STD, "linear")
    whole = sde_sample(velocity, noise, y, keys, num_steps=20)
    halves = [
        sde_sample(velocity, noise[s], y[s], keys[s], num_steps=20)
        for s in (slice(0, 3), slice(3, 6))
    ]
    np.testing.assert_allclose(whole, jnp.concatenate(halves), rtol=1e-6, atol=1e-6)


# Guidance: a class-conditional Gaussian (class k has mean k * MU, the null label mean 0).
NULL = 10


def class_mean(y):
    return jnp.where(y == NULL, 0.0, y.astype(jnp.float32)).reshape(-1, 1, 1, 1) * MU


def counting(velocity, calls):
    """`velocity` that records the batch size of every call as it runs."""

    def counted(x, t, y):
        n = x.shape[0]
        jax.debug.callback(lambda: calls.append(n))
        return velocity(x, t, y)

    return counted


@pytest.mark.parametrize("mode", ["ode-euler", "ode-heun", "sde"])
@pytest.mark.parametrize("interval", [(0.0, 0.7), (0.3, 0.7), (0.5, 1.0), (0.0, 1.0)])
def test_doubled_calls_are_the_grid_times_inside_the_interval(mode, interval):
    steps, n = 10, 3
    noise, _ = noise_and_labels(n)
    y = jnp.array([1, 2, 3])
    calls = []
    velocity = counting(gaussian_velocity(class_mean, STD, "linear"), calls)
    kwargs = dict(num_steps=steps, cfg_scale=2.0, interval=interval, null_label=NULL)
    if mode == "sde":
        keys = jax.random.split(jax.random.key(0), n)
        jax.block_until_ready(sde_sample(velocity, noise, y, keys, **kwargs))
        times = sde_times(steps)[:-1]
        calls_per_step = 1
    else:
        solver = mode.split("-")[1]
        jax.block_until_ready(ode_sample(velocity, noise, y, solver=solver, **kwargs))
        times = ode_times(steps)[:-1]
        calls_per_step = 2 if solver == "heun" else 1
    inside = int(((times >= interval[0]) & (times <= interval[1])).sum())
    assert inside == guided_steps(times, 2.0, interval).sum()
    doubled = calls.count(2 * n)
    expected = inside * calls_per_step
    if mode == "ode-heun" and times[-1] >= interval[0]:
        expected -= 1  # no correction on the last step
    assert doubled == expected
    assert len(calls) == steps * calls_per_step - (mode == "ode-heun")
    assert set(calls) <= {n, 2 * n}


@pytest.mark.parametrize("mode", ["ode", "sde"])
def test_cfg_one_is_unguided_and_interval_zero_one_is_plain_cfg(mode):
    n, steps, w = 4, 12, 3.0
    noise, _ = noise_and_labels(n)
    y = jnp.array([1, 2, 3, 1])
    keys = jax.random.split(jax.random.key(0), n)
    velocity = gaussian_velocity(class_mean, STD, "linear")

    def run(v, **kw):
        if mode == "ode":
            return ode_sample(v, noise, y, num_steps=steps, null_label=NULL, **kw)
        return sde_sample(v, noise, y, keys, num_steps=steps, null_label=NULL, **kw)

    def plain_cfg(x, t, y):  # guidance written out by hand, applied at every step
        cond, uncond = velocity(x, t, y), velocity(x, t, jnp.full_like(y, NULL))
        return uncond + w * (cond - uncond)

    np.testing.assert_allclose(run(velocity, cfg_scale=1.0, interval=(0.2, 0.6)), run(velocity))
    # The SDE guides the drift, an affine function of v with weights summing to one, so
    # guiding v by hand gives the same drift.
    np.testing.assert_allclose(
        run(velocity, cfg_scale=w, interval=(0.0, 1.0)), run(plain_cfg), rtol=1e-5, atol=1e-5
    )
    guided = run(velocity, cfg_scale=w, interval=(0.0, 0.5))
    assert np.abs(np.asarray(guided) - np.asarray(run(plain_cfg))).max() > 1e-2


def test_guidance_moves_samples_away_from_the_null_mean():
    # Exact CFG for Gaussians with equal covariance: the guided ODE's endpoint mean is
    # mu_null + w (mu_y - mu_null) = w mu_y here (the null mean is 0).
    noise, _ = noise_and_labels(2000)
    y = jnp.ones(2000, jnp.int32)
    x = ode_sample(
        gaussian_velocity(class_mean, STD, "linear"),
        noise,
        y,
        num_steps=40,
        solver="heun",
        cfg_scale=2.0,
        null_label=NULL,
    )
    np.testing.assert_allclose(np.asarray(x).mean(0), 2.0 * MU, atol=0.1)


@pytest.mark.unchecked
def test_bad_arguments_are_refused():
    noise, y = noise_and_labels(2)
    v = gaussian_velocity(MU, STD, "linear")
    with pytest.raises(ValueError, match="cfg_scale"):
        ode_sample(v, noise, y, cfg_scale=0.5)
    with pytest.raises(ValueError, match="interval"):
        ode_sample(v, noise, y, cfg_scale=2.0, interval=(0.8, 0.2))
    with pytest.raises(ValueError, match="solver"):
        ode_sample(v, noise, y, solver="rk4")
    with pytest.raises(ValueError, match="one key per example"):
        sde_sample(v, noise, y, jax.random.split(jax.random.key(0), 3))


# Joint states (REG: the image and its CLS token integrated together).
CLS_MU = jnp.linspace(-1.0, 2.0, 5)
CLS_STD = jnp.linspace(0.3, 1.2, 5)


def joint_velocity(path):
    """Independent Gaussians for the image leaf and a (5,) CLS leaf, each its exact field."""
    image = gaussian_velocity(MU, STD, path)

    def cls_field(c, t):
        k = coefficients(path, t.reshape(-1, 1))
        var = k.alpha**2 * CLS_STD**2 + k.sigma**2
        centred = c - k.alpha * CLS_MU
        mean_x = CLS_MU + k.alpha * CLS_STD**2 / var * centred
        return k.d_alpha * mean_x + k.d_sigma * (k.sigma / var * centred)

    return lambda state, t, y: (image(state[0], t, y), cls_field(state[1], t))


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_joint_state_is_integrated_leaf_by_leaf(solver):
    """Each leaf of a tuple state follows its own exact flow; the image leaf of a joint run is
    the image a run without the CLS leaf gives (ODE and SDE: its noise is drawn as before)."""
    noise, y = noise_and_labels(500)
    cls_noise = jax.random.normal(jax.random.key(4), (500, 5))
    field = joint_velocity("linear")
    x, c = ode_sample(field, (noise, cls_noise), y, num_steps=100, solver=solver)
    tol = 2e-3 if solver == "heun" else 0.1
    np.testing.assert_allclose(x, exact_endpoint(noise), atol=tol)
    np.testing.assert_allclose(c, CLS_MU + CLS_STD * cls_noise, atol=tol)
    alone = ode_sample(gaussian_velocity(MU, STD, "linear"), noise, y, num_steps=100, solver=solver)
    np.testing.assert_array_equal(x, alone)

    keys = jax.random.split(jax.random.key(7), 500)
    x, c = sde_sample(field, (noise, cls_noise), y, keys, num_steps=200)
    np.testing.assert_allclose(np.asarray(c).mean(0), CLS_MU, atol=0.12)
    np.testing.assert_allclose(np.asarray(c).std(0), CLS_STD, rtol=0.12)
    alone = sde_sample(gaussian_velocity(MU, STD, "linear"), noise, y, keys, num_steps=200)
    np.testing.assert_array_equal(x, alone)


def _coupled_field(xp):
    """A class-conditional field in which the image and the CLS token drive each other."""

    def field(x, c, t, y):
        n = x.shape[0]
        shift = xp.where(y == NULL, 0.0, 0.3 * y - 0.5).reshape(n, 1)
        flat = x.reshape(n, -1)
        vx = xp.tanh(flat + shift + 0.5 * c.mean(axis=1, keepdims=True)) - 0.8 * t.reshape(n, 1)
        vc = xp.sin(c - shift + flat.mean(axis=1, keepdims=True)) * (1.5 - t.reshape(n, 1))
        return vx.reshape(x.shape), vc

    return field


def _regs_euler_maruyama(noise, cls_noise, y, eps, cls_eps, num_steps, cfg, cls_cfg, high):
    """REG's samplers.euler_maruyama_sampler (linear path, guidance_low 0) in float64 NumPy,
    the step noises given: eps[i] for the image and cls_eps[i] for the CLS token."""
    field = _coupled_field(np)
    t_steps = np.concatenate([np.asarray(linspace(1.0, 0.04, num_steps)), [0.0]])
    x, c = noise.astype(np.float64), cls_noise.astype(np.float64)

    def drifts(x, c, t):
        guided = cfg > 1.0 and t <= high and t >= 0.0
        xs, cs = (np.concatenate([x, x]), np.concatenate([c, c])) if guided else (x, c)
        ys = np.concatenate([y, np.full_like(y, NULL)]) if guided else y
        ts = np.full(len(ys), t)
        v, vc = field(xs, cs, ts, ys)

        def drift(v, x):
            tt = ts.reshape((-1,) + (1,) * (x.ndim - 1))
            score = ((1 - tt) / -1 * v - x) / (tt**2 - (1 - tt) / -1 * 1 * tt)
            return v - 0.5 * (2 * t) * score

        d, dc = drift(v, xs), drift(vc, cs)
        if guided:
            n = len(x)
            d = d[n:] + cfg * (d[:n] - d[n:])
            dc = dc[n:] + cls_cfg * (dc[:n] - dc[n:]) if cls_cfg > 0 else dc[:n]
        return d, dc

    for i, (t, t_next) in enumerate(zip(t_steps[:-2], t_steps[1:-1], strict=True)):
        dt = t_next - t
        d, dc = drifts(x, c, t)
        x = x + d * dt + np.sqrt(2 * t) * eps[i] * np.sqrt(abs(dt))
        c = c + dc * dt + np.sqrt(2 * t) * cls_eps[i] * np.sqrt(abs(dt))
    t, t_next = t_steps[-2], t_steps[-1]
    d, dc = drifts(x, c, t)
    return x + (t_next - t) * d, c + (t_next - t) * dc


@pytest.mark.parametrize("cls_cfg", [1.5, 0.0])
def test_joint_sde_is_regs_euler_maruyama(cls_cfg):
    """Our SDE on REG's joint state, guided (image 2.0, CLS `cls_cfg`; 0: REG's unguided CLS)
    inside (0, 0.7], against REG's sampler with the same step noises (`step_noise`)."""
    from repa_eqx.diffusion.samplers import step_noise

    num_steps, n = 12, 6
    noise, _ = noise_and_labels(n, seed=2)
    y = jnp.array([0, 1, 2, 3, NULL, 5], jnp.int32)
    cls_noise = jax.random.normal(jax.random.key(5), (n, 4))
    keys = jax.random.split(jax.random.key(9), n)
    field = _coupled_field(jnp)
    ours = sde_sample(
        lambda s, t, y: field(s[0], s[1], t, y),
        (noise, cls_noise),
        y,
        keys,
        num_steps=num_steps,
        cfg_scale=(2.0, cls_cfg),
        interval=(0.0, 0.7),
        null_label=NULL,
    )
    draws = [step_noise(keys, i, (noise, cls_noise)) for i in range(num_steps - 1)]
    eps = np.stack([np.asarray(e, np.float64) for e, _ in draws])
    cls_eps = np.stack([np.asarray(e, np.float64) for _, e in draws])
    ref = _regs_euler_maruyama(
        np.asarray(noise), np.asarray(cls_noise), np.asarray(y), eps, cls_eps,
        num_steps, 2.0, cls_cfg, 0.7,
    )  # fmt: skip
    for a, b in zip(ours, ref, strict=True):
        assert np.abs(b).max() > 0.5
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * np.abs(b).max())
