"""DiT's DDPM against closed forms: the schedule and its posterior by hand, the variational
bound at the true posterior, and the DDPM / DDIM samplers on Gaussian data, whose exact noise
predictor and reverse variance are known."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repa_eqx.diffusion.ddpm import (
    NUM_TIMESTEPS,
    Schedule,
    _at,
    ddim_sample,
    ddpm_sample,
    discretized_gaussian_log_likelihood,
    normal_kl,
    p_mean_variance,
    q_sample,
    space_timesteps,
    training_losses,
    vb_bits,
)

pytestmark = pytest.mark.standard_promotion

# --------------------------------------------------------------------------- schedule


def test_linear_schedule_and_posterior_by_hand():
    s = Schedule.linear()
    c = s.tables()
    assert len(s) == NUM_TIMESTEPS == 1000
    assert s.betas[0] == 1e-4 and s.betas[-1] == 0.02
    np.testing.assert_allclose(s.betas[1] - s.betas[0], (0.02 - 1e-4) / 999, rtol=1e-12)
    b0, b1, b2 = 1e-4, 1e-4 + 0.0199 / 999, 1e-4 + 2 * 0.0199 / 999
    np.testing.assert_allclose(c.alphas_cumprod[:3], [1 - b0, (1 - b0) * (1 - b1),
                               (1 - b0) * (1 - b1) * (1 - b2)], rtol=1e-14)  # fmt: skip
    # alpha-bar at the last step: exp(sum log(1 - beta)) ~ 4.04e-5 for this schedule
    np.testing.assert_allclose(c.alphas_cumprod[-1], np.prod(1 - s.betas), rtol=1e-12)
    assert 4.0e-5 < c.alphas_cumprod[-1] < 4.1e-5

    # q(x_{t-1} | x_t, x_0) at t = 1 (the second step), from Bayes' rule on two Gaussians:
    # x_1 = sqrt(1 - b1) x_0' + sqrt(b1) e, x_0' ~ N(sqrt(1 - b0) x_0, b0)
    a0 = 1 - b0
    var = 1 / (1 / b0 + (1 - b1) / b1)
    coef_x0 = var * np.sqrt(a0) / b0
    coef_xt = var * np.sqrt(1 - b1) / b1
    np.testing.assert_allclose(c.posterior_variance[1], var, rtol=1e-10)
    np.testing.assert_allclose(c.posterior_mean_coef1[1], coef_x0, rtol=1e-10)
    np.testing.assert_allclose(c.posterior_mean_coef2[1], coef_xt, rtol=1e-10)
    # at t = 0 the posterior is a point (variance 0); its log is clipped to step 1's
    assert c.posterior_variance[0] == 0
    assert c.posterior_log_variance_clipped[0] == c.posterior_log_variance_clipped[1]
    np.testing.assert_allclose(c.posterior_log_variance_clipped[0], np.log(var), rtol=1e-12)
    np.testing.assert_allclose(c.posterior_mean_coef1[0], 1.0)
    np.testing.assert_allclose(c.posterior_mean_coef2[0], 0.0, atol=1e-20)
    # beta-tilde <= beta: the range the learned variance interpolates over
    assert (c.posterior_variance <= s.betas).all()


def test_space_timesteps():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "1000") == list(range(1000))
    kept = space_timesteps(1000, "250")
    # stride 999 / 249 = 4.012...: step i sits at round(i * 4.012) (the sum rounds alike here)
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    assert kept[:4] == [0, 4, 8, 12] and kept[125] == 502 and kept[248] == 995
    # sections: 300 steps cut in three, taking 10 (stride 11), 15 (99 / 14) and 20 (99 / 19)
    three = space_timesteps(300, [10, 15, 20])
    assert three[:10] == list(range(0, 100, 11))
    assert three[10:12] == [100, 107] and three[-1] == 299 and len(three) == 45
    with pytest.raises(ValueError, match="integer stride"):
        space_timesteps(1000, "ddim300")
    with pytest.raises(ValueError, match="cannot take 20 steps from a section of 10"):
        space_timesteps(10, "20")


def test_respaced_chain_keeps_alpha_bar_and_calls_the_original_steps():
    base = Schedule.linear()
    spaced = base.respace("ddim50")
    assert len(spaced) == 50 and list(spaced.timesteps) == list(range(0, 1000, 20))
    np.testing.assert_allclose(
        spaced.tables().alphas_cumprod, base.tables().alphas_cumprod[::20], rtol=1e-12
    )
    # the first kept step is step 0: its beta is the original's; later ones are compounded
    np.testing.assert_allclose(spaced.betas[0], base.betas[0], rtol=1e-12)
    np.testing.assert_allclose(spaced.betas[1], 1 - np.prod(1 - base.betas[1:21]), rtol=1e-12)


# ------------------------------------------------------------------ bound and losses


def test_normal_kl_and_discretized_likelihood():
    # N(1, 4) against N(0, 1): (-1 - log 4 + 4 + 1) / 2
    np.testing.assert_allclose(normal_kl(1.0, np.log(4.0), 0.0, 0.0), (4 - np.log(4)) / 2)
    assert normal_kl(0.3, -1.0, 0.3, -1.0) == 0
    # a narrow Gaussian centred on a pixel level: almost all mass in that bin
    x = jnp.array([0.0, -1.0, 1.0, 0.5])
    ll = discretized_gaussian_log_likelihood(x, x, jnp.full(4, np.log(1e-4)))
    np.testing.assert_allclose(ll, 0.0, atol=1e-6)
    # wide: bin probability ~ density * width 2/255
    wide = discretized_gaussian_log_likelihood(jnp.zeros(1), jnp.zeros(1), jnp.zeros(1))
    np.testing.assert_allclose(wide, np.log(2 / 255 / np.sqrt(2 * np.pi)), rtol=1e-3)


def _true_output(schedule, x0, x_k, k, noise):
    """The network output that puts p(x_{k-1} | x_k) at the true posterior: the true noise,
    and v = -1 (log-variance = beta-tilde's)."""
    del schedule, x0, x_k, k
    return jnp.concatenate([noise, -jnp.ones_like(noise)], axis=1)


def test_bound_vanishes_at_the_true_posterior():
    s = Schedule.linear()
    key_x, key_n = jax.random.split(jax.random.key(0))
    x0 = jax.random.uniform(key_x, (6, 2, 4, 4), minval=-1, maxval=1)
    noise = jax.random.normal(key_n, x0.shape)
    k = jnp.array([1, 2, 10, 300, 700, 999])
    x_k = q_sample(s, x0, k, noise)
    out = _true_output(s, x0, x_k, k, noise)
    mse, vb = training_losses(s, out, x0, x_k, k, noise)
    np.testing.assert_allclose(mse, 0.0, atol=1e-12)
    # float32 rounding of x_0 = (x_k - sqrt(1 - abar) eps) / sqrt(abar) grows with k
    np.testing.assert_allclose(vb, 0.0, atol=1e-5)
    # a wrong variance costs bits: v = +1 (beta) at step 10, KL of two zero-mean-gap Gaussians
    wrong = out.at[:, 2:].set(1.0)
    c = s.tables()
    lv_true, lv_beta = c.posterior_log_variance_clipped[10], np.log(s.betas[10])
    expected = 0.5 * (-1 + lv_beta - lv_true + np.exp(lv_true - lv_beta)) / np.log(2)
    got = vb_bits(s, wrong, x0, x_k, k)
    np.testing.assert_allclose(got[2], expected, rtol=2e-3)
    # at step 0 the term is the decoder's NLL in bits: with the mean exact and the std
    # sqrt(beta-tilde_1) = 0.0074, an inner pixel level's bin (+-1/255) holds
    # P = 2 Phi(1 / (255 std)) - 1 ~ 0.40 of the mass, -log2 P ~ 1.3 bits
    levels = jnp.round((0.9 * x0 + 1) * 127.5) / 127.5 - 1  # inner levels only
    k0 = jnp.zeros(6, jnp.int32)
    x1 = q_sample(s, levels, k0, noise)
    nll = vb_bits(s, _true_output(s, levels, x1, k0, noise), levels, x1, k0)
    from scipy.stats import norm

    std = np.exp(0.5 * c.posterior_log_variance_clipped[0])
    expected = -np.log2(2 * norm.cdf(1 / 255 / std) - 1)
    np.testing.assert_allclose(nll, expected, rtol=2e-3)  # the cdf is tanh-approximated


def test_learned_variance_interpolates_between_beta_tilde_and_beta():
    s = Schedule.linear()
    k = jnp.array([0, 1, 5, 50, 500, 999])
    v = jnp.linspace(-1, 1, 5)
    x = jnp.zeros((6, 1, 1, 5))
    out = jnp.concatenate([x, jnp.broadcast_to(v, x.shape)], axis=1)
    c = _at(s.tables(), k, 4)
    _, log_variance, _ = p_mean_variance(c, out, x)
    lo, hi = c.posterior_log_variance_clipped[..., 0], c.log_betas[..., 0]
    np.testing.assert_allclose(log_variance[..., 0], lo, rtol=1e-6)  # v = -1: beta-tilde
    np.testing.assert_allclose(log_variance[..., -1], hi, rtol=1e-6)  # v = +1: beta
    np.testing.assert_allclose(log_variance[..., 2], (lo + hi) / 2, rtol=1e-6)  # geometric mean
    assert np.all(np.diff(log_variance, axis=-1) >= 0)


def test_mse_part_alone_trains_the_noise_and_bound_only_the_variance():
    s = Schedule.linear()
    x0 = jax.random.normal(jax.random.key(1), (3, 1, 2, 2))
    noise = jax.random.normal(jax.random.key(2), x0.shape)
    k = jnp.array([0, 5, 500])
    x_k = q_sample(s, x0, k, noise)
    out = jax.random.normal(jax.random.key(3), (3, 2, 2, 2))

    def vb_total(out):
        return training_losses(s, out, x0, x_k, k, noise)[1].sum()

    grad = jax.grad(vb_total)(out)
    assert np.all(grad[:, :1] == 0) and np.abs(grad[:, 1:]).max() > 0


# ----------------------------------------------------------- samplers on Gaussian data

SHAPE = (2, 3, 3)
MU = jnp.linspace(-1.0, 1.0, 18).reshape(SHAPE)
STD = jnp.linspace(0.3, 0.9, 18).reshape(SHAPE)


def gaussian_model(schedule: Schedule, mu=MU, std=STD):
    """For data N(mu, std^2) per dimension, the exact E[eps | x_k] at original step t, and
    the v whose learned variance is the exact reverse variance Var[x_{k-1} | x_k] =
    beta-tilde + coef1^2 Var[x_0 | x_k] of `schedule` (std < 1 keeps it below beta)."""
    c = schedule.tables()
    index = {int(t): i for i, t in enumerate(schedule.timesteps)}
    table = lambda a: jnp.asarray(a, jnp.float32)
    abar, coef1 = table(c.alphas_cumprod), table(c.posterior_mean_coef1)
    log_small, log_beta = table(c.posterior_log_variance_clipped), table(c.log_betas)
    step_of = (
        jnp.zeros(NUM_TIMESTEPS, jnp.int32)
        .at[jnp.asarray(list(index))]
        .set(jnp.asarray(list(index.values())))
    )

    def model(x, t, y):
        k = step_of[t.astype(jnp.int32)].reshape(-1, 1, 1, 1)
        a = abar[k]
        m = mu(y) if callable(mu) else mu
        var_xk = a * std**2 + 1 - a
        eps = jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * m) / var_xk
        var_x0 = std**2 * (1 - a) / var_xk
        reverse = jnp.exp(log_small[k]) + coef1[k] ** 2 * var_x0
        frac = (jnp.log(reverse) - log_small[k]) / (log_beta[k] - log_small[k])
        frac = jnp.where(k == 0, 0.0, jnp.clip(frac, 0, 1))  # step 0 adds no noise
        return jnp.concatenate([eps, 2 * frac - 1 + jnp.zeros_like(eps)], axis=1)

    return model


