"""Packaging: bench.methods / bench.datasets import from editable and wheel installs (never a
top-level `datasets`), and a third-party plugin package is found through its entry point and
runs through `bench run` without any edit of the engine."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _py(code: str, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=600)


def test_editable_install_imports(tmp_path):
    res = _py("import bench.methods, bench.datasets, bench.methods.reference as r; "
              "print(bench.methods.__file__); print(r.Identity.name)", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "identity" in res.stdout


def test_no_top_level_datasets_package(tmp_path):
    """Outside the checkout, `datasets` / `methods` are not ours (HF's `datasets` stays importable)."""
    res = _py("import importlib.util as u, bench.datasets as b; "
              "s = u.find_spec('datasets'); m = u.find_spec('methods'); "
              "print(b.__name__, None if s is None else s.origin, None if m is None else m.origin)", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    name, ds, ms = res.stdout.split()
    assert name == "bench.datasets"
    assert str(REPO) not in ds and str(REPO) not in ms, res.stdout


@pytest.mark.slow
def test_wheel_install_imports(tmp_path):
    wheel_dir = tmp_path / "wheel"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(wheel_dir), str(REPO)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    wheel = next(wheel_dir.glob("otbench-*.whl"))
    import zipfile
    names = zipfile.ZipFile(wheel).namelist()
    assert "bench/methods/reference.py" in names and "bench/datasets/__init__.py" in names
    assert not any(n.startswith(("datasets/", "methods/")) for n in names)
    # the pinned digits judge ships with the package (Acc scored by the same network on every machine)
    from bench.datasets.digits import JUDGES
    for f in sorted(JUDGES.iterdir()):
        assert f"bench/datasets/judges/{f.name}" in names, f.name
    assert "bench/datasets/otcs_table1.csv" in names  # the built-in tasks' paper values are read from it
    target = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                          str(wheel)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    res = _py("import bench, bench.methods.reference, bench.datasets; print(bench.__file__); "
              "from bench.registry import methods; print(sorted(methods()))",
              env={"PYTHONPATH": str(target)}, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert str(target) in res.stdout.splitlines()[0], "the wheel's copy must be the one imported"
    assert "identity" in res.stdout


def _readme_blocks(lang: str) -> str:
    """The first ```lang block under "## Adding a baseline" in the README."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Adding a baseline"):]
    start = section.index(f"```{lang}\n") + len(lang) + 4
    return section[start:section.index("```", start)]


@pytest.mark.slow
def test_third_party_plugin_package_runs_through_bench_run(tmp_path):
    # exactly the README's example: a newcomer copies these two blocks
    pkg = tmp_path / "plugin"
    (pkg / "my_baseline").mkdir(parents=True)
    (pkg / "my_baseline" / "__init__.py").write_text(_readme_blocks("python"))
    (pkg / "pyproject.toml").write_text(_readme_blocks("toml"))
    target = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
                          "--target", str(target), str(pkg)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    env = {**os.environ, "PYTHONPATH": str(target), "BENCH_PLUGINS": "bench.testing"}
    out = tmp_path / "runs"
    listed = subprocess.run([sys.executable, "-m", "bench.cli", "list", "--methods"], capture_output=True,
                            text=True, env=env, timeout=300)
    assert "linear-map" in listed.stdout and "matches each coordinate" in listed.stdout
    res = subprocess.run([sys.executable, "-m", "bench.cli", "run", "--methods", "linear-map,identity",
                          "--task", "tiny-vectors", "--out", str(out), "--no-progress"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert len(list((out / "tiny-vectors/linear-map").glob("smoke-seed0-*/row.json"))) == 1
    table = subprocess.run([sys.executable, "-m", "bench.cli", "table", "--task", "tiny-vectors", "--out", str(out)],
                           capture_output=True, text=True, env=env, timeout=300)
    assert "linear-map" in table.stdout
