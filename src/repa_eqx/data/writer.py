"""`repa preprocess`: an ImageNet-style folder -> ADM centre crops, SD-VAE posterior moments
and labels, written as resumable shards of plain `.npy` arrays with a checksummed manifest
(the format: `shards.py`).

Shard k holds inputs [k * shard_size, (k + 1) * shard_size) of the sorted input list, less
the unreadable ones. A shard is written under `00000.partial` and renamed when complete, so
a rerun of the same command redoes only unfinished shards; since a shard's batches are
always the same, the result is byte-identical to an uninterrupted run (on one machine: GPU
convolution kernels may pick other algorithms elsewhere). Worker I of W takes the shards
k with k % W == I; whichever run finds every shard complete writes the manifest (or
`finalize`).

Each shard's record also holds float64 sums of its latents (`latent_sums`), so that the
manifest's channel-wise statistics (`latent_stats`) are those of the whole set however many
runs or workers wrote it.
"""

import collections
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, UInt8
from PIL import Image, UnidentifiedImageError

from ..core.files import write_json
from ..core.progress import progress_bar
from ..pretrained.registry import load_vae, locate
from ..pretrained.vae import AutoencoderKL, VAEConfig
from ..spaces.sd_vae import encode_uint8
from .shards import (
    ARRAYS,
    FORMAT,
    MANIFEST,
    PLAN,
    SHARD,
    VERSION,
    PreprocessError,
    sha256,
    shard_dir,
    vae_space,
)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
# What a broken or unsupported image file raises while it is opened, decoded or converted.
_UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The images to preprocess: paths relative to `root`, sorted, with their labels."""

    root: Path
    paths: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]

    def digest(self) -> str:
        """Identifies the list, so that a resumed run or another worker can check it."""
        lines = (f"{path}\t{label}\n" for path, label in zip(self.paths, self.labels, strict=True))
        digest = hashlib.sha256()
        for line in lines:
            digest.update(line.encode())
        return digest.hexdigest()


def _sorted_inputs(root: Path, pairs: Iterable[tuple[str, int]], classes: Sequence[str]) -> Inputs:
    pairs = sorted(pairs)
    if not pairs:
        raise PreprocessError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    paths, labels = zip(*pairs, strict=True)
    return Inputs(root, paths, labels, tuple(classes))


def list_image_folder(root: str | Path) -> Inputs:
    """One sub-folder per class (classes in sorted order, as torchvision's ImageFolder);
    images anywhere below it, by suffix, case-insensitive."""
    root = Path(root)
    if not root.is_dir():
        raise PreprocessError(f"{root} is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise PreprocessError(f"{root} has no class sub-folders (expected ROOT/CLASS/IMAGE)")
    pairs = [
        (path.relative_to(root).as_posix(), label)
        for label, name in enumerate(classes)
        for path in (root / name).rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    ]
    return _sorted_inputs(root, pairs, classes)


def read_list_file(list_file: str | Path, root: str | Path) -> Inputs:
    """Lines `relative/path label_index` (paths relative to `root`; blank lines and `#`
    comments skipped). Classes are named by their index."""
    list_file, root = Path(list_file), Path(root)
    if not list_file.is_file():
        raise PreprocessError(f"list file {list_file} does not exist")
    pairs = {}
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        path, _, label = line.strip().rpartition(" ")
        if not path or not label.isdigit():
            raise PreprocessError(
                f"{list_file}:{number}: expected 'relative/path label_index', got {line!r}"
            )
        if path.strip() in pairs:
            raise PreprocessError(f"{list_file}:{number}: {path.strip()} is listed twice")
        pairs[path.strip()] = int(label)
    classes = [str(i) for i in range(max(pairs.values(), default=-1) + 1)]
    return _sorted_inputs(root, pairs.items(), classes)


def center_crop(image: Image.Image, resolution: int) -> UInt8[np.ndarray, "R R 3"]:
    """ADM's centre crop (guided-diffusion's `center_crop_arr`) of the RGB image: halve with a
    box filter while the short side is at least twice `resolution`, resize bicubically so
    the short side is `resolution`, then crop the centre."""
    image = image.convert("RGB")
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), Image.BICUBIC)
    pixels = np.asarray(image)
    top = (pixels.shape[0] - resolution) // 2
    left = (pixels.shape[1] - resolution) // 2
    return pixels[top : top + resolution, left : left + resolution]


def _error_text(error: BaseException) -> str:
    if isinstance(error, UnidentifiedImageError):
        return "cannot identify image file"  # PIL's message also names the file
    return str(error) or type(error).__name__


def load_image(path: Path, resolution: int) -> tuple[UInt8[np.ndarray, "3 R R"] | None, str]:
    """The centre crop of the image file, channels first, or None and why it is unreadable."""
    try:
        with Image.open(path) as image:
            return center_crop(image, resolution).transpose(2, 0, 1), ""
    except _UNREADABLE as error:
        return None, _error_text(error)


def _moments_shape(config: VAEConfig, resolution: int) -> tuple[int, ...]:
    skeleton = eqx.filter_eval_shape(AutoencoderKL, config, key=jr.key(0))
    image = jax.ShapeDtypeStruct((3, resolution, resolution), jnp.float32)
    mean, std = eqx.filter_eval_shape(lambda vae, x: vae.encode(x), skeleton, image)
    return (mean.shape[0] + std.shape[0], *mean.shape[1:])


def _describe_vae(source: str, revision: str | None) -> tuple[VAEConfig, str]:
    """The VAE's config and revision (the Hub commit, or a hash of a local folder's files)
    without loading its weights."""
    located = locate(source, revision=revision)
    try:
        return VAEConfig.from_dict(located.config), located.tag()
    except ValueError as error:
        raise PreprocessError(f"{source} is not a usable SD-VAE: {error}") from None


def _is_complete(out: Path, k: int) -> bool:
    return (shard_dir(out, k) / SHARD).is_file()


def _num_shards(plan: dict[str, Any]) -> int:
    return math.ceil(plan["num_inputs"] / plan["shard_size"])


def _check_plan(out: Path, plan: dict[str, Any]) -> None:
    """Write the plan of a new output folder; in an existing one, insist on the same. Workers
    starting together may all write it: then the last one's wins and the others compare."""
    path = out / PLAN
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        write_json(path, plan, indent=1)
    old = json.loads(path.read_text())
    changed = sorted(k for k in plan.keys() | old.keys() if plan.get(k) != old.get(k))
    if changed:
        raise PreprocessError(
            f"{out} was started with other settings ({', '.join(changed)} differ): rerun "
            "the command that started it, or choose another output folder"
        )


