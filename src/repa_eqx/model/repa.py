"""What REPA trains: a SiT plus one alignment head (REPA: a projector) per target encoder."""

from typing import NamedTuple

import equinox as eqx
import jax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ..alignment import AlignmentMethod, get_method
from .sit import SiT, SiTConfig


class ModelOutputs(NamedTuple):
    output: Float[Array, "c_out h w"]
    projected: tuple[Float[Array, "tokens _z"], ...]  # one per target encoder
    hidden: tuple[Float[Array, "tokens hidden"], ...]  # after each tapped block
    attention: tuple[Float[Array, "heads tokens tokens"], ...]  # logits of each block asked
    cls: Float[Array, " cls_dim"] | None = None  # REG: the CLS token's velocity


class REPAModel(eqx.Module):
    sit: SiT
    projectors: tuple[eqx.Module, ...]  # the alignment method's heads, one per target encoder

    def __init__(
        self,
        config: SiTConfig,
        z_dims: tuple[int, ...],
        projector_dim: int = 2048,
        *,
        key: PRNGKeyArray,
        alignment: str | AlignmentMethod = "repa",
    ):
        k_sit, k_proj = jax.random.split(key)
        self.sit = SiT(config, key=k_sit)
        method = get_method(alignment) if isinstance(alignment, str) else alignment
        self.projectors = method.heads(config.hidden_size, z_dims, projector_dim, key=k_proj)

    def __call__(
        self,
        x: Float[Array, "c h w"],
        t: Float[Array, ""],
        y: Int[Array, ""],
        *,
        key: PRNGKeyArray | None = None,
        remat: str = "none",
    ) -> tuple[Float[Array, "c_out h w"], tuple[Float[Array, "tokens _z"], ...]]:
        """Velocity prediction and the projected hidden state for each target encoder."""
        out = self.forward(x, t, y, key=key, remat=remat)
        return out.output, out.projected

    def forward(
        self,
        x: Float[Array, "c h w"],
        t: Float[Array, ""],
        y: Int[Array, ""],
        *,
        key: PRNGKeyArray | None = None,
        remat: str = "none",
        taps: tuple[int, ...] = (),
        attention: tuple[int, ...] = (),
        cls: Float[Array, " cls_dim"] | None = None,
    ) -> "ModelOutputs":
        """`__call__` plus the raw hidden states after the blocks `taps` (the dispersive
        loss) and the attention logits of the blocks `attention` (HASTE), 1-based; a REG
        model takes its noisy CLS token `cls` and returns that token's velocity too (its
        heads then see the CLS token first, as REG's projector does)."""
        depth = self.sit.config.encoder_depth
        out = self.sit.forward(
            x, t, y, key=key, remat=remat, depths=(depth, *taps), attention=attention, cls=cls
        )
        projected = tuple(p(out.hidden[0]) for p in self.projectors)
        return ModelOutputs(out.output, projected, out.hidden[1:], out.attention, out.cls)

    def velocity(self, x: Float[Array, "c h w"], t: Float[Array, ""], y: Int[Array, ""]):
        """The velocity field alone, for samplers (no label dropout, no projector work)."""
        return self.sit(x, t, y)[0]
