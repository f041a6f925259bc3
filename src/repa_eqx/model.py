"""What REPA trains: a SiT plus one projector per target encoder."""

import equinox as eqx
import jax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .projector import Projector
from .sit import SiT, SiTConfig


class REPAModel(eqx.Module):
    sit: SiT
    projectors: tuple[Projector, ...]

    def __init__(
        self,
        config: SiTConfig,
        z_dims: tuple[int, ...],
        projector_dim: int = 2048,
        *,
        key: PRNGKeyArray,
    ):
        k_sit, k_proj = jax.random.split(key)
        self.sit = SiT(config, key=k_sit)
        self.projectors = tuple(
            Projector(config.hidden_size, z, projector_dim, key=k)
            for z, k in zip(z_dims, jax.random.split(k_proj, len(z_dims)), strict=True)
        )

    def __call__(
        self,
        x: Float[Array, "c h w"],
        t: Float[Array, ""],
        y: Int[Array, ""],
        *,
        key: PRNGKeyArray | None = None,
        remat: str = "none",
    ) -> tuple[Float[Array, "c h w"], tuple[Float[Array, "tokens z"], ...]]:
        """Velocity prediction and the projected hidden state for each target encoder."""
        v, hidden = self.sit(x, t, y, key=key, remat=remat)
        return v, tuple(p(hidden) for p in self.projectors)

    def velocity(self, x: Float[Array, "c h w"], t: Float[Array, ""], y: Int[Array, ""]):
        """The velocity field alone, for samplers (no label dropout, no projector work)."""
        return self.sit(x, t, y)[0]
