"""The shared plugin contract: every registered method passes these, on images and vectors.

- output shape, dtype and (for images) range [-1, 1];
- seed determinism on CPU: same torch seed + same generator -> identical transport;
- state_dict -> fresh instance -> setup -> load_state_dict -> identical transport;
- a setting the method does not declare is refused with a BenchError;
- a method that is not an oracle never needs labels; one that does not use pairs never needs them.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from bench.api import SEMI_PAIRED, SETTINGS, UNPAIRED, BenchError
from bench.registry import methods
from bench.run import Run
from bench.testing import tiny_images, tiny_vectors

# the registered plugins; methods that other test modules register at import (e.g. test_runner's
# test-counter) are fixtures of those tests, not plugins, and depend on the order pytest imports modules in
METHODS = {n: c for n, c in methods().items() if not c.__module__.rsplit(".", 1)[-1].startswith("test_")}
KINDS = {"images": tiny_images, "vectors": tiny_vectors}


def _data(kind: str, setting: str, cls):
    data = KINDS[kind](setting)
    if not cls.oracle:  # only oracles may read labels: hide them from everybody else
        data = dataclasses.replace(data, source_train_labels=None, target_train_labels=None,
                                   source_test_labels=None, target_test_labels=None)
    return data


def _fit(cls, data, seed=0):
    torch.manual_seed(seed)
    m = cls(**getattr(cls, "test_options", {}))
    m.check_setting(data)
    run = Run(None, device="cpu", seed=seed, budget="smoke", progress=False)
    run.method = m
    m.setup(data, run)
    m.to("cpu")
    m.fit(data, run)
    return m, run


def _transport(m, x, seed=123):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return m.transport(x.clone(), generator=g)


def _cases():
    for name, cls in METHODS.items():
        for kind in KINDS:
            setting = SEMI_PAIRED if SEMI_PAIRED in cls.settings else cls.settings[0]
            yield pytest.param(name, kind, setting, id=f"{name}-{kind}")


@pytest.mark.parametrize("name,kind,setting", list(_cases()))
def test_method_contract(name, kind, setting):
    cls = METHODS[name]
    assert cls.name == name and cls.family and set(cls.settings) <= set(SETTINGS)
    data = _data(kind, setting, cls)
    m, _ = _fit(cls, data)
    x = data.source_test[:8]
    y = _transport(m, x)

    # shape, dtype, range
    assert y.shape == (len(x), *data.shape), f"{name}: output shape {tuple(y.shape)}"
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()
    if data.is_image:
        assert y.min() >= -1 - 1e-5 and y.max() <= 1 + 1e-5
    assert isinstance(m.nfe, int) and m.nfe >= 0

    # same seed, same generator -> same output (fit again from scratch)
    m2, _ = _fit(cls, data)
    torch.testing.assert_close(_transport(m2, x), y, rtol=0, atol=1e-5)

    # save -> load into a fresh instance -> same transport
    state = copy.deepcopy(m.state_dict())
    torch.manual_seed(999)  # a different initialisation, overwritten by the load
    fresh = cls(**getattr(cls, "test_options", {}))
    run = Run(None, device="cpu", seed=0, budget="smoke", progress=False)
    fresh.setup(data, run)
    fresh.load_state_dict(state)
    fresh.to("cpu")
    torch.testing.assert_close(_transport(fresh, x), y, rtol=0, atol=1e-5)

    # stochastic methods must actually depend on the generator
    if cls.stochastic:
        other = _transport(m, x, seed=321)
        assert not torch.equal(other, y), f"{name} is declared stochastic but ignores the generator"


@pytest.mark.parametrize("name", list(METHODS))
def test_optimizer_state_survives_a_resume(name, tmp_path):
    """Issue 9: every optimizer is checkpointed one way (Method.optimizer); after a resume the
    re-created optimizers continue from the saved moments, not from zero."""
    cls = METHODS[name]
    data = _data("images", SEMI_PAIRED if SEMI_PAIRED in cls.settings else cls.settings[0], cls)
    torch.manual_seed(0)
    m = cls(**getattr(cls, "test_options", {}))
    run = Run(tmp_path, device="cpu", seed=0, budget="smoke", progress=False)
    run.method = m
    m.setup(data, run)
    m.fit(data, run)
    run.checkpoint()
    loose = [k for k, v in vars(m).items() if isinstance(v, torch.optim.Optimizer) and v not in m._optimizers.values()]
    assert not loose, f"{name}: optimizer attribute(s) {loose} are not registered with self.optimizer(name, opt)"
    fresh = cls(**getattr(cls, "test_options", {}))
    run2 = Run(tmp_path, device="cpu", seed=0, budget="smoke", progress=False)
    run2.method = fresh
    fresh.setup(data, run2)
    assert run2.restore()
    fresh.fit(data, run2)  # every loop is complete: fit only re-creates its optimizers
    assert set(fresh._optimizers) == set(m._optimizers)
    for key, opt in m._optimizers.items():
        a, b = opt.state_dict()["state"], fresh._optimizers[key].state_dict()["state"]
        assert a.keys() == b.keys() and len(a) > 0, f"{name}: optimizer {key!r} has no state after resume"
        for i in a:
            for k in a[i]:
                torch.testing.assert_close(b[i][k], a[i][k], rtol=0, atol=0)


@pytest.mark.parametrize("name", list(METHODS))
def test_refuses_unsupported_setting(name):
    cls = METHODS[name]
    for setting in SETTINGS:
        data = tiny_vectors(setting)
        if setting in cls.settings:
            cls(**getattr(cls, "test_options", {})).check_setting(data)
        else:
            with pytest.raises(BenchError, match="does not support"):
                cls(**getattr(cls, "test_options", {})).check_setting(data)


@pytest.mark.parametrize("name", list(METHODS))
def test_unknown_option_is_refused(name):
    with pytest.raises(BenchError, match="no option"):
        METHODS[name](definitely_not_an_option=1)


def test_unpaired_methods_do_not_need_pairs():
    for name, cls in METHODS.items():
        if UNPAIRED in cls.settings:
            assert not (cls.uses_pairs and SEMI_PAIRED not in cls.settings), name


@pytest.mark.parametrize("name", list(METHODS))
def test_every_option_is_typed_and_a_wrong_type_is_a_one_line_error(name):
    """Issue 11: option values are validated by their declared type before any work."""
    from bench.options import declared
    cls = METHODS[name]
    for key, opt in declared(cls.default_options).items():
        assert opt.type is not None, f"{name}.{key} has no declared type"
        wrong = {"not": "a valid value"} if opt.type is not dict else [1, 2]
        with pytest.raises(BenchError, match=f"option {key}=") as info:
            cls(**{key: wrong})
        assert "\n" not in str(info.value)
