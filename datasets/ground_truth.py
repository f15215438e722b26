"""Ground-truth tasks: pairs of distributions whose quadratic-cost OT map is known exactly (issue 37).

On digits nobody knows the right answer; here every method is scored against it, in growing dimension,
as in Korotin et al., "Do neural optimal transport solvers work? A continuous Wasserstein-2 benchmark"
(NeurIPS 2021).  The exact map lives in the task object and is used only by ``evaluate``: a method sees
unpaired samples (TaskData), never the map, and source and target samples are drawn independently.

``gauss-{2,16,64}``   N(m1, S1) -> N(m2, S2).  The OT map is affine, T*(x) = m2 + A (x - m1) with
                      A = S1^{-1/2} (S1^{1/2} S2 S1^{1/2})^{1/2} S1^{-1/2}.  Means ~ N(0, I); covariances
                      Q diag(l) Q^T with Q a random rotation and l log-uniform in [1/4, 4].
``convex-{2,16,64}``  P a mixture of three Gaussians (means at distance 2 from the origin in random
                      directions, covariance I); Q = grad psi # P for the smooth maximum of four convex
                      quadratics psi(x) = tau log sum_k exp(q_k(x) / tau), q_k(x) = x^T B_k x / 2 + b_k^T x
                      (B_k with eigenvalues log-uniform in [1/4, 4], b_k ~ N(0, I)); psi is strictly convex,
                      so (Brenier) grad psi(x) = sum_k softmax_k(q(x) / tau) (B_k x + b_k) is the OT map from
                      P to Q.  tau is half the spread of the centred q_k over the source: the map is smooth
                      but far from affine: the best affine map leaves 6.5 / 12.8 / 14.7 % of Var(Q)
                      unexplained in 2 / 16 / 64 dimensions (`bench data --task convex-16` prints it).
``clusters-16``       semi-paired.  Four source clusters N(a_k, 0.5^2 I) at 3 u_k (u_k orthonormal) and four
                      target clusters N(b_k, 0.5^2 I) with b_k = a_k + v_k, |v_k| = 1: the quadratic cost
                      sends cluster k to cluster k.  The right pairing is k -> k + 1 (mod 4), x -> x - a_k +
                      b_{k+1}, and only the guiding pairs say so: one pair per cluster, (x, its image) for a
                      source training point x.  Scored by the share of outputs that land on the right
                      cluster (nearest target centre); labels: source cluster k, target cluster labelled
                      by the source cluster that should land on it (so label-oracle hits 100 %).

Each problem is fixed by its family and dimension (``PROBLEM_SEED``); the run's seed draws the samples:
10,000 training points per side and 2,000 test points (smoke scores the first 512 test sources).
Metrics (``bench.metrics.ot_map``): L2-UVP of the map (for a stochastic method, of its barycentric
projection, averaged over ``DRAWS`` draws per source through ``ctx.transport``), BW2-UVP of the output
marginal, and the cosine between the fitted and the exact displacement fields.
"""
from __future__ import annotations

import zlib
from typing import Any, ClassVar

import numpy as np
import torch

from bench.api import CORRELATION, DISTANCE, PERCENT, SEMI_PAIRED, UNPAIRED, EvalContext, Metric, Task, TaskData
from bench.metrics import ot_map

N_TRAIN = 10_000  # per side
N_TEST = 2_000
DRAWS = 16  # samples per source for a stochastic method's barycentric projection
PROBLEM_SEED = 20261207
STATS_SAMPLES = 200_000  # draws of Q for its mean and covariance when they have no closed form


# a UVP is a percentage of Var(Q) that may exceed 100 (worse than mapping everything to the mean of Q)
L2_UVP = Metric("l2_uvp", "L2-UVP", False, 2, bounds=DISTANCE)
BW2_UVP = Metric("bw2_uvp", "BW2-UVP", False, 2, bounds=DISTANCE)
COS = Metric("cos", "cos", True, 3, bounds=CORRELATION)
CLUSTER_HIT = Metric("cluster_hit", "right cluster (%)", True, 1, bounds=PERCENT)


def _rng(family: str, dim: int) -> np.random.Generator:
    return np.random.default_rng([PROBLEM_SEED, zlib.crc32(family.encode()), dim])


