"""iREPA (arXiv 2512.10794, End2End-Diffusion/iREPA): REPA with two changes that keep the
spatial structure of the target. The head is one convolution over the token grid instead of
the MLP, and the target features are z-scored over the tokens of each image, with only a
fraction `alpha` of their mean removed:

    target = (z - alpha * mean_tokens(z)) / (std_tokens(z) + eps)      (std with ddof 1)

The loss is REPA's (minus the cosine similarity); the authors' recipes use coefficient 1.0.
The released trainer (`ldm/train.py`) defaults the kernel to 1 (choices 1, 3, 5, 7; its README
shows 3) and alpha to 0.6.
"""

import dataclasses
import math
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ..core.errors import ConfigError
from .base import AlignmentMethod
from .repa import repa_loss

KERNEL_SIZES = (1, 3, 5, 7)


class ConvProjector(eqx.Module):
    """Conv2d(hidden -> z_dim, k x k, stride 1, zero padding k // 2, with bias) over the
    row-major token grid. Initialised as PyTorch's default (and Equinox's): weight and bias
    uniform in +-1/sqrt(hidden * k * k), as the reference leaves it."""

    conv: eqx.nn.Conv2d

    def __init__(self, hidden: int, z_dim: int, kernel_size: int, *, key: PRNGKeyArray):
        self.conv = eqx.nn.Conv2d(
            hidden, z_dim, kernel_size, stride=1, padding=kernel_size // 2, key=key
        )

    def __call__(self, h: Float[Array, "tokens hidden"]) -> Float[Array, "tokens z_dim"]:
        tokens, hidden = h.shape
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ConfigError(f"iREPA's convolution needs a square token grid, got {tokens} tokens")
        grid = h.reshape(side, side, hidden).transpose(2, 0, 1)  # (hidden, rows, cols)
        out = self.conv(grid)  # (z_dim, rows, cols)
        return out.reshape(out.shape[0], tokens).T


def spatial_zscore(
    features: Float[Array, "batch tokens dim"], alpha: float = 0.6, eps: float = 1e-6
) -> Float[Array, "batch tokens dim"]:
    """Each image's features standardised over its tokens, per channel, removing `alpha` of
    the mean (fp32)."""
    z = features.astype(jnp.float32)
    mean = z.mean(axis=1, keepdims=True)
    std = z.std(axis=1, keepdims=True, ddof=1)
    return (z - alpha * mean) / (std + eps)


@dataclasses.dataclass(frozen=True)
class IREPA(AlignmentMethod):
    """`ConvProjector` heads, spatially z-scored targets, REPA's cosine loss."""

    kernel_size: int = 1
    alpha: float = 0.6
    eps: float = 1e-6

    name = "irepa"
    loss_name = "repa_loss"  # the same quantity as REPA's: minus the mean cosine similarity

    def __post_init__(self):
        if self.kernel_size not in KERNEL_SIZES:
            raise ConfigError(
                f"iREPA kernel_size must be one of {KERNEL_SIZES}, got {self.kernel_size}"
            )

    def heads(self, hidden_size, z_dims, width, *, key):
        keys = jax.random.split(key, len(z_dims))
        return tuple(
            ConvProjector(hidden_size, z, self.kernel_size, key=k)
            for z, k in zip(z_dims, keys, strict=True)
        )

    def targets(self, features: Sequence[Float[Array, "batch tokens _dim"]]):
        return tuple(spatial_zscore(f, self.alpha, self.eps) for f in features)

    def loss(self, projected, targets):
        return repa_loss(projected, targets)
