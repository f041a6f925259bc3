"""How well a diffusion transformer's hidden states align with a target representation: the
mutual k-NN kernel alignment (CKNNA) of REPA's Fig. 2 and a linear probe on frozen features.

`cknna` and `linear_probe` take feature arrays; `sit_features` ties them to the SiT.
"""

import dataclasses
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ..core.errors import ConfigError
from ..diffusion.ddpm import NUM_TIMESTEPS, Schedule, q_sample
from ..diffusion.interpolants import PathType, coefficients, interpolate
from ..model.sit import SiT, slice_blocks

_HIGHEST = jax.lax.Precision.HIGHEST
Features = Array | np.ndarray  # host functions take either

# ------------------------------------------------------------------------------- CKNNA


def _hsic_unbiased(kern_a: Float[Array, "n n"], kern_b: Float[Array, "n n"]) -> Float[Array, ""]:
    """Song et al. (2012), eq. 5, on kernels K, L with zeroed diagonals:
    [tr(KL) + 1'K1 1'L1 / ((n-1)(n-2)) - 2/(n-2) 1'KL1] / (n(n-3)).
    tr(KL) is written sum(K * L^T): the masked kernels are not symmetric."""
    n = kern_a.shape[0]
    off_diagonal = 1 - jnp.eye(n, dtype=kern_a.dtype)
    kern_a, kern_b = kern_a * off_diagonal, kern_b * off_diagonal
    trace = jnp.sum(kern_a * kern_b.T)
    sums = jnp.sum(kern_a) * jnp.sum(kern_b) / ((n - 1) * (n - 2))
    cross = 2 * jnp.sum(jnp.matmul(kern_a, kern_b, precision=_HIGHEST)) / (n - 2)
    return (trace + sums - cross) / (n * (n - 3))


def _knn_mask(kernel: Float[Array, "n n"], k: int) -> Float[Array, "n n"]:
    """1 where column j is among row i's k most similar rows, the row itself excluded."""
    n = kernel.shape[0]
    _, idx = jax.lax.top_k(jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, kernel), k)
    return jnp.zeros_like(kernel).at[jnp.arange(n)[:, None], idx].set(1)


@functools.partial(jax.jit, static_argnames=("k", "normalize"))
def _cknna(a, b, k: int, normalize: bool) -> Float[Array, ""]:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    if normalize:
        a = a / jnp.linalg.norm(a, axis=1, keepdims=True)
        b = b / jnp.linalg.norm(b, axis=1, keepdims=True)
    kernel_a = jnp.matmul(a, a.T, precision=_HIGHEST)
    kernel_b = jnp.matmul(b, b.T, precision=_HIGHEST)
    mask_a, mask_b = _knn_mask(kernel_a, k), _knn_mask(kernel_b, k)
    mutual = mask_a * mask_b
    ab = _hsic_unbiased(mutual * kernel_a, mutual * kernel_b)
    aa = _hsic_unbiased(mask_a * kernel_a, mask_a * kernel_a)
    bb = _hsic_unbiased(mask_b * kernel_b, mask_b * kernel_b)
    return ab / jnp.sqrt(aa * bb)


