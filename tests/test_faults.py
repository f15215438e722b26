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
from bench.api import BenchError
from bench.locks import holder
from bench.runner import run_one
from bench.spec import RunSpec, Settings

# NOT on toy1d, sized so that fitting takes ~2-3 s at one thread and checkpoints every 0.1 s
NOT_OPTS = {"steps": 500, "inner_steps": 3, "mlp_hidden": 32, "log_every": 25}
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


@pytest.mark.slow
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
                os.kill(proc.pid, signal.SIGSTOP)  # freeze it, so that the phase read is the one killed in
                if (rundir / "row.json").exists():
                    phases.append("row written")
                elif (rundir / "samples.pt").exists():
                    phases.append("samples stored")
                else:
                    ckpt = store.torch_load(rundir / "checkpoint.pt")["progress"] if (rundir / "checkpoint.pt").exists() else {}
                    phases.append(f"fit at {ckpt}")
                os.kill(proc.pid, signal.SIGKILL)
            else:
                phases.append(f"exited {proc.returncode}")
        finally:
            proc.wait(timeout=60)
    killed = [p for p in phases if not p.startswith("exited")]
    assert len(killed) >= 8, phases
    # a row exists only once some attempt got through scoring: no kill leaves a row of an unfinished run
    assert not (rundir / "row.json").exists() or any(p in ("row written", "exited 0") for p in phases), phases
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


@pytest.mark.slow
def test_truncated_row_samples_and_checkpoint_are_detected_and_recovered(tmp_path, one_thread):
    spec = RunSpec("not", "toy1d", 0, "smoke", dict(NOT_OPTS, steps=150))
    out = tmp_path / "runs"
    warnings: list[str] = []

    def go():
        return run_one(spec,
                       Settings(out=out, data_root=tmp_path, cache_dir=tmp_path / "cache", device="cpu",
                                progress=False, checkpoint_every=0.0),
                       log=lambda *_: None, warn=warnings.append)

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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_killed_holders_lock_is_taken_over(tmp_path):
    """filelock uses flock(2): the kernel drops the lock when its process dies, kill -9 included."""
    out = tmp_path / "runs"
    rundir = RunSpec("not", "toy1d", 0, "smoke", dict(NOT_OPTS, steps=20)).directory(out)
    holder_src = ("import sys, time; from bench.locks import RunLock; lock = RunLock(sys.argv[1]).acquire(); "
                  "print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", holder_src, str(rundir)], stdout=subprocess.PIPE, text=True,
                            env=_env())
    try:
        assert proc.stdout.readline().strip() == "held"
        assert holder(rundir)["pid"] == proc.pid
        res = subprocess.run(_not_cmd(out, "--opt", "steps=20"), capture_output=True, text=True, env=_env(),
                             timeout=300)
        # another process holds it: reported (naming the holder), skipped, and not an error
        assert res.returncode == 0 and f"running in pid {proc.pid}" in res.stdout, res.stdout + res.stderr
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert holder(rundir) is None
    res = subprocess.run(_not_cmd(out, "--opt", "steps=20"), capture_output=True, text=True, env=_env(),
                         timeout=300)
    assert res.returncode == 0 and "1 run now" in res.stdout, res.stdout + res.stderr


@pytest.mark.slow
def test_four_processes_on_one_grid_run_each_run_exactly_once(tmp_path):
    """Four identical `bench run` on one --out and a 2x2 grid (NOT/KNOT x 2 seeds, tiny-vectors): each run
    is trained by exactly one process; the others say who holds it and move on."""
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "bench.cli", "run", "--task", "tiny-vectors", "--methods", "not,knot",
           "--seeds", "0,1", "--out", str(out), "--no-progress", "--opt", "steps=100", "--opt", "inner_steps=2",
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


# -- issue 39: every error path one line and recoverable -------------------------------------------------------
# R = a finished NOT run on tiny-vectors (a few seconds), copied for each test; the CLI runs in this process.
TINY_NOT = {"steps": 30, "inner_steps": 2, "mlp_hidden": 16, "log_every": 10}
TINY_ARGS = [a for k, v in TINY_NOT.items() for a in ("--opt", f"{k}={v}")]


