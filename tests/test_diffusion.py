"""VP-SDE closed forms, the g^2 importance sampling, EMA arithmetic and both samplers on an
exact Gaussian score."""
import math

import numpy as np
import pytest
import torch
from scipy import integrate

from bench.api import BenchError
from bench.diffusion import (EMA, VPSDE, Chunked, Guided, in_rows, NullCondition, VOutput, dsm_eval, dsm_loss, sample_ddim,
                             sample_sde)


def test_alpha_sigma_closed_form_matches_integrated_beta():
    sde = VPSDE(beta_min=0.1, beta_max=20.0)
    t = torch.linspace(0.0, 1.0, 21, dtype=torch.float64)
    a, s = sde.alpha(t), sde.sigma(t)
    assert torch.allclose(a ** 2 + s ** 2, torch.ones_like(t), atol=1e-12)
    for ti, ai in zip(t.tolist(), a.tolist()):
        B, _ = integrate.quad(lambda u: float(sde.beta(torch.tensor(u, dtype=torch.float64))), 0.0, ti)
        assert ai == pytest.approx(math.exp(-0.5 * B), rel=1e-9)
    # the SDE's mean ODE d alpha/dt = -beta alpha / 2, checked by finite differences
    h = 1e-6
    tm = torch.tensor([0.3, 0.7], dtype=torch.float64)
    d = (sde.alpha(tm + h) - sde.alpha(tm - h)) / (2 * h)
    assert torch.allclose(d, -0.5 * sde.beta(tm) * sde.alpha(tm), rtol=1e-6)
    x0, z = torch.randn(5, 3), torch.randn(5, 3)
    tt = torch.rand(5)
    xt = sde.perturb(x0, tt, z)
    assert torch.allclose(xt, sde.alpha(tt)[:, None] * x0 + sde.sigma(tt)[:, None] * z)


def test_g2_density_cdf_and_inverse():
    sde = VPSDE()
    w = lambda t: float(sde.beta(torch.tensor(t, dtype=torch.float64)) / sde.sigma(torch.tensor(t, dtype=torch.float64)) ** 2)
    Z, _ = integrate.quad(w, sde.t_eps, sde.T, points=[0.01, 0.1], limit=200)
    assert sde.g2_normaliser == pytest.approx(Z, rel=1e-8)
    for t in (0.002, 0.05, 0.5, 0.9):
        part, _ = integrate.quad(w, sde.t_eps, t, limit=200)
        assert float(sde.g2_cdf(torch.tensor(t))) == pytest.approx(part / Z, rel=1e-7)
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.allclose(sde.g2_cdf(sde.g2_icdf(u)), u, atol=1e-10)
    assert float(sde.g2_icdf(torch.tensor(0.0, dtype=torch.float64))) == pytest.approx(sde.t_eps, rel=1e-9)
    assert float(sde.g2_icdf(torch.tensor(1.0, dtype=torch.float64))) == pytest.approx(sde.T, rel=1e-9)


class _FixedNet(torch.nn.Module):
    """A fixed, deliberately imperfect eps-predictor."""

    def forward(self, x, t):
        return 0.7 * x + torch.sin(3 * t)[:, None]