def _run(sampler, schedule, n=4000, seed=0, **kw):
    noise = jax.random.normal(jax.random.key(seed), (n, *SHAPE))
    keys = jax.random.split(jax.random.key(seed + 1), n)
    labels = jnp.zeros(n, jnp.int32)
    run = jax.jit(lambda noise, keys: sampler(gaussian_model(schedule), noise, labels, keys,
                                              schedule=schedule, **kw))  # fmt: skip
    return np.asarray(run(noise, keys))


@pytest.mark.parametrize("steps", ["50", "250"])
def test_ddpm_reaches_the_gaussian(steps):
    """With the exact noise and reverse variance every step is exact: only the prior
    mismatch at the last step (sqrt(abar) ~ 0.006) and sampling error remain."""
    schedule = Schedule.linear().respace(steps)
    x = _run(ddpm_sample, schedule)
    n = x.shape[0]
    se_mean, se_std = STD / np.sqrt(n), STD / np.sqrt(2 * n)
    assert np.abs(x.mean(0) - MU).max() < 4.5 * se_mean.max()
    assert np.all(np.abs(x.std(0) - STD) < 4.5 * se_std + 2e-3)


def ddim_std(schedule: Schedule, std, eta: float):
    """The std DDIM ends at on data N(mu, std^2) with the exact noise predictor, from x_K ~
    N(0, 1): each step is affine, x_{k-1} - sqrt(abar_{k-1}) mu = g (x_k - sqrt(abar_k) mu)
    + s z with g = (sqrt(abar_{k-1} abar_k) std^2 + sqrt((1 - abar_{k-1} - s^2)
    (1 - abar_k))) / (abar_k std^2 + 1 - abar_k)."""
    c = schedule.tables()
    var = np.ones_like(std)
    for a, b in zip(c.alphas_cumprod[::-1], c.alphas_cumprod_prev[::-1], strict=True):
        s2 = eta**2 * (1 - b) / (1 - a) * (1 - a / b)
        g = (np.sqrt(a * b) * std**2 + np.sqrt((1 - b - s2) * (1 - a))) / (a * std**2 + 1 - a)
        var = g**2 * var + s2
    return np.sqrt(var)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_follows_its_closed_form(eta):
    """On Gaussian data DDIM is affine step by step, so its final std is known exactly
    (`ddim_std`); its mean is exact. eta = 0 converges to the target to first order in the
    step (the probability-flow ODE); eta = 1 is DDPM with the small variance beta-tilde."""
    schedule = Schedule.linear().respace("ddim50")
    x = _run(ddim_sample, schedule, eta=eta)
    n = x.shape[0]
    assert np.abs(x.mean(0) - MU).max() < 4.5 * (STD / np.sqrt(n)).max()
    predicted = ddim_std(schedule, np.asarray(STD, np.float64), eta)
    assert np.abs(x.std(0) / predicted - 1).max() < 4.5 / np.sqrt(2 * n)
    if eta == 0:
        errors = [
            np.abs(ddim_std(Schedule.linear().respace(f"ddim{k}"), np.asarray(STD), 0) / STD - 1)
            for k in (50, 100, 250)
        ]
        assert errors[0].max() < 0.09 and errors[2].max() < 0.02  # 8.3%, 1.8% at std 0.3
        np.testing.assert_allclose(errors[0] / errors[2], 5, rtol=0.15)  # first order


