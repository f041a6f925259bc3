"""The converter pattern shared by every pretrained port (esm2quinox's): build a shape-only
skeleton with `jax.eval_shape`, fill each leaf from a flat state dict with a shape check,
and fail once, listing every missing, unexpected and wrong-shape tensor, before anything
is filled, so nothing is ever half-loaded."""

import dataclasses
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..core.errors import ConfigError, RepaError


class WeightsMismatch(RepaError, ValueError):
    """A checkpoint's tensors do not match the architecture its config describes."""


Where = Callable[[Any], Any]


class HubConfig:
    """For the frozen config dataclasses of the ports: `from_json` reads a checkpoint's
    `config.json` through the class's own `from_dict`, naming the file in any error."""

    @classmethod
    def from_dict(cls, raw: dict[str, Any]):
        raise NotImplementedError

    @classmethod
    def from_json(cls, path: str | Path):
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except ValueError as error:
            raise ConfigError(f"{path}: {error}") from None


Config = TypeVar("Config")


def config_from_dict(cls: type[Config], raw: dict[str, Any]) -> Config:
    """A config dataclass from a parsed `config.json`: every field without a default must be
    there, each value is cast to its field's type, other keys are ignored."""
    fields = dataclasses.fields(cls)
    absent = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in raw]
    if absent:
        raise ConfigError(f"config lacks {absent}")
    return cls(**{f.name: f.type(raw[f.name]) for f in fields if f.name in raw})


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one parameter of the model comes from.

    `names` is one state-dict name, or one per layer for a stacked (`filter_vmap`) leaf,
    in layer order. `transform` maps the stored tensor to our layout (a transpose, say)
    before the shape check. Unit axes are free: a (1, 1, D) table fills a (D,) leaf.
    """

    names: str | Sequence[str]
    where: Where
    transform: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def all_names(self) -> tuple[str, ...]:
        return (self.names,) if isinstance(self.names, str) else tuple(self.names)


def _squeezed(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def fill(
    skeleton,
    tensors: dict[str, np.ndarray],
    targets: Iterable[Target],
    *,
    what: str,
    ignored: Iterable[str] = (),
):
    """`skeleton` (a module of `jax.ShapeDtypeStruct` leaves) with every leaf from `tensors`.

    Raises `WeightsMismatch` naming `what` (e.g. "a DINOv2 with 12 layers") and listing
    every problem. Tensors named in `ignored` may be present and are not used.
    """
    targets = list(targets)
    missing: list[str] = []
    wrong: list[str] = []
    wheres: list[Where] = []
    values: list[np.ndarray] = []

    def take(name: str, transform, want: tuple[int, ...]) -> np.ndarray | None:
        if name not in tensors:
            missing.append(name)
            return None
        value = np.asarray(tensors[name])
        if transform is not None:
            value = transform(value)
        if _squeezed(value.shape) != _squeezed(want):
            wrong.append(f"{name} {tuple(value.shape)} (expected {want})")
            return None
        return value.reshape(want)

    for target in targets:
        leaf = target.where(skeleton)
        if isinstance(target.names, str):
            value = take(target.names, target.transform, tuple(leaf.shape))
        else:
            per_layer = [take(n, target.transform, tuple(leaf.shape[1:])) for n in target.names]
            ok = len(per_layer) == leaf.shape[0] and all(v is not None for v in per_layer)
            value = np.stack(per_layer) if ok else None
        if value is not None:
            wheres.append(target.where)
            values.append(value)

    expected = {name for target in targets for name in target.all_names}
    unexpected = sorted(tensors.keys() - expected - set(ignored))
    problems = {"missing": missing, "unexpected": unexpected, "wrong shape": wrong}
    if any(problems.values()):
        listed = [f"{label}: {', '.join(keys)}" for label, keys in problems.items() if keys]
        raise WeightsMismatch(f"checkpoint does not fit {what}: " + "; ".join(listed))

    leaves = tuple(
        jnp.asarray(value, dtype=where(skeleton).dtype)
        for where, value in zip(wheres, values, strict=True)
    )
    model = eqx.tree_at(lambda m: tuple(where(m) for where in wheres), skeleton, leaves)
    unfilled = [leaf for leaf in jax.tree.leaves(model) if isinstance(leaf, jax.ShapeDtypeStruct)]
    if unfilled:
        raise AssertionError(f"{len(unfilled)} parameters of {what} have no source tensor")
    return model


@dataclasses.dataclass(frozen=True)
class Port:
    """The face of every network ported from a Hub folder (config.json + safetensors):

    - `config`: its config dataclass; `config.from_dict(parsed config.json)`;
    - `build(config)`: the network with random weights (a skeleton under `eval_shape`);
    - `targets(config)`: where each checkpoint tensor goes (`Target`s);
    - `from_state_dict(config, tensors)`: the network with every leaf from the tensors;
    - `encode(model, uint8 images, resolution)`: patch features, for target encoders.

    `registry.py` finds a port by the config's `model_type` (diffusers: `_class_name`)."""

    family: str
    model_types: tuple[str, ...]
    config: type[HubConfig]
    build: Callable[[Any], eqx.Module]
    targets: Callable[[Any], list[Target]]
    from_state_dict: Callable[[Any, dict[str, np.ndarray]], eqx.Module]
    encode: Callable[..., Any] | None = None
