"""The XLA flags this library runs with on GPU, in one place: `configure_xla_gpu` adds them to
the `XLA_FLAGS` environment variable, which XLA reads once, when JAX starts its first backend.
The `repa` command calls it before anything touches a device, and so do the benchmarks.

The flags (JAX's "GPU performance tips", NVIDIA's JAX-Toolbox images set the same default):

- `--xla_gpu_enable_latency_hiding_scheduler=true`: XLA schedules the program so that
  asynchronous work, above all the gradient all-reduce of data-parallel training over several
  GPUs, overlaps with the compute kernels. It changes the order of the kernels, never a result,
  and does nothing on CPU.

Left out on purpose: `--xla_gpu_triton_gemm_any` (lets the autotuner pick Triton for every
matmul: longer compiles, a gain or a loss by model, unmeasured here) and the flags of the
collectives' combiners and of multi-host communication, whose best values depend on the
cluster.

XLA aborts the process on a flag it does not know (`Unknown flag in XLA_FLAGS`); the tests
start a backend with these flags, so a jaxlib that dropped one fails there first.

Importing this module imports no JAX and starts nothing.
"""

import os
import sys
import warnings
from collections.abc import MutableMapping, Sequence

GPU_FLAGS: tuple[str, ...] = ("--xla_gpu_enable_latency_hiding_scheduler=true",)


def flag_name(flag: str) -> str:
    """`--xla_foo=bar` -> `--xla_foo` (a bare `--xla_foo` is its own name)."""
    return flag.split("=", 1)[0]


def backend_started() -> bool:
    """Whether JAX has started a backend in this process (and so has read `XLA_FLAGS`). JAX
    not yet imported means no backend: this never imports it."""
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge  # no public API tells this in jax 0.10

    return xla_bridge.backends_are_initialized()


def configure_xla_gpu(
    flags: Sequence[str] = GPU_FLAGS, environ: MutableMapping[str, str] | None = None
) -> tuple[str, ...]:
    """Append to `XLA_FLAGS` each of `flags` the user has not set already (a flag the user set
    keeps the user's value). Returns the flags appended: none on a second call.

    Once a JAX backend has started, XLA has read its flags and a change would have no effect:
    then nothing is changed, and a `RuntimeWarning` says so."""
    environ = os.environ if environ is None else environ
    present = {flag_name(f) for f in environ.get("XLA_FLAGS", "").split()}
    missing = tuple(f for f in flags if flag_name(f) not in present)
    if not missing:
        return ()
    if backend_started():
        warnings.warn(
            f"XLA flags not applied ({' '.join(missing)}): a JAX backend already started in "
            "this process; set XLA_FLAGS before JAX starts",
            RuntimeWarning,
            stacklevel=2,
        )
        return ()
    environ["XLA_FLAGS"] = " ".join([environ.get("XLA_FLAGS", "").strip(), *missing]).strip()
    return missing
