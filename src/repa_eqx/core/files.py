"""Atomic writes: a reader never sees half a file or half a folder under its final name.

A file or folder is written beside its target under a unique temporary name and renamed onto
it when complete (a rename within one folder is atomic). An interrupted write leaves at most a
temporary file starting with "." that the next write ignores.
"""

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import RepaError, StorageError


@contextlib.contextmanager
def storage_errors(path: str | Path, doing: str = "write") -> Iterator[None]:
    """OSErrors of the block (no permission, a full disk, ...) as one `StorageError` line
    naming `path`."""
    try:
        yield
    except RepaError:
        raise
    except OSError as e:
        raise StorageError(f"cannot {doing} {path}: {e.strerror or e}") from e


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` (with the same suffix, so numpy adds none) to write in
    the block; renamed onto `path` when the block ends without error, removed otherwise."""
    path = Path(path)
    with storage_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(
            prefix=f".{path.stem}-", suffix=f".tmp{path.suffix}", dir=path.parent
        )
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, value: Any, *, indent: int = 2) -> Path:
    return write_text(path, json.dumps(value, indent=indent) + "\n")


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """A fresh folder beside `target` to fill in the block; when the block ends without error
    it takes the place of `target` (whatever was there goes). If another process renamed its
    own finished folder there first, theirs is kept: it was written the same way."""
    target = Path(target)
    with storage_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            yield scratch
            shutil.rmtree(target, ignore_errors=True)
            try:
                scratch.rename(target)
            except OSError:
                if not target.is_dir():
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
