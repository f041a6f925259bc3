"""The rooms of the package and the rules between them (ARCHITECTURE.md): imports run one
way, no import cycle, and importing the library touches no device and no plotting backend."""

import subprocess
import sys
from pathlib import Path

import grimp
import pytest

pytestmark = pytest.mark.standard_promotion
ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_hold():
    """The layers contract (and the private-module contracts) of pyproject.toml."""
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def _cycles(graph: grimp.ImportGraph, package: str) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), a package's own
    `__init__` importing its submodules excepted: that is how a namespace re-exports."""
    modules = sorted(m for m in graph.modules if m.startswith(package))

    def edges(m: str) -> list[str]:
        return sorted(
            n
            for n in graph.find_modules_directly_imported_by(m)
            if n.startswith(package) and not m.startswith(n + ".")
        )

    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for n in edges(m):
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on_stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            group = []
            while True:
                n = stack.pop()
                on_stack.discard(n)
                group.append(n)
                if n == m:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for m in modules:
        if m not in index:
            visit(m)
    return found


def test_no_import_cycle():
    graph = grimp.build_graph("repa_eqx", "repa_cli", include_external_packages=False)
    assert _cycles(graph, "repa_eqx") == []
    # The check can fail: a made-up cycle is found.
    graph.add_import(importer="repa_eqx.core.errors", imported="repa_eqx.core.files")
    graph.add_import(importer="repa_eqx.core.files", imported="repa_eqx.core.errors")
    assert ["repa_eqx.core.errors", "repa_eqx.core.files"] in _cycles(graph, "repa_eqx")


def test_importing_every_module_touches_no_device_and_no_matplotlib():
    """`repa train --distributed` calls jax.distributed.initialize after importing the
    library, so no import may start a backend; and a notebook's plots keep their backend."""
    code = (
        "import importlib, pkgutil, sys\n"
        "import repa_eqx\n"
        "assert 'matplotlib' not in sys.modules, 'import repa_eqx loaded matplotlib'\n"
        "for m in pkgutil.walk_packages(repa_eqx.__path__, 'repa_eqx.'):\n"
        "    importlib.import_module(m.name)\n"
        "import repa_cli.main\n"
        "assert 'matplotlib' not in sys.modules, 'a module loaded matplotlib at import'\n"
        "from jax._src import xla_bridge\n"
        "assert not xla_bridge._backends, 'a module touched a device at import'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_every_exception_of_the_package_is_a_repa_error():
    """The CLI turns exactly the `RepaError`s into one-line messages: every exception class
    the package defines must be one, or a user's mistake would end in a traceback."""
    import importlib
    import inspect
    import pkgutil

    import repa_eqx
    from repa_eqx.core.errors import RepaError

    defined = {}
    for info in pkgutil.walk_packages(repa_eqx.__path__, "repa_eqx."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == module.__name__
            ):
                defined[f"{module.__name__}.{name}"] = value
    assert len(defined) >= 18
    # Interrupts (Ctrl-C) stay KeyboardInterrupts; everything else is a RepaError.
    expected = (RepaError, KeyboardInterrupt)
    assert [name for name, cls in defined.items() if not issubclass(cls, expected)] == []