def test_importance_sampled_g2_loss_is_unbiased():
    sde = VPSDE()
    net = _FixedNet()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(400_000, 2, generator=g) * 0.5 + 1.0
    is_est = dsm_loss(net, x0, sde, weighting="g2", generator=g, reduce=False)
    # plain estimator: t ~ U[t_eps, T], weight g^2 / sigma^2 (huge variance near t_eps), computed
    # with the exact conditional expectation over z to keep its variance manageable:
    # E_z ||0.7 (a x0 + s z) + c - z||^2 / d = mean_d (0.7 a x0 + c)^2 + (0.7 s - 1)^2
    t = sde.t_eps + (sde.T - sde.t_eps) * torch.rand(x0.shape[0], generator=g, dtype=torch.float64)
    a, s = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
    c = torch.sin(3 * t)[:, None]
    cond_mse = ((0.7 * a * x0.double() + c) ** 2 + (0.7 * s - 1) ** 2).mean(1)
    plain = sde.beta(t) / sde.sigma(t) ** 2 * cond_mse
    # exact value of E_t[w(t) E_{x0,z} loss] by quadrature (x0 moments are known)
    m2 = 0.25 + 1.0
    def integrand(tv):
        tv_t = torch.tensor(tv, dtype=torch.float64)
        a_, s_ = float(sde.alpha(tv_t)), float(sde.sigma(tv_t))
        cc = math.sin(3 * tv)
        inner = 0.49 * a_ ** 2 * m2 + 2 * 0.7 * a_ * 1.0 * cc + cc ** 2 + (0.7 * s_ - 1) ** 2
        return float(sde.beta(tv_t)) / s_ ** 2 * inner
    exact, _ = integrate.quad(integrand, sde.t_eps, sde.T, points=[0.01, 0.1], limit=200)
    exact /= sde.T - sde.t_eps
    se_is = float(is_est.std()) / math.sqrt(len(is_est))
    assert abs(float(is_est.mean()) - exact) < 4 * se_is + 1e-3 * exact
    se_plain = float(plain.std()) / math.sqrt(len(plain))
    assert abs(float(plain.mean()) - exact) < 4 * se_plain + 1e-3 * exact
    # and the importance-sampled estimator has a much smaller variance than the plain one with
    # sampled noise (whose variance grows like 1/t_eps)
    z = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    plain_z = sde.beta(t) / sde.sigma(t) ** 2 * ((0.7 * (a * x0 + s * z) + c - z) ** 2).mean(1)
    assert float(is_est.std()) < 0.5 * float(plain_z.std())


def test_sigma2_loss_is_eps_mse_and_perfect_net_gives_zero():
    sde = VPSDE()
    g = torch.Generator().manual_seed(1)
    x0 = torch.zeros(64, 3)

    class Oracle(torch.nn.Module):  # x0 = 0 exactly, so eps = x_t / sigma
        def forward(self, x, t):
            return x / sde.sigma(t)[:, None]

    assert float(dsm_loss(Oracle(), x0, sde, weighting="sigma2", generator=g)) < 1e-10
    assert float(dsm_loss(Oracle(), x0, sde, weighting="g2", generator=g)) < 1e-8
    assert dsm_eval(Oracle(), x0, sde, n_t=4, generator=g) < 1e-8

    class Zero(torch.nn.Module):
        def forward(self, x, t):
            return torch.zeros_like(x)

    # eps_hat = 0: sigma2 loss = E||z||^2/d = 1; J_CSM = Z * d
    l = dsm_loss(Zero(), torch.zeros(20000, 3), sde, weighting="sigma2", generator=g)
    assert float(l) == pytest.approx(1.0, abs=0.03)
    j = dsm_eval(Zero(), torch.zeros(4000, 3), sde, n_t=8, generator=g)
    assert j == pytest.approx(sde.g2_normaliser * 3, rel=0.03)
    with pytest.raises(Exception):
        dsm_loss(Zero(), x0, sde, weighting="bogus")


def test_ema_arithmetic():
    lin = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema = EMA(lin, decay=0.9, warmup=False)
    assert not any(p.requires_grad for p in ema.parameters())
    for value in (2.0, 3.0):
        with torch.no_grad():
            lin.weight.fill_(value)
        ema.update(lin)
    # 1 -> 0.9*1 + 0.1*2 = 1.1 -> 0.9*1.1 + 0.1*3 = 1.29
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 1.29))
    assert torch.allclose(ema(torch.ones(1, 2)), torch.tensor([[2.58]]))
    # the state dict (weights and update counter) round-trips through a fresh EMA
    other = EMA(torch.nn.Linear(2, 1, bias=False), decay=0.9, warmup=False)
    other.load_state_dict(ema.state_dict())
    assert torch.allclose(other.module.weight, ema.module.weight) and int(other.num_updates) == 2


def test_ema_warmup_arithmetic():
    lin = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(0.0)
    ema = EMA(lin, decay=0.999)
    expected = 0.0
    for n, value in enumerate((4.0, 8.0, 2.0)):
        d = min(0.999, (1 + n) / (10 + n))  # 0.1, 2/11, 3/12
        expected = d * expected + (1 - d) * value
        with torch.no_grad():
            lin.weight.fill_(value)
        ema.update(lin)
    assert float(ema.module.weight) == pytest.approx(expected, rel=1e-6)
    # after a reload the counter (hence the rate) continues where it was
    other = EMA(torch.nn.Linear(1, 1, bias=False), decay=0.999)
    other.load_state_dict(ema.state_dict())
    assert other.current_decay() == pytest.approx(4 / 13)


