"""Checkpoints with orbax: the training state as a flat {path: array} dict, plus JSON metadata.

Saves are asynchronous and atomic (orbax writes a temporary directory and renames it when
complete). A state with a NaN or Inf is never written (`NonFiniteState`). Every checkpoint
carries a digest of its arrays (`fingerprint`: exact integer sums of their bits, the same on
any number of devices), which restore verifies: corruption of any kind, same-size included,
makes the checkpoint unreadable. A checkpoint whose arrays do not match the model being
restored fails with one message that names every missing, unexpected and wrong-shape entry;
nothing is half-loaded. Arrays are restored straight onto the shardings asked for, so a run
saved on 8 devices resumes on 1 (or the other way round). An unreadable checkpoint is set
aside and the one before it used. Readers (`read_only=True`) create, clean up and move
nothing: a run that is still writing is never disturbed.
"""

import shutil
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ..core.errors import RepaError
from ..core.files import storage_errors
from ..core.pytree import check_shapes, flatten, is_leaf, path_name, unflatten


class CheckpointUnreadable(RepaError, RuntimeError):
    """A checkpoint that cannot be read (truncated, corrupt, missing files, a wrong digest)."""


class NonFiniteState(RepaError, FloatingPointError):
    """A state to checkpoint holds NaN or Inf: it is not written."""


def _words(x: jax.Array) -> jax.Array:
    """The bits of `x` as uint32 words, one per element."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _fingerprints(flat: dict) -> dict:
    def one(x):
        words = _words(x).reshape(-1)
        position = jnp.arange(1, words.size + 1, dtype=jnp.uint32)
        # uint32 sums wrap around exactly: the result does not depend on the summation order,
        # so on how the array is sharded.
        return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * position)])

    return {k: one(v) for k, v in flat.items()}


def fingerprint(flat: dict[str, jax.Array]) -> dict[str, list[int]]:
    """{path: [sum of the array's bit words, sum weighted by position]} mod 2^32: a digest
    that any changed, swapped or zeroed bytes alter, computed on device."""
    return {k: [int(w) for w in v] for k, v in jax.device_get(_fingerprints(flat)).items()}


@jax.jit
def _finite(flat: dict) -> dict:
    return {
        k: jnp.all(jnp.isfinite(v)) for k, v in flat.items() if jnp.issubdtype(v.dtype, jnp.inexact)
    }


def non_finite(flat: dict[str, jax.Array]) -> list[str]:
    """The paths of the floating arrays holding a NaN or an Inf."""
    return sorted(k for k, ok in jax.device_get(_finite(flat)).items() if not ok)


def _short(error: Exception) -> str:
    text = str(error).split(" [tensorstore_spec", 1)[0].strip().splitlines()
    text = text[0] if text else type(error).__name__
    return text if len(text) <= 240 else text[:237] + "..."


class Checkpointer:
    """The checkpoints of a run under `directory`: the last `keep`, plus every step that is a
    multiple of `keep_every` (0: none) for good. `read_only`: a reader, which never creates,
    tidies or deletes anything (the run may be training right now)."""

    def __init__(
        self, directory: str | Path, keep: int = 3, keep_every: int = 0, *, read_only: bool = False
    ):
        self.directory = Path(directory).absolute()
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep,
            save_interval_steps=0 if read_only else 1,
            keep_period=keep_every or None,
            create=not read_only,
            enable_async_checkpointing=not read_only,
            # A save killed halfway leaves a temporary directory, never a step: the writer
            # tidies it (a reader must not: the writer's save may be in flight).
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
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
        """Write `state` as checkpoint `step` (asynchronously), with `meta` and the digest of
        its arrays. Raises `NonFiniteState` (writing nothing) if it holds a NaN or an Inf."""
        flat = flatten(state)
        bad = non_finite(flat)
        if bad:
            shown = ", ".join(bad[:4]) + (f" (+{len(bad) - 4} more)" if len(bad) > 4 else "")
            raise NonFiniteState(f"the state of step {step} holds NaN or Inf in {shown}")
        meta = {**meta, "digest": fingerprint(flat)}
        with storage_errors(self.directory / str(step)):
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave(meta)
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
        flat, meta = dict(restored["state"]), restored["meta"]
        saved = meta.get("digest")
        if saved is not None:  # checkpoints written before digests existed have none
            found = fingerprint(flat)
            changed = sorted(k for k in found if saved.get(k) != found[k])
            if changed:
                raise CheckpointUnreadable(
                    f"checkpoint step {step}: its arrays do not match their digest "
                    f"({', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''} changed)"
                )
        return flat, meta

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
        match the model is an error, not a fallback. Only the run's writer does this."""
        if self.read_only:
            raise ValueError("a read-only Checkpointer sets nothing aside")
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
        """Until the asynchronous saves are on disk; a failed write (a full disk) raises
        `StorageError` naming the folder."""
        with storage_errors(self.directory):
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
