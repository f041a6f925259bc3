"""The optimizer a recipe builds: AdamW after global-norm clipping, or none (max_grad_norm 0)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from repa_eqx.training.recipe import Recipe, RecipeError, load_recipe
from repa_eqx.training.step import make_optimizer

pytestmark = pytest.mark.standard_promotion  # optax raises a float to an int32 count


def _updates(optimizer, grads_seq):
    params = {"w": jnp.zeros(3)}
    state = optimizer.init(params)
    out = []
    for grads in grads_seq:
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        out.append(np.asarray(updates["w"]))
    return out


def _recipe(max_grad_norm: float) -> Recipe:
    optim = dataclasses.replace(Recipe().optim, lr=0.1, beta2=0.95, max_grad_norm=max_grad_norm)
    return dataclasses.replace(Recipe(), optim=optim)


def test_max_grad_norm_zero_is_plain_adamw_and_positive_clips():
    # Adam is scale-free in one step, so two steps of different norms tell clipping apart.
    grads = [{"w": jnp.array([300.0, -40.0, 5.0])}, {"w": jnp.array([0.1, 0.2, -0.3])}]
    plain = _updates(optax.adamw(0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0), grads)
    unclipped = _updates(make_optimizer(_recipe(0.0)), grads)
    clipped = _updates(make_optimizer(_recipe(1.0)), grads)
    for ours, ref in zip(unclipped, plain, strict=True):
        np.testing.assert_array_equal(ours, ref)
    assert np.abs(clipped[1] - plain[1]).max() > 1e-3


def test_negative_max_grad_norm_is_one_line(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[optim]\nmax_grad_norm = -1.0\n[data]\ndataset = "mnist-5k"\n')
    with pytest.raises(RecipeError, match="optim.max_grad_norm"):
        load_recipe(path)
