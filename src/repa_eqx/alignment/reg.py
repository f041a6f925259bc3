"""REG (Wu et al., "Representation Entanglement for Generation", arXiv 2507.01467,
Martinser/REG): the teacher's CLS token enters the SiT as one extra token, noised with the
same interpolant, time and its own noise, and the SiT predicts its velocity too:

    loss = denoising + proj_coeff * REPA(all tokens, CLS first) + coeff * |v_cls - v_cls^*|^2

with the CLS error averaged over its width and the batch (REG's `--cls`, 0.03), on top of
REPA (lambda 0.5) whose projector sees the CLS token as well and aligns it to the teacher's
CLS (the target rows are the teacher's CLS then its patches). Sampling integrates the image and
the CLS token jointly (`diffusion.samplers`, a pytree state). The model side is
`model.sit.CLSToken`; the target rows come from `pretrained.encoders.TargetEncoder` with
`cls_token=True`.
"""

import dataclasses

from jaxtyping import Array, Float

from ..core.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class REG:
    """REG's CLS-token flow term. `coeff`: its weight (REG's `--cls`, 0.03)."""

    coeff: float = 0.03

    def __post_init__(self):
        if not self.coeff >= 0:
            raise ConfigError(f"REG coeff must be >= 0, got {self.coeff}")

    @staticmethod
    def teacher_cls(features: Float[Array, "batch tokens dim"]) -> Float[Array, "batch dim"]:
        """The clean CLS token of the first encoder's target rows (CLS first)."""
        return features[:, 0]
