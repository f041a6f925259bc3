"""What `train.precision = "auto"` means on this machine: bf16 where the hardware multiplies
bf16 natively, else fp32.

- CPU: bf16 iff the CPU flags (Linux: /proc/cpuinfo) show `avx512_bf16` or `amx_bf16`, the
  instructions XLA:CPU's bf16 kernels use; elsewhere (other OSes, other flags) fp32: emulated
  bf16 products are slower than float32 ones.
- GPU: bf16 iff the device's compute capability is 8.0 or more (Ampere on): tensor cores
  multiply bf16 there. A device that reports none it can parse (e.g. ROCm) gets fp32.
- TPU: bf16, its native matmul type.

The resolved value is what a run records (recipe.toml, config, model card), so "auto" never
reaches the step and a resumed run on other hardware is refused as a changed recipe.
"""

import platform
from pathlib import Path

# The x86 CPU flags of native bf16 products (AVX512-BF16 dot products, AMX tiles).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
_CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The flags listed in /proc/cpuinfo text (x86 "flags", ARM "Features"), of every CPU."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def _read_cpuinfo() -> str | None:
    if platform.system() != "Linux":
        return None
    try:
        return _CPUINFO.read_text()
    except OSError:
        return None


def native_bf16(device, cpuinfo: str | None = None) -> tuple[bool, str]:
    """Whether `device` (a jax Device) multiplies bf16 natively, and why, in a few words.
    `cpuinfo`: /proc/cpuinfo's text (read from the machine when None)."""
    kind = device.platform
    if kind == "tpu":
        return True, "TPU"
    if kind == "cpu":
        text = _read_cpuinfo() if cpuinfo is None else cpuinfo
        if text is None:
            return False, f"no CPU flags to read on {platform.system() or 'this OS'}"
        has = [f for f in BF16_CPU_FLAGS if f in cpu_flags(text)]
        if has:
            return True, f"CPU has {' and '.join(has)}"
        return False, f"CPU has neither {' nor '.join(BF16_CPU_FLAGS)}"
    capability = getattr(device, "compute_capability", None)
    try:
        major, minor = (int(part) for part in str(capability).split(".")[:2])
    except ValueError:
        return False, f"{kind} device without a known compute capability ({capability!r})"
    name = f"{kind.upper()} compute capability {major}.{minor}"
    return (major, minor) >= (8, 0), f"{name} {'>=' if major >= 8 else '<'} 8.0"


def resolve_precision(requested: str, device=None, cpuinfo: str | None = None) -> tuple[str, str]:
    """(`"fp32"` or `"bf16"`, why) for a recipe's `train.precision`; "auto" asks the hardware
    (`device`: default the first jax device)."""
    if requested != "auto":
        return requested, "recipe"
    if device is None:
        import jax

        device = jax.devices()[0]
    native, why = native_bf16(device, cpuinfo)
    return ("bf16" if native else "fp32"), f"auto: {why}"