def _read_plan(out: Path) -> dict[str, Any]:
    path = out / PLAN
    if not path.is_file():
        raise PreprocessError(f"{out} holds no {PLAN}: no preprocessing was started there")
    return json.loads(path.read_text())


@dataclasses.dataclass(frozen=True)
class PreprocessResult:
    """What one run did. `manifest` is set once every shard of every worker is complete."""

    out: Path
    num_shards: int
    shards_complete: int  # by any run or worker
    shards_written: int
    examples_written: int
    skipped: list[dict[str, str]]  # in the shards this run wrote
    manifest: dict[str, Any] | None


def _in_order(
    pool: ThreadPoolExecutor, fn: Callable, items: Iterable, ahead: int
) -> Iterator[tuple[Any, Any]]:
    """(item, fn(item)) in order, computed by the pool at most `ahead` items in advance."""
    queue = collections.deque()
    for item in items:
        queue.append((item, pool.submit(fn, item)))
        if len(queue) > ahead:
            item, future = queue.popleft()
            yield item, future.result()
    while queue:
        item, future = queue.popleft()
        yield item, future.result()


def _trim(path: Path, count: int) -> None:
    """Keep the first `count` rows of a `.npy` file (some inputs of the shard were skipped)."""
    full = np.load(path, mmap_mode="r")
    part = path.with_name("trimmed." + path.name)
    if count == 0:  # an empty file cannot be memory-mapped
        np.save(part, full[:0])
        del full
        part.replace(path)
        return
    kept = np.lib.format.open_memmap(part, "w+", full.dtype, (count, *full.shape[1:]))
    for lo in range(0, count, 256):
        hi = min(lo + 256, count)
        kept[lo:hi] = full[lo:hi]
    kept.flush()
    del full, kept
    part.replace(path)