def test_ddim_eta_zero_is_deterministic_and_the_model_sees_original_steps():
    schedule = Schedule.linear().respace("10")
    seen = []

    def model(x, t, y):
        jax.debug.callback(lambda t: seen.append(np.asarray(t).copy()), t, ordered=True)
        return jnp.concatenate([x * 0.1, jnp.zeros_like(x)], axis=1)

    noise = jax.random.normal(jax.random.key(0), (3, *SHAPE))
    labels = jnp.zeros(3, jnp.int32)
    a = ddim_sample(model, noise, labels, jax.random.split(jax.random.key(1), 3),
                    schedule=schedule)  # fmt: skip
    b = ddim_sample(model, noise, labels, jax.random.split(jax.random.key(2), 3),
                    schedule=schedule)  # fmt: skip
    np.testing.assert_array_equal(a, b)
    steps = [int(t[0]) for t in seen[:10]]
    assert steps == sorted(space_timesteps(1000, "10"), reverse=True)  # 999 ... 0
    assert steps[0] == 999 and steps[-1] == 0


def test_guidance_mixes_the_noise_only_inside_the_interval():
    """Class 0 has mean -1, the null label mean +1: guided steps push eps toward class 0's
    past it; the variance channels stay the conditional output's."""
    schedule = Schedule.linear().respace("20")
    calls = []

    def model(x, t, y):
        jax.debug.callback(lambda t, n: calls.append((float(t[0]), int(n))), t, x.shape[0])
        sign = jnp.where(y == 0, 1.0, -1.0).reshape(-1, 1, 1, 1)
        v = jnp.where(y == 0, -0.5, 0.5).reshape(-1, 1, 1, 1) + jnp.zeros_like(x)
        return jnp.concatenate([sign * jnp.ones_like(x), v], axis=1)

    noise = jnp.zeros((2, *SHAPE))
    keys = jax.random.split(jax.random.key(0), 2)
    labels = jnp.zeros(2, jnp.int32)
    kw = dict(schedule=schedule, null_label=10, interval=(0.2, 0.6))
    ddim_sample(model, noise, labels, keys, cfg_scale=3.0, **kw)
    guided = {t for t, n in calls if n == 4}
    assert guided == {t for t in schedule.timesteps if 0.2 <= t / 1000 <= 0.6}
    assert len(calls) == 20 and 0 < len(guided) < 20

    # the mix itself, on one step: eps = u + 3 (c - u) = -1 + 3 * 2 = 5; v = -0.5 (cond)
    from repa_eqx.diffusion.samplers import guided_call

    out = guided_call(model, noise, jnp.float32(500.0), labels, jnp.bool_(True), 3.0, 10, 2)
    np.testing.assert_allclose(out[:, :2], 5.0)
    np.testing.assert_allclose(out[:, 2:], -0.5)


