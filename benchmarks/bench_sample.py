"""Sampling speed against the reference, side by side in one run: images/s of the library's
jitted sampler (`repa_eqx.sampling.samples.sample_jit`) and of the reference's sampling loop in
eager PyTorch (benchmarks/torch_repa_sample.py), for a SiT at the ImageNet-256 latent shape
(4x32x32, 1000 classes) with the same random weights, the same initial noise and labels and,
for the SDE, the same per-step noise, with the reference's settings:

- ode: Euler, 50 steps, CFG 1.8 on [0, 0.7] (the ODE headline of `generate.py`);
- sde: Euler-Maruyama, 250 steps, CFG 1.8 on [0, 0.7] (the paper's FID-1.42 setting).

    python benchmarks/bench_sample.py --models B/2,XL/2 --modes ode,sde --precisions fp32,bf16

By default every mode runs 10 steps at batch 1 (NFE 17 per image, the guided share of the
steps about 70 % as at 50 or 250 steps, so the ratio ours / reference barely depends on it):
on 2 CPU cores one SDE-250 SiT-XL/2 image costs minutes per side. `--steps 0` runs the
reference's step counts; the run prints what it runs.

Precisions. fp32: float32 weights and state on both sides (the reference carries its state in
float64 and calls the model in float32). bf16: the reference's forward under
`torch.autocast("cpu", dtype=torch.bfloat16)`; ours with the weights cast to bf16 once, the
state in float32. The bf16 rows' "bf16 dev" is the max / mean absolute difference of our bf16
samples from our fp32 samples on the same noise (latent units; the samples have std about 1
with random weights): what bf16 costs in accuracy. "vs ref" is the max absolute difference of
our samples from the reference's in the same precision.

Random weights: xavier as initialised, and the layers the reference initialises to zero
(adaLN, final layer) drawn N(0, 0.02^2), so the network is not the identity. "compile s":
lowering and compiling our sampler. Timings: the median of `--repeats` runs after one untimed
run of each; the timed runs alternate ours and the reference's, so a change of the machine's
load hits both. Ours is compiled once per shape: the run fails if a timed call compiles
again. NFE counts one model call per example; a guided step's doubled batch counts twice.
"""

import argparse
import importlib.util
import json
import os
import platform
import statistics
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.table import Table

from repa_eqx.core.xla_flags import configure_xla_gpu
from repa_eqx.diffusion.samplers import guided_steps, ode_times, sde_times, step_noise
from repa_eqx.model.repa import REPAModel
from repa_eqx.model.sit import SiT, SiTConfig
from repa_eqx.pretrained.official import official_state_dict
from repa_eqx.sampling.samples import SamplerSpec, example_inputs, sample_jit

MODES = {"ode": 50, "sde": 250}  # the reference's step counts
CFG, INTERVAL = 1.8, (0.0, 0.7)
Z_DIM, PROJECTOR_DIM = 768, 2048  # the reference SiT's projector (DINOv2-B)
PRECISIONS = ("fp32", "bf16")

_compiles = 0


def _count_compiles(event: str, duration: float, **_) -> None:
    global _compiles
    if event == "/jax/core/compile/backend_compile_duration":
        _compiles += 1


jax.monitoring.register_event_duration_secs_listener(_count_compiles)


def spec_for(mode: str, steps: int | None) -> SamplerSpec:
    return SamplerSpec(mode, steps or MODES[mode], cfg_scale=CFG, interval=INTERVAL)


def nfe_per_example(spec: SamplerSpec) -> int:
    times = (ode_times if spec.mode == "ode" else sde_times)(spec.num_steps)[:-1]
    return len(times) + int(guided_steps(times, spec.cfg_scale, spec.interval).sum())


def random_model(model: str) -> REPAModel:
    config = SiTConfig.from_name(f"SiT-{model}", input_size=32, in_channels=4)
    repa = REPAModel(config, (Z_DIM,), PROJECTOR_DIM, key=jax.random.key(0))
    leaves, tree = jax.tree.flatten(repa)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [
        0.02 * jax.random.normal(k, a.shape, a.dtype) if not bool(jnp.any(a)) else a
        for k, a in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(tree, leaves)


def cast(sit: SiT, precision: str) -> SiT:
    dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    return jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, sit)


