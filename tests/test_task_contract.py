"""The shared task contract: every registered task passes these, as every method passes tests/test_contract.py.

- declarations: ``name`` (its registry key), ``setting``, ``kind``, ``metrics`` (distinct keys, numeric bounds with
  low < high), ``description``, ``eval_sizes`` (one entry per budget), ``data_files`` (DataFile instances);
- ``load(root, seed=0, budget="smoke")``: a TaskData of the declared kind and setting whose splits are non-empty,
  float and finite, source splits of one shape and target splits of another, images in [-1, 1], guiding pairs if
  and only if the setting is semi-paired, labels as long as their split;
- determinism: loading again with the same seed (a fresh task instance) gives the same test splits and pairs;
- vector tasks: evaluating the test targets themselves (as the runner calls ``evaluate``, with a stand-in method
  that offers every optional hook) reports every declared metric, each None or a finite number in its bounds.
  (Image tasks' evaluation needs Inception and trained judges: tests/test_digits.py, test_celeba.py, test_animal.py.)

Each task is loaded at most twice (``_loaded`` keeps the first load; the determinism test makes the second).
celeba-sr and animal read CelebA / AFHQ, which the offline data root does not hold: unless the data root has them
(their ``check_data`` passes), they load from the tiny sample roots of tests/sample_roots.py, as their own tests do.
"""
from __future__ import annotations

import math
import numbers

import pytest
import torch

import bench
from bench.api import SEMI_PAIRED, SETTINGS, BenchError, EvalContext, Method, Metric, TaskData
from bench.budgets import BUDGET_NAMES
from bench.registry import tasks

# the registered plugins; tasks that other test modules register at import (e.g. test_runner's) are fixtures of
# those tests, not plugins (bench.testing's tiny-images / tiny-vectors are plugins the engine tests rely on: kept)
TASKS = {n: c for n, c in tasks().items() if not c.__module__.rsplit(".", 1)[-1].startswith("test_")}
VECTOR_TASKS = [n for n, c in TASKS.items() if c.kind == "vector"]
KINDS = ("image", "vector")


def _sample_root(name: str, root):
    """A tiny data root in the task's published layout (tests/sample_roots.py), or None when there is none."""
    import sample_roots as sr
    if not sr.have_samples():
        return None
    builders = {"celeba-sr": sr.build_celeba_root, "animal": sr.build_afhq_root}
    return builders[name](root) if name in builders else None


@pytest.fixture(scope="module")
def task_root(data_root, bench_cache, tmp_path_factory):
    """``task_root(name)``: the data root to load ``name`` from: the offline data root when the task's data is
    there (its check_data passes), else a sample root built for it; skips, naming why, when neither exists."""
    roots: dict[str, object] = {}

    def pick(name: str):
        if name not in roots:
            try:
                TASKS[name]().check_data(data_root)
                roots[name] = data_root
            except BenchError as exc:
                sample = _sample_root(name, tmp_path_factory.mktemp(f"root-{name}"))
                if sample is None:
                    pytest.skip(f"{name}: no data under {data_root} ({exc}) and no sample root")
                roots[name] = sample
        return roots[name]
    return pick


_loaded: dict[str, TaskData] = {}


def _load(name: str, root) -> TaskData:
    if name not in _loaded:
        _loaded[name] = TASKS[name]().load(root, seed=0, budget="smoke")
    return _loaded[name]


def _splits(data: TaskData) -> dict[str, torch.Tensor]:
    return {"source_train": data.source_train, "source_test": data.source_test,
            "target_train": data.target_train, "target_test": data.target_test}


# -- declarations ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TASKS))
def test_declares_name_setting_and_kind(name):
    cls = TASKS[name]
    assert isinstance(cls.name, str) and cls.name, f"{name}: empty name"
    assert cls.name == name, f"registry key {name!r} holds a task named {cls.name!r}"
    assert cls.setting in SETTINGS, f"{name}: setting {cls.setting!r} is not one of {SETTINGS}"
    assert cls.kind in KINDS, f"{name}: kind {cls.kind!r} is not one of {KINDS}"
    assert isinstance(cls.description, str) and cls.description.strip(), f"{name}: no description"
    cls()  # constructible with its default options


