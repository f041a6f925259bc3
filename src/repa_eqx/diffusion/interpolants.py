"""Stochastic interpolants x_t = alpha_t x + sigma_t eps (t = 1 is pure noise) and t sampling."""

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ..core.errors import ConfigError

PathType = Literal["linear", "cosine"]
Weighting = Literal["uniform", "lognormal"]


class Coefficients(NamedTuple):
    alpha: Float[Array, "*t"]
    sigma: Float[Array, "*t"]
    d_alpha: Float[Array, "*t"]
    d_sigma: Float[Array, "*t"]


def coefficients(path: PathType, t: Float[Array, "*t"]) -> Coefficients:
    """alpha_t, sigma_t and their time derivatives."""
    if path == "linear":
        one = jnp.ones_like(t)
        return Coefficients(1 - t, t, -one, one)
    if path == "cosine":
        half_pi = jnp.pi / 2
        return Coefficients(
            jnp.cos(half_pi * t),
            jnp.sin(half_pi * t),
            -half_pi * jnp.sin(half_pi * t),
            half_pi * jnp.cos(half_pi * t),
        )
    raise ConfigError(f"unknown path {path!r}: expected 'linear' or 'cosine'")


def interpolate(path: PathType, x, noise, t):
    """(x_t, v_target) for clean x, Gaussian noise and per-example t (broadcast over C, H, W)."""
    c = coefficients(path, t.reshape(t.shape + (1,) * (x.ndim - t.ndim)))
    return c.alpha * x + c.sigma * noise, c.d_alpha * x + c.d_sigma * noise


def sample_t(
    key: PRNGKeyArray, shape: tuple[int, ...], path: PathType, weighting: Weighting
) -> Float[Array, "*shape"]:
    """uniform: t ~ U(0, 1). lognormal (EDM sigmas): s = exp(N(0, 1)), mapped to the t whose
    interpolant has noise-to-signal ratio s. On the linear path that is t = sigmoid(N(0, 1)),
    LightningDiT's `use_lognorm` (logit-normal in its time 1 - t; N(0, 1) is symmetric); on the
    cosine path LightningDiT would still draw sigmoid(N(0, 1)), this draws (2/pi) arctan(s)."""
    if weighting == "uniform":
        return jax.random.uniform(key, shape)
    if weighting == "lognormal":
        s = jnp.exp(jax.random.normal(key, shape))
        if path == "linear":
            return s / (1 + s)
        if path == "cosine":
            return (2 / jnp.pi) * jnp.arctan(s)
        raise ConfigError(f"unknown path {path!r}")
    raise ConfigError(f"unknown weighting {weighting!r}: expected 'uniform' or 'lognormal'")
