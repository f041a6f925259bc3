"""Where our sampler's time goes: a `jax.profiler` trace of one compiled sampling run (SiT at the
ImageNet-256 latent shape, random weights), its XLA operations' time summed by kind:

- dense: the Linear products (`dot_general` of the blocks, embeddings and final layer);
- attention: the per-head products q.k and p.v (the einsums "qhd,khd->hqk", "hqk,khd->qhd");
- softmax / norms / elementwise: everything else, by the JAX operation named in its metadata;
- copies and transposes: layout changes XLA inserts (`copy`, `transpose`).

    python benchmarks/profile_sample.py --model B/2 --mode ode --steps 10 --batch 2 --precision fp32

The kinds come from each operation's `op_name` metadata in the compiled HLO (the JAX operation
it was lowered from); the times from the trace's per-operation events, summed over all steps.
"""

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time

import equinox as eqx
import jax
import jax.numpy as jnp

from repa_eqx.model.sit import SiT, SiTConfig
from repa_eqx.sampling.samples import SamplerSpec, example_inputs, sample_jit

KINDS = (  # first match wins, on the HLO op's metadata op_name
    ("attention", re.compile(r"hqk|khd->|->hqk")),
    ("dense", re.compile(r"dot_general|matmul|conv")),
    ("softmax", re.compile(r"softmax|reduce_max|exp")),
    ("layer norm", re.compile(r"rsqrt|reduce_sum|mean|square")),
    ("gelu / silu", re.compile(r"tanh|logistic|gelu|silu")),
    ("copy / transpose", re.compile(r"transpose|copy|squeeze|reshape|concatenate|slice")),
)


def op_kinds(hlo: str) -> tuple[dict[str, str], dict[str, str]]:
    """HLO instruction name -> (kind, from its metadata op_name), and -> op_name."""
    kinds, names = {}, {}
    for line in hlo.splitlines():
        match = re.match(r"\s*(?:ROOT )?%(\S+) = .*?op_name=\"([^\"]*)\"", line)
        if match:
            name, op_name = match.groups()
            tail = op_name.rsplit("/", 1)[-1]
            kind = next((k for k, pattern in KINDS if pattern.search(tail)), "other elementwise")
            if KINDS[0][1].search(op_name):  # inside the attention einsums' own ops
                kind = "attention"
            names[name] = op_name
            if name.startswith(("copy", "transpose")):
                kind = "copy / transpose"
            kinds[name] = kind
    return kinds, names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="B/2")
    parser.add_argument("--mode", default="ode", choices=("ode", "sde"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--top", type=int, default=12, help="also list the slowest operations")
    args = parser.parse_args()

    config = SiTConfig.from_name(f"SiT-{args.model}", input_size=32, in_channels=4)
    sit = SiT(config, key=jax.random.key(0))
    dtype = jnp.bfloat16 if args.precision == "bf16" else jnp.float32
    sit = jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, sit)
    spec = SamplerSpec(args.mode, args.steps, cfg_scale=1.8, interval=(0.0, 0.7))
    noise, keys = example_inputs(0, jnp.arange(args.batch), (4, 32, 32))
    labels = jnp.arange(args.batch, dtype=jnp.int32)
    hlo = sample_jit.lower(sit, spec, noise, labels, keys).compile().compiled.as_text()
    kinds, op_names = op_kinds(hlo)
    jax.block_until_ready(sample_jit(sit, spec, noise, labels, keys))

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            jax.block_until_ready(sample_jit(sit, spec, noise, labels, keys))
        wall = time.perf_counter() - start
        (path,) = glob.glob(f"{folder}/**/perfetto_trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    by_kind, by_op = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in kinds:
            by_kind[kinds[e["name"]]] += e["dur"] / 1e6
            by_op[e["name"]] += e["dur"] / 1e6
    total = sum(by_kind.values())
    print(
        f"SiT-{args.model} {spec.name} {args.precision}, batch {args.batch}: {wall:.2f} s "
        f"traced wall time, {total:.2f} s in XLA operations"
    )
    for kind, seconds in by_kind.most_common():
        print(f"  {kind:18s} {seconds:8.3f} s  {100 * seconds / total:5.1f} %")
    print(f"slowest {args.top} operations:")
    for name, seconds in by_op.most_common(args.top):
        where = op_names[name].removeprefix("jit(sample)/")[-70:]
        print(f"  {seconds:8.3f} s  {kinds[name]:18s} {name:28s} {where}")


if __name__ == "__main__":
    main()