@pytest.mark.parametrize("name", list(TASKS))
def test_declares_metrics_with_distinct_keys_and_bounds(name):
    metrics = TASKS[name].metrics
    assert len(metrics) >= 1, f"{name} declares no metric"
    for m in metrics:
        assert isinstance(m, Metric), f"{name}: metric {m!r} is a {type(m).__name__}, not a bench.api.Metric"
        assert m.key, f"{name}: a metric with an empty key"
        lo, hi = m.bounds
        for end in (lo, hi):
            assert isinstance(end, numbers.Real) and not isinstance(end, bool) and not math.isnan(end), \
                f"{name}: metric {m.key} bound {end!r} is not a number"
        assert lo < hi, f"{name}: metric {m.key} bounds {m.bounds} need low < high"
    keys = [m.key for m in metrics]
    assert len(set(keys)) == len(keys), f"{name}: metric keys repeat: {keys}"


@pytest.mark.parametrize("name", list(TASKS))
def test_declares_an_eval_size_for_every_budget(name):
    sizes = TASKS[name].eval_sizes
    missing = [b for b in BUDGET_NAMES if b not in sizes]
    assert not missing, f"{name}: eval_sizes has no entry for budget(s) {missing}"
    for b in BUDGET_NAMES:
        n = sizes[b]
        assert n is None or (isinstance(n, int) and not isinstance(n, bool) and n > 0), \
            f"{name}: eval_sizes[{b!r}] = {n!r} (None or a positive int)"


@pytest.mark.parametrize("name", list(TASKS))
def test_declares_data_files_as_datafiles(name):
    files = TASKS[name].data_files
    assert isinstance(files, (tuple, list)), f"{name}: data_files is a {type(files).__name__}"
    for f in files:
        assert isinstance(f, bench.DataFile), f"{name}: data_files holds {f!r}, not a bench.DataFile"


# -- load --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TASKS))
def test_load_returns_data_of_the_declared_kind_and_setting(name, task_root):
    cls = TASKS[name]
    data = _load(name, task_root(name))
    assert isinstance(data, TaskData), f"{name}: load returned a {type(data).__name__}"
    assert data.kind == cls.kind, f"{name} declares kind {cls.kind!r} and loads {data.kind} data"
    assert data.setting == cls.setting, f"{name} declares setting {cls.setting!r} and loads {data.setting!r}"
    dims = 4 if cls.kind == "image" else 2
    for split, x in _splits(data).items():
        assert isinstance(x, torch.Tensor), f"{name}: {split} is a {type(x).__name__}"
        assert x.dim() == dims, f"{name}: {split} has shape {tuple(x.shape)}; {cls.kind} data is {dims}-D"
        assert len(x) > 0, f"{name}: {split} is empty"
        assert x.is_floating_point(), f"{name}: {split} is {x.dtype}, not float"
        assert torch.isfinite(x).all(), f"{name}: {split} holds NaN or inf"
        if cls.kind == "image":
            assert x.min() >= -1 and x.max() <= 1, \
                f"{name}: {split} spans [{float(x.min()):.4g}, {float(x.max()):.4g}], not within [-1, 1]"
    assert data.source_train.shape[1:] == data.source_test.shape[1:], \
        f"{name}: source_train {tuple(data.source_train.shape)} vs source_test {tuple(data.source_test.shape)}"
    assert data.target_train.shape[1:] == data.target_test.shape[1:], \
        f"{name}: target_train {tuple(data.target_train.shape)} vs target_test {tuple(data.target_test.shape)}"


@pytest.mark.parametrize("name", list(TASKS))
def test_guiding_pairs_if_and_only_if_semi_paired(name, task_root):
    data = _load(name, task_root(name))
    if TASKS[name].setting != SEMI_PAIRED:
        assert data.pairs is None, f"{name} is {TASKS[name].setting} but hands methods guiding pairs"
        return
    assert data.pairs is not None, f"{name} is semi-paired but has no guiding pairs"
    assert len(data.pairs) == 2, f"{name}: pairs is {len(data.pairs)} tensors, not (sources, targets)"
    px, py = data.pairs
    assert len(px) > 0 and len(px) == len(py), f"{name}: {len(px)} pair sources, {len(py)} pair targets"
    assert px.shape[1:] == data.source_train.shape[1:], \
        f"{name}: pair sources {tuple(px.shape)} vs source_train {tuple(data.source_train.shape)}"
    assert py.shape[1:] == data.target_train.shape[1:], \
        f"{name}: pair targets {tuple(py.shape)} vs target_train {tuple(data.target_train.shape)}"
    for side, p in (("sources", px), ("targets", py)):
        assert p.is_floating_point() and torch.isfinite(p).all(), f"{name}: pair {side} not float and finite"
        if data.is_image:
            assert p.min() >= -1 and p.max() <= 1, f"{name}: pair {side} not within [-1, 1]"


