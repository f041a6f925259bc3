"""Small building blocks shared by the ported and trained networks.

Attention (`multihead_attention`): which implementation runs is decided at trace time, from
the backend (`jax.default_backend()`) and the dtype (`attention_implementation`):

- GPU: `jax.nn.dot_product_attention`, with cuDNN's fused kernel for bf16/f16 on GPUs of
  compute capability 8.0 or more and head dims it takes (multiples of 8 up to 128), else its
  XLA implementation, the same products as the einsums below (tested on CPU to agree).
- CPU, bf16, at least 8 tokens and a head dim of 8 or more: `_lowp_attention`, a custom VJP
  whose six products all take bf16 operands with float32 accumulation, each in the one form
  XLA:CPU's native kernel (YNNPACK) accepts: batch (head) axes leading, the left operand
  contracted over its last axis, row-major operands, no matrix-vector products. XLA hands
  every other form to its generic dot, which cannot multiply bf16 x bf16 into float32
  ("Unsupported element type for DotThunk::Execute"). Keeping the probabilities keys-first,
  (heads, keys, queries), makes the softmax gradient and all four backward products such
  forms without transposing a tokens x tokens matrix: only (tokens, head dim) operands are.
- Otherwise (float32 off GPU, other dtypes, tiny shapes): two einsums, logits and softmax in
  float32. Float32 on CPU is exactly this path, so its numbers are unchanged.

HASTE's logits (`SiTBlock.attend(logits=True)`) are computed beside the attention by the
logits einsum, whichever path runs.
"""

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


def rms_norm(
    x: Float[Array, "*batch dim"], eps: float, weight: Float[Array, " dim"] | None = None
) -> Float[Array, "*batch dim"]:
    """RMSNorm over the last axis, x / sqrt(mean(x^2) + eps) (* weight), in float32."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)
    if weight is not None:
        y = y * weight.astype(jnp.float32)
    return y.astype(x.dtype)


# The native kernel refuses matrix-vector products and tiny ones; below these sizes the
# einsum path runs (bf16 products in float32 there cost nothing that matters).
_LOWP_MIN_TOKENS = 8
_LOWP_MIN_HEAD_DIM = 8


def _per_head(a: Array, b: Array, contract_b: int) -> Array:
    """Per head (axis 0): a (heads, M, K) times b, contracted over a's last axis and b's axis
    `contract_b` (1: b is (heads, K, N); 2: b is (heads, N, K)); float32 result."""
    dims = (((2,), (contract_b,)), ((0,), (0,)))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _lowp_probabilities(q: Array, k: Array) -> Array:
    """softmax(q.k / sqrt(d)) in float32, keys first: (heads, keys, queries)."""
    logits_t = _per_head(k.transpose(1, 0, 2), q.transpose(1, 0, 2), 2)
    return jax.nn.softmax(logits_t * q.shape[-1] ** -0.5, axis=1)


@jax.custom_vjp
def _lowp_attention(q: Array, k: Array, v: Array) -> Array:
    """Softmax attention for bf16 q, k, v (tokens, heads, hd) on CPU (see above)."""
    return _lowp_attention_fwd(q, k, v)[0]


def _lowp_attention_fwd(q, k, v):
    p_t = _lowp_probabilities(q, k)
    # out^T (heads, hd, queries) = v^T (hd, keys) @ p^T (keys, queries)
    out_t = _per_head(v.transpose(1, 2, 0), p_t.astype(v.dtype), 1)
    return out_t.transpose(2, 0, 1).astype(v.dtype), (q, k, v, p_t)


def _lowp_attention_bwd(residuals, g):
    q, k, v, p_t = residuals
    dtype = v.dtype
    g_t = g.astype(dtype).transpose(1, 2, 0)  # (heads, hd, queries)
    # dv (heads, keys, hd) = p^T (keys, queries) @ g (queries, hd), g read as (hd, queries)
    dv = _per_head(p_t.astype(dtype), g_t, 2)
    # dp^T (heads, keys, queries) = v (keys, hd) @ g^T (hd, queries)
    dp_t = _per_head(v.transpose(1, 0, 2), g_t, 1)
    # The softmax's gradient in float32, the sum over keys (axis 1); then the logits' scale.
    ds_t = p_t * (dp_t - jnp.sum(p_t * dp_t, axis=1, keepdims=True)) * q.shape[-1] ** -0.5
    ds_t = ds_t.astype(dtype)
    # dq^T (heads, hd, queries) = k^T (hd, keys) @ ds^T (keys, queries)
    dq_t = _per_head(k.transpose(1, 2, 0), ds_t, 1)
    # dk (heads, keys, hd) = ds^T (keys, queries) @ q (queries, hd)
    dk = _per_head(ds_t, q.transpose(1, 0, 2), 1)
    return (
        dq_t.transpose(2, 0, 1).astype(dtype),
        dk.transpose(1, 0, 2).astype(dtype),
        dv.transpose(1, 0, 2).astype(dtype),
    )


_lowp_attention.defvjp(_lowp_attention_fwd, _lowp_attention_bwd)


def attention_implementation(dtype, tokens: int, head_dim: int, backend: str | None = None) -> str:
    """Which attention `multihead_attention` runs: "cudnn" or "xla" (GPU, through
    `jax.nn.dot_product_attention`), "lowp" (bf16 on CPU) or "einsum". `backend`: default
    `jax.default_backend()`."""
    backend = jax.default_backend() if backend is None else backend
    dtype = jnp.dtype(dtype)
    if backend in ("gpu", "cuda"):
        fused = dtype in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128
        return "cudnn" if fused and _cudnn_capable() else "xla"
    if (
        backend == "cpu"
        and dtype == jnp.bfloat16
        and tokens >= _LOWP_MIN_TOKENS
        and head_dim >= _LOWP_MIN_HEAD_DIM
    ):
        return "lowp"
    return "einsum"


def _cudnn_capable() -> bool:
    """The first GPU is an NVIDIA one of compute capability 8.0 or more (cuDNN's fused
    attention)."""
    device = jax.devices()[0]
    try:
        major = int(str(getattr(device, "compute_capability", "")).split(".")[0])
    except ValueError:
        return False
    return major >= 8


def multihead_attention(
    q: Float[Array, "tokens heads hd"],
    k: Float[Array, "tokens heads hd"],
    v: Float[Array, "tokens heads hd"],
) -> Float[Array, "tokens heads hd"]:
    """Softmax attention, logits and softmax in float32 (the implementation by backend and
    dtype: `attention_implementation`)."""
    tokens, _, head_dim = q.shape
    implementation = attention_implementation(q.dtype, tokens, head_dim)
    if implementation in ("cudnn", "xla"):
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    if implementation == "lowp":
        return _lowp_attention(q, k, v)
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("qhd,khd->hqk", q, k, preferred_element_type=jnp.float32) * scale
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("hqk,khd->qhd", weights, v)
