"""Runs you can trust: each way found to lose training time or to mislead with a number, and
the behaviour that replaced it. Tiny runs on MNIST; every assertion is on files and messages a
user would see."""

import io
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_recipe
from rich.console import Console
from typer.testing import CliRunner

from repa_cli.main import app
from repa_eqx.core.errors import StorageError
from repa_eqx.pretrained import PretrainedNotFound
from repa_eqx.runs.export import export_run
from repa_eqx.runs.load import load_run
from repa_eqx.training import train
from repa_eqx.training.checkpoint import Checkpointer, CheckpointUnreadable, fingerprint
from repa_eqx.training.lock import LOCK, RunLock, RunLocked
from repa_eqx.training.loop import TrainingDiverged, TrainingInterrupted
from repa_eqx.training.recipe import RecipeError, dump_recipe, parse_recipe

pytestmark = pytest.mark.standard_promotion
runner = CliRunner()
loop = sys.modules["repa_eqx.training.loop"]  # the package exports a function `train`


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=400), out


def _steps(run_dir) -> list[int]:
    ckpt = run_dir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())


def _logged(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]


def _wrap_step(monkeypatch, change):
    """Patch the loop's step so that `change(call, state_arrays)` runs before each call."""
    real = loop.make_train_step
    calls = []

    def patched(*args, **kwargs):
        step = real(*args, **kwargs)

        def wrapped(state_arrays, *rest):
            calls.append(1)
            return step(change(len(calls), state_arrays), *rest)

        return wrapped

    monkeypatch.setattr(loop, "make_train_step", patched)


# ------------------------------------------------------------------ readers and writers


