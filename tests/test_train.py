"""The training step and loop on tiny models: behaviour, not speed."""

import json
import tomllib
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import state_like, tiny_recipe

from repa_eqx.core.pytree import CheckpointMismatch, flatten
from repa_eqx.data.datasets import batch_indices, load_mnist_5k
from repa_eqx.training.checkpoint import Checkpointer
from repa_eqx.training.loop import TrainingDiverged, train
from repa_eqx.training.objective import Terms, repa_objective
from repa_eqx.training.recipe import RecipeError, parse_recipe, sit_config
from repa_eqx.training.step import StepConfig, init_state, make_optimizer, make_train_step

pytestmark = pytest.mark.standard_promotion


def _params(run_dir, like):
    ckpt = Checkpointer(run_dir / "checkpoints")
    state, _ = ckpt.restore(ckpt.latest_step(), like)
    ckpt.close()
    return state


def test_tiny_repa_run_lowers_both_losses(tmp_path, tiny_dinov2):
    recipe = tiny_recipe(
        tmp_path / "run",
        tiny_dinov2,
        train={"steps": 60, "log_every": 10, "sample_every": 60, "checkpoint_every": 60},
        data={"precompute_features": True},
        optim={"lr": 2e-3},
    )
    result = train(recipe, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
    assert rows[-1]["denoise_loss"] < rows[0]["denoise_loss"]
    assert rows[-1]["repa_loss"] < rows[0]["repa_loss"] < 1.0
    assert result.step == 60
    for name in ("samples.png", "loss.png", "recipe.toml", "samples/step_0000060.png"):
        assert (tmp_path / "run" / name).is_file(), name


@pytest.mark.slow
def test_in_step_encoder_equals_precomputed_features(tmp_path, tiny_dinov2):
    """Target features computed inside the jitted step or cached once give the same run
    (up to the fp16 storage of the cache)."""
    a = train(
        tiny_recipe(tmp_path / "a", tiny_dinov2, train={"steps": 5, "log_every": 5}), progress=False
    )
    b = train(
        tiny_recipe(
            tmp_path / "b",
            tiny_dinov2,
            train={"steps": 5, "log_every": 5},
            data={"precompute_features": True},
        ),
        progress=False,
    )
    assert a.last["repa_loss"] == pytest.approx(b.last["repa_loss"], abs=2e-3)
    assert a.last["denoise_loss"] == pytest.approx(b.last["denoise_loss"], rel=1e-3)


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path):
    straight = tiny_recipe(tmp_path / "straight")
    train(straight, progress=False)
    split = tiny_recipe(tmp_path / "split")
    train(split, progress=False, stop_after=10)  # "killed" after step 10
    with pytest.raises(RecipeError, match="--resume"):
        train(split, progress=False)
    train(split, progress=False, resume=True)
    like = state_like(straight, [])
    a, b = _params(tmp_path / "straight", like), _params(tmp_path / "split", like)
    flat_a, flat_b = flatten(a), flatten(b)
    assert flat_a.keys() == flat_b.keys()
    for name in flat_a:  # params, EMA, optimiser state, step and RNG: bit-identical
        np.testing.assert_array_equal(np.asarray(flat_a[name]), np.asarray(flat_b[name]), name)
    steps = [json.loads(line)["step"] for line in (tmp_path / "split/metrics.jsonl").open()]
    assert steps == [5, 10, 15, 20]


