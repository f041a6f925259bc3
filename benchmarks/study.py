"""The REPA effect on MNIST, measured (`just study-mnist`).

Trains the pair recipes/study_vanilla.toml and recipes/study_repa.toml one after the other (the
same seed, initial SiT weights, data order, step budget and evaluation; only the loss differs:
lambda = 0.5 or 0), then writes from the two metrics.jsonl files:

- docs/results/mnist_study.md: the commands, seeds, machine and wall times; every evaluation of
  both runs; the steps each run needs to reach FD levels spanning the vanilla curve and the
  speed-up (vanilla steps / REPA steps); the final CKNNA and linear probe; a reading of the
  numbers written from them;
- docs/results/mnist_study.png: one panel per metric, both runs against step.

A run that already has checkpoints is resumed; a finished one is left as it is. Run from the
repository root:

    python benchmarks/study.py                                # the full study
    python benchmarks/study.py --steps 100 --eval-every 50 --runs-dir /tmp/study --out /tmp/res
    python benchmarks/study.py --report-only                  # redraw from runs/study/
"""

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RUNS = {"vanilla": "recipes/study_vanilla.toml", "repa": "recipes/study_repa.toml"}
LABELS = {"vanilla": "SiT", "repa": "SiT + REPA"}
METRICS = {  # key: (title, lower is better)
    "fd_mnist": ("FD, MNIST-classifier features", True),
    "fd_dinov2": ("FD-DINOv2-S", True),
    "class_accuracy": ("samples read as their class", False),
    "cknna": ("CKNNA, SiT block vs DINOv2-S", False),
    "linear_probe": ("linear probe top-1, SiT features", False),
}
NUM_LEVELS = 4


# ---------------------------------------------------------------------------------- training


def machine() -> dict:
    import jax

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "python": platform.python_version(),
    }


def _git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + (" (with uncommitted changes)" if git("status", "--porcelain") else "")


def overrides(name: str, args) -> list[str]:
    """The --set overrides of one run: the scale options and its output folder."""
    from repa_eqx.training.recipe import load_recipe

    sets = []
    if args.steps:
        sets.append(f"train.steps={args.steps}")
    if args.eval_every:
        sets.append(f"eval.every={args.eval_every}")
    recipe = load_recipe(RUNS[name], sets)
    if Path(recipe.output.dir) != Path(args.runs_dir) / name:
        sets.append(f"output.dir={args.runs_dir}/{name}")
    return sets


def _checkpoint_steps(run_dir: Path) -> list[int]:
    ckpt = run_dir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


def train_run(name: str, sets: list[str], log: dict, log_path: Path) -> None:
    from rich.console import Console

    from repa_eqx.training.loop import train
    from repa_eqx.training.recipe import load_recipe

    console = Console(stderr=True)
    recipe = load_recipe(RUNS[name], sets)
    run_dir = Path(recipe.output.dir)
    done = _checkpoint_steps(run_dir)
    start = done[-1] if done else 0
    console.rule(f"[bold]{LABELS[name]}[/]: {RUNS[name]} -> {run_dir}")
    if start >= recipe.train.steps:
        console.print(f"already trained to step {start}: kept as it is")
        return
    session = {
        "from_step": start,
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "machine": machine(),
    }
    t0 = time.perf_counter()
    train(recipe, resume=bool(done), progress=True, console=console)
    session |= {"to_step": recipe.train.steps, "seconds": round(time.perf_counter() - t0, 1)}
    entry = log["runs"].setdefault(name, {"recipe": RUNS[name], "sets": sets, "sessions": []})
    entry["sets"] = sets
    entry["sessions"].append(session)
    log_path.write_text(json.dumps(log, indent=1))


# ----------------------------------------------------------------------------------- report


