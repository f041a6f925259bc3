"""The official PyTorch REPA checkpoints (sihyun-yu/REPA) into and out of our SiT + projectors.

Files are read without torch (`_torch_pickle.read_pt`: a restricted unpickler that refuses
anything but tensors and plain containers). `load_official` turns the reference's checkpoint (its
`model` / `ema` state dicts and `args`) into a `REPAModel`; `export_official` writes ours in
that layout: safetensors always, a `.pt` as the reference's train.py saves it when torch is
importable.
"""

import argparse
import collections
import dataclasses
import json
import types
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from ..core.errors import ConfigError
from ..model.repa import REPAModel
from ..model.sit import SiTConfig, rope_tables, sincos_pos_embed_2d
from . import _cache
from ._convert import Target, WeightsMismatch, fill
from ._torch_pickle import UnreadableCheckpoint, read_pt

FAMILY = "repa-sit"  # the conversion cache's name for these

# ------------------------------------------------------------------ the reference's `args`

# train.py's defaults for the fields that shape the model but may be absent from `args`.
_ARGS_DEFAULTS = {"resolution": 256, "num_classes": 1000, "qk_norm": False}
# Not in the reference's `args` (it only builds named sizes with a 2048-wide projector):
# they describe custom models, e.g. a tiny test one.
_EXTENSIONS = ("depth", "hidden_size", "num_heads", "in_channels", "projector_dim")
# REG's SiT (Martinser/REG) has a CLS token of the first encoder's width (its `cls_token_dim`),
# told apart by its tensors (`cls_projectors2.*`); the loader records the width here.
_REG_FIELD = "cls_token_dim"
_REG_MARK = "cls_projectors2.weight"
_ARGS_FIELDS = frozenset(
    {"model", "encoder_depth", "enc_type", "projector_embed_dims", "fused_attn"}
    | set(_ARGS_DEFAULTS)
    | set(_EXTENSIONS)
    | {_REG_FIELD}
)
# ViT width by size letter: the last part of an `enc_type` entry such as "dinov2-vit-b".
_VIT_WIDTHS = {"s": 384, "b": 768, "l": 1024, "h": 1280, "g": 1536}
_VAE_FACTOR = 8  # the reference's latent grid is resolution / 8 (sd-vae)


def _z_dims(args: Mapping[str, Any]) -> tuple[int, ...]:
    dims = args.get("projector_embed_dims")
    if dims is not None:  # generate.py's "768,1024"
        return tuple(int(d) for d in (dims.split(",") if isinstance(dims, str) else dims))
    widths = []
    for name in args["enc_type"].split(","):  # train.py's "dinov2-vit-b,clip-vit-L"
        size = name.rsplit("-", 1)[-1].lower()
        if size not in _VIT_WIDTHS:
            raise ConfigError(
                f"cannot tell the width of encoder {name!r}: pass projector_embed_dims"
            )
        widths.append(_VIT_WIDTHS[size])
    return tuple(widths)


def official_config(args: Mapping[str, Any]) -> tuple[SiTConfig, tuple[int, ...], int]:
    """(SiT config, projector output widths, projector width) that the reference's `args` build.

    Reads `model` ("SiT-XL/2"), `encoder_depth`, `resolution` (latent grid = resolution / 8),
    `num_classes`, `qk_norm` (timm's q/k LayerNorms), and `projector_embed_dims`
    ("768,1024") or else `enc_type` ("dinov2-vit-b": the encoder's width). Our extensions
    `depth`, `hidden_size`, `num_heads`, `in_channels` and `projector_dim` describe models
    outside the named sizes.
    The label dropout is the reference SiT's fixed 0.1 (its `cfg_prob` only matters for the
    `legacy` double dropout in training).
    """
    given = {k: v for k, v in args.items() if v is not None}
    missing = [k for k in ("model", "encoder_depth") if k not in given]
    if "projector_embed_dims" not in given and "enc_type" not in given:
        missing.append("projector_embed_dims (or enc_type)")
    if missing:
        raise ConfigError(
            f"the checkpoint's args lack {', '.join(missing)}: pass them as keyword arguments "
            "(the released SiT-XL/2 last.pt: model='SiT-XL/2', encoder_depth=8, "
            "projector_embed_dims='768')"
        )
    args = _ARGS_DEFAULTS | given
    if args["resolution"] % _VAE_FACTOR:
        raise ConfigError(f"resolution {args['resolution']} is not a multiple of {_VAE_FACTOR}")
    sizes = {
        k: int(args[k]) for k in ("depth", "hidden_size", "num_heads", "in_channels") if k in args
    }
    config = SiTConfig.from_name(
        args["model"],
        input_size=int(args["resolution"]) // _VAE_FACTOR,
        num_classes=int(args["num_classes"]),
        encoder_depth=int(args["encoder_depth"]),
        cls_dim=int(args.get(_REG_FIELD) or 0),
        qk_norm=bool(args["qk_norm"]),  # timm's per-head LayerNorms, our `qk_norm`
        **sizes,
    )
    return config, _z_dims(args), int(args.get("projector_dim", 2048))


