"""KNOT: exact kernel costs, the noise through the map's normalisation, the distance kernel, and a toy problem with
a known answer."""
from __future__ import annotations

import math

import pytest
import torch

from _helpers import ANNEAL, gaussians as _gaussians, samples as _samples, with_options as _with_options
from bench.methods.knot import KNOT
from bench.methods.not_ import NOT
from bench.testing import fit_in_memory


pytestmark = pytest.mark.usefixtures("one_thread")

_fit = fit_in_memory


# -- costs ---------------------------------------------------------------------------------------
def test_kernel_costs_exact_values():
    x = torch.zeros(1, 1)
    ys = torch.tensor([[[1.0], [3.0], [-2.0]]])
    d = _with_options(KNOT)
    # E|x - y| = (1 + 3 + 2)/3 = 2;  E|y - y'| over pairs = (2 + 3 + 5)/3 = 10/3
    assert d.cost(x, ys, gamma=1.0).item() == pytest.approx(2 - 0.5 * 10 / 3)
    g = _with_options(KNOT, kernel="gaussian")
    k_xy = sum(math.exp(-0.5 * v * v) for v in (1, 3, -2)) / 3
    k_yy = sum(math.exp(-0.5 * v * v) for v in (2, 5, 3)) / 3
    assert g.cost(x, ys, gamma=0.4).item() == pytest.approx(1 - k_xy - 0.2 * (1 - k_yy))
    lap = _with_options(KNOT, kernel="laplacian")
    k_xy = sum(math.exp(-abs(v)) for v in (1, 3, -2)) / 3
    k_yy = sum(math.exp(-abs(v)) for v in (2, 5, 3)) / 3
    assert lap.cost(x, ys, gamma=0.4).item() == pytest.approx(1 - k_xy - 0.2 * (1 - k_yy))


# -- toy problems with known answers -------------------------------------------------------
@pytest.mark.slow
def test_knot_energy_cost_on_a_shift_gives_the_independent_coupling():
    """N(-4, 1) -> N(4, 1), distance kernel, gamma = 1: E||x - y|| is the same for every plan (all
    targets lie right of all sources), and E||y - y'|| is concave in the law of y, so the optimal
    conditional law is the whole target N(4, 1) for every x: mean 4, standard deviation 1."""
    m = _fit(KNOT, _gaussians(-4, 1, 4, 1), steps=400, gamma=1.0, gamma_warmup=0.0, **ANNEAL)
    y = _samples(m, -4.0)
    assert abs(y.mean().item() - 4.0) < 0.3
    assert abs(y.std().item() - 1.0) < 0.25


# -- the map's noise and the distance kernel -----------------------------------------------------
def test_knot_injects_noise_through_conditional_norm_by_default():
    """Issue 8: KNOT's image map takes z (128 x N(0, 1)) through the UNet's normalisation at every
    layer, as the authors' map does; different z give different outputs for one x."""
    from bench.context import FitContext
    from bench.testing import tiny_images
    data = tiny_images()
    m = KNOT(**{**KNOT.test_options})
    assert m.options["noise"] == "cond-norm" and m.options["noise_dim"] == 128 and m.options["z_std"] == 1.0
    assert m.options["distance_per_dim"] is False and KNOT().options["n_z"] == 4
    assert m.options["lr_milestones"] == [0.15, 0.25, 0.40, 0.55, 0.70]
    # the authors halve the lrs from step 15k of 100k: only the paper budget reaches a milestone
    assert KNOT(budget="paper").options["lr_schedule"] == "multistep"
    assert {KNOT(budget=b).options["lr_schedule"] for b in ("smoke", "cpu", "fast")} == {"constant"}
    m.setup(data, FitContext(None, progress=False))
    assert m.T.noise_dim == 128 and m.T.in_channels == 1
    for mod in m.T.modules():  # residual branches and the output conv start at zero
        if isinstance(mod, torch.nn.Conv2d):
            torch.nn.init.normal_(mod.weight, std=0.2)
    x = data.source_test[:1].repeat(2, 1, 1, 1)
    y = m.transport(x, torch.Generator().manual_seed(0))
    assert not torch.allclose(y[0], y[1])
    n = NOT(cost="weak", **{k: v for k, v in NOT.test_options.items()})
    n.setup(data, FitContext(None, progress=False))
    assert n.options["noise"] == "channel" and n.T.in_channels == 2 and n.T.noise_dim == 0


def test_distance_kernel_uses_the_plain_norm_by_default():
    from bench.methods.knot import kernel
    a, b = torch.zeros(1, 4), torch.ones(1, 4)
    assert kernel("distance", a, b).item() == pytest.approx(-2.0, rel=1e-5)   # ||1_4|| = 2
    assert kernel("distance", a, b, per_dim=True).item() == pytest.approx(-1.0, rel=1e-5)
