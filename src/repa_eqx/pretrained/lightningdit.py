"""LightningDiT's checkpoints (hustvl/LightningDiT) in our SiT with its switches, without torch.

The released files (hustvl/lightningdit-xl-imagenet256-800ep and -64ep on the Hub) and those
of its train.py ({"model", "ema", "opt", "config"}: inference.py samples with "ema") hold a
LightningDiT state dict: DiT's names (official.py's targets) plus `mlp.w12` / `mlp.w3`
(SwiGLU), `norm1` / `norm2` / `final_layer.norm_final` (RMSNorm), `attn.q_norm` / `attn.k_norm`
and the frozen `pos_embed` and `feat_rope.freqs_{cos,sin}` tables, checked against ours.

The architecture is read from the tensors: width, channels and patch from the patch
embedding, depth from the block count, classes from the label table, the latent grid from
`pos_embed`, SwiGLU / RMSNorm / q-k norm / RoPE / no-shift adaLN from which tensors exist, the
head dim from the q-k norms or the RoPE table. Otherwise the heads come from the named size of
that width and depth, the train.py `config` (its `model.model_type`), or a hint. Its time is
SiT's (t = 1 at the data): the SiT gets `data_at_t1`.
"""

import dataclasses
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np

from ..core.errors import ConfigError
from ..model.repa import REPAModel
from ..model.sit import ENCODER_DEPTHS, SIZES, SiT, SiTConfig
from . import _cache
from ._convert import WeightsMismatch
from ._hub import PretrainedNotFound, download
from ._torch_pickle import UnreadableCheckpoint, read_pt
from .official import (
    official_state_dict,
    official_tag,
    read_checkpoint,
    sit_from_state_dict,
    strip_wrappers,
)

FAMILY = "lightningdit"  # the conversion cache's name for these
# The released ImageNet 256 models: LightningDiT-XL/1 on VA-VAE f16d32 latents (16x16x32).
RELEASED = (
    "hustvl/lightningdit-xl-imagenet256-800ep",
    "hustvl/lightningdit-xl-imagenet256-64ep",
)
_HINTS = frozenset({"model", "input_size", "num_heads", "encoder_depth", "data_at_t1"})
_NAME = re.compile(r"LightningDiT-(S|B|L|XL|1p0B|1p6B)/(1|2|4|8)")
# Tensors only LightningDiT's switches make: how its state dicts are told apart.
_MARKS = ("mlp.w12.weight", "norm1.weight", "attn.q_norm.weight")


def _shapes(tensors: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(np.shape(v)) for k, v in strip_wrappers(dict(tensors)).items()}


def is_lightningdit_state_dict(tensors: Mapping[str, Any]) -> bool:
    """Whether a state dict has a LightningDiT switch's tensors (or its RoPE table) and no
    REPA projectors."""
    names = strip_wrappers(dict(tensors)).keys()
    if any(n.startswith("projectors.") for n in names):
        return False
    return "feat_rope.freqs_cos" in names or any(
        n.startswith("blocks.0.") and n.endswith(m) for n in names for m in _MARKS
    )


def _read(path: Path, use_ema: bool) -> tuple[Mapping[str, Any], dict, str]:
    """(state dict, train.py `config` or {}, which weights) of a `.pt` or safetensors."""
    if not zipfile.is_zipfile(path):
        tensors, _, weights, _ = read_checkpoint(path, use_ema)
        return tensors, {}, weights
    saved = read_pt(path)
    if not isinstance(saved, Mapping):
        raise UnreadableCheckpoint(f"{path} holds a {type(saved).__name__}, not a state dict")
    if all(isinstance(v, np.ndarray) for v in saved.values()):  # a bare state dict
        return saved, {}, "state_dict"
    # inference.py: `if "ema" in checkpoint: checkpoint = checkpoint["ema"]`
    which = "ema" if use_ema and "ema" in saved else "model"
    if which not in saved:
        raise UnreadableCheckpoint(f"{path} has no {which!r} state dict (it holds {sorted(saved)})")
    config = saved.get("config")
    return saved[which], dict(config) if isinstance(config, Mapping) else {}, which


def is_lightningdit_checkpoint(path: str | Path) -> bool:
    """Whether `path` (a torch.save file or safetensors) holds a LightningDiT state dict."""
    try:
        tensors, _, _ = _read(Path(path), use_ema=True)
    except (ValueError, OSError, pickle.UnpicklingError):  # whoever loads it next says why
        return False
    return is_lightningdit_state_dict(tensors)


