"""Training on several devices, being killed, and coming back: the run's numbers must not care.

Multi-device runs use CPU devices forced with `--xla_force_host_platform_device_count`, in a
subprocess running the `repa` command (the flag must be set before JAX starts).
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import state_like, tiny_recipe
from jax.sharding import PartitionSpec as P

from repa_eqx.core.pytree import flatten
from repa_eqx.training.checkpoint import Checkpointer
from repa_eqx.training.loop import train
from repa_eqx.training.parallel import MeshError, fsdp_spec, mesh_shape
from repa_eqx.training.recipe import dump_recipe

pytestmark = pytest.mark.standard_promotion

REPA = str(Path(sys.executable).parent / "repa")


def test_fsdp_spec_splits_the_largest_divisible_axis():
    assert fsdp_spec((12, 384, 1536), 4, 1) == P(None, None, "fsdp")
    assert fsdp_spec((384, 1536), 1, 1) == P()  # no fsdp axis: replicated
    assert fsdp_spec((1536, 6), 4, 1) == P("fsdp", None)
    assert fsdp_spec((7, 9), 2, 1) == P()  # nothing divisible
    assert fsdp_spec((64, 64), 2, 10_000) == P()  # small: replicated
    assert fsdp_spec((2, 64, 64), 2, 1) == P(None, None, "fsdp")  # ties: the last axis


def test_mesh_shape_checks_the_device_count():
    assert mesh_shape(-1, 2, 8) == mesh_shape(4, 2, 8)
    assert mesh_shape(1, 1, 8).devices == 1  # a smaller explicit mesh: the first devices
    with pytest.raises(MeshError, match="3 x 2 = 6 devices, but this run has 4"):
        mesh_shape(3, 2, 4)
    with pytest.raises(MeshError, match="does not divide"):
        mesh_shape(-1, 3, 8)


def _write(recipe, path: Path) -> Path:
    path.write_text(dump_recipe(recipe))
    return path


def _run(recipe_file: Path, *args, devices: int = 1, check: bool = True, **popen):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    command = [REPA, "train", str(recipe_file), "--no-progress", *args]
    if popen:
        return subprocess.Popen(command, env=env, **popen)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def _final(run_dir: Path, recipe) -> dict[str, np.ndarray]:
    ckpt = Checkpointer(run_dir / "checkpoints")
    state, meta = ckpt.restore(ckpt.latest_step(), state_like(recipe, []))
    ckpt.close()
    return {k: np.asarray(v) for k, v in flatten(state).items()}, meta


def _assert_close(a: dict, b: dict, tol: float | None = None) -> None:
    """Bit-identical, or with `tol` each array within tol x its largest magnitude (Adam
    divides by sqrt(v): entries with near-zero gradients magnify summation-order noise)."""
    assert a.keys() == b.keys()
    for name in a:
        if tol is None:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        else:
            x, y = np.asarray(a[name], np.float64), np.asarray(b[name], np.float64)
            error = np.abs(x - y).max(initial=0) / max(np.abs(x).max(initial=0), 1e-30)
            assert error <= tol, f"{name}: {error:.2e} of its scale"


@pytest.mark.slow
def test_one_device_equals_eight_data_parallel_and_fsdp(tmp_path):
    """The same tiny run on 1 device, on 8 (data parallel) and on 4 x 2 (data x FSDP, the
    weights split over 2 devices) ends with the same params, EMA and optimiser state."""
    base = dict(train={"steps": 6, "checkpoint_every": 6, "log_every": 2}, data={"batch_size": 16})
    one = tiny_recipe(tmp_path / "one", **base)
    train(one, progress=False)  # this process: one CPU device
    finals = {"one": _final(tmp_path / "one", one)[0]}
    for name, mesh in {"dp": (8, 1), "fsdp": (4, 2)}.items():
        recipe = tiny_recipe(
            tmp_path / name, mesh={"data": mesh[0], "fsdp": mesh[1], "fsdp_min_size": 256}, **base
        )
        done = _run(_write(recipe, tmp_path / f"{name}.toml"), devices=8)
        assert f"mesh data x fsdp = {mesh[0]} x {mesh[1]}" in done.stderr
        finals[name] = _final(tmp_path / name, recipe)[0]
    _assert_close(finals["one"], finals["dp"], tol=2e-4)
    _assert_close(finals["one"], finals["fsdp"], tol=2e-4)
    assert np.abs(finals["one"]["model/sit/blocks/fc1/weight"]).sum() > 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one_device(tmp_path):
    """Two processes (hosts) with 2 devices each, joined by jax.distributed over gloo, mesh
    data x fsdp = 2 x 2 (weights split across the hosts): each loads its half of every batch,
    and the run ends where a single-device run does."""
    base = dict(train={"steps": 6, "checkpoint_every": 3, "log_every": 2}, data={"batch_size": 16})
    one = tiny_recipe(tmp_path / "one", **base)
    train(one, progress=False)
    hosts = tiny_recipe(tmp_path / "hosts", mesh={"fsdp": 2, "fsdp_min_size": 256}, **base)
    file = _write(hosts, tmp_path / "hosts.toml")
    port = _free_port()
    procs = [
        _run(
            file,
            "--distributed",
            f"--coordinator=localhost:{port}",
            "--num-processes=2",
            f"--process-id={i}",
            devices=2,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outputs)
    assert "4 device(s) (cpu) on 2 process(es); mesh data x fsdp = 2 x 2" in outputs[0]
    _assert_close(_final(tmp_path / "one", one)[0], _final(tmp_path / "hosts", hosts)[0], 2e-4)
    logged = [json.loads(line)["step"] for line in (tmp_path / "hosts/metrics.jsonl").open()]
    assert logged == [2, 4, 6]  # written once, by process 0


def _kill_at(recipe_file: Path, run_dir: Path, at_least: int) -> int:
    """Start a run and SIGKILL it once a checkpoint at `at_least` or later exists."""
    proc = _run(recipe_file, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = run_dir / "checkpoints"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            steps = [int(p.name) for p in ckpts.glob("*") if p.name.isdigit()]
            if steps and max(steps) >= at_least:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return max(steps)
            if proc.poll() is not None:
                pytest.fail(
                    "the run ended before it could be killed: " + proc.stderr.read().decode()
                )
            time.sleep(0.02)
    finally:
        proc.kill()
    pytest.fail("no checkpoint appeared in time")


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_identical(tmp_path):
    """Killed with SIGKILL at a random step, then resumed: the end state equals an
    uninterrupted run's bit for bit (params, EMA, optimiser, step, RNG, data position). Resumed
    on 8 devices instead, it agrees to fp32 tolerance."""
    steps = 30
    straight = tiny_recipe(tmp_path / "straight", train={"steps": steps, "checkpoint_every": 10})
    train(straight, progress=False)
    reference, meta = _final(tmp_path / "straight", straight)
    assert meta["data"] == {"next_index": steps}

    at = random.Random().randint(3, 18)
    recipe = tiny_recipe(tmp_path / "killed", train={"steps": steps, "checkpoint_every": 1})
    killed_at = _kill_at(_write(recipe, tmp_path / "killed.toml"), tmp_path / "killed", at)
    assert killed_at < steps, f"killed too late (at {killed_at})"
    shutil.copytree(tmp_path / "killed", tmp_path / "moved")
    for name, devices in (("killed", 1), ("moved", 8)):
        recipe = tiny_recipe(tmp_path / name, train={"steps": steps, "checkpoint_every": 1})
        done = _run(_write(recipe, tmp_path / f"{name}.toml"), "--resume", devices=devices)
        assert "resumed" in done.stderr
        final, meta = _final(tmp_path / name, recipe)
        assert meta["data"] == {"next_index": steps}
        if devices == 1:
            _assert_close(reference, final)  # bit-identical
        else:
            # Adam turns summation-order noise in near-zero gradients into whole lr-sized
            # steps, so 30 steps on another device count agree to ~1e-3 of each array's
            # scale (and the logged losses to 1e-4), not to the last bit.
            _assert_close(reference, final, tol=3e-3)
            losses = [
                json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").open()
            ]
            expected = [
                json.loads(line)["loss"] for line in (tmp_path / "straight/metrics.jsonl").open()
            ]
            np.testing.assert_allclose(losses, expected, rtol=1e-4)
        logged = [json.loads(line)["step"] for line in (tmp_path / name / "metrics.jsonl").open()]
        assert logged == list(range(5, steps + 1, 5)), f"killed at {killed_at}"


@pytest.mark.slow
def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path / "r", train={"steps": 15, "checkpoint_every": 5})
    train(recipe, progress=False)
    for file in (tmp_path / "r/checkpoints/15/state").rglob("*"):
        if file.is_file() and file.stat().st_size > 64:
            file.write_bytes(file.read_bytes()[:32])  # truncated
    longer = tiny_recipe(tmp_path / "r", train={"steps": 20, "checkpoint_every": 5})
    from rich.console import Console

    console = Console(stderr=True, width=300)
    train(longer, resume=True, progress=False, console=console)
    err = capsys.readouterr().err
    assert "checkpoint step 15:" in err and "using step 10" in err
    assert "resumed" in err and "from step 10" in err
    assert (tmp_path / "r/checkpoints/corrupt-15").is_dir()
    straight = tiny_recipe(tmp_path / "s", train={"steps": 20, "checkpoint_every": 20})
    train(straight, progress=False)
    _assert_close(_final(tmp_path / "s", straight)[0], _final(tmp_path / "r", longer)[0])


def test_keeps_the_last_k_and_every_mth(tmp_path):
    recipe = tiny_recipe(
        tmp_path / "r",
        train={"steps": 20, "checkpoint_every": 2, "keep_checkpoints": 2, "keep_every": 8},
    )
    train(recipe, progress=False)
    kept = sorted(int(p.name) for p in (tmp_path / "r/checkpoints").iterdir() if p.name.isdigit())
    assert kept == [8, 16, 18, 20]
