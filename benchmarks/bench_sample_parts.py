"""Where a sampling step's time goes: one SiT forward at the sampler's batch, ours (jitted, the
library's SiT) and the reference's (eager PyTorch, torch_repa_step's SiT), whole and by part,
in one run with the same shapes:

- forward: the whole network on (batch, 4, 32, 32) latents;
- dense: the products of one block (qkv, proj, fc1, fc2 on batch x 256 tokens), times depth;
- attention: one block's softmax attention (SDPA for torch), times depth;
- rest: forward - dense - attention (layer norms, modulation, GELU, embeddings, final layer).

    python benchmarks/bench_sample_parts.py --model B/2 --batch 4 --precisions fp32,bf16

A guided step runs the doubled batch: with the sampler's batch 2, guided steps run batch 4.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from repa_eqx.model.sit import SiT, SiTConfig
from repa_eqx.nn.layers import dense, lay_out_for_lowp, multihead_attention

sys.path.insert(0, str(Path(__file__).parent))
from torch_repa_step import REPASiT  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours(config: SiTConfig, batch: int, precision: str, repeats: int) -> dict:
    dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    sit = SiT(config, key=jax.random.key(0))
    sit = jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, sit)
    sit = lay_out_for_lowp(sit)
    x = jax.random.normal(jax.random.key(1), (batch, 4, 32, 32))
    t = jnp.full((batch,), 0.5)
    y = jnp.arange(batch, dtype=jnp.int32)
    forward = eqx.filter_jit(lambda s, x, t, y: jax.vmap(lambda *a: s(*a)[0])(x, t, y))
    block = jax.tree.map(lambda a: a[0] if eqx.is_array(a) else a, sit.blocks)
    h = jax.random.normal(jax.random.key(2), (batch, config.num_tokens, config.hidden_size), dtype)

    @eqx.filter_jit
    def products(block, h):
        qkv = dense(block.qkv, h)
        out = dense(block.proj, qkv[..., : h.shape[-1]])
        return dense(block.fc2, dense(block.fc1, out)), qkv

    heads, hd = config.num_heads, config.hidden_size // config.num_heads
    q = h.reshape(batch, config.num_tokens, heads, hd)
    attention = jax.jit(jax.vmap(multihead_attention))
    return {
        "forward": median_seconds(lambda: forward(sit, x, t, y), repeats),
        "dense": config.depth * median_seconds(lambda: products(block, h), repeats),
        "attention": config.depth * median_seconds(lambda: attention(q, q, q), repeats),
    }


def reference(config: SiTConfig, batch: int, precision: str, repeats: int) -> dict:
    c = config
    sit = REPASiT(
        depth=c.depth,
        hidden_size=c.hidden_size,
        num_heads=c.num_heads,
        encoder_depth=c.encoder_depth,
        input_size=c.input_size,
        in_channels=c.in_channels,
    ).eval()
    x = torch.randn(batch, 4, 32, 32)
    t = torch.full((batch,), 0.5)
    y = torch.arange(batch)
    h = torch.randn(batch, c.num_tokens, c.hidden_size)
    block = sit.blocks[0]
    heads, hd = c.num_heads, c.hidden_size // c.num_heads
    q = h.reshape(batch, c.num_tokens, heads, hd).transpose(1, 2)

    def run(fn):
        def call():
            with torch.no_grad():
                if precision == "fp32":
                    return fn()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return fn()

        return call

    def products():
        qkv = block.qkv(h)
        out = block.proj(qkv[..., : h.shape[-1]])
        return block.fc2(block.fc1(out))

    return {
        "forward": median_seconds(run(lambda: sit(x, t, y, project=False)), repeats),
        "dense": c.depth * median_seconds(run(products), repeats),
        "attention": c.depth
        * median_seconds(run(lambda: F.scaled_dot_product_attention(q, q, q)), repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="B/2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = SiTConfig.from_name(f"SiT-{args.model}", input_size=32, in_channels=4)
    table = Table(title=f"one SiT-{args.model} forward, batch {args.batch} (seconds, median)")
    for h in ("precision", "part", "ours s", "reference s", "ours / reference"):
        table.add_column(h, justify="left" if h in ("precision", "part") else "right")
    for precision in args.precisions.split(","):
        a = ours(config, args.batch, precision, args.repeats)
        b = reference(config, args.batch, precision, args.repeats)
        for r in (a, b):
            r["rest"] = r["forward"] - r["dense"] - r["attention"]
        for part in ("forward", "dense", "attention", "rest"):
            table.add_row(
                precision, part, f"{a[part]:.3f}", f"{b[part]:.3f}", f"{a[part] / b[part]:.2f}"
            )
    Console(width=100).print(table)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; jax {jax.__version__}")
    assert np.isfinite(a["forward"])


if __name__ == "__main__":
    main()
