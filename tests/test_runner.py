"""Runner: rows, skip, resume, failures as their own kind, locks, safe loads, one run path, CLI errors."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from bench import store
from bench.api import DISTANCE, PERCENT, SEMI_PAIRED, UNPAIRED, BenchError, Metric, Method, Task
from bench.locks import RunLock, RunLocked
from bench.options import Option
from bench.registry import get_task, register_method, register_task, tasks
from bench.errors import RunFailed
from bench.rundir import FAILED_FILE, ROW_FILE, run_state
from bench.runner import check_metrics, check_samples, evaluate_dir, load_run, run_one
from bench.spec import RunSpec, Settings
from bench.tables import render
from bench.testing import tiny_vectors


class Interrupt(KeyboardInterrupt):
    """Stands for a kill: not an error of the run, so nothing but the checkpoint is left."""


@register_method
class Counter(Method):
    """Learns the mean shift between target and source by SGD; ``crash_at`` simulates a kill."""

    name = "test-counter"
    family = "Test"
    settings = (UNPAIRED, SEMI_PAIRED)
    default_options = {"steps": 40, "lr": 0.2, "poison": False}
    test_options = {"steps": 5}
    state_attrs = ("shift",)
    seen_steps: list[int] = []
    crash_at = -1  # class attribute, not an option: the resumed run is the same run

    def setup(self, data, run):
        self.shift = torch.nn.Parameter(torch.zeros(data.shape))

    def fit(self, data, run):
        opt = self.optimizer("sgd", torch.optim.SGD([self.shift], lr=self.options["lr"], momentum=0.5))
        target = data.target_train.mean(0) - data.source_train.mean(0)
        for step in run.loop("sgd", self.options["steps"]):
            Counter.seen_steps.append(step)
            if step == Counter.crash_at:
                raise Interrupt()
            loss = ((self.shift - target) ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.log("sgd", step, loss=loss)

    @torch.no_grad()
    def transport(self, x, generator=None):
        y = x + self.shift
        return y * float("nan") if self.options["poison"] else y


@register_method
class SampledCounter(Counter):
    """Counter with a transport-only option (``scale`` multiplies the learned shift when transporting)."""

    name = "test-sampled-counter"
    default_options = {**Counter.default_options, "scale": Option(1.0, sampling=True)}

    @torch.no_grad()
    def transport(self, x, generator=None):
        return x + self.options["scale"] * self.shift


@register_task
class PercentTask(Task):
    """tiny-vectors scored by a percentage that the ``acc`` option sets (to test metric checks)."""

    name = "test-percent"
    kind = "vector"
    setting = UNPAIRED
    metrics = (Metric("acc", "Acc (%)", higher_is_better=True, bounds=PERCENT),)
    eval_sizes = {"smoke": None, "cpu": None, "fast": None, "paper": None}
    default_options = {"acc": 50.0}

    def load(self, data_root, seed, budget="smoke"):
        return tiny_vectors(UNPAIRED, seed=seed)

    def evaluate(self, data, sources, outputs, labels, ctx):
        return {"acc": self.options["acc"]}


def _spec(**opts):
    return RunSpec("test-counter", "tiny-vectors", seed=0, budget="smoke", options=opts)


def _run(tmp_path, spec=None, **kw):
    spec = spec or _spec()
    return run_one(spec,
                   Settings(out=tmp_path / "runs", data_root=tmp_path, cache_dir=tmp_path / "cache", device="cpu",
                            progress=False, checkpoint_every=0.0, **kw),
                   log=lambda *_: None)


def _events(rundir, name):
    return [r for r in store.read_jsonl(rundir / "log.jsonl") if r.get("event") == name]


def test_row_and_skip(tmp_path):
    row = _run(tmp_path)
    for key in ("method", "task", "seed", "budget", "w2", "nfe", "fit_s", "options", "task_options", "commit",
                "torch", "device_name", "eval_s"):
        assert key in row
    assert row["options"] == {"steps": 40, "lr": 0.2, "poison": False}, "the row records the resolved options"
    if Path("/proc/cpuinfo").exists():  # the CPU model, so that run minutes can be read against the machine
        model = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("model name"))
        assert row["device_name"].startswith(f"cpu ({model}") and row["device_name"].endswith("threads)")
    rundir = _spec().directory(tmp_path / "runs")
    assert rundir.name.startswith("smoke-seed0-") and len(rundir.name.split("-")[-1]) == 8
    assert (rundir / "row.json").exists() and (rundir / "samples.pt").exists() and (rundir / "grid.png").exists()
    assert json.loads((rundir / "config.json").read_text())["options"] == row["options"]
    assert not list(rundir.glob("*.tmp")), "temporary files left behind"
    Counter.seen_steps.clear()
    again = _run(tmp_path)  # finished: skipped, nothing trained
    assert Counter.seen_steps == [] and again["w2"] == row["w2"]
    assert len(_events(rundir, "fit_start")) == 1


def test_directory_hash_follows_resolved_options(tmp_path):
    out = tmp_path / "runs"
    # giving a default explicitly is the same computation, hence the same directory
    assert _spec().directory(out) == _spec(steps=40).directory(out)
    assert _spec().directory(out) != _spec(steps=41).directory(out)
    a = RunSpec("test-counter", "test-percent", 0, "smoke", {}, {})
    b = RunSpec("test-counter", "test-percent", 0, "smoke", {}, {"acc": 60.0})
    assert a.directory(out) != b.directory(out), "task options are part of the hash"


def test_interrupted_run_resumes_from_checkpoint(tmp_path):
    Counter.seen_steps.clear()
    Counter.crash_at = 25
    try:
        with pytest.raises(Interrupt):
            _run(tmp_path)
    finally:
        Counter.crash_at = -1
    rundir = _spec().directory(tmp_path / "runs")
    assert (rundir / "checkpoint.pt").exists() and not (rundir / "row.json").exists()
    assert not (rundir / FAILED_FILE).exists(), "an interruption is not a failure"
    assert store.torch_load(rundir / "checkpoint.pt")["progress"]["sgd"] == 25
    assert run_state(rundir)[0] == "interrupted"
    Counter.seen_steps.clear()
    row = _run(tmp_path)
    assert Counter.seen_steps == list(range(25, 40)), "resume must continue at the checkpointed step"
    full = _run(tmp_path / "fresh")
    # the optimizer's momentum is checkpointed too, so the resumed run is the same computation
    assert row["w2"] == full["w2"], "resumed result differs from an uninterrupted run"
    assert [e["resume"] for e in _events(rundir, "fit_start")] == [{}, {"sgd": 25}]


def test_runs_differing_only_in_transport_only_options_share_one_fit(tmp_path):
    def spec(**opts):
        return RunSpec("test-sampled-counter", "tiny-vectors", seed=0, budget="smoke", options=opts)

    Counter.seen_steps.clear()
    first = _run(tmp_path, spec())
    assert Counter.seen_steps == list(range(40)) and "fit_from" not in first
    Counter.seen_steps.clear()
    half = _run(tmp_path, spec(scale=0.5))  # another sampling value: no training, the first run's fit
    assert Counter.seen_steps == [], "a transport-only option must not refit"
    a, b = spec().directory(tmp_path / "runs"), spec(scale=0.5).directory(tmp_path / "runs")
    assert a != b and half["fit_from"] == a.name and half["options"]["scale"] == 0.5
    assert json.loads((b / "config.json").read_text())["fit_from"] == a.name
    shift = store.torch_load(a / "checkpoint.pt")["method"]["shift"]
    out_a, out_b = (store.torch_load(d / "samples.pt")["outputs"] for d in (a, b))
    assert torch.allclose(out_b - out_a, -0.5 * shift.expand_as(out_a), atol=1e-6), "transport used the new scale"
    assert half["fit_s"] >= first["fit_s"] * 0.5, "the row carries the shared fit's cost, not zero"
    assert _run(tmp_path, spec(scale=0.5))["fit_from"] == a.name  # finished: skipped, the row unchanged
    Counter.seen_steps.clear()
    assert _run(tmp_path, spec(scale=0.5), force=True)["fit_from"] == a.name  # --force shares the fit again
    assert Counter.seen_steps == []
    Counter.seen_steps.clear()
    _run(tmp_path, spec(scale=0.5, lr=0.1))  # a fit option differs: trains from scratch
    assert Counter.seen_steps == list(range(40))
    Counter.seen_steps.clear()
    _run(tmp_path / "alone", spec(scale=2.0))  # no finished sibling under this --out: trains
    assert Counter.seen_steps == list(range(40))


def test_checkpoint_holds_only_safe_types(tmp_path):
    _run(tmp_path)
    rundir = _spec().directory(tmp_path / "runs")
    state = torch.load(rundir / "checkpoint.pt", weights_only=True)  # no arbitrary objects in it
    assert "sgd" in state["method"]["__optim__"] and state["progress"] == {"sgd": 40}
    samples = torch.load(rundir / "samples.pt", weights_only=True)
    assert samples["outputs"].shape == (32, 2) and samples["facts"]["device"] == "cpu"


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "row.json"
    store.write_json(path, {"a": 1})

    class Boom:
        pass

    with pytest.raises(TypeError):
        store.write_json(path, {"a": Boom()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert not list(tmp_path.glob("*.tmp"))


def test_diverged_loss_is_a_failure_not_a_row(tmp_path):
    spec = _spec(lr=1e4)  # SGD on a quadratic with lr > 1 blows up to inf, then NaN
    with pytest.raises(RunFailed) as info:
        _run(tmp_path, spec)
    rundir = spec.directory(tmp_path / "runs")
    assert info.value.stage == "sgd" and info.value.step is not None
    assert "training diverged" in str(info.value) and f"sgd step {info.value.step}" in str(info.value)
    assert not (rundir / ROW_FILE).exists()
    failed = json.loads((rundir / FAILED_FILE).read_text())
    assert failed["stage"] == "sgd" and failed["step"] == info.value.step and failed["options"]["lr"] == 1e4
    assert run_state(rundir) == ("failed", str(info.value))
    # a re-run does not treat it as finished, and does not train it again either
    Counter.seen_steps.clear()
    with pytest.raises(RunFailed) as again:
        _run(tmp_path, spec)
    assert getattr(again.value, "earlier", False) and Counter.seen_steps == []
    # --retry-failed starts it again from scratch (and it fails again, deterministically)
    with pytest.raises(RunFailed):
        _run(tmp_path, spec, retry_failed=True)
    assert Counter.seen_steps[0] == 0
    assert len(_events(rundir, "fit_start")) == 2 and len(_events(rundir, "retry")) == 1


def test_nonfinite_samples_are_a_failure(tmp_path):
    spec = _spec(poison=True)
    with pytest.raises(RunFailed, match="transported samples hold NaN or inf") as info:
        _run(tmp_path, spec)
    assert info.value.stage == "transport"
    rundir = spec.directory(tmp_path / "runs")
    assert (rundir / FAILED_FILE).exists() and not (rundir / ROW_FILE).exists()
    assert not (rundir / "samples.pt").exists(), "broken samples are never stored"


@pytest.mark.parametrize("acc,ok", [(50.0, True), (0.0, True), (100.0, True), (100.5, False), (-1.0, False),
                                    (float("nan"), False), (float("inf"), False)])
def test_metric_rule(tmp_path, acc, ok):
    spec = RunSpec("test-counter", "test-percent", 0, "smoke", {"steps": 2}, {"acc": acc})
    if ok:
        assert _run(tmp_path, spec)["acc"] == acc
    else:
        with pytest.raises(RunFailed) as info:
            _run(tmp_path, spec)
        assert info.value.stage == "score" and "acc" in str(info.value)
        assert (spec.directory(tmp_path / "runs") / FAILED_FILE).exists()


def test_metric_ranges_are_declared_not_guessed():
    assert Metric("fid", "FID").bounds == (float("-inf"), float("inf"))  # nothing read from the key
    assert Metric("fid", "FID", bounds=DISTANCE).bounds == (0.0, float("inf"))
    assert pickle.loads(pickle.dumps(Metric("acc", "Acc", True, bounds=PERCENT))).bounds == (0.0, 100.0)
    with pytest.raises(TypeError, match="low <= high"):
        Metric("x", bounds=(1, 0))
    for task in tasks().values():  # every installed task declares the bounds of its percentages and distances
        for m in task.metrics:
            if "%" in m.header or m.key in ("fid", "w2", "cfd", "ssim"):
                assert m.bounds != (float("-inf"), float("inf")), (task.name, m.key)
    check_metrics(get_task("tiny-vectors")(), {"w2": 0.5, "extra": float("nan")})  # only metric columns count
    with pytest.raises(RunFailed):
        check_metrics(get_task("tiny-vectors")(), {"w2": -0.1})
    check_samples(torch.zeros(3, 2))
    with pytest.raises(RunFailed, match="1 of 3"):
        check_samples(torch.tensor([[0.0, 1.0], [float("inf"), 0.0], [2.0, 3.0]]))


def test_lock_held_elsewhere_is_reported_then_waited_for(tmp_path):
    rundir = _spec().directory(tmp_path / "runs")
    lock = RunLock(rundir).acquire()  # a separate descriptor: conflicts like another process would
    try:
        Counter.seen_steps.clear()
        with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
            _run(tmp_path)
        assert Counter.seen_steps == []
        state, detail = run_state(rundir)
        assert state == "running" and f"pid {os.getpid()}" in detail, detail
        threading.Timer(0.5, lock.release).start()
        t0 = time.monotonic()
        row = _run(tmp_path, wait_locked=True)
        assert time.monotonic() - t0 >= 0.4 and "w2" in row
    finally:
        lock.release()
    assert run_state(rundir)[0] == "done"


def test_one_run_path_eval_reproduces_the_row(tmp_path):
    row = _run(tmp_path)
    rundir = _spec().directory(tmp_path / "runs")
    again = evaluate_dir(rundir,
                         Settings(out=tmp_path / "runs", data_root=tmp_path, cache_dir=tmp_path / "cache",
                                  device="cpu", progress=False),
                         log=lambda *_: None)
    skip = {"finished_at", "eval_s"}
    assert {k: v for k, v in again.items() if k not in skip} == {k: v for k, v in row.items() if k not in skip}


def test_load_run_restores_the_trained_method(tmp_path):
    """load_run gives scripts the trained method of a run directory: same options, restored weights."""
    _run(tmp_path, spec=_spec(steps=7))
    rundir = _spec(steps=7).directory(tmp_path / "runs")
    loaded = load_run(rundir, data_root=tmp_path)
    assert loaded.spec.method == "test-counter" and loaded.method.options["steps"] == 7
    saved = torch.load(rundir / "samples.pt", weights_only=False)["outputs"]
    assert torch.allclose(loaded.method.transport(loaded.sources), saved), "the restored weights transport as stored"
    (rundir / "checkpoint.pt").unlink()
    with pytest.raises(BenchError, match="no checkpoint.pt"):
        load_run(rundir, data_root=tmp_path)
    with pytest.raises(BenchError, match="not a run directory"):
        load_run(tmp_path, data_root=tmp_path)


def test_table_marks_best_and_second(tmp_path):
    for budget in ("smoke", "cpu"):
        for shift_steps in (40, 3, 1):
            spec = RunSpec("test-counter", "tiny-vectors", 0, budget, {"steps": shift_steps})
            run_one(spec,
                    Settings(out=tmp_path / "runs", data_root=tmp_path, cache_dir=tmp_path, device="cpu",
                             progress=False),
                    log=lambda *_: None)
    text = render(tmp_path / "runs", get_task("tiny-vectors"), fmt="markdown")
    body = [ln for ln in text.splitlines() if ln.startswith("|")][2:]
    assert len(body) == 6
    for budget in ("smoke", "cpu"):
        lines = [ln for ln in body if ln.split("|")[3].strip() == budget]
        values = [float(ln.split("|")[5].strip(" *<ins>/")) for ln in lines]
        v = sorted(values)  # one seed has no spread: a difference visible at 2 digits is marked; never on smoke
        best = budget != "smoke" and v[0] != v[1]
        second = best and v[1] != v[2]
        for ln, value in zip(lines, values):
            assert ("**" in ln) == (best and value == v[0]), ln
            assert ("<ins>" in ln) == (second and value == v[1]), ln
        assert budget == "smoke" or best, values
    latex = render(tmp_path / "runs", get_task("tiny-vectors"), fmt="latex")
    assert "\\textbf{" in latex and ("\\underline{" in latex) == any("<ins>" in ln for ln in body)
    csv = render(tmp_path / "runs", get_task("tiny-vectors"), fmt="csv")
    assert csv.splitlines()[0].startswith("method,variant,budget,w2_mean,w2_std") and len(csv.splitlines()) == 7


def test_table_from_collected_row_files(tmp_path):
    """`bench table --rows DIR` renders the copies of row.json kept in the repository (runs/ is not
    committed), the same table as from the run directories; a non-row file is a clear error."""
    for steps in (40, 3):
        spec = RunSpec("test-counter", "tiny-vectors", 0, "smoke", {"steps": steps})
        run_one(spec,
                Settings(out=tmp_path / "runs", data_root=tmp_path, cache_dir=tmp_path, device="cpu", progress=False),
                log=lambda *_: None)
    collected = tmp_path / "rows"
    collected.mkdir()
    for i, path in enumerate(sorted((tmp_path / "runs").rglob("row.json"))):
        (collected / f"test-counter-smoke-{i}.json").write_text(path.read_text())
    task = get_task("tiny-vectors")
    assert render(tmp_path / "elsewhere", task, rows_dir=collected) == render(tmp_path / "runs", task)
    (collected / "notes.json").write_text("[1, 2]")
    with pytest.raises(BenchError, match="not a result row"):
        render(tmp_path / "elsewhere", task, rows_dir=collected)


def _as_if_run_with(path, row):
    """Store ``row`` as the row of a run made with its options: in the directory their digest names (a table
    refuses a row whose options are not the ones its directory was made for)."""
    from bench.schema import options_digest
    digest = options_digest(row["options"], row["task_options"])
    rundir = path.parent.with_name(f"{row['budget']}-seed{row['seed']}-{digest}")
    path.parent.rename(rundir)
    (rundir / "row.json").write_text(json.dumps(row))


def test_table_never_averages_rows_of_different_settings(tmp_path):
    """Rows whose options are not today's defaults (run before a default changed, or before an option
    existed) get their own labelled line instead of joining the mean of the current setting."""
    for seed in (0, 1, 2):
        spec = RunSpec("test-counter", "tiny-vectors", seed, "smoke", {})
        run_one(spec,
                Settings(out=tmp_path / "runs", data_root=tmp_path, cache_dir=tmp_path, device="cpu", progress=False),
                log=lambda *_: None)
    paths = sorted((tmp_path / "runs").rglob("row.json"))
    old = json.loads(paths[0].read_text())
    del old["options"]["poison"]                   # as if run before the option was added
    _as_if_run_with(paths[0], old)
    older = json.loads(paths[1].read_text())
    older["options"]["lr"] = 0.1                   # as if run when the default lr was 0.1
    _as_if_run_with(paths[1], older)
    text = render(tmp_path / "runs", get_task("tiny-vectors"), fmt="markdown")
    names = [ln.split("|")[1].strip() for ln in text.splitlines() if ln.startswith("| test-counter")]
    assert sorted(names) == ["test-counter", "test-counter [lr=0.1]", "test-counter [poison=unset]"]
    assert all(ln.split("|")[4].strip() == "1" for ln in text.splitlines() if ln.startswith("| test-counter"))


def _bench(*args, env=None, cwd=None):
    full_env = {**os.environ, "BENCH_PLUGINS": "bench.testing", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("args,needle", [
    (["run", "--methods", "nope", "--task", "tiny-vectors"], "unknown method 'nope'"),
    (["run", "--methods", "identity", "--task", "nope"], "unknown task 'nope'"),
    (["run", "--methods", "identity", "--task", "tiny-vectors", "--budget", "huge"], "'huge' is not one of"),
    (["run", "--methods", "identity", "--task", "tiny-vectors", "--opt", "bogus=1"], "has no option"),
    (["run", "--methods", "keypoint-nn", "--task", "tiny-vectors"], "does not support the unpaired setting"),
    (["run", "--methods", "identity", "--task", "tiny-vectors", "--executor", "nope"], "'nope' is not one of"),
    (["run", "--methods", "identity", "--task", "tiny-vectors", "--jobs", "0"], "--jobs 0"),
    (["table", "--task", "tiny-vectors", "--rows", "no-such-rows-dir"], "--rows no-such-rows-dir: no such directory"),
])
def test_cli_errors_are_one_line(tmp_path, args, needle):
    res = _bench(*args, "--out", str(tmp_path / "runs"))
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("error: "), res.stderr
    assert not list((tmp_path / "runs").rglob("row.json"))


@pytest.mark.slow
def test_cli_unwritable_out(tmp_path):
    if os.geteuid() == 0:
        target = "/proc/otbench-cannot-write"  # root ignores permission bits; /proc refuses everyone
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = str(ro / "runs")
    res = _bench("run", "--methods", "identity", "--task", "tiny-vectors", "--out", target)
    assert res.returncode == 2 and "not writable" in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_run_table_eval_list_status(tmp_path):
    out = tmp_path / "runs"
    res = _bench("run", "--methods", "identity,label-oracle", "--task", "tiny-vectors", "--seeds", "0,1",
                 "--out", str(out), "--no-progress")
    assert res.returncode == 0, res.stderr
    assert len(list(out.rglob("row.json"))) == 4 and "4 run(s): 4 run now" in res.stdout
    res = _bench("table", "--task", "tiny-vectors", "--out", str(out))
    assert res.returncode == 0 and "label-oracle (oracle)" in res.stdout and "±" in res.stdout
    rundir = next((out / "tiny-vectors/identity").glob("smoke-seed0-*"))
    before = json.loads((rundir / "row.json").read_text())
    res = _bench("eval", str(rundir))
    assert res.returncode == 0, res.stderr
    after = json.loads((rundir / "row.json").read_text())
    assert after["w2"] == pytest.approx(before["w2"])
    res = _bench("list")
    assert res.returncode == 0 and "identity" in res.stdout and "tiny-vectors" in res.stdout
    res = _bench("status", "--task", "tiny-vectors", "--out", str(out))
    assert res.returncode == 0 and res.stdout.count(" done ") == 4 and "4 done" in res.stdout, res.stdout
    res = _bench("status", "--task", "tiny-vectors", "--methods", "identity", "--seeds", "0,5", "--out", str(out))
    assert res.returncode == 0 and "1 done, 1 not started" in res.stdout, res.stdout


def test_an_option_added_with_the_old_behaviour_as_default_keeps_older_rows_in_the_mean(tmp_path, monkeypatch):
    """A method's ``options_before`` names the value that reproduces the code before an option existed: a row
    without that key then averages with today's runs while the default is that value, and is labelled if not."""
    for seed in (0, 1):
        spec = RunSpec("test-counter", "tiny-vectors", seed, "smoke", {})
        run_one(spec,
                Settings(out=tmp_path / "runs", data_root=tmp_path, cache_dir=tmp_path, device="cpu", progress=False),
                log=lambda *_: None)
    path = sorted((tmp_path / "runs").rglob("row.json"))[0]
    old = json.loads(path.read_text())
    del old["options"]["poison"]
    _as_if_run_with(path, old)

    def names():
        text = render(tmp_path / "runs", get_task("tiny-vectors"), fmt="markdown")
        return sorted(ln.split("|")[1].strip() for ln in text.splitlines() if ln.startswith("| test-counter"))

    monkeypatch.setattr(Counter, "options_before", {"poison": False})
    assert names() == ["test-counter"]
    monkeypatch.setattr(Counter, "options_before", {"poison": True})   # the old code poisoned: a variant
    assert names() == ["test-counter", "test-counter [poison=True]"]
    from bench.options import Option  # a per-budget value: read at the row's budget (smoke here)
    monkeypatch.setattr(Counter, "options_before", {"poison": Option(smoke=False, cpu=True, fast=True, paper=True)})
    assert names() == ["test-counter"]
    monkeypatch.setattr(Counter, "options_before", {"poison": Option(smoke=True, cpu=False, fast=False, paper=False)})
    assert names() == ["test-counter", "test-counter [poison=True]"]


