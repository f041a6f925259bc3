"""benchmarks/torch_repa_sample.py (the reference's sampling loops in PyTorch, the baseline of
bench_sample.py) against our sampler on a tiny SiT with the same weights: the ODE and the SDE
(with our per-example step noises injected) agree to float32 rounding, and the torch loops
call the model on the doubled batch exactly at the guided grid times."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repa_eqx.diffusion.samplers import guided_steps, ode_times, sde_times, step_noise
from repa_eqx.model.repa import REPAModel
from repa_eqx.pretrained.official import official_config, official_state_dict
from repa_eqx.sampling.samples import SamplerSpec, example_inputs, sample_jit

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import torch_repa_sample as ref  # noqa: E402

pytestmark = pytest.mark.standard_promotion

ARGS = dict(
    model="SiT-S/2",
    depth=2,
    hidden_size=32,
    num_heads=4,
    resolution=64,  # 8x8 latents, 16 tokens
    num_classes=10,
    encoder_depth=1,
    projector_dim=16,
    projector_embed_dims="8",
)
CFG, INTERVAL = 1.8, (0.0, 0.7)


@pytest.fixture(scope="module")
def models():
    config, z_dims, projector_dim = official_config(ARGS)
    skeleton = jax.eval_shape(
        lambda: REPAModel(config, z_dims, projector_dim, key=jax.random.key(0))
    )
    # Every leaf N(0, 0.2^2): the zero-initialised adaLN and output layers would hide errors.
    rng = np.random.default_rng(0)
    ours = jax.tree.map(
        lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), skeleton
    )
    c = config
    theirs = ref.sit_from_reference_state(
        official_state_dict(ours),
        **ref.architecture(c),
        z_dim=z_dims[0],
        projector_dim=projector_dim,
    )
    return ours.sit, theirs


def _inputs(sit, n=3):
    c = sit.config
    noise, keys = example_inputs(0, jnp.arange(n), (c.in_channels, c.input_size, c.input_size))
    labels = jnp.array([1, 7, 4][:n], jnp.int32)
    return noise, labels, keys


class Counting:
    """The torch model, recording the batch size of every call."""

    def __init__(self, model):
        self.model, self.sizes = model, []

    def __call__(self, x, t, y):
        self.sizes.append(x.shape[0])
        return self.model(x, t, y)


def _torch(a) -> "torch.Tensor":
    return torch.from_numpy(np.array(a))


def test_weights_are_the_same_network(models):
    sit, theirs = models
    noise, labels, _ = _inputs(sit)
    t = jnp.array([0.9, 0.5, 0.1], jnp.float32)
    ours = jax.vmap(lambda x, t, y: sit(x, t, y)[0])(noise, t, labels)
    got = ref.velocity_model(theirs)(_torch(noise), _torch(t), _torch(labels).long())
    assert float(jnp.abs(ours).mean()) > 0.1  # a network that does something
    np.testing.assert_allclose(got.numpy(), ours, rtol=1e-5, atol=1e-5)


def test_ode_matches_ours(models):
    sit, theirs = models
    noise, labels, keys = _inputs(sit)
    steps = 6
    ours = sample_jit(
        sit, SamplerSpec("ode", steps, cfg_scale=CFG, interval=INTERVAL), noise, labels, keys
    )
    model = Counting(ref.velocity_model(theirs))
    got = ref.euler_sampler(
        model,
        _torch(noise),
        _torch(labels).long(),
        num_steps=steps,
        cfg_scale=CFG,
        guidance_low=INTERVAL[0],
        guidance_high=INTERVAL[1],
        null_label=sit.null_label,
    )
    guided = guided_steps(ode_times(steps)[:-1], CFG, INTERVAL)
    assert 0 < guided.sum() < steps  # both kinds of step are exercised
    assert model.sizes == [6 if g else 3 for g in guided]
    assert float(jnp.abs(ours - noise).mean()) > 0.1
    np.testing.assert_allclose(got.numpy(), ours, rtol=1e-5, atol=2e-5)


def test_sde_matches_ours_with_the_same_step_noise(models):
    sit, theirs = models
    noise, labels, keys = _inputs(sit)
    steps = 8
    ours = sample_jit(
        sit, SamplerSpec("sde", steps, cfg_scale=CFG, interval=INTERVAL), noise, labels, keys
    )
    model = Counting(ref.velocity_model(theirs))
    got = ref.euler_maruyama_sampler(
        model,
        _torch(noise),
        _torch(labels).long(),
        num_steps=steps,
        cfg_scale=CFG,
        guidance_low=INTERVAL[0],
        guidance_high=INTERVAL[1],
        null_label=sit.null_label,
        noise=lambda i, x: _torch(step_noise(keys, i, noise)),
    )
    guided = guided_steps(sde_times(steps)[:-1], CFG, INTERVAL)
    assert 0 < guided.sum() < steps
    assert model.sizes == [6 if g else 3 for g in guided]
    np.testing.assert_allclose(got.numpy(), ours, rtol=1e-5, atol=2e-5)
    # Other step noise gives other samples: the injected noise is what made them agree.
    other = ref.euler_maruyama_sampler(
        ref.velocity_model(theirs),
        _torch(noise),
        _torch(labels).long(),
        num_steps=steps,
        cfg_scale=CFG,
        guidance_low=INTERVAL[0],
        guidance_high=INTERVAL[1],
        null_label=sit.null_label,
    )
    assert float(np.abs(other.numpy() - np.asarray(ours)).max()) > 0.1


def test_bf16_autocast_runs_the_same_network_roughly(models):
    sit, theirs = models
    noise, labels, _ = _inputs(sit)
    t = jnp.array([0.9, 0.5, 0.1], jnp.float32)
    fp32 = ref.velocity_model(theirs)(_torch(noise), _torch(t), _torch(labels).long())
    bf16 = ref.velocity_model(theirs, "bf16")(_torch(noise), _torch(t), _torch(labels).long())
    assert bf16.dtype == torch.bfloat16  # autocast did run the products in bf16
    np.testing.assert_allclose(bf16.float().numpy(), fp32.numpy(), rtol=0.1, atol=0.1)
