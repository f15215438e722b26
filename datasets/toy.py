"""Toy tasks with an exact answer: OTCS's Theorem 2 checked against the exact L2-regularised plan.

``toy1d``  N(-4, 1) -> N(4, 1), unpaired.  The unregularised OT map is y = x + 8; the regularised
           plan's conditional mean at x = -4 is exactly 4 for every eps (the problem is symmetric
           about (-4, 4) once the cross term of the quadratic cost is isolated).
``toy2d``  two-mode Gaussian mixtures (std 0.3, equal weights): sources at (+0.5, 2) ("upper") and
           (-0.5, -2) ("lower"), targets at (2, 0) ("right") and (-2, 0) ("left"), semi-paired with 2
           guiding pairs (mode centres) upper -> left and lower -> right.  The sources sit 0.5 off
           the vertical axis so that the cost-minimising ("naive") assignment is well defined --
           upper -> right, lower -> left -- and the guiding pairs cross it.

The exact plan is the L2-regularised OT plan of the *training* samples (uniform weights) solved by
POT (``bench.ot.exact_l2_plan``), for the eps and the cost xi of the fitted method when it has a
``ot_problem()`` (OTCS), else for the task's default (eps = 0.01 x mean cost; toy2d: the
keypoint-guided cost with tau = 0.1 x median keypoint cost).  A test source x is not a training
point; its exact conditional pi(.|x) keeps the exact dual v of the targets and takes u(x) from the
dual optimality condition (1/m) sum_j H(x, y_j) = 1 (``bench.ot.conditional_weights``), i.e. it is
the plan's extension that keeps the x-marginal exact at x.

``evaluate`` returns the task metric, ``w2`` (test outputs vs target test samples, ot.emd2 /
quantiles), and for a handful of probe sources with 1000 transported samples each:
``lhs_w2`` = mean_x W2(p_sde(.|x), pi(.|x)) (Theorem 2's left-hand side) and, when the method
exposes its coupling (``conditional_plan``), ``plan_w2`` = mean_x W2(pi_hat(.|x), pi(.|x)).  It prints
them beside the method's bound terms (which the runner also records as bound_* columns).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bench import ot
from bench.api import DISTANCE, PERCENT, SEMI_PAIRED, UNPAIRED, EvalContext, Metric, Task, TaskData

N_TRAIN = 1000
N_TEST = 500
SAMPLES_PER_PROBE = 1000
EPS_REL = 0.01
TAU_REL = 0.1


class _ToyTask(Task):
    kind = "vector"
    eval_sizes = {"smoke": None, "cpu": None, "fast": None, "paper": None}
    probes: torch.Tensor

    # -- the exact plan -------------------------------------------------------------------------
    def ot_sets(self, data: TaskData) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Training sets of the OT problem (guiding pairs appended, as OTCS does) and K."""
        if data.pairs is None:
            return data.source_train, data.target_train, 0
        kx, ky = data.pairs
        return torch.cat([data.source_train, kx]), torch.cat([data.target_train, ky]), len(kx)

    def default_spec(self, data: TaskData) -> dict[str, Any]:
        X, Y, k = self.ot_sets(data)
        if k == 0:
            def xi(x, y):
                return ot.cost_matrix(x, y, "mean-squared")
        else:
            kx, ky = data.pairs
            med = torch.cat([ot.cost_matrix(X, kx).flatten(), ot.cost_matrix(Y, ky).flatten()]).median()
            tau = float(TAU_REL * med)

            def xi(x, y):
                return ot.guiding_cost(x, y, kx, ky, "mean-squared", tau)
        return {"epsilon": EPS_REL * float(xi(X, Y).mean()), "xi": xi}

    def exact_plan(self, data: TaskData, spec: dict[str, Any]):
        """(H, u, v, mask) of the exact L2 plan on the training sets for ``spec``."""
        X, Y, k = self.ot_sets(data)
        C = spec["xi"](X, Y).double().cpu().numpy()
        mask = None
        if k:
            n, m = C.shape
            mask = ot.keypoint_mask(torch.arange(n), torch.arange(m), torch.arange(n - k, n),
                                    torch.arange(m - k, m)).numpy()
        H, u, v = ot.exact_l2_plan(C, spec["epsilon"], mask)
        return H, u, v, mask

    def conditional(self, data: TaskData, spec, v: np.ndarray, x: torch.Tensor) -> torch.Tensor:
        """Exact pi(.|x) over the training targets for new sources x (B, D): (B, m) weights."""
        X, Y, k = self.ot_sets(data)
        xi = spec["xi"](x, Y).double().cpu()
        mask = None
        if k:  # a new source is a free row: it may not use the guiding targets' columns
            mask = torch.ones(len(Y), dtype=torch.float64)
            mask[len(Y) - k:] = 0
            mask = mask.expand(len(x), -1)
        w, _ = ot.conditional_weights(xi, torch.as_tensor(v), spec["epsilon"], mask)
        return w

    # -- evaluation -----------------------------------------------------------------------------
    def task_metrics(self, data, sources, outputs, labels, probe_samples) -> dict[str, Any]:
        raise NotImplementedError

    def evaluate(self, data: TaskData, sources: torch.Tensor, outputs: torch.Tensor,
                 labels: torch.Tensor | None, ctx: EvalContext) -> dict[str, Any]:
        res: dict[str, Any] = {"w2": ot.w2_empirical(outputs, data.target_test), "w2_n": len(outputs)}
        method = ctx.method
        spec = (method.ot_problem() if method is not None else None) or self.default_spec(data)
        spec = {**spec, "xi": (lambda f: (lambda a, b: f(a, b).cpu()))(spec["xi"])}
        H, u, v, _ = self.exact_plan(data, spec)
        res["exact_plan_marginal_err"] = float(np.abs(H.mean(1) - 1).mean() + np.abs(H.mean(0) - 1).mean())
        res["exact_epsilon"] = float(spec["epsilon"])

        probes = self.probes
        samples = None
        if ctx.transport is not None:
            samples = ctx.transport(probes.repeat_interleave(SAMPLES_PER_PROBE, 0)).float().cpu()
            samples = samples.reshape(len(probes), SAMPLES_PER_PROBE, -1)
        _, Y, k = self.ot_sets(data)
        w_exact = self.conditional(data, spec, v, probes)
        free = len(Y) - k  # a new source never uses the guiding targets' columns (w_exact is 0 there)
        lhs, plan = [], []
        for p in range(len(probes)):
            if samples is not None:
                lhs.append(ot.w2_empirical(samples[p], Y, None, w_exact[p]))
            w_hat = None if method is None else method.conditional_plan(probes[p:p + 1], Y[:free])
            if w_hat is not None:
                w_hat = w_hat[0].double().cpu()
                plan.append(ot.w2_empirical(Y[:free], Y[:free], w_hat, w_exact[p, :free]))
        if lhs:
            res["lhs_w2"] = float(np.mean(lhs))
            res["lhs_w2_per_probe"] = [round(float(a), 5) for a in lhs]
            res["lhs_samples_per_probe"] = SAMPLES_PER_PROBE
        if plan:
            res["plan_w2"] = float(np.mean(plan))
        res.update(self.task_metrics(data, sources, outputs, labels, samples))
        bounds = method.diagnostics() if method is not None else None
        line = ", ".join(f"{k}={res[k]:.4g}" for k in ("lhs_w2", "plan_w2") if k in res)
        if bounds:
            line += " | bound terms: " + ", ".join(
                f"{k}={bounds[k]:.4g}" for k in ("bound_marginal_x", "bound_marginal_y", "bound_sqrt_jcsm",
                                                 "bound_prior_w2") if k in bounds)
        print(f"[{self.name}] Theorem 2: {line}")
        return res


