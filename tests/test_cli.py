"""CLI: bad option values are one line (exit 2); a diverged run is a failure (exit 1), never a row."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench import store


def _bench(*args: str):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("args,needles", [
    (["--methods", "not", "--task", "toy1d", "--opt", "not.map_lr=abc"], ["map_lr", "'abc'", "a number"]),
    (["--methods", "not", "--task", "toy1d", "--opt", "steps=1.5"], ["steps", "1.5", "an integer"]),
    (["--methods", "identity", "--task", "digits", "--task-opt", "prep=bogus"], ["prep", "'bogus'", "one of"]),
    (["--methods", "identity", "--task", "toy1d", "--task-opt", "nope=1"], ["task 'toy1d'", "no option", "nope"]),
    (["--methods", "identity", "--task", "toy1d", "--task-opt", "novalue"], ["--task-opt", "KEY=VALUE"]),
])
def test_bad_option_values_are_one_line(tmp_path, args, needles):
    res = _bench("run", *args, "--out", str(tmp_path / "runs"))
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not (tmp_path / "runs" / "toy1d").exists() and not (tmp_path / "runs" / "digits").exists()


@pytest.mark.slow
def test_diverged_run_fails_and_stays_failed_until_retried(tmp_path):
    out = tmp_path / "runs"
    args = ["run", "--methods", "not", "--task", "toy1d", "--out", str(out), "--no-progress",
            "--opt", "not.map_lr=1e4", "--opt", "not.critic_lr=1e4", "--opt", "steps=40", "--opt", "log_every=5", "--opt", "mlp_hidden=32"]
    res = _bench(*args)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "failed not on toy1d (seed 0, smoke): training diverged" in res.stdout and "saddle step" in res.stdout
    assert "Traceback" not in res.stderr
    (rundir,) = (out / "toy1d" / "not").glob("smoke-seed0-*")
    assert not (rundir / "row.json").exists()
    failed = json.loads((rundir / "failed.json").read_text())
    assert failed["stage"] == "saddle" and failed["options"]["map_lr"] == 1e4
    res = _bench(*args)  # not finished, not silently skipped, not trained again
    assert res.returncode == 1 and "failed earlier" in res.stdout and "--retry-failed" in res.stdout
    starts = lambda: [r for r in store.read_jsonl(rundir / "log.jsonl") if r.get("event") == "fit_start"]  # noqa: E731
    assert len(starts()) == 1
    res = _bench("status", "--task", "toy1d", "--out", str(out))
    assert res.returncode == 0 and " failed " in res.stdout and "training diverged" in res.stdout, res.stdout
    res = _bench(*args, "--retry-failed")
    assert res.returncode == 1 and len(starts()) == 2 and starts()[-1]["resume"] == {}