def _gaussian_eps(sde, m, s):
    """Exact eps-predictor for x0 ~ N(m, s^2 I): x_t ~ N(alpha m, alpha^2 s^2 + sigma^2)."""
    def eps(x, t):
        a, sg = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
        return sg * (x - a * m) / (a ** 2 * s ** 2 + sg ** 2)
    return eps


@pytest.mark.parametrize("sampler", ["sde", "ddim", "ancestral"])
def test_samplers_reproduce_gaussian_with_exact_score(sampler):
    sde = VPSDE()
    m, s = 1.5, 0.4
    net = _gaussian_eps(sde, m, s)
    g = torch.Generator().manual_seed(2)
    calls = []

    def counted(x, t):
        calls.append(1)
        return net(x, t)

    shape = (20000, 2)
    if sampler == "sde":
        x = sample_sde(counted, shape, sde, steps=200, generator=g)
    else:
        x = sample_ddim(counted, shape, sde, steps=100, generator=g, eta=1.0 if sampler == "ancestral" else 0.0)
    assert len(calls) == (200 if sampler == "sde" else 100)
    assert float(x.mean()) == pytest.approx(m, abs=0.03)
    assert float(x.std()) == pytest.approx(s, abs=0.03)


def test_ddim_deterministic_and_partial_start():
    sde = VPSDE()
    m, s = -0.5, 0.3
    net = _gaussian_eps(sde, m, s)
    g = torch.Generator().manual_seed(3)
    xT = torch.randn(5000, 1, generator=g)
    a = sample_ddim(net, xT.shape, sde, steps=25, x_T=xT)
    b = sample_ddim(net, xT.shape, sde, steps=25, x_T=xT, generator=torch.Generator().manual_seed(99))
    assert torch.equal(a, b)
    # the deterministic DDIM map is monotone in 1-D (an ODE flow map)
    order = torch.argsort(xT[:, 0])
    assert bool((a[order, 0].diff() >= 0).all())
    # start from an intermediate level: diffuse exact data to t_M, then 10 steps back
    tM = torch.tensor(0.5)
    x0 = m + s * torch.randn(20000, 1, generator=g)
    xt = sde.perturb(x0, tM.expand(len(x0)), torch.randn(x0.shape, generator=g))
    calls = []
    out = sample_ddim(lambda x, t: (calls.append(1), net(x, t))[1], xt.shape, sde, steps=40, x_T=xt, t_start=0.5)
    assert len(calls) == 40
    assert float(out.mean()) == pytest.approx(m, abs=0.02)
    assert float(out.std()) == pytest.approx(s, abs=0.02)
    out2 = sample_sde(net, xt.shape, sde, steps=50, x_T=xt, t_start=0.5, generator=g)
    assert float(out2.mean()) == pytest.approx(m, abs=0.02)
    assert float(out2.std()) == pytest.approx(s, abs=0.03)


def test_ddim_clip_x0_keeps_a_wrong_model_in_range_and_an_exact_one_unchanged():
    """x0_hat = (x - sigma eps) / alpha divides by alpha(T) ~ 7e-3, so a noise model that is wrong near T
    (here the extreme case eps = 0) sends unclipped DDIM far outside the data range; with clip_x0 every x0_hat is
    in [-1, 1] and so is the output, up to the last step's sigma(t_eps) eps.  For the exact model of data well
    inside [-1, 1] (N(0, 0.25^2)) clipping changes almost nothing."""
    sde = VPSDE()
    exact = _gaussian_eps(sde, 0.0, 0.25)
    xT = torch.randn(2000, 1, generator=torch.Generator().manual_seed(5))
    wild = sample_ddim(lambda x, t: torch.zeros_like(x), xT.shape, sde, steps=25, x_T=xT)
    tame = sample_ddim(lambda x, t: torch.zeros_like(x), xT.shape, sde, steps=25, x_T=xT, clip_x0=True)
    assert float(wild.abs().max()) > 10.0
    assert float(tame.abs().max()) <= 1.0 + 4 * float(sde.sigma(torch.tensor(sde.t_eps)))
    a = sample_ddim(exact, xT.shape, sde, steps=25, x_T=xT, clip_x0=True)
    b = sample_ddim(exact, xT.shape, sde, steps=25, x_T=xT)
    assert float((a - b).abs().max()) < 0.01