class _Encoder:
    """Encodes fixed-size batches over a 1-D mesh of devices, the VAE replicated."""

    def __init__(self, vae: AutoencoderKL, batch_size: int, devices: Sequence[jax.Device]):
        mesh = Mesh(np.array(devices), ("data",))
        self.vae = eqx.filter_shard(vae, NamedSharding(mesh, P()))
        self.sharding = NamedSharding(mesh, P("data"))
        self.batch_size = math.ceil(batch_size / len(devices)) * len(devices)

    def __call__(self, images: list[np.ndarray]) -> tuple[Array, int]:
        """Moments of up to a batch of images (still on the devices) and how many are real."""
        batch = np.zeros((self.batch_size, *images[0].shape), np.uint8)  # padded: one shape
        batch[: len(images)] = np.stack(images)
        return encode_uint8(self.vae, jax.device_put(batch, self.sharding)), len(images)


def _write_shard(
    out: Path,
    k: int,
    inputs: Inputs,
    decoded: Iterable[tuple[int, tuple[np.ndarray | None, str]]],
    encoder: _Encoder,
    plan: dict[str, Any],
    advance: Callable[[str], None],
) -> dict[str, Any]:
    """Write shard k from its decoded inputs, in a temporary folder renamed when done."""
    final = shard_dir(out, k)
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted run left
    tmp.mkdir(parents=True)
    planned = min(plan["shard_size"], plan["num_inputs"] - k * plan["shard_size"])
    images = np.lib.format.open_memmap(
        tmp / "images.npy", "w+", np.uint8, (planned, *plan["image_shape"])
    )
    labels, skipped, pending, batch = [], [], [], []
    for index, (image, error) in decoded:
        if image is None:
            skipped.append({"path": inputs.paths[index], "error": error})
        else:
            images[len(labels)] = image
            labels.append(inputs.labels[index])
            batch.append(image)
            if len(batch) == encoder.batch_size:
                pending.append(encoder(batch))  # dispatched: decoding goes on meanwhile
                batch = []
        advance(error)
    if batch:
        pending.append(encoder(batch))
    count = len(labels)
    images.flush()
    del images
    if count < planned:
        _trim(tmp / "images.npy", count)
    moments = [np.asarray(m)[:real] for m, real in pending]
    moments = np.concatenate(moments) if moments else np.zeros((0, *plan["moments_shape"]))
    moments = moments.astype(np.float32)
    np.save(tmp / "moments.npy", moments)
    np.save(tmp / "labels.npy", np.asarray(labels, np.int32))
    checksums = {name: sha256(tmp / name) for name in ARRAYS}
    record = {
        "count": count,
        "sha256": checksums,
        "skipped": skipped,
        "latent_sums": latent_sums(moments),
    }
    (tmp / SHARD).write_text(json.dumps(record, indent=1) + "\n")
    tmp.rename(final)
    return record


