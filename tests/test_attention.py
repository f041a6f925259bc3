"""`multihead_attention` by backend and dtype: float32 on CPU is the einsum path, unchanged;
bf16 on CPU runs the custom-VJP path whose products XLA:CPU multiplies natively (compiled and
run over a grid of shapes, under vmap, grad, scan and remat); the GPU path,
`jax.nn.dot_product_attention`, computes the same function (checked here with its XLA
implementation)."""

import itertools

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from repa_eqx.nn import layers
from repa_eqx.nn.layers import attention_implementation, multihead_attention

pytestmark = pytest.mark.standard_promotion

_DOTS = jax.checkpoint_policies.dots_saveable


def _inputs(batch, tokens, heads, head_dim, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    shape = (batch, tokens, heads, head_dim)
    q, k, v = (jax.random.normal(key, shape).astype(dtype) for key in keys[:3])
    return q, k, v, jax.random.normal(keys[3], shape)


def _reference(q, k, v):
    """Attention in float32 from the same (rounded) numbers: the definition."""
    q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    logits = jnp.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
    return jnp.einsum("hqk,khd->qhd", jax.nn.softmax(logits, axis=-1), v)


def _loss(attention, layered: bool):
    """sum(w * attention) over a vmapped batch; `layered`: two attention layers in a
    `lax.scan`, each under `jax.checkpoint` with the SiT's `dots` policy, the query being the
    carry (so gradients flow through both layers)."""

    def loss(q, k, v, w):
        def layer(x):
            return jax.vmap(attention)(x, k, v).astype(x.dtype)

        if layered:
            x, _ = jax.lax.scan(
                lambda x, _: (jax.checkpoint(layer, policy=_DOTS)(x), None), q, None, length=2
            )
        else:
            x = layer(q)
        return jnp.sum(x.astype(jnp.float32) * w)

    return loss


def _value_and_grads(attention, layered, q, k, v, w):
    fn = jax.jit(jax.value_and_grad(_loss(attention, layered), argnums=(0, 1, 2)))
    return jax.block_until_ready(fn(q, k, v, w))


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def _check_bf16_against_float32(shape, layered, tol=0.03):
    """Compiles and runs (values and gradients of q, k, v) the bf16 attention, and compares it
    with the float32 definition on the same bf16-rounded inputs."""
    q, k, v, w = _inputs(*shape, jnp.bfloat16, seed=sum(shape))
    got_val, got = _value_and_grads(multihead_attention, layered, q, k, v, w)
    want_val, want = _value_and_grads(_reference, layered, q, k, v, w)
    out = jax.jit(jax.vmap(multihead_attention))(q, k, v)
    assert out.dtype == jnp.bfloat16
    assert _rel_err(out, jax.jit(jax.vmap(_reference))(q, k, v)) < tol, shape
    for g, ref in zip(got, want, strict=True):
        assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))
        # Each product rounds its operands to bf16 once: ~0.5 % of the scale (measured
        # 0.4-0.8 %), the same as the einsum path.
        assert _rel_err(g, ref) < tol, shape
    assert abs(float(got_val) - float(want_val)) < tol * float(jnp.sum(jnp.abs(w))), shape


def _dots(jaxpr) -> list:
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _dots(sub)
    return found


def test_float32_on_cpu_is_the_einsum_path_bit_for_bit():
    q, k, v, _ = _inputs(1, 19, 3, 16, jnp.float32)
    q, k, v = q[0], k[0], v[0]
    logits = jnp.einsum("qhd,khd->hqk", q, k, preferred_element_type=jnp.float32) * 16**-0.5
    want = jnp.einsum("hqk,khd->qhd", jax.nn.softmax(logits, axis=-1), v)
    np.testing.assert_array_equal(jax.jit(multihead_attention)(q, k, v), jax.jit(lambda: want)())


def test_which_implementation_runs():
    bf16, f32, f16 = jnp.bfloat16, jnp.float32, jnp.float16
    assert attention_implementation(f32, 256, 64, "cpu") == "einsum"
    assert attention_implementation(bf16, 256, 64, "cpu") == "lowp"
    assert attention_implementation(bf16, 257, 72, "cpu") == "lowp"
    # Too small for the native kernel (matrix-vector products): the einsums.
    assert attention_implementation(bf16, 1, 64, "cpu") == "einsum"
    assert attention_implementation(bf16, 256, 4, "cpu") == "einsum"
    assert attention_implementation(f16, 256, 64, "cpu") == "einsum"
    assert attention_implementation(bf16, 256, 64, "tpu") == "einsum"
    # On GPUs: jax.nn.dot_product_attention; cuDNN only for half types on Ampere or later
    # (this machine has no such GPU, so bf16 gets the XLA implementation here).
    assert attention_implementation(f32, 256, 64, "gpu") == "xla"
    assert attention_implementation(bf16, 256, 72, "gpu") == "xla"
    assert attention_implementation(bf16, 256, 64, "gpu") == "xla"


