"""In-training evaluation on a tiny run: the metrics land in metrics.jsonl and eval.png,
are deterministic, and respond to the model."""

import math

import jax
import pytest
from helpers import eval_recipe, tiny_recipe

from repa_eqx.data.datasets import load_mnist_5k
from repa_eqx.model.sit import SiT
from repa_eqx.training.loop import train
from repa_eqx.training.metrics_log import read_metrics
from repa_eqx.training.monitor import Monitor
from repa_eqx.training.recipe import RecipeError, sit_config

pytestmark = pytest.mark.standard_promotion


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("REPA_EQX_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_training_logs_and_plots_the_evaluations(tmp_path, tiny_dinov2):
    recipe = eval_recipe(tmp_path / "run", tiny_dinov2)
    train(recipe, progress=False)
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "cknna" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert set(r) == {"step", "fd_dinov2", "cknna", "linear_probe"}
        assert all(math.isfinite(v) for v in r.values())
        assert -1 <= r["cknna"] <= 1 and 0 <= r["linear_probe"] <= 1 and r["fd_dinov2"] > 0
    assert (tmp_path / "run" / "eval.png").is_file()


def random_sit(recipe, seed):
    sit = SiT(sit_config(recipe, 10), key=jax.random.key(seed))
    leaves, tree = jax.tree.flatten(sit)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(
        tree,
        [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)],
    )


def test_scores_are_deterministic_and_depend_on_the_model(tmp_path, tiny_dinov2):
    from repa_eqx.training.loop import load_encoders

    recipe = eval_recipe(tmp_path, tiny_dinov2)
    (encoder,) = load_encoders(recipe.encoders, grid=8)
    monitor = Monitor(recipe, load_mnist_5k(), encoder=encoder)
    a, b = random_sit(recipe, 0), random_sit(recipe, 5)
    first = monitor(a, 0)
    assert first == monitor(a, 0)
    other = monitor(b, 0)
    assert all(first[k] != other[k] for k in first)


@pytest.mark.slow
def test_mnist_classifier_metrics(tmp_path, tiny_dinov2):
    recipe = eval_recipe(tmp_path, tiny_dinov2, metrics=["fd_mnist", "class_accuracy"])
    monitor = Monitor(recipe, load_mnist_5k())
    scores = monitor(random_sit(recipe, 0), 0)
    assert scores["fd_mnist"] > 0 and 0 <= scores["class_accuracy"] <= 1
    # The real digits against their own statistics: ~0, far below a random model's samples.
    from repa_eqx.evaluation.mnist_net import mnist_features
    from repa_eqx.training.monitor import _fd

    own = _fd(mnist_features(monitor.mnist_net, monitor.real), monitor.mnist_reference)
    assert own < 1e-6 * scores["fd_mnist"] + 1e-6


def test_cknna_needs_an_encoder(tmp_path):
    recipe = tiny_recipe(tmp_path, eval={"every": 1, "metrics": ["cknna"]})
    with pytest.raises(RecipeError, match="cknna needs a target encoder"):
        Monitor(recipe, load_mnist_5k())
