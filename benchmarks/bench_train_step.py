"""Speed of the REPA train step: compile time, seconds per step, images/s and model FLOP
utilisation, for SiT-S/2 and SiT-B/2 at the ImageNet-256 latent shape (4x32x32 input, 1000
classes, 256 tokens) with one projector to 768-d targets (DINOv2-B features), in fp32 and bf16.

    python benchmarks/bench_train_step.py --models S/2,B/2 --precisions fp32,bf16 --steps 3

SiT-XL/2 (`--compile-only`, default XL/2) is only lowered and compiled, on abstract weights:
its compile time, without the 10+ GB of weights and Adam state a CPU step would need.

The step is the library's own (`repa_eqx.training.step.make_train_step`); the target features are
precomputed random arrays, so no encoder runs inside the step.

FLOPs. XLA's cost analysis counts the body of a while loop once, whatever its trip count, and
the SiT runs its blocks with `lax.scan`: the compiled step's "flops" leaves out most of the
transformer (about 3x short for SiT-S/2). The model FLOPs behind GFLOP/s and MFU are therefore
the same cost analysis applied to depth-1 and depth-2 variants of the step, where every layer
loop runs once and is counted in full, extrapolated linearly to the real depth. That analysis
reads the HLO as the program wrote it (before XLA's optimisations), i.e. model FLOPs, not
hardware FLOPs. The raw figure of the compiled step is reported beside it.

MFU is relative to the best GFLOP/s this machine reaches on a large fp32 matmul, for both
precisions. Where the CPU has a bf16 path (avx512_bf16, which PyTorch's autocast uses and our
XLA step does not yet), bf16 MFU against the fp32 peak is an upper bound. Other processes can
load the machine at any point of the run and a loaded measurement only underestimates the
peak, so the matmul is timed before each configuration and at the end; the best is the peak.

Memory (`--memory`, `just bench --memory`). For SiT-XL/2 + REPA (the paper's set-up: 4x32x32
latents, 1000 classes, projector to 768-d targets, AdamW and EMA) at batch 32 per device, for each
remat policy (none, dots, full) and precision, the compiled step's memory from XLA's memory
analysis (`compiled.memory_analysis()`, on abstract weights as above), and the largest per-device
batch whose step fits a memory limit (80 GB by default). The fields, in bytes: arguments (the
state, which the step donates, and the batch), outputs (the new state and the metrics), temp
(XLA's one block for every intermediate buffer, its size the peak of those live at once), alias
(outputs written over donated arguments). The step's peak is arguments + outputs + temp - alias:
every buffer the step holds while it runs. XLA's own `peak_memory_in_bytes` (its simulation of
the live buffers over the program) is printed beside it; it can be lower.
The largest batch: memory is affine in the batch size, so the peaks at batch 32 and 64 give a
line and its crossing of the limit a batch b; the steps at b and b + 1 are then compiled to
confirm that b fits and b + 1 does not (if not, a new line through the nearest two measured
batches, at most three rounds). Each compile of XL/2 takes tens of seconds on a small CPU, so this
is 4 compiles per configuration when the line is right: about 24 for the default 3 x 2.
This is XLA:CPU's analysis of the step compiled for the CPU; the GPU compiler fuses and assigns
buffers differently, so a GPU's figure differs (`benchmarks/device_check.sh` measures it there).

PyTorch baseline (`--torch`, on by default when torch is importable). For each configuration the
same step written in eager PyTorch (benchmarks/torch_repa_step.py: the reference's SDPA attention,
bf16 through `torch.autocast`, torch's default thread count) runs on the same batch with the same
warmup and timed steps; the table adds its median s/step and the speed-up, torch s/step / ours.
"""

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.table import Table

from repa_eqx.core.xla_flags import configure_xla_gpu
from repa_eqx.model.sit import REMAT_POLICIES, SiTConfig
from repa_eqx.training.recipe import Recipe
from repa_eqx.training.step import StepConfig, init_state, make_optimizer, make_train_step

