"""Checkpoints with orbax: the training state as a flat {path: array} dict, plus JSON metadata.

A checkpoint whose arrays do not match the model being restored fails with one message that
names every missing, unexpected and wrong-shape entry; nothing is half-loaded.
"""

from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatch(ValueError):
    pass


def _path_name(path) -> str:
    parts = []
    for p in path:
        name = getattr(p, "name", None) or getattr(p, "key", None)
        parts.append(str(name) if name is not None else str(getattr(p, "idx", p)))
    return "/".join(parts)


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _is_leaf(x) -> bool:
    # Shape-only skeletons (`jax.eval_shape`) flatten like the arrays they stand for.
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def flatten(tree) -> dict[str, jax.Array | jax.ShapeDtypeStruct]:
    """Array leaves by path; typed PRNG keys are stored as their raw uint32 data."""
    leaves = jax.tree_util.tree_flatten_with_path(eqx.filter(tree, _is_leaf))[0]
    return {
        _path_name(path): jax.random.key_data(leaf) if _is_key(leaf) else leaf
        for path, leaf in leaves
    }


def _like_leaf(saved, like):
    if isinstance(like, jax.ShapeDtypeStruct):
        return jax.numpy.asarray(saved, like.dtype)
    if _is_key(like):
        return jax.random.wrap_key_data(np.asarray(saved), impl=jax.random.key_impl(like))
    return np.asarray(saved).astype(like.dtype)


def unflatten(flat: dict[str, np.ndarray], like):
    """Put `flat`'s arrays into the array leaves of `like` (arrays, or the shape-only leaves of
    `jax.eval_shape`), checking names and shapes."""
    expected = {k: (v.shape, v.dtype) for k, v in flatten(like).items()}
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    wrong = sorted(
        f"{k} {tuple(flat[k].shape)} != {tuple(expected[k][0])}"
        for k in set(flat) & set(expected)
        if tuple(flat[k].shape) != tuple(expected[k][0])
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
    arrays, static = eqx.partition(like, _is_leaf)
    paths, treedef = jax.tree_util.tree_flatten_with_path(arrays)
    leaves = [_like_leaf(flat[_path_name(p)], leaf) for p, leaf in paths]
    return eqx.combine(jax.tree_util.tree_unflatten(treedef, leaves), static)


class Checkpointer:
    """Keeps the last `keep` checkpoints of a run under `directory`."""

    def __init__(self, directory: str | Path, keep: int = 3):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=True
        )
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(flatten(state)), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def restore_flat(self, step: int) -> tuple[dict[str, np.ndarray], dict]:
        """(the saved {path: array} dict, metadata dict)."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()),
        )
        return dict(restored["state"]), restored["meta"]

    def restore(self, step: int, like):
        """(state shaped like `like`, metadata dict)."""
        flat, meta = self.restore_flat(step)
        return unflatten(flat, like), meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
