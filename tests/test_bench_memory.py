"""`just bench --memory` (benchmarks/bench_train_step.py) without SiT-XL/2: the largest-batch
search on known peaks, and the memory fields read from a small compiled program."""

import importlib.util
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

ROOT = Path(__file__).parents[1]
_spec = importlib.util.spec_from_file_location(
    "bench_train_step", ROOT / "benchmarks/bench_train_step.py"
)
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_train_step"] = bench
_spec.loader.exec_module(bench)


def _counted(peak):
    calls = []

    def peak_at(b):
        calls.append(b)
        return peak(b)

    return peak_at, calls


@pytest.mark.parametrize("limit", [100.0, 1000.0, 80e9])
def test_largest_batch_of_an_affine_peak_takes_four_measurements(limit):
    fixed, per_example = 11e6 if limit > 1e9 else 7.0, 2.3e8 if limit > 1e9 else 0.9
    peak_at, calls = _counted(lambda b: fixed + per_example * b)
    b, confirmed = bench.largest_batch(peak_at, limit, start=(32, 64))
    assert confirmed and b == math.floor((limit - fixed) / per_example)
    assert fixed + per_example * b <= limit < fixed + per_example * (b + 1)
    assert sorted(calls) == sorted({32, 64, b, b + 1})  # each batch measured once


def test_largest_batch_corrects_a_line_that_misses():
    """Buffer assignment is not exactly affine: a jump past batch 40 moves the answer."""
    peak = lambda b: 10.0 + b + (30.0 if b > 40 else 0.0)  # noqa: E731
    b, confirmed = bench.largest_batch(peak, 100.0, start=(32, 64))
    assert confirmed and peak(b) <= 100.0 < peak(b + 1) and b == 60


def test_largest_batch_when_nothing_fits_and_when_memory_does_not_grow():
    assert bench.largest_batch(lambda b: 50.0 + b, 10.0) == (0, True)
    with pytest.raises(RuntimeError, match="does not grow"):
        bench.largest_batch(lambda b: 5.0, 10.0)


def test_compiled_memory_reads_the_fields_and_counts_donated_buffers_once():
    step = jax.jit(lambda a, b: (a @ b, a * 2), donate_argnums=0)
    a = b = jax.ShapeDtypeStruct((256, 256), jnp.float32)
    memory = bench.compiled_memory(step.lower(a, b).compile())
    mib = 256 * 256 * 4
    assert memory["argument"] == 2 * mib and memory["alias"] == mib
    assert memory["output"] >= 2 * mib
    assert memory["peak"] == memory["argument"] + memory["output"] + memory["temp"] - mib
    assert set(memory) == {"argument", "output", "temp", "alias", "peak", "xla_peak"}
