"""The ADM evaluation suite (openai/guided-diffusion `evaluations/evaluator.py`) on Inception
features: FID, sFID, Inception Score, improved precision / recall, and ADM's `.npz` files.

The math takes feature arrays, so it is tested against closed forms; `reference_batch` and
`compute_metrics` tie it to `inception.py`. Where we differ from ADM, it is in float
arithmetic only: the Inception Score takes a float64 log-softmax (ADM: float32 softmax,
then log), and nearest-neighbour distances are float32 (ADM: float16, falling back to
float32 on overflow), which can flip a point lying on a manifold's boundary.
"""

import contextlib
import dataclasses
import functools
import json
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jaxtyping import Array, Bool, Float, Shaped
from scipy.special import logsumexp

from ..core.errors import ConfigError, RepaError
from ..core.files import atomic_file
from ..pretrained.inception import InceptionOutput, InceptionV3, Resize, inception_features
from ..sampling.samples import CARD_KEY
from ..sampling.samples import save_samples as save_samples

Features = Array | np.ndarray
Method = Literal["sqrtm", "eigh"]

# ADM's Inception Score takes the mean over chunks of 5000 samples: 10 splits of 50K.
IS_SPLIT_SIZE = 5000
# The neighbourhood size of ADM's manifolds (Kynkaanniemi et al. 2019).
NEIGHBOURS = 3


class EvaluationError(RepaError, ValueError):
    """Inputs that cannot be evaluated as asked (missing images, wrong shapes, statistics
    that do not match)."""


# ------------------------------------------------------------------------ Frechet distance


def gaussian_statistics(
    features: Float[Features, "n dim"],
) -> tuple[Float[np.ndarray, " dim"], Float[np.ndarray, "dim dim"]]:
    """Mean and (unbiased) covariance of the rows, in float64, as ADM computes them."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise EvaluationError(f"need at least two feature vectors, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _trace_sqrt_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """tr sqrt(sigma1 sigma2) by scipy's `sqrtm`, exactly ADM's (and pytorch-fid's) route."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # A singular product: both covariances nudged off singularity, as ADM does.
        offset = eps * np.eye(len(sigma1))
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Rounding can give a small imaginary part; a large one means a broken input.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise EvaluationError(f"imaginary component {np.abs(covmean.imag).max():.3g} in sqrtm")
        covmean = covmean.real
    return float(np.trace(covmean))


def _trace_sqrt_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrt(sigma1 sigma2) as the sum of sqrt(eigenvalues) of the symmetric PSD matrix
    sqrt(sigma1) sigma2 sqrt(sigma1), which has the same eigenvalues as sigma1 sigma2."""
    w, v = np.linalg.eigh(sigma1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root @ sigma2 @ root
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(eigenvalues, 0, None)).sum())


def frechet_distance(
    mu1: Float[Features, " dim"],
    sigma1: Float[Features, "dim dim"],
    mu2: Float[Features, " dim"],
    sigma2: Float[Features, "dim dim"],
    *,
    method: Method = "sqrtm",
    eps: float = 1e-6,
) -> float:
    """|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), in float64.

    "sqrtm" is ADM's route (scipy's Schur-based matrix square root, retried with `eps`
    added to both diagonals when the product is singular); "eigh" is a symmetric
    eigendecomposition, faster and never complex, equal up to rounding.
    """
    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise EvaluationError(
            f"mismatched statistics: means {mu1.shape} and {mu2.shape}, "
            f"covariances {sigma1.shape} and {sigma2.shape}"
        )
    if method == "sqrtm":
        trace_sqrt = _trace_sqrt_sqrtm(sigma1, sigma2, eps)
    elif method == "eigh":
        trace_sqrt = _trace_sqrt_eigh(sigma1, sigma2)
    else:
        raise ConfigError(f"method must be 'sqrtm' or 'eigh', got {method!r}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


@dataclasses.dataclass(frozen=True)
class Statistics:
    """The Gaussian statistics of an ADM reference batch: pool features (`mu`, `sigma`)
    for FID, spatial features (`mu_s`, `sigma_s`) for sFID."""

    mu: Float[np.ndarray, " dim"]  # 2048 for Inception's pool features
    sigma: Float[np.ndarray, "dim dim"]
    mu_s: Float[np.ndarray, " spatial"]  # 2023 for its spatial ones
    sigma_s: Float[np.ndarray, "spatial spatial"]

    @classmethod
    def of(cls, features: InceptionOutput) -> "Statistics":
        return cls(*gaussian_statistics(features.pool), *gaussian_statistics(features.spatial))

    def fid(self, other: "Statistics", *, method: Method = "sqrtm") -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma, method=method)

    def sfid(self, other: "Statistics", *, method: Method = "sqrtm") -> float:
        return frechet_distance(self.mu_s, self.sigma_s, other.mu_s, other.sigma_s, method=method)


# ----------------------------------------------------------------------- Inception Score


def inception_score(
    logits: Float[Features, "n classes"], *, split_size: int = IS_SPLIT_SIZE
) -> float:
    """exp E_x KL(p(y|x) || p(y)), averaged over consecutive chunks of `split_size`.

    `logits` are ADM's (`InceptionOutput.logits`: no classifier bias, all 1008 classes);
    p(y) is each chunk's mean prediction.
    """
    log_p = np.asarray(logits, np.float64)
    log_p = log_p - logsumexp(log_p, axis=1, keepdims=True)
    scores = []
    for lo in range(0, len(log_p), split_size):
        part = log_p[lo : lo + split_size]
        log_marginal = logsumexp(part, axis=0) - np.log(len(part))
        kl = (np.exp(part) * (part - log_marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


# ---------------------------------------------------------------- precision and recall


@jax.jit
def _squared_distances(u: Float[Array, "a d"], v: Float[Array, "b d"]):
    uv = jnp.matmul(u, v.T, precision=jax.lax.Precision.HIGHEST)
    norms_u = jnp.sum(u * u, axis=1)[:, None]
    norms_v = jnp.sum(v * v, axis=1)[None, :]
    return jnp.maximum(norms_u - 2 * uv + norms_v, 0)


@functools.partial(jax.jit, static_argnames="k")
def _kth_smallest(u: Float[Array, "a d"], v: Float[Array, "b d"], k: int):
    # Row i's distance to itself (0) is in the row too: index k is its k-th neighbour.
    return jnp.partition(_squared_distances(u, v), k, axis=1)[:, k]


@jax.jit
def _covered(u, radii_u, v, radii_v) -> tuple[Bool[Array, " a"], Bool[Array, " b"]]:
    """Which rows of u lie in some ball around a row of v, and which rows of v in u's."""
    d = _squared_distances(u, v)
    return (d <= radii_v[None, :]).any(axis=1), (d <= radii_u[:, None]).any(axis=0)


