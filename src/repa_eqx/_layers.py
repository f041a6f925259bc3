"""Small building blocks shared by the ported and trained networks."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray


def xavier_linear(
    in_features: int, out_features: int, *, key: PRNGKeyArray, zero: bool = False
) -> eqx.nn.Linear:
    """`nn.Linear` initialised the reference way: xavier-uniform weight (or zeros), zero bias."""
    linear = eqx.nn.Linear(in_features, out_features, key=key)
    if zero:
        weight = jnp.zeros((out_features, in_features))
    else:
        bound = float(np.sqrt(6.0 / (in_features + out_features)))
        weight = jax.random.uniform(key, (out_features, in_features), minval=-bound, maxval=bound)
    return eqx.tree_at(
        lambda lin: (lin.weight, lin.bias), linear, (weight, jnp.zeros(out_features))
    )


def normal_linear(
    in_features: int, out_features: int, *, key: PRNGKeyArray, std: float
) -> eqx.nn.Linear:
    linear = eqx.nn.Linear(in_features, out_features, key=key)
    weight = std * jax.random.normal(key, (out_features, in_features))
    return eqx.tree_at(
        lambda lin: (lin.weight, lin.bias), linear, (weight, jnp.zeros(out_features))
    )


@jax.custom_vjp
def _lowp_matmul(x: Array, w: Array) -> Array:
    """x @ w for bf16 (or f16) operands, accumulated and returned in float32; the backward
    products are low-precision operands with float32 accumulation too. Without this rule JAX
    differentiates the product against a float32 cotangent, and XLA runs those mixed products
    in float32."""
    return jnp.matmul(x, w, preferred_element_type=jnp.float32)


def _lowp_matmul_fwd(x, w):
    return _lowp_matmul(x, w), (x, w)


def _lowp_matmul_grads_impl(x, w, g):
    g = g.astype(x.dtype)
    dx = jnp.matmul(g, w.T, preferred_element_type=jnp.float32)
    # Every leading axis of x is summed over for the weight's gradient.
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    dw = jnp.matmul(x2.T, g2, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


@jax.custom_batching.custom_vmap
def _lowp_matmul_grads(x, w, g):
    return _lowp_matmul_grads_impl(x, w, g)


@_lowp_matmul_grads.def_vmap
def _lowp_matmul_grads_vmap(axis_size, in_batched, x, w, g):
    # The models run one example per call under jax.vmap, so the backward pass is vmapped too.
    # A vmapped x (and g) is just more leading axes: the weight gradient is then one
    # contraction over the whole batch, returned unbatched, where a plainly vmapped backward
    # would make one weight gradient per example and sum them.
    x_batched, w_batched, g_batched = in_batched
    if x_batched and g_batched and not w_batched:
        return _lowp_matmul_grads_impl(x, w, g), (True, False)
    axes = tuple(0 if b else None for b in in_batched)
    return jax.vmap(_lowp_matmul_grads_impl, in_axes=axes)(x, w, g), (True, True)


def _lowp_matmul_bwd(residuals, g):
    x, w = residuals
    return _lowp_matmul_grads(x, w, g)


_lowp_matmul.defvjp(_lowp_matmul_fwd, _lowp_matmul_bwd)


def dense(linear: eqx.nn.Linear, x: Float[Array, "*batch din"]) -> Float[Array, "*batch dout"]:
    """Apply a Linear to any number of leading axes; the result has the input's dtype.

    The product accumulates in float32 and the bias is added in float32 before the one rounding
    to a bf16 input's dtype (in fp32 this is the plain product). On CPU this is also what makes
    XLA run a bf16 matmul natively (avx512_bf16): measured 385-440 GFLOP/s against 175-195 for
    a bf16-output product, which XLA computes in float32."""
    w = linear.weight.T.astype(x.dtype)
    if x.dtype == jnp.float32:
        y = x @ w
    else:
        y = _lowp_matmul(x, w)
    if linear.bias is not None:
        y = y + linear.bias.astype(jnp.float32)
    return y.astype(x.dtype)


def layer_norm(
    x: Float[Array, "*batch dim"],
    eps: float,
    weight: Float[Array, " dim"] | None = None,
    bias: Float[Array, " dim"] | None = None,
) -> Float[Array, "*batch dim"]:
    """LayerNorm over the last axis, computed in float32 whatever the input dtype."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def multihead_attention(
    q: Float[Array, "tokens heads hd"],
    k: Float[Array, "tokens heads hd"],
    v: Float[Array, "tokens heads hd"],
) -> Float[Array, "tokens heads hd"]:
    """Softmax attention, logits and softmax in float32."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("qhd,khd->hqk", q, k, preferred_element_type=jnp.float32) * scale
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("hqk,khd->qhd", weights, v)
