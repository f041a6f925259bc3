"""The GPU device check: one command, under 8 minutes on one H200-class GPU, that prints what a
GPU does with this library (`benchmarks/device_check.sh`, which runs this file):

- the device (`jax.devices()`) and the XLA flags it runs with (`repa_eqx.core.xla_flags`, set
  here before JAX starts);
- the REPA train step (the library's `make_train_step`: SiT + projector to 768-d targets, AdamW,
  EMA, remat "dots", on 4x32x32 latents, 1000 classes; the bench's own functions) for SiT-B/2 and
  SiT-XL/2 at batch 32 and 64 in bf16, then SiT-B/2 in fp32 if the budget allows: compile time,
  s/step (median of the timed steps), images/s, model TFLOP/s and MFU, the compiled step's peak
  memory (XLA's memory analysis: arguments + outputs + temp - aliased, as `just bench --memory`)
  and the device's `memory_stats()` peak_bytes_in_use (the process's peak so far: the runs go
  from small to large);
- SDE-250 sampling of SiT-XL/2 (CFG 1.8 on [0, 0.7], the paper's FID setting; fp32 weights, as
  `repa sample` runs) at batch 64 through `repa_eqx.sampling.samples.sample_jit`: compile time,
  s/batch, images/s, network evaluations/s.

Model FLOPs are the bench's (`bench_train_step.model_flops`: XLA's cost analysis of depth-1 and
depth-2 variants of the step, extrapolated to the real depth, without remat's recomputation).
MFU is against the GPU's dense bf16 peak from a table by device kind (H100 SXM and H200 989
TFLOP/s, H100 PCIe 756, A100 312, L40S 362: the vendors' dense, no-sparsity figures), else
against the best of a large bf16 matmul measured here; the output says which. fp32 rows use the
same bf16 peak.

Each measurement runs in its own try/except: an error prints its one line and the check goes on.
A time budget (`--budget-s`, default 420 s) skips what would start too late, and says so. Every
result is printed as a JSON line as soon as it is measured, then a summary table at the end.

    bash benchmarks/device_check.sh            # on the GPU machine
    bash benchmarks/device_check.sh --smoke    # here, on a CPU: tiny models, a few steps
"""

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from repa_eqx.core.xla_flags import configure_xla_gpu

FLAGS_ADDED = configure_xla_gpu()  # before anything starts a JAX backend

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # the bench beside this file
import bench_train_step as bench  # noqa: E402

from repa_eqx.diffusion.samplers import guided_steps, sde_times  # noqa: E402
from repa_eqx.model.sit import SiT, SiTConfig  # noqa: E402
from repa_eqx.sampling.samples import SamplerSpec, example_inputs, sample_jit  # noqa: E402

# Dense bf16 tensor-core peaks, TFLOP/s, by a substring of `device_kind` (first match wins);
# None: not in the table (the NVL cards run at lower clocks), measured instead.
BF16_PEAK_TFLOPS: tuple[tuple[str, float | None], ...] = (
    ("NVL", None),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)
SDE_SPEC = SamplerSpec("sde", 250, cfg_scale=1.8, interval=(0.0, 0.7))


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the check measures: the full one on a GPU, or `--smoke`'s tiny one."""

    models: dict[str, SiTConfig]  # name -> config, smallest first
    train: tuple[tuple[str, str, int], ...]  # (model, precision, batch), before sampling
    train_after: tuple[tuple[str, str, int], ...]  # after sampling: dropped first when late
    sample_model: str
    sample_batch: int
    sampler: SamplerSpec
    steps: int
    warmup: int
    matmul_n: int
    # Rough seconds each measurement needs (compile included): it is skipped when less is left.
    needs_s: dict[str, float]


def full_plan() -> Plan:
    models = {m: bench.imagenet_config(m) for m in ("B/2", "XL/2")}
    train = tuple((m, "bf16", b) for m in models for b in (32, 64))
    fp32 = tuple(("B/2", "fp32", b) for b in (32, 64))
    return Plan(
        models, train, fp32, "XL/2", 64, SDE_SPEC, steps=10, warmup=2, matmul_n=8192,
        needs_s={"B/2": 40, "XL/2": 90, "sample": 120},
    )  # fmt: skip


def smoke_plan() -> Plan:
    tiny = dataclasses.replace(
        bench.imagenet_config("S/2"), depth=2, hidden_size=64, num_heads=2, encoder_depth=1
    )
    models = {"tiny": tiny, "tiny-3": dataclasses.replace(tiny, depth=3)}
    train = (("tiny", "bf16", 2), ("tiny-3", "bf16", 4))
    sampler = dataclasses.replace(SDE_SPEC, num_steps=4)
    return Plan(
        models, train, (("tiny", "fp32", 2),), "tiny", 2, sampler, steps=2, warmup=1, matmul_n=512,
        needs_s={"tiny": 1, "tiny-3": 1, "sample": 1},
    )  # fmt: skip