def test_voutput_turns_the_exact_velocity_into_the_exact_noise_and_is_exact_near_T():
    sde = VPSDE()
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(6, 1, 4, 4, generator=g) * 2 - 1
    z = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0.001, 0.1, 0.3, 0.5, 0.9, 1.0])
    xt = sde.perturb(x0, t, z)
    a, s = sde.alpha(t)[:, None, None, None], sde.sigma(t)[:, None, None, None]
    v = a * z - s * x0
    assert torch.allclose(VOutput(lambda x, tt: v, sde)(xt, t), z, atol=1e-5)
    # a velocity network off by 1 everywhere: the noise error is alpha(t), tiny at T, where a direct noise
    # predictor would have to reproduce x_t through the whole network
    err = (VOutput(lambda x, tt: v + 1.0, sde)(xt, t) - z).flatten(1).mean(1)
    assert torch.allclose(err, a.flatten(), atol=1e-5)
    assert float(err[-1]) < 0.01
    # a scalar t and a condition pass through
    cond_seen = []
    out = VOutput(lambda x, tt, c: cond_seen.append(c) or torch.zeros_like(x), sde)(xt, 0.5, "c")
    assert cond_seen == ["c"] and torch.allclose(out, float(sde.sigma(torch.tensor(0.5))) * xt)


def test_v_weighting_is_the_velocity_mse():
    sde = VPSDE()
    x0 = torch.rand(512, 3) * 2 - 1

    class Zero(torch.nn.Module):  # v_hat = 0: its velocity MSE is mean(v^2) for each sample
        def forward(self, x, t):
            return torch.zeros_like(x)

    net = VOutput(Zero(), sde)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    per = dsm_loss(net, x0, sde, weighting="v", generator=g1, reduce=False)
    t, _ = sde.sample_t(len(x0), "v", generator=g2)
    z = torch.randn(x0.shape, generator=g2)
    v = sde.alpha(t)[:, None] * z - sde.sigma(t)[:, None] * x0
    assert torch.allclose(per, v.pow(2).mean(1), rtol=1e-4, atol=1e-6)


class _Affine(torch.nn.Module):
    """eps(x, t, c) = a x + b t + C c: a conditional 'noise predictor' whose every output is known."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.C = torch.nn.Parameter(torch.tensor(0.5)), torch.nn.Parameter(torch.tensor(2.0)), 3.0

    def forward(self, x, t, c):
        return self.a * x + self.b * t[:, None] + self.C * c


def test_null_condition_drops_rows_and_guidance_extrapolates_away_from_the_null():
    nc = NullCondition(_Affine(), (2,))
    with torch.no_grad():
        nc.null.fill_(-1.0)
    x, c, t = torch.randn(5, 2), torch.randn(5, 2), torch.rand(5)
    assert torch.equal(nc(x, t, c), nc.net(x, t, c))  # calling it is the plain conditional model
    # guided = (1 + w) eps(c) - w eps(null), scalar t accepted
    for w in (0.0, 1.0, 3.0):
        want = (1 + w) * nc.net(x, t, c) - w * nc.net(x, t, torch.full_like(c, -1.0))
        assert torch.allclose(Guided(nc, w)(x, t, c), want, atol=1e-6)
    assert torch.allclose(Guided(nc, 2.0)(x, torch.tensor(0.3), c), Guided(nc, 2.0)(x, torch.full((5,), 0.3), c))
    # an EMA of a NullCondition model guides with the averaged null
    ema = EMA(nc)
    assert torch.allclose(Guided(ema, 2.0)(x, t, c), Guided(nc, 2.0)(x, t, c), atol=1e-6)
    # drop: p = 0 keeps every row, the share replaced follows p, and the null gets a gradient
    g = torch.Generator().manual_seed(0)
    assert torch.equal(nc.drop(c, 0.0, g), c)
    cc = torch.randn(4000, 2)
    out = nc.drop(cc, 0.25, g)
    dropped = (out == nc.null).all(1)
    assert abs(float(dropped.float().mean()) - 0.25) < 0.03
    assert torch.equal(out[~dropped], cc[~dropped])  # the kept rows are untouched
    nc.drop(c, 0.9999, g).sum().backward()
    assert nc.null.grad is not None and float(nc.null.grad.abs().sum()) > 0
    # a model without a null condition cannot be guided
    with pytest.raises(BenchError, match="cond_drop"):
        Guided(_Affine(), 1.0)


class _RowCounter(torch.nn.Module):
    """Records the batch size of every call; a row's output depends on that row only."""

    def __init__(self):
        super().__init__()
        self.calls, self.w = [], torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x, t, c=None):
        self.calls.append(x.shape[0])
        return self.w * x + t.reshape(-1, *(1,) * (x.dim() - 1)) + (0 if c is None else c)