@pytest.mark.parametrize("name", list(TASKS))
def test_labels_match_their_splits(name, task_root):
    data = _load(name, task_root(name))
    for split, x in _splits(data).items():
        labels = getattr(data, f"{split}_labels")
        if labels is not None:
            assert isinstance(labels, torch.Tensor), f"{name}: {split}_labels is a {type(labels).__name__}"
            assert len(labels) == len(x), f"{name}: {len(labels)} {split}_labels for {len(x)} {split} samples"


@pytest.mark.parametrize("name", list(TASKS))
def test_load_is_deterministic_in_the_seed(name, task_root):
    """A second load, by a fresh instance (no cache inside the task object), gives the same test splits and pairs."""
    first = _load(name, task_root(name))
    again = TASKS[name]().load(task_root(name), seed=0, budget="smoke")
    for split in ("source_test", "target_test"):
        assert torch.equal(getattr(first, split), getattr(again, split)), f"{name}: {split} differs between loads"
    assert (first.pairs is None) == (again.pairs is None)
    if first.pairs is not None:
        assert all(torch.equal(a, b) for a, b in zip(first.pairs, again.pairs)), f"{name}: pairs differ between loads"


# -- evaluation (vector tasks) ------------------------------------------------------------------------------------
def _cycle(rows: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` rows of ``rows`` repeated as often as needed."""
    reps = -(-n // len(rows))
    return rows.repeat(reps, *([1] * (rows.dim() - 1)))[:n]


class _Targets(Method):
    """A stand-in fitted method that offers every hook a task's evaluate may read: transport returns test
    targets (cycled), its coupling is uniform over the given targets."""

    def __init__(self, data: TaskData) -> None:
        super().__init__(kind=data.kind)
        self.targets = data.target_test

    def transport(self, x, generator=None):
        return _cycle(self.targets, len(x)).clone()

    def conditional_plan(self, x, targets):
        return torch.full((len(x), len(targets)), 1.0 / len(targets))


@pytest.mark.parametrize("name", VECTOR_TASKS)
def test_evaluating_the_targets_reports_every_metric_in_bounds(name, task_root, one_thread):
    """As the runner scores a run (bench.runner.prepare / score): the budget's first test sources, their labels,
    an EvalContext with the fitted method and its transport; the outputs are test targets."""
    task = TASKS[name]()
    data = _load(name, task_root(name))
    n = task.eval_sizes["smoke"]
    sources = data.source_test if n is None else data.source_test[:n]
    labels = None if data.source_test_labels is None else data.source_test_labels[: len(sources)]
    method = _Targets(data)
    ctx = EvalContext(cache_dir=None, device=torch.device("cpu"), budget="smoke", seed=0, method=method,
                      transport=method.transport, data_root=task_root(name))
    res = task.evaluate(data, sources, _cycle(data.target_test, len(sources)), labels, ctx)
    assert isinstance(res, dict), f"{name}: evaluate returned a {type(res).__name__}"
    missing = [m.key for m in task.metrics if m.key not in res]
    assert not missing, f"{name}: evaluate reports no {missing} (declared metrics: {[m.key for m in task.metrics]})"
    for m in task.metrics:
        value = res[m.key]
        if value is None:
            continue
        assert isinstance(value, numbers.Real) and not isinstance(value, bool), f"{name}: {m.key}={value!r}"
        lo, hi = m.bounds
        assert math.isfinite(value), f"{name}: {m.key}={value} is not finite"
        assert lo <= value <= hi, f"{name}: {m.key}={value:.6g} is outside its bounds [{lo:g}, {hi:g}]"