def manifold_radii(
    features: Float[Features, "n dim"], *, k: int = NEIGHBOURS, batch_size: int = 5000
) -> Float[np.ndarray, " n"]:
    """Squared distance from each row to its k-th nearest other row: the radius of its ball
    in the manifold estimate (each row's zero distance to itself is neighbour 0)."""
    features = jnp.asarray(features, jnp.float32)
    if len(features) <= k:
        raise EvaluationError(f"{len(features)} feature vectors cannot have {k} neighbours each")
    parts = [
        _kth_smallest(features[lo : lo + batch_size], features, k)
        for lo in range(0, len(features), batch_size)
    ]
    return np.asarray(jnp.concatenate(parts))


def precision_recall(
    reference: Float[Features, "n dim"],
    samples: Float[Features, "m dim"],
    *,
    k: int = NEIGHBOURS,
    batch_size: int = 5000,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) as ADM computes them.

    Precision: the fraction of samples inside some reference ball; recall: the fraction
    of reference rows inside some sample ball, each ball reaching the k-th neighbour.
    Distances are computed in `batch_size` x `batch_size` blocks.
    """
    ref = jnp.asarray(reference, jnp.float32)
    sam = jnp.asarray(samples, jnp.float32)
    ref_radii = jnp.asarray(manifold_radii(ref, k=k, batch_size=batch_size))
    sam_radii = jnp.asarray(manifold_radii(sam, k=k, batch_size=batch_size))
    ref_in = np.zeros(len(ref), bool)
    sam_in = np.zeros(len(sam), bool)
    for lo in range(0, len(ref), batch_size):
        for lo2 in range(0, len(sam), batch_size):
            rows, cols = slice(lo, lo + batch_size), slice(lo2, lo2 + batch_size)
            r, s = _covered(ref[rows], ref_radii[rows], sam[cols], sam_radii[cols])
            ref_in[rows] |= np.asarray(r)
            sam_in[cols] |= np.asarray(s)
    return float(sam_in.mean()), float(ref_in.mean())


# --------------------------------------------------------------------------- all at once


ALL_METRICS = ("fid", "sfid", "inception_score", "precision", "recall")


@dataclasses.dataclass(frozen=True)
class Metrics:
    """ADM's numbers; those not asked for are None."""

    inception_score: float | None = None
    fid: float | None = None
    sfid: float | None = None
    precision: float | None = None
    recall: float | None = None

    def as_dict(self) -> dict[str, float]:
        """The computed metrics, in ADM's order."""
        return {k: float(getattr(self, k)) for k in ALL_METRICS if getattr(self, k) is not None}


