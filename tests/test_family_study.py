"""benchmarks/family_study.py without training: the method table resolves to valid recipes,
and the report half is written from synthetic runs (metrics.jsonl files and the study's log)."""

import argparse
import importlib.util
import json
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from repa_eqx.training.recipe import LossSpec, load_recipe

pytestmark = pytest.mark.standard_promotion

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # family_study imports its sibling study.py
_spec = importlib.util.spec_from_file_location("family_study", ROOT / "benchmarks/family_study.py")
family = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(family)

EVALS = (50, 100, 150, 200)
# method: (FD-DINOv2 at the four evaluations for seed 0, seconds per step)
CURVES = {
    "vanilla": ((3000.0, 2000.0, 1500.0, 1200.0), 0.2),
    "repa": ((2800.0, 1700.0, 1100.0, 900.0), 0.25),
    "dispersive": ((3100.0, 2100.0, 1600.0, 1250.0), 0.22),
}


def write_run(path: Path, fd: tuple, sec_per_step: float, seed: int, probe: float) -> None:
    """A run logged every 10 steps (speed included) and evaluated at EVALS; an interval that
    holds an evaluation, and the first one, are slow."""
    rows = []
    for step in range(10, 201, 10):
        slow = step == 10 or any(step - 10 <= e < step for e in EVALS)
        rate = 1 / (sec_per_step * (5 if slow else 1))
        rows.append({"step": step, "loss": 0.5, "repa_loss": -0.8, "steps_per_s": rate})
        if step in EVALS:
            i = EVALS.index(step)
            rows.append(
                {
                    "step": step,
                    "fd_dinov2": fd[i] * (1 + 0.01 * seed),
                    "cknna": 0.1 + 0.01 * i,
                    "linear_probe": probe + 0.01 * seed,
                }
            )
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_study(runs: Path, seeds=(0, 1, 2)) -> None:
    for seed in seeds:
        for method, (fd, secs) in CURVES.items():
            probe = 0.6 if method == "dispersive" else 0.5
            write_run(runs / "photos" / method / f"seed{seed}", fd, secs, seed, probe)
    log = {
        "command": "python benchmarks/family_study.py --datasets photos",
        "commit": "abc1234",
        "predictability": {
            "photos": {"constant": 0.59, "position": 0.6, "class_position": 0.72},
        },
        "templates": {"photos/repa": ["train.seed=SEED", "output.dir=runs/family/photos/repa"]},
        "runs": {},
    }
    (runs / family.LOG_NAME).write_text(json.dumps(log))


def test_every_method_is_a_valid_recipe_with_its_settings(tmp_path):
    args = argparse.Namespace(steps=None, eval_every=None, runs_dir=str(tmp_path))
    recipes = {}
    for dataset in family.DATASETS:
        for method in family.METHODS:
            sets = family.overrides(dataset, method, 2, args)
            assert "train.seed=2" in sets
            assert f"output.dir={tmp_path}/{dataset}/{method}/seed2" in sets
            if method == "reg" and "reg" not in {f.name for f in fields(LossSpec)}:
                assert "loss.reg.coeff=0.03" in sets  # REG's recipe value is not there yet
                continue
            recipes[dataset, method] = load_recipe(family.DATASETS[dataset][0], sets)
    photos = {m: r for (d, m), r in recipes.items() if d == "photos"}
    assert photos["repa"].data.dataset == "photo-crops" and photos["repa"].model.in_channels == 3
    assert photos["vanilla"].loss.proj_coeff == 0 and photos["repa"].loss.proj_coeff == 0.5
    assert photos["irepa"].loss.alignment == "irepa" and photos["irepa"].loss.irepa.kernel_size == 3
    haste = photos["haste"]
    assert haste.loss.schedule.stop == 80 == 0.4 * haste.train.steps  # stopped at 40 %
    assert haste.loss.haste.sit_blocks == (1, 2) and not haste.data.precompute_features
    dispersive = photos["dispersive"]
    assert dispersive.loss.dispersive.coeff == 0.25 and dispersive.loss.proj_coeff == 0
    # Everything else is the same for every method of a data set: seed, steps, evaluation.
    for (dataset, _), r in recipes.items():
        base = recipes[dataset, "repa"]
        assert (r.train, r.eval, r.model) == (base.train, base.eval, base.model)
    small = argparse.Namespace(steps=40, eval_every=20, runs_dir=str(tmp_path))
    sets = family.overrides("mnist", "haste", 0, small)
    assert "loss.schedule.stop=16" in sets and "eval.every=20" in sets


