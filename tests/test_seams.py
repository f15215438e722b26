"""The engine's seams (issue 9): resolved options make a row re-runnable, tasks declare their own
metrics, the registry refuses a name clash."""
from __future__ import annotations

import pytest
import torch

from bench.api import UNPAIRED, BenchError, Method, Metric, Task, TaskData
from bench.options import Option, declared
from bench.registry import METHODS, TASKS, Registry, get_method, register_task
from bench.runner import run_one
from bench.spec import RunSpec, Settings
from bench.tables import render

TOY_NOT = {"steps": 30, "inner_steps": 2, "mlp_hidden": 16, "mlp_depth": 2, "batch_size": 32}


def test_a_row_records_every_resolved_option_and_reruns_to_the_same_row(tmp_path, one_thread):
    spec = RunSpec("not", "toy1d", seed=0, budget="smoke", options=TOY_NOT)
    row = run_one(spec,
                  Settings(out=tmp_path / "a", data_root=tmp_path, cache_dir=tmp_path / "cache", device="cpu",
                           progress=False),
                  log=lambda *_: None)
    cls = get_method("not")
    spec_opts = declared(cls.default_options)
    assert set(row["options"]) == set(spec_opts)  # every option, not only those given
    for k, opt in spec_opts.items():
        if opt.per_budget and not opt.nullable:
            assert row["options"][k] is not None, k  # no null that the budget decides
    assert row["options"]["steps"] == 30 and row["options"]["map_lr"] == 1e-3  # the vector values
    again = RunSpec(row["method"], row["task"], seed=row["seed"], budget=row["budget"], options=row["options"],
                    task_options=row.get("task_options", {}))
    assert again.directory(tmp_path / "b").name == spec.directory(tmp_path / "b").name  # hash of resolved values
    row2 = run_one(again,
                   Settings(out=tmp_path / "b", data_root=tmp_path, cache_dir=tmp_path / "cache", device="cpu",
                            progress=False),
                   log=lambda *_: None)
    for k in ("mean_at_minus4", "w2"):
        assert row2[k] == pytest.approx(row[k], rel=1e-6, abs=1e-9), k


class _Spread(Task):
    """A throwaway task with a metric the engine has never heard of."""

    name = "spread-task"
    kind = "vector"
    metrics = (Metric("spread", "Spread (sd)", higher_is_better=True, digits=3, bounds=(0, 100),
                      sample_size="spread_n"),)
    eval_sizes = {"smoke": None, "cpu": None, "fast": None, "paper": None}
    default_options = {"n": Option(64, help="samples per split")}

    def load(self, data_root, seed, budget="smoke"):
        g = torch.Generator().manual_seed(seed)
        n = self.options["n"]
        return TaskData(name=self.name, setting=UNPAIRED, source_train=torch.randn(n, 2, generator=g),
                        target_train=torch.randn(n, 2, generator=g) + 3, source_test=torch.randn(16, 2, generator=g),
                        target_test=torch.randn(16, 2, generator=g) + 3)

    def evaluate(self, data, sources, outputs, labels, ctx):
        return {"spread": float(outputs.std()), "spread_n": len(outputs)}


def test_a_new_task_with_a_new_metric_needs_no_engine_edit(tmp_path):
    register_task(_Spread)
    for method in ("identity", "not"):
        run_one(RunSpec(method, "spread-task", options=TOY_NOT if method == "not" else {}, task_options={"n": 32}),
                Settings(out=tmp_path, data_root=tmp_path, cache_dir=tmp_path, device="cpu", progress=False),
                log=lambda *_: None)
    text = render(tmp_path, _Spread)
    assert "Spread (sd)" in text and "identity" in text and "not" in text
    assert "(n=16)" in text  # the metric's declared sample size, shown beside it
    with pytest.raises(BenchError, match="task 'spread-task' option n='x' is not an integer"):
        _Spread(n="x")


def test_registry_refuses_two_classes_under_one_name():
    reg = Registry("method", Method, "otbench.nothing")

    class A(Method):
        name = "twin"

    class B(Method):
        name = "twin"

    reg.register(A)
    reg.register(A)  # the same class again is fine (re-import)
    with pytest.raises(BenchError, match="two methods are named 'twin'"):
        reg.register(B)
    assert "otcs" in METHODS.all() and "digits" in TASKS.all()