def reg_args(tensors: Mapping[str, Any], args: Mapping[str, Any]) -> dict[str, Any]:
    """`args` with REG's CLS width when the state dict is REG's (its `cls_projectors2`
    Linear maps the teacher's CLS, of the first projector's output width, to the SiT)."""
    args = dict(args)
    weight = strip_wrappers(dict(tensors)).get(_REG_MARK)
    if weight is not None and not args.get(_REG_FIELD):
        args[_REG_FIELD] = int(np.shape(weight)[1])
    return args


# ------------------------------------------------------------------------------ names


def _linear(names: str | list[str], where) -> list[Target]:
    def suffixed(leaf: str):
        return f"{names}.{leaf}" if isinstance(names, str) else [f"{n}.{leaf}" for n in names]

    return [
        Target(suffixed("weight"), lambda m: where(m).weight),
        Target(suffixed("bias"), lambda m: where(m).bias),
    ]


def _norm(names: str | list[str], where, config: SiTConfig) -> list[Target]:
    """An affine norm's weight (and a LayerNorm's bias: `qk_norm` without "rmsnorm")."""
    leaves = ("weight",) if config.norm == "rmsnorm" else ("weight", "bias")

    def suffixed(leaf: str):
        return f"{names}.{leaf}" if isinstance(names, str) else [f"{n}.{leaf}" for n in names]

    return [Target(suffixed(leaf), lambda m, a=leaf: getattr(where(m), a)) for leaf in leaves]


def targets(config: SiTConfig, num_projectors: int) -> list[Target]:
    """Where each of the reference's state-dict tensors goes in a `REPAModel`. No transforms:
    timm's Attention lays qkv out as (3, heads, head_dim) like ours, the adaLN chunks come in
    the same order (shift, scale, gate for attention, then for the MLP), and the patch conv
    kernel is stored as torch's (hidden, channels, p, p). LightningDiT's switches add its
    names: `mlp.w12` / `mlp.w3` (SwiGLU: gate half first, like ours), `norm1` / `norm2` and
    `final_layer.norm_final` (RMSNorm), `attn.q_norm` / `attn.k_norm`."""
    targets = [
        Target("x_embedder.proj.weight", lambda m: m.sit.patch_weight),
        Target("x_embedder.proj.bias", lambda m: m.sit.patch_bias),
        *_linear("t_embedder.mlp.0", lambda m: m.sit.t_fc1),
        *_linear("t_embedder.mlp.2", lambda m: m.sit.t_fc2),
        Target("y_embedder.embedding_table.weight", lambda m: m.sit.label_table),
        *_linear("final_layer.adaLN_modulation.1", lambda m: m.sit.final_adaln),
        *_linear("final_layer.linear", lambda m: m.sit.final_linear),
    ]
    swiglu = config.mlp == "swiglu"
    blocks = {
        "attn.qkv": "qkv",
        "attn.proj": "proj",
        "mlp.w12" if swiglu else "mlp.fc1": "fc1",
        "mlp.w3" if swiglu else "mlp.fc2": "fc2",
        "adaLN_modulation.1": "adaln",
    }
    for theirs, ours in blocks.items():
        names = [f"blocks.{i}.{theirs}" for i in range(config.depth)]
        targets += _linear(names, lambda m, a=ours: getattr(m.sit.blocks, a))
    norms = []
    if config.norm == "rmsnorm":
        norms += [("norm1", "norm1"), ("norm2", "norm2")]
        targets += _norm("final_layer.norm_final", lambda m: m.sit.final_norm, config)
    if config.qk_norm:
        norms += [("attn.q_norm", "q_norm"), ("attn.k_norm", "k_norm")]
    for theirs, ours in norms:
        names = [f"blocks.{i}.{theirs}" for i in range(config.depth)]
        targets += _norm(names, lambda m, a=ours: getattr(m.sit.blocks, a), config)
    if config.cls_dim:  # REG: its CLS token's way in and out
        targets += [
            *_linear("cls_projectors2", lambda m: m.sit.cls_token.embed),
            Target("wg_norm.weight", lambda m: m.sit.cls_token.norm_weight),
            Target("wg_norm.bias", lambda m: m.sit.cls_token.norm_bias),
            *_linear("final_layer.linear_cls", lambda m: m.sit.cls_token.out),
        ]
    for j in range(num_projectors):
        for index, ours in (("0", "fc1"), ("2", "fc2"), ("4", "fc3")):
            targets += _linear(
                f"projectors.{j}.{index}", lambda m, j=j, a=ours: getattr(m.projectors[j], a)
            )
    return targets