def test_time_per_step_leaves_out_compiles_and_evaluations(tmp_path):
    write_run(tmp_path / "run", CURVES["repa"][0], 0.25, 0, 0.5)
    records = family.read_records(tmp_path / "run" / "metrics.jsonl")
    assert family.seconds_per_step(records) == pytest.approx(0.25)
    assert family.seconds_per_step([]) is None


def test_steps_to_levels_over_seeds():
    runs = {
        s: {"evals": {50: {"fd_dinov2": a}, 100: {"fd_dinov2": b}}}
        for s, (a, b) in enumerate([(900, 500), (600, 400), (950, 700)])
    }
    assert family.steps_to(runs, "fd_dinov2", 600) == ([100, 50], 3)
    assert family.fmt_steps(*family.steps_to(runs, "fd_dinov2", 600)) == "75 ± 35 (2/3 seeds)"
    assert family.fmt_steps(*family.steps_to(runs, "fd_dinov2", 700)) == "83 ± 29"
    assert family.fmt_steps(*family.steps_to(runs, "fd_dinov2", 100)) == "not reached"
    assert [p[0] for p in family.mean_curve(runs, "fd_dinov2")] == [50, 100]


def test_report(tmp_path):
    runs = tmp_path / "runs"
    make_study(runs)
    md, png = family.write_report(runs, tmp_path / "out")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    text = md.read_text()
    assert "![evaluations against step, per data set and method](family_study.png)" in text
    assert "    python benchmarks/family_study.py --datasets photos" in text
    assert "    repa train recipes/family_photos.toml --set train.seed=SEED" in text
    # Predictability, then one row per method: final FD-DINOv2 mean ± sd over 3 seeds (1200,
    # 1212, 1224), CKNNA, probe, seconds per step and its ratio to REPA's.
    assert "| the mean of its position within its class | 0.720 |" in text
    assert "| the REPA runs' projector, last 5 logged steps, mean over seeds | 0.800 |" in text
    assert (
        "| SiT | 3 | 1,212 ± 12 | 0.1300 ± 0.0000 | 0.510 ± 0.010 | 0.200 ± 0.000 | 0.80x |" in text
    )
    assert "| REPA | 3 | 909 ± 9 |" in text and "| 0.250 ± 0.000 | 1.00x |" in text
    assert "| Dispersive | 3 | 1,262 ± 12 |" in text and "| 0.88x |" in text
    # Levels from below vanilla's first mean (3030) to its best (1212), geometric, rounded up
    # (2233 -> 2300, 1650 -> 1700, 1300), then REPA's best mean (909 -> 910). REPA's seeds end
    # at 900, 909 and 918: two reach 910.
    assert "| method | ≤ 2300 | ≤ 1700 | ≤ 1300 | ≤ 910 |" in text
    assert "| SiT | 100 ± 0 | 150 ± 0 | 200 ± 0 | not reached |" in text
    assert "| REPA | 100 ± 0 | 133 ± 29 | 150 ± 0 | 200 ± 0 (2/3 seeds) |" in text
    assert "- machine: not recorded" in text  # no training session in the log: none invented
    assert "Not run in this study: iREPA, HASTE, REG." in text
    reading = text.split("## Reading")[1]
    assert "better than SiT: REPA -25%" in reading
    assert "worse than SiT: Dispersive +4.2%" in reading
    assert "linear probe top-1 at step 200 (change of the mean): better than SiT: Dispersive" in (
        reading
    )
    assert "SiT's steps over each method's steps to that level" in reading
    assert "REPA 1.33x, Dispersive 1.00x" in reading
    assert "Time per step relative to REPA: SiT 0.80x, REPA 1.00x, Dispersive 0.88x" in reading


def test_report_of_a_partial_study(tmp_path):
    """One seed, and a method asked for but not run: the report says so and reads the overlap
    of single values as an overlap only when they are equal."""
    runs = tmp_path / "runs"
    make_study(runs, seeds=(0,))
    md, _ = family.write_report(runs, tmp_path / "out", methods=["vanilla", "repa", "reg"])
    text = md.read_text()
    assert "| SiT | 1 | 1,200 |" in text and "Dispersive" not in text.split("## Reading")[0]
    assert "Not run in this study: REG." in text
    assert "with FD on a few hundred samples and 1 seed per method" in text
