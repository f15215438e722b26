"""NOT: exact costs, the authors' defaults, the image canvas, and toy problems with known answers."""
from __future__ import annotations

import math

import pytest
import torch

from _helpers import ANNEAL, NOT_TOY as TOY, gaussians as _gaussians, samples as _samples
from _helpers import with_options as _with_options
from bench.api import SEMI_PAIRED, TaskData
from bench.methods.not_ import NOT
from bench.testing import fit_in_memory, tiny_vectors


pytestmark = pytest.mark.usefixtures("one_thread")

_fit = fit_in_memory


# -- costs ---------------------------------------------------------------------------------------
def test_quadratic_costs_exact_values():
    x = torch.zeros(1, 1)
    ys = torch.tensor([[[1.0], [3.0]]])  # two samples of mu for the one x
    weak = _with_options(NOT, cost="weak")
    # the authors' scale (mse, no 1/2): mean(1, 9) = 5; unbiased variance of {1, 3} = 2
    assert weak.cost(x, ys, gamma=0.0).item() == pytest.approx(5.0)
    assert weak.cost(x, ys, gamma=0.5).item() == pytest.approx(5.0 - 0.5 * 2)
    # dimension-normalised: two coordinates, the second with zero cost
    x2, ys2 = torch.zeros(1, 2), torch.tensor([[[1.0, 0.0], [3.0, 0.0]]])
    assert weak.cost(x2, ys2, gamma=0.5).item() == pytest.approx((5.0 - 1.0) / 2)
    strong = _with_options(NOT)
    assert strong.cost(torch.tensor([[1.0, 2.0]]), torch.tensor([[[2.0, 4.0]]]), 0.0).item() == \
        pytest.approx((1 + 4) / 2)
    assert _with_options(NOT, cost_scale=0.5).cost(x, ys[:, :1], 0.0).item() == pytest.approx(0.5)


def test_not_defaults_are_the_authors():
    o = NOT(budget="paper").options
    assert o["betas"] == [0.9, 0.999] and o["n_z"] == 8 and o["cost_scale"] == 1.0
    assert o["inner_steps"] == 10 and o["critic_first"] is False and o["steps"] == 100_000
    assert o["z_std"] == 0.1 and o["map_lr"] == 1e-4 and o["weight_decay"] == 1e-10


# -- images --------------------------------------------------------------------------------------
def test_digit_sized_images_use_a_32x32_canvas():
    g = torch.Generator().manual_seed(0)
    imgs = lambda n: torch.rand(n, 1, 28, 28, generator=g) * 2 - 1  # noqa: E731
    data = TaskData("digits-like", SEMI_PAIRED, imgs(8), imgs(8), imgs(4), imgs(4))
    m = _fit(NOT, data, **{**NOT.test_options, "steps": 1, "inner_steps": 1, "batch_size": 2})
    assert m.canvas == 32 and m.f.image_size == 32
    y = m.transport(data.source_test)
    assert y.shape == (4, 1, 28, 28) and y.min() >= -1 and y.max() <= 1
    state = m.state_dict()
    assert state["__optim__"]["saddle-map"]["state"] and state["__optim__"]["saddle-critic"]["state"]


# -- toy problems with known answers -------------------------------------------------------
@pytest.mark.slow
def test_not_strong_shifts_a_gaussian():
    """N(-4, 1) -> N(4, 1): the OT map is x + 8, so x = -4 goes to 4."""
    m = _fit(NOT, _gaussians(-4, 1, 4, 1), steps=300, **ANNEAL)
    y = _samples(m, -4.0, n=1)
    assert abs(y.item() - 4.0) < 0.3
    slope = (m.transport(torch.tensor([[-3.0]])) - m.transport(torch.tensor([[-5.0]]))).item() / 2
    assert 0.6 < slope < 1.4


@pytest.mark.slow
def test_not_strong_moves_both_modes_onto_target_modes():
    """Sources at (0, +-2) -> targets at (+-2, 0): each source mode lands on the target modes,
    and the two target modes each receive a fair share (no mode collapse)."""
    data = tiny_vectors(n=2048)
    m = _fit(NOT, data, steps=300, **TOY)
    y = m.transport(data.source_test)
    centres = torch.tensor([[2.0, 0.0], [-2.0, 0.0]])
    dist, which = torch.cdist(y, centres).min(1)
    for c in (0, 1):
        assert (dist[data.source_test_labels == c] < 1.0).float().mean() >= 0.9
    share = (which == 0).float().mean().item()
    assert 0.25 < share < 0.75


@pytest.mark.slow
def test_not_weak_spread_grows_with_gamma_as_in_closed_form():
    """N(0, s^2) -> N(0, 1) under the gamma-weak quadratic cost (gamma >= s): the optimal
    conditional law is pi(.|x) = N(x / gamma, 1 - s^2 / gamma^2) (barycentric projection
    x / gamma, the rest of the target variance as spread), so the spread grows with gamma."""
    s, out = 0.5, {}
    for gamma in (0.6, 1.0):
        m = _fit(NOT, _gaussians(0, s, 0, 1), steps=300, cost="weak", gamma=gamma, gamma_warmup=0.0, **ANNEAL)
        y0, y1 = _samples(m, 0.0), _samples(m, 0.5)
        out[gamma] = y0.std().item()
        assert abs(y0.mean().item()) < 0.2
        assert y1.mean().item() == pytest.approx(0.5 / gamma, abs=0.25)
        assert out[gamma] == pytest.approx(math.sqrt(1 - s * s / gamma ** 2), abs=0.25)
    assert out[0.6] > 0.2 and out[1.0] > out[0.6] + 0.15
