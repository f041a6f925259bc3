"""Pytrees as flat {path: array} dicts: how checkpoints, exports and converted weights store a
model, and how they are put back into one, every name and shape checked."""

from typing import Any

import equinox as eqx
import jax
import numpy as np

from .errors import RepaError


class CheckpointMismatch(RepaError, ValueError):
    """Saved arrays that do not fit the model they are loaded into."""


def path_name(path) -> str:
    """A pytree path as "ema/sit/blocks/qkv/weight"."""
    parts = []
    for p in path:
        name = getattr(p, "name", None) or getattr(p, "key", None)
        parts.append(str(name) if name is not None else str(getattr(p, "idx", p)))
    return "/".join(parts)


def is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def is_leaf(x) -> bool:
    """Arrays, and the shape-only leaves of `jax.eval_shape` that stand for them."""
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def flatten(tree) -> dict[str, Any]:
    """Array leaves by path (jax arrays, NumPy arrays or `eval_shape` structs, as the tree
    holds them); typed PRNG keys are stored as their raw uint32 data."""
    leaves = jax.tree_util.tree_flatten_with_path(eqx.filter(tree, is_leaf))[0]
    return {
        path_name(path): jax.random.key_data(leaf) if is_key(leaf) else leaf
        for path, leaf in leaves
    }


def _like_leaf(saved, like):
    if isinstance(like, jax.ShapeDtypeStruct):
        return jax.numpy.asarray(saved, like.dtype)
    if is_key(like):
        data = saved if isinstance(saved, jax.Array) else np.asarray(saved)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(like))
    if isinstance(saved, jax.Array):  # restored onto its devices: keep it there
        return saved if saved.dtype == like.dtype else saved.astype(like.dtype)
    return np.asarray(saved).astype(like.dtype)


def check_shapes(saved: dict[str, tuple[int, ...]], like) -> None:
    """Raise CheckpointMismatch unless the saved {path: shape} are exactly `like`'s arrays."""
    expected = {k: tuple(v.shape) for k, v in flatten(like).items()}
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    wrong = sorted(
        f"{k} {tuple(saved[k])} != {expected[k]}"
        for k in set(saved) & set(expected)
        if tuple(saved[k]) != expected[k]
    )
    if missing or unexpected or wrong:
        problems = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)):
            if items:
                shown = ", ".join(items[:8]) + (
                    f" (+{len(items) - 8} more)" if len(items) > 8 else ""
                )
                problems.append(f"{label}: {shown}")
        raise CheckpointMismatch("checkpoint does not match the model: " + "; ".join(problems))


def unflatten(flat: dict[str, Any], like):
    """Put `flat`'s arrays into the array leaves of `like` (arrays, or the shape-only leaves of
    `jax.eval_shape`), checking names and shapes."""
    check_shapes({k: tuple(v.shape) for k, v in flat.items()}, like)
    arrays, static = eqx.partition(like, is_leaf)
    paths, treedef = jax.tree_util.tree_flatten_with_path(arrays)
    leaves = [_like_leaf(flat[path_name(p)], leaf) for p, leaf in paths]
    return eqx.combine(jax.tree_util.tree_unflatten(treedef, leaves), static)
