"""Runner: rows, skip of finished runs, resume after an interruption, atomic results, errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from bench import store
from bench.api import SEMI_PAIRED, UNPAIRED, BenchError, Method
from bench.registry import register_method
from bench.runner import RunSpec, run_one
from bench.tables import render
from bench.registry import get_task


class Interrupt(Exception):
    pass


@register_method
class Counter(Method):
    """Learns the mean shift between target and source by SGD; ``crash_at`` simulates a kill."""

    name = "test-counter"
    family = "Test"
    settings = (UNPAIRED, SEMI_PAIRED)
    default_options = {"steps": 40}
    test_options = {"steps": 5}
    seen_steps: list[int] = []
    crash_at = -1  # class attribute, not an option: the resumed run is the same run

    def setup(self, data, run):
        self.shift = torch.nn.Parameter(torch.zeros(data.shape))

    def fit(self, data, run):
        opt = torch.optim.SGD([self.shift], lr=0.2)
        target = data.target_train.mean(0) - data.source_train.mean(0)
        for step in run.loop("sgd", self.options["steps"]):
            Counter.seen_steps.append(step)
            if step == Counter.crash_at:
                raise Interrupt()
            loss = ((self.shift - target) ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()

    @torch.no_grad()
    def transport(self, x, generator=None):
        return x + self.shift


def _run(tmp_path, **opts):
    spec = RunSpec("test-counter", "tiny-vectors", seed=0, budget="smoke", options=opts)
    return run_one(spec, out=tmp_path / "runs", data_root=tmp_path, cache_dir=tmp_path / "cache",
                   device="cpu", progress=False, checkpoint_every=0.0, log=lambda *_: None)


def test_row_and_skip(tmp_path):
    row = _run(tmp_path)
    for key in ("method", "task", "seed", "budget", "w2", "nfe", "fit_s", "options", "commit", "torch"):
        assert key in row
    rundir = tmp_path / "runs/tiny-vectors/test-counter/smoke-seed0"
    assert (rundir / "row.json").exists() and (rundir / "samples.pt").exists() and (rundir / "grid.png").exists()
    assert not list(rundir.glob("*.tmp")), "temporary files left behind"
    Counter.seen_steps.clear()
    again = _run(tmp_path)  # finished: skipped, nothing trained
    assert Counter.seen_steps == [] and again["w2"] == row["w2"]


def test_interrupted_run_resumes_from_checkpoint(tmp_path):
    Counter.seen_steps.clear()
    Counter.crash_at = 25
    try:
        with pytest.raises(Interrupt):
            _run(tmp_path)
    finally:
        Counter.crash_at = -1
    rundir = tmp_path / "runs/tiny-vectors/test-counter/smoke-seed0"
    assert (rundir / "checkpoint.pt").exists() and not (rundir / "row.json").exists()
    assert store.torch_load(rundir / "checkpoint.pt")["progress"]["sgd"] == 25
    Counter.seen_steps.clear()
    row = _run(tmp_path)
    assert Counter.seen_steps == list(range(25, 40)), "resume must continue at the checkpointed step"
    full = _run(tmp_path / "fresh")
    assert row["w2"] == pytest.approx(full["w2"], rel=1e-5), "resumed result differs from an uninterrupted run"


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "row.json"
    store.write_json(path, {"a": 1})

    class Boom:
        pass

    with pytest.raises(TypeError):
        store.write_json(path, {"a": Boom()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert not list(tmp_path.glob("*.tmp"))


def test_table_marks_best_and_second(tmp_path):
    for shift_steps in (40, 3, 1):
        spec = RunSpec("test-counter", "tiny-vectors", 0, "smoke", {"steps": shift_steps})
        run_one(spec, out=tmp_path / "runs", data_root=tmp_path, cache_dir=tmp_path,
                device="cpu", progress=False, log=lambda *_: None)
    text = render(tmp_path / "runs", get_task("tiny-vectors"), fmt="markdown")
    body = [ln for ln in text.splitlines() if ln.startswith("|")][2:]
    values = [float(ln.split("|")[5].strip(" *<ins>/")) for ln in body]
    levels = sorted(set(values))  # ties as displayed share a rank
    assert len(body) == 3
    for ln, v in zip(body, values):
        assert ("**" in ln) == (v == levels[0]), ln
        assert ("<ins>" in ln) == (len(levels) > 1 and v == levels[1]), ln
    latex = render(tmp_path / "runs", get_task("tiny-vectors"), fmt="latex")
    assert "\\textbf{" in latex and "\\underline{" in latex
    csv = render(tmp_path / "runs", get_task("tiny-vectors"), fmt="csv")
    assert csv.splitlines()[0].startswith("method,variant,budget,w2_mean,w2_std") and len(csv.splitlines()) == 4


def _bench(*args, env=None, cwd=None):
    full_env = {**os.environ, "BENCH_PLUGINS": "bench.testing", **(env or {})}
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=300)


@pytest.mark.parametrize("args,needle", [
    (["run", "--methods", "nope", "--task", "tiny-vectors"], "unknown method 'nope'"),
    (["run", "--methods", "identity", "--task", "nope"], "unknown task 'nope'"),
    (["run", "--methods", "identity", "--task", "tiny-vectors", "--budget", "huge"], "unknown budget 'huge'"),
    (["run", "--methods", "identity", "--task", "tiny-vectors", "--opt", "bogus=1"], "has no option"),
    (["run", "--methods", "keypoint-nn", "--task", "tiny-vectors"], "does not support the unpaired setting"),
])
def test_cli_errors_are_one_line(tmp_path, args, needle):
    res = _bench(*args, "--out", str(tmp_path / "runs"))
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert not list((tmp_path / "runs").rglob("row.json"))


def test_cli_unwritable_out(tmp_path):
    if os.geteuid() == 0:
        target = "/proc/otbench-cannot-write"  # root ignores permission bits; /proc refuses everyone
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = str(ro / "runs")
    res = _bench("run", "--methods", "identity", "--task", "tiny-vectors", "--out", target)
    assert res.returncode != 0 and "not writable" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_cli_run_table_eval_list(tmp_path):
    out = tmp_path / "runs"
    res = _bench("run", "--methods", "identity,label-oracle", "--task", "tiny-vectors", "--seeds", "0,1",
                 "--out", str(out), "--no-progress")
    assert res.returncode == 0, res.stderr
    assert len(list(out.rglob("row.json"))) == 4
    res = _bench("table", "--task", "tiny-vectors", "--out", str(out))
    assert res.returncode == 0 and "label-oracle (oracle)" in res.stdout and "±" in res.stdout
    rundir = out / "tiny-vectors/identity/smoke-seed0"
    before = json.loads((rundir / "row.json").read_text())
    res = _bench("eval", str(rundir))
    assert res.returncode == 0, res.stderr
    after = json.loads((rundir / "row.json").read_text())
    assert after["w2"] == pytest.approx(before["w2"])
    res = _bench("list")
    assert res.returncode == 0 and "identity" in res.stdout and "tiny-vectors" in res.stdout