def preprocess(
    source: str | Path,
    out: str | Path,
    *,
    vae: str,
    vae_revision: str | None = None,
    resolution: int = 256,
    list_file: str | Path | None = None,
    batch_size: int = 64,
    shard_size: int = 4096,
    num_workers: int | None = None,
    worker_index: int | None = None,
    threads: int | None = None,
    devices: Sequence[jax.Device] | None = None,
    progress: bool = True,
    console=None,
) -> PreprocessResult:
    """Preprocess the images under `source` (an ImageFolder-style root, or the root of the
    paths in `list_file`) into `out`, or continue an interrupted run of the same command.

    `vae` is a Hub id or a local diffusers folder. Worker `worker_index` of `num_workers`
    (default: this JAX process of all of them) takes the shards k with k % num_workers ==
    worker_index; its batches are split over `devices` (default: all local devices) and
    its images decoded by `threads` threads.
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    num_workers = jax.process_count() if num_workers is None else num_workers
    worker_index = jax.process_index() if worker_index is None else worker_index
    if not 0 <= worker_index < num_workers:
        raise PreprocessError(f"worker index {worker_index} is not in [0, {num_workers})")
    if resolution < 8 or resolution % 8:
        raise PreprocessError(f"resolution {resolution} is not a positive multiple of 8")
    if batch_size < 1 or shard_size < 1:
        raise PreprocessError("batch size and shard size must be positive")
    out = Path(out)
    if list_file is None:
        inputs = list_image_folder(source)
    else:
        inputs = read_list_file(list_file, source)
    config, revision = _describe_vae(vae, vae_revision)
    plan = {
        "resolution": resolution,
        "image_shape": [3, resolution, resolution],
        "moments_shape": list(_moments_shape(config, resolution)),
        "latent_scale": config.scaling_factor,
        "vae": {"source": str(vae), "revision": revision},
        "shard_size": shard_size,
        "num_inputs": len(inputs.paths),
        "inputs_sha256": inputs.digest(),
        "classes": list(inputs.classes),
    }
    _check_plan(out, plan)

    num_shards = _num_shards(plan)
    todo = [k for k in range(worker_index, num_shards, num_workers) if not _is_complete(out, k)]
    written, skipped = 0, []
    if todo:
        # A Hub id is loaded at the commit just resolved, so the revision recorded is exact.
        local = Path(vae).expanduser().is_dir()
        model = load_vae(str(vae), revision=None if local else revision)
        encoder = _Encoder(model, batch_size, list(devices or jax.local_devices()))
        threads = threads or min(32, os.cpu_count() or 1)
        written, skipped = _run(out, todo, inputs, encoder, plan, threads, progress, console)
    complete = sum(_is_complete(out, k) for k in range(num_shards))
    manifest = finalize(out) if complete == num_shards else None
    return PreprocessResult(out, num_shards, complete, len(todo), written, skipped, manifest)


def _run(
    out: Path,
    todo: list[int],
    inputs: Inputs,
    encoder: _Encoder,
    plan: dict[str, Any],
    threads: int,
    progress: bool,
    console,
) -> tuple[int, list[dict[str, str]]]:
    """Write the shards `todo`; decoding runs ahead in threads while the devices encode."""
    size, n = plan["shard_size"], plan["num_inputs"]
    work = [i for k in todo for i in range(k * size, min((k + 1) * size, n))]
    root, resolution = inputs.root, plan["resolution"]
    written, skipped = 0, []
    bar = progress_bar("preprocess", console=console, disable=not progress)
    pool = ThreadPoolExecutor(threads)
    start = time.perf_counter()
    try:
        with bar:
            task = bar.add_task("preprocess", total=len(work), rate="", info="")
            done, bad = 0, 0

            def advance(error: str) -> None:
                nonlocal done, bad
                done, bad = done + 1, bad + bool(error)
                rate = done / max(time.perf_counter() - start, 1e-9)
                info = f"{bad} skipped" if bad else ""
                bar.update(task, completed=done, rate=f"{rate:.1f} img/s", info=info)

            decode = lambda i: load_image(root / inputs.paths[i], resolution)
            decoded = _in_order(pool, decode, work, ahead=2 * encoder.batch_size + threads)
            for k in todo:
                count = min(size, n - k * size)
                shard = (next(decoded) for _ in range(count))
                record = _write_shard(out, k, inputs, shard, encoder, plan, advance)
                written += record["count"]
                skipped += record["skipped"]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return written, skipped


def latent_sums(moments: np.ndarray) -> dict[str, Any]:
    """Per channel, in float64, over one shard's examples and positions: the number of values
    `n`, the posterior means' mean and sum of squared deviations (`m2`), and the sum of the
    posterior variances."""
    mean, std = np.split(np.asarray(moments, np.float64), 2, axis=1)
    axes = (0, *range(2, mean.ndim))
    n = mean.size // mean.shape[1]
    centre = mean.mean(axis=axes) if n else np.zeros(mean.shape[1])
    deviations = mean - centre.reshape(-1, *[1] * (mean.ndim - 2))
    return {
        "n": n,
        "mean": centre.tolist(),
        "m2": (deviations**2).sum(axis=axes).tolist(),
        "sum_var": (std**2).sum(axis=axes).tolist(),
    }


# How `latent_stats` are defined (recorded in the manifest beside them).
LATENT_STATS_OF = (
    "posterior sample z = mean + std * eps over every example and position, per channel: "
    "mean_c = E[mean], std_c = sqrt(Var(mean) + E[std^2]) (population)"
)


def latent_stats(sums: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The channel-wise mean and std of posterior samples over all shards, from their
    `latent_sums` (combined pairwise as Chan et al.'s parallel variance, in float64).

    LightningDiT estimates the same quantities from one posterior sample of each of 10,000
    random latents (torch's unbiased std); REPA-E ships them with its VAEs. These are their
    exact values over the whole set, the same for any split into shards or workers."""
    n, mean, m2, sum_var = 0, 0.0, 0.0, 0.0
    for s in sums:
        nb = s["n"]
        if not nb:
            continue
        mb, m2b = np.asarray(s["mean"], np.float64), np.asarray(s["m2"], np.float64)
        total = n + nb
        delta = mb - mean
        mean = mean + delta * (nb / total)
        m2 = m2 + m2b + delta**2 * (n * nb / total)
        sum_var = sum_var + np.asarray(s["sum_var"], np.float64)
        n = total
    if not n:
        raise PreprocessError("no latents to compute statistics of: every shard is empty")
    std = np.sqrt(m2 / n + sum_var / n)
    return {"mean": np.asarray(mean).tolist(), "std": std.tolist(), "values_per_channel": n}