def _rotation(rng: np.random.Generator, d: int) -> np.ndarray:
    """A random orthogonal matrix (QR of a Gaussian matrix, signs fixed so it is Haar distributed)."""
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _spd(rng: np.random.Generator, d: int, lo: float, hi: float) -> np.ndarray:
    q = _rotation(rng, d)
    lam = np.exp(rng.uniform(np.log(lo), np.log(hi), d))
    return (q * lam) @ q.T


def _gen(seed: int, stream: str) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(stream.encode())) % (2 ** 63 - 1))


class KnownMapTask(Task):
    """An unpaired pair (P, Q) with a known OT map T*: subclasses say how to sample P and Q and what T* is."""

    family_name: ClassVar[str] = ""
    dim: ClassVar[int] = 2
    kind = "vector"
    setting = UNPAIRED
    metrics = (L2_UVP, BW2_UVP, COS)
    eval_sizes = {"smoke": 512, "cpu": None, "fast": None, "paper": None}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._problem: dict[str, np.ndarray] | None = None
        self._stats: tuple[np.ndarray, np.ndarray, float] | None = None

    # -- the problem (fixed per family and dimension) -----------------------------------------
    @property
    def problem(self) -> dict[str, np.ndarray]:
        if self._problem is None:
            self._problem = self.build(_rng(self.family_name, self.dim))
        return self._problem

    def build(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def sample_source(self, n: int, g: torch.Generator) -> torch.Tensor:
        """n draws of P (float64)."""
        raise NotImplementedError

    def sample_target(self, n: int, g: torch.Generator) -> torch.Tensor:
        """n draws of Q (float64), independent of any source draw."""
        return self.exact_map(self.sample_source(n, g))

    def exact_map(self, x: torch.Tensor) -> torch.Tensor:
        """T*(x) in float64 (never shown to a method)."""
        raise NotImplementedError

    _stats_cache: ClassVar[dict[str, tuple[np.ndarray, np.ndarray, float]]] = {}

    def target_stats(self) -> tuple[np.ndarray, np.ndarray, float]:
        """Mean, covariance and total variance Var(Q) = tr Cov(Q) of the target (estimated once per process
        from STATS_SAMPLES draws when there is no closed form)."""
        if self._stats is None:
            self._stats = self._stats_cache.get(self.name)
        if self._stats is None:
            g = _gen(PROBLEM_SEED, f"{self.name}-stats")
            total, outer, n = 0.0, 0.0, 0
            for start in range(0, STATS_SAMPLES, 20_000):
                y = self.sample_target(min(20_000, STATS_SAMPLES - start), g).numpy()
                total, outer, n = total + y.sum(0), outer + y.T @ y, n + len(y)
            mean = total / n
            cov = (outer - n * np.outer(mean, mean)) / (n - 1)
            self._stats = self._stats_cache[self.name] = (mean, cov, float(np.trace(cov)))
        return self._stats

    # -- the Task interface -------------------------------------------------------------------
    def load(self, data_root, seed: int, budget: str = "smoke", cache_dir=None) -> TaskData:
        def draw(kind: str, n: int) -> torch.Tensor:
            g = _gen(seed, f"{self.name}-{kind}")
            sample = self.sample_source if kind.startswith("source") else self.sample_target
            return sample(n, g).float()

        return TaskData(name=self.name, setting=UNPAIRED, source_train=draw("source-train", N_TRAIN),
                        target_train=draw("target-train", N_TRAIN), source_test=draw("source-test", N_TEST),
                        target_test=draw("target-test", N_TEST))

    def affine_floor(self, x: torch.Tensor) -> float:
        """L2-UVP of the best affine map (least squares of T*(x) on x): how non-linear T* is on these sources."""
        xs = x.double().numpy()
        ys = self.exact_map(x.double()).numpy()
        design = np.hstack([xs, np.ones((len(xs), 1))])
        coef, *_ = np.linalg.lstsq(design, ys, rcond=None)
        return ot_map.l2_uvp(design @ coef, ys, self.target_stats()[2])

    def evaluate(self, data: TaskData, sources: torch.Tensor, outputs: torch.Tensor,
                 labels: torch.Tensor | None, ctx: EvalContext) -> dict[str, Any]:
        mean_q, cov_q, var_q = self.target_stats()
        exact = self.exact_map(sources.double())
        res = map_scores(sources, outputs, exact, ctx, var_q)
        res["bw2_uvp"] = ot_map.bw2_uvp(outputs, mean_q, cov_q, var_q)
        # what the same number of exact target samples scores: BW2-UVP's sampling floor at this n
        res["bw2_uvp_floor"] = ot_map.bw2_uvp(data.target_test[: len(outputs)], mean_q, cov_q, var_q)
        res["var_target"] = var_q
        return res

    def info(self, data_root, cache_dir) -> dict[str, Any]:
        x = self.load(None, 0).source_test
        ident = ot_map.l2_uvp(x.double(), self.exact_map(x.double()), self.target_stats()[2])
        return {"dimension": self.dim, "Var(Q)": round(self.target_stats()[2], 4),
                "L2-UVP of the identity": round(ident, 2), "L2-UVP of the best affine map": round(self.affine_floor(x), 2)}


def map_scores(sources: torch.Tensor, outputs: torch.Tensor, exact: torch.Tensor, ctx: EvalContext,
               var_q: float) -> dict[str, Any]:
    """L2-UVP and cosine of the method's map (a stochastic method: of its barycentric projection)."""
    method = getattr(ctx, "method", None)
    res: dict[str, Any] = {}
    mapped = outputs.double()
    if getattr(method, "stochastic", False) and ctx.transport is not None:
        mapped, within = ot_map.barycentric(ctx.transport, sources, DRAWS)
        # E||mean of DRAWS draws - T*||^2 = ||E[T(x, .)] - T*||^2 + tr Var(T(x, .)) / DRAWS: the second term
        # is the draws' noise in l2_uvp (reported so that a reader can subtract it)
        res["l2_uvp_draw_noise"] = float(100.0 * within.mean() / DRAWS / var_q)
        res["l2_uvp_single_draw"] = ot_map.l2_uvp(outputs, exact, var_q)
    res["barycentric_draws"] = DRAWS if "l2_uvp_draw_noise" in res else 1
    res["l2_uvp"] = ot_map.l2_uvp(mapped, exact, var_q)
    res["cos"] = ot_map.displacement_cosine(sources, mapped, exact)
    return res


class GaussianTask(KnownMapTask):
    family_name = "gauss"
    description = "N(m1, S1) -> N(m2, S2), closed-form OT map"

    def build(self, rng):
        d = self.dim
        m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
        S1, S2 = _spd(rng, d, 0.25, 4.0), _spd(rng, d, 0.25, 4.0)
        A, b = ot_map.gaussian_ot_map(m1, S1, m2, S2)
        return {"m1": m1, "S1": S1, "m2": m2, "S2": S2, "L1": ot_map.sqrtm_psd(S1), "L2": ot_map.sqrtm_psd(S2),
                "A": A, "b": b}

    def sample_source(self, n, g):
        p = self.problem
        z = torch.randn(n, self.dim, generator=g, dtype=torch.float64)
        return torch.as_tensor(p["m1"]) + z @ torch.as_tensor(p["L1"])

    def sample_target(self, n, g):
        p = self.problem
        z = torch.randn(n, self.dim, generator=g, dtype=torch.float64)
        return torch.as_tensor(p["m2"]) + z @ torch.as_tensor(p["L2"])

    def exact_map(self, x):
        p = self.problem
        return x.double() @ torch.as_tensor(p["A"]) + torch.as_tensor(p["b"])  # A is symmetric

    def target_stats(self):
        p = self.problem
        return p["m2"], p["S2"], float(np.trace(p["S2"]))


PIECES = 4
MIXTURE = 3
SOFTNESS = 0.5  # tau, in units of the spread of the centred quadratics over the source


class ConvexTask(KnownMapTask):
    family_name = "convex"
    description = "Gaussian mixture P -> grad psi # P, psi a smooth maximum of 4 convex quadratics"

    def build(self, rng):
        d = self.dim
        centres = rng.standard_normal((MIXTURE, d))
        centres *= 2.0 / np.linalg.norm(centres, axis=1, keepdims=True)
        B = np.stack([_spd(rng, d, 0.25, 4.0) for _ in range(PIECES)])
        b = rng.standard_normal((PIECES, d))
        p = {"centres": centres, "B": B, "b": b, "tau": np.float64(1.0)}
        # tau: SOFTNESS x the spread of q_k(x) - mean_k q_k(x) over source draws, so that the gates are soft in every
        # dimension (the map is smooth) yet each piece rules a region of its own (the map is far from affine)
        x = centres[rng.integers(0, MIXTURE, 4000)] + rng.standard_normal((4000, d))
        q = self._quadratics(p, torch.as_tensor(x)).numpy()
        p["tau"] = np.float64(SOFTNESS * (q - q.mean(1, keepdims=True)).std())
        return p

    @staticmethod
    def _pieces(p, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, grad q): q_k(x) = x^T B_k x / 2 + b_k^T x (N, PIECES) and B_k x + b_k (N, PIECES, D)."""
        B, b = torch.as_tensor(p["B"]), torch.as_tensor(p["b"])
        k, d = B.shape[:2]
        grad = (x @ B.permute(1, 0, 2).reshape(d, k * d)).view(len(x), k, d)  # B_k symmetric: x^T B_k = (B_k x)^T
        q = 0.5 * (grad * x.unsqueeze(1)).sum(2) + x @ b.T
        return q, grad + b

    @classmethod
    def _quadratics(cls, p, x: torch.Tensor) -> torch.Tensor:
        return cls._pieces(p, x)[0]

    def sample_source(self, n, g):
        p = self.problem
        k = torch.randint(0, MIXTURE, (n,), generator=g)
        z = torch.randn(n, self.dim, generator=g, dtype=torch.float64)
        return torch.as_tensor(p["centres"])[k] + z

    def exact_map(self, x):
        """grad psi(x) = sum_k softmax_k(q(x) / tau) (B_k x + b_k)."""
        p = self.problem
        q, grad = self._pieces(p, x.double())
        gate = torch.softmax(q / float(p["tau"]), 1)
        return (gate.unsqueeze(2) * grad).sum(1)

    def potential(self, x: torch.Tensor) -> torch.Tensor:
        """psi(x) = tau log sum_k exp(q_k(x) / tau): convex (log-sum-exp of convex functions), and
        ``exact_map`` is its gradient (the tests check both)."""
        p = self.problem
        tau = float(p["tau"])
        return tau * torch.logsumexp(self._quadratics(p, x.double()) / tau, 1)


def _named(base: type, dim: int) -> type:
    name = f"{base.family_name}-{dim}"
    cls = type(f"{base.__name__}{dim}", (base,), {
        "name": name, "dim": dim, "__module__": __name__,
        "description": f"{base.description}, {dim}-D (ground truth; L2-UVP, BW2-UVP, cos)"})
    return cls


Gauss2, Gauss16, Gauss64 = (_named(GaussianTask, d) for d in (2, 16, 64))
Convex2, Convex16, Convex64 = (_named(ConvexTask, d) for d in (2, 16, 64))
GROUND_TRUTH_TASKS = ("gauss-2", "gauss-16", "gauss-64", "convex-2", "convex-16", "convex-64", "clusters-16")


# -- semi-paired: clusters whose right pairing only the guiding pairs reveal -------------------------
K_CLUSTERS = 4
CLUSTER_STD = 0.5
CLUSTER_RADIUS = 3.0
CLUSTER_OFFSET = 1.0


class ClustersTask(Task):
    name = "clusters-16"
    dim = 16
    kind = "vector"
    setting = SEMI_PAIRED
    metrics = (CLUSTER_HIT, L2_UVP, BW2_UVP)
    description = ("16-D semi-paired: 4 source clusters, 4 target clusters each nearest its source cluster; the "
                   "right pairing is k -> k+1, shown only by 1 guiding pair per cluster (ground truth)")
    eval_sizes = {"smoke": 512, "cpu": None, "fast": None, "paper": None}
    default_options = {"pairs_per_cluster": 1}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        rng = _rng("clusters", self.dim)
        u = _rotation(rng, self.dim)[:K_CLUSTERS]
        self.src_centres = CLUSTER_RADIUS * u
        v = rng.standard_normal((K_CLUSTERS, self.dim))
        self.tgt_centres = self.src_centres + CLUSTER_OFFSET * v / np.linalg.norm(v, axis=1, keepdims=True)
        self.right = (np.arange(K_CLUSTERS) + 1) % K_CLUSTERS  # the target cluster each source cluster goes to

    def _draw(self, centres: np.ndarray, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n points, n / K per cluster exactly (shuffled), and their cluster indices."""
        lab = torch.arange(n) % K_CLUSTERS
        lab = lab[torch.randperm(n, generator=g)]
        x = torch.as_tensor(centres)[lab] + CLUSTER_STD * torch.randn(n, self.dim, generator=g, dtype=torch.float64)
        return x, lab

    def exact_map(self, x: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        """The right map: each cluster translated onto its partner (the OT map between the matched clusters)."""
        shift = torch.as_tensor(self.tgt_centres[self.right] - self.src_centres)
        return x.double() + shift[lab]

    def source_cluster(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x.double(), torch.as_tensor(self.src_centres)).argmin(1)

    def target_cluster(self, y: torch.Tensor) -> torch.Tensor:
        return torch.cdist(y.double(), torch.as_tensor(self.tgt_centres)).argmin(1)

    def load(self, data_root, seed: int, budget: str = "smoke", cache_dir=None) -> TaskData:
        g = {k: _gen(seed, f"{self.name}-{k}") for k in ("source-train", "target-train", "source-test",
                                                          "target-test", "pairs")}
        xs, ls = self._draw(self.src_centres, N_TRAIN, g["source-train"])
        yt, lt = self._draw(self.tgt_centres, N_TRAIN, g["target-train"])
        xs_t, ls_t = self._draw(self.src_centres, N_TEST, g["source-test"])
        yt_t, lt_t = self._draw(self.tgt_centres, N_TEST, g["target-test"])
        per = int(self.options["pairs_per_cluster"])
        idx = torch.cat([torch.nonzero(ls == k)[:, 0][torch.randperm(int((ls == k).sum()), generator=g["pairs"])[:per]]
                         for k in range(K_CLUSTERS)])
        pairs = (xs[idx].float(), self.exact_map(xs[idx], ls[idx]).float())
        inverse = torch.as_tensor(np.argsort(self.right))  # target cluster j is labelled by the source cluster sent there
        return TaskData(name=self.name, setting=SEMI_PAIRED, source_train=xs.float(), target_train=yt.float(),
                        source_test=xs_t.float(), target_test=yt_t.float(), pairs=pairs, source_train_labels=ls,
                        target_train_labels=inverse[lt], source_test_labels=ls_t, target_test_labels=inverse[lt_t])

    def target_stats(self) -> tuple[np.ndarray, np.ndarray, float]:
        """Mean, covariance and Var of the balanced target mixture (closed form)."""
        c = self.tgt_centres
        mean = c.mean(0)
        cov = CLUSTER_STD ** 2 * np.eye(self.dim) + (c - mean).T @ (c - mean) / K_CLUSTERS
        return mean, cov, float(np.trace(cov))

    def evaluate(self, data: TaskData, sources: torch.Tensor, outputs: torch.Tensor,
                 labels: torch.Tensor | None, ctx: EvalContext) -> dict[str, Any]:
        src = self.source_cluster(sources) if labels is None else labels.long()
        hit = self.target_cluster(outputs)
        right = torch.as_tensor(self.right)[src]
        mean_q, cov_q, var_q = self.target_stats()
        res = map_scores(sources, outputs, self.exact_map(sources, src), ctx, var_q)
        res["cluster_hit"] = float(100.0 * (hit == right).double().mean())
        res["cost_cluster_hit"] = float(100.0 * (hit == src).double().mean())  # where the cost alone sends it
        res["cluster_hit_per_cluster"] = [round(float(100.0 * (hit[src == k] == right[src == k]).double().mean()), 2)
                                          for k in range(K_CLUSTERS)]
        res["bw2_uvp"] = ot_map.bw2_uvp(outputs, mean_q, cov_q, var_q)
        res["var_target"] = var_q
        return res

    def info(self, data_root, cache_dir) -> dict[str, Any]:
        d = np.linalg.norm(self.src_centres[:, None] - self.tgt_centres[None], axis=2)
        return {"source-target centre distances": np.round(d, 2).tolist(), "right pairing": self.right.tolist()}
