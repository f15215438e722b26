"""bench/ode.py (integrators, flow matching, deterministic encoders) and bench/scoremodel.py
(the shared unconditional score model and training loop) against exact answers."""
from __future__ import annotations

import math

import pytest
import torch

from bench import ode
from bench.api import BenchError, Method
from bench.diffusion import VPSDE
from bench.options import Option
from bench.context import FitContext
from bench.scoremodel import ScoreModel, diffusion_options, network_options, training_options


class GaussianEps(torch.nn.Module):
    """The exact noise predictor of data N(m, s^2 I) under the VP-SDE."""

    def __init__(self, sde, m, s):
        super().__init__()
        self.sde, self.m, self.s = sde, m, s

    def forward(self, x, t):
        shape = (-1,) + (1,) * (x.dim() - 1)
        a, sig = self.sde.alpha(t).reshape(shape), self.sde.sigma(t).reshape(shape)
        return sig * (x - a * self.m) / (a * a * self.s ** 2 + sig * sig)


@pytest.mark.parametrize("method,order", [("euler", 1), ("heun", 2)])
def test_integrators_converge_at_their_order(method, order):
    x0 = torch.tensor([[1.0], [-2.0]])
    exact = x0 * math.exp(-1.0)  # dx/dt = -x on [0, 1]
    errs = [float((ode.integrate(lambda x, t: -x, x0, 0.0, 1.0, n, method) - exact).abs().max()) for n in (10, 20, 40)]
    rates = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert all(abs(r - order) < 0.15 for r in rates), (errs, rates)
    # backwards in time undoes it, and t arrives as an (N,) tensor
    seen = []
    back = ode.integrate(lambda x, t: (seen.append(t.shape), -x)[1], exact, 1.0, 0.0, 200, method)
    assert seen[0] == (2,)
    torch.testing.assert_close(back, x0, atol=2e-2 if method == "euler" else 1e-4, rtol=0)
    assert ode.evaluations(method, 7) == 7 * order


def test_flow_matching_loss_is_zero_for_the_true_velocity_and_exact_for_a_wrong_one():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(512, 3, generator=g)
    x1 = x0 + torch.tensor([1.0, -2.0, 0.5])  # straight, parallel paths: v = x1 - x0 everywhere
    true = lambda x, t: torch.tensor([1.0, -2.0, 0.5]).expand_as(x)  # noqa: E731
    assert float(ode.flow_matching_loss(true, x0, x1, g)) < 1e-12
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    assert float(ode.flow_matching_loss(zero, x0, x1, g)) == pytest.approx((1 + 4 + 0.25) / 3, rel=1e-5)
    # the interpolation and t enter: v = t (x1 - x0) has loss E (1 - t)^2 ||d||^2 / 3 = ||d||^2 / 9
    lin = lambda x, t: t[:, None] * (x1 - x0)  # noqa: E731
    loss = float(ode.flow_matching_loss(lin, x0, x1, t=torch.rand(512, generator=g)))
    assert loss == pytest.approx(5.25 / 9, rel=0.1)
    with pytest.raises(BenchError, match="one shape"):
        ode.flow_matching_loss(zero, x0, x1[:, :2])


def test_straightness_is_zero_for_straight_flows_and_positive_for_curved_ones():
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    s, x1 = ode.straightness(lambda x, t: torch.ones_like(x), x0, 10)
    assert s < 1e-12 and torch.allclose(x1, x0 + 1, atol=1e-5)
    rot = lambda x, t: torch.stack([-x[:, 1], x[:, 0]], 1)  # noqa: E731  (circles: far from straight)
    s_rot, _ = ode.straightness(rot, x0, 50)
    assert s_rot > 0.05 * float(x0.pow(2).mean())


# measured: DDIM 100 steps latent 0.077 / cycle 0.026, 1000 steps 0.008 / 0.003; Heun 50 steps 0.006 / 1e-4
@pytest.mark.parametrize("encoder,steps,tol_latent,tol_cycle", [
    ("ddim", 100, 0.1, 0.04), ("ddim", 1000, 0.01, 0.004), ("pf-heun", 50, 0.01, 1e-3), ("pf-euler", 400, 0.01, 0.01)])
