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


# Low-precision products on CPU. XLA:CPU (YNNPACK) multiplies bf16 natively, with float32
# accumulation, only when both operands are row-major in the "x (M, K) @ w (K, N)" sense:
# measured 365-420 GFLOP/s on this project's Zen 4, against 145-200 when the weight is read
# transposed (x @ W.T with a stored (out, in) W, e.g. sliced from the layer stack in a scan;
# a W just cast from float32 is a fresh buffer XLA lays out itself) and 125-175 when
# the contracted axis is the leading one of a 2-D operand (the weight gradient x.T @ g, which
# XLA then computes in float32). So: the forward takes the weight already laid out (in, out)
# where the caller can provide it (`lay_out_for_lowp`), the input gradient g @ W reads the
# stored (out, in) weight as it is, and the weight gradient contracts g and x over all their
# leading axes at once (batch and tokens under the models' vmap), a contraction XLA lays out
# for the fast kernel itself.


@jax.custom_vjp
def _lowp_dense(x: Array, w: Array, wt: Array) -> Array:
    """x @ w.T for bf16 (or f16) operands, accumulated and returned in float32. `w` is the
    (out, in) weight, `wt` the same numbers laid out (in, out); the forward reads `wt`, the
    backward `w`, and only `w` receives a gradient. Without this rule JAX differentiates the
    product against a float32 cotangent, and XLA runs those mixed products in float32."""
    return jnp.matmul(x, wt, preferred_element_type=jnp.float32)


def _lowp_dense_fwd(x, w, wt):
    return _lowp_dense(x, w, wt), (x, w)


def _lowp_dense_grads_impl(x, w, g):
    g = g.astype(x.dtype)
    dx = jnp.matmul(g, w, preferred_element_type=jnp.float32)
    # Every leading axis of x is summed over for the weight's gradient, in one contraction.
    lead = tuple(range(x.ndim - 1))
    dw = jax.lax.dot_general(g, x, ((lead, lead), ((), ())), preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


@jax.custom_batching.custom_vmap
def _lowp_dense_grads(x, w, g):
    return _lowp_dense_grads_impl(x, w, g)


@_lowp_dense_grads.def_vmap
def _lowp_dense_grads_vmap(axis_size, in_batched, x, w, g):
    # The models run one example per call under jax.vmap, so the backward pass is vmapped too.
    # A vmapped x (and g) is just more leading axes: the weight gradient is then one
    # contraction over the whole batch, returned unbatched, where a plainly vmapped backward
    # would make one weight gradient per example and sum them.
    x_batched, w_batched, g_batched = in_batched
    if x_batched and g_batched and not w_batched:
        return _lowp_dense_grads_impl(x, w, g), (True, False)
    axes = tuple(0 if b else None for b in in_batched)
    return jax.vmap(_lowp_dense_grads_impl, in_axes=axes)(x, w, g), (True, True)


def _lowp_dense_bwd(residuals, g):
    x, w = residuals
    dx, dw = _lowp_dense_grads(x, w, g)
    return dx, dw, None  # `wt` is a layout of `w`: its gradient is w's


_lowp_dense.defvjp(_lowp_dense_fwd, _lowp_dense_bwd)


class LaidOutLinear(eqx.Module):
    """A low-precision Linear that also carries its weight laid out (in, out) for the forward
    product (see above). Built by `lay_out_for_lowp`; `dense` accepts it like a Linear."""

    weight: Array  # (out, in): the parameter, read by the backward pass
    weight_t: Array  # (in, out): the same numbers, no gradient
    bias: Array | None


def lay_out_for_lowp(tree):
    """Every bf16/f16 `eqx.nn.Linear` in `tree` (stacked ones too) as a `LaidOutLinear`; float32
    ones are left as they are. Call it outside a `lax.scan` over layers and scan over the
    result: the transposed copy is made once, and XLA cannot fold it back into the product."""

    def convert(node):
        if not isinstance(node, eqx.nn.Linear) or node.weight.dtype == jnp.float32:
            return node
        weight_t = jax.lax.stop_gradient(jnp.swapaxes(node.weight, -1, -2))
        return LaidOutLinear(node.weight, weight_t, node.bias)

    return jax.tree.map(convert, tree, is_leaf=lambda n: isinstance(n, eqx.nn.Linear))


def dense(
    linear: eqx.nn.Linear | LaidOutLinear, x: Float[Array, "*batch din"]
) -> Float[Array, "*batch dout"]:
    """Apply a Linear to any number of leading axes; the result has the input's dtype.

    The product accumulates in float32 and the bias is added in float32 before the one rounding
    to a bf16 input's dtype (in fp32 this is the plain product)."""
    w = linear.weight.astype(x.dtype)
    if x.dtype == jnp.float32:
        y = x @ w.T
    else:
        wt = linear.weight_t if isinstance(linear, LaidOutLinear) else w.T
        y = _lowp_dense(x, w, wt.astype(x.dtype))
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
