"""The `repa` command: bad input ends with one readable line and a non-zero exit code."""

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from repa_cli.main import app

pytestmark = pytest.mark.standard_promotion

runner = CliRunner()


def _tiny(tmp_path, extra=""):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(
        f"""
[model]
arch = "SiT-S/4"
depth = 1
hidden_size = 32
num_heads = 2
encoder_depth = 1
input_size = 32
in_channels = 1
num_classes = 10
[data]
dataset = "mnist-5k"
batch_size = 8
[train]
steps = 2
log_every = 1
sample_every = 2
sample_steps = 2
num_samples = 10
[output]
dir = "{tmp_path / "run"}"
{extra}"""
    )
    return recipe


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "model.dept=3"], "error: recipe key 'model.dept' is unknown"),
        (["--set", "optim.lr=fast"], "error: recipe key 'optim.lr' must be float, got str 'fast'"),
        (
            ["--set", "encoders=[{id='nowhere/not-a-model', resolution=112}]"],
            "error: 'nowhere/not-a-model' is not in the Hub cache and the Hub cannot be reached",
        ),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = runner.invoke(app, ["train", str(_tiny(tmp_path)), "--no-progress", *args])
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_missing_recipe_file(tmp_path):
    result = runner.invoke(app, ["train", str(tmp_path / "nope.toml")])
    assert result.exit_code == 1 and "recipe file not found" in result.output


@pytest.mark.slow
def test_train_command_runs_and_reports(tmp_path):
    result = runner.invoke(app, ["train", str(_tiny(tmp_path)), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "done: step 2" in result.output
    assert (tmp_path / "run" / "samples.png").is_file()
    again = runner.invoke(app, ["train", str(_tiny(tmp_path)), "--no-progress"])
    assert again.exit_code == 1 and "--resume" in again.output


def test_console_script_is_installed():
    repa = Path(sys.executable).parent / "repa"
    out = subprocess.run([str(repa), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout
