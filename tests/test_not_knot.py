"""NOT and KNOT together: unbiased weak-cost estimators, refused options, and the stochastic maps (NOT's weak
cost, KNOT) that ignore the pairs.  Each method's own tests are in tests/test_not.py and tests/test_knot.py."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from bench.api import SEMI_PAIRED, UNPAIRED, BenchError
from bench.methods.knot import KNOT
from bench.methods.not_ import NOT
from bench.testing import fit_in_memory, tiny_images, tiny_vectors


pytestmark = pytest.mark.usefixtures("one_thread")

_fit = fit_in_memory


# -- costs ---------------------------------------------------------------------------------------
def test_weak_cost_estimators_are_unbiased_with_two_samples():
    """Averages of the n_z = 2 estimators match the closed-form costs of mu = N(m, s^2)."""
    g = torch.Generator().manual_seed(0)
    m, s, x0, gamma, reps = 1.0, 2.0, -0.5, 0.7, 200_000
    x = torch.full((reps, 1), x0)
    ys = m + s * torch.randn(reps, 2, 1, generator=g)
    quad = NOT(cost="weak").cost(x, ys, gamma).mean().item()
    assert quad == pytest.approx(((x0 - m) ** 2 + s ** 2) - gamma * s ** 2, abs=0.06)
    energy = KNOT().cost(x, ys, gamma).mean().item()
    delta = m - x0
    phi = 0.5 * (1 + math.erf(-delta / s / math.sqrt(2)))
    e_xy = s * math.sqrt(2 / math.pi) * math.exp(-delta ** 2 / (2 * s ** 2)) + delta * (1 - 2 * phi)
    e_yy = 2 * s / math.sqrt(math.pi)
    assert energy == pytest.approx(e_xy - 0.5 * gamma * e_yy, abs=0.02)


# -- options and settings --------------------------------------------------------------------
def test_bad_options_and_shapes_are_refused():
    with pytest.raises(BenchError, match="cost"):
        NOT(cost="kernel")
    with pytest.raises(BenchError, match="n_z"):
        NOT(cost="weak", n_z=1)
    with pytest.raises(BenchError, match="kernel"):
        KNOT(kernel="cosine")
    with pytest.raises(BenchError, match="cost"):
        KNOT(cost="weak")
    data = tiny_vectors()
    data = dataclasses.replace(data, source_train=torch.zeros(5, 3), source_test=torch.zeros(2, 3))
    with pytest.raises(BenchError, match="shape"):
        NOT(kind="vector").check_setting(data)


def test_stochasticity_follows_the_cost():
    assert not NOT().stochastic and NOT(cost="weak").stochastic and KNOT().stochastic
    assert "ignored" in NOT.notes and "ignored" in KNOT.notes
    assert set(NOT.settings) == {UNPAIRED, SEMI_PAIRED} and not NOT.uses_pairs


@pytest.mark.parametrize("cls,options", [(NOT, {"cost": "weak"}), (KNOT, {})], ids=["not-weak", "knot"])
@pytest.mark.parametrize("kind", ["images", "vectors"])
def test_stochastic_maps_transport_and_ignore_pairs(cls, options, kind):
    make = tiny_images if kind == "images" else tiny_vectors
    paired, unpaired = make(SEMI_PAIRED), make(UNPAIRED)
    opts = {**cls.test_options, **options}
    m1, m2 = _fit(cls, paired, **opts), _fit(cls, dataclasses.replace(unpaired, pairs=None), **opts)
    x = paired.source_test[:6]
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    y = m1.transport(x, g(5))
    assert y.shape == x.shape and y.dtype == torch.float32
    torch.testing.assert_close(m2.transport(x, g(5)), y, rtol=0, atol=0)  # pairs changed nothing
    assert not torch.equal(m1.transport(x, g(6)), y)  # z matters
    if kind == "images":
        assert y.min() >= -1 and y.max() <= 1