# Wrappers added around the whole model by DDP (`module.`) and torch.compile (`_orig_mod.`).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrappers(tensors: dict[str, Any]) -> dict[str, Any]:
    for prefix in _WRAPPER_PREFIXES:
        if tensors and all(name.startswith(prefix) for name in tensors):
            return strip_wrappers({k.removeprefix(prefix): v for k, v in tensors.items()})
    return tensors


def _canonical_names(tensors: Mapping[str, Any], encoder_depth: int) -> dict[str, Any]:
    tensors = strip_wrappers(dict(tensors))
    # Early REPA checkpoints (generate.py --legacy) kept the blocks after the projector tap
    # as decoder_blocks.{i - encoder_depth}.
    renamed = {}
    for name, value in tensors.items():
        if name.startswith("decoder_blocks."):
            _, index, rest = name.split(".", 2)
            name = f"blocks.{int(index) + encoder_depth}.{rest}"
        renamed[name] = value
    return renamed


# The reference's update_ema also averages the frozen position table, and fp32 rounding lets
# the EMA copy drift from it (up to ~6e-4 at decay 0.9999; sin-cos values lie in [-1, 1]).
# Any other table differs by O(1).
_POS_EMBED_ATOL = 1e-3


def _pos_embed_check(stored, config: SiTConfig) -> tuple[str | None, float | None]:
    """(problem, max |stored - ours|) for the checkpoint's frozen position table."""
    if stored is None:
        return None, None
    ours = sincos_pos_embed_2d(config.hidden_size, config.grid_size)
    if config.cls_dim:  # REG: a zero row for the CLS token first
        ours = np.concatenate([np.zeros((1, config.hidden_size), np.float32), ours])
    stored = np.asarray(stored)
    if tuple(d for d in stored.shape if d != 1) != ours.shape:
        return (
            f"pos_embed {tuple(stored.shape)} is not a {config.grid_size}x{config.grid_size} "
            f"grid{' with a CLS row' if config.cls_dim else ''} of width {config.hidden_size} "
            f"(expected (1, {ours.shape[0]}, "
            f"{ours.shape[1]}): wrong resolution?)",
            None,
        )
    if not np.issubdtype(stored.dtype, np.floating) and stored.dtype != ml_dtypes.bfloat16:
        return f"pos_embed has dtype {stored.dtype}, not a float table", None
    diff = float(np.abs(stored.reshape(ours.shape).astype(np.float32) - ours).max())
    # A half-precision copy is also off by its rounding.
    tolerance = max(_POS_EMBED_ATOL, 2 * float(ml_dtypes.finfo(stored.dtype).eps))
    if not diff <= tolerance:
        return f"pos_embed is not the fixed 2-D sin-cos table (max difference {diff:.3g})", diff
    return None, diff


