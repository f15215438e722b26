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
from bench.context import FitContext
from bench.testing import fit_until_killed, tiny_images, tiny_vectors

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
    m = cls(kind=data.kind, **cls.test_options)
    m.check_setting(data)
    run = FitContext(None, device="cpu", seed=seed, budget="smoke", progress=False)
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
    fresh = cls(kind=data.kind, **cls.test_options)
    run = FitContext(None, device="cpu", seed=0, budget="smoke", progress=False)
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
    m = cls(kind=data.kind, **cls.test_options)
    run = FitContext(tmp_path, device="cpu", seed=0, budget="smoke", progress=False)
    run.method = m
    m.setup(data, run)
    m.fit(data, run)
    run.checkpoint()
    loose = [k for k, v in vars(m).items() if isinstance(v, torch.optim.Optimizer) and v not in m._optimizers.values()]
    assert not loose, f"{name}: optimizer attribute(s) {loose} are not registered with self.optimizer(name, opt)"
    fresh = cls(kind=data.kind, **cls.test_options)
    run2 = FitContext(tmp_path, device="cpu", seed=0, budget="smoke", progress=False)
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
            cls(kind=data.kind, **cls.test_options).check_setting(data)
        else:
            with pytest.raises(BenchError, match="does not support"):
                cls(kind=data.kind, **cls.test_options).check_setting(data)


@pytest.mark.parametrize("name", list(METHODS))
def test_a_method_built_for_one_kind_of_task_refuses_the_other(name):
    """Options resolve for images or vectors (``Option(vector=...)``) when the method is built; set up on the other
    kind it would train with the wrong values, so it refuses in one line naming the fix."""
    cls = METHODS[name]
    setting = SEMI_PAIRED if SEMI_PAIRED in cls.settings else cls.settings[0]
    for built, data in (("image", tiny_vectors(setting)), ("vector", tiny_images(setting))):
        with pytest.raises(BenchError, match=f"built with its {built} options.*kind='{data.kind}'"):
            cls(kind=built, **cls.test_options).check_setting(data)


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


# -- behaviour: every registered method against a toy's known answer, and a bitwise kill-and-resume ----
# Issue 37: a method gets these by being registered.  The toy check trains on toy1d (N(-4, 1) -> N(4, 1); the OT
# map is x + 8) or, for a method that needs guiding pairs, on toy2d (whose pairs cross the cost's assignment), with
# the options below: settings that train in seconds on one thread and were checked to reach the answer.  A method
# with no entry here takes its class's ``behaviour_options`` if it has them, else the entry of the nearest parent
# class that has one (otcs-glyph: otcs's), else its smoke defaults.
# Reference rows (identity, keypoint-nn, label-oracle) are floors and ceilings by design and skip the toy check.
SCORE_TOY = {"mlp_hidden": 128, "mlp_depth": 3, "score_steps": 1000, "score_batch": 256, "score_warmup": 50}
NOT_TOY = {"steps": 300, "inner_steps": 5, "mlp_hidden": 64, "mlp_depth": 2, "batch_size": 64,
           "betas": [0.0, 0.9], "lr_schedule": "cosine"}
BEHAVIOUR = {
    "not": NOT_TOY,
    "knot": {**NOT_TOY, "steps": 400, "gamma": 1.0, "gamma_warmup": 0.0},
    "w2gan": {"steps": 1000, "mlp_hidden": 64, "mlp_depth": 2},
    "ot-icnn": {"steps": 200, "map_lr": 1e-2, "critic_lr": 1e-2, "lr_schedule": "cosine"},
    "otm": {"steps": 1000, "lr_schedule": "cosine", "mlp_hidden": 64, "mlp_depth": 2},
    "reflow": {"flow_steps": 1200, "ode_steps": 50, "mlp_hidden": 128},
    "ddib": {**SCORE_TOY, "ddim_steps": 100},
    "egsde": {**SCORE_TOY, "cls_steps": 800, "sde_steps": 100, "lambda_s": 5.0, "lambda_i": 0.0},
    "scones": {**SCORE_TOY, "ot_steps": 1500, "ot_lr": 1e-3, "potential_hidden": 128, "n_steps_each": 2},
    "dpmot": {"steps": 1500, "batch_size": 128, "mlp_hidden": 128, "lr": 2e-3, "warmup": 50, "ot_steps": 200,
              "ot_batch": 512},
    "otcs": {"epsilon_rel": 0.01},
    "tcr": {"steps": 200, "mlp_hidden": 64, "mlp_depth": 2},
}
# no direction to check: the kernel cost's optimal plan on toy1d is the independent coupling (tests/test_knot.py);
# EGSDE starts from the source perturbed to t0 = 0.5, where alpha(t0) = 0.28 of a source's offset survives against
# noise of std 0.96 (measured corr(x, T(x)) 0.13): it promises realism and faithfulness energies, not a map
MARGINAL_ONLY = {"knot", "egsde"}
# measured failures at the settings above (2026-12-07), strict xfail: a fix makes them pass, then the entry must go
BEHAVIOUR_FAILS = {
    "dpmot": "the semi-discrete dual leaves 999 of 1,000 latent cells empty after 200 steps (989 after 1,000): every "
             "output is one target point; W2 1.38 (t_M = 0.5: 0.73)",
    "otcs-glyph": "W2 0.92 at otcs's toy setting (otcs passes; otcs-glyph with guidance=0: W2 0.40): its "
                  "classifier-free guidance (w = 3) pushes the outputs off the target marginal",
}
BEHAVING = [pytest.param(n, marks=pytest.mark.xfail(strict=True, raises=AssertionError, reason=BEHAVIOUR_FAILS[n])) if n in BEHAVIOUR_FAILS
            else n for n, c in METHODS.items() if c.family != "Reference"]


