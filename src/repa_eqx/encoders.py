"""Frozen target encoders for REPA, and their features precomputed once per dataset.

An encoder is any of the ported families (DINOv2, CLIP's vision tower, MAE), recognised by
the `model_type` of its transformers `config.json`; each family has a loader and a pure,
jitted `encode(model, uint8 images, resolution)` that preprocesses as the REPA reference.
"""

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jaxtyping import Array, Float, UInt8

from . import clip, dinov2, mae
from ._paths import cache_dir
from .data import ImageDataset
from .hub import resolve_pretrained
from .recipe import EncoderSpec, RecipeError


@dataclasses.dataclass(frozen=True)
class _Family:
    config: Callable[[Path], Any]  # config.json -> a config with `patch_size`
    load: Callable[..., eqx.Module]  # (folder, *, grid) -> model
    encode: Callable[..., Array]  # (model, uint8 images, resolution) -> patch features


_DINOV2 = _Family(dinov2.Dinov2Config.from_json, dinov2.load_dinov2, dinov2.encode)
_CLIP = _Family(clip.ClipVisionConfig.from_json, clip.load_clip_vision, clip.encode)
_MAE = _Family(mae.MaeConfig.from_json, mae.load_mae, mae.encode)
_BY_MODEL_TYPE = {
    "dinov2": _DINOV2,
    "dinov2_with_registers": _DINOV2,
    "clip": _CLIP,
    "clip_vision_model": _CLIP,
    "vit_mae": _MAE,
}
_BY_CLASS = {dinov2.Dinov2: _DINOV2, clip.ClipVision: _CLIP, mae.Mae: _MAE}

Encoder = dinov2.Dinov2 | clip.ClipVision | mae.Mae


class TargetEncoder(eqx.Module):
    """uint8 images -> the encoder's patch features on the SiT's token grid."""

    model: Encoder
    resolution: int = eqx.field(static=True)
    name: str = eqx.field(static=True)

    def __call__(self, images: UInt8[Array, "batch c h w"]) -> Float[Array, "batch tokens dim"]:
        return _BY_CLASS[type(self.model)].encode(self.model, images, self.resolution)

    @property
    def dim(self) -> int:
        return self.model.cls_token.shape[-1]


def load_encoders(specs: Sequence[EncoderSpec], grid: int) -> tuple[TargetEncoder, ...]:
    """One `TargetEncoder` per recipe entry, its position table resampled to `grid`."""
    encoders = []
    for i, spec in enumerate(specs):
        folder = resolve_pretrained(spec.id, revision=spec.revision)
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        if model_type not in _BY_MODEL_TYPE:
            raise RecipeError(
                f"recipe key 'encoders[{i}].id': {spec.id!r} is a {model_type!r} model; "
                f"target encoders are one of {', '.join(_BY_MODEL_TYPE)}"
            )
        family = _BY_MODEL_TYPE[model_type]
        patch = family.config(folder / "config.json").patch_size
        if spec.resolution % patch or spec.resolution // patch != grid:
            raise RecipeError(
                f"recipe key 'encoders[{i}].resolution': {spec.resolution} px gives a "
                f"{spec.resolution / patch:g}x{spec.resolution / patch:g} grid of {patch}-px "
                f"patches, but the SiT has {grid}x{grid} tokens (use {grid * patch})"
            )
        model = family.load(str(folder), grid=grid)
        encoders.append(TargetEncoder(model, spec.resolution, spec.id))
    return tuple(encoders)


def precompute_features(
    encoders: Sequence[TargetEncoder],
    dataset: ImageDataset,
    *,
    batch_size: int = 250,
    progress: bool = True,
    console=None,
) -> list[np.ndarray]:
    """Each encoder's features for every image of `dataset`, cached on disk (fp16) under a key
    made of the encoder's weights, its resolution and the images."""
    from rich.progress import Progress

    out = []
    images_hash = hashlib.sha256(dataset.images.tobytes()).hexdigest()[:16]
    for enc in encoders:
        digest = hashlib.sha256()
        for leaf in jax.tree.leaves(eqx.filter(enc.model, eqx.is_array)):
            digest.update(np.asarray(leaf).tobytes())
        weights_hash = digest.hexdigest()[:16]
        path = (
            cache_dir()
            / "features"
            / (f"{dataset.name}-{images_hash}-{weights_hash}-{enc.resolution}.npy")
        )
        if path.exists():
            out.append(np.load(path))
            continue
        chunks = []
        with Progress(console=console, disable=not progress) as bar:
            task = bar.add_task(f"target features ({enc.name})", total=len(dataset))
            for lo in range(0, len(dataset), batch_size):
                chunk = dataset.images[lo : lo + batch_size]
                chunks.append(np.asarray(enc(chunk)).astype(np.float16))
                bar.update(task, advance=len(chunk))
        feats = np.concatenate(chunks)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, feats)
        tmp.replace(path)
        out.append(feats)
    return out
