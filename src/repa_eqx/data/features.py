"""Target features computed once per dataset and kept on disk: the frozen encoders' patch
features of every image of an in-memory pixel dataset, so training never runs them."""

import hashlib
import logging
from collections.abc import Sequence

import equinox as eqx
import jax
import numpy as np

from ..core.batching import map_batches
from ..core.files import atomic_file
from ..core.paths import cache_dir
from ..pretrained.encoders import TargetEncoder
from .datasets import ImageDataset

logger = logging.getLogger(__name__)


def precompute_features(
    encoders: Sequence[TargetEncoder],
    dataset: ImageDataset,
    *,
    batch_size: int = 250,
    progress: bool = True,
    console=None,
) -> list[np.ndarray]:
    """Each encoder's features for every image of
    `dataset`, cached on disk (fp16) under a key made of the encoder's weights, its resolution
    and the images."""
    out = []
    images_hash = hashlib.sha256(dataset.images.tobytes()).hexdigest()[:16]
    for enc in encoders:
        digest = hashlib.sha256()
        for leaf in jax.tree.leaves(eqx.filter(enc.model, eqx.is_array)):
            digest.update(np.asarray(leaf).tobytes())
        weights_hash = digest.hexdigest()[:16]
        cls = "-cls" if enc.cls_token else ""  # REG: the CLS row first
        name = f"{dataset.name}-{images_hash}-{weights_hash}-{enc.resolution}{cls}.npy"
        path = cache_dir() / "features" / name
        if path.exists():
            try:
                out.append(np.load(path))
                continue
            except (OSError, ValueError, EOFError) as e:  # truncated: computed again
                logger.warning("target features cache %s is unreadable (%s): recomputing", path, e)
        feats = map_batches(
            lambda images, enc=enc: np.asarray(enc(images)).astype(np.float16),
            dataset.images,
            batch_size=batch_size,
            label=f"target features ({enc.name})",
            progress=progress,
            console=console,
        )
        with atomic_file(path) as tmp:
            np.save(tmp, feats)
        out.append(feats)
    return out
