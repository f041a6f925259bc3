"""`_layers.dense` in bf16: fp32 accumulation forward and backward, and under `jax.vmap` one
weight-gradient contraction over the whole batch."""

import equinox as eqx
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np

from repa_eqx._layers import dense


def _linear(din: int, dout: int, seed: int = 0) -> eqx.nn.Linear:
    return eqx.nn.Linear(din, dout, key=jax.random.key(seed))


def _loss(linear, x):
    # Per example (the models' convention), vmapped over the batch.
    y = jax.vmap(lambda xi: dense(linear, xi))(x)
    return jnp.sum(jnp.sin(y.astype(jnp.float32)))


def _dots(jaxpr) -> list:
    """Every dot_general in a jaxpr, nested ones included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _dots(sub)
    return found


def test_float32_is_the_plain_product():
    linear = _linear(8, 5)
    x = jax.random.normal(jax.random.key(1), (3, 4, 8))
    want = x @ linear.weight.T + linear.bias
    np.testing.assert_array_equal(dense(linear, x), want)


def test_bf16_gradient_matches_float32_to_bf16_rounding():
    linear = _linear(64, 48)
    x = jax.random.normal(jax.random.key(1), (6, 10, 64))
    low = jax.tree.map(lambda a: a.astype(jnp.bfloat16), linear)
    # The reference: the same bf16-rounded numbers, everything in float32.
    ref_in = jax.tree.map(lambda a: a.astype(jnp.float32), low)
    x_low = x.astype(jnp.bfloat16)
    got_lin, got_x = jax.grad(_loss, argnums=(0, 1))(low, x_low)
    ref_lin, ref_x = jax.grad(_loss, argnums=(0, 1))(ref_in, x_low.astype(jnp.float32))
    assert got_x.dtype == jnp.bfloat16 and got_lin.weight.dtype == jnp.bfloat16
    for got, ref in (
        (got_x, ref_x),
        (got_lin.weight, ref_lin.weight),
        (got_lin.bias, ref_lin.bias),
    ):
        got = np.asarray(got, np.float32)
        # The cotangent is rounded to bf16 once before each product: ~1 % of the scale.
        assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()


def test_bf16_products_are_bf16_with_f32_accumulation_and_one_weight_contraction():
    """Forward and backward, every product takes bf16 operands and accumulates in float32
    (XLA runs mixed f32 x bf16 products in float32, at half the speed on CPU), and under vmap
    the weight gradient is a single contraction, not one per example."""
    batch, din, dout = 6, 64, 48
    low = jax.tree.map(lambda a: a.astype(jnp.bfloat16), _linear(din, dout))
    x = jnp.ones((batch, 10, din), jnp.bfloat16)
    jaxpr = jax.make_jaxpr(jax.grad(_loss, argnums=(0, 1)))(low, x).jaxpr
    dots = _dots(jaxpr)
    assert len(dots) == 3  # forward, input gradient, weight gradient
    for eqn in dots:
        assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16, jnp.bfloat16]
        assert eqn.outvars[0].aval.dtype == jnp.float32
    shapes = {tuple(e.outvars[0].aval.shape) for e in dots}
    assert (din, dout) in shapes and (batch, din, dout) not in shapes


def test_bf16_gradient_without_vmap():
    """The batching rule must not be needed: a bf16 dense differentiates unbatched too."""
    low = jax.tree.map(lambda a: a.astype(jnp.bfloat16), _linear(8, 5))
    x = jnp.ones((4, 8), jnp.bfloat16)
    grads = jax.grad(lambda lin, x: jnp.sum(dense(lin, x).astype(jnp.float32)), argnums=(0, 1))(
        low, x
    )
    # d/dx sum(x W^T + b) = column sums of W; d/dW = column sums of x (all ones here).
    np.testing.assert_allclose(grads[1][0].astype(jnp.float32), low.weight.sum(0), rtol=1e-2)
    np.testing.assert_array_equal(grads[0].weight, jnp.full((5, 8), 4.0, jnp.bfloat16))