# LightningDiT's RoPE buffers (float32 cos / sin of the same angles as ours).
_ROPE_BUFFERS = ("feat_rope.freqs_cos", "feat_rope.freqs_sin")
_ROPE_ATOL = 1e-4


def _rope_check(tensors: Mapping[str, Any], config: SiTConfig) -> str | None:
    """The problem with the checkpoint's frozen RoPE tables (with `rope`), if any."""
    if not config.rope:
        return None
    grid = config.grid_size
    for name, ours in zip(_ROPE_BUFFERS, rope_tables(config.head_dim, grid), strict=True):
        stored = tensors.get(name)
        if stored is None:
            continue
        stored = np.asarray(stored, np.float32)
        if stored.shape != ours.shape:
            return (
                f"{name} {tuple(stored.shape)} is not a {grid}x{grid} grid of head dim "
                f"{config.head_dim} (expected {ours.shape})"
            )
        if not float(np.abs(stored - ours).max()) <= _ROPE_ATOL:
            return f"{name} is not the 2-D rotary table of the grid"
    return None


def _describe(config: SiTConfig, z_dims: Sequence[int]) -> str:
    family = "DiT" if config.learn_sigma else ("REG SiT" if config.cls_dim else "SiT")
    switches = [config.mlp] if config.mlp != "gelu" else []
    switches += [config.norm] if config.norm != "layernorm" else []
    switches += [s for s in ("rope", "qk_norm", "wo_shift") if getattr(config, s)]
    family += f" ({', '.join(switches)})" if switches else ""
    projectors = f", with projectors to {tuple(z_dims)}" if z_dims else ""
    return (
        f"a {family} of depth {config.depth}, width {config.hidden_size}, patch "
        f"{config.patch_size}, {config.num_classes} classes{projectors}"
    )


def sit_from_state_dict(
    tensors: Mapping[str, Any], config: SiTConfig, z_dims: tuple[int, ...], projector_dim: int
) -> tuple[REPAModel, float | None]:
    """A `REPAModel` from a state dict in the reference's names (a DiT's too: the reference
    kept DiT's module names), and the largest difference of its frozen `pos_embed` from our
    sin-cos table (None when it has none)."""
    tensors = _canonical_names(tensors, config.encoder_depth)
    skeleton = jax.eval_shape(
        lambda: REPAModel(config, z_dims, projector_dim, key=jax.random.key(0))
    )
    what = _describe(config, z_dims)
    pos_problem, pos_diff = _pos_embed_check(tensors.get("pos_embed"), config)
    pos_problem = pos_problem or _rope_check(tensors, config)
    ignored = ("pos_embed", *(_ROPE_BUFFERS if config.rope else ()))
    try:
        model = fill(skeleton, tensors, targets(config, len(z_dims)), what=what, ignored=ignored)
    except WeightsMismatch as e:
        if pos_problem:
            raise WeightsMismatch(f"{e}; {pos_problem}") from None
        raise
    if pos_problem:
        raise WeightsMismatch(f"checkpoint does not fit {what}: {pos_problem}")
    return model, pos_diff


def from_official_state_dict(
    tensors: Mapping[str, Any],
    config: SiTConfig,
    z_dims: Sequence[int],
    projector_dim: int = 2048,
) -> REPAModel:
    """A `REPAModel` with every leaf from the reference's state dict (arrays by name).

    Raises `WeightsMismatch` listing every missing, unexpected and wrong-shape tensor, and a
    `pos_embed` that is not our sin-cos table (a frozen buffer: checked, not loaded).
    """
    return sit_from_state_dict(tensors, config, tuple(z_dims), projector_dim)[0]


