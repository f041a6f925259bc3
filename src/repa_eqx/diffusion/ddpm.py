"""DDPM as DiT trains and samples it (facebookresearch/DiT `diffusion/`, after improved DDPM).

1000 discrete steps with Ho et al.'s linear betas 1e-4..0.02. The network sees x_t =
sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps and the integer step t, and outputs 2C channels: the
noise, then v in [-1, 1] that places the reverse variance between the posterior's beta-tilde_t
(v = -1) and beta_t (v = 1) in log space. Training: the noise MSE plus the variational bound
term in bits per dimension, computed with the mean held fixed so that it teaches the variance
alone (DiT's default, `LossType.MSE` with `learn_sigma`: the bound is added unscaled).

Sampling runs a respaced chain (`space_timesteps`): the kept steps' betas are recomputed from
abar at those steps and the network is called with the original step index. Schedules are
float64 NumPy on the host, as the reference keeps them; per-step coefficients enter the
sampling loop (one `lax.scan`) as float32 inputs. x_0 predictions are not clipped (DiT's
sample.py: `clip_denoised=False`).

Classifier-free guidance mixes the noise channels only, `u + w (c - u)`, and keeps the
conditional variance. DiT's `forward_with_cfg` mixes only the first 3 of the 4 noise channels
"for exact reproducibility" with its released results; here all C are mixed (the standard
form it also documents). The guidance interval uses the original step scaled to [0, 1]:
a step is guided when low <= t / 1000 <= high, so t = 1 is noise as for SiT's samplers.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, Key

from ..core.errors import ConfigError
from .samplers import check_guidance, guided_call, guided_steps

NUM_TIMESTEPS = 1000

# The network on a batch: (x_t, original step as a float, label) -> (noise, v), 2C channels.
NoiseModel = Callable[
    [Float[Array, "batch c h w"], Float[Array, " batch"], Int[Array, " batch"]],
    Float[Array, "batch c2 h w"],
]


def linear_betas(num_timesteps: int = NUM_TIMESTEPS) -> np.ndarray:
    """Ho et al.'s 1e-4..0.02 over 1000 steps (both ends scaled by 1000 / T for T steps)."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
    """The steps of a `num_timesteps` process that a respaced chain keeps, ascending.

    "250" (or [250]): 250 steps spread evenly over the process, both ends included;
    "10,15,20": the process cut into 3 equal sections taking 10, 15 and 20 steps; "ddim50":
    every k-th step from 0 for the integer stride k that gives exactly 50. Positions inside
    a section are accumulated in floats and rounded with Python's `round`, as the reference
    does, so the kept steps are the reference's exactly.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            wanted = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == wanted:
                    return list(range(0, num_timesteps, stride))
            raise ConfigError(
                f"cannot take exactly {wanted} DDIM steps of {num_timesteps} with an integer stride"
            )
        section_counts = [int(part) for part in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    kept, start = [], 0
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if not 0 < count <= size:
            raise ConfigError(f"cannot take {count} steps from a section of {size}")
        stride = 1 if count == 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


class StepTables(NamedTuple):
    """Per step k of a schedule (arrays indexed by k): what q(x_k | x_0), the posterior
    q(x_{k-1} | x_k, x_0) and the model's p(x_{k-1} | x_k) need."""

    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    # log of the posterior variance, whose step-0 value (0) is replaced by step 1's
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray  # of x_0
    posterior_mean_coef2: np.ndarray  # of x_k
    log_betas: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """A DDPM noise schedule: step k has noise `betas[k]` and calls the network with the
    original step `timesteps[k]` (k itself unless respaced). float64, on the host."""

    betas: np.ndarray
    timesteps: np.ndarray

    def __post_init__(self):
        betas = np.asarray(self.betas, np.float64)
        if betas.ndim != 1 or not len(betas) or not ((betas > 0) & (betas <= 1)).all():
            raise ConfigError("betas must be a non-empty 1-D array in (0, 1]")
        if np.shape(self.timesteps) != betas.shape:
            raise ConfigError("one original timestep per beta")
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "timesteps", np.asarray(self.timesteps, np.int64))

    @classmethod
    def linear(cls, num_timesteps: int = NUM_TIMESTEPS) -> "Schedule":
        return cls(linear_betas(num_timesteps), np.arange(num_timesteps))

    def __len__(self) -> int:
        return len(self.betas)

    def respace(self, section_counts: str | Sequence[int]) -> "Schedule":
        """The chain through the steps `space_timesteps` keeps: each kept step's beta is
        1 - abar_k / abar_(previous kept step), so abar is unchanged at every kept step."""
        kept = space_timesteps(len(self), section_counts)
        alphas_cumprod = np.cumprod(1.0 - self.betas)[kept]
        betas = 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
        return Schedule(betas, self.timesteps[kept])

    def tables(self) -> StepTables:
        betas = self.betas
        abar = np.cumprod(1.0 - betas)
        abar_prev = np.append(1.0, abar[:-1])
        posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        if len(betas) > 1:
            clipped = np.append(posterior_variance[1], posterior_variance[1:])
        else:  # one step: x_0 is drawn without noise, this variance is never used
            clipped = betas
        return StepTables(
            alphas_cumprod=abar,
            alphas_cumprod_prev=abar_prev,
            sqrt_alphas_cumprod=np.sqrt(abar),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / abar),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / abar - 1.0),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=np.log(clipped),
            posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
            posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
            log_betas=np.log(betas),
        )


