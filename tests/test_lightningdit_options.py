"""LightningDiT's training and sampling options against a PyTorch transcription of its
`transport` package (random inputs, CPU): the cosine velocity loss, the logit-normal t of
`use_lognorm`, and the Euler ODE with `timestep_shift`, `cfg_interval_start` and guidance on
the first 3 channels (`forward_with_cfg`)."""

import json
import sys
import types

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import tiny_recipe
from scipy.stats import norm

from repa_eqx.core.errors import ConfigError
from repa_eqx.diffusion import interpolants
from repa_eqx.diffusion.losses import cosine_loss
from repa_eqx.diffusion.samplers import ode_sample, ode_times, shift_times
from repa_eqx.runs.export import sample_command
from repa_eqx.sampling.samples import SamplerSpec
from repa_eqx.spaces import Pixels
from repa_eqx.training.objective import Terms, repa_objective
from repa_eqx.training.recipe import RecipeError, parse_recipe, sit_config
from repa_eqx.training.step import init_state, make_optimizer

pytestmark = pytest.mark.standard_promotion

# ------------------------------------------------------------------------- cosine loss


def _torch_cos_loss(model_output: torch.Tensor, ut: torch.Tensor) -> torch.Tensor:
    """transport.training_losses with use_cosine_loss, then train.py's batch mean."""
    per_position = 1 - torch.nn.functional.cosine_similarity(model_output, ut, dim=1)
    return per_position.mean(dim=list(range(1, per_position.ndim))).mean()


