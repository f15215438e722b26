"""Toy tasks: data, exact L2 plans, their extension to new sources, and the evaluation machinery."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.api import SEMI_PAIRED, UNPAIRED, EvalContext, Method
from bench.datasets.toy import TGT_CENTRES, Toy1D, Toy2D
from bench.registry import tasks


def test_registered_and_deterministic():
    assert tasks()["toy1d"] is Toy1D and tasks()["toy2d"] is Toy2D
    d1, d1b, d1c = Toy1D().load(None, 0), Toy1D().load(None, 0), Toy1D().load(None, 1)
    assert d1.setting == UNPAIRED and d1.source_train.shape == (1000, 1) and d1.pairs is None
    torch.testing.assert_close(d1.source_train, d1b.source_train)
    assert not torch.equal(d1.source_train, d1c.source_train)
    assert abs(float(d1.source_train.mean()) + 4) < 0.15 and abs(float(d1.target_train.mean()) - 4) < 0.15
    d2 = Toy2D().load(None, 0)
    assert d2.setting == SEMI_PAIRED and d2.source_train.shape == (1000, 2) and len(d2.pairs[0]) == 2


def test_toy1d_exact_plan_is_centred_on_the_translation():
    task = Toy1D()
    data = task.load(None, 0)
    spec = task.default_spec(data)
    H, u, v, _ = task.exact_plan(data, spec)
    np.testing.assert_allclose(H.mean(1), 1, atol=1e-3)
    np.testing.assert_allclose(H.mean(0), 1, atol=1e-3)
    Y = data.target_train[:, 0].double()
    w = task.conditional(data, spec, v, torch.tensor([[-4.0], [-3.0]]))
    means = (w * Y).sum(1)
    # E[y | x = -4] = 4 for every eps by symmetry (finite samples shift it slightly); elsewhere the
    # regularised plan shrinks the map x + 8 towards the centre: 4 < E[y | x = -3] < 5
    assert abs(float(means[0]) - 4.0) < 0.15 and 4.3 < float(means[1]) < 5.0
    # the extension reproduces the plan's row at a training source
    x0 = data.source_train[:1]
    torch.testing.assert_close(task.conditional(data, spec, v, x0)[0], torch.tensor(H[0] / len(Y)),
                               atol=1e-5, rtol=0)


def test_toy2d_guidance_crosses_the_naive_assignment():
    task = Toy2D()
    data = task.load(None, 0)
    _, Y, k = task.ot_sets(data)
    modes = task.target_mode(Y)
    probes = torch.tensor([[0.5, 2.0], [-0.5, -2.0]])
    # keypoint-guided exact plan: upper -> left (mode 1), lower -> right (mode 0)
    spec = task.default_spec(data)
    H, u, v, mask = task.exact_plan(data, spec)
    n, m = H.shape
    assert H[n - k:, :].nonzero()[1].tolist() == [m - 2, m - 1]  # guiding rows only on their partners
    w = task.conditional(data, spec, v, probes)
    assert float(w[0][modes == 1].sum()) > 0.99 and float(w[1][modes == 0].sum()) > 0.99
    # the plain cost-minimising plan does the opposite (that is what the pairs cross)
    data_u = Toy2D().load(None, 0)
    data_u.pairs = None
    spec_u = task.default_spec(data_u)
    _, _, v_u, _ = task.exact_plan(data_u, spec_u)
    w_u = task.conditional(data_u, spec_u, v_u, probes)
    assert float(w_u[0][task.target_mode(data_u.target_train) == 0].sum()) > 0.9


class _ExactSampler:
    """A 'method' whose transport draws from the exact conditional plan: LHS must be ~0."""

    def __init__(self, task, data):
        self.task, self.data = task, data
        self.spec = task.default_spec(data)
        _, _, self.v, _ = task.exact_plan(data, self.spec)
        self.g = torch.Generator().manual_seed(0)

    def transport(self, x):
        _, Y, _ = self.task.ot_sets(self.data)
        w = self.task.conditional(self.data, self.spec, self.v, x)
        idx = torch.multinomial(w.float(), 1, generator=self.g)[:, 0]
        return Y[idx]


@pytest.mark.slow
@pytest.mark.parametrize("task_cls", [Toy1D, Toy2D])
def test_evaluate_measures_zero_lhs_for_exact_samples(task_cls):
    task = task_cls()
    data = task.load(None, 0)
    sampler = _ExactSampler(task, data)
    ctx = EvalContext(cache_dir=None, device=torch.device("cpu"), budget="smoke", seed=0,
                      method=Method(), transport=sampler.transport)  # a method with no plan of its own
    outputs = sampler.transport(data.source_test)
    res = task.evaluate(data, data.source_test, outputs, data.source_test_labels, ctx)
    assert res["exact_plan_marginal_err"] < 1e-2
    assert res["lhs_w2"] < (0.12 if task_cls is Toy1D else 0.1)
    assert res["lhs_samples_per_probe"] >= 1000 and "plan_w2" not in res
    if task_cls is Toy1D:
        assert abs(res["mean_at_minus4"] - 4.0) < 0.15
        assert res["w2"] < 0.5
    else:
        # the exact plan moves a little mass across when the sampled mode sizes differ
        assert res["upper_mode_hit"] > 97 and res["lower_mode_hit"] > 97
        assert torch.equal(task.target_mode(TGT_CENTRES), torch.tensor([0, 1]))