def ours_runner(sit: SiT, spec: SamplerSpec, inputs) -> tuple[float, object]:
    """(compile seconds, a call of the compiled sampler). Called through `sample_jit` itself,
    as generate() calls it: its cache must hold the one program (checked by the caller)."""
    noise, labels, keys = inputs
    start = time.perf_counter()
    sample_jit.lower(sit, spec, noise, labels, keys).compile()
    compile_s = time.perf_counter() - start
    return compile_s, lambda: sample_jit(sit, spec, noise, labels, keys)


def reference_runner(torch_sit, spec: SamplerSpec, precision: str, inputs):
    """A call of the reference's loop on the same noise (and, for the SDE, our per-step
    noise, drawn here before timing where the reference draws randn_like per step)."""
    import torch
    import torch_repa_sample as ref  # beside this script, so on sys.path

    noise, labels, keys = inputs
    model = ref.velocity_model(torch_sit, precision)
    x, y = torch.from_numpy(np.array(noise)), torch.from_numpy(np.array(labels)).long()
    common = dict(
        num_steps=spec.num_steps,
        cfg_scale=spec.cfg_scale,
        guidance_low=spec.interval[0],
        guidance_high=spec.interval[1],
    )
    if spec.mode == "ode":
        return lambda: ref.euler_sampler(model, x, y, **common)
    eps = [torch.from_numpy(np.array(step_noise(keys, i, noise))) for i in range(spec.num_steps)]
    return lambda: ref.euler_maruyama_sampler(model, x, y, noise=lambda i, _: eps[i], **common)


def time_interleaved(runners: dict, repeats: int) -> tuple[dict, dict]:
    """One untimed call of each, then `repeats` rounds timing each in turn (so a change of the
    machine's load hits both sides alike). Returns (seconds per runner, last outputs)."""
    outputs = {name: jax.block_until_ready(run()) for name, run in runners.items()}
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            outputs[name] = jax.block_until_ready(run())
            times[name].append(time.perf_counter() - start)
    return times, outputs


def reference_sit(repa: REPAModel):
    import torch_repa_sample as ref

    c = repa.sit.config
    return ref.sit_from_reference_state(
        official_state_dict(repa),
        **ref.architecture(c),
        z_dim=Z_DIM,
        projector_dim=PROJECTOR_DIM,
    )


