"""Dispersive loss (Wang & He, arXiv 2506.09027, raywang4/DispLoss): an encoder-free
regulariser that spreads a block's hidden states apart, "contrastive learning without
positive pairs". The InfoNCE-L2 form, the one the released code implements:

    D_ij = |z_i - z_j|^2 / dim         (each example's hidden state flattened, dim = tokens x width)
    loss = log mean_{i, j} exp(-D_ij / tau)      (over all B x B pairs, the diagonal included)

The released PyTorch code uses the last block's output (before the final norm), tau = 1 and
weight 0.25, on each GPU's local batch; the paper's JAX runs used block depth // 4, tau 0.5,
weight 0.5. `group` splits the batch into groups of that many examples and averages their
losses: a group of the reference's per-GPU batch reproduces it on any number of devices.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ..core.errors import ConfigError


def dispersive_loss(
    hidden: Float[Array, "batch ..."], tau: float = 1.0, group: int = 0
) -> Float[Array, ""]:
    """The InfoNCE-L2 dispersive loss of a batch of hidden states (fp32); `group` 0: the
    whole batch is one group."""
    batch = hidden.shape[0]
    size = group or batch
    if batch % size:
        raise ConfigError(f"dispersive loss: a batch of {batch} does not split in groups of {size}")
    z = hidden.reshape(batch // size, size, -1).astype(jnp.float32)
    dim = z.shape[-1]
    # Squared distances from the Gram matrix (no |z_i - z_j| tensor of B x B x dim, and no
    # square root whose gradient is NaN at the diagonal's zero distance).
    sq = jnp.sum(jnp.square(z), axis=-1)
    gram = jnp.einsum("gid,gjd->gij", z, z, precision=jax.lax.Precision.HIGHEST)
    dist = jnp.maximum(sq[:, :, None] + sq[:, None, :] - 2 * gram, 0.0)
    dist = jnp.where(jnp.eye(size, dtype=bool), 0.0, dist) / dim
    per_group = jax.nn.logsumexp(-dist / tau, axis=(1, 2)) - 2 * jnp.log(size)
    return per_group.mean()


@dataclasses.dataclass(frozen=True)
class Dispersive:
    """The dispersive term of an objective: coeff * dispersive_loss of the hidden state after
    block `block` (1-based)."""

    block: int
    coeff: float = 0.25
    tau: float = 1.0
    group: int = 0

    def loss(self, hidden: Float[Array, "batch tokens width"]) -> Float[Array, ""]:
        return dispersive_loss(hidden, self.tau, self.group)
