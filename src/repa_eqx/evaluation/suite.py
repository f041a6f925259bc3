"""Evaluating sample files the way ADM's evaluator does: `.npz` in, metrics out.

`evaluate` reads a sample batch (`arr_0`, uint8 NHWC) and a reference batch (ADM's layout:
`arr_0` images and/or the statistics `mu`, `sigma`, `mu_s`, `sigma_s`), runs the FID
InceptionV3 over them and returns FID, sFID, Inception Score, precision and recall. FID and
sFID need only the reference statistics; precision and recall need reference images.
"""

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.errors import ConfigError
from ..core.files import write_json
from ..core.version import version
from ..data.datasets import load_mnist_5k
from ..pretrained.inception import FILENAME as INCEPTION_FILE
from ..pretrained.inception import (
    InceptionV3,
    Resize,
    inception_features,
    inception_weights_file,
    load_inception,
)
from . import fd_dinov2
from .adm import (
    ALL_METRICS,
    EvaluationError,
    Method,
    Statistics,
    compute_metrics,
    frechet_distance,
    load_card,
    load_reference_batch,
    load_samples,
    save_reference_batch,
)

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


FD_DINOV2 = "fd_dinov2"  # beside ADM's metrics: EDM2's FD-DINOv2, when asked for
INCEPTION = "InceptionV3, the 2015-12-05 TensorFlow graph (pytorch-fid's " + INCEPTION_FILE + ")"


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def evaluate(
    samples: str | Path,
    reference: str | Path,
    *,
    metrics: Sequence[str] = ALL_METRICS,
    inception: InceptionV3 | None = None,
    inception_path: str | Path | None = None,
    resize: Resize = "tensorflow",
    method: Method = "eigh",
    batch_size: int = 64,
    fd_dinov2_model: str = fd_dinov2.DEFAULT_MODEL,
    fd_dinov2_resolution: int = fd_dinov2.RESOLUTION,
    report: str | Path | None = None,
    progress: bool = True,
    console=None,
) -> dict[str, float]:
    """The requested metrics of the `samples` .npz against the `reference` .npz: ADM's
    (`ALL_METRICS`) on the FID InceptionV3, and "fd_dinov2" on `fd_dinov2_model`.

    `method` is the Frechet distance's matrix square root: "eigh" (symmetric, stable and
    about 10x faster at 2048 dimensions; equal to ADM's within 1e-9 relative on full-rank
    statistics) or "sqrtm" (ADM's scipy route, bit for bit). With `report`, writes the
    numbers and their evaluation card (`evaluation_card`) there as JSON. A number that is not
    finite is an error, never a result."""
    unknown = sorted(set(metrics) - set(ALL_METRICS) - {FD_DINOV2})
    if unknown:
        raise ConfigError(f"unknown metrics {unknown}; known: {[*ALL_METRICS, FD_DINOV2]}")
    sample_images = load_samples(samples)
    ref_images, ref_stats = load_reference_batch(reference)
    adm = [m for m in metrics if m in ALL_METRICS]
    out: dict[str, float] = {}
    inception_file = None
    if adm:
        if inception is None:
            inception_file = inception_weights_file(inception_path)
            inception = load_inception(inception_file)
        kwargs = dict(batch_size=batch_size, resize=resize, progress=progress, console=console)
        sample_features = inception_features(inception, sample_images, **kwargs)
        ref_features = None
        if {"precision", "recall"} & set(adm) or ref_stats is None:
            if len(ref_images) == 0:
                raise EvaluationError(
                    f"{reference} has no images (arr_0): precision/recall need them"
                )
            ref_features = inception_features(inception, ref_images, **kwargs)
        results = compute_metrics(
            sample_features, ref_features, ref_stats, metrics=adm, method=method
        )
        out |= results.as_dict()
    if FD_DINOV2 in metrics:
        if len(ref_images) == 0:
            raise EvaluationError(f"{reference} has no images (arr_0): fd_dinov2 needs them")
        model = fd_dinov2.load_fd_model(fd_dinov2_model, resolution=fd_dinov2_resolution)
        common = dict(resolution=fd_dinov2_resolution, batch_size=batch_size, progress=progress)
        ref = fd_dinov2.reference_statistics(
            ref_images.transpose(0, 3, 1, 2), fd_dinov2_model, model=model, **common
        )
        stats = fd_dinov2.dinov2_statistics(sample_images.transpose(0, 3, 1, 2), model, **common)
        out[FD_DINOV2] = frechet_distance(*stats, *ref, method=method)
    bad = {k: v for k, v in out.items() if not math.isfinite(v)}
    if bad:
        raise EvaluationError(
            f"{', '.join(f'{k} = {v}' for k, v in bad.items())} is not finite: the statistics "
            f"of {samples} or {reference} hold NaN or Inf (broken features or a damaged file)"
        )
    if report is not None:
        card = evaluation_card(
            samples,
            reference,
            metrics=list(out),
            stored_statistics=ref_stats is not None,
            resize=resize,
            method=method,
            batch_size=batch_size,
            inception_file=inception_file,
            fd_dinov2_model=fd_dinov2_model if FD_DINOV2 in metrics else None,
            fd_dinov2_resolution=fd_dinov2_resolution,
        )
        write_report(out, report, card=card)
    return out


