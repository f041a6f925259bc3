"""A small MNIST classifier: the feature space of a Frechet distance on MNIST that needs no
download and owes nothing to the REPA teacher, and a predictor for the class accuracy of
class-conditional samples.

It is trained once, deterministically (seeded, on CPU in well under a minute), on a fixed
4,000-digit split of MNIST-5k (`data.load_mnist_5k`, 32x32), the other 1,000 held out, and
cached as `model.safetensors` + `info.json` under

    <cache>/mnist_net/v1/

A cache written with another recipe, or unreadable, is retrained over, never trusted.
"""

import dataclasses
import hashlib
import json
import logging
import math
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray, UInt8
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from ..core.batching import map_batches
from ..core.files import atomic_dir
from ..core.paths import cache_dir
from ..core.progress import progress_bar
from ..core.pytree import flatten, unflatten
from ..data.datasets import ImageDataset, batch_indices, load_mnist_5k

logger = logging.getLogger(__name__)

FORMAT = "repa-eqx-mnist-net/v1"
SIZE = 32  # MNIST-5k's digits zero-padded from 28x28, as the REPA MNIST runs use them
FEATURE_DIM = 128
NUM_CLASSES = 10
HELD_OUT = 1000
SPLIT_SEED = 0
SEED = 0
STEPS = 300  # about ten epochs of the 4,000 training digits
BATCH_SIZE = 128
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 1e-4
MAX_SHIFT = 2  # pixels of random translation each way

# Everything that decides the weights; a cache trained otherwise is stale.
_RECIPE = dict(
    held_out=HELD_OUT,
    split_seed=SPLIT_SEED,
    seed=SEED,
    steps=STEPS,
    batch_size=BATCH_SIZE,
    learning_rate=LEARNING_RATE,
    weight_decay=WEIGHT_DECAY,
    max_shift=MAX_SHIFT,
)


class Conv(eqx.Module):
    """3x3 conv with stride 2 and "SAME" padding on a channels-last image: XLA's CPU convs
    run this layout about 1.6x faster than channels-first."""

    weight: Float[Array, "3 3 cin cout"]
    bias: Float[Array, " cout"]

    def __init__(self, channels_in: int, channels_out: int, *, key: PRNGKeyArray):
        wkey, bkey = jr.split(key)
        bound = 1 / math.sqrt(9 * channels_in)
        shape = (3, 3, channels_in, channels_out)
        self.weight = jr.uniform(wkey, shape, minval=-bound, maxval=bound)
        self.bias = jr.uniform(bkey, (channels_out,), minval=-bound, maxval=bound)

    def __call__(self, x: Float[Array | np.ndarray, "H W cin"]) -> Float[Array, "h w cout"]:
        dims = ("NHWC", "HWIO", "NHWC")
        y = jax.lax.conv_general_dilated(
            x[None], self.weight, (2, 2), "SAME", dimension_numbers=dims
        )
        return y[0] + self.bias[None, None, :]


