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

from ..core.errors import RepaError
from ..core.pytree import check_shapes, flatten, is_leaf, path_name, unflatten


class CheckpointUnreadable(RepaError, RuntimeError):
    """A checkpoint that cannot be read (truncated, corrupt, missing files)."""


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
    arrays = eqx.filter(like, is_leaf)
    paths = jax.tree_util.tree_flatten_with_path(arrays)[0]
    leaves = jax.tree_util.tree_leaves(
        shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
    )
    if len(leaves) != len(paths):
        raise ValueError(f"{len(leaves)} shardings for {len(paths)} arrays")
    return {path_name(p): s for (p, _), s in zip(paths, leaves, strict=True)}