# ImageNet-256 through the SD-VAE: 4x32x32 latents; SiT-x/2 makes 16x16 = 256 tokens. Patch
# size 1 models (SiT-XL/1, REPA-E's and LightningDiT's set-up) run on f16d32 latents (VA-VAE,
# E2E-VAE): 32x16x16, also 256 tokens.
LATENT_CHANNELS, LATENT_SIZE, NUM_CLASSES = 4, 32, 1000
F16D32_CHANNELS, F16D32_SIZE = 32, 16
TARGET_DIM, PROJECTOR_DIM = 768, 2048  # DINOv2-B features; the paper's projector width
PRECISIONS = ("fp32", "bf16")


def measure_peak_gflops(n: int = 2048, reps: int = 10) -> float:
    """Best GFLOP/s of a jitted fp32 (n x n) @ (n x n): the ceiling MFU is measured against."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32)
    b = jax.random.normal(kb, (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()  # compile and warm up outside the timing
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def make_batch(batch_size: int, config: SiTConfig) -> dict:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch_size, config.in_channels, config.input_size, config.input_size))
    features = rng.standard_normal((batch_size, config.num_tokens, TARGET_DIM))
    # On the device once, so the timed steps measure the step and not the host-to-device copy.
    return {
        "x": jnp.asarray(x, jnp.float32),
        "y": jnp.asarray(rng.integers(0, NUM_CLASSES, batch_size), jnp.int32),
        "features": (jnp.asarray(features, jnp.float32),),
    }


def lower_step(config: SiTConfig, step_cfg: StepConfig, batch: dict):
    """The library's jitted step for `config`, its state, and the step lowered for that state.
    Returns (state_arrays, encoder_arrays, lowered, seconds spent lowering)."""
    optimizer = make_optimizer(Recipe())
    state = init_state(
        config, z_dims=[TARGET_DIM], projector_dim=PROJECTOR_DIM, optimizer=optimizer, seed=0
    )
    state_arrays, static_state = eqx.partition(state, eqx.is_array)
    enc_arrays, static_enc = eqx.partition((), eqx.is_array)  # features given: no encoders
    step_fn = make_train_step(optimizer, step_cfg, static_state, static_enc)
    start = time.perf_counter()
    lowered = step_fn.lower(state_arrays, batch, enc_arrays)
    return state_arrays, enc_arrays, lowered, time.perf_counter() - start


def lower_abstract(model: str, precision: str, batch_size: int, remat: str):
    """The step lowered for an abstract state and batch (`eval_shape`): no weights are
    allocated, so this reaches models too big to run here, such as SiT-XL/2. Returns
    (lowered, seconds spent lowering)."""
    config = imagenet_config(model)
    optimizer = make_optimizer(Recipe())
    state = eqx.filter_eval_shape(init_state, config, [TARGET_DIM], PROJECTOR_DIM, optimizer, 0)
    is_struct = lambda x: isinstance(x, jax.ShapeDtypeStruct)  # noqa: E731
    state_arrays, static_state = eqx.partition(state, is_struct)
    enc_arrays, static_enc = eqx.partition((), eqx.is_array)
    step_fn = make_train_step(optimizer, step_config(precision, remat), static_state, static_enc)
    batch = jax.eval_shape(lambda: make_batch(batch_size, config))
    start = time.perf_counter()
    lowered = step_fn.lower(state_arrays, batch, enc_arrays)
    return lowered, time.perf_counter() - start


def compile_seconds(model: str, precision: str, batch_size: int, remat: str) -> tuple[float, float]:
    """(lower s, compile s) of the step for an abstract state and batch (`lower_abstract`)."""
    lowered, lower_s = lower_abstract(model, precision, batch_size, remat)
    start = time.perf_counter()
    lowered.compile()
    return lower_s, time.perf_counter() - start


def model_flops(config: SiTConfig, step_cfg: StepConfig, batch: dict) -> float:
    """FLOPs of one step with every block counted (see the module docstring): the step's cost is
    affine in depth, and at depth 1 and 2, with REPA after block 1, each layer loop runs once."""

    # Model FLOPs: what the step must compute, without the recomputation remat adds.
    step_cfg = dataclasses.replace(step_cfg, remat="none")

    def flops(depth: int) -> float:
        variant = dataclasses.replace(config, depth=depth, encoder_depth=1)
        lowered = lower_step(variant, step_cfg, batch)[2]
        # Some backends (GPU) only analyse compiled programs: hardware FLOPs, close enough here.
        return (lowered.cost_analysis() or lowered.compile().cost_analysis())["flops"]

    one, two = flops(1), flops(2)
    return one + (config.depth - 1) * (two - one)


def full_name(model: str) -> str:
    """ "XL/2" -> "SiT-XL/2"; a name with its family ("LightningDiT-XL/1") stays."""
    return model if "-" in model else f"SiT-{model}"


def imagenet_config(model: str) -> SiTConfig:
    """`model` (a SiT size such as "XL/2", or a full name such as "LightningDiT-XL/1") on
    ImageNet-256 latents: SD-VAE's 4x32x32, or f16d32's 32x16x16 for patch size 1."""
    channels, size = (
        (F16D32_CHANNELS, F16D32_SIZE)
        if model.endswith("/1")
        else (
            LATENT_CHANNELS,
            LATENT_SIZE,
        )
    )
    return SiTConfig.from_name(
        full_name(model), input_size=size, in_channels=channels, num_classes=NUM_CLASSES
    )


def step_config(precision: str, remat: str = "dots") -> StepConfig:
    # The paper's objective and EMA; none of these change the step's cost. `remat` does: it is
    # recipe key train.remat, "dots" by default (sit.REMAT_POLICIES).
    return StepConfig(
        path="linear",
        weighting="uniform",
        proj_coeff=0.5,
        ema_decay=0.9999,
        precision=precision,
        remat=remat,
    )


def bench_one(
    model: str, precision: str, batch_size: int, steps: int, warmup: int, remat: str
) -> dict:
    config = imagenet_config(model)
    step_cfg = step_config(precision, remat)
    batch = make_batch(batch_size, config)
    state_arrays, enc_arrays, lowered, lower_s = lower_step(config, step_cfg, batch)
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    xla_flops = compiled.cost_analysis()["flops"]  # a dict in jax 0.10; loop bodies once
    flops = model_flops(config, step_cfg, batch)

    # The compiled step donates the state: always carry on with the state it returns.
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        state_arrays, metrics = compiled(state_arrays, batch, enc_arrays)
        jax.block_until_ready((state_arrays, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
        raise RuntimeError(f"SiT-{model} {precision}: non-finite loss {loss}")

    step_s = statistics.median(times)
    return {
        "model": full_name(model),
        "precision": precision,
        "remat": remat,
        "batch": batch_size,
        "lower_s": lower_s,
        "compile_s": compile_s,
        "step_s": step_s,
        "step_times_s": times,
        "images_per_s": batch_size / step_s,
        "model_flops": flops,
        "xla_flops_compiled_raw": xla_flops,
        "achieved_gflops": flops / step_s / 1e9,
        "final_loss": loss,
    }


def bench_torch(model: str, precision: str, batch_size: int, steps: int, warmup: int) -> dict:
    """The same step in eager PyTorch, timed the same way on the same batch."""
    import torch
    from torch_repa_step import REPASiT, REPAStep, architecture  # beside this script

    c = imagenet_config(model)
    step_cfg, optim = step_config(precision), Recipe().optim
    torch.manual_seed(0)
    sit = REPASiT(
        **architecture(c),
        mlp_ratio=c.mlp_ratio,
        class_dropout_prob=c.class_dropout_prob,
        z_dim=TARGET_DIM,
        projector_dim=PROJECTOR_DIM,
    )
    step = REPAStep(
        sit,
        precision,
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        max_grad_norm=optim.max_grad_norm,
        ema_decay=step_cfg.ema_decay,
        proj_coeff=step_cfg.proj_coeff,
    )
    batch = make_batch(batch_size, c)
    x, y, features = (
        torch.from_numpy(np.array(a)) for a in (batch["x"], batch["y"], batch["features"][0])
    )
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = step(x, y, features)  # eager CPU: synchronous, returns a Python float
        if i >= warmup:
            times.append(time.perf_counter() - start)
    if not math.isfinite(loss):
        raise RuntimeError(f"SiT-{model} {precision} (torch): non-finite loss {loss}")
    return {
        "torch_step_s": statistics.median(times),
        "torch_step_times_s": times,
        "torch_final_loss": loss,
    }


GB = 1e9
MEMORY_FIELDS = ("argument", "output", "temp", "alias")


def compiled_memory(compiled) -> dict[str, int]:
    """The compiled step's memory analysis, in bytes (see the module docstring): its fields,
    `peak` = argument + output + temp - alias, and XLA's own `xla_peak`."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        raise RuntimeError(f"the {jax.default_backend()} backend gives no memory analysis")
    sizes = {f: int(getattr(analysis, f"{f}_size_in_bytes")) for f in MEMORY_FIELDS}
    sizes["peak"] = sizes["argument"] + sizes["output"] + sizes["temp"] - sizes["alias"]
    sizes["xla_peak"] = int(getattr(analysis, "peak_memory_in_bytes", 0) or 0)
    return sizes


