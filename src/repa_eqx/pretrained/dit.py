"""The public DiT checkpoints (facebookresearch/DiT) in our SiT with `learn_sigma`.

DiT-XL-2-256x256.pt and DiT-XL-2-512x512.pt are bare state dicts of a DiT-XL/2 with a learned
variance; DiT's train.py saves {"model", "ema", "opt", "args"}. The REPA reference's SiT kept
DiT's module names, so the tensors go where official.py puts a REPA checkpoint's (without
projectors), read by the same torch-free `read_pt`, filled by the same `_convert.fill` with the
same report of missing, unexpected and wrong-shape tensors, and the same check of the frozen
`pos_embed` against our sin-cos table.

The architecture is read from the tensors: width, channels and patch from the patch
embedding, depth from the block count, classes from the label table (less its null row), the
latent grid from `pos_embed`, the learned variance from the output layer's width. The number
of heads is in no shape: it comes from the named size of that width and depth (DiT-XL: 16),
else from the file name ("DiT-XL-2-256x256.pt") or a `model` hint.
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
from safetensors import SafetensorError, safe_open

from ..core.errors import ConfigError
from ..model.repa import REPAModel
from ..model.sit import ENCODER_DEPTHS, SIZES, SiT, SiTConfig
from ._convert import WeightsMismatch
from ._torch_pickle import read_pt
from .official import official_state_dict, read_checkpoint, sit_from_state_dict, strip_wrappers

# "DiT-XL-2-256x256.pt" -> ("XL", "2", "256"); also "DiT-XL/2" in a train.py `args.model`.
_NAME = re.compile(r"DiT-(S|B|L|XL)[-/](2|4|8)(?:-(\d+)x\d+)?")
_VAE_FACTOR = 8  # DiT samples SD-VAE latents: image size / 8
_HINTS = frozenset({"model", "image_size", "num_heads", "encoder_depth"})


def _shapes(tensors: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(np.shape(v)) for k, v in strip_wrappers(dict(tensors)).items()}


def _has_learned_variance(shapes: Mapping[str, tuple[int, ...]]) -> bool:
    patch = shapes.get("x_embedder.proj.weight")
    out = shapes.get("final_layer.linear.weight")
    if patch is None or out is None or len(patch) != 4:
        return False
    _, channels, p, _ = patch
    return out[0] == 2 * channels * p * p


def is_dit_checkpoint(path: str | Path) -> bool:
    """Whether `path` (a torch.save file or safetensors) holds a DiT's weights: a patch
    embedding and an output of twice its channels, bare or as DiT's train.py saves them."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        try:
            with safe_open(path, framework="numpy") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except SafetensorError:
            return False
        return _has_learned_variance(shapes)
    try:
        saved = read_pt(path)
    except (ValueError, pickle.UnpicklingError):  # whoever loads it next says why
        return False
    if not isinstance(saved, Mapping):
        return False
    if "ema" in saved and isinstance(saved["ema"], Mapping):
        saved = saved["ema"]
    return _has_learned_variance(_shapes(saved))


def dit_config(
    tensors: Mapping[str, Any],
    *,
    model: str | None = None,
    image_size: int | None = None,
    num_heads: int | None = None,
    encoder_depth: int | None = None,
) -> SiTConfig:
    """The DiT config a state dict describes (see the module docstring). `model`
    ("DiT-XL/2", or a file name such as "DiT-XL-2-256x256.pt") and `image_size` stand in for
    what the tensors cannot tell; `encoder_depth` (where REPA would align) defaults to the
    named size's and does not change sampling."""
    shapes = _shapes(tensors)
    if "x_embedder.proj.weight" not in shapes or len(shapes["x_embedder.proj.weight"]) != 4:
        raise WeightsMismatch("not a DiT state dict: it has no x_embedder.proj.weight conv kernel")
    hidden, channels, patch, _ = shapes["x_embedder.proj.weight"]
    depth = 1 + max(
        (int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1
    )
    named = _NAME.search(model) if model else None
    size = next((s for s, (d, h, _) in SIZES.items() if (d, h) == (depth, hidden)), None)
    if size is None and named is not None:
        size = named.group(1)
    if num_heads is None:
        if size is None:
            raise ConfigError(
                f"a DiT of depth {depth} and width {hidden} is no named size: pass num_heads"
            )
        num_heads = SIZES[size][2]

    if "pos_embed" in shapes:
        tokens = int(np.prod(shapes["pos_embed"][:-1]))
        input_size = round(tokens**0.5) * patch
    elif image_size is not None or (named is not None and named.group(3)):
        input_size = int(image_size or named.group(3)) // _VAE_FACTOR
    else:
        raise ConfigError("the state dict has no pos_embed: pass image_size (256 or 512)")

    table = shapes.get("y_embedder.embedding_table.weight")
    if table is None:
        raise WeightsMismatch("not a DiT state dict: it has no y_embedder.embedding_table.weight")
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
        learn_sigma=True,
    )


@dataclasses.dataclass(frozen=True)
class DiTInfo:
    weights: str  # "ema", "model", or "state_dict" for a file holding a single one
    pos_embed_max_diff: float | None  # vs the exact sin-cos table


def from_dit_state_dict(tensors: Mapping[str, Any], config: SiTConfig) -> tuple[SiT, float | None]:
    """Our SiT with every leaf from a DiT state dict, and the `pos_embed` difference.

    Raises `WeightsMismatch` listing every missing, unexpected and wrong-shape tensor, and a
    `pos_embed` that is not our sin-cos table."""
    if not config.learn_sigma:
        raise ConfigError("a DiT has learn_sigma=True")
    model, pos_diff = sit_from_state_dict(tensors, config, (), projector_dim=1)
    return model.sit, pos_diff


def load_dit(path: str | Path, *, use_ema: bool = True, **hints) -> tuple[SiT, DiTInfo]:
    """Our SiT from a DiT checkpoint: a released bare state dict (DiT-XL-2-256x256.pt), a
    checkpoint of DiT's train.py (`use_ema` picks "ema" or "model"; its `args` give `model`
    and `image_size`), or a safetensors of the same names. `hints`: see `dit_config`."""
    unknown = sorted(set(hints) - _HINTS)
    if unknown:
        raise ConfigError(f"unknown DiT hints {unknown}; known: {sorted(_HINTS)}")
    path = Path(path)
    tensors, args, weights, _ = read_checkpoint(path, use_ema)
    known = {"model": path.name}  # "DiT-XL-2-256x256.pt"
    known |= {k: args[k] for k in ("model", "image_size") if args.get(k) is not None}
    sit, pos_diff = from_dit_state_dict(tensors, dit_config(tensors, **(known | hints)))
    return sit, DiTInfo(weights, pos_diff)


def dit_state_dict(sit: SiT) -> dict[str, np.ndarray]:
    """Our DiT under DiT's state-dict names, float32, with its frozen `pos_embed` table:
    what `DiT.load_state_dict` takes."""
    skeleton = eqx.filter_eval_shape(REPAModel, sit.config, (), key=jax.random.key(0))
    return official_state_dict(eqx.tree_at(lambda m: m.sit, skeleton, sit))