def compute_metrics(
    samples: InceptionOutput,
    reference: InceptionOutput | None,
    reference_statistics: Statistics | None = None,
    *,
    metrics: Sequence[str] = ALL_METRICS,
    method: Method = "sqrtm",
) -> Metrics:
    """ADM's numbers (`metrics` of FID, sFID, Inception Score, precision, recall) for sample
    features against reference features.

    FID and sFID use `reference_statistics` when given (ADM's reference batches store
    statistics of more images than their `arr_0` holds), else the reference features'
    own. The Inception Score is the samples'; precision / recall compare pool features and
    need the reference's."""
    unknown = sorted(set(metrics) - set(ALL_METRICS))
    if unknown:
        raise ConfigError(f"unknown metrics {unknown}; known: {list(ALL_METRICS)}")
    wanted = set(metrics)
    if reference is None and (reference_statistics is None or {"precision", "recall"} & wanted):
        raise EvaluationError("the reference has no images: precision/recall need them")
    ref_stats = reference_statistics
    if ref_stats is None:
        ref_stats = Statistics.of(reference)
    sample_stats = Statistics.of(samples)
    out = {}
    if "fid" in wanted:
        out["fid"] = sample_stats.fid(ref_stats, method=method)
    if "sfid" in wanted:
        out["sfid"] = sample_stats.sfid(ref_stats, method=method)
    if "inception_score" in wanted:
        out["inception_score"] = inception_score(samples.logits)
    if {"precision", "recall"} & wanted:
        precision, recall = precision_recall(reference.pool, samples.pool)
        out |= {k: v for k, v in (("precision", precision), ("recall", recall)) if k in wanted}
    return Metrics(**out)


def reference_batch(
    images: Shaped[np.ndarray, "n H W 3"],
    inception: InceptionV3,
    *,
    batch_size: int = 64,
    resize: Resize = "tensorflow",
    progress: bool = True,
) -> tuple[Statistics, InceptionOutput]:
    """The statistics ADM's reference batches store, and the features they came from."""
    features = inception_features(
        inception, images, batch_size=batch_size, resize=resize, progress=progress
    )
    return Statistics.of(features), features


# ------------------------------------------------------------------------ ADM .npz files


def _checked_images(images, path) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise EvaluationError(
            f"{path}: arr_0 must be uint8 NHWC images with 3 channels, "
            f"got {images.dtype} {images.shape}"
        )
    return images


def _images_of(data, path) -> np.ndarray:
    if "arr_0" not in data:
        raise EvaluationError(f"{path} has no arr_0 (it holds {sorted(data)})")
    return _checked_images(data["arr_0"], path)


@contextlib.contextmanager
def _npz(path: str | Path) -> Iterator:
    """An `.npz` file opened for reading; an empty, truncated or foreign file is one
    `EvaluationError` naming it."""
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise EvaluationError(f"{path} does not exist") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise EvaluationError(f"{path} is not a readable .npz file ({reason})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise EvaluationError(f"{path} is a single array, not an .npz file of arrays")
    with data:
        yield data


def load_samples(path: str | Path) -> np.ndarray:
    """`arr_0` of a sample `.npz`: uint8 NHWC images."""
    with _npz(path) as data:
        return _images_of(data, path)


def load_card(path: str | Path) -> dict | None:
    """How a sample `.npz` was made (its `card` entry, written by `repa sample` and the
    in-training evaluation), or None."""
    with _npz(path) as data:
        if CARD_KEY not in data:
            return None
        return json.loads(str(data[CARD_KEY]))


def save_reference_batch(path: str | Path, images: np.ndarray, statistics: Statistics):
    """ADM's reference-batch layout: `arr_0` images, `mu`, `sigma`, `mu_s`, `sigma_s`."""
    images = _checked_images(images, path)
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, arr_0=images, **dataclasses.asdict(statistics))


def load_reference_batch(path: str | Path) -> tuple[np.ndarray, Statistics | None]:
    """(`arr_0` images, stored statistics or None if the file has none)."""
    names = [f.name for f in dataclasses.fields(Statistics)]
    with _npz(path) as data:
        images = _images_of(data, path)
        if not all(name in data for name in names):
            return images, None
        return images, Statistics(*(np.asarray(data[name], np.float64) for name in names))