def step_memory(model: str, precision: str, batch_size: int, remat: str) -> dict:
    """The memory of the step of SiT-`model` (+ REPA, AdamW, EMA) compiled for this backend, on
    abstract weights, and the seconds it took to lower and compile."""
    lowered, lower_s = lower_abstract(model, precision, batch_size, remat)
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    return {
        "model": f"SiT-{model}",
        "precision": precision,
        "remat": remat,
        "batch": batch_size,
        "compile_s": lower_s + compile_s,
        **compiled_memory(compiled),
    }


def largest_batch(
    peak_at: Callable[[int], float], limit: float, start: tuple[int, int] = (32, 64), rounds=3
) -> tuple[int, bool]:
    """The largest batch b with peak_at(b) <= limit, for a peak affine in the batch: the line
    through two measured batches gives b, then b and b + 1 are measured to confirm it; if they
    do not, the line through the two measured batches nearest the limit gives the next b.
    Returns (b, confirmed); `peak_at` is called once per batch size tried."""
    peaks: dict[int, float] = {}

    def peak(b: int) -> float:
        if b not in peaks:
            peaks[b] = peak_at(b)
        return peaks[b]

    for b in start:
        peak(b)
    b = 0
    for _ in range(rounds):
        (b0, p0), (b1, p1) = sorted(peaks.items(), key=lambda bp: abs(bp[1] - limit))[:2]
        slope = (p1 - p0) / (b1 - b0)
        if slope <= 0:
            raise RuntimeError(f"memory does not grow with the batch: {sorted(peaks.items())}")
        b = max(0, math.floor(b0 + (limit - p0) / slope))
        if (b == 0 or peak(b) <= limit) and peak(b + 1) > limit:
            return b, True
    return b, False


