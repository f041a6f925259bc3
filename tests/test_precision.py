"""`train.precision = "auto"`: detection from CPU flags and devices, the recipes that use it,
and the resolved value recorded in a run."""

import dataclasses
import json
from pathlib import Path

import pytest
from helpers import tiny_recipe

from repa_eqx.training import precision as precision_mod
from repa_eqx.training.precision import cpu_flags, native_bf16, resolve_precision
from repa_eqx.training.recipe import load_recipe

pytestmark = pytest.mark.standard_promotion

RECIPES = Path(__file__).parent.parent / "recipes"

# Two logical CPUs of /proc/cpuinfo, as Linux writes them (flags trimmed).
_X86 = """processor\t: {n}
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw {extra}
bugs\t\t: spectre_v1

"""
_ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes bf16 i8mm\nCPU implementer\t: 0x41\n"


def _cpuinfo(extra: str) -> str:
    return _X86.format(n=0, extra=extra) + _X86.format(n=1, extra=extra)


@dataclasses.dataclass
class FakeDevice:
    platform: str
    compute_capability: str | None = None


def test_cpu_flags_are_read_from_every_flags_line():
    flags = cpu_flags(_cpuinfo("avx512_bf16 amx_tile"))
    assert {"avx512f", "avx512_bf16", "amx_tile"} <= flags and "spectre_v1" not in flags
    assert "bf16" in cpu_flags(_ARM) and cpu_flags("model name : x\n") == frozenset()


@pytest.mark.parametrize(
    "extra, native, why",
    [
        ("avx512_bf16", True, "CPU has avx512_bf16"),
        ("amx_bf16 amx_tile", True, "CPU has amx_bf16"),
        ("avx512_bf16 amx_bf16", True, "CPU has avx512_bf16 and amx_bf16"),
        ("avx512_vnni", False, "CPU has neither avx512_bf16 nor amx_bf16"),
    ],
)
def test_cpu_bf16_from_cpuinfo(extra, native, why):
    assert native_bf16(FakeDevice("cpu"), _cpuinfo(extra)) == (native, why)


def test_arm_cpus_and_unreadable_flags_stay_fp32(monkeypatch):
    assert native_bf16(FakeDevice("cpu"), _ARM)[0] is False
    monkeypatch.setattr(precision_mod.platform, "system", lambda: "Darwin")
    assert native_bf16(FakeDevice("cpu")) == (False, "no CPU flags to read on Darwin")


@pytest.mark.parametrize(
    "device, native",
    [
        (FakeDevice("gpu", "8.0"), True),  # A100
        (FakeDevice("gpu", "9.0"), True),  # H100
        (FakeDevice("gpu", "12.0"), True),
        (FakeDevice("gpu", "7.5"), False),  # T4
        (FakeDevice("gpu", "gfx90a"), False),  # a capability we cannot read: fp32
        (FakeDevice("gpu"), False),
        (FakeDevice("tpu"), True),
    ],
)
def test_accelerators(device, native):
    assert native_bf16(device)[0] is native


def test_resolve_says_why():
    assert resolve_precision("fp32") == ("fp32", "recipe")
    assert resolve_precision("bf16", FakeDevice("gpu", "7.0")) == ("bf16", "recipe")
    assert resolve_precision("auto", FakeDevice("gpu", "8.6")) == (
        "bf16",
        "auto: GPU compute capability 8.6 >= 8.0",
    )
    assert resolve_precision("auto", FakeDevice("gpu", "7.0")) == (
        "fp32",
        "auto: GPU compute capability 7.0 < 8.0",
    )
    assert resolve_precision("auto", FakeDevice("cpu"), _cpuinfo("avx2")) == (
        "fp32",
        "auto: CPU has neither avx512_bf16 nor amx_bf16",
    )


def test_imagenet_recipes_default_to_auto_and_mnist_ones_stay_fp32():
    for path in sorted(RECIPES.glob("*.toml")):
        imagenet = path.stem.startswith(("sit_", "dit_", "lightningdit_"))
        expected = "auto" if imagenet else "fp32"
        assert load_recipe(path).train.precision == expected, path.name


def test_the_run_records_the_resolved_precision(tmp_path, monkeypatch, capsys):
    """A run asked for "auto" writes down what it ran at, and says why in its log."""
    from repa_eqx.runs.export import export_run
    from repa_eqx.training.loop import train

    monkeypatch.setattr(precision_mod, "_read_cpuinfo", lambda: _cpuinfo("avx2"))
    recipe = tiny_recipe(
        tmp_path / "run", train={"steps": 2, "log_every": 2, "checkpoint_every": 2}
    )
    recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, precision="auto"))
    train(recipe, progress=False)
    assert "precision: fp32 (auto: CPU has neither avx512_bf16 nor amx_bf16)" in (
        capsys.readouterr().err
    )
    assert load_recipe(tmp_path / "run/recipe.toml").train.precision == "fp32"
    out = export_run(tmp_path / "run", tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"]["train"]["precision"] == "fp32"
    assert "- precision: fp32," in (out / "README.md").read_text()