def official_state_dict(model: REPAModel) -> dict[str, np.ndarray]:
    """Our parameters under the reference's state-dict names, float32 (the reference keeps fp32
    weights), with the frozen `pos_embed` table its `load_state_dict` expects."""
    out: dict[str, np.ndarray] = {}
    for target in targets(model.sit.config, len(model.projectors)):
        value = np.asarray(target.where(model), np.float32)
        if isinstance(target.names, str):
            out[target.names] = value
        else:  # one tensor per layer of a stacked leaf
            out.update(zip(target.names, value, strict=True))
    c = model.sit.config
    table = sincos_pos_embed_2d(c.hidden_size, c.grid_size)
    if c.cls_dim:
        table = np.concatenate([np.zeros((1, c.hidden_size), np.float32), table])
    out["pos_embed"] = table[None]
    if c.rope:
        out.update(zip(_ROPE_BUFFERS, rope_tables(c.head_dim, c.grid_size), strict=True))
    return out


# ------------------------------------------------------------------------- load / export


@dataclasses.dataclass(frozen=True)
class OfficialInfo:
    args: dict[str, Any]  # the checkpoint's `args` with the caller's overrides applied
    weights: str  # "ema", "model", or "state_dict" for a file holding a single one
    steps: int | None  # training steps, when the checkpoint records them
    pos_embed_max_diff: float | None  # vs the exact sin-cos table (EMA rounding drift)


_ARGS_KEY, _WEIGHTS_KEY = "repa_args", "repa_weights"  # safetensors metadata


def read_checkpoint(path: Path, use_ema: bool) -> tuple[Mapping[str, Any], dict, str, int | None]:
    """(state dict, args, which weights, steps) from a `.pt` or our `.safetensors`."""
    if not zipfile.is_zipfile(path):
        try:
            with safe_open(path, framework="numpy") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except SafetensorError as e:
            raise UnreadableCheckpoint(
                f"{path} is neither a torch.save file nor safetensors: {e}"
            ) from None
        args = json.loads(meta[_ARGS_KEY]) if _ARGS_KEY in meta else {}
        return tensors, args, meta.get(_WEIGHTS_KEY, "state_dict"), None
    saved = read_pt(path)
    if not isinstance(saved, Mapping):
        raise UnreadableCheckpoint(f"{path} holds a {type(saved).__name__}, not a REPA checkpoint")
    if all(isinstance(v, np.ndarray) for v in saved.values()):  # a bare state dict
        return saved, {}, "state_dict", None
    which = "ema" if use_ema else "model"
    if which not in saved:
        raise UnreadableCheckpoint(f"{path} has no {which!r} state dict (it holds {sorted(saved)})")
    args = saved.get("args") or {}
    args = vars(args) if isinstance(args, types.SimpleNamespace) else dict(args)
    return saved[which], args, which, saved.get("steps")


def official_tag(path: str | Path) -> str:
    """The revision of a checkpoint file in the conversion cache: a hash of its bytes."""
    return "file-" + _cache.hash_files([Path(path)])


def skeleton(args: Mapping[str, Any]) -> REPAModel:
    """The shape-only `REPAModel` that the reference's `args` build."""
    config, z_dims, projector_dim = official_config(args)
    return jax.eval_shape(lambda: REPAModel(config, z_dims, projector_dim, key=jax.random.key(0)))


def _converted(
    path: Path, use_ema: bool, overrides: Mapping[str, Any]
) -> tuple[REPAModel, OfficialInfo] | None:
    """`repa convert`'s copy of these weights with these args, if it made one."""
    if not _cache.has_source(path.name):
        return None
    folder = _cache.folder(path.name, official_tag(path))
    if not folder.is_dir():
        return None
    header = _cache.read_header(folder)
    args, weights = header["config"], header["weights"]
    if weights != ("ema" if use_ema else "model") and weights != "state_dict":
        return None
    if any(args.get(k) != v for k, v in overrides.items()):
        return None
    info = OfficialInfo(args, weights, header.get("steps"), header.get("pos_embed_max_diff"))
    return _cache.read(folder, skeleton(args)), info


