"""SCONES (issue 13): samples of the entropic plan on the toy tasks, and the authors' potential lr."""
from __future__ import annotations

import numpy as np
import ot as pot
import pytest

from _helpers import SCORE_TOY as TOY, at_minus4 as _at_minus4, fit_by_name as _fit, in_upper_mode as _upper
from _helpers import target_modes as _modes, transport as _transport
from bench import ot
from bench.datasets.toy import Toy1D, Toy2D
from bench.methods.scones import SCONES

SCONES_TOY = {**TOY, "ot_steps": 1500, "ot_lr": 1e-3, "potential_hidden": 128, "n_steps_each": 2}


@pytest.mark.slow
def test_scones_toy1d_samples_the_entropic_plan(one_thread):
    data = Toy1D().load(None, 0)
    m = _fit("scones", data, **SCONES_TOY)
    assert ot.w2_empirical(_transport(m, data.source_test), data.target_test) < 0.3
    # pi(.|x) of the entropic plan between N(-4, 1) and N(4, 1) is centred on x + 8
    assert abs(float(_at_minus4(m).mean()) - 4.0) < 0.5
    b = m.diagnostics()
    assert b["marginal_x"] < 0.1 and b["epsilon"] == pytest.approx(0.1 * m.extra_state["xi_scale"])
    assert m.nfe == 50 * 2 + 1


def _exact_entropic_split(data, eps_rel):
    """P(right target mode | upper source mode) and P(left | lower) of POT's entropic plan on the training sets."""
    X, Y = data.source_train.double(), data.target_train.double()
    C = ot.cost_matrix(X, Y).numpy()
    P = pot.sinkhorn(np.full(len(X), 1 / len(X)), np.full(len(Y), 1 / len(Y)), C, eps_rel * C.mean(),
                     numItermax=100_000, stopThr=1e-10)
    up, right = _upper(X).numpy(), (Y[:, 0] > 0).numpy()
    return P[up][:, right].sum() / P[up].sum(), P[~up][:, ~right].sum() / P[~up].sum()


@pytest.mark.slow
def test_scones_toy2d_samples_the_plans_mode_split(one_thread):
    data = Toy2D().load(None, 0)  # the guiding pairs (which cross the plan) are ignored
    m = _fit("scones", data, **SCONES_TOY)
    x = data.source_test
    near, mode = _modes(_transport(m, x))
    assert near > 0.9
    up = _upper(x)
    # the exact entropic plan sends ~81 % of the upper mode right and ~83 % of the lower mode left (the
    # rest because the sampled modes are not exactly balanced); the Langevin samples follow its direction
    # but less sharply (measured 0.75 / 0.65 here; task seeds 1, 2: 0.80 / 0.53, 0.71 / 0.67): the score
    # of the noisy target marginal, not of the noisy conditional, drives the mid-noise levels
    p_up, p_low = _exact_entropic_split(data, 0.1)
    assert p_up > 0.75 and p_low > 0.75
    up_right, low_left = float((mode[up] == 0).float().mean()), float((mode[~up] == 1).float().mean())
    assert up_right > 0.6 and low_left > 0.55
    assert abs(up_right - p_up) < 0.25 and abs(low_left - p_low) < 0.25


# -- defaults moved to the authors' values (results/deviations.md): the test fails if its default is reverted --
@pytest.mark.usefixtures("one_thread")
def test_scones_potentials_learn_at_the_authors_1e_5():
    assert SCONES(budget="cpu").options["ot_lr"] == 1e-5
