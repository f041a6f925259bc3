"""benchmarks/device_check.py, the GPU device check, in its CPU smoke mode: every measurement
runs and reports, the time budget skips with a message, the XLA GPU flags are set first."""

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _load():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    path = ROOT / "benchmarks/device_check.py"
    spec = importlib.util.spec_from_file_location("device_check", path)
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():
        # This process's backend is already up: the flags cannot apply here, as it warns.
        warnings.filterwarnings("ignore", "XLA flags not applied", RuntimeWarning)
        spec.loader.exec_module(module)
    return module


def test_sde_250_with_guidance_on_the_first_70_percent_costs_422_evaluations():
    check = _load()
    # Step starts linspace(1, 0.04, 250): those at t <= 0.7 (i >= 78, 172 of them) run twice.
    assert check.nfe_per_example(check.SDE_SPEC) == 250 + 172


def test_the_peak_table_knows_the_gpus_and_says_when_it_measures():
    check = _load()

    class Device:
        def __init__(self, kind):
            self.device_kind = kind

    assert check.bf16_peak(Device("NVIDIA H200"), 8) == (989.0, "table: H200 dense bf16")
    assert check.bf16_peak(Device("NVIDIA H100 80GB HBM3"), 8)[0] == 989.0
    assert check.bf16_peak(Device("NVIDIA H100 PCIe"), 8)[0] == 756.0
    assert check.bf16_peak(Device("NVIDIA A100-SXM4-80GB"), 8)[0] == 312.0
    for kind in ("cpu", "NVIDIA H100 NVL"):
        tflops, source = check.bf16_peak(Device(kind), 64, reps=2)
        assert tflops > 0 and source.startswith("measured")


def test_a_spent_budget_skips_every_measurement_and_says_so(capsys):
    check = _load()
    rows = check.main(["--smoke", "--budget-s", "0"])
    assert len(rows) == 4 and all(r["status"].startswith("skipped: 0 s of the 0 s") for r in rows)
    out = capsys.readouterr().out
    assert "device check (smoke: tiny models)" in out and "devices: [" in out


def test_the_full_check_refuses_a_machine_without_a_gpu():
    check = _load()
    with pytest.raises(SystemExit, match=r"no GPU here .* \(--smoke runs its tiny version"):
        check.main([])


@pytest.mark.slow
def test_the_smoke_check_runs_every_measurement(tmp_path):
    """The shell command, as on the GPU machine (about 2 minutes on 2 busy cores)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHON"] = sys.executable
    out = subprocess.run(
        ["bash", "benchmarks/device_check.sh", "--smoke", "--json", str(tmp_path / "c.json")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "XLA_FLAGS='--xla_gpu_enable_latency_hiding_scheduler=true'" in out.stdout
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok"] * 4
    train = [r for r in rows if r["what"] == "train step"]
    assert [(r["precision"], r["batch"]) for r in train] == [("bf16", 2), ("bf16", 4), ("fp32", 2)]
    for r in train:
        assert r["seconds"] > 0 and r["mfu"] > 0 and r["xla_peak_gb"] > 0 and r["compile_s"] > 0
    sample = rows[2]
    assert sample["what"] == "sde-4-cfg1.8-0_0.7" and sample["nfe_per_example"] == 4 + 3
    assert sample["images_per_s"] > 0