def test_cfg_channels_guides_only_the_first_channels():
    """DiT's sample.py guides 3 of 4 noise channels: with cfg_channels = 1 of 2, channel 0
    follows the guided chain and channel 1 the unguided one."""
    schedule = Schedule.linear().respace("ddim10")

    def model(x, t, y):  # per channel: eps depends on the label only
        eps = jnp.where(y == 0, 1.0, -1.0).reshape(-1, 1, 1, 1) * jnp.ones_like(x)
        return jnp.concatenate([eps, jnp.zeros_like(x)], axis=1)

    noise = jax.random.normal(jax.random.key(1), (2, *SHAPE))
    keys = jax.random.split(jax.random.key(0), 2)
    labels = jnp.zeros(2, jnp.int32)
    kw = dict(schedule=schedule, null_label=10)
    full = ddim_sample(model, noise, labels, keys, cfg_scale=3.0, **kw)
    plain = ddim_sample(model, noise, labels, keys, cfg_scale=1.0, **kw)
    first = ddim_sample(model, noise, labels, keys, cfg_scale=3.0, cfg_channels=1, **kw)
    np.testing.assert_allclose(first[:, :1], full[:, :1], rtol=1e-6)
    np.testing.assert_allclose(first[:, 1:], plain[:, 1:], rtol=1e-6)
    assert not np.allclose(full[:, 1:], plain[:, 1:])
    with pytest.raises(ValueError, match="cfg_channels"):
        ddim_sample(model, noise, labels, keys, cfg_scale=3.0, cfg_channels=3, **kw)


def test_guided_ddpm_follows_the_guided_gaussian():
    """Class means -1 / +1 (null: 0), common std: CFG with w on the exact eps equals the exact
    eps of data with mean w * m_c (the noise predictor is affine in the mean), so guided DDPM
    samples N(w m_c, std^2)... up to the variance, which guidance leaves conditional."""
    schedule = Schedule.linear().respace("50")
    means = jnp.stack([-jnp.ones(SHAPE), jnp.ones(SHAPE), jnp.zeros(SHAPE)])
    std = 0.5
    model = gaussian_model(schedule, mu=lambda y: means[y], std=std)
    n, w = 2000, 1.5
    noise = jax.random.normal(jax.random.key(0), (n, *SHAPE))
    keys = jax.random.split(jax.random.key(1), n)
    labels = jnp.arange(n) % 2
    x = jax.jit(lambda: ddpm_sample(model, noise, labels, keys, schedule=schedule, cfg_scale=w,
                                    null_label=2))()  # fmt: skip
    for c, m in ((0, -1.0), (1, 1.0)):
        mean = float(np.asarray(x[labels == c]).mean())
        assert mean == pytest.approx(w * m, abs=0.02), (c, mean)