def test_table_says_when_its_rows_were_judged_by_different_classifiers(tmp_path, monkeypatch):
    from bench.metrics.classifier import judge_label, judge_notes
    # the task owns which rows are comparable: here, as the digits task does, by the judge that scored them
    monkeypatch.setattr(get_task("tiny-vectors"), "row_label", classmethod(lambda cls, row: judge_label(row)))
    monkeypatch.setattr(get_task("tiny-vectors"), "table_notes", classmethod(lambda cls, rows: judge_notes(rows)))
    for seed in (0, 1):
        run_one(RunSpec("identity", "tiny-vectors", seed, "smoke", {}),
                Settings(out=tmp_path / "runs", data_root=tmp_path, cache_dir=tmp_path, device="cpu", progress=False),
                log=lambda *_: None)
    paths = sorted((tmp_path / "runs").rglob("row.json"))

    def judged_by(*shas):
        for path, sha in zip(paths, shas):
            row = json.loads(path.read_text())
            row["classifier_sha256"] = sha
            path.write_text(json.dumps(row))
        return render(tmp_path / "runs", get_task("tiny-vectors"), fmt="markdown")

    assert "different classifiers" not in judged_by("a" * 64, "a" * 64)
    text = judged_by("a" * 64, "b" * 64)
    assert "judged by 2 different classifiers (sha256 aaaaaaaa, bbbbbbbb...)" in text
    # rows without the judge's noise-robustness record (the first, noise-fragile classifier) are counted
    assert "2 of these rows were judged by a classifier with no noise-robustness record" in text
    path = paths[0]  # one seed re-judged by a noise-robust classifier: never averaged with the fragile one
    row = json.loads(path.read_text())
    path.write_text(json.dumps({**row, "classifier_test_acc_noisy": 90.0}))
    names = [ln.split("|")[1].strip() for ln in render(tmp_path / "runs", get_task("tiny-vectors"),
                                                       fmt="markdown").splitlines() if ln.startswith("| identity")]
    assert sorted(names) == ["identity", "identity [judge=noise-fragile]"], names
    for path in paths:
        row = json.loads(path.read_text())
        row["classifier_test_acc_noisy"] = 90.0
        path.write_text(json.dumps(row))
    assert "noise-robustness" not in render(tmp_path / "runs", get_task("tiny-vectors"), fmt="markdown")