class Toy1D(_ToyTask):
    name = "toy1d"
    setting = UNPAIRED
    metrics = (Metric("mean_at_minus4", "mean T(-4)", True), Metric("w2", "W2", False, bounds=DISTANCE),
               Metric("lhs_w2", "LHS E_x W2", False, 3, bounds=DISTANCE),
               Metric("plan_w2", "W2(pi_hat, pi)", False, 3, bounds=DISTANCE))
    description = "N(-4,1) -> N(4,1) in 1-D, unpaired; exact L2-regularised plan by POT (map y = x + 8 as eps -> 0)"
    probes = torch.tensor([[-5.5], [-4.5], [-4.0], [-3.5], [-2.5]])

    def load(self, data_root, seed: int, budget: str = "smoke", cache_dir=None) -> TaskData:
        g = torch.Generator().manual_seed(int(seed) * 7 + 1)

        def draw(n, mean):
            return mean + torch.randn(n, 1, generator=g)

        return TaskData(name=self.name, setting=UNPAIRED, source_train=draw(N_TRAIN, -4.0),
                        target_train=draw(N_TRAIN, 4.0), source_test=draw(N_TEST, -4.0),
                        target_test=draw(N_TEST, 4.0), extra={"exact_map": "y = x + 8"})

    def task_metrics(self, data, sources, outputs, labels, probe_samples) -> dict[str, Any]:
        out: dict[str, Any] = {"mean_shift": float(outputs.mean() - sources.mean())}
        if probe_samples is not None:
            i = int(torch.nonzero(self.probes[:, 0] == -4.0)[0, 0])
            out["mean_at_minus4"] = float(probe_samples[i].mean())
        return out


