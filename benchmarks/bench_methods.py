"""Per-step cost of each alignment method relative to REPA (`just bench-methods`).

One training step of the library (`training.step.make_train_step`) at the ImageNet-256 latent
shape (4x32x32 SD-VAE latents, 1000 classes; SiT-B/2: 256 tokens), with the frozen teacher
run inside the step on 224-px uint8 images, as ImageNet training runs it: a DINOv2 of
DINOv2-B's shape (12 layers, width 768, patch 14: a 16x16 grid) with random weights (the
cost does not depend on the values). Each method is a recipe value on the same step:

- vanilla: no teacher, no alignment (lambda 0);
- repa: the MLP projector, lambda 0.5;
- irepa: a 3x3 conv projector, spatially z-scored targets, coefficient 1.0;
- haste: REPA plus the attention distillation of SiT blocks 5-8 against the teacher's last
  4 layers (9-12), 12 heads (the released settings): the teacher also returns its attention
  logits;
- reg: REPA plus the teacher's CLS token as one more SiT token, its velocity loss 0.03;
- dispersive: the encoder-free dispersive loss on the last block (coefficient 0.25, tau 1),
  no teacher.

Each method: compile, `--warmup` untimed steps, then the median of `--steps` timed steps;
the table gives s/step and the ratio to REPA measured in the same run. CPU timings move with
the machine's load: run it on an otherwise idle machine.

    python benchmarks/bench_methods.py                      # SiT-B/2, batch 8, fp32
    python benchmarks/bench_methods.py --model S/2 --batch 4 --steps 2
"""

import argparse
import dataclasses
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

from repa_eqx.alignment import IREPA, REG, AttentionDistillation, Dispersive
from repa_eqx.core.xla_flags import configure_xla_gpu
from repa_eqx.model.sit import SiTConfig
from repa_eqx.pretrained.dinov2 import Dinov2, Dinov2Config
from repa_eqx.pretrained.encoders import TargetEncoder
from repa_eqx.training.recipe import Recipe
from repa_eqx.training.step import StepConfig, init_state, make_optimizer, make_train_step

LATENT_CHANNELS, LATENT_SIZE, NUM_CLASSES = 4, 32, 1000
IMAGE_SIZE, TEACHER_RESOLUTION, PROJECTOR_DIM = 256, 224, 2048
METHODS = ("vanilla", "repa", "irepa", "haste", "reg", "dispersive")


def teacher(width: int, depth: int, heads: int) -> TargetEncoder:
    """A DINOv2 of the given shape, random weights, at 224 px (a 16x16 patch grid)."""
    config = Dinov2Config(
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        mlp_ratio=4.0,
        patch_size=14,
        image_size=TEACHER_RESOLUTION,
    )
    model = Dinov2(config, key=jax.random.key(1))
    return TargetEncoder(model, TEACHER_RESOLUTION, f"random DINOv2 ({width} wide, {depth} deep)")


def method_setup(
    name: str, config: SiTConfig, encoder: TargetEncoder
) -> tuple[SiTConfig, StepConfig, tuple[TargetEncoder, ...], object]:
    """(SiT config, step config, encoders in the step, alignment method) of one method."""
    base = StepConfig("linear", "uniform", 0.5, 0.9999, "fp32")
    depth = config.depth
    if name == "vanilla":
        return config, dataclasses.replace(base, proj_coeff=0.0), (), "repa"
    if name == "repa":
        return config, base, (encoder,), "repa"
    if name == "irepa":
        method = IREPA(kernel_size=3, alpha=0.6)
        return (
            config,
            dataclasses.replace(base, alignment=method, proj_coeff=1.0),
            (encoder,),
            method,
        )
    if name == "haste":
        blocks = tuple(b for b in (5, 6, 7, 8) if b <= depth) or (depth,)
        layers = tuple(range(encoder.num_layers - len(blocks) + 1, encoder.num_layers + 1))
        heads = min(config.num_heads, encoder.num_heads)
        distill = AttentionDistillation(blocks, layers, heads, 0.5)
        return config, dataclasses.replace(base, distillation=distill), (encoder,), "repa"
    if name == "reg":
        reg_config = dataclasses.replace(config, cls_dim=encoder.dim)
        reg_encoder = dataclasses.replace(encoder, cls_token=True)
        return reg_config, dataclasses.replace(base, reg=REG(0.03)), (reg_encoder,), "repa"
    if name == "dispersive":
        disp = Dispersive(depth, 0.25, 1.0, 0)
        return config, dataclasses.replace(base, proj_coeff=0.0, dispersive=disp), (), "repa"
    raise SystemExit(f"unknown method {name!r}: choose from {', '.join(METHODS)}")


def bench_method(name: str, model: str, encoder: TargetEncoder, args) -> dict:
    config = SiTConfig.from_name(
        f"SiT-{model}", input_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, num_classes=NUM_CLASSES
    )
    config, step_cfg, encoders, method = method_setup(name, config, encoder)
    optimizer = make_optimizer(Recipe())
    state = init_state(
        config, [e.dim for e in encoders], PROJECTOR_DIM, optimizer, 0, alignment=method
    )
    state_arrays, static_state = eqx.partition(state, eqx.is_array)
    enc_arrays, static_enc = eqx.partition(encoders, eqx.is_array)
    step_fn = make_train_step(optimizer, step_cfg, static_state, static_enc)
    rng = np.random.default_rng(0)
    batch = {
        "x": jnp.asarray(
            rng.standard_normal((args.batch, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)),
            jnp.float32,
        ),
        "y": jnp.asarray(rng.integers(0, NUM_CLASSES, args.batch), jnp.int32),
    }
    if encoders:
        shape = (args.batch, 3, IMAGE_SIZE, IMAGE_SIZE)
        batch["image"] = jnp.asarray(rng.integers(0, 256, shape), jnp.uint8)
    start = time.perf_counter()
    compiled = step_fn.lower(state_arrays, batch, enc_arrays).compile()
    compile_s = time.perf_counter() - start
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        state_arrays, metrics = compiled(state_arrays, batch, enc_arrays)
        jax.block_until_ready((state_arrays, metrics))
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise RuntimeError(f"{name}: non-finite loss {loss}")
    return {
        "method": name,
        "compile_s": compile_s,
        "step_s": statistics.median(times),
        "step_times_s": times,
        "loss": loss,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="B/2", help="SiT size: S/2, B/2, ...")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--teacher", default="768,12,12", help="teacher WIDTH,DEPTH,HEADS")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    configure_xla_gpu()  # before JAX starts its backend
    console = Console()
    width, depth, heads = (int(v) for v in args.teacher.split(","))
    encoder = teacher(width, depth, heads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    results = []
    for name in methods:
        console.print(f"[bold]{name}[/]: compiling and timing SiT-{args.model} ...")
        results.append(bench_method(name, args.model, encoder, args))
    repa = next((r["step_s"] for r in results if r["method"] == "repa"), None)
    table = Table(
        title=f"SiT-{args.model}, batch {args.batch}, fp32, teacher {encoder.name} in the step; "
        f"median of {args.steps} steps"
    )
    for col in ("method", "compile s", "s/step", "vs REPA"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in results:
        ratio = f"{r['step_s'] / repa:.2f}x" if repa else "n/a"
        table.add_row(r["method"], f"{r['compile_s']:.1f}", f"{r['step_s']:.2f}", ratio)
    console.print(table)
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    console.print(
        f"{cpu}, {len(os.sched_getaffinity(0))} cores, jax {jax.__version__} "
        f"({jax.default_backend()}), load average {os.getloadavg()[0]:.2f} at the end"
    )
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "results": results}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
