"""The bf16 REPA train step with each attention path, interleaved with eager PyTorch's.

    python benchmarks/bench_attention_step.py --models S/2,B/2 --rounds 5

For each SiT size the library's jitted bf16 step (bench_train_step.py's shape: 4x32x32
latents, 256 tokens, batch 8, 768-d targets, remat "dots") is compiled twice: with the
attention `nn.layers.multihead_attention` picks on this backend (on CPU the native bf16 path)
and with the einsum path forced (what every bf16 step ran before it). The two and PyTorch's
bf16 step (torch.autocast, SDPA) then run in turns, one step each per round, so load from
other processes falls on all three alike; the table gives median seconds per step and the
ratios PyTorch / ours and einsum / default.
"""

import argparse
import statistics
import time
from unittest import mock

import jax
import numpy as np
from bench_train_step import imagenet_config, lower_step, make_batch, step_config

from repa_eqx.nn import layers


def jax_step(model: str, force_einsum: bool):
    """A callable running one bf16 step (carrying its donated state on)."""
    config = imagenet_config(model)
    batch = make_batch(8, config)
    if force_einsum:
        with mock.patch.object(layers, "attention_implementation", lambda *a, **k: "einsum"):
            state, enc, lowered, _ = lower_step(config, step_config("bf16", "dots"), batch)
    else:
        state, enc, lowered, _ = lower_step(config, step_config("bf16", "dots"), batch)
    compiled = lowered.compile()
    holder = {"state": state}

    def run() -> float:
        out, metrics = compiled(holder["state"], batch, enc)
        jax.block_until_ready((out, metrics))
        holder["state"] = out
        return float(metrics["loss"])

    return run


def torch_step(model: str):
    import torch
    from torch_repa_step import REPASiT, REPAStep, architecture

    from repa_eqx.training.recipe import Recipe

    c = imagenet_config(model)
    optim = Recipe().optim
    torch.manual_seed(0)
    sit = REPASiT(
        **architecture(c),
        mlp_ratio=c.mlp_ratio,
        class_dropout_prob=c.class_dropout_prob,
        z_dim=768,
        projector_dim=2048,
    )
    step = REPAStep(
        sit,
        "bf16",
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        max_grad_norm=optim.max_grad_norm,
        ema_decay=0.9999,
        proj_coeff=0.5,
    )
    batch = make_batch(8, c)
    x, y, f = (
        torch.from_numpy(np.array(a)) for a in (batch["x"], batch["y"], batch["features"][0])
    )
    return lambda: step(x, y, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="S/2,B/2")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (median reported)")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}")
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        c = imagenet_config(model)
        name = layers.attention_implementation(
            "bfloat16", c.num_tokens, c.hidden_size // c.num_heads
        )
        runs = {
            f"ours ({name})": jax_step(model, force_einsum=False),
            "ours (einsum)": jax_step(model, force_einsum=True),
            "PyTorch": torch_step(model),
        }
        times = {k: [] for k in runs}
        for i in range(args.rounds + 1):  # round 0 warms up
            for label, run in runs.items():
                start = time.perf_counter()
                loss = run()
                if i:
                    times[label].append(time.perf_counter() - start)
                if not np.isfinite(loss):
                    raise RuntimeError(f"SiT-{model} {label}: non-finite loss {loss}")
        med = {k: statistics.median(v) for k, v in times.items()}
        torch_s = med["PyTorch"]
        print(f"SiT-{model} bf16, batch 8, {args.rounds} interleaved rounds (median s/step):")
        for label, s in med.items():
            spread = f"{min(times[label]):.2f}-{max(times[label]):.2f}"
            ratio = "" if label == "PyTorch" else f"  PyTorch / ours {torch_s / s:.2f}x"
            print(f"  {label:16s} {s:6.2f} s/step (range {spread}){ratio}")
        new, old = med[f"ours ({name})"], med["ours (einsum)"]
        print(f"  einsum / {name}: {old / new:.3f}x", flush=True)


if __name__ == "__main__":
    main()