def bf16_peak(device, n: int, reps: int = 10) -> tuple[float, str]:
    """(TFLOP/s, where the figure comes from): the table's dense bf16 peak for this device
    kind, else the best of `reps` jitted bf16 (n x n) @ (n x n) measured here."""
    known = [(k, t) for k, t in BF16_PEAK_TFLOPS if k.lower() in device.device_kind.lower()]
    if known and known[0][1] is not None:
        return known[0][1], f"table: {known[0][0]} dense bf16"
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12, f"measured: best bf16 {n}x{n} matmul of {reps}"


def device_peak_bytes(device) -> int | None:
    """The allocator's peak_bytes_in_use so far, where the backend reports it."""
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        return None
    return (stats or {}).get("peak_bytes_in_use")


def train_step(
    config: SiTConfig, precision: str, batch_size: int, plan: Plan, peak_tflops: float
) -> dict:
    """The library's REPA train step of `config`: compiled, run, timed, its memory."""
    step_cfg = bench.step_config(precision, "dots")
    batch = bench.make_batch(batch_size, config)
    state, enc, lowered, lower_s = bench.lower_step(config, step_cfg, batch)
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = lower_s + time.perf_counter() - start
    memory = bench.compiled_memory(compiled)
    times = []
    for i in range(plan.warmup + plan.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch, enc)  # the state is donated: carry it on
        jax.block_until_ready((state, metrics))
        if i >= plan.warmup:
            times.append(time.perf_counter() - start)
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss}")
    del state
    step_s = statistics.median(times)
    row = {
        "compile_s": compile_s,
        "seconds": step_s,
        "images_per_s": batch_size / step_s,
        "xla_peak_gb": memory["peak"] / bench.GB,
        "loss": loss,
    }
    try:  # the FLOP count compiles two more programs: its failure keeps the timing
        flops = bench.model_flops(config, step_cfg, batch)
    except Exception as e:  # noqa: BLE001
        row["flops_error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        return row
    row["model_gflop_per_step"] = flops / 1e9
    row["tflops"] = flops / step_s / 1e12
    row["mfu"] = row["tflops"] / peak_tflops
    return row


def nfe_per_example(spec: SamplerSpec) -> int:
    """Network evaluations per example: one per step, two where the step is guided."""
    starts = sde_times(spec.num_steps)[:-1]
    return len(starts) + int(guided_steps(starts, spec.cfg_scale, spec.interval).sum())


def sampling(config: SiTConfig, batch_size: int, spec: SamplerSpec) -> dict:
    """`sample_jit` of a random-weight SiT (fp32): compiled, then one timed batch."""
    sit = SiT(config, key=jax.random.key(0))
    shape = (config.in_channels, config.input_size, config.input_size)
    noise, keys = example_inputs(0, jnp.arange(batch_size), shape)
    labels = jnp.arange(batch_size) % config.num_classes
    start = time.perf_counter()
    compiled = sample_jit.lower(sit, spec, noise, labels, keys).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    images = jax.block_until_ready(compiled(sit, spec, noise, labels, keys))
    seconds = time.perf_counter() - start
    if not bool(jnp.isfinite(images).all()):
        raise RuntimeError("non-finite samples")
    nfe = nfe_per_example(spec)
    return {
        "compile_s": compile_s,
        "seconds": seconds,
        "images_per_s": batch_size / seconds,
        "nfe_per_example": nfe,
        "evals_per_s": nfe * batch_size / seconds,
        # equinox's Compiled wraps jax's
        "xla_peak_gb": bench.compiled_memory(compiled.compiled)["peak"] / bench.GB,
    }


class Runner:
    """Runs measurements within the time budget, each in its own try/except; keeps a row per
    measurement (status "ok", "error: ..." or "skipped: ...") and prints it as a JSON line."""

    def __init__(self, budget_s: float, console: Console):
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.console = console
        self.rows: list[dict] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def run(self, row: dict, needs_s: float, measure: Callable[[], dict]) -> None:
        left = max(0.0, self.budget_s - self.elapsed())
        label = " ".join(str(v) for v in row.values())
        if left < needs_s:
            row["status"] = (
                f"skipped: {left:.0f} s of the {self.budget_s:.0f} s budget left, "
                f"about {needs_s:.0f} s needed"
            )
        else:
            self.console.print(f"[{self.elapsed():.0f} s] {label}", highlight=False)
            try:
                row.update(measure())
                row["status"] = "ok"
            except Exception as e:  # noqa: BLE001  (report it and go on)
                first = (str(e).strip().splitlines() or [""])[0][:300]
                row["status"] = f"error: {type(e).__name__}: {first}"
                traceback.print_exc(limit=3, file=sys.stderr)
        row["device_peak_gb"] = _gb(device_peak_bytes(jax.devices()[0]))
        self.rows.append(row)
        print(json.dumps(row), flush=True)  # partial results survive a time-out


def _gb(n: int | None) -> float | None:
    return None if n is None else n / bench.GB


def summary_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    headers = ["what", "model", "prec", "batch", "compile s", "s/step|batch", "img/s"]
    headers += ["TFLOP/s", "MFU", "XLA peak GB", "device peak GB", "status"]
    for header in headers:
        table.add_column(
            header, justify="left" if header in ("what", "model", "status") else "right"
        )

    def cell(row, key, fmt):
        value = row.get(key)
        return "-" if value is None else format(value, fmt)

    for r in rows:
        mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        table.add_row(
            r["what"], r["model"], r["precision"], str(r["batch"]),
            cell(r, "compile_s", ".1f"), cell(r, "seconds", ".3f"),
            cell(r, "images_per_s", ".1f"), cell(r, "tflops", ".1f"), mfu,
            cell(r, "xla_peak_gb", ".1f"), cell(r, "device_peak_gb", ".1f"), r["status"],
        )  # fmt: skip
    return table


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models, a few steps (CPU)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="total time budget, s")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args(argv)
    plan = smoke_plan() if args.smoke else full_plan()
    console = Console(width=None if Console().is_terminal else 160)
    runner = Runner(args.budget_s, console)

    devices = jax.devices()
    device = devices[0]
    if device.platform != "gpu" and not args.smoke:
        raise SystemExit(
            f"error: no GPU here ({device.platform}: {device.device_kind}); the full check runs "
            "SiT-XL/2 and needs a GPU (--smoke runs its tiny version on any device)"
        )
    jax.config.update("jax_enable_compilation_cache", False)  # compile times, not cache reads
    console.print(f"devices: {devices}", highlight=False)
    console.print(
        f"device kind: {device.device_kind}; jax {jax.__version__}, backend "
        f"{jax.default_backend()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} (added here: "
        f"{' '.join(FLAGS_ADDED) or 'none'})",
        highlight=False,
    )
    try:
        peak, peak_source = bf16_peak(device, plan.matmul_n)
    except Exception as e:  # noqa: BLE001
        peak, peak_source = math.nan, f"unknown ({type(e).__name__}: {e})"
    console.print(f"bf16 peak for MFU: {peak:.4g} TFLOP/s ({peak_source})", highlight=False)

    def train(configs):
        for model, precision, batch_size in configs:
            config = plan.models[model]
            row = {"what": "train step", "model": model, "precision": precision}
            runner.run(
                {**row, "batch": batch_size},
                plan.needs_s[model],
                lambda c=config, p=precision, b=batch_size: train_step(c, p, b, plan, peak),
            )

    train(plan.train)
    name = plan.sample_model
    row = {"what": plan.sampler.name, "model": name, "precision": "fp32"}
    runner.run(
        {**row, "batch": plan.sample_batch},
        plan.needs_s["sample"],
        lambda: sampling(plan.models[name], plan.sample_batch, plan.sampler),
    )
    train(plan.train_after)  # fp32: the first thing dropped when time runs short

    title = (
        f"device check{' (smoke: tiny models)' if args.smoke else ''} on {device.device_kind}, "
        f"{runner.elapsed():.0f} s of a {args.budget_s:.0f} s budget"
    )
    console.print(summary_table(runner.rows, title))
    console.print(
        "train step: REPA (SiT + projector to 768-d, AdamW, EMA, remat dots), 4x32x32 latents; "
        f"s/step the median of {plan.steps} steps after {plan.warmup}; MFU against "
        f"{peak:.4g} TFLOP/s ({peak_source}). XLA peak: arguments + outputs + temp - aliased of "
        "the compiled program; device peak: memory_stats() peak_bytes_in_use of the process "
        "so far. Sampling: one timed batch after compiling, "
        f"{nfe_per_example(plan.sampler)} network evaluations per image.",
        highlight=False,
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": device.device_kind, "rows": runner.rows}))
    return runner.rows


if __name__ == "__main__":
    failed = [r for r in main() if r["status"].startswith("error")]
    sys.exit(1 if failed else 0)
