"""What REPA trains: a SiT plus one alignment head (REPA: a projector) per target encoder."""

import equinox as eqx
import jax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ..alignment import get_method
from .sit import SiT, SiTConfig


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
        alignment: str = "repa",
    ):
        k_sit, k_proj = jax.random.split(key)
        self.sit = SiT(config, key=k_sit)
        method = get_method(alignment)
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
        v, hidden = self.sit(x, t, y, key=key, remat=remat)
        return v, tuple(p(hidden) for p in self.projectors)

    def velocity(self, x: Float[Array, "c h w"], t: Float[Array, ""], y: Int[Array, ""]):
        """The velocity field alone, for samplers (no label dropout, no projector work)."""
        return self.sit(x, t, y)[0]
