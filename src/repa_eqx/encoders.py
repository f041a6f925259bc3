"""Frozen target encoders for REPA, and their features precomputed once per dataset."""

import hashlib
from collections.abc import Sequence

import equinox as eqx
import jax
import numpy as np
from jaxtyping import Array, Float, UInt8

from ._paths import cache_dir
from .data import ImageDataset
from .dinov2 import Dinov2, encode, load_dinov2
from .recipe import EncoderSpec, RecipeError

_PATCH = 14


class TargetEncoder(eqx.Module):
    """uint8 images -> the encoder's patch features on the SiT's token grid."""

    model: Dinov2
    resolution: int = eqx.field(static=True)
    name: str = eqx.field(static=True)

    def __call__(self, images: UInt8[Array, "batch c h w"]) -> Float[Array, "batch tokens dim"]:
        return encode(self.model, images, self.resolution)

    @property
    def dim(self) -> int:
        return self.model.cls_token.shape[-1]


def load_encoders(specs: Sequence[EncoderSpec], grid: int) -> tuple[TargetEncoder, ...]:
    encoders = []
    for i, spec in enumerate(specs):
        if spec.resolution % _PATCH or spec.resolution // _PATCH != grid:
            raise RecipeError(
                f"recipe key 'encoders[{i}].resolution': {spec.resolution} px gives a "
                f"{spec.resolution / _PATCH:g}x{spec.resolution / _PATCH:g} patch grid, but the "
                f"SiT has {grid}x{grid} tokens (use {grid * _PATCH})"
            )
        model = load_dinov2(spec.id, grid=grid, revision=spec.revision)
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