def cknna(
    a: Float[Features, "n dim_a"],
    b: Float[Features, "n dim_b"],
    *,
    k: int = 10,
    normalize: bool = True,
) -> float:
    """Centred kernel nearest-neighbour alignment (Huh et al., "The Platonic Representation
    Hypothesis", ICML 2024), `AlignmentMetrics.cknna(..., distance_agnostic=False,
    unbiased=True)` of minyoungg/platonic-rep: the alignment REPA's Fig. 2 plots.

    With linear kernels K = A A', L = B B' (rows L2-normalised first when `normalize`, as
    platonic-rep's `compute_score` does), M_K[i, j] = 1 when j is one of the k rows most
    similar to i under K (i itself excluded), likewise M_L, and HSIC the unbiased estimator:

        CKNNA = HSIC(M_K M_L K, M_K M_L L) / sqrt(HSIC(M_K K, M_K K) HSIC(M_L L, M_L L))

    (products elementwise). 1 for identical neighbourhood structure, about 0 for independent
    representations; invariant to rotating or rescaling either side. Two departures from the
    reference: no `+ 1e-6` in the denominator (it breaks scale invariance and keeps a
    representation's alignment with itself below 1), and no outlier clamping (their
    `prepare_features` clips each feature at the 95th percentile of |value|; do that before
    calling if you want it).
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.ndim != 2 or b.ndim != 2 or len(a) != len(b):
        raise ValueError(f"need two [n, dim] arrays with the same n, got {a.shape} and {b.shape}")
    if not 2 <= k < len(a) or len(a) < 4:
        raise ValueError(f"need 2 <= k < n and n >= 4, got k={k}, n={len(a)}")
    return float(_cknna(a, b, k, normalize))


# -------------------------------------------------------------------------- linear probe


@functools.partial(jax.jit, static_argnames=("num_classes", "steps", "batch_size"))
def _probe(train_x, train_y, test_x, test_y, lr, weight_decay, key, num_classes, steps, batch_size):
    mean = jnp.mean(train_x, axis=0, keepdims=True)
    std = jnp.std(train_x, axis=0, keepdims=True) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    # A convex problem: zero initial weights lose nothing and make the seed only pick batches.
    params = (jnp.zeros((train_x.shape[1], num_classes)), jnp.zeros((1, num_classes)))
    # Decay the weights only, not the biases.
    optimiser = optax.adamw(lr, weight_decay=weight_decay, mask=(True, False))

    def loss(params, x, y):
        w, bias = params
        logits = jnp.matmul(x, w, precision=_HIGHEST) + bias
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(carry, key):
        params, state = carry
        if batch_size is None:
            x, y = train_x, train_y
        else:
            idx = jax.random.choice(key, len(train_x), (batch_size,), replace=False)
            x, y = train_x[idx], train_y[idx]
        grads = jax.grad(loss)(params, x, y)
        updates, state = optimiser.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(
        step, (params, optimiser.init(params)), jax.random.split(key, steps)
    )
    w, bias = params
    predictions = jnp.argmax(jnp.matmul(test_x, w, precision=_HIGHEST) + bias, axis=1)
    return jnp.mean((predictions == test_y).astype(jnp.float32))


def linear_probe(
    train_x: Float[Features, "n dim"],
    train_y: Int[Features, " n"],
    test_x: Float[Features, "m dim"],
    test_y: Int[Features, " m"],
    *,
    num_classes: int,
    steps: int = 500,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    batch_size: int | None = None,
    seed: int = 0,
) -> float:
    """Top-1 test accuracy of multinomial logistic regression on frozen features.

    Features are standardised with the training set's mean and std; AdamW runs `steps` steps
    on the full training set, or on `batch_size` rows drawn without replacement each step.
    """
    train_x = jnp.asarray(train_x, jnp.float32)
    test_x = jnp.asarray(test_x, jnp.float32)
    train_y, test_y = jnp.asarray(train_y, jnp.int32), jnp.asarray(test_y, jnp.int32)
    if train_x.ndim != 2 or test_x.shape[1:] != train_x.shape[1:]:
        raise ValueError(f"need [n, dim] features, got {train_x.shape} and {test_x.shape}")
    if train_y.shape != train_x.shape[:1] or test_y.shape != test_x.shape[:1]:
        raise ValueError("need one label per feature row")
    if batch_size is not None and not 1 <= batch_size <= len(train_x):
        raise ValueError(f"batch_size {batch_size} not in [1, {len(train_x)}]")
    accuracy = _probe(
        train_x,
        train_y,
        test_x,
        test_y,
        jnp.float32(lr),
        jnp.float32(weight_decay),
        jax.random.key(seed),
        num_classes,
        steps,
        batch_size,
    )
    return float(accuracy)


# --------------------------------------------------------------------------- SiT features


def _tapped(sit: SiT, layer: int) -> SiT:
    """The SiT cut after block `layer`, which is then its `encoder_depth`: same weights,
    hidden state tapped at `layer`, and no blocks after it run."""
    config = dataclasses.replace(sit.config, depth=layer, encoder_depth=layer)
    # The config is a static field, which `eqx.tree_at` cannot reach: pour the (truncated)
    # leaves into the structure of a model built, shapes only, from the new config.
    skeleton = eqx.filter_eval_shape(SiT, config, key=jax.random.key(0))
    truncated = eqx.tree_at(lambda s: s.blocks, sit, slice_blocks(sit.blocks, 0, layer))
    return jax.tree.unflatten(jax.tree.structure(skeleton), jax.tree.leaves(truncated))


@functools.partial(jax.jit, static_argnames="shape")
def _noise(key: PRNGKeyArray, index: Int[Array, " n"], shape: tuple[int, ...]):
    # Compiled apart from the model: sampling is slow to compile, and is the same whatever
    # the layer or pooling.
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape))(index)


@eqx.filter_jit
def _features_chunk(sit: SiT, x, noise, t, layer: int, path: PathType, pool: bool, cls_noise):
    # Cut inside the trace: slicing the stacked blocks eagerly would compile op by op.
    model = _tapped(sit, layer)

    def one(x, noise, t, cls_noise):
        if sit.config.learn_sigma:  # a DiT: DDPM noise at step 1000 t, fed that step
            step = jnp.minimum(jnp.round(t * NUM_TIMESTEPS), NUM_TIMESTEPS - 1).astype(jnp.int32)
            x_t, t = q_sample(Schedule.linear(), x, step, noise), step.astype(jnp.float32)
        else:
            x_t, _ = interpolate(path, x, noise, t)
        # REG: a CLS token that knows nothing of the image either, sigma_t eps.
        cls = None if cls_noise is None else coefficients(path, t).sigma * cls_noise
        # The null label: no class information reaches the features.
        hidden = model(x_t, t, jnp.asarray(model.null_label), cls=cls)[1].astype(jnp.float32)
        hidden = hidden if cls is None else hidden[1:]  # the patch tokens
        return jnp.mean(hidden, axis=0) if pool else hidden

    return jax.vmap(one)(x, noise, t, cls_noise)


def sit_features(
    sit: SiT,
    x: Float[Features, "n c h w"],
    t: float | Float[Features, ""] | Float[Features, " n"],
    *,
    layer: int,
    key: PRNGKeyArray,
    path: PathType = "linear",
    pool: bool = True,
    batch_size: int = 256,
) -> Float[Array, "n hidden"] | Float[Array, "n tokens hidden"]:
    """A SiT's hidden state after block `layer` (1-based) on x_t = alpha_t x + sigma_t eps,
    with the null label; float32, mean-pooled over tokens when `pool`. A DiT (`learn_sigma`)
    sees its own DDPM noise at step round(1000 t) (at most 999) instead. A REG SiT gets the CLS
    token sigma_t eps (no image information, like the null label) and returns the patch
    tokens alone.

    Example i's noise is drawn from `fold_in(key, i)`, so the result does not depend on
    `batch_size`, the number of examples run at a time to bound the memory.
    """
    if not 1 <= layer <= sit.config.depth:
        raise ConfigError(f"layer {layer} not in [1, depth={sit.config.depth}]")
    # Chunks are cut on the host: eager slices of device arrays compile one op per offset.
    x = np.asarray(x, np.float32)
    t = np.broadcast_to(np.asarray(t, np.float32), x.shape[:1])
    index = np.arange(len(x), dtype=np.int32)
    parts = []
    for lo in range(0, len(x), batch_size):
        chunk = slice(lo, lo + batch_size)
        noise = _noise(key, index[chunk], x.shape[1:])
        cls_noise = None
        if sit.config.cls_dim:
            cls_noise = _noise(
                jax.random.fold_in(key, 0x7FFFFFFF), index[chunk], (sit.config.cls_dim,)
            )
        parts.append(_features_chunk(sit, x[chunk], noise, t[chunk], layer, path, pool, cls_noise))
    return jnp.concatenate(parts)