def memory_study(
    model: str, precisions: list[str], remats: list[str], batch: int, limit_gb: float, log
) -> list[dict]:
    """`step_memory` at `batch` for each remat policy and precision, and the largest batch
    within `limit_gb` (`largest_batch`, from `batch` and 2 x `batch`)."""
    rows = []
    for remat in remats:
        for precision in precisions:
            tried: dict[int, dict] = {}

            def peak_at(b: int, precision=precision, remat=remat, tried=tried) -> float:
                log.print(f"SiT-{model} {precision} remat={remat} batch {b}: compiling")
                tried[b] = step_memory(model, precision, b, remat)
                log.print(
                    f"  peak {tried[b]['peak'] / GB:.2f} GB, "
                    f"compiled in {tried[b]['compile_s']:.0f} s"
                )
                return tried[b]["peak"]

            fit, confirmed = largest_batch(peak_at, limit_gb * GB, start=(batch, 2 * batch))
            row = dict(tried[batch])
            row.update(
                limit_gb=limit_gb,
                max_batch=fit,
                max_batch_confirmed=confirmed,
                peaks_by_batch={b: tried[b]["peak"] for b in sorted(tried)},
            )
            rows.append(row)
    return rows


def memory_table(rows: list[dict], limit_gb: float) -> Table:
    table = Table(
        title=f"Memory of the REPA train step, {rows[0]['model']} + projector to 768-d, AdamW + "
        f"EMA, batch {rows[0]['batch']} per device (XLA memory analysis, "
        f"{jax.default_backend()})",
        caption="GB = 1e9 bytes. peak = arguments + outputs + temp - aliased; XLA peak: its "
        "peak_memory_in_bytes",
    )
    headers = ["remat", "precision", "arguments", "outputs", "temp", "aliased", "peak"]
    headers += ["XLA peak", "compile s", f"max batch <= {limit_gb:g} GB", "peak at max, +1"]
    for header in headers:
        table.add_column(header, justify="left" if header in headers[:2] else "right")
    for r in rows:
        peaks = r["peaks_by_batch"]
        b = r["max_batch"]
        at = [peaks.get(b), peaks.get(b + 1)]
        table.add_row(
            r["remat"],
            r["precision"],
            *(f"{r[f] / GB:.2f}" for f in (*MEMORY_FIELDS, "peak", "xla_peak")),
            f"{r['compile_s']:.0f}",
            f"{b}" + ("" if r["max_batch_confirmed"] else " (not confirmed)"),
            ", ".join("-" if p is None else f"{p / GB:.1f}" for p in at),
        )
    return table


