"""Every number says how it was made: sample files carry their sampling card, `repa eval`
reports carry an evaluation card, the in-training evaluation keeps its samples, reference and
card, and its numbers are what an offline evaluation of those files gives, whatever the
batch size or number of devices."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import eval_recipe
from typer.testing import CliRunner

from repa_cli.main import app
from repa_eqx.evaluation.adm import load_card
from repa_eqx.evaluation.suite import evaluate
from repa_eqx.runs.export import export_run
from repa_eqx.training import train
from repa_eqx.training.metrics_log import read_metrics

pytestmark = pytest.mark.standard_promotion
runner = CliRunner()


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("REPA_EQX_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory, tiny_dinov2):
    run = tmp_path_factory.mktemp("eval") / "run"
    train(eval_recipe(run, tiny_dinov2), progress=False)
    return run


def test_sample_files_and_eval_reports_say_how_they_were_made(trained_run, tmp_path):
    out = tmp_path / "s"
    args = ["sample", "--ckpt", str(trained_run), "--num", "12", "--steps", "3", "--cfg", "1.5",
            "--interval", "0,0.7", "--class-balanced", "--seed", "5", "--out", str(out),
            "--no-progress"]  # fmt: skip
    assert runner.invoke(app, args).exit_code == 0
    card = load_card(tmp_path / "s.npz")
    assert card["model"] == {"source": str(trained_run), "step": 4, "weights": "EMA",
                             "objective": "interpolant"}  # fmt: skip
    sampler = card["sampler"]
    assert (sampler["mode"], sampler["num_steps"], sampler["cfg_scale"]) == ("ode", 3, 1.5)
    assert sampler["interval"] == [0.0, 0.7] and card["labels"] == "class-balanced"
    assert (card["num"], card["seed"], card["decoder"]) == (12, 5, "pixels")
    assert card["repa_eqx"]


@pytest.mark.slow
def test_online_and_offline_numbers_agree_for_the_same_samples(eval_run, tiny_dinov2):
    """The in-training FD-DINOv2 at step 4 is what `evaluate` gives offline on the samples
    and the reference batch the run kept."""
    (logged,) = [r for r in read_metrics(eval_run / "metrics.jsonl") if "fd_dinov2" in r][-1:]
    assert logged["step"] == 4
    samples, reference = eval_run / "eval/step_0000004.npz", eval_run / "eval/reference.npz"
    report = eval_run / "offline.json"
    offline = evaluate(
        samples, reference, metrics=("fd_dinov2",), fd_dinov2_model=tiny_dinov2,
        fd_dinov2_resolution=56, report=report, progress=False,
    )  # fmt: skip
    assert offline["fd_dinov2"] == pytest.approx(logged["fd_dinov2"], rel=1e-9)
    card = json.loads(report.read_text())["card"]
    assert card["samples"]["made"]["model"] == "EMA at step 4"
    assert card["samples"]["num"] == 20 and card["reference"]["num_images"] == 100
    assert card["features"]["fd_dinov2"]["resolution"] == 56 and "inception" not in card["features"]
    run_card = json.loads((eval_run / "eval/card.json").read_text())
    assert set(run_card["metrics"]) == {"fd_dinov2", "cknna", "linear_probe"}
    assert run_card["samples"]["sampler"]["num_steps"] == 2


@pytest.mark.slow
def test_the_model_card_shows_how_the_metrics_were_made(eval_run, tmp_path):
    folder = export_run(eval_run, tmp_path / "export")
    readme = (folder / "README.md").read_text()
    assert "## How the evaluation metrics were made" in readme
    assert "- fd_dinov2: Frechet distance" in readme and "20 class-balanced samples" in readme
    assert json.loads((folder / "eval_card.json").read_text()) == json.loads(
        (eval_run / "eval/card.json").read_text()
    )


def _scores(recipe, batch_size):
    """The Monitor's numbers for one fixed SiT (no training), at an evaluation batch size."""
    import jax

    from repa_eqx.data.datasets import load_mnist_5k
    from repa_eqx.model.sit import SiT
    from repa_eqx.training.loop import load_encoders
    from repa_eqx.training.monitor import Monitor
    from repa_eqx.training.recipe import parse_recipe, recipe_to_dict, sit_config

    table = recipe_to_dict(recipe)
    table["eval"]["batch_size"] = batch_size
    recipe = parse_recipe(table)
    (encoder,) = load_encoders(recipe.encoders, grid=8)
    monitor = Monitor(recipe, load_mnist_5k(32), encoder=encoder)
    sit = SiT(sit_config(recipe, 10), key=jax.random.key(7))
    return monitor(sit, step=1)


def test_the_numbers_do_not_depend_on_the_evaluation_batch_size(tmp_path, tiny_dinov2):
    recipe = eval_recipe(tmp_path, tiny_dinov2)
    default, small = _scores(recipe, None), _scores(recipe, 7)
    assert default.keys() == small.keys() == {"fd_dinov2", "cknna", "linear_probe"}
    for name in default:
        assert small[name] == pytest.approx(default[name], rel=1e-4, abs=1e-6), name


@pytest.mark.slow
def test_the_numbers_do_not_depend_on_the_number_of_devices(tmp_path, tiny_dinov2):
    recipe = eval_recipe(tmp_path, tiny_dinov2)
    (tmp_path / "recipe.toml").write_text(
        __import__("repa_eqx.training.recipe", fromlist=["dump_recipe"]).dump_recipe(recipe)
    )
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(os.path.dirname(__file__))!r})\n"
        "from test_evaluation_cards import _scores\n"
        "from repa_eqx.training.recipe import load_recipe\n"
        f"print(json.dumps(_scores(load_recipe({str(tmp_path / 'recipe.toml')!r}), None)))\n"
    )
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        REPA_EQX_CACHE=os.environ["REPA_EQX_CACHE"],
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    four = json.loads(done.stdout.strip().splitlines()[-1])
    one = _scores(recipe, None)
    for name in one:
        assert four[name] == pytest.approx(one[name], rel=1e-4, abs=1e-6), name


@pytest.mark.slow
def test_offline_fd_dinov2_needs_reference_images(eval_run, tmp_path, tiny_dinov2):
    from repa_eqx.evaluation.adm import EvaluationError

    stats_only = tmp_path / "stats.npz"
    with open(stats_only, "wb") as f:
        np.savez(f, arr_0=np.zeros((0, 8, 8, 3), np.uint8), mu=np.zeros(3), sigma=np.eye(3),
                 mu_s=np.zeros(2), sigma_s=np.eye(2))  # fmt: skip
    with pytest.raises(EvaluationError, match="fd_dinov2 needs them"):
        evaluate(eval_run / "eval/step_0000004.npz", stats_only, metrics=("fd_dinov2",),
                 fd_dinov2_model=tiny_dinov2, fd_dinov2_resolution=56, progress=False)  # fmt: skip
