"""Exporting a (tiny, really trained) run and loading it back: the same SiT, bit for bit; the
model card's metrics are the run's last logged values; the errors are one clear line."""

import json

import numpy as np
import pytest
from helpers import velocities
from safetensors.numpy import load_file

from repa_eqx.core.pytree import flatten
from repa_eqx.pretrained import PretrainedNotFound
from repa_eqx.runs.export import (
    ExportError,
    NotAnExport,
    export_files,
    export_run,
    from_pretrained,
    latest_metrics,
)
from repa_eqx.runs.load import RunNotFound, load_run
from repa_eqx.training.checkpoint import Checkpointer
from repa_eqx.training.metrics_log import read_metrics

pytestmark = pytest.mark.standard_promotion


def test_round_trip_gives_the_runs_ema_sit(trained_run, tmp_path):
    folder = export_run(trained_run, tmp_path / "export")
    assert [name for name, _ in export_files(folder)] == [
        "config.json", "README.md", "samples.png", "model.safetensors",
    ]  # fmt: skip
    loaded, run = from_pretrained(folder), load_run(trained_run)
    assert (loaded.step, loaded.path, loaded.latent) == (4, "linear", False)
    assert loaded.source == folder and loaded.sit.config == run.sit.config
    a, b = flatten(loaded.sit), flatten(run.sit)
    assert a.keys() == b.keys() == load_file(folder / "model.safetensors").keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    np.testing.assert_array_equal(velocities(loaded.sit), velocities(run.sit))
    # The EMA weights, not the raw ones.
    flat, _ = Checkpointer(trained_run / "checkpoints").restore_flat(4)
    np.testing.assert_array_equal(a["label_table"], flat["ema/sit/label_table"])
    assert not np.array_equal(a["label_table"], flat["model/sit/label_table"])

    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == "repa-eqx" and config["format_version"] == 1
    assert config["sit"]["hidden_size"] == 32 and config["step"] == 4
    assert config["vae"] is None and config["encoders"] == []
    assert config["recipe"]["train"]["steps"] == 4
    assert config["parameters"] == sum(v.size for v in a.values())


def test_an_earlier_checkpoint(trained_run, tmp_path):
    folder = export_run(trained_run / "checkpoints" / "2", tmp_path / "e2")
    model = from_pretrained(folder)
    assert model.step == 2
    np.testing.assert_array_equal(
        velocities(model.sit), velocities(load_run(trained_run, step=2).sit)
    )
    card = (folder / "README.md").read_text()
    assert "| loss |" in card and "| 2 |" in card and "| 4 |" not in card


def test_model_card(trained_run, tmp_path):
    folder = export_run(trained_run, tmp_path / "export", repo_id="someone/tiny-repa")
    card = (folder / "README.md").read_text()
    header = card.split("---\n")[1]
    for line in (
        "library_name: repa-eqx", "license: mit",
        "pipeline_tag: unconditional-image-generation", "- repa", "- equinox",
    ):  # fmt: skip
        assert line in header.splitlines()
    last = read_metrics(trained_run / "metrics.jsonl")[-1]
    assert last["step"] == 4
    assert "| metric | value | step |" in card
    for name in ("loss", "denoise_loss", "grad_norm"):
        assert f"| {name} | {last[name]:.6g} | 4 |" in card
    assert "images_per_s" not in card  # the machine's speed is not the model's
    assert "repa sample --from-hub someone/tiny-repa --num 64 --steps 4" in card
    assert 'from_pretrained("someone/tiny-repa")' in card
    assert "arXiv" in card and "2410.06940" in card and "Easier Than You Think" in card
    assert "![samples](samples.png)" in card
    assert (folder / "samples.png").read_bytes() == (trained_run / "samples.png").read_bytes()


def test_train_state(trained_run, tmp_path):
    folder = export_run(trained_run, tmp_path / "export", include_train_state=True)
    state = load_file(folder / "train_state.safetensors")
    flat, _ = Checkpointer(trained_run / "checkpoints").restore_flat(4)
    assert state.keys() == flat.keys()
    for name, value in flat.items():
        assert state[name].shape == value.shape, name
        np.testing.assert_array_equal(state[name], value, err_msg=name)
    assert int(state["step"]) == 4 and any(k.startswith("opt_state/") for k in state)
    # Exporting again without it leaves no stale train state behind.
    export_run(trained_run, folder)
    assert not (folder / "train_state.safetensors").exists()


def test_latest_metrics_keep_every_key_at_its_last_step(tmp_path):
    records = [
        {"step": 100, "loss": 0.5, "repa_loss": -0.1, "steps_per_s": 3.0},
        {"step": 200, "loss": 0.4, "repa_loss": -0.2},
        {"step": 200, "fid_10k": 41.5, "fd_dinov2": 612.0, "cknna": 0.31},
        {"step": 300, "loss": 0.3},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert latest_metrics(path) == {
        "loss": (0.3, 300), "repa_loss": (-0.2, 200), "fid_10k": (41.5, 200),
        "fd_dinov2": (612.0, 200), "cknna": (0.31, 200),
    }  # fmt: skip
    assert latest_metrics(path, up_to=150) == {"loss": (0.5, 100), "repa_loss": (-0.1, 100)}
    assert latest_metrics(tmp_path / "none.jsonl") == {}


def test_errors(trained_run, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"holds files of its own \(notes.txt\)"):
        export_run(trained_run, tmp_path / "busy")
    with pytest.raises(RunNotFound, match="is not a run directory"):
        export_run(tmp_path / "nowhere")
    with pytest.raises(RunNotFound, match="no checkpoint at step 3"):
        export_run(trained_run, tmp_path / "e", step=3)
    for folder in (tmp_path / "busy", trained_run):
        with pytest.raises(NotAnExport, match="is not a repa-eqx export"):
            from_pretrained(folder)


def test_hub_id_offline_and_not_cached(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(PretrainedNotFound, match="not in the Hub cache") as error:
        from_pretrained("someone/never-downloaded")
    assert len(str(error.value).splitlines()) == 1
    with pytest.raises(PretrainedNotFound, match="neither a local export folder nor a Hub"):
        from_pretrained("not//an id")
