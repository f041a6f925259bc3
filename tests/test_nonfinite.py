"""The non-finite step policy (recipe key train.nonfinite): "skip" leaves the state untouched
inside the jitted step and counts, "rollback" restores the last good checkpoint with a fresh
key; "stop" (the default) is in test_train / test_reliability."""

import json
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_recipe

from repa_eqx.training import train
from repa_eqx.training.checkpoint import Checkpointer
from repa_eqx.training.loop import TrainingDiverged
from repa_eqx.training.recipe import RecipeError, sit_config
from repa_eqx.training.step import StepConfig, init_state, make_optimizer, make_train_step

pytestmark = pytest.mark.standard_promotion
loop = sys.modules["repa_eqx.training.loop"]  # the package exports a function `train`


def _host(tree):
    return [np.array(a) for a in jax.tree.leaves(tree)]


def _wrap_step(monkeypatch, change):
    """The loop's step with `change(call, state_arrays, batch) -> (state_arrays, batch)` first."""
    real = loop.make_train_step
    calls = []

    def patched(*args, **kwargs):
        step = real(*args, **kwargs)

        def wrapped(state_arrays, batch, *rest):
            calls.append(1)
            return step(*change(len(calls), state_arrays, batch), *rest)

        return wrapped

    monkeypatch.setattr(loop, "make_train_step", patched)


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.open()]


def test_skip_leaves_weights_optimiser_and_ema_bit_identical_and_counts():
    recipe = tiny_recipe("unused", model={"input_size": 16})
    optimizer = make_optimizer(recipe)
    state = eqx.filter_jit(init_state)(sit_config(recipe, 10), [], 64, optimizer, 0)
    arrays, static = eqx.partition(state, eqx.is_array)
    config = StepConfig("linear", "uniform", 0.0, 0.9, "fp32", nonfinite="skip")
    step = make_train_step(optimizer, config, static, ())
    x = jax.random.normal(jax.random.key(1), (4, 1, 16, 16))
    before = _host((arrays.model, arrays.opt_state, arrays.ema))
    bad = {"x": x.at[1, 0, 3, 3].set(jnp.inf), "y": jnp.arange(4)}
    arrays, metrics = step(arrays, bad, ())
    assert int(metrics["skipped"]) == 1 and not np.isfinite(float(metrics["loss"]))
    after = _host((arrays.model, arrays.opt_state, arrays.ema))
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(arrays.step) == 1  # the counter counts batches; the key moved on too
    arrays, metrics = step(arrays, {"x": x, "y": bad["y"]}, ())
    assert int(metrics["skipped"]) == 0 and int(arrays.step) == 2
    moved = _host(arrays.model)
    assert any(not np.array_equal(a, b) for a, b in zip(moved, before, strict=False))


@pytest.mark.slow  # a 6-step run with its grid: 20-50 s on 2 busy cores
def test_skip_in_the_loop_logs_skipped_steps_and_keeps_the_count(tmp_path, monkeypatch):
    """One poisoned batch (step 2): the run finishes, its checkpoint is finite and says how
    many steps were skipped; the cosine term is logged as cos_loss."""

    def poison(call, arrays, batch):
        return arrays, (batch | {"x": batch["x"] * jnp.nan} if call == 2 else batch)

    _wrap_step(monkeypatch, poison)
    recipe = tiny_recipe(
        tmp_path / "r",
        train={"steps": 6, "log_every": 2, "checkpoint_every": 6, "nonfinite": "skip"},
        loss={"cosine_coeff": 1.0},
    )
    result = train(recipe, progress=False)
    logged = _records(tmp_path / "r/metrics.jsonl")
    assert [r["step"] for r in logged] == [2, 4, 6]
    assert [r["skipped_steps"] for r in logged] == [1, 1, 1]
    assert "loss" not in logged[0] and "grad_norm" not in logged[0]  # step 2 was skipped
    assert np.isfinite(logged[1]["loss"]) and 0 < logged[1]["cos_loss"] < 2
    assert result.step == 6
    _, meta = Checkpointer(tmp_path / "r/checkpoints", read_only=True).restore_flat(6)
    assert meta["skipped_steps"] == 1


@pytest.mark.slow  # a run, a rollback and its continuation: 20-25 s on 2 cores
def test_rollback_restores_the_last_checkpoint_with_a_fresh_key(tmp_path, monkeypatch):
    """NaN weights from step 6: the loop sees them when it logs step 6, restores checkpoint 4
    (the same weights as at step 4, a different key), replays the data from there and ends."""
    seen = {}

    def poison(call, arrays, batch):
        if call in (
            5,
            7,
        ):  # the state entering step 5: checkpoint 4's, first as saved, then restored
            seen[call] = (_host(arrays.model), np.array(jax.random.key_data(arrays.key)),
                          np.array(batch["x"]))  # fmt: skip
        if call == 6:
            arrays = jax.tree.map(lambda a: a * jnp.nan if a.dtype == jnp.float32 else a, arrays)
        return arrays, batch

    _wrap_step(monkeypatch, poison)
    train_spec = {"steps": 12, "log_every": 2, "checkpoint_every": 4, "nonfinite": "rollback"}
    recipe = tiny_recipe(tmp_path / "r", train=train_spec)
    assert train(recipe, progress=False).step == 12
    (record,) = _records(tmp_path / "r/rollbacks.jsonl")
    assert record["step"] == 6 and record["restored"] == 4 and record["rollback"] == 1
    assert "non-finite loss at step 6" in record["reason"]
    (params, key, x), (params_again, key_again, x_again) = seen[5], seen[7]
    for a, b in zip(params, params_again, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(x, x_again)  # the data position came back too
    assert not np.array_equal(key, key_again)
    assert [r["step"] for r in _records(tmp_path / "r/metrics.jsonl")] == [2, 4, 6, 8, 10, 12]
    with pytest.raises(RecipeError, match="train.max_rollbacks"):
        tiny_recipe(tmp_path, train={"max_rollbacks": -1})


@pytest.mark.slow
def test_rollbacks_run_out_and_stop_like_stop(tmp_path, monkeypatch):
    def poison(call, arrays, batch):
        if call >= 6:  # every step from 6 on: a rollback cannot get past it
            arrays = jax.tree.map(lambda a: a * jnp.nan if a.dtype == jnp.float32 else a, arrays)
        return arrays, batch

    _wrap_step(monkeypatch, poison)
    train_spec = {"steps": 12, "log_every": 2, "checkpoint_every": 4, "nonfinite": "rollback",
                  "max_rollbacks": 1}  # fmt: skip
    recipe = tiny_recipe(tmp_path / "r", train=train_spec)
    with pytest.raises(TrainingDiverged, match=r"last good checkpoint: step 4.*after 1 rollbacks"):
        train(recipe, progress=False)
    assert len(_records(tmp_path / "r/rollbacks.jsonl")) == 1
    assert sorted(int(p.name) for p in (tmp_path / "r/checkpoints").iterdir()) == [4]
