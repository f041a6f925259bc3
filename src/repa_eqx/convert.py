"""`repa convert`: pretrained weights -> a cached, versioned JAX pytree that loads without torch.

A source is a Hub id (at a revision), a local folder in the Hub layout, or an official REPA
checkpoint file (`.pt` from sihyun-yu/REPA). It is loaded once through its family's converter
(DINOv2, CLIP vision tower, MAE, SD-VAE, REPA SiT) and written as `model.safetensors` (our
pytree's leaves by path) plus `config.json` (family, architecture, where it came from) under

    <cache>/converted/v1/<source>/<revision>/

where <revision> is the Hub commit, or a hash of a local folder's or file's bytes. A second
conversion of the same source and revision is a cache hit, which also works offline
(`HF_HUB_OFFLINE=1`) once the Hub files are cached.
"""

import dataclasses
import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from . import clip, dinov2, mae, vae
from ._paths import cache_dir
from .checkpoint import flatten, unflatten
from .hub import PretrainedNotFound

FORMAT = "repa-eqx-pytree/v1"


@dataclasses.dataclass(frozen=True)
class _Family:
    config_cls: type
    build: Callable[[Any], eqx.Module]  # config -> model (used under eval_shape)
    load: Callable[..., eqx.Module]  # (name_or_path, revision=...) -> model


FAMILIES: dict[str, _Family] = {
    "dinov2": _Family(
        dinov2.Dinov2Config, lambda c: dinov2.Dinov2(c, key=jax.random.key(0)), dinov2.load_dinov2
    ),
    "clip-vision": _Family(
        clip.ClipVisionConfig,
        lambda c: clip.ClipVision(c, key=jax.random.key(0)),
        clip.load_clip_vision,
    ),
    "vit-mae": _Family(mae.MaeConfig, lambda c: mae.Mae(c, key=jax.random.key(0)), mae.load_mae),
    "sd-vae": _Family(
        vae.VAEConfig, lambda c: vae.AutoencoderKL(c, key=jax.random.key(0)), vae.load_vae
    ),
}
_BY_MODEL_TYPE = {
    "dinov2": "dinov2",
    "dinov2_with_registers": "dinov2",
    "clip": "clip-vision",
    "clip_vision_model": "clip-vision",
    "vit_mae": "vit-mae",
}


def family_of(config: dict[str, Any]) -> str:
    """The family a transformers / diffusers `config.json` describes."""
    if config.get("_class_name") == "AutoencoderKL":
        return "sd-vae"
    model_type = config.get("model_type")
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    raise ValueError(
        f"cannot convert a {config.get('_class_name') or model_type!r} checkpoint: supported are "
        "DINOv2, CLIP, ViT-MAE (transformers), AutoencoderKL (diffusers), and official REPA .pt"
    )


def _hash_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _read_config(folder: Path) -> tuple[dict[str, Any], Path]:
    """The model's config.json (a diffusers pipeline keeps its VAE's in vae/)."""
    for candidate in (folder / "config.json", folder / "vae" / "config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text()), candidate.parent
    raise PretrainedNotFound(f"{folder} holds no config.json (nor vae/config.json)")


def _locate(source: str, revision: str | None) -> tuple[dict[str, Any], str, str]:
    """(config.json, the name to load from, the revision tag) without loading weights."""
    path = Path(source).expanduser()
    if path.is_dir():
        config, folder = _read_config(path)
        files = [folder / "config.json", *folder.glob("*.safetensors")]
        return config, str(path), f"local-{_hash_files(files)}"
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        snapshot = Path(
            snapshot_download(
                source, revision=revision, allow_patterns=["config.json", "vae/config.json"]
            )
        )
    except HFValidationError:
        raise PretrainedNotFound(
            f"{source!r} is neither a local folder or file nor a Hub repository id (owner/name)"
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        at = f" at revision {revision!r}" if revision else ""
        raise PretrainedNotFound(f"the Hub has no repository {source!r}{at}") from None
    except LocalEntryNotFoundError:
        raise PretrainedNotFound(
            f"{source!r} is not in the Hub cache and the Hub cannot be reached: connect once "
            "(HF_HUB_OFFLINE unset) to download it, or pass a local folder"
        ) from None
    config, _ = _read_config(snapshot)
    return config, source, snapshot.name  # the snapshot folder is named by its commit


def _slug(source: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", source.strip("/"))[-120:]


def _config_to_json(config) -> dict[str, Any]:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


def _config_from_json(cls: type, raw: dict[str, Any]):
    # JSON has no tuples: the dataclasses hold tuples (hashable, static in the pytree).
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def _write(out: Path, model, header: dict[str, Any]) -> Path:
    """Write atomically: a half-written conversion is never taken for a finished one."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: np.asarray(v) for k, v in flatten(model).items()}
    save_file(tensors, tmp / "model.safetensors")
    (tmp / "config.json").write_text(json.dumps(header, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def convert(
    source: str | Path,
    *,
    revision: str | None = None,
    official_args: dict[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Convert `source` once and return the folder of the converted pytree."""
    source = str(source)
    path = Path(source).expanduser()
    root = cache_dir() / "converted" / FORMAT.rsplit("/", 1)[-1]
    if path.is_file():  # an official REPA checkpoint
        from .official import load_official

        tag = f"file-{_hash_files([path])}"
        out = root / _slug(path.name) / tag
        if out.is_dir() and not force:
            return out
        model, info = load_official(path, **(official_args or {}))
        header = dict(
            format=FORMAT,
            family="repa-sit",
            config=info.args,
            source=str(path.resolve()),
            revision=tag,
            weights=info.weights,
            steps=info.steps,
        )
        return _write(out, model, header)
    if official_args:
        raise ValueError("official args apply to official REPA checkpoint files only")
    config_json, name, tag = _locate(source, revision)
    family = family_of(config_json)
    out = root / _slug(source) / tag
    if out.is_dir() and not force:
        return out
    model = FAMILIES[family].load(name, revision=revision)
    header = dict(
        format=FORMAT,
        family=family,
        config=_config_to_json(_model_config(family, config_json)),
        source=source,
        revision=tag,
    )
    return _write(out, model, header)


def _model_config(family: str, config_json: dict[str, Any]):
    return FAMILIES[family].config_cls.from_dict(config_json)


def load_converted(folder: str | Path) -> eqx.Module:
    """The model a `convert` folder holds (no torch, no conversion)."""
    folder = Path(folder)
    header_path = folder / "config.json"
    if not header_path.is_file() or not (folder / "model.safetensors").is_file():
        raise PretrainedNotFound(f"{folder} is not a converted model (config.json + safetensors)")
    header = json.loads(header_path.read_text())
    if header.get("format") != FORMAT:
        raise PretrainedNotFound(
            f"{folder} holds format {header.get('format')!r}, this version reads {FORMAT!r}: "
            "convert it again"
        )
    family = header["family"]
    if family == "repa-sit":
        from .model import REPAModel
        from .official import official_config

        config, z_dims, projector_dim = official_config(header["config"])
        skeleton = eqx.filter_eval_shape(
            REPAModel, config, z_dims, projector_dim, key=jax.random.key(0)
        )
    else:
        config = _config_from_json(FAMILIES[family].config_cls, header["config"])
        skeleton = eqx.filter_eval_shape(FAMILIES[family].build, config)
    return unflatten(load_file(folder / "model.safetensors"), skeleton)
