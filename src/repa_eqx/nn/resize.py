"""PyTorch's bicubic resize (`F.interpolate(mode="bicubic", align_corners=False)`) in JAX.

The resize is separable, so it is two small matrices, one per spatial axis, built in
NumPy float64 when the function is traced and applied with one einsum.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Shaped

# PyTorch's cubic convolution coefficient: -0.75 without antialias (OpenCV's choice),
# -0.5 with it (Pillow's choice, which PyTorch's antialiased kernel copies).
_A_PLAIN = -0.75
_A_ANTIALIAS = -0.5


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel, support [-2, 2]."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def sample_positions(n_in: int, n_out: int, offset: float) -> tuple[float, np.ndarray]:
    """Scale and sampling positions `scale * (i + 0.5) - offset` on the input axis.

    PyTorch computes these in float32 (a float32 scale, one rounding of the fused
    multiply-add); doing the same keeps large resizes equal to it, where float64
    positions move some weights by 2e-5 (e.g. 384 -> 224).
    """
    scale = float(np.float32(n_in) / np.float32(n_out))
    exact = scale * (np.arange(n_out) + 0.5) - offset
    return scale, exact.astype(np.float32).astype(np.float64)


def _plain_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of PyTorch's bicubic resize without antialias."""
    _, src = sample_positions(n_in, n_out, offset=0.5)  # not clamped at 0: border taps do it
    left = np.floor(src).astype(np.int64)
    t = src - left
    weights = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    for tap in range(-1, 3):
        # Taps outside the image read the border pixel.
        col = np.clip(left + tap, 0, n_in - 1)
        np.add.at(weights, (rows, col), _cubic(tap - t, _A_PLAIN))
    return weights


def _antialias_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of PyTorch's antialiased bicubic resize.

    When shrinking, the kernel is stretched by the shrink factor so every input pixel
    contributes; taps that fall outside the image are dropped and each row of weights
    is renormalised to sum to one.
    """
    scale, centres = sample_positions(n_in, n_out, offset=0.0)
    stretch = max(scale, 1.0)
    support = 2.0 * stretch
    weights = np.zeros((n_out, n_in))
    for i, centre in enumerate(centres):
        # PyTorch truncates these bounds towards zero (C++ int casts).
        lo = max(math.trunc(centre - support + 0.5), 0)
        hi = min(math.trunc(centre + support + 0.5), n_in)
        taps = np.arange(lo, hi)
        w = _cubic((taps - centre + 0.5) / stretch, _A_ANTIALIAS)
        weights[i, lo:hi] = w / w.sum()
    return weights


def resize_matrix(n_in: int, n_out: int, *, antialias: bool) -> np.ndarray:
    """The (n_out, n_in) float64 matrix that resizes one axis like PyTorch's bicubic."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"cannot resize an axis of length {n_in} to {n_out}")
    if antialias:
        return _antialias_weights(n_in, n_out)
    return _plain_weights(n_in, n_out)


def resize_bicubic(
    x: Shaped[Array | np.ndarray, "*batch H W"], size: tuple[int, int], *, antialias: bool
) -> Float[Array, "*batch h w"]:
    """Bicubic resize of the two last axes to `size`.

    Equals `torch.nn.functional.interpolate(x, size=size, mode="bicubic",
    align_corners=False, antialias=antialias)` on (..., H, W) arrays, to float32 rounding.
    The output has the input's floating dtype (float32 for integer input).
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    height, width = x.shape[-2:]
    rows = jnp.asarray(resize_matrix(height, size[0], antialias=antialias), dtype=x.dtype)
    cols = jnp.asarray(resize_matrix(width, size[1], antialias=antialias), dtype=x.dtype)
    return jnp.einsum("...hw,Hh,Ww->...HW", x, rows, cols, precision=jax.lax.Precision.HIGHEST)
