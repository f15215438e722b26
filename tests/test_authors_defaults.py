"""Defaults moved to the authors' values (results/deviations.md): each test fails if its default is reverted."""
import pytest
import torch

from bench.methods.otm import OTM
from bench.methods.scones import SCONES
from bench.methods.tcr import TCR
from bench.methods.w2gan import W2GAN
from bench.context import FitContext
from bench.testing import tiny_images, tiny_vectors

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(cls, data, **options):
    m = cls(**{**cls.test_options, **options})
    m.setup(data, FitContext(None, progress=False))
    return m


def test_tcr_weighs_consistency_at_the_authors_0_01_and_learns_at_1e_3():
    o = TCR(budget="cpu").options
    assert (o["tcr_weight"], o["lr"], o["loss"]) == (0.01, 1e-3, "mse")
    a, b = torch.zeros(4), torch.full((4,), 2.0)
    assert float(TCR().criterion(a, b)) == 4.0  # squared error
    assert float(TCR(loss="l1").criterion(a, b)) == 2.0  # the authors' script's absolute error


def test_w2gan_image_potentials_are_unscaled_and_vector_potentials_keep_the_mean_cost():
    img = _setup(W2GAN, tiny_images())
    assert float(img.u.scale) == 1.0 and float(img.e.scale) == 1.0
    scaled = _setup(W2GAN, tiny_images(), potential_scale="mean-cost")
    assert float(scaled.u.scale) == pytest.approx(scaled._cost_scale(tiny_images()))
    vec = _setup(W2GAN, tiny_vectors())
    assert float(vec.u.scale) == pytest.approx(vec._cost_scale(tiny_vectors()))
    assert W2GAN(budget="paper").options["steps"] == 100_000


def test_otm_image_map_is_bounded_by_tanh_whatever_its_network_outputs():
    data = tiny_images()
    m = _setup(OTM, data)
    with torch.no_grad():
        for p in m.T.parameters():
            p.add_(5.0)  # push the network's raw output far outside the pixel range
    x = torch.nn.functional.pad(data.source_test, (0, m.canvas - data.shape[-1]) * 2, value=-1.0)
    raw = m.T.net(x)
    assert raw.abs().max() > 1.5
    assert m.T(x).abs().max() <= 1.0
    linear = _setup(OTM, data, map_head="linear")
    assert not isinstance(linear.T, type(m.T))
    assert _setup(OTM, tiny_vectors()).T.__class__ is not type(m.T)  # vectors: unbounded


def test_scones_potentials_learn_at_the_authors_1e_5():
    assert SCONES(budget="cpu").options["ot_lr"] == 1e-5