def results_table(rows: list[dict], steps: int, warmup: int) -> Table:
    table = Table(
        title=f"REPA train step, batch {rows[0]['batch']}: SiT on 4x32x32 latents (x/2) or "
        "32x16x16 (x/1), 256 tokens, + projector to 768-d",
        caption=f"s/step: median of {steps} timed steps after {warmup} untimed",
    )
    headers = ["model", "precision", "remat", "compile s", "s/step", "images/s", "GFLOP/step"]
    headers += ["XLA raw GFLOP", "GFLOP/s", "MFU"]
    with_torch = any("torch_step_s" in r for r in rows)
    if with_torch:
        headers += ["torch s/step", "speed-up (torch/ours)"]
    for header in headers:
        table.add_column(
            header,
            justify="left" if header in headers[:3] else "right",
            min_width=max((len(r["model"]) for r in rows), default=5)
            if header == "model"
            else None,
        )
    for r in rows:
        torch_cells = []
        if with_torch:  # blank where there is no PyTorch reference (LightningDiT)
            torch_cells = ["", ""]
            if "torch_step_s" in r:
                torch_cells = [f"{r['torch_step_s']:.2f}", f"{r['speedup_torch_over_ours']:.2f}x"]
        table.add_row(
            r["model"],
            r["precision"],
            r["remat"],
            f"{r['lower_s'] + r['compile_s']:.1f}",
            f"{r['step_s']:.2f}",
            f"{r['images_per_s']:.2f}",
            f"{r['model_flops'] / 1e9:.0f}",
            f"{r['xla_flops_compiled_raw'] / 1e9:.0f}",
            f"{r['achieved_gflops']:.1f}",
            f"{100 * r['mfu']:.1f}%",
            *torch_cells,
        )
    return table


