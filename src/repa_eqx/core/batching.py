"""Running a compiled function over many examples on the host, a fixed-size batch at a time."""

import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from .progress import progress_bar


def map_batches(
    fn: Callable[..., Any],
    *inputs: np.ndarray,
    batch_size: int,
    label: str = "",
    progress: bool = False,
    console=None,
    unit: str = "img",
) -> Any:
    """`fn(*batch)` over `inputs` (arrays sharing their leading axis N) in batches of
    `batch_size`, returned as NumPy arrays (any pytree of them) concatenated over the batches.

    The last batch is padded to the full size by repeating the last example, so every call
    has one shape and `fn` compiles once; the padding's outputs are dropped. `fn` must treat
    examples independently (a vmapped network does)."""
    num = len(inputs[0])
    if num == 0:
        raise ValueError("no examples")
    if any(len(x) != num for x in inputs):
        raise ValueError(f"inputs of different lengths: {[len(x) for x in inputs]}")
    batch_size = min(batch_size, num)
    parts = []
    bar = progress_bar(label, console=console, disable=not progress, info=False)
    with bar:
        task = bar.add_task(label, total=num, rate="")
        start = time.perf_counter()
        for lo in range(0, num, batch_size):
            idx = np.minimum(np.arange(lo, lo + batch_size), num - 1)
            out = fn(*(x[idx] for x in inputs))
            parts.append(jax.tree.map(lambda a, lo=lo: np.asarray(a)[: num - lo], out))
            done = min(lo + batch_size, num)
            rate = done / max(time.perf_counter() - start, 1e-9)
            bar.update(task, completed=done, rate=f"{rate:.2f} {unit}/s")
    return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