def parse_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def results_table(rows: list[dict], with_torch: bool, title: str) -> Table:
    table = Table(title=title)
    headers = ["model", "mode", "prec", "steps", "batch", "NFE", "compile s", "ours img/s"]
    if with_torch:
        headers += ["ref img/s", "ours/ref", "vs ref max"]
    headers += ["bf16 dev max / mean"]
    for h in headers:
        table.add_column(h, justify="left" if h in headers[:3] else "right")
    for r in rows:
        cells = [r["model"], r["mode"], r["precision"], str(r["steps"]), str(r["batch"])]
        cells += [str(r["nfe"]), f"{r['compile_s']:.1f}", f"{r['images_per_s']:.4f}"]
        if with_torch:
            cells += [
                f"{r['ref_images_per_s']:.4f}",
                f"{r['ratio']:.2f}x",
                f"{r['vs_ref_max']:.1e}",
            ]
        dev = r.get("bf16_dev_max")
        cells.append("" if dev is None else f"{dev:.2e} / {r['bf16_dev_mean']:.2e}")
        table.add_row(*cells)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="B/2,XL/2", help="comma-separated SiT sizes")
    parser.add_argument("--modes", default="ode,sde", help="comma-separated: ode,sde")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32,bf16")
    parser.add_argument("--batch", type=int, default=1, help="images per sampler call")
    parser.add_argument(
        "--steps",
        type=int,
        default=10,
        help="steps of every mode (default 10; 0: the reference's ode 50 and sde 250, which "
        "take minutes per SiT-XL/2 image on 2 CPU cores)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed runs after an untimed one")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    have_torch = importlib.util.find_spec("torch") is not None
    parser.add_argument(
        "--torch",
        action=argparse.BooleanOptionalAction,
        default=have_torch,
        help="also time the reference's loop in PyTorch (default: on when torch is importable)",
    )
    args = parser.parse_args()
    configure_xla_gpu()  # before JAX starts its backend
    models = [m.removeprefix("SiT-") for m in parse_list(args.models)]
    modes, precisions = parse_list(args.modes), parse_list(args.precisions)
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown mode(s) {sorted(unknown)}: choose from {sorted(MODES)}")
    if unknown := set(precisions) - set(PRECISIONS):
        parser.error(f"unknown precision(s) {sorted(unknown)}: choose from {PRECISIONS}")
    if args.batch < 1 or args.repeats < 1 or args.steps < 0:
        parser.error("--batch and --repeats must be >= 1, --steps >= 0")
    if args.torch and not have_torch:
        parser.error("--torch needs PyTorch installed")
    jax.config.update("jax_enable_compilation_cache", False)  # compile time, not a cache read

    log = Console(stderr=True)
    torch_info = ""
    if args.torch:
        import torch

        torch_info = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    specs = [spec_for(m, args.steps) for m in modes]
    log.print(
        "running: "
        + ", ".join(f"{s.mode} {s.num_steps} steps (NFE {nfe_per_example(s)})" for s in specs)
        + f", CFG {CFG} on {list(INTERVAL)}; batch {args.batch}; {args.repeats} timed run(s) "
        f"after one untimed; models {models}; {precisions}; reference: {args.torch}"
    )
    rows = []
    run_start = time.perf_counter()
    for model in models:
        repa = random_model(model)
        torch_sit = reference_sit(repa) if args.torch else None
        sit = repa.sit
        del repa
        c = sit.config
        noise, keys = example_inputs(
            0, jnp.arange(args.batch), (c.in_channels, c.input_size, c.input_size)
        )
        labels = jnp.arange(args.batch, dtype=jnp.int32) % c.num_classes
        for spec in specs:
            fp32_samples = None
            for precision in precisions:
                log.print(f"SiT-{model} {spec.name} {precision}: compiling ours")
                inputs = (noise, labels, keys)
                compile_s, runners = ours_runner(cast(sit, precision), spec, inputs)
                runners = {"ours": runners}
                if args.torch:
                    runners["ref"] = reference_runner(torch_sit, spec, precision, inputs)
                log.print(f"  compiled in {compile_s:.1f} s; timing {' and '.join(runners)}")
                before = _compiles
                times, outputs = time_interleaved(runners, args.repeats)
                if _compiles - before > 1:  # the first call may compile once (jit's cache)
                    raise RuntimeError(f"sample_jit compiled {_compiles - before} times")
                samples = np.asarray(outputs["ours"], np.float32)
                row = {
                    "model": f"SiT-{model}",
                    "mode": spec.mode,
                    "spec": spec.name,
                    "precision": precision,
                    "steps": spec.num_steps,
                    "batch": args.batch,
                    "nfe": nfe_per_example(spec),
                    "compile_s": compile_s,
                    "times_s": times["ours"],
                    "images_per_s": args.batch / statistics.median(times["ours"]),
                }
                if precision == "fp32":
                    fp32_samples = samples
                elif fp32_samples is not None:
                    dev = np.abs(samples - fp32_samples)
                    row["bf16_dev_max"], row["bf16_dev_mean"] = float(dev.max()), float(dev.mean())
                log.print(f"  ours {row['images_per_s']:.4f} img/s")
                if args.torch:
                    row["ref_times_s"] = times["ref"]
                    row["ref_images_per_s"] = args.batch / statistics.median(times["ref"])
                    row["ratio"] = row["images_per_s"] / row["ref_images_per_s"]
                    theirs = outputs["ref"].float().numpy()
                    row["vs_ref_max"] = float(np.abs(samples - theirs).max())
                    log.print(f"  reference {row['ref_images_per_s']:.4f} img/s")
                rows.append(row)
                print(json.dumps(rows[-1]), flush=True)  # partial results survive a timeout
        del sit, torch_sit
    total_s = time.perf_counter() - run_start

    console = Console(width=None if Console().is_terminal else 160)
    title = (
        f"sampling, CFG {CFG} on {list(INTERVAL)}: SiT at 4x32x32 latents, random weights, "
        f"batch {args.batch}"
    )
    console.print(results_table(rows, args.torch, title))
    console.print(
        f"img/s: batch / median of {args.repeats} timed run(s) after one untimed, ours and the "
        "reference's alternating. ours/ref: "
        "ours img/s over the reference's (benchmarks/torch_repa_sample.py, eager PyTorch, "
        f"{torch_info or 'not run'}), same weights, noise and SDE step noise. vs ref max: "
        "max |ours - reference| of the samples. bf16 dev: max / mean |ours bf16 - ours fp32| "
        f"on the same noise. {jax.device_count()} {jax.default_backend()} device(s), "
        f"{os.cpu_count()} cores; total wall time {total_s:.0f} s."
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "jax": jax.__version__,
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch_info,
            "rows": rows,
        }
        args.json.write_text(json.dumps(report, indent=2))
    assert all(np.isfinite(r["images_per_s"]) for r in rows)


if __name__ == "__main__":
    main()