def load_official(
    path: str | Path, *, use_ema: bool = True, **args_overrides
) -> tuple[REPAModel, OfficialInfo]:
    """Our `REPAModel` from an official REPA checkpoint, and what the file said about it.

    `path`: a `.pt` from the reference's train.py ({model, ema, opt, args, steps}), a bare
    state dict (the released `last.pt`), or a `.safetensors` from `export_official`.
    `use_ema` picks `ema` (what the reference samples with) or `model`; it does not apply to
    files holding a single state dict. Keyword arguments override or supply `args` fields
    (see `official_config`), e.g. `model="SiT-XL/2", encoder_depth=8,
    projector_embed_dims="768"` for the released checkpoint, which has no `args`.

    REG's checkpoints (Martinser/REG: the same files, plus `cls_projectors2`, `wg_norm`,
    `final_layer.linear_cls` and a `pos_embed` with a zero CLS row) load the same way, as a
    SiT with its CLS token (`config.cls_dim`, the width of `cls_projectors2`'s input).
    """
    unknown = sorted(set(args_overrides) - _ARGS_FIELDS)
    if unknown:
        raise ConfigError(f"unknown args fields {unknown}; known: {sorted(_ARGS_FIELDS)}")
    path = Path(path)
    converted = _converted(path, use_ema, args_overrides)
    if converted is not None:
        return converted
    tensors, args, weights, steps = read_checkpoint(path, use_ema)
    args = reg_args(tensors, args | args_overrides)
    config, z_dims, projector_dim = official_config(args)
    model, pos_diff = sit_from_state_dict(tensors, config, z_dims, projector_dim)
    return model, OfficialInfo(args, weights, steps, pos_diff)


def _check_describes(args: Mapping[str, Any], model: REPAModel) -> None:
    """`args` must rebuild `model`'s architecture, or the file would be mislabelled."""
    config, z_dims, projector_dim = official_config(args)
    ours = model.sit.config
    wrong = [
        f"{f.name}: args give {getattr(config, f.name)}, the model has {getattr(ours, f.name)}"
        for f in dataclasses.fields(SiTConfig)
        if f.name != "class_dropout_prob" and getattr(config, f.name) != getattr(ours, f.name)
    ]
    our_z = tuple(p.fc3.weight.shape[0] for p in model.projectors)
    if z_dims != our_z:
        wrong.append(f"projector dims: args give {z_dims}, the model has {our_z}")
    if model.projectors and projector_dim != model.projectors[0].fc1.weight.shape[0]:
        wrong.append(
            f"projector_dim: args give {projector_dim}, the model has "
            f"{model.projectors[0].fc1.weight.shape[0]}"
        )
    if wrong:
        raise ConfigError("args do not describe the model: " + "; ".join(wrong))


def export_official(
    model: REPAModel,
    path: str | Path,
    *,
    args: Mapping[str, Any],
    ema: REPAModel | None = None,
) -> list[Path]:
    """Write `model` in the reference's layout; returns the files written.

    `<path>.safetensors`: the weights the reference samples with (`ema` if given, else
    `model`), for `model.load_state_dict(safetensors.torch.load_file(...))`; `args` goes in
    its metadata so `load_official` reads it back. `<path>.pt`, only when torch is importable:
    {"model", "ema", "args"} as train.py saves it (no optimizer state), `ema` defaulting to
    `model` since generate.py loads `ema`. `args` are the reference's fields (see
    `official_config`) and must describe the model. Note the reference's SiT-S forgets to
    size its final layer to the model width (768): it cannot load an S export.
    """
    args = dict(args)
    for each in (model, ema):
        if each is not None:
            _check_describes(args, each)
    path = Path(path)
    if path.suffix in (".pt", ".pth", ".safetensors"):
        path = path.with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = official_state_dict(model)
    ema_weights = weights if ema is None else official_state_dict(ema)

    st_path = path.with_name(path.name + ".safetensors")
    meta = {
        "format": "pt",
        _ARGS_KEY: json.dumps(args),
        _WEIGHTS_KEY: "model" if ema is None else "ema",
    }
    save_file({k: np.ascontiguousarray(v) for k, v in ema_weights.items()}, st_path, meta)
    written = [st_path]
    try:
        import torch  # optional: only for the .pt
    except ImportError:
        return written

    def to_torch(state: dict[str, np.ndarray]):
        return collections.OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in state.items())

    pt_path = path.with_name(path.name + ".pt")
    saved = {
        "model": to_torch(weights),
        "ema": to_torch(ema_weights),
        "args": argparse.Namespace(**args),
    }
    torch.save(saved, pt_path)
    return written + [pt_path]