SRC_CENTRES = torch.tensor([[0.5, 2.0], [-0.5, -2.0]])   # upper, lower
TGT_CENTRES = torch.tensor([[2.0, 0.0], [-2.0, 0.0]])    # right, left
GUIDE = (0, 1)  # pairs: (upper -> left), (lower -> right): crosses the cost-minimising assignment
STD = 0.3


class Toy2D(_ToyTask):
    name = "toy2d"
    setting = SEMI_PAIRED
    metrics = (Metric("upper_mode_hit", "upper hit (%)", True, bounds=PERCENT), Metric("w2", "W2", False, bounds=DISTANCE),
               Metric("lhs_w2", "LHS E_x W2", False, 3, bounds=DISTANCE),
               Metric("plan_w2", "W2(pi_hat, pi)", False, 3, bounds=DISTANCE))
    description = ("2-D mixtures: sources (0.5,2)/(-0.5,-2) -> targets (2,0)/(-2,0); 2 guiding pairs "
                   "(upper->left, lower->right) crossing the cost-minimising assignment")
    probes = torch.tensor([[0.5, 2.0], [0.8, 1.8], [0.2, 2.3], [-0.5, -2.0], [-0.2, -1.7]])

    def load(self, data_root, seed: int, budget: str = "smoke", cache_dir=None) -> TaskData:
        g = torch.Generator().manual_seed(int(seed) * 7 + 2)

        def draw(n, centres):
            lab = torch.randint(0, 2, (n,), generator=g)
            return centres[lab] + STD * torch.randn(n, 2, generator=g), lab

        xs, ls = draw(N_TRAIN, SRC_CENTRES)
        yt, lt = draw(N_TRAIN, TGT_CENTRES)
        xs_t, ls_t = draw(N_TEST, SRC_CENTRES)
        yt_t, lt_t = draw(N_TEST, TGT_CENTRES)
        # guiding pairs: source mode k's centre -> target mode (1 - k)'s centre
        pairs = (SRC_CENTRES.clone(), TGT_CENTRES[[1, 0]].clone())
        return TaskData(name=self.name, setting=SEMI_PAIRED, source_train=xs, target_train=yt,
                        source_test=xs_t, target_test=yt_t, pairs=pairs, source_train_labels=ls,
                        target_train_labels=lt, source_test_labels=ls_t, target_test_labels=lt_t,
                        extra={"guide": "upper->left, lower->right"})

    @staticmethod
    def target_mode(y: torch.Tensor) -> torch.Tensor:
        """Index of the nearest target centre (0 right, 1 left)."""
        return torch.cdist(y.float(), TGT_CENTRES).argmin(1)

    def task_metrics(self, data, sources, outputs, labels, probe_samples) -> dict[str, Any]:
        src_mode = torch.cdist(sources.float(), SRC_CENTRES).argmin(1) if labels is None else labels
        hit_mode = self.target_mode(outputs)
        named = torch.tensor([1, 0])[src_mode]  # the target mode each source mode's guiding pair names
        upper = src_mode == 0
        lower = src_mode == 1
        return {"upper_mode_hit": float(100.0 * (hit_mode[upper] == named[upper]).float().mean()),
                "lower_mode_hit": float(100.0 * (hit_mode[lower] == named[lower]).float().mean()),
                "upper_mode_n": int(upper.sum())}
