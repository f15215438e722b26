"""Executors: local worker processes, Ray, submitit (SLURM's local twin) each finish a 2x2 toy grid."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import store
from bench.api import BenchError
from bench.cli import main
from bench.executors import Settings, parse_minutes, run_ray, run_slurm

# NOT and OTCS on toy1d x seeds 0,1, with tiny networks and few steps
GRID = ["--methods", "not,otcs", "--task", "toy1d", "--seeds", "0,1", "--no-progress",
        "--opt", "not.steps=60", "--opt", "not.inner_steps=2", "--opt", "mlp_hidden=32",
        "--opt", "otcs.potential_hidden=32", "--opt", "otcs.ot_steps=60", "--opt", "otcs.steps=60",
        "--opt", "otcs.sde_steps=10", "--opt", "otcs.bound_pairs=64"]


def _bench(out: Path, *args: str, timeout: int = 600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "bench.cli", "run", *GRID, "--out", str(out), *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def _check_grid(out: Path, res) -> list[Path]:
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    rundirs = sorted(d for d in (out / "toy1d").glob("*/smoke-seed*") if d.is_dir() and d.suffix != ".slurm")
    assert [(d.parent.name, d.name.split("-")[1]) for d in rundirs] == [
        ("not", "seed0"), ("not", "seed1"), ("otcs", "seed0"), ("otcs", "seed1")]
    for d in rundirs:
        row = json.loads((d / "row.json").read_text())
        assert isinstance(row["w2"], float) and isinstance(row["lhs_w2"], float) and row["n_eval"] == 500
        starts = [r for r in store.read_jsonl(d / "log.jsonl") if r.get("event") == "fit_start"]
        assert len(starts) == 1
    assert "4 run(s): 4 run now" in res.stdout, res.stdout
    return rundirs


@pytest.mark.slow
def test_local_jobs(tmp_path):
    """--jobs 2: two spawned workers share a 2x2 grid (NOT/KNOT x 2 seeds on tiny-vectors: seconds)."""
    out = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BENCH_PLUGINS": "bench.testing"}
    cmd = [sys.executable, "-m", "bench.cli", "run", "--methods", "not,knot", "--task", "tiny-vectors", "--seeds", "0,1",
           "--opt", "steps=100", "--opt", "inner_steps=2", "--opt", "mlp_hidden=32", "--out", str(out), "--jobs", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0 and "4 run(s): 4 run now" in res.stdout, (res.stdout + res.stderr)[-3000:]
    rundirs = sorted(d for d in (out / "tiny-vectors").glob("*/smoke-seed*"))
    assert len(rundirs) == 4 and all((d / "row.json").exists() for d in rundirs)
    starts = [r for d in rundirs for r in store.read_jsonl(d / "log.jsonl") if r.get("event") == "fit_start"]
    assert len(starts) == 4 and len({r["pid"] for r in starts}) == 2, "two worker processes share the grid"
    assert os.getpid() not in {r["pid"] for r in starts}
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and "4 run(s): 4 finished before" in again.stdout, again.stdout


@pytest.mark.slow
def test_ray_executor(tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'otbench[ray]' to test --executor ray")
    out = tmp_path / "runs"
    rundirs = _check_grid(out, _bench(out, "--executor", "ray", "--ray-cpus", "1"))
    rows = [json.loads((d / "row.json").read_text()) for d in rundirs]
    assert all(r["device"] == "cpu" for r in rows)


@pytest.mark.slow
def test_slurm_executor_with_submitit_local(tmp_path):
    pytest.importorskip("submitit", reason="submitit is not installed: pip install 'otbench[slurm]'")
    out = tmp_path / "runs"
    res = _bench(out, "--executor", "slurm", "--slurm-local", "--slurm-time", "0:10:00")
    rundirs = _check_grid(out, res)
    for d in rundirs:  # logs beside the run directory
        logs = list(Path(f"{d}.slurm").rglob("*_log.out"))
        assert logs and "done " in "".join(p.read_text() for p in logs), list(Path(f"{d}.slurm").rglob("*"))
    assert res.stdout.count("submitted ") == 4


def test_missing_extras_name_the_install(tmp_path, monkeypatch, capsys):
    settings = Settings(out=tmp_path, data_root=tmp_path, cache_dir=tmp_path)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(BenchError, match=r"pip install 'otbench\[ray\]'"):
        run_ray([], settings)
    with pytest.raises(BenchError, match=r"pip install 'otbench\[slurm\]'"):
        run_slurm([], settings)
    with pytest.raises(SystemExit) as info:
        main(["run", "--methods", "identity", "--task", "toy1d", "--executor", "slurm", "--out", str(tmp_path)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert info.value.code == 2 and len(err) == 1 and "otbench[slurm]" in err[0], err


def test_parse_minutes():
    assert parse_minutes("90") == 90 and parse_minutes(5) == 5
    assert parse_minutes("1:30:00") == 90 and parse_minutes("1:30:01") == 91
    assert parse_minutes("2-00:00:00") == 2880 and parse_minutes("10:00") == 10
    with pytest.raises(BenchError, match="--slurm-time"):
        parse_minutes("soon")
