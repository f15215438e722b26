"""OT-ICNN (issue 12): f stays convex by clamping, g by its penalty or by clamping."""
from __future__ import annotations

import pytest
import torch

from bench.context import FitContext
from bench.methods.ot_icnn import OTICNN
from bench.testing import tiny_vectors

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("lambda_cvx", [0.1, 0.0])
def test_ot_icnn_keeps_f_convex_by_clamping_and_g_by_penalty_or_clamping(lambda_cvx):
    data = tiny_vectors()
    m = OTICNN(kind="vector", **{**OTICNN.test_options, "steps": 20, "lambda_cvx": lambda_cvx, "map_lr": 0.05, "critic_lr": 0.05})
    m.setup(data, FitContext(None, progress=False))
    with torch.no_grad():  # start both with negative weights: the updates must bring f (and g) back
        for w in m.f.convex_weights() + m.g.convex_weights():
            w.fill_(-0.1)
    run = FitContext(None, progress=False)
    run.method = m
    m.fit(data, run)
    assert float(m.f.negativity().detach()) == 0.0  # clamped after every update of f (authors)
    if lambda_cvx == 0:
        assert float(m.g.negativity().detach()) == 0.0
    else:  # only penalised: the penalty pulls g's weights up without clamping them
        assert 0.0 < float(m.g.negativity().detach()) < 0.1 ** 2 * sum(w.numel() for w in m.g.convex_weights())