def finalize(out: str | Path) -> dict[str, Any]:
    """Write `out/manifest.json` from the complete shards; an error names the missing ones."""
    out = Path(out)
    plan = _read_plan(out)
    num_shards = _num_shards(plan)
    missing = [f"{k:05d}" for k in range(num_shards) if not _is_complete(out, k)]
    if missing:
        listed = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise PreprocessError(
            f"{len(missing)} of {num_shards} shards are not done yet ({listed}): run the "
            "workers that own them (shard k belongs to worker k % num_workers)"
        )
    shards, skipped, sums = [], [], []
    for k in range(num_shards):
        record = json.loads((shard_dir(out, k) / SHARD).read_text())
        path = f"shards/{k:05d}"
        shards.append({"path": path, "count": record["count"], "sha256": record["sha256"]})
        skipped += record["skipped"]
        if "latent_sums" not in record:  # a shard written before the sums were recorded
            record["latent_sums"] = latent_sums(np.load(shard_dir(out, k) / "moments.npy"))
        sums.append(record["latent_sums"])
    count = sum(s["count"] for s in shards)
    stats = latent_stats(sums) | {"count": count, "of": LATENT_STATS_OF} if count else None
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "resolution": plan["resolution"],
        "image_shape": plan["image_shape"],
        "moments_shape": plan["moments_shape"],
        "latent_scale": plan["latent_scale"],
        "num_examples": count,
        "num_classes": len(plan["classes"]),
        "classes": plan["classes"],
        "vae": plan["vae"],
        "latent_space": vae_space(plan["vae"]),
        "latent_stats": stats,
        "shard_size": plan["shard_size"],
        "shards": shards,
        "skipped": skipped,
    }
    write_json(out / MANIFEST, manifest, indent=1)
    return manifest
