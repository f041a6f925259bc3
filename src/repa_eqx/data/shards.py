"""The latent-shard format `repa preprocess` writes and training reads:

    OUT/preprocess.json            the settings every run and worker must share (checked)
    OUT/shards/00000/images.npy    uint8 (n, 3, R, R): the centre-cropped RGB images
    OUT/shards/00000/moments.npy   float32 (n, 2 Cz, R/8, R/8): posterior mean, then std
    OUT/shards/00000/labels.npy    int32 (n,)
    OUT/shards/00000/shard.json    count, sha256 of the three arrays, the inputs skipped,
                                   float64 sums of the latents (`writer.latent_sums`)
    OUT/manifest.json              written last: its presence means the dataset is complete;
                                   it names the VAE, its latent space (`latent_space`) and
                                   the set's channel-wise statistics (`latent_stats`)

The arrays load with `np.load(path, mmap_mode="r")`. The writer is `writer.py`, the reader
`pipeline.LatentSource`; neither needs the other.
"""

import hashlib
import json
from pathlib import Path
from typing import Any

from ..core.errors import RepaError
from ..spaces.vae_latents import space_of

FORMAT = "repa-eqx-latents"
VERSION = 1
ARRAYS = ("images.npy", "moments.npy", "labels.npy")
PLAN, MANIFEST, SHARD = "preprocess.json", "manifest.json", "shard.json"


class PreprocessError(RepaError, ValueError):
    """Inputs or an output folder that cannot be preprocessed, resumed or read as asked."""


def shard_dir(out: Path, k: int) -> Path:
    return out / "shards" / f"{k:05d}"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


_REQUIRED = (
    "resolution",
    "image_shape",
    "moments_shape",
    "latent_scale",
    "num_examples",
    "num_classes",
    "classes",
    "shard_size",
    "shards",
    "skipped",
)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a preprocessed dataset (its folder, or its manifest.json), checked."""
    path = Path(path)
    file = path / MANIFEST if path.is_dir() else path
    if not file.is_file():
        if (file.parent / PLAN).is_file():
            raise PreprocessError(f"{file.parent} is not finished: it has no {MANIFEST} yet")
        raise PreprocessError(f"{file} does not exist: not a preprocessed dataset")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise PreprocessError(f"{file} is not valid JSON: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise PreprocessError(f"{file}: format {found!r}, expected {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise PreprocessError(
            f"{file}: version {manifest.get('version')!r}; this repa-eqx reads version {VERSION}"
        )
    absent = [key for key in _REQUIRED if key not in manifest]
    if absent:
        raise PreprocessError(f"{file} lacks {', '.join(absent)}")
    total = sum(shard["count"] for shard in manifest["shards"])
    if total != manifest["num_examples"]:
        raise PreprocessError(
            f"{file}: the shards hold {total} examples, num_examples says "
            f"{manifest['num_examples']}"
        )
    return manifest


def verify(path: str | Path) -> dict[str, Any]:
    """Recompute every shard file's checksum; an error names each missing or changed file."""
    manifest = read_manifest(path)
    path = Path(path)
    root = path if path.is_dir() else path.parent
    bad = []
    for shard in manifest["shards"]:
        for name, expected in shard["sha256"].items():
            file = root / shard["path"] / name
            if not file.is_file():
                bad.append(f"{shard['path']}/{name} (missing)")
            elif sha256(file) != expected:
                bad.append(f"{shard['path']}/{name} (checksum mismatch)")
    if bad:
        raise PreprocessError(f"{root}: {len(bad)} file(s) fail verification: {', '.join(bad)}")
    return manifest


def vae_space(vae: dict[str, Any]) -> str:
    """The latent space of the VAE a plan or manifest records ({source, revision}): as
    `spaces.space_of`, a local folder by the hash recorded when it was read."""
    if str(vae.get("revision") or "").startswith("local-"):
        return vae["revision"]
    return space_of(vae["source"])


def manifest_space(manifest: dict[str, Any]) -> str:
    """The latent space of a preprocessed dataset (a manifest written before `latent_space`
    was recorded: its VAE's)."""
    return manifest.get("latent_space") or vae_space(manifest["vae"])