def test_cosine_loss_is_lightningdits():
    """Their time runs the other way (x_t = t x1 + (1 - t) x0, u = x1 - x0 = minus our v):
    the loss is the same on the same data, noise and prediction; a zero vector hits eps."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (4, 32, 4, 4))
    noise = jax.random.normal(k2, x.shape)
    t = jnp.array([0.1, 0.4, 0.7, 0.95])
    _, v_target = interpolants.interpolate("linear", x, noise, t)
    v_pred = v_target + 0.7 * jax.random.normal(k3, x.shape)
    v_pred = v_pred.at[0, :, 1, 2].set(0.0)
    ours, grad = jax.value_and_grad(cosine_loss)(v_pred, v_target)
    ut = torch.tensor(np.asarray(x - noise))
    output = torch.tensor(-np.asarray(v_pred), requires_grad=True)
    theirs = _torch_cos_loss(output, ut)
    theirs.backward()
    assert abs(float(ours) - theirs.item()) < 1e-6, (float(ours), theirs.item())
    assert 0.1 < float(ours) < 1.0
    # The zero vector's gradient is of order 1 / eps (torch's too): relative tolerance.
    np.testing.assert_allclose(np.asarray(grad), -output.grad.numpy(), rtol=1e-5, atol=1e-6)
    # A zero-initialised output layer predicts v = 0 everywhere: a finite gradient.
    zero_grad = jax.grad(cosine_loss)(jnp.zeros_like(v_pred), v_target)
    assert np.isfinite(np.asarray(zero_grad)).all()


@pytest.mark.slow  # the SiT's initialisation and two compiles: 15-30 s on 2 busy cores
def test_cosine_term_adds_to_the_objective_and_zero_is_todays_loss():
    config = sit_config(tiny_recipe("unused", model={"input_size": 16}), 10)
    state = init_state(config, [16], 64, make_optimizer(tiny_recipe("unused")), seed=0)
    x = jax.random.normal(jax.random.key(1), (4, 1, 16, 16))
    objective = eqx.filter_jit(
        lambda model, terms: repa_objective(
            model, x, jnp.arange(4), (), jax.random.key(3), path="linear", weighting="uniform",
            terms=terms,
        )
    )  # fmt: skip
    plain, plain_aux = objective(state.model, Terms())
    cos, aux = objective(state.model, Terms(cosine_coeff=2.0))
    assert "cos_loss" not in plain_aux and float(plain) == float(aux["denoise_loss"])
    assert float(cos) == pytest.approx(float(plain) + 2.0 * float(aux["cos_loss"]), rel=1e-6)
    assert float(aux["cos_loss"]) > 0
    with pytest.raises(RecipeError, match="loss.cosine_coeff"):
        tiny_recipe("unused", loss={"cosine_coeff": -1.0})


# ------------------------------------------------------------------------ lognormal t


def test_use_lognorm_is_our_lognormal_weighting_on_the_linear_path():
    """LightningDiT: t = sigmoid(m), m ~ N(0, 1), in its time (t = 1: data), on [t0, t1] =
    [0, 1] for a velocity model on the linear path. Ours: t = s / (1 + s), s = exp(n) =
    sigmoid(n) with t = 1 noise. The same normal draws mirrored (m = -n) give 1 - t exactly,
    and N(0, 1) is symmetric: one distribution. Its quantiles: sigmoid(Phi^-1(q))."""
    key = jax.random.key(7)
    t = np.asarray(interpolants.sample_t(key, (200_000,), "linear", "lognormal"))
    n = np.asarray(jax.random.normal(key, (200_000,)))
    m = -n.astype(np.float64)
    theirs = 1 / (1 + np.exp(-m))  # sample_logit_normal(0, 1) at the draws m
    np.testing.assert_allclose(t, 1 - theirs, atol=2e-7)
    q = np.array([0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99])
    closed = 1 / (1 + np.exp(-norm.ppf(q)))
    np.testing.assert_allclose(np.quantile(t, q), closed, atol=4e-3)
    np.testing.assert_allclose(np.quantile(1 - t, q), closed, atol=4e-3)  # their time


# ---------------------------------------------------------------- shifted, guided ODE

NUM_CLASSES, C = 3, 5
MU = np.random.default_rng(0).normal(size=(NUM_CLASSES + 1, C, 2, 2)).astype(np.float32)


def _velocity(x, t, y):
    """A closed-form field in our time (t = 1 noise), one mean per class (the last: null)."""
    t = t.reshape(-1, 1, 1, 1)
    return x * (t - 0.5) + jnp.asarray(MU)[y] * (1 + t) + jnp.sin(3 * t) * x**2 / 4


def _torch_lightningdit_ode(z, y, *, num_sampling_steps, shift, cfg_scale, start, channels):
    """integrators.ode (torchdiffeq's fixed-grid euler on linspace(0, 1, N), shifted by
    compute_tm) with LightningDiT.forward_with_cfg(cfg_interval=True) around a model in their
    time: model(x, t, y) = -v(x, 1 - t, y)."""
    mu = torch.from_numpy(MU)

    def model(x, t, y):
        s = (1 - t).reshape(-1, 1, 1, 1)
        return -(x * (s - 0.5) + mu[y] * (1 + s) + torch.sin(3 * s) * x**2 / 4)

    def forward_with_cfg(x, t, y):
        half = x[: len(x) // 2]
        out = model(torch.cat([half, half]), t, y)
        eps, rest = out[:, :channels], out[:, channels:]
        cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond + cfg_scale * (cond - uncond)
        if t[0] < start:
            half_eps = cond
        return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)

    ts = torch.linspace(0, 1, num_sampling_steps)
    if shift > 0:
        ts = torch.tensor([shift * t / (1 + (shift - 1) * t) for t in ts])
    x = torch.cat([z, z])
    y = torch.cat([y, torch.full_like(y, NUM_CLASSES)])
    guided = []
    for t0, t1 in zip(ts[:-1], ts[1:], strict=True):
        guided.append(bool(t0 >= start))
        x = x + (t1 - t0) * forward_with_cfg(x, torch.full((len(x),), float(t0)), y)
    return x[: len(z)], ts, guided


@pytest.mark.parametrize("shift,start", [(0.3, 0.125), (0.3, 0.11), (2.0, 0.45)])
def test_shifted_guided_euler_is_lightningdits(shift, start):
    """cfg_interval_start c = our interval (0, 1 - c); N grid points = N - 1 of our steps."""
    n, steps = 4, 25
    z = jax.random.normal(jax.random.key(1), (n, C, 2, 2))
    y = jnp.array([0, 1, 2, 1])
    theirs, grid, guided = _torch_lightningdit_ode(
        torch.tensor(np.asarray(z)), torch.tensor(np.asarray(y)),
        num_sampling_steps=steps, shift=shift, cfg_scale=4.0, start=start, channels=3,
    )  # fmt: skip
    ours_grid = shift_times(ode_times(steps - 1), shift)
    np.testing.assert_allclose(ours_grid, 1 - grid.numpy().astype(np.float64), atol=1e-6)
    assert guided == list(ours_grid[:-1] <= 1 - start) and 0 < sum(guided) < steps - 1
    ours = ode_sample(
        _velocity, z, y, num_steps=steps - 1, cfg_scale=4.0, interval=(0.0, 1 - start),
        null_label=NUM_CLASSES, shift=shift, guided_channels=3,
    )  # fmt: skip
    diff = np.abs(np.asarray(ours) - theirs.numpy()).max()
    assert diff < 2e-5, diff
    # All channels guided is a different sampler (the test can fail).
    all_channels = ode_sample(
        _velocity, z, y, num_steps=steps - 1, cfg_scale=4.0, interval=(0.0, 1 - start),
        null_label=NUM_CLASSES, shift=shift,
    )  # fmt: skip
    assert np.abs(np.asarray(all_channels) - theirs.numpy()).max() > 1e-2


def test_no_shift_is_todays_sampler_bit_for_bit_and_named_so():
    z = jax.random.normal(jax.random.key(2), (2, C, 2, 2))
    y = jnp.array([0, 2])
    kw = dict(num_steps=6, cfg_scale=2.0, interval=(0.0, 0.7), null_label=NUM_CLASSES)
    for solver in ("euler", "heun"):
        plain = ode_sample(_velocity, z, y, solver=solver, **kw)
        same = ode_sample(_velocity, z, y, solver=solver, shift=1.0, **kw)
        np.testing.assert_array_equal(np.asarray(plain), np.asarray(same))
    moved = ode_sample(_velocity, z, y, solver="heun", shift=0.3, **kw)
    assert not np.allclose(np.asarray(plain), np.asarray(moved))
    np.testing.assert_allclose(shift_times(np.array([0.0, 0.5, 1.0]), 0.3), [0, 0.5 / 0.65, 1])
    assert SamplerSpec().name == "ode-euler-50-cfg1-0_1"
    spec = SamplerSpec(num_steps=249, cfg_scale=6.7, interval=(0.0, 0.875), cfg_channels=3,
                       shift=0.3)  # fmt: skip
    assert spec.name == "ode-euler-249-cfg6.7-c3-0_0.875-shift0.3"
    for bad in (dict(shift=0.0), dict(mode="sde", shift=0.3), dict(mode="sde", cfg_channels=3)):
        with pytest.raises(ConfigError):
            SamplerSpec(**bad)


def test_recipe_shift_keys_reach_the_grid_sampler(tmp_path, monkeypatch):
    loop = sys.modules["repa_eqx.training.loop"]
    seen = []
    monkeypatch.setattr(loop, "sample_jit", lambda sit, spec, *a: seen.append(spec) or a[0])
    recipe = tiny_recipe(tmp_path, train={"sample_shift": 0.3})
    draw = loop._grid_drawer(recipe, sit_config(recipe), Pixels, tmp_path, lead=False)
    draw(1, types.SimpleNamespace(sit=None))
    assert seen[0].shift == 0.3
    assert sample_command("me/model", None, recipe).endswith("--steps 4 --shift 0.3")
    for key in ("train.sample_shift", "eval.shift"):
        section, name = key.split(".")
        with pytest.raises(RecipeError, match=key):
            tiny_recipe(tmp_path, **{section: {name: 0.0}})
    table = {"model": {"arch": "DiT-XL/2"}, "loss": {"objective": "ddpm"}, "eval": {"shift": 0.5}}
    with pytest.raises(RecipeError, match="eval.shift"):
        parse_recipe(table)


@pytest.mark.slow  # the session's trained run and a CLI sampling pass
def test_repa_sample_shift_is_in_the_folder_name_and_card(trained_run, tmp_path):
    from typer.testing import CliRunner

    from repa_cli.main import app

    out = tmp_path / "s"
    args = ["sample", "--ckpt", str(trained_run), "--num", "2", "--steps", "3", "--cfg", "2",
            "--interval", "0,0.875", "--cfg-channels", "1", "--shift", "0.3", "--out", str(out),
            "--no-png", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "ode-euler-3-cfg2-c1-0_0.875-shift0.3" in result.output
    card = json.loads(str(np.load(out.with_name("s.npz"))["card"]))
    assert card["sampler"]["shift"] == 0.3 and card["sampler"]["cfg_channels"] == 1