def test_readers_never_disturb_a_run_that_is_being_written(trained_run, tmp_path):
    """`repa sample`, exports and `load_run` read checkpoints without creating, tidying or
    deleting anything: a save in flight (orbax's temporary folder) survives them."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    in_flight = run / "checkpoints" / "6.orbax-checkpoint-tmp-1764593000000000"
    in_flight.mkdir()
    (in_flight / "state").write_text("half written")
    (run / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert load_run(run).step == 4
    export_run(run, tmp_path / "export", include_train_state=True)
    result = runner.invoke(
        app, ["sample", "--ckpt", str(run), "--num", "2", "--steps", "2", "--out",
              str(tmp_path / "s"), "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    assert (in_flight / "state").read_text() == "half written"


def test_a_second_writer_is_refused_with_one_line(tmp_path):
    recipe = tiny_recipe(tmp_path / "r", train={"steps": 2})
    holder = RunLock(tmp_path / "r")
    assert holder.acquire() is None  # a live process (this one) holds the run
    with pytest.raises(RunLocked, match=f"is being written by process {os.getpid()} on "):
        train(recipe, progress=False)
    recipe_file = tmp_path / "r.toml"
    recipe_file.write_text(dump_recipe(recipe))
    result = runner.invoke(app, ["train", str(recipe_file), "--no-progress"])
    assert result.exit_code == 1 and "one run folder takes one writer" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "r" / "checkpoints").exists()
    holder.release()
    assert not (tmp_path / "r" / LOCK).exists()
    assert train(recipe, progress=False).step == 2
    assert not (tmp_path / "r" / LOCK).exists()  # released when training ends


def test_a_stale_lock_after_kill_is_taken_over(tmp_path):
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = int(finished.stdout)
    run = tmp_path / "r"
    run.mkdir()
    stale = {"host": socket.gethostname(), "pid": dead, "pid_started": None,
             "command": "repa train old.toml", "since": "2026-01-01T00:00:00+00:00"}  # fmt: skip
    (run / LOCK).write_text(json.dumps(stale))
    console, out = _console()
    train(tiny_recipe(run, train={"steps": 2}), progress=False, console=console)
    assert f"took over the stale lock of process {dead}" in out.getvalue()
    # A process id in use again, by a process started later than the holder, is stale too.
    reused = stale | {"pid": os.getpid(), "pid_started": "1"}
    (run / LOCK).write_text(json.dumps(reused))
    assert "took over the stale lock" in (RunLock(run).acquire() or "")


# ------------------------------------------------------------ non-finite states and errors


def test_a_nan_between_log_steps_is_never_checkpointed(tmp_path, monkeypatch):
    """Logs only at the end, checkpoints every 4 steps, NaN weights from step 6: checkpoint 8
    is not written, step 4 stays the last good one, and the run says so."""

    def poison(call, arrays):
        if call != 6:
            return arrays
        return jax.tree.map(
            lambda a: a * jnp.nan if jnp.issubdtype(a.dtype, jnp.floating) else a, arrays
        )

    _wrap_step(monkeypatch, poison)
    recipe = tiny_recipe(
        tmp_path / "r", train={"steps": 12, "log_every": 100, "checkpoint_every": 4}
    )
    with pytest.raises(
        TrainingDiverged, match=r"step 8 holds NaN or Inf.*last good checkpoint: step 4"
    ):
        train(recipe, progress=False)
    assert _steps(tmp_path / "r") == [4]
    checkpointer = Checkpointer(tmp_path / "r/checkpoints", read_only=True)
    flat, _ = checkpointer.restore_flat(4)
    assert all(np.isfinite(np.asarray(v)).all() for v in flat.values() if v.dtype.kind == "f")


@pytest.mark.slow
def test_any_error_mid_run_leaves_an_emergency_checkpoint(tmp_path, monkeypatch):
    """A grid that cannot be drawn at step 6 (a VAE that is not cached, a full disk): the
    state of step 6 is saved, the run says so, and resuming it equals an uninterrupted run."""
    steps = {"steps": 12, "checkpoint_every": 12, "sample_every": 6, "log_every": 3}
    straight = tiny_recipe(tmp_path / "straight", train=steps)
    train(straight, progress=False)

    def failing_drawer(*args):
        def draw(step, ema):
            raise RuntimeError("the sample grid's VAE is not in the cache")

        return draw

    monkeypatch.setattr(loop, "_grid_drawer", failing_drawer)
    broken = tiny_recipe(tmp_path / "broken", train=steps)
    console, out = _console()
    with pytest.raises(RuntimeError, match="not in the cache"):
        train(broken, progress=False, console=console)
    assert "saved an emergency checkpoint: step 6" in out.getvalue()
    assert _steps(tmp_path / "broken") == [6]
    monkeypatch.undo()
    train(broken, progress=False, resume=True)
    a = Checkpointer(tmp_path / "straight/checkpoints", read_only=True).restore_flat(12)[0]
    b = Checkpointer(tmp_path / "broken/checkpoints", read_only=True).restore_flat(12)[0]
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), name)


def test_ctrl_c_keeps_the_last_metrics_line_and_says_what_it_saved(tmp_path, monkeypatch):
    def interrupt(call, arrays):
        if call == 8:  # after step 7, which logged nothing (log_every 5)
            raise KeyboardInterrupt
        return arrays

    _wrap_step(monkeypatch, interrupt)
    recipe = tiny_recipe(tmp_path / "r", train={"steps": 12, "checkpoint_every": 12})
    with pytest.raises(TrainingInterrupted) as interrupted:
        train(recipe, progress=False)
    assert "saved an emergency checkpoint: step 7" in interrupted.value.message
    assert _logged(tmp_path / "r") == [5, 7] and _steps(tmp_path / "r") == [7]
    # Interrupted before the loop started: the command does not claim anything was saved.
    monkeypatch.setattr(
        loop, "_load_data", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
    )
    recipe_file = tmp_path / "new.toml"
    recipe_file.write_text(dump_recipe(tiny_recipe(tmp_path / "new")))
    result = runner.invoke(app, ["train", str(recipe_file), "--no-progress"])
    assert result.exit_code == 130 and "interrupted before training started" in result.output


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.slow
def test_same_size_corruption_is_detected_and_the_previous_checkpoint_used(tmp_path):
    recipe = tiny_recipe(tmp_path / "r", train={"steps": 10, "checkpoint_every": 5})
    train(recipe, progress=False)
    files = [f for f in (tmp_path / "r/checkpoints/10/state").rglob("*") if f.is_file()]
    biggest = max(files, key=lambda f: f.stat().st_size)
    data = bytearray(biggest.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(255 - b for b in data[middle : middle + 8])
    biggest.write_bytes(bytes(data))  # same size, other bytes
    console, out = _console()
    longer = tiny_recipe(tmp_path / "r", train={"steps": 12, "checkpoint_every": 5})
    train(longer, progress=False, resume=True, console=console)
    text = out.getvalue()
    assert "checkpoint step 10:" in text and "using step 5" in text and "from step 5" in text
    assert (tmp_path / "r/checkpoints/corrupt-10").is_dir()


def test_the_digest_catches_what_decodes_fine(tmp_path):
    """Arrays that read back without error but differ from what was saved."""
    checkpointer = Checkpointer(tmp_path / "c")
    checkpointer.save(1, {"w": jnp.arange(6.0)}, {"step": 1})
    checkpointer.wait()
    meta = tmp_path / "c/1/meta/metadata"
    record = json.loads(meta.read_text())
    record["digest"]["w"][1] += 1
    meta.write_text(json.dumps(record))
    with pytest.raises(CheckpointUnreadable, match="do not match their digest \\(w changed\\)"):
        Checkpointer(tmp_path / "c", read_only=True).restore_flat(1)
    # The digest is exact and does not depend on how an array is split over devices.
    x = jax.random.normal(jax.random.key(0), (64, 33))
    assert fingerprint({"x": x}) == fingerprint({"x": x[::-1][::-1]})
    assert fingerprint({"x": x}) != fingerprint({"x": x.at[3, 4].set(x[4, 3])})


def test_resume_with_nothing_restorable_is_an_error_not_a_restart(tmp_path):
    recipe = tiny_recipe(tmp_path / "r", train={"steps": 10, "checkpoint_every": 5})
    train(recipe, progress=False)
    lines = (tmp_path / "r/metrics.jsonl").read_text()
    for step in (5, 10):
        for file in (tmp_path / f"r/checkpoints/{step}/state").rglob("*"):
            if file.is_file() and file.stat().st_size > 64:
                file.write_bytes(file.read_bytes()[:32])
    with pytest.raises(RecipeError, match="every checkpoint is unreadable.*corrupt-10, corrupt-5"):
        train(recipe, progress=False, resume=True)
    assert (tmp_path / "r/metrics.jsonl").read_text() == lines
    with pytest.raises(RecipeError, match="is not a run"):
        train(tiny_recipe(tmp_path / "nowhere"), progress=False, resume=True)


def test_resume_to_fewer_steps_saves_nothing_under_a_wrong_name(tmp_path):
    train(tiny_recipe(tmp_path / "r", train={"steps": 10, "checkpoint_every": 5}), progress=False)
    shorter = tiny_recipe(tmp_path / "r", train={"steps": 6, "checkpoint_every": 5})
    console, out = _console()
    assert train(shorter, progress=False, resume=True, console=console).step == 10
    assert "nothing to train" in out.getvalue() and _steps(tmp_path / "r") == [5, 10]


# ------------------------------------------------------------------------- before step 1


def test_no_room_for_a_checkpoint_stops_before_step_one(tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(loop.shutil, "disk_usage", lambda path: real(path)._replace(free=1 << 20))
    with pytest.raises(StorageError, match="GiB free, but checkpoints of this run need"):
        train(tiny_recipe(tmp_path / "r"), progress=False)
    assert not list((tmp_path / "r/checkpoints").iterdir())
    assert not (tmp_path / "r/metrics.jsonl").exists()


def test_an_unwritable_output_folder_is_one_line(tmp_path):
    (tmp_path / "FILE").write_text("a file, not a folder")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(dump_recipe(tiny_recipe(tmp_path / "FILE" / "run")))
    result = runner.invoke(app, ["train", str(recipe), "--no-progress"])
    assert result.exit_code == 1 and "cannot write" in result.output, result.output
    assert str(tmp_path / "FILE" / "run") in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_missing_grid_vae_stops_before_step_one(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    recipe = parse_recipe(
        {
            "model": dict(arch="SiT-S/2", depth=1, hidden_size=32, num_heads=2, encoder_depth=1,
                          input_size=4, in_channels=4, num_classes=3),
            "data": {"dataset": "imagenet-latents", "path": str(dataset), "batch_size": 4,
                     "vae": "nobody/no-such-vae"},
            "train": dict(steps=2, sample_every=2, sample_steps=2, num_samples=3),
            "output": {"dir": str(tmp_path / "run")},
        }
    )  # fmt: skip
    with pytest.raises(PretrainedNotFound, match="nobody/no-such-vae"):
        train(recipe, progress=False)
    assert not list((tmp_path / "run/checkpoints").iterdir())


# ----------------------------------------------------------------------------- commands


@pytest.mark.unchecked
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "at least one step"),
        (["--num", "0"], "need at least one sample"),
        (["--batch", "0"], "a batch of one"),
        (["--out", "FILE/inside"], "cannot write"),
    ],
)
def test_sample_command_bad_numbers_and_paths_are_one_line(trained_run, tmp_path, args, message):
    (tmp_path / "FILE").write_text("a file, not a folder")
    args = [str(tmp_path / a) if a.startswith("FILE") else a for a in args]
    result = runner.invoke(
        app, ["sample", "--ckpt", str(trained_run), "--no-progress", "--num", "2", *args]
    )
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def _npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def test_fid_command_refuses_empty_files_nan_statistics_and_hostile_weights(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    samples = _npz(tmp_path / "s.npz", arr_0=images)
    (tmp_path / "empty.npz").write_bytes(b"")
    nan = np.full(2048, np.nan)
    ref = _npz(tmp_path / "nan.npz", arr_0=images, mu=nan, sigma=np.eye(2048), mu_s=nan[:2023],
               sigma_s=np.eye(2023))  # fmt: skip
    torch = pytest.importorskip("torch")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    hostile = tmp_path / "evil.pth"
    torch.save({"w": Evil()}, hostile)
    cases = [
        (["fid", str(tmp_path / "empty.npz"), "--ref", str(samples)], "is not a readable .npz"),
        (["fid", str(samples), "--ref", str(ref), "--inception", str(hostile)], "refusing"),
    ]
    for args, message in cases:
        result = runner.invoke(app, [*args, "--no-progress"])
        assert result.exit_code == 1 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1


def test_nan_statistics_end_in_an_error_and_no_report(tmp_path, monkeypatch):
    """FID of statistics with NaN: an error, never `NaN` in a report."""
    from repa_eqx.evaluation import suite
    from repa_eqx.pretrained.inception import InceptionOutput

    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    samples = _npz(tmp_path / "s.npz", arr_0=images)
    nan = np.full(4, np.nan)
    ref = _npz(tmp_path / "nan.npz", arr_0=images, mu=nan, sigma=np.eye(4), mu_s=nan[:3],
               sigma_s=np.eye(3))  # fmt: skip
    rng = np.random.default_rng(1)

    def features(model, batch, **kwargs):
        n = len(batch)
        return InceptionOutput(rng.normal(size=(n, 4)), rng.normal(size=(n, 3)),
                               rng.normal(size=(n, 5)))  # fmt: skip

    monkeypatch.setattr(suite, "inception_features", features)
    monkeypatch.setattr(suite, "load_inception", lambda path: "the network")
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"stand-in")
    report = tmp_path / "s.metrics.json"
    with pytest.raises(suite.EvaluationError, match="fid = nan is not finite"):
        suite.evaluate(samples, ref, metrics=("fid",), inception_path=weights, report=report)
    assert not report.exists()


def test_a_damaged_conversion_is_named(tmp_path, monkeypatch, tiny_dinov2):
    from repa_eqx.pretrained.registry import convert, load_dinov2

    monkeypatch.setenv("REPA_EQX_CACHE", str(tmp_path / "cache"))
    out = convert(tiny_dinov2)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(PretrainedNotFound, match=f"{weights} is damaged or unreadable"):
        load_dinov2(tiny_dinov2)


# --------------------------------------------------------------------------------- W&B


@pytest.mark.slow
def test_wandb_offline_gets_metrics_cards_and_grids_and_a_resume_continues_the_run(
    tmp_path, monkeypatch, tiny_dinov2
):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("REPA_EQX_CACHE", str(tmp_path / "cache"))
    logged = []
    real_log = wandb.sdk.wandb_run.Run.log

    def spy(self, data, *args, **kwargs):
        logged.append(dict(data))
        return real_log(self, data, *args, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", spy)
    spec = dict(every=2, metrics=["cknna"], num_samples=10, sample_steps=2, num_real=20)
    recipe = tiny_recipe(
        tmp_path / "r", encoder=tiny_dinov2, output={"wandb": {"project": "repa-test"}},
        train={"steps": 4, "log_every": 2, "sample_every": 4}, eval=spec,
    )  # fmt: skip
    train(recipe, progress=False)
    run_id = json.loads((tmp_path / "r/wandb.json").read_text())["id"]
    (first,) = (tmp_path / "r/wandb").glob(f"offline-run-*-{run_id}")
    records = (first / f"run-{run_id}.wandb").read_bytes()
    assert b"denoise_loss" in records and b"eval_card" in records and b"cknna" in records
    assert [r["step"] for r in logged if "loss" in r] == [2, 4]
    assert any("samples" in r for r in logged)
    longer = tiny_recipe(
        tmp_path / "r", encoder=tiny_dinov2, output={"wandb": {"project": "repa-test"}},
        train={"steps": 6, "log_every": 2, "sample_every": 4}, eval=spec,
    )  # fmt: skip
    train(longer, progress=False, resume=True)
    assert json.loads((tmp_path / "r/wandb.json").read_text())["id"] == run_id
    assert len(list((tmp_path / "r/wandb").glob(f"offline-run-*-{run_id}"))) >= 1
    assert [r["step"] for r in logged if "loss" in r] == [2, 4, 6]


# ------------------------------------------------------------------- a live training run


@pytest.mark.slow
def test_sampling_and_exporting_while_a_run_trains_leave_it_alone(tmp_path):
    """The live trial that once crashed a run: `repa sample` and `push-to-hub --dry-run`
    pointed at a run that is saving checkpoints; the run ends as if alone."""
    recipe = tiny_recipe(
        tmp_path / "live", train={"steps": 60, "checkpoint_every": 2, "log_every": 10}
    )
    recipe_file = tmp_path / "live.toml"
    recipe_file.write_text(dump_recipe(recipe))
    repa = os.path.join(os.path.dirname(sys.executable), "repa")
    trainer = subprocess.Popen(
        [repa, "train", str(recipe_file), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    readers = 0
    try:
        while trainer.poll() is None:
            if (tmp_path / "live/checkpoints").is_dir() and _steps(tmp_path / "live"):
                for args in (
                    ["sample", "--ckpt", str(tmp_path / "live"), "--num", "2", "--steps", "2",
                     "--out", str(tmp_path / "s"), "--no-progress"],
                    ["push-to-hub", "--run", str(tmp_path / "live"), "--dry-run",
                     "--out", str(tmp_path / "export")],
                ):  # fmt: skip
                    done = subprocess.run([repa, *args], capture_output=True, text=True)
                    readers += done.returncode == 0
    finally:
        output = trainer.communicate(timeout=600)[0]
    assert trainer.returncode == 0, output
    assert "done: step 60" in output and readers >= 2
    assert _steps(tmp_path / "live")[-1] == 60 and not (tmp_path / "live" / LOCK).exists()