def _cli(capsys, *args: str) -> tuple[int, str, list[str]]:
    """``bench ARGS`` in this process: (exit code, stdout, the non-empty stderr lines)."""
    from bench.cli import main
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, [ln for ln in err.splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def finished_tree(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "runs"
    row = run_one(RunSpec("not", "tiny-vectors", 0, "smoke", dict(TINY_NOT)),
                  Settings(out=out, data_root=out, cache_dir=out.parent / "cache", device="cpu", progress=False),
                  log=lambda *_: None)
    return out, row


@pytest.fixture
def R(finished_tree, tmp_path):
    """A copy of the finished run: its directory; ``R.out`` the --out tree, ``R.row`` its row."""
    import shutil

    out = tmp_path / "runs"
    shutil.copytree(finished_tree[0], out)
    rundir = next((out / "tiny-vectors" / "not").glob("smoke-seed0-*"))

    class FitContext(type(rundir)):
        pass
    run = FitContext(rundir)
    run.out, run.row = out, finished_tree[1]
    return run


def _edit_json(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def _run_R(capsys, R, *extra):
    return _cli(capsys, "run", "-m", "not", "-t", "tiny-vectors", "--out", R.out, "--no-progress", *TINY_ARGS, *extra)


def _one_error(code, err, *needles):
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    for needle in needles:
        assert needle in err[0], (needle, err[0])


def test_r01_a_non_utf8_row_is_one_line_and_bench_eval_recovers(R, capsys):
    with open(R / "row.json", "ab") as fh:
        fh.write(b"\xff")
    code, _, err = _cli(capsys, "table", "-t", "tiny-vectors", "--out", R.out)
    _one_error(code, err, "row.json", f"bench eval {R}")
    code, _, err = _cli(capsys, "eval", R, "--no-progress")
    assert code == 0 and len(err) == 1 and "row.json is unreadable" in err[0], err
    code, out, _ = _cli(capsys, "table", "-t", "tiny-vectors", "--out", R.out)
    assert code == 0 and "| not " in out


def test_r02_a_row_without_metrics_is_not_finished(R, capsys):
    (R / "row.json").write_text('{"method":"not","budget":"smoke","task":"tiny-vectors","seed":0}')
    code, out, _ = _cli(capsys, "status", "-t", "tiny-vectors", "--out", R.out)
    assert code == 0 and " done " not in out and "interrupted" in out and "row.json is unusable" in out, out
    code, _, err = _cli(capsys, "table", "-t", "tiny-vectors", "--out", R.out)
    _one_error(code, err, "row.json", "not a result row")
    code, out, err = _run_R(capsys, R)  # re-scored from the stored samples, no training
    assert code == 0 and "1 run now" in out and "row.json is unusable" in out, (out, err)
    assert json.loads((R / "row.json").read_text())["w2"] == R.row["w2"]
    assert len(_events(R, "fit_start")) == 1
    assert "1 done" in _cli(capsys, "status", "-t", "tiny-vectors", "--out", R.out)[1]


def test_r03_a_row_that_is_a_list_is_not_done(R, capsys):
    (R / "row.json").write_text("[1,2]")
    code, out, _ = _cli(capsys, "status", "-t", "tiny-vectors", "--out", R.out)
    assert code == 0 and "1 interrupted" in out and "not a JSON object" in out, out
    assert _run_R(capsys, R)[0] == 0 and json.loads((R / "row.json").read_text())["w2"] == R.row["w2"]


def test_r04_a_metric_that_is_a_string_is_refused(R, capsys):
    _edit_json(R / "row.json", lambda row: row.update(w2="abc"))
    code, _, err = _cli(capsys, "table", "-t", "tiny-vectors", "--out", R.out)
    _one_error(code, err, "metric w2 is 'abc'")
    assert "row.json is unusable" in _cli(capsys, "status", "-t", "tiny-vectors", "--out", R.out)[1]


@pytest.mark.parametrize("damage", [lambda c: c.clear() or c.update(method="not"), lambda c: c.update(seed="abc")])
def test_r05_a_damaged_config_is_rebuilt_from_what_the_run_recorded(R, capsys, damage):
    _edit_json(R / "config.json", damage)
    code, _, err = _cli(capsys, "eval", R, "--no-progress")
    assert code == 0 and len(err) == 1 and "config.json is unusable" in err[0], err
    config = json.loads((R / "config.json").read_text())
    assert config["seed"] == 0 and config["options"] == R.row["options"]
    assert json.loads((R / "row.json").read_text())["w2"] == pytest.approx(R.row["w2"])


def test_r06_a_truncated_checkpoint_names_the_command_that_retrains(R, capsys):
    import shlex

    _truncate(R / "checkpoint.pt")
    code, _, err = _cli(capsys, "eval", R, "--no-progress")
    _one_error(code, err, "checkpoint.pt is unreadable", "--force")
    command = shlex.split(err[0].split("`")[1])
    assert command[:2] == ["bench", "run"]
    code, out, _ = _cli(capsys, *command[1:], "--no-progress")  # the command it names does retrain
    assert code == 0 and "1 run now" in out and _events(R, "fit_start")[-1]["resume"] == {}
    assert store.torch_load(R / "checkpoint.pt")["progress"] == {"saddle": 30}
    assert _cli(capsys, "eval", R, "--no-progress")[0] == 0


def test_r07_samples_of_the_wrong_shape_are_transported_again(R, capsys):
    (R / "row.json").unlink()
    saved = store.torch_load(R / "samples.pt")
    torch.save({**saved, "outputs": torch.zeros(len(saved["outputs"]), 3)}, R / "samples.pt")
    code, out, err = _run_R(capsys, R)
    assert code == 0 and "samples.pt is unusable" in out and "transporting again" in out, (out, err)
    assert _events(R, "fit_start")[-1]["resume"] == {"saddle": 30}, "re-transported, not retrained"
    assert json.loads((R / "row.json").read_text())["w2"] == R.row["w2"]


def test_r08_a_batch_size_below_1_is_refused_before_work_and_empty_samples_recover(R, capsys, tmp_path):
    for bad in ("0", "-1"):
        code, _, err = _cli(capsys, "run", "-m", "not", "-t", "toy1d", "--out", tmp_path / "new", "--batch-size", bad)
        _one_error(code, err, f"--batch-size {bad}")
    assert not (tmp_path / "new" / "toy1d").exists()
    (R / "row.json").unlink()
    saved = store.torch_load(R / "samples.pt")
    torch.save({**saved, "outputs": saved["outputs"][:0], "n": 0}, R / "samples.pt")  # what batch size -1 left
    code, out, _ = _run_R(capsys, R)
    assert code == 0 and "samples.pt is unusable" in out and (R / "row.json").exists()


@pytest.mark.parametrize("value", ["-1", "NaN", "0"])
def test_r09_a_negative_or_nan_lr_is_bad_input(tmp_path, capsys, value):
    code, _, err = _cli(capsys, "run", "-m", "not", "-t", "toy1d", "--out", tmp_path, "--opt", f"map_lr={value}")
    _one_error(code, err, "map_lr")
    assert not (tmp_path / "toy1d").exists()


def test_r10_a_bogus_device_is_bad_input_and_leaves_no_run(tmp_path, capsys):
    code, _, err = _cli(capsys, "run", "-m", "not", "-t", "toy1d", "--out", tmp_path, "--device", "bogus")
    _one_error(code, err, "--device 'bogus'", "cpu")
    with pytest.raises(BenchError, match="--device"):
        run_one(RunSpec("identity", "toy1d"),
                Settings(out=tmp_path, data_root=tmp_path, cache_dir=tmp_path, device="bogus"),
                )
    assert not (tmp_path / "toy1d").exists()


def test_r11_slurm_without_slurm_is_one_line(tmp_path, capsys, monkeypatch):
    import shutil
    monkeypatch.setattr(shutil, "which", lambda name: None)
    code, _, err = _cli(capsys, "run", "-m", "identity", "-t", "toy1d", "--out", tmp_path, "--executor", "slurm")
    _one_error(code, err, "--executor slurm", "--slurm-local")
    assert not (tmp_path / "toy1d").exists()


def test_r12_a_negative_seed_is_refused(tmp_path, capsys):
    code, _, err = _cli(capsys, "run", "-m", "identity", "-t", "toy1d", "--out", tmp_path, "--seeds", "0,-1")
    _one_error(code, err, "--seeds")
    with pytest.raises(BenchError, match="seed -1"):
        RunSpec("identity", "toy1d", -1).build()
    assert not (tmp_path / "toy1d").exists()


def test_r13_a_former_option_name_is_refused_naming_todays(tmp_path, capsys):
    code, _, err = _cli(capsys, "run", "-m", "identity,not", "-t", "toy1d", "--out", tmp_path,
                        "--opt", "not.toy_lr=0.01")
    _one_error(code, err, "toy_lr", "--opt not.critic_lr=", "--opt not.map_lr=")
    code, _, err = _cli(capsys, "run", "-m", "dpmot", "-t", "toy1d", "--out", tmp_path, "--opt", "base=8")
    _one_error(code, err, "base", "--opt dpmot.unet_base=")
    assert not list(tmp_path.rglob("config.json")), "checked before any run started"


def test_r13_an_option_at_its_default_is_the_default_run(R, capsys):
    code, out, _ = _run_R(capsys, R, "--opt", f"map_lr={R.row['options']['map_lr']}")
    assert code == 0 and "1 finished before" in out, out


def test_r14_a_config_edited_after_training_is_not_trusted(R, capsys):
    _edit_json(R / "config.json", lambda c: c["options"].update(map_lr=1e9))
    code, _, err = _cli(capsys, "eval", R, "--no-progress")
    assert code == 0 and len(err) == 1 and "config.json is unusable" in err[0] and "edited after" in err[0], err
    assert json.loads((R / "row.json").read_text())["options"]["map_lr"] == R.row["options"]["map_lr"]
    assert json.loads((R / "config.json").read_text())["options"]["map_lr"] == R.row["options"]["map_lr"]


def test_r15_a_row_cannot_inject_cells_into_the_table(R, capsys, tmp_path):
    fake = "otcs | - | - | 0 | 99.99 | 67.42 |\n| evil"
    _edit_json(R / "row.json", lambda row: row.update(method=fake))
    code, out, err = _cli(capsys, "table", "-t", "tiny-vectors", "--out", R.out)
    _one_error(code, err, "row.json", "not a method name")
    assert "67.42" not in out
    rows = tmp_path / "rows"  # a collected copy has no directory to prove it: its names are checked alone
    rows.mkdir()
    (rows / "not-smoke-0.json").write_text((R / "row.json").read_text())
    code, out, err = _cli(capsys, "table", "-t", "tiny-vectors", "--rows", rows)
    _one_error(code, err, "not a method name")
    _edit_json(R / "row.json", lambda row: row.update(method="knot"))  # a valid name, but not its folder's
    _one_error(*_cli(capsys, "table", "-t", "tiny-vectors", "--out", R.out)[::2], "its run directory's 'not'")
    from bench.tables import _cell
    assert _cell("a | b\n| c", "markdown") == "a \\| b \\| c"


def test_r16_data_corrupted_with_its_size_and_mtime_kept_is_caught(tmp_path, data_root):
    from bench import data as bdata
    from bench.datasets.digits import MNIST_FILES
    import shutil

    files = MNIST_FILES
    root = tmp_path / "data"
    for f in files:
        (root / f.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data_root / f.path, root / f.path)
    bdata.ensure(root, files)  # verified once
    target = root / files[3].path
    st = target.stat()
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    target.write_bytes(bytes(raw))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(BenchError, match="is corrupt"):
        bdata.ensure(root, files)


def test_newcomer_did_you_mean(tmp_path, capsys):
    _one_error(*_cli(capsys, "run", "-m", "nott", "-t", "toy1d", "--out", tmp_path)[::2], "did you mean 'not'")
    _one_error(*_cli(capsys, "run", "-m", "not", "-t", "toy1d", "--out", tmp_path, "--opt", "map_lrr=1")[::2],
               "did you mean map_lr", "bench list --method not")


def test_newcomer_a_data_error_leaves_no_run_behind(tmp_path, capsys):
    out = tmp_path / "runs"
    code, _, err = _cli(capsys, "run", "-m", "identity", "-t", "digits", "--out", out, "--data-root", tmp_path / "none")
    _one_error(code, err, "not found", "--data-root")
    assert not (out / "digits").exists()
    assert "no runs of task 'digits'" in _cli(capsys, "status", "-t", "digits", "--out", out)[1]


def test_newcomer_the_table_reads_on_a_terminal_and_marks_only_clear_winners():
    import pandas as pd

    from bench.api import Metric
    from bench.tables import _mark, ranks

    def summary(budget, *rows):
        return pd.DataFrame([{"method": m, "variant": "", "budget": budget, "family": "OT", "oracle": False,
                              "w2_mean": mean, "w2_std": std} for m, mean, std in rows])

    specs = {"w2": Metric("w2", "W2", higher_is_better=False)}
    clear = [("a", 1.0, 0.01), ("b", 2.0, 0.01), ("c", 3.0, 0.01)]
    assert ranks(summary("cpu", *clear), ["w2"], specs) == {("a", "", "cpu"): {"w2": 0}, ("b", "", "cpu"): {"w2": 1}}
    assert ranks(summary("smoke", *clear), ["w2"], specs) == {}, "never on smoke"
    within = [("a", 1.0, 0.5), ("b", 1.2, 0.5), ("c", 3.0, 0.01)]  # a and b differ by less than their spread
    assert ranks(summary("cpu", *within), ["w2"], specs) == {}
    text = _mark("1.00", 0, "text")
    assert "**" not in text and "<ins>" not in _mark("1.00", 1, "text") and text.startswith("\033[1m")


def test_newcomer_slow_first_uses_say_so_in_one_line(tmp_path, data_root, capsys, monkeypatch):
    """Building FID reference statistics and training (or measuring) the judge take minutes once per machine: each
    says so in one line before it starts; a cached entry says nothing."""
    import numpy as np

    from bench.metrics import fid as fid_mod
    from bench.metrics.classifier import load_or_train

    x, y = torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1, torch.arange(40) % 10
    monkeypatch.setattr(fid_mod, "fid_features", lambda imgs, *a, **k: np.zeros((len(imgs), 2048)) + np.arange(
        len(imgs))[:, None])
    for first in (True, False):
        capsys.readouterr()
        load_or_train(tmp_path, "k", train=lambda: (x, y), test=lambda: (x, y), epochs=1)
        fid_mod.reference_stats("toy", "test", x[:4], 4, tmp_path, data_root=data_root)
        notes = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("note: ")]
        assert len(notes) == (2 if first else 0), notes
        assert not first or ("training the judge" in notes[0] and "FID reference statistics" in notes[1])