def read_evals(metrics_path: Path) -> dict[int, dict[str, float]]:
    """step -> the evaluation metrics logged at that step (records merged)."""
    out: dict[int, dict[str, float]] = {}
    for line in Path(metrics_path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            values = {k: v for k, v in record.items() if k in METRICS and math.isfinite(v)}
            if values:
                out.setdefault(record["step"], {}).update(values)
    return dict(sorted(out.items()))


def read_losses(metrics_path: Path) -> list[tuple[int, float]]:
    records = (json.loads(x) for x in Path(metrics_path).read_text().splitlines() if x.strip())
    return [(r["step"], r["denoise_loss"]) for r in records if "denoise_loss" in r]


def read_speed(metrics_path: Path) -> float | None:
    """Median training steps/s over the logged intervals (the median skips the intervals that
    held an evaluation, a sample grid or a compile)."""
    records = (json.loads(x) for x in Path(metrics_path).read_text().splitlines() if x.strip())
    rates = [r["steps_per_s"] for r in records if "steps_per_s" in r]
    return statistics.median(rates) if rates else None


def curve(evals: dict[int, dict[str, float]], metric: str) -> list[tuple[int, float]]:
    return [(step, m[metric]) for step, m in evals.items() if metric in m]


def steps_to_reach(points: list[tuple[int, float]], level: float) -> int | None:
    """The first evaluated step at or below `level`; None when never."""
    return next((step for step, value in points if value <= level), None)


def _round_up(x: float) -> float:
    """x rounded up to two significant figures."""
    unit = 10 ** (math.floor(math.log10(x)) - 1)
    return round(math.ceil(x / unit - 1e-9) * unit, 10)


def fd_levels(points: list[tuple[int, float]], n: int = NUM_LEVELS) -> list[float]:
    """n levels geometrically spaced from below the curve's first value down to its best one
    (which the curve therefore reaches), rounded up to two significant figures."""
    first, best = points[0][1], min(v for _, v in points)
    if best >= first or best <= 0:
        return [_round_up(best)] if best > 0 else []
    ratio = (best / first) ** (1 / n)
    levels = [_round_up(first * ratio**i) for i in range(1, n + 1)]
    return sorted(set(levels), reverse=True)


def speedup(vanilla: int | None, repa: int | None, last_step: int) -> str:
    """vanilla steps / REPA steps; a lower bound when only REPA reaches the level."""
    if repa is None:
        return "n/a"
    if vanilla is None:
        return f"> {last_step / repa:.2f}x"
    return f"{vanilla / repa:.2f}x"


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "–"
    digits = {"fd_mnist": 1, "fd_dinov2": 1, "cknna": 4}.get(metric, 3)
    return f"{value:.{digits}f}"


def _steps(step: int | None) -> str:
    return "not reached" if step is None else str(step)


def threshold_table(metric: str, evals: dict) -> tuple[list[str], list[dict]]:
    """Markdown rows of the FD levels, and the numbers behind them."""
    vanilla, repa = curve(evals["vanilla"], metric), curve(evals["repa"], metric)
    if not vanilla or not repa:
        return [f"No {metric} evaluations in both runs."], []
    last = max(vanilla[-1][0], repa[-1][0])
    levels = fd_levels(vanilla)
    repa_best = _round_up(min(v for _, v in repa))
    if levels and repa_best < levels[-1]:
        levels.append(repa_best)  # how far REPA got beyond vanilla's best
    rows, facts = [], []
    for level in levels:
        v, r = steps_to_reach(vanilla, level), steps_to_reach(repa, level)
        facts.append({"level": level, "vanilla": v, "repa": r, "speedup": speedup(v, r, last)})
        rows.append(f"| {level:g} | {_steps(v)} | {_steps(r)} | {speedup(v, r, last)} |")
    head = [
        f"| {metric} at or below | SiT steps | SiT + REPA steps | speed-up |",
        "|---:|---:|---:|---:|",
    ]
    return head + rows, facts


def _relative(metric: str, vanilla: float, repa: float) -> str:
    if vanilla == 0:
        return f"{repa:.4g} vs {vanilla:.4g}"
    change = (repa - vanilla) / abs(vanilla) * 100
    better = (change < 0) == METRICS[metric][1] if change else None
    word = {True: "better", False: "worse", None: "the same"}[better]
    pct = f"{change:+.1f}%" if abs(change) < 10 else f"{change:+.0f}%"
    return f"{_fmt(repa, metric)} vs {_fmt(vanilla, metric)} ({pct}, {word} with REPA)"


def reading(evals: dict, facts: dict[str, list[dict]], speeds: dict, num_samples) -> str:
    """One paragraph on what the numbers show, written from them."""
    parts = []
    for metric in ("fd_mnist", "fd_dinov2"):
        rows = facts.get(metric) or []
        if not rows:
            continue
        name = "FD on the MNIST-classifier features" if metric == "fd_mnist" else "FD-DINOv2-S"
        reached = [r for r in rows if r["vanilla"] is not None]  # vanilla's levels
        hardest = reached[-1]  # vanilla's best
        if hardest["repa"] is None:
            parts.append(
                f"REPA does not reach {name} {hardest['level']:g}, which vanilla SiT reaches in "
                f"{hardest['vanilla']} steps"
            )
        else:
            ratio = hardest["vanilla"] / hardest["repa"]
            verdict = "speed-up" if ratio > 1 else "ratio (REPA is not faster)"
            parts.append(
                f"REPA reaches {name} {hardest['level']:g} (vanilla's best) in "
                f"{hardest['repa']} steps, vanilla in {hardest['vanilla']}: a "
                f"{hardest['speedup']} {verdict}"
            )
        ratios = [r["vanilla"] / r["repa"] for r in reached if r["repa"] is not None]
        faster, slower = sum(x > 1 for x in ratios), sum(x < 1 for x in ratios)
        never = len(reached) - len(ratios)
        parts[-1] += (
            f"; over the {len(reached)} levels REPA gets there first at {faster}, later at "
            f"{slower}, at the same evaluation at {len(ratios) - faster - slower}"
            + (f" and never at {never}" if never else "")
        )
        if len(rows) > len(reached):
            parts[-1] += (
                f"; REPA goes on to {rows[-1]['level']:g} (step {rows[-1]['repa']}), a level "
                "vanilla never reaches"
            )
    finals = []
    for metric in METRICS:
        v, r = curve(evals["vanilla"], metric), curve(evals["repa"], metric)
        if v and r:
            finals.append(f"{metric} {_relative(metric, v[-1][1], r[-1][1])}")
    last = max(evals["vanilla"] or [0])
    text = ". ".join(parts)
    if finals:
        text += (". " if text else "") + f"At the last evaluation (step {last}), REPA vs vanilla: "
        text += "; ".join(finals)
    if speeds.get("vanilla") and speeds.get("repa"):
        cost = speeds["vanilla"] / speeds["repa"]
        text += (
            f". A REPA training step took {cost:.2f}x the time of a vanilla one here (median "
            f"{speeds['repa']:.2f} vs {speeds['vanilla']:.2f} steps/s, teacher features "
            "precomputed)"
        )
        reached = [r for r in facts.get("fd_mnist", []) if r["vanilla"] is not None]
        hardest = reached[-1] if reached else {}
        if hardest.get("repa") and hardest.get("vanilla"):
            wall = hardest["vanilla"] / hardest["repa"] / cost
            text += (
                f", so in training time REPA reaches FD {hardest['level']:g} {wall:.2f}x as "
                "fast as vanilla"
            )
    samples = f"FD on {num_samples} samples" if num_samples else "FD on a few hundred samples"
    return (
        text + f". One seed per run and {samples}: differences of a few percent, or of one "
        "evaluation interval in the steps to a level, are within the noise of this setup."
    )


def _machine_lines(log: dict) -> list[str]:
    sessions = [s for run in log.get("runs", {}).values() for s in run["sessions"]]
    if not sessions:
        return ["- machine: not recorded (no training session in this report's log)"]
    seen, lines = set(), []
    for s in sessions:
        m = s["machine"]
        text = (
            f"{m['cpu']}, {m['cores']} cores available, jax {m['jax']} ({m['backend']}), "
            f"Python {m['python']}"
        )
        if text not in seen:
            seen.add(text)
            lines.append(f"- machine: {text}")
    return lines


def _session_text(name: str, log: dict) -> str:
    run = log.get("runs", {}).get(name)
    if not run:
        return f"- {LABELS[name]}: wall time not recorded"
    parts = [
        f"steps {s['from_step']}-{s['to_step']} in {s['seconds'] / 60:.1f} min "
        f"(started {s['started']}, load average {s['loadavg'][0]:.2f})"
        for s in run["sessions"]
    ]
    total = sum(s["seconds"] for s in run["sessions"])
    return f"- {LABELS[name]}: {total / 60:.1f} min wall: " + "; ".join(parts)


def _commands(log: dict) -> list[str]:
    lines = [f"    {log.get('command', 'python benchmarks/study.py')}", ""]
    lines.append("which runs, in this process, the equivalent of")
    lines.append("")
    for name, recipe in RUNS.items():
        sets = log.get("runs", {}).get(name, {}).get("sets", [])
        extra = "".join(f" --set {shlex.quote(s)}" for s in sets)
        lines.append(f"    repa train {recipe}{extra}")
    return lines


def _saved_recipe(runs_dir: Path) -> dict:
    """The REPA run's resolved recipe, as saved beside its checkpoints ({} when absent)."""
    path = runs_dir / "repa" / "recipe.toml"
    return tomllib.loads(path.read_text()) if path.exists() else {}


def _seed_lines(recipe: dict) -> list[str]:
    if not recipe:
        return ["- seeds: see the recipes (train.seed)"]
    seed = recipe["train"]["seed"]
    return [
        f"- seeds: train.seed = {seed} in both runs: the same initial SiT weights, training "
        f"noise, label dropout and batch order; evaluation noise seed {seed + 2} (samples) "
        f"and {seed + 3} (CKNNA / probe noising), real-image subset seed 0"
    ]


def plot(evals: dict, losses: dict, png_path: Path) -> Path:
    panels = [m for m in METRICS if any(curve(evals[n], m) for n in RUNS)]
    panels.append("denoise_loss")
    cols = 3
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, metric in zip(axes.flat, panels, strict=False):
        for name in RUNS:
            if metric == "denoise_loss":
                # A running mean over 8 logs: the raw per-batch loss is noisy.
                pts = losses[name]
                window = [pts[max(0, i - 7) : i + 1] for i in range(len(pts))]
                xs, marker = [s for s, _ in pts], None
                ys = [sum(v for _, v in w) / len(w) for w in window]
            else:
                pts = curve(evals[name], metric)
                xs, ys, marker = [s for s, _ in pts], [v for _, v in pts], "o"
            ax.plot(xs, ys, lw=1.2, marker=marker, ms=3, label=LABELS[name])
        title, lower = METRICS.get(metric, ("denoising loss (running mean)", True))
        ax.set_title(title + (" (lower is better)" if lower else ""), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def _unit(x, axis=-1):
    import numpy as np

    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def teacher_baselines(runs_dir: Path) -> dict[str, float]:
    """`teacher_predictability` of the REPA run's recipe (MNIST-5k)."""
    from repa_eqx.training.recipe import load_recipe

    return teacher_predictability(load_recipe(runs_dir / "repa" / "recipe.toml"))


def teacher_predictability(recipe) -> dict[str, float]:
    """How well the REPA target can be matched without looking at the image: the mean cosine
    similarity of the teacher's patch features to (a) one constant direction, (b) the mean
    feature of their token position, (c) the mean of their position within their class (the
    SiT is told the class). Computed on the cached features of every image of the recipe's
    pixel data set, with its first encoder."""
    import numpy as np

    from repa_eqx.data.datasets import load_pixel_dataset
    from repa_eqx.data.features import precompute_features
    from repa_eqx.training.loop import load_encoders
    from repa_eqx.training.recipe import sit_config

    encoders = load_encoders(recipe.encoders[:1], grid=sit_config(recipe).grid_size)
    dataset = load_pixel_dataset(recipe.data.dataset, recipe.model.input_size)
    (features,) = precompute_features(encoders, dataset, progress=False)
    u = _unit(np.asarray(features, np.float32))  # (N, tokens, dim)
    constant = _unit(u.reshape(-1, u.shape[-1]).mean(0))
    position = _unit(u.mean(0))
    by_class = np.zeros(u.shape[:2])
    for c in np.unique(dataset.labels):
        rows = dataset.labels == c
        by_class[rows] = (u[rows] * _unit(u[rows].mean(0))[None]).sum(-1)
    return {
        "constant": float((u @ constant).mean()),
        "position": float((u * position[None]).sum(-1).mean()),
        "class_position": float(by_class.mean()),
    }


def _final_alignment(metrics_path: Path, last: int = 5) -> float | None:
    """Mean cosine similarity of the REPA term over the last `last` logged steps."""
    values = [r["repa_loss"] for r in map(json.loads, metrics_path.open()) if "repa_loss" in r]
    return -statistics.fmean(values[-last:]) if values else None


def alignment_section(log: dict, runs_dir: Path) -> list[str]:
    base = log.get("teacher")
    final = _final_alignment(runs_dir / "repa" / "metrics.jsonl")
    if not base or final is None:
        return []
    share = (final - base["class_position"]) / (1 - base["class_position"])
    return [
        "",
        "## How much of the alignment target needs the image",
        "",
        "REPA's term is minus the cosine similarity of the projected SiT tokens and the "
        "teacher's patch features. Predictors that never look at the image already match those "
        "features closely on these digits (mean cosine over all 5,000 images and tokens):",
        "",
        "| predictor of a patch's teacher feature | mean cosine |",
        "|---|---:|",
        f"| one constant direction | {base['constant']:.3f} |",
        f"| the mean feature of its token position | {base['position']:.3f} |",
        f"| the mean of its position within its class (the SiT is given the class) "
        f"| {base['class_position']:.3f} |",
        f"| the REPA run's projector, mean of its last 5 logged steps | {final:.3f} |",
        "",
        f"The REPA run closes {share:.0%} of the gap between the class-and-position predictor "
        "and a perfect match: most of what the REPA term asks for is met without representing "
        "the image, which fits the small effect on CKNNA and the linear probe here.",
    ]


def write_report(runs_dir: Path, out_dir: Path) -> tuple[Path, Path]:
    """docs/results/mnist_study.md and .png from RUNS_DIR/{vanilla,repa}/metrics.jsonl and
    RUNS_DIR/study.json (commands, machine, wall times; optional)."""
    runs_dir, out_dir = Path(runs_dir), Path(out_dir)
    log_path = runs_dir / "study.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    evals = {n: read_evals(runs_dir / n / "metrics.jsonl") for n in RUNS}
    losses = {n: read_losses(runs_dir / n / "metrics.jsonl") for n in RUNS}
    speeds = {n: read_speed(runs_dir / n / "metrics.jsonl") for n in RUNS}
    recipe = _saved_recipe(runs_dir)
    png = plot(evals, losses, out_dir / "mnist_study.png")

    lines = [
        "# The REPA effect on MNIST-5k",
        "",
        "Written by `just study-mnist` (benchmarks/study.py) from the two runs' metrics.jsonl: "
        "a small class-conditional SiT (recipes/study_vanilla.toml) and the same SiT with REPA "
        "against the offline DINOv2-S teacher (recipes/study_repa.toml), MNIST-5k in pixel "
        "space. The two recipes differ only in the REPA loss term; every evaluation scores the "
        "EMA model.",
        "",
        f"![the evaluations of both runs against step]({png.name})",
        "",
        "## How it was run",
        "",
        *_commands(log),
        "",
        *_seed_lines(recipe),
        *_machine_lines(log),
        f"- code: git {log.get('commit', 'unknown')}",
        f"- report written {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        *(_session_text(n, log) for n in RUNS),
    ]
    if all(speeds.values()):
        lines.append(
            "- training speed (median over the logged intervals): "
            + ", ".join(f"{LABELS[n]} {speeds[n]:.2f} steps/s" for n in RUNS)
        )
    sessions = [x for run in log.get("runs", {}).values() for x in run["sessions"]]
    if sessions:
        total = sum(x["seconds"] for x in sessions)
        lines.append(f"- in all: {total / 60:.1f} min")
    lines += ["", "## Every evaluation", ""]
    metrics = [m for m in METRICS if any(curve(evals[n], m) for n in RUNS)]
    head = "| step | " + " | ".join(f"{m} SiT | {m} REPA" for m in metrics) + " |"
    lines += [head, "|---:|" + "---:|" * (2 * len(metrics))]
    for step in sorted(set(evals["vanilla"]) | set(evals["repa"])):
        cells = [
            _fmt(evals[n].get(step, {}).get(m), m) for m in metrics for n in ("vanilla", "repa")
        ]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")

    facts = {}
    for metric in ("fd_mnist", "fd_dinov2"):
        lines += [
            "",
            f"## Steps to reach {metric}",
            "",
            "Levels spaced from the vanilla run's first evaluation down to its best, plus REPA's "
            "best when it is lower; a run reaches a level at its first evaluation at or below "
            "it. Speed-up = vanilla steps / REPA steps ('> Nx': vanilla never reaches the level; "
            "the bound counts its last step).",
            "",
        ]
        rows, facts[metric] = threshold_table(metric, evals)
        lines += rows

    lines += ["", "## Representation at the last evaluation", ""]
    lines += ["| metric | SiT | SiT + REPA |", "|---|---:|---:|"]
    for metric in ("cknna", "linear_probe"):
        last = [curve(evals[n], metric) for n in RUNS]
        cells = [_fmt(c[-1][1], metric) + f" (step {c[-1][0]})" if c else "–" for c in last]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    lines += alignment_section(log, runs_dir)
    lines += [
        "",
        "## Reading",
        "",
        reading(evals, facts, speeds, recipe.get("eval", {}).get("num_samples")),
        "",
    ]
    md = out_dir / "mnist_study.md"
    md.write_text("\n".join(lines))
    return md, png


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, help="training steps per run (recipes: 3000)")
    parser.add_argument("--eval-every", type=int, help="steps between evaluations (250)")
    parser.add_argument("--runs-dir", default="runs/study", help="where the two runs go")
    parser.add_argument("--out", default="docs/results", help="where the report goes")
    parser.add_argument("--report-only", action="store_true", help="no training: redraw")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    runs_dir = Path(args.runs_dir)
    log_path = runs_dir / "study.json"
    if not args.report_only:
        runs_dir.mkdir(parents=True, exist_ok=True)
        log = json.loads(log_path.read_text()) if log_path.exists() else {"runs": {}}
        log["command"] = shlex.join(["python", "benchmarks/study.py", *argv])
        log["commit"] = _git_commit()
        for name in RUNS:
            train_run(name, overrides(name, args), log, log_path)
    if log_path.exists():
        log = json.loads(log_path.read_text())
        if "teacher" not in log and (runs_dir / "repa" / "recipe.toml").exists():
            log["teacher"] = teacher_baselines(runs_dir)
            log_path.write_text(json.dumps(log, indent=1))
    md, png = write_report(runs_dir, Path(args.out))
    print(f"wrote {md} and {png}")


if __name__ == "__main__":
    main()
