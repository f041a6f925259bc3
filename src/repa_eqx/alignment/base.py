"""The face every alignment method has.

An alignment method is one term of the training objective, added as lambda * loss to the
denoising loss. It trains heads (one per frozen target encoder) on the SiT's hidden state
after block `encoder_depth`, says what each encoder's features become before they are
compared (`targets`), and scores the heads' outputs against them (`loss`). `REPAModel`
carries the heads; the trainer calls `targets` and `loss` and logs the loss as `loss_name`.
A new method is a frozen dataclass subclass in a module of its own (its fields are its
settings), registered in `alignment.METHODS`, and chosen with the recipe key `loss.alignment`.
"""

import abc
from collections.abc import Sequence
from typing import ClassVar

import equinox as eqx
from jaxtyping import Array, Float, PRNGKeyArray


class AlignmentMethod(abc.ABC):
    name: ClassVar[str]  # the recipe value
    loss_name: ClassVar[str]  # the metric its loss is logged as

    @abc.abstractmethod
    def heads(
        self, hidden_size: int, z_dims: Sequence[int], width: int, *, key: PRNGKeyArray
    ) -> tuple[eqx.Module, ...]:
        """One trainable head per target encoder: the SiT's (tokens, hidden_size) hidden state
        of one example -> (tokens, z_dim), with `width` hidden units where it has any."""

    def targets(
        self, features: Sequence[Float[Array, "batch tokens _dim"]]
    ) -> tuple[Float[Array, "batch tokens _dim"], ...]:
        """Each encoder's batch of patch features as the loss compares them (default: as is)."""
        return tuple(features)

    @abc.abstractmethod
    def loss(
        self,
        projected: Sequence[Float[Array, "batch tokens _dim"]],
        targets: Sequence[Float[Array, "batch tokens _dim"]],
    ) -> Float[Array, ""]:
        """The alignment loss of a batch, averaged over the encoders."""