def test_deterministic_encoders_invert_and_reach_the_exact_latent(encoder, steps, tol_latent, tol_cycle):
    sde = VPSDE()
    m, s = 3.0, 0.5
    eps = GaussianEps(sde, m, s)
    x = m + s * torch.randn(256, 1, generator=torch.Generator().manual_seed(2))
    z = ode.encode(eps, x, sde, steps, encoder)
    # the probability-flow map of N(m, s^2) at T is affine: x_T = a m + sqrt(a^2 s^2 + sig^2) (x - m) / s
    T, te = torch.tensor(sde.T), torch.tensor(sde.t_eps)
    a, sig = float(sde.alpha(T)), float(sde.sigma(T))
    a0, sig0 = float(sde.alpha(te)), float(sde.sigma(te))
    expect = a * m + math.sqrt(a * a * s * s + sig * sig) * (x - a0 * m) / math.sqrt(a0 * a0 * s * s + sig0 * sig0)
    assert float((z - expect).abs().max()) < tol_latent
    back = ode.decode(eps, z, sde, steps, encoder)
    assert float((back - x).pow(2).mean().sqrt()) < tol_cycle
    assert ode.encoder_evaluations(encoder, steps) == steps * (2 if encoder == "pf-heun" else 1)
    with pytest.raises(BenchError, match="encoder must be one of"):
        ode.encode(eps, x, sde, steps, "rk45")


class _OneScoreModel(Method):
    """A throwaway method that only fits a ScoreModel (the shape EGSDE, SCONES and DDIB use)."""

    name = "one-score-model"
    state_attrs = ("model",)
    default_options = {**network_options(), **diffusion_options(),
                       **training_options("score", steps=Option(60), vector_steps=Option(300))}

    def setup(self, data, run):
        self.model = ScoreModel(data.shape[1:], self.options)

    def fit(self, data, run):
        self.model.fit(self, run, data, self.options, "score")


def _fit(tmp_path, data, cap=None, **opts):
    torch.manual_seed(0)
    m = _OneScoreModel(kind="vector", **{"mlp_hidden": 64, "mlp_depth": 2, "score_batch": 128, "score_warmup": 10, **opts})
    run = FitContext(tmp_path, device="cpu", seed=0, budget="smoke", progress=False, step_cap=cap)
    run.method = m
    m.setup(data, run)
    run.restore()
    m.fit(data, run)
    return m, run


def test_score_model_learns_a_gaussian_and_resumes_bitwise(tmp_path, one_thread):
    data = 2.0 + 0.5 * torch.randn(2000, 1, generator=torch.Generator().manual_seed(3))
    m, run = _fit(tmp_path / "full", data)
    assert run.progress["score"] == 300
    # the EMA model's noise prediction is near the exact one of N(2, 0.25) over t
    sde = m.model.sde
    exact = GaussianEps(sde, 2.0, 0.5)
    t = torch.full((400,), 0.3)
    x = sde.perturb(2.0 + 0.5 * torch.randn(400, 1), t, torch.randn(400, 1))
    with torch.no_grad():
        err = float((m.model(x, t) - exact(x, t)).pow(2).mean())
    assert err < 0.05, err
    # a run interrupted after 120 steps and resumed from its checkpoint ends with the same weights
    _fit(tmp_path / "cut", data, cap=120)
    m2, run2 = _fit(tmp_path / "cut", data)
    assert run2.progress["score"] == 300
    for (k, a), b in zip(m.model.state_dict().items(), m2.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_score_model_builds_image_networks_on_a_canvas():
    from bench.nn import UNet
    o = _OneScoreModel(unet_base=8, unet_mults=[1, 2, 2]).options
    sm = ScoreModel((1, 28, 28), o)
    assert isinstance(sm.net, UNet) and sm.work_shape == (1, 28, 28)
    sm = ScoreModel((1, 30, 30), o)  # 3 levels need a multiple of 4: padded to 32
    assert sm.work_shape == (1, 32, 32)
    x = torch.rand(2, 1, 30, 30) * 2 - 1
    assert torch.equal(sm.unprep(sm.prep(x)), x)
    with pytest.raises(BenchError, match="no network"):
        ScoreModel((2, 3), o)
