"""Fault injection on toy tasks: kill -9 and resume, damaged files, stale and contended locks.

Everything here runs the real CLI in subprocesses with one torch thread, on toy1d with tiny
option settings, so that each run takes seconds on a 2-core machine.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import store
from bench.locks import holder
from bench.runner import RunSpec, run_one

# NOT on toy1d, sized so that fitting takes ~2-3 s at one thread and checkpoints every 0.1 s
NOT_OPTS = {"toy_steps": 500, "inner_steps": 3, "mlp_hidden": 32, "log_every": 25}
METRICS = ("mean_at_minus4", "w2", "lhs_w2", "plan_w2")


def _env(extra=None):
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(extra or {})}


def _cmd(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "bench.cli", "run", "--task", "toy1d", "--out", str(out), "--no-progress", *args]


def _not_cmd(out: Path, *extra: str) -> list[str]:
    opts = [a for k, v in NOT_OPTS.items() for a in ("--opt", f"{k}={v}")]
    return _cmd(out, "--methods", "not", *opts, "--checkpoint-every", "0.1", *extra)


def _not_dir(out: Path) -> Path:
    return RunSpec("not", "toy1d", 0, "smoke", dict(NOT_OPTS)).directory(out)


def _events(rundir: Path, name: str) -> list[dict]:
    return [r for r in store.read_jsonl(rundir / "log.jsonl") if r.get("event") == name]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted NOT run: its row, and its wall time."""
    out = tmp_path_factory.mktemp("ref") / "runs"
    t0 = time.monotonic()
    res = subprocess.run(_not_cmd(out), capture_output=True, text=True, env=_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    row = json.loads((_not_dir(out) / "row.json").read_text())
    return row, time.monotonic() - t0


def _inode(path: Path):
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def test_kill_9_at_random_points_then_resume_gives_the_same_row(tmp_path, reference):
    """Ten kill -9 at random points (start-up, training, transport, scoring, writing), then a resume.

    The resumed row equals the uninterrupted one bitwise: the checkpoint holds the networks, both
    Adam states, the saddle trainer's random generator and the loop position, each loop step is
    deterministic on one CPU thread, and transport/scoring use generators seeded from the run's
    seed; so a resume repeats the exact arithmetic of the uninterrupted run.
    """
    ref_row, _ = reference
    out = tmp_path / "runs"
    rundir = _not_dir(out)
    rng = random.Random(20261125)
    phases = []
    for attempt in range(10):
        config_before = _inode(rundir / "config.json")
        proc = subprocess.Popen(_not_cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
        try:
            if rng.random() < 0.2:  # somewhere in start-up, before the run directory is touched
                time.sleep(rng.uniform(0.2, 2.0))
            else:  # once this attempt has taken the lock and written config.json: a random point of the work
                deadline = time.monotonic() + 60
                while _inode(rundir / "config.json") == config_before and proc.poll() is None:
                    assert time.monotonic() < deadline, "the run never started"
                    time.sleep(0.02)
                time.sleep(rng.uniform(0.0, 1.5))
            if proc.poll() is None:
                ckpt = store.torch_load(rundir / "checkpoint.pt")["progress"] if (rundir / "checkpoint.pt").exists() else {}
                phases.append("samples stored" if (rundir / "samples.pt").exists() else f"fit at {ckpt}")
                os.kill(proc.pid, signal.SIGKILL)
            else:
                phases.append(f"exited {proc.returncode}")
        finally:
            proc.wait(timeout=60)
    killed = [p for p in phases if not p.startswith("exited")]
    assert len(killed) >= 8, phases
    assert not (rundir / "row.json").exists() or len(killed) < 10, phases
    res = subprocess.run(_not_cmd(out), capture_output=True, text=True, env=_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    row = json.loads((rundir / "row.json").read_text())
    for key in METRICS:
        assert row.get(key) == ref_row.get(key), (key, row.get(key), ref_row.get(key), phases)
    assert isinstance(row["w2"], float) and isinstance(row["lhs_w2"], float)
    assert row["options"] == ref_row["options"]
    starts = _events(rundir, "fit_start")
    assert any(s["resume"] for s in starts), f"no session resumed from a checkpoint: {phases}"
    assert not list(rundir.glob(".*.tmp")) and not list(rundir.glob("*.corrupt")), list(rundir.iterdir())
    assert holder(rundir) is None, "a killed holder's lock must not outlive it"
    print("kill points:", phases)


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_row_samples_and_checkpoint_are_detected_and_recovered(tmp_path, one_thread):
    spec = RunSpec("not", "toy1d", 0, "smoke", dict(NOT_OPTS, toy_steps=150))
    out = tmp_path / "runs"
    warnings: list[str] = []

    def go():
        return run_one(spec, out=out, data_root=tmp_path, cache_dir=tmp_path / "cache", device="cpu",
                       progress=False, checkpoint_every=0.0, log=lambda *_: None, warn=warnings.append)

    ref = go()
    rundir = spec.directory(out)

    def same(row):
        return all(row.get(k) == ref.get(k) for k in METRICS)

    _truncate(rundir / "row.json")  # -> re-scored from the stored samples, no training
    assert same(go()) and len(_events(rundir, "fit_start")) == 1
    assert "row.json is unreadable" in warnings[-1] and (rundir / "row.json.corrupt").exists()

    (rundir / "row.json").unlink()
    stale = rundir / ".checkpoint.pt.k1lled.tmp"  # what a SIGKILL between mkstemp and os.replace leaves
    stale.write_bytes(b"half a checkpoint")
    _truncate(rundir / "samples.pt")  # -> transported again from the final checkpoint
    assert same(go())
    assert "samples.pt is unreadable" in warnings[-1] and "transporting again" in warnings[-1]
    assert _events(rundir, "fit_start")[-1]["resume"] == {"saddle": 150}, "re-transport must not retrain"
    assert not stale.exists(), "a resumed run removes the temporaries of a killed writer"

    (rundir / "row.json").unlink()
    _truncate(rundir / "checkpoint.pt")  # -> trained again from scratch (its samples are discarded)
    assert same(go())
    assert "checkpoint.pt is unreadable" in warnings[-1] and "from scratch" in warnings[-1]
    assert _events(rundir, "fit_start")[-1]["resume"] == {}
    assert all(len(w.splitlines()) == 1 for w in warnings)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bench_eval_never_executes_a_crafted_pickle(tmp_path):
    out = tmp_path / "runs"
    env = _env({"BENCH_PLUGINS": "bench.testing"})
    res = subprocess.run([sys.executable, "-m", "bench.cli", "run", "--methods", "identity", "--task", "tiny-vectors",
                          "--out", str(out), "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    rundir = next((out / "tiny-vectors/identity").glob("smoke-seed0-*"))
    before = json.loads((rundir / "row.json").read_text())
    marker = tmp_path / "pwned"
    torch.save({"outputs": _Payload(marker), "n": 1}, rundir / "samples.pt")
    probe = tmp_path / "probe"  # the payload is real: an unsafe load (the old store.torch_load) runs it
    torch.save({"outputs": _Payload(probe)}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert probe.exists()
    res = subprocess.run([sys.executable, "-m", "bench.cli", "eval", str(rundir), "--no-progress"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert not marker.exists(), "bench eval executed the pickle's payload"
    assert res.returncode == 0, res.stderr
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "samples.pt is unreadable" in err[0] and "posix.system" in err[0], err
    assert json.loads((rundir / "row.json").read_text())["w2"] == before["w2"]  # re-transported, same samples
    torch.save({"method": _Payload(marker)}, rundir / "checkpoint.pt")
    res = subprocess.run([sys.executable, "-m", "bench.cli", "eval", str(rundir), "--no-progress"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert not marker.exists() and res.returncode == 2
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "checkpoint.pt is unreadable" in err[0] and "bench run" in err[0], err


def test_a_killed_holders_lock_is_taken_over(tmp_path):
    """filelock uses flock(2): the kernel drops the lock when its process dies, kill -9 included."""
    out = tmp_path / "runs"
    rundir = RunSpec("not", "toy1d", 0, "smoke", dict(NOT_OPTS, toy_steps=20)).directory(out)
    holder_src = ("import sys, time; from bench.locks import RunLock; lock = RunLock(sys.argv[1]).acquire(); "
                  "print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", holder_src, str(rundir)], stdout=subprocess.PIPE, text=True,
                            env=_env())
    try:
        assert proc.stdout.readline().strip() == "held"
        assert holder(rundir)["pid"] == proc.pid
        res = subprocess.run(_not_cmd(out, "--opt", "toy_steps=20"), capture_output=True, text=True, env=_env(),
                             timeout=300)
        # another process holds it: reported (naming the holder), skipped, and not an error
        assert res.returncode == 0 and f"running in pid {proc.pid}" in res.stdout, res.stdout + res.stderr
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert holder(rundir) is None
    res = subprocess.run(_not_cmd(out, "--opt", "toy_steps=20"), capture_output=True, text=True, env=_env(),
                         timeout=300)
    assert res.returncode == 0 and "1 run now" in res.stdout, res.stdout + res.stderr


def test_four_processes_on_one_grid_run_each_run_exactly_once(tmp_path):
    """Four identical `bench run` on one --out and a 2x2 grid (NOT/KNOT x 2 seeds, tiny-vectors): each run
    is trained by exactly one process; the others say who holds it and move on."""
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "bench.cli", "run", "--task", "tiny-vectors", "--methods", "not,knot",
           "--seeds", "0,1", "--out", str(out), "--no-progress", "--opt", "toy_steps=100", "--opt", "inner_steps=2",
           "--opt", "mlp_hidden=32"]
    env = _env({"BENCH_PLUGINS": "bench.testing"})
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(4)]
    results = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1][-1500:] for r in results]
    rundirs = sorted(d for d in (out / "tiny-vectors").glob("*/smoke-seed*") if d.is_dir())
    assert len(rundirs) == 4
    for d in rundirs:
        assert len(_events(d, "fit_start")) == 1, f"{d} was trained {len(_events(d, 'fit_start'))} times"
        assert len(_events(d, "done")) == 1
        row = json.loads((d / "row.json").read_text())
        assert isinstance(row["w2"], float) and row["n_eval"] == 32
        assert holder(d) is None
    ran = sum(out_text.count("\ndone ") + out_text.startswith("done ") for out_text, _ in results)
    assert ran == 4, [r[0] for r in results]
    assert all("4 run(s):" in out_text for out_text, _ in results)
