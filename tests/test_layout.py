"""The layout the architecture promises: the public API, and an import graph without cycles, without an engine
module that imports a plugin, and without a plugin that imports another plugin."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import bench
from bench.registry import methods, tasks

ROOT = Path(__file__).resolve().parents[1]
# folder -> the package it is installed as (pyproject.toml maps methods/ and datasets/ under bench)
PACKAGES = {"bench": "bench", "methods": "bench.methods", "datasets": "bench.datasets"}
# the only modules allowed to import project modules inside a function, and why: both stay free of torch so that
# `bench --help` and a bad flag answer at once (bench/__init__.py resolves its public names on first use)
LAZY_OK = {"bench.cli", "bench.data", "bench"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """(imported project module, at module level) for every import statement of ``path``."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = {id(n) for n in tree.body} | {id(n) for b in tree.body if isinstance(b, (ast.If, ast.Try))
                                        for n in ast.walk(b)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found += [(t, id(node) in top) for t in targets if t in known]
    return found


@pytest.fixture(scope="module")
def graph():
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _plugin_modules() -> set[str]:
    return {cls.__module__ for cls in [*methods().values(), *tasks().values()]
            if cls.__module__.startswith(("bench.methods.", "bench.datasets."))}


def test_the_public_api_names_what_a_plugin_needs():
    for name in ("Method", "Task", "Option", "Metric", "TaskData", "FitContext", "DataFile", "BenchError",
                 "register_method", "register_task", "UNPAIRED", "SEMI_PAIRED"):
        assert name in bench.__all__ and getattr(bench, name) is not None, name
    from bench.api import Method
    from bench.context import FitContext
    assert bench.Method is Method and bench.FitContext is FitContext
    with pytest.raises(AttributeError):
        bench.NoSuchThing  # noqa: B018


def test_no_import_cycle(graph):
    edges = {m: {t for t, _ in deps if t != m} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])


def test_the_engine_imports_no_plugin_and_no_plugin_imports_another(graph):
    plugins = _plugin_modules()
    assert {"bench.methods.not_", "bench.datasets.digits"} <= plugins
    for m, deps in graph.items():
        for t, _ in deps:
            if not m.startswith(("bench.methods", "bench.datasets")):
                assert not t.startswith(("bench.methods", "bench.datasets")), f"engine module {m} imports {t}"
            if m in plugins and t in plugins and t != m:
                raise AssertionError(f"plugin {m} imports plugin {t}")


def test_function_level_imports_only_where_startup_time_needs_them(graph):
    inner = sorted({(m, t) for m, deps in graph.items() for t, at_top in deps if not at_top and m not in LAZY_OK})
    assert not inner, f"imports inside functions (move them to the top of the module): {inner}"