def _at(tables: StepTables, k: Int[Array, "*batch"], ndim: int) -> StepTables:
    """Every table at per-example steps `k`, float32, shaped to broadcast over (C, H, W)."""
    shape = k.shape + (1,) * (ndim - k.ndim)
    return StepTables(*(jnp.asarray(a, jnp.float32)[k].reshape(shape) for a in tables))


# ------------------------------------------------------------------------ the Gaussians


def q_sample(
    schedule: Schedule,
    x0: Float[Array, "*batch c h w"],
    k: Int[Array, "*batch"],
    noise: Float[Array, "*batch c h w"],
) -> Float[Array, "*batch c h w"]:
    """x_k ~ q(x_k | x_0) = N(sqrt(abar_k) x_0, (1 - abar_k) I), with the given noise."""
    c = _at(schedule.tables(), k, x0.ndim)
    return c.sqrt_alphas_cumprod * x0 + c.sqrt_one_minus_alphas_cumprod * noise


def q_posterior(c: StepTables, x0, x_k) -> tuple[Float[Array, "..."], Float[Array, "..."]]:
    """Mean and clipped log-variance of q(x_{k-1} | x_k, x_0), with `c` at step k."""
    mean = c.posterior_mean_coef1 * x0 + c.posterior_mean_coef2 * x_k
    return mean, c.posterior_log_variance_clipped + jnp.zeros_like(mean)


def p_mean_variance(
    c: StepTables, out: Float[Array, "batch c2 h w"], x_k: Float[Array, "batch c h w"]
) -> tuple[Float[Array, "batch c h w"], Float[Array, "batch c h w"], Float[Array, "batch c h w"]]:
    """(mean, log-variance, predicted x_0) of the model's p(x_{k-1} | x_k), with `c` at
    step k: x_0 from the predicted noise, the posterior mean at it, and the log-variance
    frac log beta_k + (1 - frac) log beta-tilde_k with frac = (v + 1) / 2."""
    eps, v = jnp.split(out, 2, axis=1)
    x0 = c.sqrt_recip_alphas_cumprod * x_k - c.sqrt_recipm1_alphas_cumprod * eps
    mean, _ = q_posterior(c, x0, x_k)
    frac = (v + 1) / 2
    log_variance = frac * c.log_betas + (1 - frac) * c.posterior_log_variance_clipped
    return mean, log_variance, x0


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
    )


def _approx_standard_normal_cdf(x):
    # The tanh approximation the reference uses (the same as tanh-GELU's).
    return 0.5 * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(x) in nats for x in [-1, 1] on 256 levels (bins of width 2/255, the two end bins
    open), under N(mean, exp(log_scale)^2); elementwise, probabilities floored at 1e-12."""
    centred = x - mean
    inv_std = jnp.exp(-log_scale)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centred - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(
        x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    )


def _mean_flat(x: Float[Array, "batch ..."]) -> Float[Array, " batch"]:
    return x.reshape(x.shape[0], -1).mean(axis=1)


def vb_bits(
    schedule: Schedule,
    out: Float[Array, "batch c2 h w"],
    x0: Float[Array, "batch c h w"],
    x_k: Float[Array, "batch c h w"],
    k: Int[Array, " batch"],
) -> Float[Array, " batch"]:
    """The variational bound's term at step k, bits per dimension: KL(q(x_{k-1} | x_k, x_0)
    || p(x_{k-1} | x_k)) for k > 0, the decoder's -log p(x_0 | x_1) (discretised) at k = 0."""
    c = _at(schedule.tables(), k, x0.ndim)
    true_mean, true_log_variance = q_posterior(c, x0, x_k)
    mean, log_variance, _ = p_mean_variance(c, out, x_k)
    kl = _mean_flat(normal_kl(true_mean, true_log_variance, mean, log_variance))
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_variance))
    return jnp.where(k == 0, nll, kl) / np.log(2.0)


def training_losses(
    schedule: Schedule,
    out: Float[Array, "batch c2 h w"],
    x0: Float[Array, "batch c h w"],
    x_k: Float[Array, "batch c h w"],
    k: Int[Array, " batch"],
    noise: Float[Array, "batch c h w"],
) -> tuple[Float[Array, " batch"], Float[Array, " batch"]]:
    """Per example: (noise MSE averaged over C, H, W; the bound term in bits per dimension)
    for the network output `out` at x_k. The bound sees the predicted noise through a stop-
    gradient, so it trains the variance channels only. float32 whatever `out`'s dtype."""
    out = out.astype(jnp.float32)
    eps, v = jnp.split(out, 2, axis=1)
    mse = _mean_flat(jnp.square(noise - eps))
    frozen = jnp.concatenate([jax.lax.stop_gradient(eps), v], axis=1)
    return mse, vb_bits(schedule, frozen, x0, x_k, k)


