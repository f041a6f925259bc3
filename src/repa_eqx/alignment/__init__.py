"""Alignment methods: what pulls the SiT's hidden state towards a frozen encoder's features.

One module per method, each a subclass of `AlignmentMethod` (base.py), registered here by its
recipe value (`loss.alignment`). Pure JAX; the frozen encoders themselves are in `pretrained`.
"""

from ..core.errors import ConfigError
from .base import AlignmentMethod as AlignmentMethod
from .repa import REPA as REPA
from .repa import Projector as Projector
from .repa import repa_loss as repa_loss

METHODS: dict[str, AlignmentMethod] = {method.name: method for method in (REPA(),)}


def get_method(name: str) -> AlignmentMethod:
    """The registered method called `name`."""
    if name not in METHODS:
        raise ConfigError(f"unknown alignment method {name!r}: choose from {sorted(METHODS)}")
    return METHODS[name]
