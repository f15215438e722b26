"""A method's checkpoint holds exactly the state it declares (``Method.state_attrs``), and that state is enough.

- fitting changes no nn.Module / tensor attribute that the method does not declare: what it leaves undeclared is what
  ``setup`` derives from the data, which a resume rebuilds instead of reading it from every checkpoint;
- restored into a freshly set-up instance (another torch seed), the declared state gives the fitted method's transport,
  coupling and bound terms bit for bit, with no fit in between (as ``bench eval`` and ``load_run`` use it);
- the configurations whose state the contract suite's test options do not reach (a contrastive encoder, OTCS's plan
  retrieval, a reflow round, ReFlow's pixel loss, OTCS on a subset of its training sets) resume bitwise after a kill;
- the reference rows' checkpoints hold no data; a declaration that names no attribute is a clear error.
"""
from __future__ import annotations

import dataclasses
import io

import pytest
import torch

from bench import store
from bench.api import SEMI_PAIRED, BenchError, Method
from bench.context import FitContext
from bench.registry import methods
from bench.testing import fit_until_killed, tiny_images, tiny_vectors

METHODS = {n: c for n, c in methods().items() if not c.__module__.rsplit(".", 1)[-1].startswith("test_")}
KINDS = {"images": tiny_images, "vectors": tiny_vectors}
# (method, kind, options beyond its test_options): the parts of the state only these configurations have
EXTRA = [
    ("otcs", "images", {"features": "contrastive", "feature_steps": 3}),           # the fitted encoder
    ("otcs", "images", {"relations": "spread", "spread_k": 5, "stage2": "retrieve"}),  # no score model; the graphs
    ("otcs", "vectors", {"ot_max_train": 40}),                                    # stage I on subsets of 96 / 128
    ("reflow", "vectors", {"reflow": 1}),                                         # generated pairs, held sources
    ("reflow", "images", {"loss": "pixel"}),                                      # no classifier
]


def _data(cls, kind: str):
    data = KINDS[kind](SEMI_PAIRED if SEMI_PAIRED in cls.settings else cls.settings[0])
    if not cls.oracle:
        data = dataclasses.replace(data, source_train_labels=None, target_train_labels=None,
                                   source_test_labels=None, target_test_labels=None)
    return data


def _set_up(cls, data, options, seed=0):
    torch.manual_seed(seed)
    m = cls(kind=data.kind, **options)
    run = FitContext(None, device="cpu", seed=0, budget="smoke", progress=False)
    run.method = m
    m.setup(data, run)
    m.to("cpu")
    return m, run


def _snapshot(value):
    if isinstance(value, torch.nn.Module):
        return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in value.state_dict().items()}
    return value.detach().clone()


def _same(a, b) -> bool:
    if isinstance(a, dict) != isinstance(b, dict):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def _undeclared(m) -> dict:
    return {k: v for k, v in vars(m).items()
            if isinstance(v, (torch.nn.Module, torch.Tensor)) and k not in type(m).state_attrs}


def _transport(m, x, seed=123):
    with torch.no_grad():
        return m.transport(x.clone(), generator=torch.Generator().manual_seed(seed))


def _cases():
    for name, cls in METHODS.items():
        for kind in KINDS:
            yield pytest.param(name, kind, {}, id=f"{name}-{kind}")
    for name, kind, extra in EXTRA:
        yield pytest.param(name, kind, extra, id=f"{name}-{kind}-{'-'.join(f'{k}={v}' for k, v in extra.items())}")


@pytest.mark.parametrize("name,kind,extra", list(_cases()))
def test_the_declared_state_is_what_fit_changes_and_all_a_restore_needs(name, kind, extra, one_thread):
    cls = METHODS[name]
    options = {**cls.test_options, **extra}
    data = _data(cls, kind)
    m, run = _set_up(cls, data, options)
    before = {k: _snapshot(v) for k, v in _undeclared(m).items()}
    m.fit(data, run)

    # fit changed nothing it does not declare (a resume would lose it)
    after = _undeclared(m)
    created = sorted(set(after) - set(before))
    assert not created, f"{name}: fit created {created}, which state_attrs does not declare"
    changed = sorted(k for k, v in after.items() if not _same(_snapshot(v), before[k]))
    assert not changed, f"{name}: fit changed {changed}, which state_attrs does not declare: a resume would lose it"

    # the state holds exactly the declared attributes, besides extra_state and the optimizers
    state = m.state_dict()
    assert set(state) == set(cls.state_attrs) | {"__extra__", "__optim__"}

    # restored into a fresh set-up instance (another initialisation), with no fit: the same method, bit for bit
    fresh, _ = _set_up(cls, data, options, seed=999)
    fresh.load_state_dict(store_round_trip(state))
    fresh.to("cpu")
    x = data.source_test[:8]
    torch.testing.assert_close(_transport(fresh, x), _transport(m, x), rtol=0, atol=0)
    assert fresh.diagnostics() == m.diagnostics()
    targets = data.target_train[:16]  # the coupling the tasks' plan metrics read (digits plan_acc, toy plan_w2)
    plan = m.conditional_plan(x, targets)
    if plan is not None:
        torch.testing.assert_close(fresh.conditional_plan(x, targets), plan, rtol=0, atol=0)


