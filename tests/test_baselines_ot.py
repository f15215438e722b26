"""The unpaired OT maps together (issue 12): NOT, W2GAN, OT-ICNN and OTM on the toy problems with a known
answer, their shared settings, and W2GAN, OT-ICNN, OTM and TCR through `bench run` on digits.  Each method's own
tests are in its file (tests/test_w2gan.py, test_ot_icnn.py, test_otm.py, test_tcr.py, test_not.py).

- toy1d (N(-4, 1) -> N(4, 1)): the OT map is x + 8, checked at the source's quantiles and in L2 over the
  test sources (the decreasing map also pushes P to Q; a map that reaches -4 -> 4 can still be wrong);
- toy2d: the three unpaired OT maps ignore the guiding pairs and follow the cost (upper -> right,
  lower -> left); the exact discrete OT plan of the training samples moves about 20 % of each mode
  across (measured with POT: 21 % / 19 %), and each map must move that share within 7 points: OT-ICNN
  does, W2GAN and OTM move none (strict xfail, see below);
  (TCR is supervised by the crossing pairs and follows them: tests/test_tcr.py);
- one slow test runs W2GAN, OT-ICNN, OTM and TCR through `bench run` on digits at smoke.
"""
from __future__ import annotations

import pytest
import torch

from bench.api import SEMI_PAIRED, UNPAIRED, BenchError, TaskData
from bench.datasets.toy import Toy1D, Toy2D
from bench.methods.not_ import NOT
from bench.methods.ot_icnn import OTICNN
from bench.methods.otm import OTM
from bench.methods.w2gan import W2GAN
from bench.testing import fit_in_memory

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(mlp_hidden=64, mlp_depth=2)
# settings measured against the old one-point check (fit seeds 0-3 on toy1d's data seed 0: T(-4) within 0.3 of 4,
# slopes 0.9-1.1): W2GAN's default vector lrs; OT-ICNN and OTM with a cosine decay that settles the last
# oscillations; NOT as tests/test_not.py.  Against the whole map, see below.
TOY1D = {NOT: dict(steps=300, inner_steps=5, batch_size=64, betas=[0.0, 0.9], lr_schedule="cosine", **SMALL),
         W2GAN: dict(steps=1000, **SMALL),
         OTICNN: dict(steps=200, map_lr=1e-2, critic_lr=1e-2, lr_schedule="cosine"),
         OTM: dict(steps=1000, lr_schedule="cosine", **SMALL)}
TOY2D = {W2GAN: dict(steps=400, **SMALL),
         OTICNN: dict(steps=200, map_lr=1e-2, critic_lr=1e-2, lr_schedule="cosine"),
         OTM: dict(steps=600, lr_schedule="cosine", **SMALL)}


_fit = fit_in_memory


# -- the OT maps on the toys -------------------------------------------------------------------
# Issue 37: checked against the exact answer, not one point.  toy1d: the map is x + 8 at the 5 ... 95 % quantiles of
# the source (|error| < 0.5, about 5 standard errors of the 1,000-sample quantiles at the tails) and over the test
# sources (L2-UVP = 100 E (T(x) - x - 8)^2 / Var(Q) < 5 %, Var(Q) = 1).  toy2d: the share of each mode that crosses
# is within 7 points of the exact discrete OT plan's on the training samples (POT).  Measured at the settings above
# (2026-12-07, data seeds 0-2): OT-ICNN L2-UVP 2.8 / 1.1 / 30.9 % (seed 2: right at every quantile, off in the tails
# beyond them), crossing 23 / 19 % against the plan's 21 / 19 %; NOT 3.3 / 3.0 / 4.8 %; W2GAN 12.1 / 357 / 307 %
# (seeds 1 and 2: the decreasing map), crossing 0 / 0 %; OTM 12.1 / 3.4 / 15.0 %, crossing 0 / 0 %.  The failures
# are marked strict xfail with these numbers: a fix makes them pass, and then the marker must go.
QUANTILES = torch.tensor([-1.645, -1.0, -0.674, 0.0, 0.674, 1.0, 1.645])  # N(0, 1) at 5, 16, 25, 50, 75, 84, 95 %
CROSSING_TOLERANCE = 7.0  # points


def _known_failure(reason: str):
    return pytest.mark.xfail(strict=True, raises=AssertionError, reason=f"measured at the toy settings above: {reason}")


@pytest.mark.slow
@pytest.mark.parametrize("cls,seed", [
    pytest.param(NOT, 0, id="not-0"), pytest.param(NOT, 1, id="not-1"),
    pytest.param(W2GAN, 0, id="w2gan-0", marks=_known_failure("L2-UVP 12.1 %, the 95 % quantile 0.46 low")),
    pytest.param(W2GAN, 1, id="w2gan-1", marks=_known_failure("the decreasing map: L2-UVP 357 %")),
    pytest.param(OTICNN, 0, id="ot-icnn-0"), pytest.param(OTICNN, 1, id="ot-icnn-1"),
    pytest.param(OTM, 0, id="otm-0", marks=_known_failure("L2-UVP 12.1 %")), pytest.param(OTM, 1, id="otm-1")])