def _hints_from_config(train_config: Mapping[str, Any]) -> dict[str, Any]:
    """What LightningDiT's train.py `config` says about the model: its named size."""
    model = train_config.get("model")
    if isinstance(model, Mapping) and isinstance(model.get("model_type"), str):
        return {"model": model["model_type"]}
    return {}


def lightningdit_config(
    tensors: Mapping[str, Any],
    *,
    model: str | None = None,
    input_size: int | None = None,
    num_heads: int | None = None,
    encoder_depth: int | None = None,
    data_at_t1: bool = True,
) -> SiTConfig:
    """The SiT config a LightningDiT state dict describes (see the module docstring).
    `model` ("LightningDiT-XL/1"), `input_size` (the latent grid) and `num_heads` stand in
    for what the tensors cannot tell; `encoder_depth` (where REPA would align) defaults to
    the named size's; `data_at_t1` is its time (see `SiTConfig`)."""
    shapes = _shapes(tensors)
    patch_shape = shapes.get("x_embedder.proj.weight")
    if patch_shape is None or len(patch_shape) != 4:
        raise WeightsMismatch("not a LightningDiT state dict: no x_embedder.proj.weight kernel")
    hidden, channels, patch, _ = patch_shape
    depth = 1 + max(
        (int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1
    )
    if depth == 0:
        raise WeightsMismatch("not a LightningDiT state dict: it has no blocks.*")
    block = {k.removeprefix("blocks.0."): v for k, v in shapes.items() if k.startswith("blocks.0.")}
    swiglu = "mlp.w12.weight" in block
    adaln = block.get("adaLN_modulation.1.weight")
    wo_shift = adaln is not None and adaln[0] == 4 * hidden

    named = _NAME.search(model) if model else None
    head_dim = None
    if "attn.q_norm.weight" in block:
        head_dim = block["attn.q_norm.weight"][0]
    elif "feat_rope.freqs_cos" in shapes:
        head_dim = shapes["feat_rope.freqs_cos"][-1]
    size = next((s for s, (d, h, _) in SIZES.items() if (d, h) == (depth, hidden)), None)
    if size is None and named is not None:
        size = named.group(1)
    if num_heads is None:
        if head_dim:
            num_heads = hidden // head_dim
        elif size is not None:
            num_heads = SIZES[size][2]
        else:
            raise ConfigError(
                f"a LightningDiT of depth {depth} and width {hidden} is no named size: "
                "pass num_heads"
            )

    if "pos_embed" in shapes:
        input_size = round(int(np.prod(shapes["pos_embed"][:-1])) ** 0.5) * patch
    elif input_size is None:
        raise ConfigError("the state dict has no pos_embed: pass input_size (the latent grid)")

    table = shapes.get("y_embedder.embedding_table.weight")
    out = shapes.get("final_layer.linear.weight")
    if table is None or out is None:
        raise WeightsMismatch("not a LightningDiT state dict: no label table or final layer")
    if out[0] != channels * patch * patch:
        raise ConfigError(
            f"final_layer.linear has {out[0]} outputs, not {channels} channels x {patch}^2: "
            "learn_sigma LightningDiTs are not supported"
        )
    if encoder_depth is None:
        encoder_depth = min(depth, ENCODER_DEPTHS[size]) if size else depth
    return SiTConfig(
        input_size=input_size,
        patch_size=patch,
        in_channels=channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=num_heads,
        num_classes=table[0] - 1,  # the last row is the null class of guidance
        encoder_depth=encoder_depth,
        mlp="swiglu" if swiglu else "gelu",
        norm="rmsnorm" if "norm1.weight" in block else "layernorm",
        rope="feat_rope.freqs_cos" in shapes,
        qk_norm="attn.q_norm.weight" in block,
        wo_shift=wo_shift,
        data_at_t1=data_at_t1,
    )


@dataclasses.dataclass(frozen=True)
class LightningDiTInfo:
    weights: str  # "ema", "model", or "state_dict" for a file holding a single one
    pos_embed_max_diff: float | None  # vs the exact sin-cos table


def from_lightningdit_state_dict(
    tensors: Mapping[str, Any], config: SiTConfig
) -> tuple[SiT, float | None]:
    """Our SiT with every leaf from a LightningDiT state dict, and the `pos_embed` difference.

    Raises `WeightsMismatch` listing every missing, unexpected and wrong-shape tensor, and a
    `pos_embed` or RoPE table that is not ours."""
    model, pos_diff = sit_from_state_dict(tensors, config, (), projector_dim=1)
    return model.sit, pos_diff


def lightningdit_state_dict(sit: SiT) -> dict[str, np.ndarray]:
    """Our SiT under LightningDiT's state-dict names, float32, with its frozen `pos_embed`
    and RoPE tables: what `LightningDiT.load_state_dict` takes. The weights keep the SiT's
    time: one trained here (REPA's time, `data_at_t1` False) is not in LightningDiT's; load
    it back with the hint `data_at_t1=0`."""
    skeleton = eqx.filter_eval_shape(REPAModel, sit.config, (), key=jax.random.key(0))
    return official_state_dict(eqx.tree_at(lambda m: m.sit, skeleton, sit))


def _converted(path: Path) -> tuple[SiT, dict] | None:
    """`repa convert`'s copy of this file, if it made one."""
    if not _cache.has_source(path.name):
        return None
    folder = _cache.folder(path.name, official_tag(path))
    if not folder.is_dir():
        return None
    header = _cache.read_header(folder)
    if header.get("family") != FAMILY:
        return None
    return _cache.read(folder, skeleton(header["config"])), header


def skeleton(config: Mapping[str, Any]) -> SiT:
    """The shape-only SiT of a conversion header's config (`dataclasses.asdict`)."""
    return eqx.filter_eval_shape(SiT, SiTConfig(**config), key=jax.random.key(0))


def load_lightningdit(
    path: str | Path, *, use_ema: bool = True, **hints
) -> tuple[SiT, LightningDiTInfo]:
    """Our SiT from a LightningDiT checkpoint: a released file, one of its train.py's
    (`use_ema` picks "ema", what inference.py samples with, or "model"), a bare state dict,
    or a safetensors of the same names; from the conversion cache when `repa convert`
    converted this file. `hints`: see `lightningdit_config`."""
    unknown = sorted(set(hints) - _HINTS)
    if unknown:
        raise ConfigError(f"unknown LightningDiT hints {unknown}; known: {sorted(_HINTS)}")
    if hints.get("data_at_t1", True) not in (True, False):  # the CLI gives 0 / 1
        raise ConfigError(f"data_at_t1 must be 0 or 1, got {hints['data_at_t1']!r}")
    hints = {k: bool(v) if k == "data_at_t1" else v for k, v in hints.items()}
    path = Path(path)
    if use_ema and not hints:
        converted = _converted(path)
        if converted is not None:
            sit, header = converted
            return sit, LightningDiTInfo(header["weights"], header.get("pos_embed_max_diff"))
    return _load_file(path, use_ema, hints)


def _load_file(path: Path, use_ema: bool, hints: Mapping[str, Any]):
    tensors, train_config, weights = _read(path, use_ema)
    config = lightningdit_config(tensors, **(_hints_from_config(train_config) | dict(hints)))
    sit, pos_diff = from_lightningdit_state_dict(tensors, config)
    return sit, LightningDiTInfo(weights, pos_diff)


def download_lightningdit(repo_id: str, *, revision: str | None = None) -> Path:
    """The one `.pt` of a LightningDiT Hub repository (e.g. `RELEASED`), fetched into the
    Hub cache (read from the cache alone under `HF_HUB_OFFLINE=1`)."""
    folder = download(
        repo_id, revision=revision, allow_patterns=["*.pt"], local_hint="a local .pt file"
    )
    files = sorted(folder.rglob("*.pt"))
    if len(files) != 1:
        held = ", ".join(f.name for f in files) or "no .pt file"
        raise PretrainedNotFound(f"{repo_id!r} should hold one LightningDiT .pt; it holds {held}")
    return files[0]


def convert_lightningdit(path: str | Path, source: str, *, force: bool = False) -> Path:
    """`repa convert` of a LightningDiT checkpoint file (its EMA weights) into the
    conversion cache; `source` names it in the header (a Hub id or the file)."""
    path = Path(path)
    out = _cache.folder(path.name, official_tag(path))
    if out.is_dir() and not force:
        return out
    sit, info = _load_file(path, True, {})
    header = dict(
        family=FAMILY,
        config=dataclasses.asdict(sit.config),
        source=source,
        revision=out.name,
        weights=info.weights,
        pos_embed_max_diff=info.pos_embed_max_diff,
    )
    return _cache.write(out, sit, header)