def test_cudnn_needs_a_capable_gpu(monkeypatch):
    class Device:
        compute_capability = "9.0"

    monkeypatch.setattr(layers.jax, "devices", lambda *a: [Device()])
    assert attention_implementation(jnp.bfloat16, 256, 64, "gpu") == "cudnn"
    assert attention_implementation(jnp.float16, 256, 128, "gpu") == "cudnn"
    assert attention_implementation(jnp.bfloat16, 256, 160, "gpu") == "xla"
    assert attention_implementation(jnp.float32, 256, 64, "gpu") == "xla"
    Device.compute_capability = "7.5"
    assert attention_implementation(jnp.bfloat16, 256, 64, "gpu") == "xla"


def test_bf16_products_take_bf16_operands_and_accumulate_in_float32():
    """Forward and backward, the six products are bf16 x bf16 -> float32 (no mixed
    products, which XLA would run in float32), per head with the heads leading."""
    q, k, v, w = _inputs(2, 24, 3, 16, jnp.bfloat16)
    jaxpr = jax.make_jaxpr(jax.grad(_loss(multihead_attention, True), argnums=(0, 1, 2)))(
        q, k, v, w
    ).jaxpr
    dots = _dots(jaxpr)
    assert len(dots) >= 6
    for eqn in dots:
        assert [x.aval.dtype for x in eqn.invars] == [jnp.bfloat16] * 2
        assert eqn.outvars[0].aval.dtype == jnp.float32
        (lhs_c, _), (lhs_b, rhs_b) = eqn.params["dimension_numbers"]
        lhs_rank = eqn.invars[0].aval.ndim
        # Batch axes lead; the left operand is contracted over its last axis.
        assert tuple(lhs_b) == tuple(rhs_b) == tuple(range(len(lhs_b)))
        assert tuple(lhs_c) == (lhs_rank - 1,)


# A few shapes in the default run (S/2 at 256 tokens, odd counts, the largest head dim, one
# token); the grid is the slow test below.
@pytest.mark.parametrize(
    "shape, layered",
    [
        ((2, 256, 6, 64), True),
        ((3, 65, 3, 72), False),
        ((2, 9, 16, 128), False),
        ((2, 1, 2, 32), True),
    ],
)
def test_bf16_attention_compiles_runs_and_matches_float32(shape, layered):
    _check_bf16_against_float32(shape, layered)


@pytest.mark.slow
def test_bf16_attention_over_the_shape_grid():
    """Every shape of the grid compiles and runs, under vmap (batches 1, 2, 3, 8), forward and
    gradient, alternately plain and in a remat'd scan: XLA:CPU never hands one of these
    products to its generic dot, which would refuse bf16 x bf16 -> float32. Each token count
    meets every head dim, and the head counts 1..16 cycle through them."""
    heads = (1, 2, 3, 5, 6, 8, 12, 16)
    head_dims = (32, 64, 72, 128)
    tokens = (1, 2, 3, 7, 8, 9, 16, 17, 31, 64, 65, 127, 128, 255, 256, 257)
    grid = list(itertools.product(tokens, head_dims))
    for i, (t, d) in enumerate(grid):
        h = heads[(i + i // len(heads)) % len(heads)]
        batch = (1, 2, 3, 8)[i % 4] if t * h <= 1024 else (1, 2)[i % 2]
        _check_bf16_against_float32((batch, t, h, d), layered=i % 2 == 0)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 0.03)])
def test_the_gpu_path_is_the_same_function(dtype, tol, monkeypatch):
    """`jax.nn.dot_product_attention` (what GPUs run) in the layout we call it with gives our
    attention, forward and gradients; its XLA implementation runs here on CPU."""
    q, k, v, w = _inputs(3, 33, 4, 32, dtype)
    here = _value_and_grads(multihead_attention, False, q, k, v, w)
    monkeypatch.setattr(layers.jax, "default_backend", lambda: "gpu")
    assert attention_implementation(dtype, 33, 32) == "xla"
    gpu = _value_and_grads(multihead_attention, False, q, k, v, w)
    direct = _value_and_grads(
        lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"),
        False,
        q,
        k,
        v,
        w,
    )
    for other in (gpu, direct):
        assert abs(float(other[0]) - float(here[0])) <= tol * float(jnp.sum(jnp.abs(w)))
        for g, h in zip(other[1], here[1], strict=True):
            assert g.dtype == dtype
            assert _rel_err(g, h) < tol