def parse_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        default="S/2,B/2",
        help="comma-separated SiT sizes (XL/2; XL/1 runs on f16d32 latents) or full names "
        "(LightningDiT-XL/1; no PyTorch reference)",
    )
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32,bf16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--remat",
        help="comma-separated train.remat policies: none,dots,full (default: dots when timing, "
        "all three with --memory)",
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="only the memory study: the compiled step's peak memory by remat policy and "
        "precision, and the largest batch within --memory-limit-gb (see the docstring)",
    )
    parser.add_argument("--memory-model", default="XL/2", help="SiT size of --memory")
    parser.add_argument("--memory-batch", type=int, default=32, help="per-device batch of --memory")
    parser.add_argument("--memory-limit-gb", type=float, default=80.0, help="GB = 1e9 bytes")
    parser.add_argument(
        "--compile-only",
        default="XL/2",
        help="comma-separated SiT sizes whose step is only compiled, on abstract weights "
        "(for models too big to run here); '' for none",
    )
    have_torch = importlib.util.find_spec("torch") is not None
    parser.add_argument(
        "--torch",
        action=argparse.BooleanOptionalAction,
        default=have_torch,
        help="also time the same step in eager PyTorch (default: on when torch is importable)",
    )
    args = parser.parse_args()
    configure_xla_gpu()  # before JAX starts its backend
    if args.memory:
        memory_main(args)
        return
    if args.torch and not have_torch:
        parser.error("--torch needs PyTorch installed")
    torch_info = {}
    if args.torch:
        import torch

        torch_info = {"torch": torch.__version__, "torch_num_threads": torch.get_num_threads()}
    # "XL/2", or a full name such as "LightningDiT-XL/1"
    models = [m.removeprefix("SiT-") for m in parse_list(args.models)]
    precisions = parse_list(args.precisions)
    if unknown := set(precisions) - set(PRECISIONS):
        parser.error(f"unknown precision(s) {sorted(unknown)}: choose from {PRECISIONS}")
    remats = parse_list(args.remat or "dots")
    if unknown := set(remats) - set(REMAT_POLICIES):
        parser.error(f"unknown remat {sorted(unknown)}: choose from {sorted(REMAT_POLICIES)}")
    if args.steps < 1 or args.batch < 1 or args.warmup < 0:
        parser.error("--steps and --batch must be >= 1, --warmup >= 0")

    # A persistent compilation cache would turn the compile time into a cache read.
    jax.config.update("jax_enable_compilation_cache", False)
    log = Console(stderr=True)
    run_start = time.perf_counter()
    peaks, rows = [], []
    for model in models:
        for precision in precisions:
            for remat in remats:
                peaks.append(measure_peak_gflops())
                log.print(
                    f"{full_name(model)} {precision} remat={remat}: compiling, then "
                    f"{args.warmup}+{args.steps} steps"
                )
                rows.append(bench_one(model, precision, args.batch, args.steps, args.warmup, remat))
                log.print(f"  {rows[-1]['step_s']:.2f} s/step")
            if args.torch and "-" not in model:  # the reference is REPA's SiT only
                log.print(f"SiT-{model} {precision}: PyTorch, {args.warmup}+{args.steps} steps")
                timed = bench_torch(model, precision, args.batch, args.steps, args.warmup)
                for row in rows[-len(remats) :]:
                    row.update(timed)
                    row["speedup_torch_over_ours"] = row["torch_step_s"] / row["step_s"]
                log.print(f"  {timed['torch_step_s']:.2f} s/step")
    compiles = []
    for model in [m.removeprefix("SiT-") for m in parse_list(args.compile_only)]:
        for precision in precisions:
            log.print(f"{full_name(model)} {precision}: lowering and compiling only")
            lower_s, compile_s = compile_seconds(model, precision, args.batch, remats[0])
            compiles.append((full_name(model), precision, lower_s, compile_s))
            log.print(f"  lower {lower_s:.1f} s + compile {compile_s:.1f} s")
    peaks.append(measure_peak_gflops())
    peak = max(peaks)
    log.print(f"matmul GFLOP/s measured along the run: {', '.join(f'{p:.0f}' for p in peaks)}")
    for row in rows:
        row["mfu"] = row["achieved_gflops"] / peak
    total_s = time.perf_counter() - run_start

    # Piped output would otherwise be cut to 80 columns and truncate the table's cells.
    console = Console(width=None if Console().is_terminal else 150 if args.torch else 120)
    if rows:
        console.print(results_table(rows, args.steps, args.warmup))
    console.print(
        f"MFU is relative to the measured peak of this machine: {peak:.1f} GFLOP/s, the best "
        f"jitted fp32 2048x2048 matmul (10 reps at each of {len(peaks)} points of the run). bf16 "
        "rows use the same fp32 peak (an upper bound where the CPU has avx512_bf16).\n"
        "GFLOP/step: XLA cost analysis with every SiT block counted (depth-1/2 variants "
        "extrapolated); XLA raw: the compiled step's own count, which counts each scanned "
        "layer loop once.\n"
        f"compile s = lower + compile. {len(jax.devices())} {jax.default_backend()} device, "
        f"{os.cpu_count()} cores; total wall time {total_s:.0f} s."
    )
    for name, precision, lower_s, compile_s in compiles:
        console.print(
            f"{name} {precision} remat={remats[0]}, batch {args.batch}: lower {lower_s:.1f} s "
            f"+ compile {compile_s:.1f} s = {lower_s + compile_s:.1f} s (abstract weights, not run)"
        )
    if args.torch:
        console.print(
            f"torch s/step: the same step in eager PyTorch {torch_info['torch']} "
            "(benchmarks/torch_repa_step.py; SDPA attention, bf16 via torch.autocast), "
            f"{torch_info['torch_num_threads']} threads; speed-up = torch s/step / ours."
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "peak_gflops_fp32_matmul_2048": peak,
            "matmul_gflops_along_run": peaks,
            "steps": args.steps,
            "warmup": args.warmup,
            "total_wall_s": total_s,
            **torch_info,
            "rows": rows,
            "compile_only": [
                dict(zip(("model", "precision", "lower_s", "compile_s"), c, strict=True))
                for c in compiles
            ],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        log.print(f"wrote {args.json}")


def memory_main(args) -> None:
    """`--memory`: the memory study of the module docstring, printed as a table."""
    precisions = parse_list(args.precisions)
    remats = parse_list(args.remat or ",".join(REMAT_POLICIES))
    for values, known in ((precisions, PRECISIONS), (remats, tuple(REMAT_POLICIES))):
        if unknown := set(values) - set(known):
            raise SystemExit(f"unknown {sorted(unknown)}: choose from {known}")
    model = args.memory_model.removeprefix("SiT-")
    jax.config.update("jax_enable_compilation_cache", False)
    log = Console(stderr=True)
    start = time.perf_counter()
    rows = memory_study(model, precisions, remats, args.memory_batch, args.memory_limit_gb, log=log)
    total_s = time.perf_counter() - start
    console = Console(width=None if Console().is_terminal else 150)
    console.print(memory_table(rows, args.memory_limit_gb))
    device = jax.devices()[0]
    console.print(
        f"XLA:{jax.default_backend().upper()}'s memory analysis of the step compiled for "
        f"{device.device_kind} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores), jax {jax.__version__}; abstract weights, nothing run. The "
        "GPU compiler fuses and assigns buffers differently: benchmarks/device_check.sh "
        "measures the step on the GPU.\n"
        "max batch: the line through the peaks at two batches, confirmed by compiling the "
        f"step at the batch found and at one more. {sum(len(r['peaks_by_batch']) for r in rows)}"
        f" compiles, {total_s:.0f} s."
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"jax": jax.__version__, "backend": jax.default_backend(), "rows": rows}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        log.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
