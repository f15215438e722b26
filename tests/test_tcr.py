"""TCR (issue 12): its transformations, the semi-paired setting only, the guiding pairs on toy2d, the
authors' consistency weight and lr."""
from __future__ import annotations

import pytest
import torch

from bench.api import SEMI_PAIRED, BenchError
from bench.datasets.toy import Toy1D, Toy2D
from bench.methods.tcr import TCR, random_affine, warp
from bench.testing import fit_in_memory

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(mlp_hidden=64, mlp_depth=2)

_fit = fit_in_memory


def test_tcr_transformations():
    g = torch.Generator().manual_seed(0)
    ident = random_affine(3, g, max_rotation=0.0, max_translation=0.0, max_zoom=0.0, flip_prob=0.0)
    img = torch.rand(3, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(warp(img, ident), img, atol=1e-5, rtol=0)
    quarter = torch.tensor([[[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]]).repeat(3, 1, 1)  # 90 degrees
    torch.testing.assert_close(warp(img, quarter), torch.rot90(img, 1, dims=(2, 3)), atol=1e-5, rtol=0)
    flip = random_affine(3, g, max_rotation=0.0, max_translation=0.0, max_zoom=0.0, flip_prob=1.0)
    torch.testing.assert_close(warp(img, flip), img.flip(3), atol=1e-5, rtol=0)
    pts = torch.tensor([[1.0, 0.0, 5.0]])
    torch.testing.assert_close(warp(pts, quarter[:1]), torch.tensor([[0.0, 1.0, 5.0]]))
    torch.testing.assert_close(warp(torch.tensor([[2.0]]), 0.5 * flip[:1]), torch.tensor([[-1.0]]))


def test_tcr_refuses_unpaired_tasks_in_one_line():
    with pytest.raises(BenchError, match="does not support the unpaired setting") as err:
        TCR(kind="vector").check_setting(Toy1D().load(None, 0))
    assert "\n" not in str(err.value) and "pick another task" in str(err.value)
    assert TCR.settings == (SEMI_PAIRED,) and TCR.uses_pairs and TCR.family == "Regression"


def test_tcr_follows_the_guiding_pairs_on_toy2d_and_its_consistency_term_works():
    task = Toy2D()
    data = task.load(None, 0)
    errs = {}
    for weight in (1.0, 0.0):
        m = _fit(TCR, data, steps=200, tcr_weight=weight, **SMALL)
        x = data.source_test
        res = task.task_metrics(data, x, m.transport(x), data.source_test_labels, None)
        assert res["upper_mode_hit"] >= 90.0 and res["lower_mode_hit"] >= 90.0
        theta = m.transforms(len(x), torch.Generator().manual_seed(5))
        with torch.no_grad():
            errs[weight] = float((m.regress(warp(x, theta)) - warp(m.regress(x), theta)).pow(2).sum(1).mean())
    # the consistency loss makes f commute with the transformations (measured: 3e-4 against 0.045)
    assert errs[1.0] < 0.2 * errs[0.0]


# -- defaults moved to the authors' values (results/deviations.md): the test fails if its default is reverted --
def test_tcr_weighs_consistency_at_the_authors_0_01_and_learns_at_1e_3():
    o = TCR(budget="cpu").options
    assert (o["tcr_weight"], o["lr"], o["loss"]) == (0.01, 1e-3, "mse")
    a, b = torch.zeros(4), torch.full((4,), 2.0)
    assert float(TCR().criterion(a, b)) == 4.0  # squared error
    assert float(TCR(loss="l1").criterion(a, b)) == 2.0  # the authors' script's absolute error