@pytest.mark.slow
def test_ctrl_c_mid_step_saves_a_consistent_checkpoint(tmp_path, monkeypatch):
    """Ctrl-C after a batch was handed out but before its step ran: the saved data position is
    the state's step, and the resumed run equals an uninterrupted one."""
    import sys

    train_module = sys.modules["repa_eqx.training.loop"]  # the package exports a function `train`

    straight = tiny_recipe(tmp_path / "straight", train={"steps": 12, "checkpoint_every": 12})
    train(straight, progress=False)
    real = train_module.make_train_step
    calls = []

    def interrupting(*args, **kwargs):
        step = real(*args, **kwargs)

        def wrapped(*a):
            calls.append(1)
            if len(calls) == 8:  # the 8th step's batch is out; the step never runs
                raise KeyboardInterrupt
            return step(*a)

        return wrapped

    split = tiny_recipe(tmp_path / "split", train={"steps": 12, "checkpoint_every": 12})
    monkeypatch.setattr(train_module, "make_train_step", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train(split, progress=False)
    monkeypatch.setattr(train_module, "make_train_step", real)
    ckpt = Checkpointer(tmp_path / "split/checkpoints")
    assert ckpt.latest_step() == 7
    ckpt.close()
    train(split, progress=False, resume=True)
    like = state_like(straight, [])
    a, b = flatten(_params(tmp_path / "straight", like)), flatten(_params(tmp_path / "split", like))
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), name)


@pytest.mark.slow
def test_resume_refuses_a_changed_model_and_records_a_changed_optimiser(tmp_path):
    train(tiny_recipe(tmp_path / "r", train={"steps": 5}), progress=False)
    other_model = tiny_recipe(tmp_path / "r", train={"steps": 10}, model={"depth": 3})
    with pytest.raises(RecipeError, match="model.depth"):
        train(other_model, progress=False, resume=True)
    # A lower learning rate (the usual cure for a spike) is allowed, and recorded.
    lower_lr = tiny_recipe(tmp_path / "r", train={"steps": 10}, optim={"lr": 5e-4})
    assert train(lower_lr, progress=False, resume=True).step == 10
    lines = (tmp_path / "r/resumes.jsonl").read_text().splitlines()
    (record,) = [json.loads(line) for line in lines]
    assert record["step"] == 5
    assert record["changed"] == {"optim.lr": [1e-3, 5e-4], "train.steps": [5, 10]}
    assert "lr = 0.0005" in (tmp_path / "r/recipe.toml").read_text()


@pytest.mark.slow
def test_checkpoint_mismatch_names_the_weights(tmp_path):
    recipe = tiny_recipe(tmp_path / "r", train={"steps": 5})
    train(recipe, progress=False)
    bigger = tiny_recipe(tmp_path / "r2", model={"hidden_size": 64})
    with pytest.raises(CheckpointMismatch) as e:
        _params(tmp_path / "r", state_like(bigger, []))
    message = str(e.value)
    assert "shape: ema/sit/blocks/adaln/bias (2, 192) != (2, 384)" in message
    with_projector = state_like(recipe, [16])
    with pytest.raises(CheckpointMismatch, match="missing: .*projectors"):
        _params(tmp_path / "r", with_projector)


def test_one_step_updates_ema_and_step():
    recipe = tiny_recipe("unused")
    config = sit_config(recipe, 10)
    optimizer = make_optimizer(recipe)
    state = init_state(config, [16], 64, optimizer, seed=0)
    before = jax.tree.map(np.asarray, eqx.filter(state.model, eqx.is_inexact_array))
    arrays, static = eqx.partition(state, eqx.is_array)
    step = make_train_step(optimizer, StepConfig("linear", "uniform", 0.5, 0.9, "fp32"), static, ())
    ds = load_mnist_5k()
    idx = batch_indices(0, 8, len(ds), 0)
    batch = {
        "x": ds.images[idx] / 127.5 - 1,
        "y": ds.labels[idx],
        "features": (np.random.default_rng(0).normal(size=(8, 64, 16)).astype(np.float32),),
    }
    arrays, metrics = step(arrays, batch, ())
    new = eqx.combine(arrays, static)
    assert int(new.step) == 1 and np.isfinite(float(metrics["loss"]))
    after = eqx.filter(new.model, eqx.is_inexact_array)
    ema = eqx.filter(new.ema, eqx.is_inexact_array)
    # ema = 0.9 * initial + 0.1 * updated
    for b, a, e in zip(
        jax.tree.leaves(before), jax.tree.leaves(after), jax.tree.leaves(ema), strict=True
    ):
        np.testing.assert_allclose(e, 0.9 * b + 0.1 * np.asarray(a), rtol=1e-5, atol=1e-7)
    # adaLN-Zero: on the first step the zero-initialised gates and output layer move, while
    # the attention weights behind a zero gate get no gradient and stay put.
    assert not np.array_equal(before.sit.final_linear.weight, after.sit.final_linear.weight)
    assert not np.array_equal(before.sit.blocks.adaln.weight, after.sit.blocks.adaln.weight)
    np.testing.assert_array_equal(before.sit.blocks.qkv.weight, after.sit.blocks.qkv.weight)