def test_chunked_evaluates_at_most_rows_at_a_time_without_gradient_and_is_the_same_function():
    net = _RowCounter()
    x, c, t = torch.randn(10, 1, 2, 3), torch.randn(10, 1, 2, 3), torch.rand(10)
    with torch.no_grad():
        want = net(x, t, c)
        net.calls.clear()
        got = Chunked(net, 4)(x, t, c)
        assert net.calls == [4, 4, 2] and torch.equal(got, want)
        net.calls.clear()  # a scalar t is spread over the rows; no condition is passed through as none
        assert torch.equal(Chunked(net, 4)(x, torch.tensor(0.3)), net(x, torch.full((10,), 0.3)))
        assert net.calls == [4, 4, 2, 10]
    net.calls.clear()
    Chunked(net, 4)(x, t, c).sum().backward()  # training: one call, the graph as without the wrapper
    assert net.calls == [10] and net.w.grad is not None


def test_in_rows_splits_images_on_the_cpu_only():
    net, t = _RowCounter(), torch.rand(10)
    with torch.no_grad():
        in_rows(net, torch.randn(10, 3), t, rows=4)  # vectors (an MLP): one call
        assert net.calls == [10]
        img = torch.randn(10, 1, 2, 2, device="meta")  # not on the CPU: one call unless told otherwise
        in_rows(net, img, t.to("meta"), rows=4)
        in_rows(net, img, t.to("meta"), rows=4, cpu_only=False)
        assert net.calls == [10, 10, 4, 4, 2]
        net.calls.clear()
        x = torch.randn(10, 1, 2, 2)
        assert torch.equal(in_rows(net, x, t, rows=4), net(x, t)) and net.calls == [4, 4, 2, 10]


def test_grad_in_rows_is_the_whole_batch_gradient_taken_rows_at_a_time():
    from bench.diffusion import grad_in_rows
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 3, 3, padding=1)
    sizes = []

    def energy(y, x_t, t):  # one value per row; x_t and t are sliced with y
        sizes.append((y.shape[0], x_t.shape[0], t.shape[0]))
        return (conv(y) * conv(x_t)).flatten(1).sum(1) * t + y.pow(2).flatten(1).sum(1)

    y, x_t, t = torch.randn(10, 1, 4, 4), torch.randn(10, 1, 4, 4), torch.rand(10)
    with torch.no_grad():  # called from a sampler that takes no gradient itself
        got = grad_in_rows(energy, y, x_t, t, rows=4)
    assert sizes == [(4, 4, 4), (4, 4, 4), (2, 2, 2)]
    y_req = y.clone().requires_grad_(True)
    want, = torch.autograd.grad(energy(y_req, x_t, t).sum(), y_req)
    assert torch.allclose(got, want, atol=1e-5) and not got.requires_grad
    sizes.clear()
    grad_in_rows(energy, y, x_t, t, rows=16)  # fewer rows than a chunk: one call
    assert sizes == [(10, 10, 10)]


def test_score_model_samples_in_cpu_rows_and_matches_one_call():
    from bench.diffusion import CPU_ROWS
    from bench.scoremodel import ScoreModel
    o = {"unet_base": 8, "unet_mults": [1, 2], "unet_blocks": 1, "unet_attention": [], "score_ema": 0.99,
         "beta_min": 0.1, "beta_max": 20.0}
    torch.manual_seed(0)
    m = ScoreModel((1, 8, 8), o).eval()
    seen = []
    m.ema.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    x, t = torch.randn(CPU_ROWS + 5, 1, 8, 8), torch.rand(CPU_ROWS + 5)
    with torch.no_grad():
        got, want = m(x, t), m.ema(x, t)
    assert seen == [CPU_ROWS, 5, CPU_ROWS + 5]
    assert torch.allclose(got, want, atol=1e-5)
