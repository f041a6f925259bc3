"""The Hugging Face Hub, for every loader: one download helper that turns the Hub's errors
into one readable line, and the folder layout every port reads (config.json + safetensors)."""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from ..core.errors import RepaError


class PretrainedNotFound(RepaError, ValueError):
    """The weights asked for are neither a usable local folder or file nor reachable on the Hub."""


def download(
    repo_id: str,
    *,
    revision: str | None = None,
    allow_patterns: Sequence[str] | None = None,
    ignore_patterns: Sequence[str] = (),
    endpoint: str | None = None,
    local_hint: str = "a local folder",
) -> Path:
    """The snapshot folder of the files of `repo_id` matching `allow_patterns`, downloaded once
    into the Hub cache (`HF_HUB_OFFLINE=1` reads the cache alone), none matching
    `ignore_patterns`. Every failure is a
    `PretrainedNotFound` saying what to do; `local_hint` names the local alternative."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {revision!r}" if revision else ""
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=list(allow_patterns) if allow_patterns else None,
                ignore_patterns=list(ignore_patterns) or None,
                endpoint=endpoint,
            )
        )
    except HFValidationError:
        raise PretrainedNotFound(
            f"{repo_id!r} is neither {local_hint} nor a Hub repository id (owner/name)"
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise PretrainedNotFound(
            f"the Hub has no repository {repo_id!r}{at} (or it is private or gated: log in "
            f"with `hf auth login`); or pass {local_hint}"
        ) from None
    except LocalEntryNotFoundError:
        raise PretrainedNotFound(
            f"{repo_id!r}{at} is not in the Hub cache and the Hub cannot be reached: connect "
            f"once (HF_HUB_OFFLINE unset) to download it, or pass {local_hint}"
        ) from None
    except HfHubHTTPError as error:
        raise PretrainedNotFound(f"{repo_id!r}: {str(error).splitlines()[0]}") from None


def check_folder(folder: Path, name: str) -> Path:
    """`folder` if it holds a config.json and safetensors weights, else a clear error."""
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


def load_safetensors(folder: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of every `*.safetensors` file in `folder`, merged into one dict."""
    tensors: dict[str, np.ndarray] = {}
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise PretrainedNotFound(f"No *.safetensors file in {folder}.")
    for file in files:
        try:
            part = load_file(file)
        except (SafetensorError, OSError) as e:
            raise PretrainedNotFound(f"{file} is damaged or unreadable ({e})") from None
        clash = tensors.keys() & part.keys()
        if clash:
            raise PretrainedNotFound(f"{file} repeats tensors of another shard: {sorted(clash)}")
        tensors.update(part)
    return tensors
