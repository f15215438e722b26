"""DDIB (issue 13): the toy tasks against what its paper claims there (a cycle-consistent bridge)."""
from __future__ import annotations

import pytest
import torch

from _helpers import SCORE_TOY as TOY, at_minus4 as _at_minus4, fit_by_name as _fit, target_modes as _modes
from _helpers import transport as _transport
from bench import ot
from bench.datasets.toy import Toy1D, Toy2D


@pytest.mark.slow
def test_ddib_toy1d_bridges_minus4_to_4_and_is_cycle_consistent(one_thread):
    data = Toy1D().load(None, 0)
    m = _fit("ddib", data, **TOY, ddim_steps=200, cycle_n=256)
    assert abs(float(_at_minus4(m).mean()) - 4.0) < 0.5
    assert ot.w2_empirical(_transport(m, data.source_test), data.target_test) < 0.3
    b = m.diagnostics()
    assert b["cycle_rmse"] < 0.05 and b["translation_cycle_rmse"] < 0.1
    assert m.nfe == 400
    y1, y2 = _transport(m, data.source_test[:50], 1), _transport(m, data.source_test[:50], 2)
    assert torch.equal(y1, y2)  # deterministic: the generator is not used


@pytest.mark.slow
def test_ddib_toy2d_decodes_into_the_target_modes(one_thread):
    data = Toy2D().load(None, 0)
    m = _fit("ddib", data, **TOY, encoder="pf-heun", ddim_steps=50, cycle_n=256)
    near, _ = _modes(_transport(m, data.source_test))
    assert near > 0.85
    assert m.diagnostics()["cycle_rmse"] < 0.05 and m.nfe == 200
