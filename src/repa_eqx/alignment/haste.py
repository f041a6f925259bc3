"""HASTE's attention-map distillation (arXiv 2505.16792, NUS-HPC-AI-Lab/HASTE `loss.py`):
the SiT's attention logits in some blocks are trained towards the frozen DINOv2's attention
maps of other blocks, head by head, by cross-entropy:

    p = softmax(teacher logits over the patch keys)    (DINOv2's CLS row and column dropped)
    loss = mean over block pairs of mean_{batch, head, query} -sum_keys p * log softmax(student)

The released code pairs SiT-XL/2 blocks 5-8 with DINOv2-B blocks 9-12 (1-based), the first 12
SiT heads with DINOv2's 12, weight 0.5, no temperature; with HASTE's stop (the alignment
schedule) both this and the REPA term switch off together. It takes `log(softmax(s))` where
this takes `log_softmax(s)`: equal up to rounding, finite where the former underflows.
"""

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ..core.errors import ConfigError


def attention_distillation_loss(
    student: Sequence[Float[Array, "batch heads tokens tokens"]],
    teacher: Sequence[Float[Array, "batch theads tokens tokens"]],
    heads: int,
) -> Float[Array, ""]:
    """The cross-entropy of each pair's first `heads` heads, averaged over the pairs (fp32)."""
    if len(student) != len(teacher) or not student:
        raise ConfigError(f"{len(student)} SiT attention maps for {len(teacher)} teacher maps")
    losses = []
    for s, t in zip(student, teacher, strict=True):
        if s.shape[-1] != t.shape[-1] or s.shape[1] < heads or t.shape[1] < heads:
            raise ConfigError(
                f"attention maps of {s.shape[1]} heads x {s.shape[-1]} tokens (SiT) and "
                f"{t.shape[1]} heads x {t.shape[-1]} patches (teacher): need {heads} heads "
                "and one token per patch"
            )
        p = jax.nn.softmax(t[:, :heads].astype(jnp.float32), axis=-1)
        log_q = jax.nn.log_softmax(s[:, :heads].astype(jnp.float32), axis=-1)
        losses.append(-(p * log_q).sum(axis=-1).mean())
    return jnp.mean(jnp.stack(losses))


@dataclasses.dataclass(frozen=True)
class AttentionDistillation:
    """The attention term of an objective: coeff * `attention_distillation_loss` of the SiT
    blocks `sit_blocks` against the teacher's `teacher_layers` (1-based, paired in order)."""

    sit_blocks: tuple[int, ...] = (5, 6, 7, 8)
    teacher_layers: tuple[int, ...] = (9, 10, 11, 12)
    heads: int = 12
    coeff: float = 0.5

    def __post_init__(self):
        if len(self.sit_blocks) != len(self.teacher_layers) or not self.sit_blocks:
            raise ConfigError(
                f"attention distillation pairs SiT blocks {self.sit_blocks} with teacher layers "
                f"{self.teacher_layers}: give as many of each"
            )

    def loss(self, student, teacher) -> Float[Array, ""]:
        return attention_distillation_loss(student, teacher, self.heads)