def test_lambda_zero_is_the_vanilla_objective():
    config = sit_config(tiny_recipe("unused", model={"input_size": 16}), 10)
    state = init_state(config, [16], 64, make_optimizer(tiny_recipe("unused")), seed=0)
    x = jax.random.normal(jax.random.key(1), (4, 1, 16, 16))
    y = jnp.arange(4)
    feats = (jax.random.normal(jax.random.key(2), (4, 16, 16)),)
    key = jax.random.key(3)
    kw = dict(path="linear", weighting="uniform")
    repa, aux = repa_objective(state.model, x, y, feats, key, terms=Terms(proj_coeff=0.5), **kw)
    zero, _ = repa_objective(state.model, x, y, feats, key, terms=Terms(proj_coeff=0.0), **kw)
    vanilla, _ = repa_objective(state.model, x, y, (), key, terms=Terms(proj_coeff=0.5), **kw)
    assert float(zero) == float(vanilla) == float(aux["denoise_loss"])
    assert float(repa) == pytest.approx(float(vanilla) + 0.5 * float(aux["repa_loss"]), rel=1e-6)


def test_bf16_step_and_tensorboard(tmp_path):
    recipe = tiny_recipe(
        tmp_path / "r", train={"steps": 5, "precision": "bf16"}, output={"tensorboard": True}
    )
    result = train(recipe, progress=False)
    assert np.isfinite(result.last["loss"])
    assert list((tmp_path / "r/tensorboard").glob("events.out.tfevents.*"))


def test_non_finite_loss_stops_with_the_step(tmp_path):
    recipe = tiny_recipe(tmp_path / "r", optim={"lr": float("nan")})
    with pytest.raises(TrainingDiverged, match="non-finite loss at step 5.*last good checkpoint"):
        train(recipe, progress=False)


def test_encoder_grid_must_match_the_sit(tmp_path, tiny_dinov2):
    recipe = tiny_recipe(tmp_path / "r", tiny_dinov2)
    bad = parse_recipe(
        {
            **{
                k: v
                for k, v in {
                    "model": recipe.model.__dict__,
                    "data": {"dataset": "mnist-5k"},
                    "output": {"dir": str(tmp_path / "r")},
                }.items()
            },
            "encoders": [{"id": tiny_dinov2, "resolution": 224}],
        }
    )
    with pytest.raises(RecipeError, match=r"encoders\[0\].resolution.*use 112"):
        train(bad, progress=False)


@pytest.mark.slow
def test_quickstart_lightningdit_recipe_trains(tmp_path, tiny_dinov2):
    """The shipped recipe's backbone and options (SwiGLU, RMSNorm, RoPE, cosine loss, beta2
    0.95) train: both losses fall and the cosine term is logged. Shortened, with the test's
    tiny DINOv2 in place of the offline teacher and no evaluation."""
    path = Path(__file__).parent.parent / "recipes/quickstart_lightningdit.toml"
    table = tomllib.loads(path.read_text())
    table["encoders"][0]["id"] = tiny_dinov2
    table["train"] |= {"steps": 60, "log_every": 10, "sample_every": 60, "checkpoint_every": 60}
    table["eval"]["every"] = 0
    table["output"]["dir"] = str(tmp_path / "run")
    recipe = parse_recipe(table)
    config = sit_config(recipe)
    assert (config.mlp, config.norm, config.rope) == ("swiglu", "rmsnorm", True)
    train(recipe, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["denoise_loss"] < rows[0]["denoise_loss"]
    assert rows[-1]["cos_loss"] < rows[0]["cos_loss"] < 1.5
    assert all(np.isfinite(r["loss"]) for r in rows)
