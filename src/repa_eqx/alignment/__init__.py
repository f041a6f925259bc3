"""Alignment methods: what pulls the SiT's hidden state towards a frozen encoder's features,
and the terms that shape it without an encoder.

One module per method, each a frozen dataclass subclass of `AlignmentMethod` (base.py) whose
fields are its settings, registered here by its recipe value (`loss.alignment`). Beside them:
the alignment weight schedule (`schedule.py`, HASTE's stop and ramps), HASTE's attention
distillation (`haste.py`), REG's CLS-token term (`reg.py`) and the encoder-free dispersive
loss (`dispersive.py`). Pure JAX;
the frozen encoders themselves are in `pretrained`.
"""

from ..core.errors import ConfigError
from .base import AlignmentMethod as AlignmentMethod
from .dispersive import Dispersive as Dispersive
from .dispersive import dispersive_loss as dispersive_loss
from .haste import AttentionDistillation as AttentionDistillation
from .haste import attention_distillation_loss as attention_distillation_loss
from .irepa import IREPA as IREPA
from .irepa import ConvProjector as ConvProjector
from .irepa import spatial_zscore as spatial_zscore
from .reg import REG as REG
from .repa import REPA as REPA
from .repa import Projector as Projector
from .repa import repa_loss as repa_loss
from .schedule import alignment_weight as alignment_weight

METHODS: dict[str, type[AlignmentMethod]] = {method.name: method for method in (REPA, IREPA)}


def get_method(name: str, **settings) -> AlignmentMethod:
    """The registered method called `name`, with `settings` (its dataclass fields)."""
    if name not in METHODS:
        raise ConfigError(f"unknown alignment method {name!r}: choose from {sorted(METHODS)}")
    return METHODS[name](**settings)
