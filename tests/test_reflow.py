"""ReFlow (issue 13): the toy tasks against what its paper claims there, and the translation loss of Liu et al.
2023, Sec. 5.3."""
from __future__ import annotations

import pytest
import torch

from _helpers import at_minus4 as _at_minus4, fit_by_name as _fit, target_modes as _modes, transport as _transport
from bench import ot
from bench.datasets.toy import Toy1D, Toy2D


@pytest.mark.slow
def test_reflow_toy1d_moves_minus4_to_4_and_reflow_straightens_the_paths(one_thread):
    data = Toy1D().load(None, 0)
    m = _fit("reflow", data, reflow=1, flow_steps=1200, ode_steps=50, mlp_hidden=128,
             straightness_n=256, reflow_pairs=1000)
    assert abs(float(_at_minus4(m).mean()) - 4.0) < 0.5
    assert ot.w2_empirical(_transport(m, data.source_test), data.target_test) < 0.3
    b = m.diagnostics()
    # Liu et al.: rectification straightens the flow (S of the 2-rectified flow far below the 1-rectified one)
    assert b["straightness_round1"] < 0.1 * b["straightness_round0"] and b["straightness"] == b["straightness_round1"]
    assert m.nfe == 50 and b["reflow_rounds"] == 1
    assert len(m.pair_x0) == 0  # the generated pairs do not stay in the checkpoint


@pytest.mark.slow
def test_reflow_toy2d_lands_in_the_target_modes_with_a_cheaper_coupling(one_thread):
    data = Toy2D().load(None, 0)  # semi-paired: the pairs are ignored
    m = _fit("reflow", data, flow_steps=1500, ode_steps=50, mlp_hidden=128)
    y = _transport(m, data.source_test)
    near, _ = _modes(y)
    assert near > 0.85
    # the rectified coupling is no costlier than the independent one it was trained on (their Theorem 3.5)
    cost_rectified = float((y - data.source_test).pow(2).sum(1).mean())
    cost_independent = float(torch.cdist(data.source_test, data.target_test).pow(2).mean())
    assert cost_rectified < cost_independent


# -- ReFlow's translation loss (Liu et al. 2023, Sec. 5.3) ---------------------------------------------
def _velocity(d):
    """A tiny differentiable v(x, t) on flat rows."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(d + 1, d)
    return lambda x, t: lin(torch.cat([x, t[:, None]], 1)), lin


def test_feature_loss_with_identity_h_is_the_pixel_flow_matching_loss():
    from bench import ode
    from bench.methods.reflow import feature_loss
    g = torch.Generator().manual_seed(0)
    x0, x1, t = torch.randn(32, 5, generator=g), torch.randn(32, 5, generator=g) + 3, torch.rand(32, generator=g)
    net, lin = _velocity(5)
    a = feature_loss(net, lambda x: x, x0, x1, t=t)
    ga = torch.autograd.grad(a, list(lin.parameters()))
    b = ode.flow_matching_loss(net, x0, x1, t=t)
    gb = torch.autograd.grad(b, list(lin.parameters()))
    torch.testing.assert_close(a, b)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v)


def test_feature_loss_with_a_linear_h_is_the_projected_loss():
    """h(x) = A x: grad h^T w = A w, so the loss is mean_k (A (x1 - x0 - v))_k^2; with A the projection on the
    first coordinate, the error in the other coordinates costs nothing (it is what h does not see)."""
    from bench.methods.reflow import feature_loss
    g = torch.Generator().manual_seed(1)
    x0, x1, t = torch.randn(16, 4, generator=g), torch.randn(16, 4, generator=g), torch.rand(16, generator=g)
    A = torch.randn(3, 4, generator=g)
    net, lin = _velocity(4)
    w = (x1 - x0) - net(x0 + t[:, None] * (x1 - x0), t)
    expected = (w @ A.T).pow(2).mean()
    got = feature_loss(net, lambda x: x @ A.T, x0, x1, t=t, scale=2.0)
    torch.testing.assert_close(got, 4.0 * expected)
    ge = torch.autograd.grad(4.0 * expected, list(lin.parameters()))
    gg = torch.autograd.grad(got, list(lin.parameters()))
    for u, v in zip(ge, gg):
        torch.testing.assert_close(u, v)
    e1 = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    free = lambda x, t: torch.cat([(x1 - x0)[:, :1], torch.randn(len(x), 3, generator=g)], 1)
    assert float(feature_loss(free, lambda x: x @ e1.T, x0, x1, t=t)) == pytest.approx(0.0, abs=1e-10)


def test_reflow_trains_with_the_papers_translation_loss_by_default():
    """Pinned: the default image loss is Sec. 5.3's (on every budget), declared with the authors' value and its
    source; vectors keep the plain loss (the paper's toy experiments); rows stored before the option read as
    the plain loss with the classifier options at today's values."""
    from bench.methods.reflow import ReFlow
    from bench.options import declared
    from bench.registry import get_task, options_variant
    from bench.testing import fit_in_memory, tiny_images
    for budget in ("smoke", "cpu", "fast", "paper"):
        assert ReFlow.resolve_options(budget, {})["loss"] == "classifier", budget
        assert ReFlow.resolve_options(budget, {}, "vector")["loss"] == "pixel", budget
    spec = declared(ReFlow.default_options)
    assert spec["loss"].authors == "classifier" and "Sec. 5.3" in spec["loss"].source
    assert ReFlow.options_before["loss"] == "pixel"
    old_row = {k: v for k, v in ReFlow(budget="cpu").options.items()
               if k != "loss" and not k.startswith("cls_")}
    task_options = get_task("digits")().options
    assert options_variant("reflow", "cpu", "digits", old_row, task_options) == "loss=pixel"
    m = fit_in_memory(ReFlow, tiny_images(), **ReFlow.test_options)
    assert m.uses_classifier and not any(p.requires_grad for p in m.classifier.parameters())
    assert m.diagnostics()["feature_scale"] > 0
    plain = fit_in_memory(ReFlow, tiny_images(), **{**ReFlow.test_options, "loss": "pixel"})
    assert plain.classifier is None and "feature_scale" not in plain.diagnostics()
