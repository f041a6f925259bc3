"""Frozen target encoders for REPA: a ported vision network (DINOv2, CLIP's vision tower,
MAE) on the SiT's token grid, preprocessing its uint8 input as the REPA reference does."""

import equinox as eqx
import jax
import numpy as np
from jaxtyping import Array, Float, UInt8

from ..core.errors import RepaError
from . import clip, dinov2, mae
from ._convert import Port
from .registry import ENCODER_TYPES, family_of, load_at_grid, locate

Encoder = dinov2.Dinov2 | clip.ClipVision | mae.Mae
_BY_CLASS: dict[type, Port] = {
    dinov2.Dinov2: dinov2.PORT,
    clip.ClipVision: clip.PORT,
    mae.Mae: mae.PORT,
}


class EncoderError(RepaError, ValueError):
    """A checkpoint that cannot serve as a target encoder as asked; `field` names the setting
    at fault ("id" or "resolution")."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class TargetEncoder(eqx.Module):
    """uint8 images -> the encoder's patch features on the SiT's token grid; with
    `cls_token` (REG, DINOv2 only), its normalised CLS token first."""

    model: Encoder
    resolution: int = eqx.field(static=True)
    name: str = eqx.field(static=True)
    cls_token: bool = eqx.field(static=True, default=False)

    def __post_init__(self):
        if self.cls_token and not isinstance(self.model, dinov2.Dinov2):
            raise EncoderError("id", f"{self.name!r}: REG's CLS token needs a DINOv2 encoder")

    def __call__(
        self, images: UInt8[Array | np.ndarray, "batch c h w"]
    ) -> Float[Array, "batch tokens dim"]:
        if self.cls_token:
            return dinov2.encode_with_cls(self.model, images, self.resolution)
        return _BY_CLASS[type(self.model)].encode(self.model, images, self.resolution)

    def with_attention(
        self, images: UInt8[Array | np.ndarray, "batch c h w"], layers: tuple[int, ...]
    ) -> tuple[Float[Array, "batch tokens dim"], Float[Array, "batch layers heads tokens tokens"]]:
        """The patch features and the attention logits between patches of the blocks `layers`
        (1-based): what HASTE distils. DINOv2 only, as HASTE's released code."""
        if not isinstance(self.model, dinov2.Dinov2):
            raise EncoderError(
                "id", f"{self.name!r}: attention distillation needs a DINOv2 target encoder"
            )
        return dinov2.encode_with_attention(self.model, images, self.resolution, layers)

    @property
    def num_layers(self) -> int:
        return jax.tree.leaves(eqx.filter(self.model.layers, eqx.is_array))[0].shape[0]

    @property
    def num_heads(self) -> int:
        return self.model.layers.attention.num_heads

    @property
    def dim(self) -> int:
        return self.model.cls_token.shape[-1]


def load_target_encoder(
    name_or_path: str, *, resolution: int, grid: int, revision: str | None = None
) -> TargetEncoder:
    """The encoder `name_or_path` for `resolution`-px images, its position table resampled to
    `grid` x `grid` (the SiT's token grid), as REPA resamples it."""
    located = locate(name_or_path, revision=revision)
    kind = located.config.get("model_type")
    if kind not in ENCODER_TYPES:
        raise EncoderError(
            "id",
            f"{name_or_path!r} is a {kind!r} model; target encoders are one of "
            f"{', '.join(ENCODER_TYPES)}",
        )
    port = family_of(located.config)
    patch = port.config.from_dict(located.config).patch_size
    if resolution % patch or resolution // patch != grid:
        raise EncoderError(
            "resolution",
            f"{resolution} px gives a {resolution / patch:g}x{resolution / patch:g} grid of "
            f"{patch}-px patches, but the SiT has {grid}x{grid} tokens (use {grid * patch})",
        )
    model = load_at_grid(port.family, name_or_path, grid=grid, revision=revision)
    return TargetEncoder(model, resolution, name_or_path)
