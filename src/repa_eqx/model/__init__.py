"""The networks repa-eqx trains: the SiT (DiT with a learned variance) and `REPAModel`, a SiT
with the heads of an alignment method. Pure JAX, one unbatched example per call."""

from .repa import REPAModel as REPAModel
from .sit import SiT as SiT
from .sit import SiTConfig as SiTConfig