def store_round_trip(state):
    """``state`` through a file and the safe loader, as a checkpoint travels."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, map_location="cpu", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("name,kind,extra", [pytest.param(n, k, e, id=f"{n}-{k}-{'-'.join(f'{a}={b}' for a, b in e.items())}")
                                             for n, k, e in EXTRA])
def test_the_configurations_beyond_the_test_options_resume_bitwise(name, kind, extra, tmp_path, one_thread):
    """As the contract's kill-and-resume test, for the EXTRA configurations, killed at five checkpoints across the fit."""
    cls = METHODS[name]
    options = {**cls.test_options, **extra}
    data = _data(cls, kind)
    whole, n = fit_until_killed(cls, data, tmp_path / "whole", options)
    x = data.source_test[:8]
    expected = _transport(whole, x)
    for cut in sorted({1, n // 4, n // 2, 3 * n // 4, n - 1} - {0}):
        d = tmp_path / f"cut{cut}"
        killed, _ = fit_until_killed(cls, data, d, options, kill_after=cut)
        assert killed is None
        resumed, _ = fit_until_killed(cls, data, d, options)
        torch.testing.assert_close(_transport(resumed, x), expected, rtol=0, atol=0,
                                   msg=lambda msg: f"{name} {extra} resumed after checkpoint {cut} of {n}: {msg}")
        assert resumed.diagnostics() == whole.diagnostics()


@pytest.mark.parametrize("name", ["identity", "keypoint-nn", "label-oracle"])
def test_a_reference_rows_checkpoint_holds_no_data(name, tmp_path):
    """The references learn nothing: their checkpoint is the method's extra_state (identity: the target shape) and no
    tensor, however large the task (label-oracle's used to hold every training image)."""
    cls = METHODS[name]
    data = tiny_images(SEMI_PAIRED)
    run = FitContext(tmp_path, device="cpu", seed=0, budget="smoke", progress=False)
    run.method = m = cls()
    m.setup(data, run)
    m.fit(data, run)
    run.checkpoint()
    state = store.torch_load(tmp_path / "checkpoint.pt")["method"]
    assert set(state) == {"__extra__", "__optim__"} and state["__optim__"] == {}
    assert state["__extra__"] == ({"shape": list(data.shape)} if name == "identity" else {})


class _Declares(Method):
    name = "declares"
    state_attrs = ("net", "stats")

    def setup(self, data, run):
        self.net = torch.nn.Linear(2, 2)
        self.stats = torch.zeros(2)

    def transport(self, x, generator=None):
        return self.net(x) + self.stats


def _declares(**attrs):
    m = _Declares()
    m.setup(tiny_vectors(), None)
    for k, v in attrs.items():
        setattr(m, k, v)
    return m


def test_a_declared_attribute_that_does_not_exist_is_a_clear_error():
    class Typo(_Declares):
        state_attrs = ("net", "stast")

    m = Typo()
    m.setup(tiny_vectors(), None)
    with pytest.raises(BenchError, match=r"declares state attribute 'stast' .* no attribute 'stast'"):
        m.state_dict()
    with pytest.raises(BenchError, match="stast"):
        m.load_state_dict(_declares().state_dict())


def test_a_declared_value_that_is_no_state_is_refused():
    with pytest.raises(BenchError, match=r"'stats' is a list, not an nn.Module.*extra_state"):
        _declares(stats=[1.0, 2.0]).state_dict()

    class Twice(_Declares):
        state_attrs = ("net", "net")

    m = Twice()
    m.setup(tiny_vectors(), None)
    with pytest.raises(BenchError, match="twice"):
        m.state_dict()


def test_load_restores_the_declared_attributes_and_ignores_the_rest():
    a = _declares(stats=torch.ones(2))
    state = {**a.state_dict(), "old_buffer": torch.zeros(1000)}  # e.g. written when every tensor was saved
    b = _declares()
    b.load_state_dict(state)
    assert not hasattr(b, "old_buffer") and torch.equal(b.stats, torch.ones(2))
    assert all(torch.equal(p, q) for p, q in zip(a.net.parameters(), b.net.parameters()))
    # None is state too: a configuration without that part saves None and restores it
    c = _declares(stats=None)
    assert c.state_dict()["stats"] is None
    b.load_state_dict(c.state_dict())
    assert b.stats is None


def test_a_checkpoint_without_a_declared_part_does_not_fit(tmp_path):
    """A declared network missing from a checkpoint is a checkpoint that does not fit (moved aside and trained
    again by the runner), not a silently half-restored method."""
    run = FitContext(tmp_path, device="cpu", seed=0, budget="smoke", progress=False)
    run.method = _declares()
    run.checkpoint()
    state = store.torch_load(tmp_path / "checkpoint.pt")
    del state["method"]["net"]
    torch.save(state, tmp_path / "checkpoint.pt")
    again = FitContext(tmp_path, device="cpu", seed=0, budget="smoke", progress=False)
    again.method = _declares()
    with pytest.raises(store.CorruptFile, match="does not fit"):
        again.restore()
