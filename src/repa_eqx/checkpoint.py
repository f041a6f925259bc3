"""Checkpoints with orbax: the training state as a flat {path: array} dict, plus JSON metadata.

Saves are asynchronous and atomic (orbax writes a temporary directory and renames it when
complete). A checkpoint whose arrays do not match the model being restored fails with one
message that names every missing, unexpected and wrong-shape entry; nothing is half-loaded.
Arrays are restored straight onto the shardings asked for, so a run saved on 8 devices resumes
on 1 (or the other way round). An unreadable checkpoint (truncated, corrupt) is set aside and
the one before it used.
"""

import shutil
from collections.abc import Callable
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


def unflatten(flat: dict[str, np.ndarray], like):
    """Put `flat`'s arrays into the array leaves of `like` (arrays, or the shape-only leaves of
    `jax.eval_shape`), checking names and shapes."""
    check_shapes({k: tuple(v.shape) for k, v in flat.items()}, like)
    arrays, static = eqx.partition(like, _is_leaf)
    paths, treedef = jax.tree_util.tree_flatten_with_path(arrays)
    leaves = [_like_leaf(flat[_path_name(p)], leaf) for p, leaf in paths]
    return eqx.combine(jax.tree_util.tree_unflatten(treedef, leaves), static)


class CheckpointUnreadable(RuntimeError):
    pass


def _short(error: Exception) -> str:
    text = str(error).split(" [tensorstore_spec", 1)[0].strip().splitlines()
    text = text[0] if text else type(error).__name__
    return text if len(text) <= 240 else text[:237] + "..."


class Checkpointer:
    """The checkpoints of a run under `directory`: the last `keep`, plus every step that is a
    multiple of `keep_every` (0: none) for good."""

    def __init__(self, directory: str | Path, keep: int = 3, keep_every: int = 0):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            keep_period=keep_every or None,
            create=True,
            enable_async_checkpointing=True,
            # A save killed halfway leaves a temporary directory, never a step: tidy it.
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, meta: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(flatten(state)), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def saved_shapes(self, step: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """{path: (shape, dtype)} of a checkpoint, read from its metadata (no array data)."""
        try:
            tree = self.manager.item_metadata(step)["state"]
            tree = getattr(tree, "tree", tree)
            return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in tree.items()}
        except Exception as e:
            raise CheckpointUnreadable(f"checkpoint step {step}: {_short(e)}") from e

    def _restore(self, step: int, abstract: dict) -> tuple[dict, dict]:
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:
            raise CheckpointUnreadable(f"checkpoint step {step}: {_short(e)}") from e
        return dict(restored["state"]), restored["meta"]

    def restore_flat(self, step: int) -> tuple[dict[str, jax.Array], dict]:
        """(the saved {path: array} dict on the first local device, metadata dict)."""
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = {
            k: jax.ShapeDtypeStruct(shape, dtype, sharding=device)
            for k, (shape, dtype) in self.saved_shapes(step).items()
        }
        return self._restore(step, abstract)

    def restore(self, step: int, like, shardings=None):
        """(state shaped like `like`, metadata dict). `shardings` (a pytree of shardings shaped
        like `like`'s arrays, or one sharding for all) says where the arrays go; default: the
        first local device."""
        saved = self.saved_shapes(step)
        check_shapes({k: shape for k, (shape, _) in saved.items()}, like)
        targets = flatten(like)
        if shardings is None:
            shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        if isinstance(shardings, jax.sharding.Sharding):
            placed = dict.fromkeys(targets, shardings)
        else:
            placed = _flat_shardings(like, shardings)
        abstract = {
            k: jax.ShapeDtypeStruct(saved[k][0], saved[k][1], sharding=placed[k]) for k in targets
        }
        flat, meta = self._restore(step, abstract)
        return unflatten(flat, like), meta

    def restore_latest(
        self, like, shardings=None, *, report: Callable[[str], None] = print
    ) -> tuple[int, object, dict] | None:
        """The newest readable checkpoint as (step, state, meta), or None when there is none.
        An unreadable one is moved aside to `corrupt-STEP` (kept for inspection, never
        reused) with a message, and the one before it is tried. A checkpoint that does not
        match the model is an error, not a fallback."""
        for step in reversed(self.all_steps()):
            try:
                state, meta = self.restore(step, like, shardings)
            except CheckpointUnreadable as e:
                older = [s for s in self.all_steps() if s < step]
                report(
                    f"{e}; it is unreadable and was moved to corrupt-{step}; "
                    + (f"using step {older[-1]}" if older else "no older checkpoint")
                )
                self._set_aside(step)
                continue
            return step, state, meta
        return None

    def _set_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            source = self.directory / str(step)
            target = self.directory / f"corrupt-{step}"
            if target.exists():
                shutil.rmtree(target)
            source.rename(target)
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _flat_shardings(like, shardings) -> dict:
    """{path: sharding} for `flatten(like)`'s entries from a pytree of shardings that matches
    like's array leaves (typed PRNG keys keep their key's sharding for the raw data)."""
    arrays = eqx.filter(like, _is_leaf)
    paths = jax.tree_util.tree_flatten_with_path(arrays)[0]
    leaves = jax.tree_util.tree_leaves(
        shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
    )
    if len(leaves) != len(paths):
        raise ValueError(f"{len(leaves)} shardings for {len(paths)} arrays")
    return {_path_name(p): s for (p, _), s in zip(paths, leaves, strict=True)}
