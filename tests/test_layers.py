"""`_layers.dense` in bf16: fp32 accumulation forward and backward, under `jax.vmap` one
weight-gradient contraction over the whole batch, and every product in the operand layout
XLA:CPU multiplies natively."""

import equinox as eqx
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from repa_eqx.nn.layers import LaidOutLinear, dense, lay_out_for_lowp

pytestmark = pytest.mark.standard_promotion


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


def _primitives(jaxpr) -> set:
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            names |= _primitives(sub)
    return names


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
    # The weight gradient comes out in the weight's own (out, in) layout, once for the batch.
    assert (dout, din) in shapes and (batch, dout, din) not in shapes


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


def _low(linear):
    return jax.tree.map(lambda a: a.astype(jnp.bfloat16), linear)


def test_laid_out_linear_is_the_same_layer():
    """`lay_out_for_lowp` changes where the forward product reads the weight from, never the
    result or the gradient, and the gradient lands on the (out, in) parameter only."""
    low = _low(_linear(64, 48))
    laid = lay_out_for_lowp(low)
    assert isinstance(laid, LaidOutLinear) and laid.weight_t.shape == (64, 48)
    x = jax.random.normal(jax.random.key(2), (6, 10, 64)).astype(jnp.bfloat16)
    np.testing.assert_allclose(
        np.asarray(jax.vmap(lambda xi: dense(laid, xi))(x), np.float32),
        np.asarray(jax.vmap(lambda xi: dense(low, xi))(x), np.float32),
        rtol=1e-2,
        atol=1e-2,
    )

    def loss_through_layout(lin, x):
        return _loss(lay_out_for_lowp(lin), x)

    got = jax.grad(loss_through_layout)(low, x)
    want = jax.grad(_loss)(low, x)
    assert isinstance(got, eqx.nn.Linear)
    for g, w in ((got.weight, want.weight), (got.bias, want.bias)):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.abs(g - w).max() <= 0.01 * np.abs(w).max()


def test_laid_out_products_read_row_major_operands():
    """What makes XLA:CPU use its native bf16 kernel: in all three products the right operand is
    contracted on its leading axis, and the weight gradient contracts batch and tokens together
    (XLA lays that one out itself), never a 2-D operand on its leading axis."""
    batch, tokens, din, dout = 6, 10, 64, 48
    laid = lay_out_for_lowp(_low(_linear(din, dout)))
    x = jnp.ones((batch, tokens, din), jnp.bfloat16)
    jaxpr = jax.make_jaxpr(jax.grad(_loss, argnums=(0, 1)))(laid, x).jaxpr
    # No operand is transposed on the way in (XLA would fold that into a transposed read).
    assert "transpose" not in _primitives(jaxpr)
    dots = _dots(jaxpr)
    assert len(dots) == 3
    by_shape = {tuple(e.outvars[0].aval.shape): e for e in dots}
    forward, input_grad, weight_grad = (
        by_shape[(batch, tokens, dout)],
        by_shape[(batch, tokens, din)],
        by_shape[(dout, din)],
    )
    for eqn in (forward, input_grad):
        (_, rhs_contract), _ = eqn.params["dimension_numbers"]
        assert tuple(rhs_contract) == (0,)
    (lhs_contract, rhs_contract), _ = weight_grad.params["dimension_numbers"]
    assert tuple(lhs_contract) == tuple(rhs_contract) == (0, 1)


def test_float32_linears_are_not_laid_out():
    linear = _linear(8, 5)
    assert lay_out_for_lowp(linear) is linear