def _barycentre(m, x: torch.Tensor, draws: int = 8) -> torch.Tensor:
    if not m.stochastic:
        return _transport(m, x)
    return _transport(m, x.repeat_interleave(draws, 0)).reshape(len(x), draws, -1).mean(1)


@pytest.mark.slow
@pytest.mark.parametrize("name", BEHAVING)
def test_method_moves_a_toy_onto_its_target_in_the_right_direction(name, one_thread):
    """Marginal: the outputs are distributed as the target.  Direction: on toy1d the (barycentric) map increases
    with x, as the OT map x + 8 does (the decreasing map x -> -x also pushes P onto Q); on toy2d each source mode
    goes where its guiding pair says."""
    from bench import ot
    from bench.datasets.toy import TGT_CENTRES, Toy1D, Toy2D
    from bench.testing import fit_in_memory

    cls = METHODS[name]
    options = cls.behaviour_options
    if options is None:
        options = next((BEHAVIOUR[c.name] for c in cls.__mro__ if getattr(c, "name", None) in BEHAVIOUR), {})
    task = Toy1D() if UNPAIRED in cls.settings else Toy2D()
    data = task.load(None, 0)
    m = fit_in_memory(cls, data, **options)
    x = data.source_test
    y = _transport(m, x)
    if isinstance(task, Toy1D):
        w2 = ot.w2_empirical(y, data.target_test)
        assert w2 < 0.5, f"{name}: W2(outputs, target) = {w2:.3f} on toy1d (N(4, 1) expected)"
        if not MARGINAL_ONLY & {getattr(c, "name", None) for c in cls.__mro__}:
            corr = float(torch.corrcoef(torch.stack([x[:, 0], _barycentre(m, x)[:, 0]]))[0, 1])
            assert corr > 0.5, f"{name}: corr(x, T(x)) = {corr:.3f} on toy1d; the OT map x + 8 increases"
    else:
        near = float((torch.cdist(y, TGT_CENTRES).min(1).values < 1.0).float().mean())
        assert near > 0.9, f"{name}: {100 * near:.0f} % of outputs within 1 of a target mode"
        res = task.task_metrics(data, x, y, data.source_test_labels, None)
        assert res["upper_mode_hit"] >= 90 and res["lower_mode_hit"] >= 90, f"{name}: {res}"


def _fit_in(directory, cls, data, kill_after: int | None = None):
    return fit_until_killed(cls, data, directory, cls.test_options, kill_after)


@pytest.mark.slow
@pytest.mark.parametrize("name,kind", [(n, k) for n in METHODS for k in KINDS])
def test_a_fit_killed_after_any_checkpoint_resumes_bitwise(name, kind, tmp_path, one_thread):
    """Killed right after its first, middle or last-but-one checkpoint (images: the middle one) and run again, a
    fit ends with the model an uninterrupted fit ends with: the same transport, bit for bit (networks, optimisers,
    random streams and loop positions all travel in the checkpoint)."""
    cls = METHODS[name]
    data = _data(kind, SEMI_PAIRED if SEMI_PAIRED in cls.settings else cls.settings[0], cls)
    whole, n = _fit_in(tmp_path / "whole", cls, data)
    x = data.source_test[:8]
    expected = _transport(whole, x)
    # images: the middle checkpoint only (the image networks make each fit seconds long)
    cuts = {1, n // 2, n - 1} if kind == "vectors" else {n // 2}
    for cut in sorted(cuts - {0}) if n > 1 else []:
        d = tmp_path / f"cut{cut}"
        killed, _ = _fit_in(d, cls, data, kill_after=cut)
        assert killed is None
        resumed, _ = _fit_in(d, cls, data)
        torch.testing.assert_close(_transport(resumed, x), expected, rtol=0, atol=0,
                                   msg=lambda m: f"{name} ({kind}) resumed after checkpoint {cut} of {n}: {m}")
        assert resumed.diagnostics() == whole.diagnostics()