# ------------------------------------------------------------------------------ sampling


def _scan_inputs(schedule: Schedule, cfg_scale: float, interval: tuple[float, float], dtype):
    """The per-step inputs of a sampling scan, from the last step to the first."""
    order = np.arange(len(schedule))[::-1]
    c = schedule.tables()
    guided = guided_steps(schedule.timesteps / NUM_TIMESTEPS, cfg_scale, interval)
    steps = (
        jnp.asarray(schedule.timesteps[order], dtype),
        StepTables(*(jnp.asarray(a[order], dtype) for a in c)),
        jnp.asarray(guided[order]),
        jnp.asarray(order),
    )
    return steps, bool(guided.any())


def _noise(keys: Key[Array, " batch"], i: Int[Array, ""], like: Float[Array, "batch ..."]):
    # Example b's noise at step i depends on its own key alone: batching does not matter.
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), like.shape[1:]))(
        keys
    ).astype(like.dtype)


def _sample(
    step_fn, model, noise, labels, keys, schedule, cfg_scale, interval, null_label, cfg_channels
):
    check_guidance(cfg_scale, interval, len(schedule))
    if keys.shape != noise.shape[:1]:
        raise ConfigError(f"keys must hold one key per example: {keys.shape} vs {noise.shape[:1]}")
    steps, any_guided = _scan_inputs(schedule, cfg_scale, interval, noise.dtype)
    channels = noise.shape[1] if cfg_channels is None else cfg_channels
    if not 1 <= channels <= noise.shape[1]:
        raise ConfigError(f"cfg_channels must be in [1, {noise.shape[1]}], got {cfg_channels}")

    def step(x, inputs):
        t, c, guided, k = inputs
        out = guided_call(
            model, x, t, labels, guided if any_guided else None, cfg_scale, null_label, channels
        )
        bcast = StepTables(*(a.reshape((1,) * x.ndim) for a in c))
        return step_fn(bcast, out, x, _noise(keys, k, x), k > 0), None

    return jax.lax.scan(step, noise, steps)[0]


def ddpm_sample(
    model: NoiseModel,
    noise: Float[Array, "batch c h w"],
    labels: Int[Array, " batch"],
    keys: Key[Array, " batch"],
    *,
    schedule: Schedule,
    cfg_scale: float = 1.0,
    interval: tuple[float, float] = (0.0, 1.0),
    null_label: int = 1000,
    cfg_channels: int | None = None,
) -> Float[Array, "batch c h w"]:
    """Ancestral sampling x_{k-1} ~ p(x_{k-1} | x_k) down `schedule` (respaced), with the
    learned variance, from `noise` at its last step; no noise is added at step 0. One
    network call per step (two on guided steps). `keys`: one per example. Guidance mixes the
    noise channels (the first `cfg_channels` of them: DiT's own sample.py guides 3 of 4) and
    keeps the conditional variance."""

    def step(c, out, x, z, add_noise):
        mean, log_variance, _ = p_mean_variance(c, out, x)
        return mean + jnp.where(add_noise, jnp.exp(0.5 * log_variance), 0.0) * z

    return _sample(
        step, model, noise, labels, keys, schedule, cfg_scale, interval, null_label, cfg_channels
    )


def ddim_sample(
    model: NoiseModel,
    noise: Float[Array, "batch c h w"],
    labels: Int[Array, " batch"],
    keys: Key[Array, " batch"],
    *,
    schedule: Schedule,
    eta: float = 0.0,
    cfg_scale: float = 1.0,
    interval: tuple[float, float] = (0.0, 1.0),
    null_label: int = 1000,
    cfg_channels: int | None = None,
) -> Float[Array, "batch c h w"]:
    """DDIM (Song et al. 2021, eq. 12) down `schedule`: x_{k-1} = sqrt(abar_{k-1}) x_0 +
    sqrt(1 - abar_{k-1} - s^2) eps + s z, s = eta sqrt((1 - abar_{k-1}) / (1 - abar_k))
    sqrt(1 - abar_k / abar_{k-1}); eta = 0 is deterministic. The variance channels are unused.
    """
    if eta < 0:
        raise ConfigError(f"eta must be >= 0, got {eta}")

    def step(c, out, x, z, add_noise):
        _, _, x0 = p_mean_variance(c, out, x)
        eps = jnp.split(out, 2, axis=1)[0]
        abar, abar_prev = c.alphas_cumprod, c.alphas_cumprod_prev
        s = eta * jnp.sqrt((1 - abar_prev) / (1 - abar)) * jnp.sqrt(1 - abar / abar_prev)
        mean = jnp.sqrt(abar_prev) * x0 + jnp.sqrt(1 - abar_prev - s**2) * eps
        return mean + jnp.where(add_noise, s, 0.0) * z

    return _sample(
        step, model, noise, labels, keys, schedule, cfg_scale, interval, null_label, cfg_channels
    )