class MnistNet(eqx.Module):
    """Three stride-2 convs (1 -> 32 -> 64 -> 64 channels, 32 -> 16 -> 8 -> 4 pixels), a
    128-d dense layer (the features) and a 10-way head, GELU between. GELU, not ReLU:
    ReLU left half the feature units dead, a singular covariance for the Frechet distance."""

    convs: tuple[Conv, Conv, Conv]
    dense: eqx.nn.Linear
    head: eqx.nn.Linear

    def __init__(self, *, key: PRNGKeyArray):
        keys = jr.split(key, 5)
        self.convs = (
            Conv(1, 32, key=keys[0]),
            Conv(32, 64, key=keys[1]),
            Conv(64, 64, key=keys[2]),
        )
        self.dense = eqx.nn.Linear(64 * (SIZE // 8) ** 2, FEATURE_DIM, key=keys[3])
        self.head = eqx.nn.Linear(FEATURE_DIM, NUM_CLASSES, key=keys[4])

    def features(self, image: UInt8[Array | np.ndarray, "1 32 32"]) -> Float[Array, " 128"]:
        x = image.transpose(1, 2, 0).astype(jnp.float32) / 127.5 - 1.0
        for conv in self.convs:
            x = jax.nn.gelu(conv(x))
        return jax.nn.gelu(self.dense(x.reshape(-1)))

    def __call__(self, image: UInt8[Array | np.ndarray, "1 32 32"]) -> Float[Array, " 10"]:
        return self.head(self.features(image))


@dataclasses.dataclass(frozen=True)
class MnistNetInfo:
    """What `info.json` records beside the weights."""

    held_out_accuracy: float
    data_sha256: str  # of MNIST-5k's images and labels, for provenance
    train_seconds: float
    recipe: dict
    format: str = FORMAT


def split_mnist_5k(dataset: ImageDataset | None = None) -> tuple[ImageDataset, ImageDataset]:
    """The fixed (train, held-out) split of MNIST-5k: 4,000 and 1,000 digits drawn by a
    seeded permutation (the file lists the digits sorted by class)."""
    dataset = load_mnist_5k(SIZE) if dataset is None else dataset
    order = np.random.default_rng(SPLIT_SEED).permutation(len(dataset))

    def part(idx: np.ndarray, name: str) -> ImageDataset:
        idx = np.sort(idx)
        return ImageDataset(name, dataset.images[idx], dataset.labels[idx], dataset.num_classes)

    return part(order[HELD_OUT:], "mnist-5k-train"), part(order[:HELD_OUT], "mnist-5k-held-out")


def _shift(image: UInt8[Array, "1 H W"], key: PRNGKeyArray) -> UInt8[Array, "1 H W"]:
    """A random translation by up to MAX_SHIFT pixels each way, zero-filled: generated
    digits are not all centred as MNIST's are."""
    pad = ((0, 0), (MAX_SHIFT, MAX_SHIFT), (MAX_SHIFT, MAX_SHIFT))
    corner = jr.randint(key, (2,), 0, 2 * MAX_SHIFT + 1)
    return jax.lax.dynamic_slice(jnp.pad(image, pad), (0, corner[0], corner[1]), image.shape)


def _loss(
    net: MnistNet, images: UInt8[Array, "batch 1 32 32"], labels: Int[Array, " batch"]
) -> Float[Array, ""]:
    logits = jax.vmap(net)(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_mnist_net(
    *, steps: int = STEPS, seed: int = SEED, progress: bool = True
) -> tuple[MnistNet, MnistNetInfo]:
    """Train on the fixed split (AdamW, cosine decay, random shifts) and measure the held-out
    accuracy. Deterministic: the same `steps` and `seed` give the same weights."""
    dataset = load_mnist_5k(SIZE)
    train, held_out = split_mnist_5k(dataset)
    start = time.perf_counter()
    init_key, shift_key = jr.split(jr.key(seed))
    net = MnistNet(key=init_key)
    optimiser = optax.adamw(
        optax.cosine_decay_schedule(LEARNING_RATE, steps), weight_decay=WEIGHT_DECAY
    )
    opt_state = optimiser.init(eqx.filter(net, eqx.is_array))

    @eqx.filter_jit
    def step(net, opt_state, images, labels, key):
        images = jax.vmap(_shift)(images, jr.split(key, len(images)))
        grads = eqx.filter_grad(_loss)(net, images, labels)
        updates, opt_state = optimiser.update(grads, opt_state, eqx.filter(net, eqx.is_array))
        return eqx.apply_updates(net, updates), opt_state

    with progress_bar("mnist-net", disable=not progress, info=False) as bar:
        task = bar.add_task("train", total=steps, rate="")
        for i in range(steps):
            # The batch order is data.batch_indices': a pure function of (seed, epoch).
            idx = batch_indices(i, BATCH_SIZE, len(train), seed)
            images, labels = train.images[idx], train.labels[idx]
            net, opt_state = step(net, opt_state, images, labels, jr.fold_in(shift_key, i))
            bar.update(task, completed=i + 1)
    accuracy = mnist_accuracy(net, held_out.images, held_out.labels)
    digest = hashlib.sha256(dataset.images.tobytes() + dataset.labels.tobytes()).hexdigest()
    recipe = {**_RECIPE, "steps": steps, "seed": seed}
    info = MnistNetInfo(accuracy, digest, round(time.perf_counter() - start, 2), recipe)
    return net, info


# ------------------------------------------------------------------------------- cache


def _folder() -> Path:
    return cache_dir() / "mnist_net" / FORMAT.rsplit("/", 1)[-1]


def _read(folder: Path) -> MnistNet:
    """The cached net; raises if the files are missing, unreadable or from another recipe."""
    info = json.loads((folder / "info.json").read_text())
    if info.get("format") != FORMAT or info.get("recipe") != _RECIPE:
        raise ValueError(f"{folder} holds a net of another recipe: {info.get('recipe')}")
    skeleton = eqx.filter_eval_shape(MnistNet, key=jr.key(0))
    return unflatten(load_file(folder / "model.safetensors"), skeleton)


def _write(folder: Path, net: MnistNet, info: MnistNetInfo) -> None:
    """Written beside the target and renamed into place: an interrupted write never leaves
    a half-written folder under the final name."""
    with atomic_dir(folder) as scratch:
        tensors = {k: np.asarray(v) for k, v in flatten(net).items()}
        save_file(tensors, scratch / "model.safetensors", metadata={"format": FORMAT})
        (scratch / "info.json").write_text(json.dumps(dataclasses.asdict(info), indent=2) + "\n")


def load_mnist_net(*, retrain: bool = False, progress: bool = True) -> MnistNet:
    """The cached classifier, trained (and cached) first if there is none, if the cache
    cannot be read, or if `retrain`."""
    folder = _folder()
    if not retrain and folder.exists():
        try:
            return _read(folder)
        except (OSError, ValueError, KeyError, SafetensorError) as error:
            logger.warning("retraining the MNIST classifier: cache %s unusable (%s)", folder, error)
    net, info = train_mnist_net(progress=progress)
    logger.info("MNIST classifier: held-out accuracy %.4f", info.held_out_accuracy)
    _write(folder, net, info)
    return net


# ---------------------------------------------------------------------------- outputs


@eqx.filter_jit
def _batch(
    net: MnistNet, images: UInt8[Array, "batch 1 32 32"]
) -> tuple[Float[Array, "batch 128"], Float[Array, "batch 10"]]:
    features = jax.vmap(net.features)(images)
    return features, jax.vmap(net.head)(features)


def _outputs(
    net: MnistNet, images: UInt8[np.ndarray, "N 1 32 32"], batch_size: int
) -> tuple[Float[np.ndarray, "N 128"], Float[np.ndarray, "N 10"]]:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:] != (1, SIZE, SIZE):
        raise ValueError(
            f"expected uint8 images of shape (N, 1, {SIZE}, {SIZE}), "
            f"got {images.dtype} {images.shape}"
        )
    if len(images) == 0:
        raise ValueError("no images")
    return map_batches(lambda batch: _batch(net, jnp.asarray(batch)), images, batch_size=batch_size)


def mnist_features(
    net: MnistNet, images: UInt8[np.ndarray, "N 1 32 32"], *, batch_size: int = 500
) -> Float[np.ndarray, "N 128"]:
    """The 128-d penultimate features of uint8 digits: the space of the MNIST FD."""
    return _outputs(net, images, batch_size)[0]


def mnist_logits(
    net: MnistNet, images: UInt8[np.ndarray, "N 1 32 32"], *, batch_size: int = 500
) -> Float[np.ndarray, "N 10"]:
    return _outputs(net, images, batch_size)[1]


def mnist_accuracy(
    net: MnistNet,
    images: UInt8[np.ndarray, "N 1 32 32"],
    labels: Int[np.ndarray, " N"],
    *,
    batch_size: int = 500,
) -> float:
    """The fraction of digits classified as `labels` (for samples: their class condition)."""
    predicted = mnist_logits(net, images, batch_size=batch_size).argmax(axis=1)
    return float(np.mean(predicted == np.asarray(labels)))
