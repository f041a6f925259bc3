"""KL autoencoders published as latent-diffusion (CompVis LDM / "VQGAN-KL") `.pt` files with
no config.json: VA-VAE (hustvl/vavae-imagenet256-f16d32-dinov2, LightningDiT's f16d32
tokenizer) and REPA-E's VAEs (REPA-E/sdvae, invae, vavae and their end-to-end-tuned e2e-*).

They are diffusers' `AutoencoderKL` under other tensor names, so they load into
`vae.AutoencoderKL`: `ldm_name` maps each diffusers name to its LDM one (`vae.from_state_dict`
reads either layout), `config_dict` writes the diffusers `config.json` an architecture
implies, and `KNOWN` gives each Hub id's architecture and files. Their channel-wise latent
statistics (`latents_stats.pt`: {"mean", "std"}; REPA-E's `<name>-latents-stats.pt`:
{"latents_bias", "latents_scale" = 1 / std}) become the config's `latents_mean` /
`latents_std`. REPA-E's -hf repositories (REPA-E/e2e-vavae-hf, ...) are diffusers folders
and need none of this.
"""

import dataclasses
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import ConfigError
from ._hub import PretrainedNotFound
from ._torch_pickle import UnreadableCheckpoint, read_pt, read_state_dict

VAE_PARTS = ("encoder", "decoder", "quant_conv", "post_quant_conv")
_GROUPS = 32  # every GroupNorm of the LDM autoencoder


@dataclasses.dataclass(frozen=True)
class LdmArchitecture:
    """The `ddconfig` of an LDM autoencoder (3 input and output channels, double_z)."""

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int
    attn_resolutions: tuple[int, ...]
    resolution: int

    def attention_levels(self) -> tuple[int, ...]:
        """The levels (0: full resolution) whose resnets are each followed by attention."""
        return tuple(
            i for i in range(len(self.ch_mult)) if self.resolution >> i in self.attn_resolutions
        )


F16D32 = LdmArchitecture(128, (1, 1, 2, 2, 4), 2, 32, (16,), 256)  # VA-VAE, IN-VAE
F8D4 = LdmArchitecture(128, (1, 2, 4, 4), 2, 4, (16,), 256)  # SD-VAE: 16 px is never reached


@dataclasses.dataclass(frozen=True)
class KnownVAE:
    """A Hub repository of an LDM `.pt`: its architecture, the patterns that download its
    weights and its latent statistics, and the patterns never downloaded."""

    architecture: LdmArchitecture
    weights: str
    stats: str
    skip: tuple[str, ...] = ()


_REPA_E = dict(weights="*.pt", stats="*-latents-stats.pt", skip=("*discriminator*",))
KNOWN: dict[str, KnownVAE] = {
    "hustvl/vavae-imagenet256-f16d32-dinov2": KnownVAE(
        F16D32, "vavae-imagenet256-f16d32-dinov2.pt", "latents_stats.pt"
    ),
    "REPA-E/vavae": KnownVAE(F16D32, **_REPA_E),
    "REPA-E/e2e-vavae": KnownVAE(F16D32, **_REPA_E),
    "REPA-E/invae": KnownVAE(F16D32, **_REPA_E),
    "REPA-E/e2e-invae": KnownVAE(F16D32, **_REPA_E),
    "REPA-E/sdvae": KnownVAE(F8D4, **_REPA_E),
    "REPA-E/e2e-sdvae": KnownVAE(F8D4, **_REPA_E),
}


def known(source: str) -> KnownVAE | None:
    """The table entry of a Hub id (the Hub ignores case), if it is one."""
    by_case = {name.casefold(): entry for name, entry in KNOWN.items()}
    return by_case.get(source.casefold())


def config_dict(
    architecture: LdmArchitecture, stats: tuple[np.ndarray, np.ndarray] | None = None
) -> dict[str, Any]:
    """The diffusers `config.json` of `architecture`, with its latent statistics if given.

    With statistics the scaling factor is 1: LightningDiT normalises VA-VAE latents as
    (z - mean) / std (its `latent_multiplier` 1.0), REPA-E as (z - bias) * scale; without,
    it is diffusers' default (SD's 0.18215)."""
    levels = len(architecture.ch_mult)
    attention = architecture.attention_levels()
    config = {
        "_class_name": "AutoencoderKL",
        "block_out_channels": [architecture.ch * m for m in architecture.ch_mult],
        "layers_per_block": architecture.num_res_blocks,
        "latent_channels": architecture.z_channels,
        "norm_num_groups": _GROUPS,
        "sample_size": architecture.resolution,
        "down_block_types": [
            "AttnDownEncoderBlock2D" if i in attention else "DownEncoderBlock2D"
            for i in range(levels)
        ],
        # The decoder's up blocks run from the lowest resolution.
        "up_block_types": [
            "AttnUpDecoderBlock2D" if levels - 1 - i in attention else "UpDecoderBlock2D"
            for i in range(levels)
        ],
    }
    if stats is not None:
        config["latents_mean"], config["latents_std"] = (s.tolist() for s in stats)
        config["scaling_factor"] = 1.0
    return config


