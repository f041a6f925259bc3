"""The conversion cache: converted networks as a flat safetensors pytree plus a JSON header,

    <cache>/converted/v1/<source>/<revision>/{model.safetensors, config.json}

where <revision> is the Hub commit, or a content hash of a local folder's or file's bytes.
`repa convert` writes it; the loaders read it when it holds their source at its revision.
"""

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from ..core.files import atomic_dir
from ..core.paths import cache_dir
from ..core.pytree import flatten, unflatten
from ._hub import PretrainedNotFound

FORMAT = "repa-eqx-pytree/v1"
HEADER, WEIGHTS = "config.json", "model.safetensors"


def root() -> Path:
    return cache_dir() / "converted" / FORMAT.rsplit("/", 1)[-1]


def _slug(source: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", source.strip("/"))[-120:]


def folder(source: str, tag: str) -> Path:
    """Where the conversion of `source` at revision `tag` lives (whether or not it exists)."""
    return root() / _slug(source) / tag


def has_source(source: str) -> bool:
    """Whether any revision of `source` was converted (cheap: no hashing)."""
    return (root() / _slug(source)).is_dir()


def hash_files(files: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def write(out: Path, model, header: dict[str, Any]) -> Path:
    """Write atomically: a half-written conversion is never taken for a finished one."""
    with atomic_dir(out) as scratch:
        save_file({k: np.asarray(v) for k, v in flatten(model).items()}, scratch / WEIGHTS)
        (scratch / HEADER).write_text(json.dumps({"format": FORMAT, **header}, indent=2))
    return out


def read_header(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not (path / HEADER).is_file() or not (path / WEIGHTS).is_file():
        raise PretrainedNotFound(f"{path} is not a converted model (config.json + safetensors)")
    header = json.loads((path / HEADER).read_text())
    if header.get("format") != FORMAT:
        raise PretrainedNotFound(
            f"{path} holds format {header.get('format')!r}, this version reads {FORMAT!r}: "
            "convert it again"
        )
    return header


def read(path: str | Path, skeleton):
    """The converted weights of `path` in `skeleton` (a network or its `eval_shape`)."""
    file = Path(path) / WEIGHTS
    try:
        tensors = load_file(file)
    except (SafetensorError, OSError) as e:
        raise PretrainedNotFound(
            f"{file} is damaged or unreadable ({e}): convert again with `repa convert "
            "SOURCE --force`, or delete the folder"
        ) from None
    return unflatten(tensors, skeleton)