def evaluation_card(
    samples: str | Path,
    reference: str | Path,
    *,
    metrics: Sequence[str],
    stored_statistics: bool,
    resize: str,
    method: str,
    batch_size: int,
    inception_file: Path | None,
    fd_dinov2_model: str | None,
    fd_dinov2_resolution: int,
) -> dict:
    """How a set of numbers was made: the sample file (its hash, and how it was sampled when
    it says so), the reference batch (its hash), the feature networks and their input, the
    Frechet distance's square root, the batch size and the library's version."""
    features = {}
    if any(m in ALL_METRICS for m in metrics):
        features["inception"] = {
            "network": INCEPTION,
            "weights_sha256": _sha256(inception_file) if inception_file else "given in memory",
            "resize": resize,
        }
    if fd_dinov2_model is not None:
        features["fd_dinov2"] = {
            "model": fd_dinov2_model,
            "resolution": fd_dinov2_resolution,
            "input": "bicubic resize with antialias, ImageNet normalisation; CLS token",
        }
    ref_images, _ = load_reference_batch(reference)
    return {
        "metrics": list(metrics),
        "samples": {
            "file": str(samples),
            "sha256": _sha256(samples),
            "num": int(len(load_samples(samples))),
            "made": load_card(samples),
        },
        "reference": {
            "file": str(reference),
            "sha256": _sha256(reference),
            "num_images": int(len(ref_images)),
            "statistics": "stored in the file" if stored_statistics else "of its images",
        },
        "features": features,
        "frechet_sqrt": method,
        "batch_size": batch_size,
        "repa_eqx": version(),
    }


def write_report(results: dict[str, float], path: str | Path, **context) -> Path:
    """The metrics and what they were computed from (`card=`), as JSON."""
    return write_json(path, {"metrics": results, **context})


def _images_from_folder(folder: Path) -> np.ndarray:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise EvaluationError(f"{folder} holds no images ({', '.join(sorted(_IMAGE_SUFFIXES))})")
    images, skipped = [], []
    for file in files:
        try:
            with Image.open(file) as image:
                images.append(np.asarray(image.convert("RGB")))
        except OSError:
            skipped.append(file.name)
    if not images:
        raise EvaluationError(f"no readable image in {folder} (skipped {len(skipped)})")
    sizes = {image.shape for image in images}
    if len(sizes) > 1:
        raise EvaluationError(
            f"{folder}: images of several sizes {sorted(sizes)[:4]}: centre-crop them to one size"
        )
    return np.stack(images)


def reference_images(source: str | Path) -> np.ndarray:
    """uint8 NHWC images (3 channels) of an image folder or a built-in dataset ("mnist-5k")."""
    if str(source) == "mnist-5k":
        images = load_mnist_5k().images.transpose(0, 2, 3, 1)
        return np.repeat(images, 3, axis=-1)
    folder = Path(source)
    if not folder.is_dir():
        raise EvaluationError(f"{source} is neither an image folder nor 'mnist-5k'")
    return _images_from_folder(folder)


def build_reference(
    source: str | Path,
    out: str | Path,
    *,
    inception: InceptionV3 | None = None,
    inception_path: str | Path | None = None,
    resize: Resize = "tensorflow",
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[Path, int]:
    """An ADM reference batch (.npz: images and Inception statistics) from `source`."""
    images = reference_images(source)
    model = inception or load_inception(inception_path)
    features = inception_features(
        model, images, batch_size=batch_size, resize=resize, progress=progress
    )
    save_reference_batch(out, images, Statistics.of(features))
    return Path(out), len(images)