def architecture_of(tensors: Mapping[str, Any], source: str) -> LdmArchitecture:
    """The architecture an LDM state dict has (for a local file, which no table describes)."""

    def shape(name: str) -> tuple[int, ...]:
        if name not in tensors:
            raise ConfigError(f"{source}: not an LDM autoencoder checkpoint (no {name})")
        return tuple(tensors[name].shape)

    def count(pattern: str) -> int:
        return 1 + max((int(m[1]) for k in tensors if (m := re.match(pattern, k))), default=-1)

    ch = shape("encoder.conv_in.weight")[0]
    levels = count(r"encoder\.down\.(\d+)\.")
    widths = [shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(levels)]
    if any(w % ch for w in widths):
        raise ConfigError(f"{source}: block widths {widths} are not multiples of {ch}")
    blocks = count(r"encoder\.down\.0\.block\.(\d+)\.")
    resolution = 256  # attention levels are named by resolution: any resolution will do
    attn = tuple(
        resolution >> i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in tensors
    )
    return LdmArchitecture(
        ch,
        tuple(w // ch for w in widths),
        blocks,
        shape("post_quant_conv.weight")[0],
        attn,
        resolution,
    )


_LEVEL = re.compile(r"(?P<part>encoder\.down_blocks|decoder\.up_blocks)\.(?P<i>\d+)\.(?P<rest>.*)")
_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_RENAMES = [
    (re.compile(r"resnets\.(\d+)\.conv_shortcut\."), r"block.\1.nin_shortcut."),
    (re.compile(r"resnets\.(\d+)\."), r"block.\1."),
    (re.compile(r"(downsample|upsample)rs\.0\."), r"\1."),
    *(
        (re.compile(rf"attentions\.(\d+)\.{re.escape(ours)}\."), rf"attn.\1.{theirs}.")
        for ours, theirs in _ATTENTION.items()
    ),
]
_OUTSIDE_LEVELS = [
    (re.compile(r"mid_block\.resnets\.0\."), "mid.block_1."),
    (re.compile(r"mid_block\.resnets\.1\."), "mid.block_2."),
    (re.compile(r"mid_block\.attentions\.0\."), "mid.attn_1."),
    (re.compile(r"conv_norm_out\."), "norm_out."),
    *(
        (re.compile(rf"mid\.attn_1\.{re.escape(ours)}\."), f"mid.attn_1.{theirs}.")
        for ours, theirs in _ATTENTION.items()
    ),
]


def ldm_name(name: str, levels: int) -> str:
    """The LDM name of a diffusers `AutoencoderKL` tensor name (`levels`: its block count)."""
    for pattern, new in _OUTSIDE_LEVELS:
        name = pattern.sub(new, name)
    match = _LEVEL.fullmatch(name)
    if match is None:
        return name
    rest = match["rest"]
    for pattern, new in _RENAMES:
        rest = pattern.sub(new, rest)
    if match["part"] == "encoder.down_blocks":
        return f"encoder.down.{match['i']}.{rest}"
    return f"decoder.up.{levels - 1 - int(match['i'])}.{rest}"  # stored in level order


def is_ldm(tensors: Mapping[str, Any]) -> bool:
    """Whether a state dict names its tensors the LDM way."""
    return any(name.startswith("encoder.down.") for name in tensors)


def not_vae(tensors: Mapping[str, Any]) -> list[str]:
    """The tensors an LDM training checkpoint holds beside the autoencoder (its loss, the
    discriminator, the aligned foundation model), which loading ignores."""
    return [name for name in tensors if name.split(".", 1)[0] not in VAE_PARTS]


def read_checkpoint(path: Path) -> dict[str, np.ndarray]:
    """The state dict of an LDM `.pt`: bare (REPA-E) or under "state_dict" (VA-VAE)."""
    saved = read_pt(path) if zipfile.is_zipfile(path) else read_state_dict(path)
    if isinstance(saved, Mapping) and isinstance(saved.get("state_dict"), Mapping):
        saved = saved["state_dict"]
    if not isinstance(saved, Mapping) or not all(isinstance(v, np.ndarray) for v in saved.values()):
        raise UnreadableCheckpoint(f"{path} holds no state dict of tensors")
    return dict(saved)


def read_stats(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Channel-wise (mean, std) from LightningDiT's {"mean", "std"} or REPA-E's
    {"latents_bias", "latents_scale"} (scale = 1 / std), each of shape (1, C, 1, 1)."""
    saved = read_pt(path)
    if not isinstance(saved, Mapping):
        raise UnreadableCheckpoint(f"{path} holds a {type(saved).__name__}, not latent statistics")
    if {"mean", "std"} <= saved.keys():
        mean, std = saved["mean"], saved["std"]
    elif {"latents_bias", "latents_scale"} <= saved.keys():
        mean, std = saved["latents_bias"], 1.0 / np.asarray(saved["latents_scale"], np.float64)
    else:
        raise UnreadableCheckpoint(
            f"{path} holds {sorted(saved)}, not mean/std or latents_bias/latents_scale"
        )
    mean, std = (np.ravel(np.asarray(s, np.float64)) for s in (mean, std))
    if mean.shape != std.shape:
        raise UnreadableCheckpoint(f"{path}: mean {mean.shape} and std {std.shape} differ")
    return mean, std


def stats_beside(weights: Path) -> Path | None:
    """The statistics file published beside a local weights file, if there is one."""
    for name in (f"{weights.stem}-latents-stats.pt", "latents_stats.pt"):
        if (weights.parent / name).is_file() and weights.name != name:
            return weights.parent / name
    return None


def weights_in(folder: Path, source: str) -> Path:
    """The one weights `.pt` of a downloaded snapshot (not its statistics, not a discriminator)."""
    files = [
        f
        for f in sorted(folder.glob("*.pt"))
        if not f.name.endswith(("latents-stats.pt", "latents_stats.pt"))
        and "discriminator" not in f.name
    ]
    if len(files) != 1:
        found = [f.name for f in files] or "none"
        raise PretrainedNotFound(f"{source!r}: expected one weights .pt in {folder}, found {found}")
    return files[0]
