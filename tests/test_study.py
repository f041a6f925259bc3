"""The report half of benchmarks/study.py on synthetic runs: no training."""

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.standard_promotion

_spec = importlib.util.spec_from_file_location(
    "study", Path(__file__).parents[1] / "benchmarks" / "study.py"
)
study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study)

VANILLA_FD = {250: 200.0, 500: 150.0, 750: 100.0, 1000: 80.0}
REPA_FD = {250: 150.0, 500: 90.0, 750: 70.0, 1000: 60.0}


def write_run(path: Path, fd: dict[int, float], cknna: bool, steps_per_s: float = 4.0) -> None:
    lines = []
    for step in range(25, 1001, 25):
        loss = 1.0 / step**0.2
        lines.append({"step": step, "denoise_loss": loss, "steps_per_s": steps_per_s})
        if step in fd:
            scores = {
                "fd_mnist": fd[step],
                "class_accuracy": 1 - fd[step] / 250,
                "fd_dinov2": 2 * fd[step],
                "linear_probe": 0.5 + step / 1e4,
            }
            lines.append({"step": step, **scores})
            if cknna:
                lines.append({"step": step, "cknna": step / 1e4})
    path.mkdir(parents=True)
    path.joinpath("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_steps_to_reach_and_speedup():
    points = list(VANILLA_FD.items())
    assert study.steps_to_reach(points, 150.0) == 500  # at or below
    assert study.steps_to_reach(points, 149.9) == 750
    assert study.steps_to_reach(points, 79.9) is None
    assert study.speedup(750, 250, 1000) == "3.00x"
    assert study.speedup(None, 500, 1000) == "> 2.00x"
    assert study.speedup(500, None, 1000) == "n/a"


def test_levels_span_the_vanilla_curve():
    levels = study.fd_levels(list(VANILLA_FD.items()))
    assert len(levels) == study.NUM_LEVELS and levels == sorted(levels, reverse=True)
    assert levels[0] < 200 and levels[-1] == 80  # below the first value, down to the best
    assert study.fd_levels([(1, 50.0), (2, 70.0)]) == [50.0]  # no progress: the best only
    assert study._round_up(81.23) == 82 and study._round_up(0.1234) == 0.13


def test_report(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "vanilla", VANILLA_FD, cknna=False)
    write_run(runs / "repa", REPA_FD, cknna=True, steps_per_s=3.0)
    md, png = study.write_report(runs, tmp_path / "out")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    text = md.read_text()
    assert "![the evaluations of both runs against step](mnist_study.png)" in text
    # One row per evaluation, both runs side by side; the vanilla run has no CKNNA here.
    row = "| 750 | 100.0 | 70.0 | 200.0 | 140.0 | 0.600 | 0.720 | – | 0.0750 | 0.575 | 0.575 |"
    assert row in text
    # The levels from 200 to 80 (ratio 0.795): 160, 130, 110, 80.
    assert "| 160 | 500 | 250 | 2.00x |" in text
    assert "| 80 | 1000 | 750 | 1.33x |" in text
    assert "| 60 | not reached | 1000 | > 1.00x |" in text  # REPA's best, beyond vanilla's
    assert "REPA reaches FD on the MNIST-classifier features 80 (vanilla's best) in 750" in text
    # 1.33x fewer steps at 3/4 of the speed: the same training time.
    assert "REPA training step took 1.33x the time" in text
    assert "in training time REPA reaches FD 80 1.00x as fast as vanilla" in text
    assert "| linear_probe | 0.600 (step 1000) | 0.600 (step 1000) |" in text
    assert "not recorded" in text  # no study.json: nothing invented


@pytest.mark.parametrize("repa_better", [True, False])
def test_reading_follows_the_numbers(tmp_path, repa_better):
    runs = tmp_path / "runs"
    worse = {s: v * 1.5 for s, v in VANILLA_FD.items()}
    write_run(runs / "vanilla", VANILLA_FD, cknna=True)
    write_run(runs / "repa", REPA_FD if repa_better else worse, cknna=True)
    text = study.write_report(runs, tmp_path / "out")[0].read_text()
    reading = text.split("## Reading")[1]
    if repa_better:
        assert "REPA reaches FD on the MNIST-classifier features 80" in reading
        assert "fd_mnist 60.0 vs 80.0 (-25%, better with REPA)" in reading
    else:
        assert "REPA does not reach FD on the MNIST-classifier features 80" in reading
        assert "fd_mnist 120.0 vs 80.0 (+50%, worse with REPA)" in reading


def test_report_records_how_it_ran(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "vanilla", VANILLA_FD, cknna=True)
    write_run(runs / "repa", REPA_FD, cknna=True)
    machine = {"cpu": "Test CPU", "cores": 2, "jax": "0.0", "backend": "cpu", "python": "3.11"}
    session = {"from_step": 0, "to_step": 1000, "seconds": 600.0, "started": "today"}
    session |= {"loadavg": [0.5, 0.5, 0.5], "machine": machine}
    log = {
        "command": "python benchmarks/study.py --steps 1000",
        "commit": "abc1234",
        "runs": {
            "vanilla": {"sets": ["train.steps=1000"], "sessions": [session]},
            "repa": {"sets": ["train.steps=1000"], "sessions": [session]},
        },
    }
    (runs / "study.json").write_text(json.dumps(log))
    text = study.write_report(runs, tmp_path / "out")[0].read_text()
    assert "    python benchmarks/study.py --steps 1000" in text
    assert "    repa train recipes/study_repa.toml --set train.steps=1000" in text
    assert "- machine: Test CPU, 2 cores available, jax 0.0 (cpu), Python 3.11" in text
    assert "- SiT + REPA: 10.0 min wall: steps 0-1000 in 10.0 min" in text
    assert "- in all: 20.0 min" in text


def test_alignment_section_compares_the_projector_with_image_blind_predictors(tmp_path):
    (tmp_path / "repa").mkdir()
    rows = [{"step": s, "repa_loss": -0.9 - s / 1e4} for s in range(100, 1100, 100)]
    (tmp_path / "repa/metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    log = {"teacher": {"constant": 0.5, "position": 0.7, "class_position": 0.8}}
    text = "\n".join(study.alignment_section(log, tmp_path))
    assert "| the mean of its position within its class" in text and "| 0.800 |" in text
    # the last 5 logs: cosine 0.96 ... 1.0, mean 0.98; (0.98 - 0.8) / (1 - 0.8) = 90%
    assert "| 0.980 |" in text and "closes 90% of the gap" in text
    assert study.alignment_section({}, tmp_path) == []
