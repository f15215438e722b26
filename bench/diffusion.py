"""Variance-preserving SDE (Song et al. 2021), denoising score matching, EMA and samplers.

Forward SDE: dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw on [0, T], beta(t) = b0 + t (b1 - b0).
With B(t) = int_0^t beta = b0 t + (b1 - b0) t^2 / 2 the perturbation kernel is
    x_t = alpha(t) x_0 + sigma(t) z,   alpha = exp(-B/2),   sigma = sqrt(1 - exp(-B)),
so alpha^2 + sigma^2 = 1.  Networks predict the noise: ``net(x_t, t, cond) ~ z`` and the score
is ``-net(x_t, t, cond) / sigma(t)``.  ``VOutput`` wraps a network that predicts the velocity
v = alpha z - sigma x_0 instead and returns the noise it implies, z_hat = sigma x_t + alpha v_hat, so
losses and samplers see a noise predictor either way.  ``NullCondition`` / ``Guided``: classifier-free
guidance (a learned null condition dropped in during training, the guided noise at sampling).

Denoising score matching with weight lambda(t) on t ~ U[t_eps, T]:
    lambda(t) E || s(x_t, t) - grad log p(x_t | x_0) ||^2 = lambda(t) / sigma(t)^2 E || eps_hat - z ||^2.

* ``weighting="sigma2"``: lambda = sigma^2, i.e. the plain eps-MSE with t ~ U[t_eps, T].
* ``weighting="v"``: lambda = sigma^2 / alpha^2, i.e. the MSE of the velocity v = alpha z - sigma x_0
  (Salimans & Ho 2022): eps_hat - z = alpha (v_hat - v), so the v-MSE is the eps-MSE over alpha^2;
  it weights the large t, where a sample's overall shape is decided, far more than the eps-MSE.
* ``weighting="g2"``: lambda = g(t)^2 = beta(t) (the likelihood weighting used by OTCS).  The
  per-t weight w(t) = beta(t) / sigma(t)^2 blows up like 1/t near 0, so sampling t uniformly
  gives an estimator with a huge variance.  We importance-sample t from q(t) = w(t) / Z on
  [t_eps, T].  Because dB/dt = beta,
      int w dt = int dB / (1 - e^{-B}) = log(e^B - 1) + const,
  so the CDF and its inverse are closed-form:
      F(t) = [log(e^{B(t)} - 1) - L0] / Z,   L0 = log(e^{B(t_eps)} - 1),   Z = log(e^{B(T)} - 1) - L0,
      F^{-1}(u): B = softplus(L0 + u Z), then t solves b0 t + (b1 - b0) t^2 / 2 = B.
  The unbiased estimator of E_{t~U}[w(t) L(t)] is then Z / (T - t_eps) * L(t) with t ~ q, whose
  weight is constant.  (``tests/test_diffusion.py`` checks the CDF against quadrature and the
  estimator's mean against the uniform-t estimator.)

Reductions: ``dsm_loss`` averages over data dimensions (a scale that does not grow with image
size; it is what training minimises); ``dsm_eval`` reports the score-matching objective
J_CSM = int_{t_eps}^T g(t)^2 E || s - grad log p ||^2 dt summed over dimensions, the quantity
in OTCS's Theorem 2.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .errors import BenchError


class VPSDE:
    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, T: float = 1.0, t_eps: float = 1e-3):
        if not (0 < t_eps < T) or beta_min <= 0 or beta_max < beta_min:
            raise BenchError("VPSDE needs 0 < t_eps < T and 0 < beta_min <= beta_max")
        self.beta_min, self.beta_max, self.T, self.t_eps = float(beta_min), float(beta_max), float(T), float(t_eps)
        # constants of the g^2 importance-sampling density (float64 host math, once)
        self._L0 = self._log_expm1(self._B(self.t_eps))
        self._Z = self._log_expm1(self._B(self.T)) - self._L0

    # -- schedule ----------------------------------------------------------------------------
    def _B(self, t):
        """Integrated beta: int_0^t beta(s) ds."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    @staticmethod
    def _log_expm1(b: float) -> float:
        return b + math.log(-math.expm1(-b))

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(-0.5 * self._B(t))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(-torch.expm1(-self._B(t)))

    def perturb(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (x0.dim() - 1)
        return self.alpha(t).reshape(shape) * x0 + self.sigma(t).reshape(shape) * noise

    def prior(self, shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        if device is None and generator is not None:
            device = generator.device
        return torch.randn(shape, generator=generator, device=device)

    # -- the g^2 / sigma^2 importance-sampling density on [t_eps, T] -------------------------
    @property
    def g2_normaliser(self) -> float:
        """Z = int_{t_eps}^T beta(t) / sigma(t)^2 dt."""
        return self._Z

    def g2_density(self, t: torch.Tensor) -> torch.Tensor:
        """q(t) = beta(t) / (sigma(t)^2 Z) on [t_eps, T]."""
        return self.beta(t) / (self.sigma(t) ** 2 * self._Z)

    def g2_cdf(self, t: torch.Tensor) -> torch.Tensor:
        b = self._B(t.double())
        return ((b + torch.log(-torch.expm1(-b))) - self._L0) / self._Z

    def g2_icdf(self, u: torch.Tensor) -> torch.Tensor:
        """Inverse CDF of q (float64 inside for accuracy near t_eps)."""
        b = torch.nn.functional.softplus(self._L0 + u.double() * self._Z)
        return self._time_of_B(b).clamp(self.t_eps, self.T).to(u.dtype)

    def _time_of_B(self, b: torch.Tensor) -> torch.Tensor:
        """The t with int_0^t beta = b (the positive root of b0 t + (b1 - b0) t^2 / 2 = b)."""
        d = self.beta_max - self.beta_min
        if d == 0:
            return b / self.beta_min
        return (torch.sqrt(self.beta_min ** 2 + 2.0 * d * b) - self.beta_min) / d

    def ve_time(self, sigma_ve: torch.Tensor) -> torch.Tensor:
        """The time t whose noise-to-signal ratio sigma(t) / alpha(t) is ``sigma_ve``: x_t / alpha(t) is
        then a variance-exploding sample x_0 + sigma_ve z (NCSN's noise levels on this schedule); its
        score is -eps(x_t, t) / sigma_ve.  sigma_ve must lie in [sigma/alpha at t_eps, at T]."""
        s = torch.as_tensor(sigma_ve, dtype=torch.float64)
        return self._time_of_B(torch.log1p(s * s)).float()

    def sample_t(self, n: int, weighting: str, generator=None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Times and the per-sample weight multiplying mean(||eps_hat - z||^2) for an unbiased
        estimate of E_{t~U[t_eps,T]} [lambda(t)/sigma(t)^2 mean||eps_hat - z||^2]."""
        u = torch.rand(n, generator=generator, device=device)
        if weighting == "g2":
            t = self.g2_icdf(u)
            w = torch.full_like(t, self._Z / (self.T - self.t_eps))
        elif weighting == "sigma2":
            t = self.t_eps + (self.T - self.t_eps) * u
            w = torch.ones_like(t)
        elif weighting == "v":
            t = self.t_eps + (self.T - self.t_eps) * u
            w = self.alpha(t).pow(-2)
        else:
            raise BenchError(f"dsm weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        return t, w


WEIGHTINGS = ("sigma2", "g2", "v")


def _per_row(t, x: torch.Tensor) -> torch.Tensor:
    """Diffusion time(s) as one float32 value per row of x (a scalar or a 1-element t is broadcast)."""
    t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
    return t.reshape(1).expand(x.shape[0]) if t.dim() == 0 or t.numel() == 1 else t


class VOutput(nn.Module):
    """A noise predictor built from a velocity network: z_hat(x_t) = sigma(t) x_t + alpha(t) v_theta(x_t, t[, cond]).

    The same function class as predicting z directly, differently conditioned: near T (alpha -> 0) the
    identity part sigma x_t is exact and the network's error is scaled by alpha, where a direct noise
    predictor has to carry x_t through the whole UNet and leaves an error floor that a sampler divides
    by alpha (results/digits/PROTOCOL.md, "error near T")."""

    def __init__(self, net: nn.Module, sde: "VPSDE"):
        super().__init__()
        self.net, self.sde = net, sde

    def forward(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        t = _per_row(t, x)
        shape = (-1,) + (1,) * (x.dim() - 1)
        a, s = self.sde.alpha(t).reshape(shape), self.sde.sigma(t).reshape(shape)
        # float32 out: under bf16 autocast, rounding the identity part sigma x_t to bf16 would cost a
        # sampler ~4e-3 / alpha in x0 near T, the error floor this parameterisation removes
        return s * x.float() + a * _call(self.net, x, t, cond).float()


class NullCondition(nn.Module):
    """A conditional noise predictor that also knows a learned *null* condition, for classifier-free
    guidance (Ho & Salimans 2022).

    Training replaces each pair's condition by the null with probability p (``drop``), so one network
    learns both eps(x_t, t, c) and eps(x_t, t, null) = the unconditional noise predictor.  Calling the
    module is the plain conditional predictor; ``Guided(module, w)`` is the guided one.  The null is a
    parameter with the condition's shape, so the wrapped network (UNet in either conditioning mode,
    ScoreMLP) is used unchanged."""

    def __init__(self, net: nn.Module, cond_shape: tuple[int, ...]):
        super().__init__()
        self.net = net
        self.null = nn.Parameter(torch.zeros(1, *cond_shape))

    def forward(self, x: torch.Tensor, t, cond: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, cond)

    def drop(self, cond: torch.Tensor, p: float, generator=None) -> torch.Tensor:
        """``cond`` with each row replaced by the null with probability ``p`` (differentiable in the null)."""
        keep = torch.rand(cond.shape[0], generator=generator, device=cond.device) >= p
        return torch.where(keep.reshape(-1, *(1,) * (cond.dim() - 1)), cond, self.null.to(cond.dtype))


class Guided(nn.Module):
    """eps_w(x_t, t, c) = (1 + w) eps(x_t, t, c) - w eps(x_t, t, null) for a ``NullCondition`` model (or
    an EMA of one): the score of p(y | c)^(1 + w) / p(y)^w, which sharpens the conditional towards what
    distinguishes c from the marginal.  Two network calls per step; w = 0 is the conditional model."""

    def __init__(self, model: nn.Module, scale: float):
        super().__init__()
        self.model, self.scale = model, float(scale)
        inner = getattr(model, "module", model)  # an EMA holds the averaged copy in .module
        if not isinstance(inner, NullCondition):
            raise BenchError("guidance needs a model trained with a null condition (cond_drop > 0)")
        self.null = inner.null

    def forward(self, x: torch.Tensor, t, cond: torch.Tensor) -> torch.Tensor:
        n, t = x.shape[0], _per_row(t, x)
        null = self.null.to(cond.dtype).expand(n, *cond.shape[1:])
        # two calls of n rows, not one of 2n: on the CPU a UNet's cost per row grows with the batch
        # (studies/cpu_perf/guided_cpu.py); on a GPU the two layouts have not been compared
        e_c, e_u = self.model(x, t, cond).float(), self.model(x, t, null).float()
        return e_c + self.scale * (e_c - e_u)


CPU_ROWS = 128  # rows per network call on the CPU (studies/cpu_perf/perf_cpu.md, "Transport: rows per network call")


def _splits(x: torch.Tensor, rows: int, cpu_only: bool = True) -> bool:
    """Whether a batch is worth cutting into ``rows``-row calls: images (conv nets; the slowdown with batch size
    was measured on them only), more rows than a chunk, and, with ``cpu_only``, on the CPU."""
    return x.dim() == 4 and x.shape[0] > rows and (not cpu_only or x.device.type == "cpu")


def in_rows(net, x: torch.Tensor, t, cond=None, rows: int = CPU_ROWS, cpu_only: bool = True) -> torch.Tensor:
    """``net(x, t[, cond])`` evaluated ``rows`` rows a call when no gradient is taken and ``x`` is a batch
    of images (and, with ``cpu_only``, on the CPU); the same function, called on slices.  Vectors (MLPs)
    go in one call: the slowdown with batch size was measured on conv nets only."""
    if torch.is_grad_enabled() or not _splits(x, rows, cpu_only):
        return _call(net, x, t, cond)
    t = _per_row(t, x)
    return torch.cat([_call(net, x[i:i + rows], t[i:i + rows], None if cond is None else cond[i:i + rows])
                      for i in range(0, x.shape[0], rows)])


def grad_in_rows(energy, y: torch.Tensor, *args, rows: int = CPU_ROWS) -> torch.Tensor:
    """d/dy of ``energy(y, *args).sum()`` for an energy of one value per row, taken ``rows`` rows at a time
    on the CPU (every tensor in ``args`` is sliced with ``y``); the same gradient, since row i's energy
    depends on row i only.  Like ``in_rows``, it keeps a conv net's activations (and here their backward)
    inside the caches; on an accelerator, or for vectors, one call."""
    def one(yy, aa):
        with torch.enable_grad():
            y_req = yy.detach().requires_grad_(True)
            g, = torch.autograd.grad(energy(y_req, *aa).sum(), y_req)
        return g
    n = y.shape[0]
    if not _splits(y, rows):
        return one(y, args)
    sl = lambda a, i: a[i:i + rows] if torch.is_tensor(a) and a.dim() > 0 and a.shape[0] == n else a
    return torch.cat([one(y[i:i + rows], [sl(a, i) for a in args]) for i in range(0, n, rows)])


class Chunked(nn.Module):
    """Evaluates a network on images ``rows`` rows at a time when no gradient is taken (``in_rows``, on
    any device); the same function.

    On the CPU a conv net's time per row grows with the batch once its activations leave the caches
    (studies/cpu_perf/perf_cpu.md, "Transport: rows per network call").  A sampler keeps drawing its noise
    for the whole batch, so its random stream does not depend on ``rows``."""

    def __init__(self, net: nn.Module, rows: int):
        super().__init__()
        self.net, self.rows = net, int(rows)

    def forward(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        return in_rows(self.net, x, t, cond, self.rows, cpu_only=False)


def cpu_chunked(net: nn.Module, device: torch.device, rows: int = CPU_ROWS) -> nn.Module:
    """``Chunked(net, rows)`` on the CPU, ``net`` itself on an accelerator (where large batches pay)."""
    return Chunked(net, rows) if torch.device(device).type == "cpu" else net


def _call(net, x, t, cond):
    return net(x, t) if cond is None else net(x, t, cond)


def dsm_loss(net, x0: torch.Tensor, sde: VPSDE, cond=None, weighting: str = "g2", generator=None,
             reduce: bool = True) -> torch.Tensor:
    """Denoising score-matching loss (eps parametrisation); see the module docstring."""
    n = x0.shape[0]
    t, w = sde.sample_t(n, weighting, generator=generator, device=x0.device)
    z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    xt = sde.perturb(x0, t, z)
    eps = _call(net, xt, t, cond)
    per = (eps.float() - z.float()).pow(2).flatten(1).mean(1) * w
    return per.mean() if reduce else per


def mixture_eps(y_t: torch.Tensor, Y: torch.Tensor, w: torch.Tensor, a, s) -> torch.Tensor:
    """Exact noise predictor of the noised finite mixture sum_j w_j N(a Y_j, s^2 I) at y_t: (y_t - a ybar) / s,
    ybar the posterior mean sum_j r_j Y_j with r = softmax_j(log w_j - ||y_t - a Y_j||^2 / (2 s^2)).
    y_t (B, D) and Y (m, D) flat, w (m,) summing to 1; a, s floats or (B, 1) tensors (one t per query)."""
    sq = y_t.pow(2).sum(1, keepdim=True) - 2 * a * (y_t @ Y.T) + (a * a) * Y.pow(2).sum(1)[None]
    resp = torch.softmax(torch.log(w.clamp_min(1e-30))[None] - sq / (2 * s * s), dim=1)
    return (y_t - a * (resp @ Y)) / s


@torch.no_grad()
def dsm_eval(net, x0: torch.Tensor, sde: VPSDE, cond=None, n_t: int = 16, generator=None) -> float:
    """Held-out J_CSM = int_{t_eps}^T g^2 E||s_theta - grad log p(x_t|x_0)||^2 dt (sum over dims).

    ``n_t`` stratified draws of u per sample through the g^2 inverse CDF (lower variance than
    independent draws, same expectation)."""
    total, count = 0.0, 0
    for k in range(n_t):
        u = (k + torch.rand(x0.shape[0], generator=generator, device=x0.device)) / n_t
        t = sde.g2_icdf(u)
        z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        eps = _call(net, sde.perturb(x0, t, z), t, cond)
        total += float((eps.float() - z.float()).pow(2).flatten(1).sum(1).sum().item())
        count += x0.shape[0]
    return sde.g2_normaliser * total / count


class EMA(nn.Module):
    """Exponential moving average of a model's parameters: ema <- d * ema + (1 - d) * p.

    With ``warmup`` (default) the rate after n previous updates is d = min(decay, (1 + n) / (10 + n)),
    so a short run is not dominated by the initial weights (with decay 0.999 and no warm-up the
    initialisation still weighs exp(-1) after 1000 updates).  Buffers (e.g. BatchNorm statistics)
    are copied.  Pass the uncompiled module."""

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        super().__init__()
        model = getattr(model, "_orig_mod", model)
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.module = copy.deepcopy(model)
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._n: int | None = 0

    def current_decay(self) -> float:
        """The rate the next update will use."""
        if self._n is None:  # host mirror of the counter: one read after construction / loading
            self._n = int(self.num_updates)
        n = self._n
        return min(self.decay, (1.0 + n) / (10.0 + n)) if self.warmup else self.decay

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._n = None

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        model = getattr(model, "_orig_mod", model)
        ema_p = list(self.module.parameters())
        new_p = [p.detach() for p in model.parameters()]
        if ema_p:
            torch._foreach_lerp_(ema_p, new_p, 1.0 - self.current_decay())
        self.num_updates += 1
        self._n += 1
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)

    def train(self, mode: bool = True):
        # the averaged copy is always used in eval mode
        super().train(mode)
        self.module.eval()
        return self

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


# -- samplers -----------------------------------------------------------------------------------
def _device_of(net, x_T, cond, generator):
    if x_T is not None:
        return x_T.device
    if cond is not None:
        return cond.device
    if isinstance(net, nn.Module):
        for p in net.parameters():
            return p.device
    if generator is not None:
        return generator.device
    return torch.device("cpu")


def _grid(sde: VPSDE, steps: int, t_start, t_end, device) -> torch.Tensor:
    if steps < 1:
        raise BenchError("samplers need steps >= 1")
    t_start = sde.T if t_start is None else float(t_start)
    t_end = sde.t_eps if t_end is None else float(t_end)
    return torch.linspace(t_start, t_end, steps + 1, device=device, dtype=torch.float64).float()


def _prelude(net, shape, sde: VPSDE, steps: int, cond, generator, x_T, t_start, t_end):
    """What every sampler starts with: the device, the time grid, x at the first time, the batch size."""
    device = _device_of(net, x_T, cond, generator)
    ts = _grid(sde, steps, t_start, t_end, device)
    x = sde.prior(shape, generator=generator, device=device) if x_T is None else x_T.float().clone()
    return device, ts, x, x.shape[0]


@torch.no_grad()
def sample_sde(net, shape, sde: VPSDE, steps: int, cond=None, generator=None, x_T=None,
               t_start=None, t_end=None, clip_x0: bool = False, denoise: bool = False) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE dx = [-1/2 beta x - beta score] dt + sqrt(beta) dw-bar,
    from ``t_start`` (default T, x_T ~ N(0, I) unless given) down to ``t_end`` (default t_eps) on a
    uniform grid.  One network call per step (NFE = steps); the last step adds no noise.

    ``clip_x0``: the score is taken from the data prediction x0_hat = (x - sigma eps) / alpha clipped
    to [-1, 1] (as DDPM samplers for image data do).  ``denoise``: the last step returns that
    (clipped) x0_hat, the posterior mean, instead of an Euler step, so no noise of scale
    sigma(t_eps) is left in the output; NFE is unchanged."""
    device, ts, x, n = _prelude(net, shape, sde, steps, cond, generator, x_T, t_start, t_end)
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        dt = t - t_next
        tt = t.expand(n)
        eps = _call(net, x, tt, cond).float()
        if clip_x0 or (denoise and i == steps - 1):
            a, s = sde.alpha(t), sde.sigma(t)
            x0 = (x - s * eps) / a
            if clip_x0:
                x0 = x0.clamp(-1.0, 1.0)
            if denoise and i == steps - 1:
                return x0
            eps = (x - a * x0) / s
        score = -eps / sde.sigma(t)
        b = sde.beta(t)
        x = x + (0.5 * b * x + b * score) * dt
        if i < steps - 1:
            x = x + torch.sqrt(b * dt) * torch.randn(x.shape, generator=generator, device=device)
    return x


@torch.no_grad()
def sample_ddim(net, shape, sde: VPSDE, steps: int, cond=None, generator=None, x_T=None,
                t_start=None, t_end=None, eta: float = 0.0, clip_x0: bool = False) -> torch.Tensor:
    """DDIM (Song, Meng & Ermon 2021) on the VP schedule: x0_hat = (x - sigma eps) / alpha, then
    x' = alpha' x0_hat + sqrt(sigma'^2 - c^2) eps + c z with c = eta sigma'/sigma sqrt(1 - alpha^2/alpha'^2).
    eta = 0 is deterministic (probability-flow-like), eta = 1 is the DDPM ancestral sampler.
    NFE = steps; the last step adds no noise.

    ``clip_x0`` (images, going down in time): x0_hat is clipped to [-1, 1] and eps re-derived from it,
    as guided-diffusion's ``clip_denoised``.  Near T, alpha is ~7e-3 on the default schedule, so an
    eps error of 0.03 becomes an x0_hat error of ~4 without it (measured on the cpu models:
    results/digits/PROTOCOL.md)."""
    device, ts, x, n = _prelude(net, shape, sde, steps, cond, generator, x_T, t_start, t_end)
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        a, s = sde.alpha(t), sde.sigma(t)
        a2, s2 = sde.alpha(t_next), sde.sigma(t_next)
        eps = _call(net, x, t.expand(n), cond).float()
        x0 = (x - s * eps) / a
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
            eps = (x - a * x0) / s
        c = eta * s2 / s * torch.sqrt(torch.clamp(1.0 - (a / a2) ** 2, min=0.0)) if i < steps - 1 else 0.0 * s
        x = a2 * x0 + torch.sqrt(torch.clamp(s2 ** 2 - c ** 2, min=0.0)) * eps
        if eta > 0 and i < steps - 1:
            x = x + c * torch.randn(x.shape, generator=generator, device=device)
    return x
