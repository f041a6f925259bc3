"""Sampling speed: compile time, seconds per batch, images/s and model evaluations per second
for a SiT at the ImageNet-256 latent shape (4x32x32, 1000 classes), random weights, through the
library's own jitted sampler (`repa_eqx.sampling.samples.sample_jit`), with the reference's
settings:

- ode: Euler, 50 steps, CFG 1.8 on [0, 0.7] (the ODE headline of `generate.py`);
- sde: Euler-Maruyama, 250 steps, CFG 1.8 on [0, 0.7] (the paper's FID-1.42 setting).

    python benchmarks/bench_sample.py --models XL/2 --batch 256 --modes ode,sde

NFE counts one model call per example; a guided step's doubled batch counts twice.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.table import Table

from repa_eqx.diffusion.samplers import guided_steps, ode_times, sde_times
from repa_eqx.model.sit import SiT, SiTConfig
from repa_eqx.sampling.samples import SamplerSpec, example_inputs, sample_jit

SPECS = {
    "ode": SamplerSpec("ode", 50, cfg_scale=1.8, interval=(0.0, 0.7)),
    "sde": SamplerSpec("sde", 250, cfg_scale=1.8, interval=(0.0, 0.7)),
}


def nfe_per_example(spec: SamplerSpec) -> int:
    times = (ode_times if spec.mode == "ode" else sde_times)(spec.num_steps)[:-1]
    return len(times) + int(guided_steps(times, spec.cfg_scale, spec.interval).sum())


def bench(model: str, spec: SamplerSpec, batch: int, repeats: int, precision: str) -> dict:
    config = SiTConfig.from_name(f"SiT-{model}", input_size=32, in_channels=4)
    sit = SiT(config, key=jax.random.key(0))
    dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    sit = jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, sit
    )
    noise, keys = example_inputs(0, jnp.arange(batch), (4, 32, 32))
    labels = jnp.arange(batch) % 1000
    start = time.perf_counter()
    compiled = sample_jit.lower(sit, spec, noise.astype(dtype), labels, keys).compile()
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(sit, spec, noise.astype(dtype), labels, keys))
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    nfe = nfe_per_example(spec)
    return dict(
        model=f"SiT-{model}",
        mode=spec.name,
        precision=precision,
        batch=batch,
        compile_s=compile_s,
        s_per_batch=seconds,
        images_per_s=batch / seconds,
        nfe=nfe,
        evals_per_s=nfe * batch / seconds,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="S/2", help="comma-separated SiT sizes")
    parser.add_argument("--modes", default="ode", help="comma-separated: ode,sde")
    parser.add_argument("--precisions", default="fp32", help="comma-separated: fp32,bf16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs (median reported)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()

    rows = []
    for m in args.models.split(","):
        for mode in args.modes.split(","):
            for p in args.precisions.split(","):
                rows.append(bench(m, SPECS[mode], args.batch, args.repeats, p))
                print(json.dumps(rows[-1]), flush=True)  # partial results survive a timeout
    table = Table(title=f"sampling on {jax.devices()[0].device_kind} ({jax.device_count()} dev)")
    for column in ("model", "sampler", "prec", "batch", "compile s", "s/batch", "img/s", "NFE"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            r["model"], r["mode"], r["precision"], str(r["batch"]), f"{r['compile_s']:.1f}",
            f"{r['s_per_batch']:.2f}", f"{r['images_per_s']:.1f}", str(r["nfe"]),
        )  # fmt: skip
    Console(width=120).print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    assert all(np.isfinite(r["s_per_batch"]) for r in rows)


if __name__ == "__main__":
    main()
