"""The library's XLA GPU flags (core.xla_flags): appended to XLA_FLAGS once, never over a flag
the user set, never silently too late, known to the installed jaxlib, set by the `repa` CLI."""

import os
import subprocess
import sys

import jax
import pytest
from typer.testing import CliRunner

from repa_eqx.core import xla_flags
from repa_eqx.core.xla_flags import GPU_FLAGS, configure_xla_gpu


@pytest.fixture
def no_backend(monkeypatch):
    """As in a fresh process, before JAX starts (this test process has started one)."""
    monkeypatch.setattr(xla_flags, "backend_started", lambda: False)


def test_flags_are_appended_once(no_backend):
    env = {}
    assert configure_xla_gpu(environ=env) == GPU_FLAGS
    assert env["XLA_FLAGS"] == " ".join(GPU_FLAGS)
    assert configure_xla_gpu(environ=env) == ()  # idempotent
    assert env["XLA_FLAGS"] == " ".join(GPU_FLAGS)
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in GPU_FLAGS


def test_flags_the_user_set_are_kept(no_backend):
    user = "--xla_dump_to=/tmp/x  --xla_gpu_enable_latency_hiding_scheduler=false"
    env = {"XLA_FLAGS": user}
    flags = ("--xla_gpu_enable_latency_hiding_scheduler=true", "--xla_gpu_foo=1")
    assert configure_xla_gpu(flags, environ=env) == ("--xla_gpu_foo=1",)
    assert env["XLA_FLAGS"].split() == [
        "--xla_dump_to=/tmp/x",
        "--xla_gpu_enable_latency_hiding_scheduler=false",  # the user's value wins
        "--xla_gpu_foo=1",
    ]


def test_too_late_says_so_and_changes_nothing():
    jax.devices()  # a backend is running in this process
    assert xla_flags.backend_started()
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    with pytest.warns(RuntimeWarning, match="XLA flags not applied .* backend already started"):
        assert configure_xla_gpu(environ=env) == ()
    assert env == {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    # Nothing to add: nothing to warn about.
    env = {"XLA_FLAGS": " ".join(GPU_FLAGS)}
    assert configure_xla_gpu(environ=env) == ()


def test_the_cli_sets_the_flags_before_a_command_runs(no_backend, monkeypatch, tmp_path):
    from repa_cli.main import app

    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    result = CliRunner().invoke(app, ["train", str(tmp_path / "nope.toml")])
    assert result.exit_code == 1  # the command ran (and failed on the missing recipe)
    assert os.environ["XLA_FLAGS"].split() == ["--xla_dump_to=/tmp/x", *GPU_FLAGS]


@pytest.mark.slow
def test_a_fresh_process_starts_jax_with_the_flags():
    """The flags are known to this jaxlib (XLA aborts on an unknown one), importing the
    library leaves them settable, and the CPU backend starts with them."""
    code = (
        "import os, repa_eqx, jax\n"
        "from repa_eqx.core.xla_flags import GPU_FLAGS, configure_xla_gpu\n"
        "assert configure_xla_gpu() == GPU_FLAGS\n"
        "print(jax.devices()[0].platform, os.environ['XLA_FLAGS'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["cpu", *GPU_FLAGS]