def test_ot_maps_are_x_plus_8_over_the_quantiles_of_toy1d(cls, seed):
    data = Toy1D().load(None, seed)
    m = _fit(cls, data, **TOY1D[cls])
    q = -4.0 + QUANTILES
    err = m.transport(q[:, None])[:, 0] - (q + 8.0)
    assert float(err.abs().max()) < 0.5, f"T(q) - (q + 8) at the quantiles: {err.tolist()}"
    x = data.source_test
    uvp = 100 * float((m.transport(x) - x - 8.0).pow(2).mean())
    assert uvp < 5.0, f"L2-UVP {uvp:.2f} % against x + 8"


@pytest.fixture(scope="module")
def exact_crossing():
    """The share (%) of the upper / lower source mode that the exact discrete OT plan of toy2d's training samples
    sends across the cost-minimising assignment (to the left / right target mode)."""
    import numpy as np
    import ot as pot
    task = Toy2D()
    data = task.load(None, 0)
    X, Y = data.source_train.double().numpy(), data.target_train.double().numpy()
    plan = pot.emd(np.full(len(X), 1 / len(X)), np.full(len(Y), 1 / len(Y)), pot.dist(X, Y), numItermax=1_000_000)
    src, tgt = data.source_train_labels.numpy(), task.target_mode(data.target_train).numpy()
    upper = 100 * plan[src == 0][:, tgt == 1].sum() / plan[src == 0].sum()
    lower = 100 * plan[src == 1][:, tgt == 0].sum() / plan[src == 1].sum()
    return float(upper), float(lower)


def test_the_exact_toy2d_plan_crosses_about_a_fifth_of_each_mode(exact_crossing):
    upper, lower = exact_crossing
    assert 15 < upper < 25 and 15 < lower < 25  # measured: 20.8 / 19.0 (a balanced 2,000-point sample: 18.9)


@pytest.mark.slow
@pytest.mark.parametrize("cls", [
    pytest.param(W2GAN, id="w2gan", marks=_known_failure("crosses 0 % of each mode, the exact plan 21 % / 19 %")),
    pytest.param(OTICNN, id="ot-icnn"),
    pytest.param(OTM, id="otm", marks=_known_failure("crosses 0 % of each mode, the exact plan 21 % / 19 %"))])
def test_unpaired_ot_maps_cross_the_modes_as_the_exact_plan_on_toy2d(cls, exact_crossing):
    task = Toy2D()
    data = task.load(None, 0)
    m = _fit(cls, data, **TOY2D[cls])
    x = data.source_test
    out = m.transport(x)
    res = task.task_metrics(data, x, out, data.source_test_labels, None)
    assert float(torch.cdist(out, data.target_test).min(1).values.mean()) < 0.5  # on the target modes
    # the guide crosses the cost-minimising assignment: OT follows the cost, and moves across exactly the share
    # of each mode that the exact plan moves
    upper, lower = exact_crossing
    assert abs(res["upper_mode_hit"] - upper) <= CROSSING_TOLERANCE and \
        abs(res["lower_mode_hit"] - lower) <= CROSSING_TOLERANCE, (res, exact_crossing)


def test_unpaired_settings_and_notes():
    for cls in (W2GAN, OTICNN, OTM):
        assert cls.family == "OT" and set(cls.settings) == {UNPAIRED, SEMI_PAIRED} and not cls.uses_pairs
        assert "ignored" in cls.notes and cls.paper
    with pytest.raises(BenchError, match="coordinates"):
        OTICNN(kind="vector").check_setting(TaskData("x", UNPAIRED, torch.zeros(4, 3), torch.zeros(4, 2),
                                        torch.zeros(1, 3), torch.zeros(1, 2)))


# -- digits through the CLI ----------------------------------------------------------------------
@pytest.mark.slow
def test_all_four_run_on_digits_through_bench_run(tmp_path, run_bench):
    """The plumbing on the real task: `bench run` trains, transports, scores and stores a row for each.
    Tiny --opt settings, and 30 evaluation sources instead of smoke's 250 (FID on the CPU dominates)."""
    import json

    out = tmp_path / "runs"
    opts = ["w2gan.steps=3", "ot-icnn.steps=3", "ot-icnn.inner_steps=2", "otm.steps=2", "otm.inner_steps=2",
            "tcr.steps=3"]
    run_bench("run", "--methods", "w2gan,ot-icnn,otm,tcr", "--task", "digits", "--budget", "smoke",
              "--out", str(out), "--no-progress", *[a for o in opts for a in ("--opt", o)], eval_per_class=3)
    for name in ("w2gan", "ot-icnn", "otm", "tcr"):
        row = json.loads(next((out / "digits" / name).glob("smoke-seed0*/row.json")).read_text())
        assert row["fid_n"] == 30 and 0.0 <= row["acc"] <= 100.0 and row["nfe"] == 1
        assert row["options"]["steps"] == {"otm": 2}.get(name, 3) and row["family"] == ("Regression" if name == "tcr" else "OT")
