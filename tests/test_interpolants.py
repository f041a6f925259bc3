"""Interpolants and t sampling against closed forms, finite differences and sample statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from repa_eqx.diffusion.interpolants import coefficients, interpolate, sample_t

pytestmark = pytest.mark.standard_promotion

PATHS = ["linear", "cosine"]
T_GRID = jnp.linspace(0.0, 1.0, 21)


def test_linear_coefficients_closed_form():
    c = coefficients("linear", T_GRID)
    np.testing.assert_array_equal(c.alpha, 1 - T_GRID)
    np.testing.assert_array_equal(c.sigma, T_GRID)
    np.testing.assert_array_equal(c.d_alpha, -np.ones(21))
    np.testing.assert_array_equal(c.d_sigma, np.ones(21))


def test_cosine_coefficients_closed_form():
    t = np.linspace(0.0, 1.0, 21)
    c = coefficients("cosine", jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(c.alpha, np.cos(np.pi * t / 2), atol=1e-6)
    np.testing.assert_allclose(c.sigma, np.sin(np.pi * t / 2), atol=1e-6)
    np.testing.assert_allclose(np.square(c.alpha) + np.square(c.sigma), 1.0, atol=1e-6)
    # Endpoints: clean at t = 0, pure noise at t = 1.
    np.testing.assert_allclose([c.alpha[0], c.sigma[0]], [1.0, 0.0], atol=1e-7)
    np.testing.assert_allclose([c.alpha[-1], c.sigma[-1]], [0.0, 1.0], atol=1e-7)


@pytest.mark.parametrize("path", PATHS)
def test_derivatives_match_finite_differences(path):
    t = jnp.linspace(0.02, 0.98, 25)
    h = 1e-3
    plus, minus, c = coefficients(path, t + h), coefficients(path, t - h), coefficients(path, t)
    # Central differences in fp32: truncation ~h^2, rounding ~1e-7 / h.
    np.testing.assert_allclose(c.d_alpha, (plus.alpha - minus.alpha) / (2 * h), atol=1e-3)
    np.testing.assert_allclose(c.d_sigma, (plus.sigma - minus.sigma) / (2 * h), atol=1e-3)


@pytest.mark.parametrize("path", PATHS)
def test_endpoints(path):
    kx, kn = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (3, 2, 4, 4))
    noise = jax.random.normal(kn, (3, 2, 4, 4))
    x0, _ = interpolate(path, x, noise, jnp.zeros(3))
    x1, _ = interpolate(path, x, noise, jnp.ones(3))
    np.testing.assert_allclose(x0, x, atol=1e-6)
    np.testing.assert_allclose(x1, noise, atol=1e-6)


def test_linear_velocity_is_noise_minus_data():
    kx, kn, kt = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (4, 3, 4, 4))
    noise = jax.random.normal(kn, (4, 3, 4, 4))
    _, v = interpolate("linear", x, noise, jax.random.uniform(kt, (4,)))
    np.testing.assert_allclose(v, noise - x, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_velocity_is_time_derivative_of_x_t(path):
    kx, kn = jax.random.split(jax.random.key(2))
    x = jax.random.normal(kx, (4, 3, 4, 4))
    noise = jax.random.normal(kn, (4, 3, 4, 4))
    t = jnp.array([0.1, 0.35, 0.6, 0.9])
    _, v = interpolate(path, x, noise, t)

    def x_t(t):
        return interpolate(path, x, noise, t)[0]

    _, dx_dt = jax.jvp(x_t, (t,), (jnp.ones_like(t),))
    np.testing.assert_allclose(v, dx_dt, atol=1e-5)
    h = 1e-3
    np.testing.assert_allclose(v, (x_t(t + h) - x_t(t - h)) / (2 * h), atol=3e-3)


@pytest.mark.parametrize("path", PATHS)
def test_each_example_uses_its_own_t(path):
    kx, kn = jax.random.split(jax.random.key(3))
    x = jax.random.normal(kx, (3, 2, 4, 4))
    noise = jax.random.normal(kn, (3, 2, 4, 4))
    t = jnp.array([0.2, 0.5, 0.8])
    x_t, v = interpolate(path, x, noise, t)
    for i in range(3):
        c = coefficients(path, t[i])
        np.testing.assert_allclose(x_t[i], c.alpha * x[i] + c.sigma * noise[i], atol=1e-6)
        np.testing.assert_allclose(v[i], c.d_alpha * x[i] + c.d_sigma * noise[i], atol=1e-6)


def test_uniform_t():
    t = np.asarray(sample_t(jax.random.key(4), (100_000,), "linear", "uniform"))
    assert t.shape == (100_000,)
    assert t.min() >= 0.0 and t.max() <= 1.0
    # U(0,1): mean 1/2 (s.e. 0.0009), variance 1/12; the KS test rejects a non-uniform law.
    assert abs(t.mean() - 0.5) < 0.005
    assert abs(t.var() - 1 / 12) < 0.002
    assert stats.kstest(t, "uniform").pvalue > 1e-3


@pytest.mark.parametrize("path", PATHS)
def test_lognormal_t(path):
    n = 200_000
    t = sample_t(jax.random.key(5), (n,), path, "lognormal")
    assert t.shape == (n,)
    t_np = np.asarray(t)
    assert np.all((t_np > 0) & (t_np < 1))
    # Median of s = exp(N(0,1)) is 1, which both maps send to t = 1/2 (s.e. of the median < 1e-3).
    assert abs(np.median(t_np) - 0.5) < 0.005
    # The implied noise-to-signal ratio sigma/alpha is exactly s: its log is N(0, 1).
    c = coefficients(path, t)
    log_ratio = np.log(np.asarray(c.sigma, np.float64) / np.asarray(c.alpha, np.float64))
    assert abs(log_ratio.mean()) < 0.015  # s.e. 0.0022
    assert abs(log_ratio.std() - 1.0) < 0.015  # s.e. 0.0016
    assert stats.kstest(log_ratio, "norm").pvalue > 1e-3


def test_lognormal_paths_share_the_noise_level():
    # Same key -> same s; the two paths map it to different t with the same sigma/alpha.
    key = jax.random.key(6)
    t_lin = sample_t(key, (1000,), "linear", "lognormal")
    t_cos = sample_t(key, (1000,), "cosine", "lognormal")
    assert not np.allclose(t_lin, t_cos, atol=1e-3)
    lin, cos = coefficients("linear", t_lin), coefficients("cosine", t_cos)
    np.testing.assert_allclose(lin.sigma / lin.alpha, cos.sigma / cos.alpha, rtol=1e-3)


@pytest.mark.unchecked
def test_unknown_names_raise():
    with pytest.raises(ValueError):
        coefficients("edm", jnp.zeros(2))
    with pytest.raises(ValueError):
        sample_t(jax.random.key(0), (2,), "linear", "logit")
    with pytest.raises(ValueError):
        sample_t(jax.random.key(0), (2,), "edm", "lognormal")