def test_budget_values_are_declared_for_every_budget():
    with pytest.raises(TypeError, match="every budget"):
        Option(smoke=1, fast=2)
    from bench.budgets import Budget
    with pytest.raises(TypeError, match="missing"):
        Budget("cpu").pick(smoke=1, fast=2)
    assert Budget("cpu").pick(smoke=1, cpu=3, fast=2, paper=4) == 3


def test_named_streams_continue_after_a_resume(tmp_path):
    """A resumed run draws the same random numbers as an uninterrupted one (bitwise resume)."""
    from bench.context import FitContext

    class Holder(Method):
        name = "holder"

    whole = FitContext(None, seed=3).generator("stage")
    expected = torch.rand(10, generator=whole)
    run = FitContext(tmp_path, seed=3)
    run.method = Holder()
    first = torch.rand(4, generator=run.generator("stage"))
    run.checkpoint()
    again = FitContext(tmp_path, seed=3)
    again.method = Holder()
    assert again.restore()
    rest = torch.rand(6, generator=again.generator("stage"))
    torch.testing.assert_close(torch.cat([first, rest]), expected, rtol=0, atol=0)
    assert not torch.equal(torch.rand(3, generator=again.generator("other")), expected[:3])


class _Probed(_Spread):
    name = "probed-task"

    def probe(self, data, sources, outputs, labels, ctx):
        return {"spread": float(outputs.std()), "n": len(outputs)}


def test_learning_curve_probes_log_points_without_changing_training(tmp_path, one_thread):
    import json
    register_task(_Probed)
    rows = []
    for out, every in ((tmp_path / "plain", None), (tmp_path / "probed", 10)):
        rows.append(run_one(RunSpec("not", "probed-task", options=TOY_NOT),
                            Settings(out=out, data_root=tmp_path, cache_dir=tmp_path, device="cpu", progress=False,
                                     probe_every=every, probe_n=8),
                            log=lambda *_: None))
    assert rows[0]["spread"] == rows[1]["spread"]  # the probe drew nothing from the training streams
    (log,) = (tmp_path / "probed").glob("probed-task/not/*/log.jsonl")
    points = [json.loads(line) for line in log.read_text().splitlines() if '"stage": "probe"' in line]
    assert [p["step"] for p in points] == [10, 20, 30] and all(p["n"] == 8 and p["loop"] == "saddle" for p in points)
    assert all(p["subset"] == "evenly spread" for p in points)  # the toy task has no labels


def test_probe_sources_are_class_balanced_when_labels_are_known():
    from bench.runner import probe_indices  # noqa
    # sorted by index, not by class, and unbalanced at the front: evenly spread indices would give 4 of class 1
    labels = torch.tensor([1, 1, 1, 1, 0, 2, 1, 0, 2, 0, 2, 1, 0, 2, 1, 0, 2, 1, 0, 2])
    idx, how = probe_indices(len(labels), 9, labels)
    assert how == "class-balanced" and torch.equal(idx, idx.sort().values) and len(idx.unique()) == 9
    assert torch.bincount(labels[idx], minlength=3).tolist() == [3, 3, 3]
    assert probe_indices(len(labels), 2, labels)[1] == "evenly spread"  # fewer than one per class
    idx, how = probe_indices(20, 5)
    assert how == "evenly spread" and idx.tolist() == [0, 5, 10, 14, 19]
    assert len(probe_indices(20, 50, labels)[0]) == 20  # never more than there are


def test_every_image_task_rejects_outputs_of_the_wrong_shape_in_one_line():
    from bench.datasets.animal import AnimalTask
    from bench.datasets.celeba import CelebASR
    from bench.datasets.digits import DigitsTask
    for task, shape in ((DigitsTask(), (1, 28, 28)), (CelebASR(), (3, 16, 16)), (AnimalTask(), (3, 32, 32))):
        data = TaskData(task.name, task.setting, torch.zeros(2, *shape), torch.zeros(2, *shape),
                        torch.zeros(2, *shape), torch.zeros(2, *shape))
        with pytest.raises(BenchError) as info:
            task.images_to_score(data, torch.zeros(2, 3, 7, 7))
        msg = str(info.value)
        assert "\n" not in msg and f"{task.name} outputs must be (N,{','.join(map(str, shape))})" in msg
        ok = task.images_to_score(data, torch.full((2, *shape), 3.0, dtype=torch.float64))
        assert ok.dtype == torch.float32 and ok.max() == 1.0
