"""The training data pipeline on grain: a deterministic batch order, per-host slicing, threaded
prefetch, and an iterator state that goes into every checkpoint.

Batch `step` is a pure function of (seed, step): every epoch is a fresh permutation of the
dataset drawn from (seed, epoch), cut into global batches with the remainder dropped, like the
reference's `DistributedSampler` + `drop_last`. Each process loads only its rows of the global
batch, so the global batch (and hence the loss) is the same on 1 device, 8 devices or 4 hosts.
"""

import collections
import functools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import grain
import numpy as np

from ..spaces.pixels import Pixels
from .datasets import DataError, EpochOrder, ImageDataset
from .shards import read_manifest


@runtime_checkable
class Source(Protocol):
    """Random access to examples: `read(indices)` returns one batch as a dict of arrays."""

    def __len__(self) -> int: ...

    def read(self, indices: np.ndarray) -> dict: ...


class PixelSource:
    """An in-memory pixel dataset (MNIST-5k, photo-crops): `x` in [-1, 1], `y`, and, when an in-step
    encoder needs it, the raw uint8 `image`; `features` when target features were cached."""

    def __init__(
        self,
        dataset: ImageDataset,
        *,
        keep_image: bool = False,
        features: Sequence[np.ndarray] | None = None,
    ):
        self.dataset = dataset
        self.keep_image = keep_image
        self.features = tuple(features) if features is not None else None

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, indices: np.ndarray) -> dict:
        images = self.dataset.images[indices]
        batch = {"x": Pixels().encode(images), "y": self.dataset.labels[indices]}
        if self.features is not None:
            batch["features"] = tuple(f[indices] for f in self.features)
        elif self.keep_image:
            batch["image"] = images
        return batch


class LatentSource:
    """The shards written by `repa preprocess` (layout: `shards.py`): SD-VAE posterior
    `moments` (mean and std), the uint8 `image` for the target encoders, and the label `y`.
    Shards are memory-mapped, so a batch reads only its own rows from disk."""

    def __init__(self, path: str | Path, *, keep_image: bool = True):
        self.root = Path(path)
        self.manifest = read_manifest(self.root)
        self.keep_image = keep_image
        counts = [int(s["count"]) for s in self.manifest["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c, h, w = self.manifest["moments_shape"]
        return c // 2, h, w

    @functools.cache  # noqa: B019 (one source per run; memory maps are cheap to keep)
    def _shard(self, k: int) -> dict[str, np.ndarray]:
        folder = self.root / self.manifest["shards"][k]["path"]
        names = ("moments", "labels") + (("images",) if self.keep_image else ())
        try:
            return {n: np.load(folder / f"{n}.npy", mmap_mode="r") for n in names}
        except (OSError, ValueError) as e:
            raise DataError(f"{folder}: unreadable shard ({e})") from None

    def read(self, indices: np.ndarray) -> dict:
        indices = np.asarray(indices, np.int64)
        shard_of = np.searchsorted(self.offsets, indices, side="right") - 1
        c, h, w = self.manifest["moments_shape"]
        moments = np.empty((len(indices), c, h, w), np.float32)
        labels = np.empty(len(indices), np.int32)
        images = None
        if self.keep_image:
            images = np.empty((len(indices), *self.manifest["image_shape"]), np.uint8)
        for k in np.unique(shard_of):
            rows = np.nonzero(shard_of == k)[0]
            local = indices[rows] - self.offsets[k]
            order = np.argsort(local)  # sorted reads are sequential on disk
            shard = self._shard(int(k))
            moments[rows[order]] = shard["moments"][local[order]]
            labels[rows[order]] = shard["labels"][local[order]]
            if images is not None:
                images[rows[order]] = shard["images"][local[order]]
        batch = {"moments": moments, "y": labels}
        if images is not None:
            batch["image"] = images
        return batch


def batch_dataset(
    source: Source,
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """A grain MapDataset whose element `step` is this process's share of global batch `step`
    (rows [p * B / P, (p + 1) * B / P) of it)."""
    if batch_size % process_count:
        raise DataError(f"batch size {batch_size} is not divisible by {process_count} processes")
    order = EpochOrder(len(source), batch_size, seed)
    share = batch_size // process_count
    lo = process_index * share

    def load(step: int) -> dict:
        return source.read(order(step)[lo : lo + share])

    return grain.MapDataset.range(np.iinfo(np.int64).max).map(load)


class Batches:
    """An iterator over the batches from `start` on: grain's threads load and prefetch them on
    the host, and with `place` (host batch -> device arrays) the next `device_prefetch` batches
    are already on their way to the devices while a step runs. `state()` is the position of the
    next batch the caller will get, which is what a checkpoint stores to continue exactly."""

    def __init__(
        self,
        dataset: grain.MapDataset,
        start: int = 0,
        *,
        threads: int = 2,
        prefetch: int = 4,
        place: Callable[[dict], dict] | None = None,
        device_prefetch: int = 2,
    ):
        options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)
        self._iter = iter(dataset.to_iter_dataset(options))
        self._iter.set_state({"next_index": int(start)})
        self._place = place
        self._depth = device_prefetch if place is not None else 0
        self._ready: collections.deque = collections.deque()

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self._place is None:
            return next(self._iter)
        while len(self._ready) < self._depth + 1:
            self._ready.append(self._place(next(self._iter)))  # asynchronous transfers
        return self._ready.popleft()

    def state(self) -> dict:
        state = dict(self._iter.get_state())
        state["next_index"] -= len(self._ready)  # placed on device, not yet handed out
        return state

    def restore(self, state: dict) -> None:
        self._ready.clear()
        self._iter.set_state(dict(state))
