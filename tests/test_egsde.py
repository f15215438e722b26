"""EGSDE (issue 13): realism and faithfulness guidance on the toy tasks, the authors' low-pass factor, and the
energy weights set from the stated pulls."""
from __future__ import annotations

import pytest
import torch

from _helpers import SCORE_TOY as TOY, fit_by_name as _fit, in_upper_mode as _upper, target_modes as _modes
from _helpers import transport as _transport
from bench import ot
from bench.context import FitContext
from bench.datasets.toy import Toy1D, Toy2D


@pytest.mark.slow
def test_egsde_toy1d_realism_guidance_reaches_the_target_marginal(one_thread):
    data = Toy1D().load(None, 0)
    # in 1-D the low-pass filter is the identity, so the faithfulness energy only pulls back to the
    # source (lambda_i = 0 here); the authors' lambda_s = 500 is for 256-px feature maps, 5 is the toy scale
    m = _fit("egsde", data, **TOY, cls_steps=800, sde_steps=100, lambda_s=5.0, lambda_i=0.0)
    w2_guided = ot.w2_empirical(_transport(m, data.source_test), data.target_test)
    assert w2_guided < 0.3
    m.options.update(lambda_s=0.0)  # the same model without the energy: SDEdit from t0 = 0.5
    w2_plain = ot.w2_empirical(_transport(m, data.source_test), data.target_test)
    assert w2_guided < w2_plain - 0.2
    # the domain classifier separates noisy source from noisy target at moderate noise
    t = torch.full((500,), 0.2)
    sde = m.target_model.sde
    xs = sde.perturb(data.source_test, t, torch.randn(500, 1))
    yt = sde.perturb(data.target_test, t, torch.randn(500, 1))
    with torch.no_grad():
        acc = (m.classifier(xs, t).argmax(1) == 0).float().mean() + (m.classifier(yt, t).argmax(1) == 1).float().mean()
    assert float(acc) / 2 > 0.95


@pytest.mark.slow
def test_egsde_toy2d_faithfulness_keeps_the_output_near_its_source(one_thread):
    data = Toy2D().load(None, 0)
    m = _fit("egsde", data, **TOY, cls_steps=800, sde_steps=100, lambda_s=0.0, lambda_i=0.0)
    x, up = data.source_test, _upper(data.source_test)
    y0 = _transport(m, x)
    near0, mode0 = _modes(y0)
    assert near0 > 0.9  # from t0 = 0.5 the target model alone lands in the target modes, either one
    # the faithfulness energy ||LowPass(y_t) - LowPass(x_t)||^2 (identity low-pass on vectors; 1 is the
    # toy scale of the authors' lambda_i = 2 at 256 px) keeps each output nearer its own source
    m.options.update(lambda_i=1.0)
    y1 = _transport(m, x)
    near1, mode1 = _modes(y1)
    assert float((y1 - x).norm(dim=1).mean()) < float((y0 - x).norm(dim=1).mean()) - 0.3
    assert near1 > 0.7
    # ... so the upper source mode goes more often to the target mode nearer to it (right)
    assert float((mode1[up] == 0).float().mean()) > float((mode0[up] == 0).float().mean()) + 0.1


def test_egsde_lowpass_keeps_the_authors_factor_32():
    """Pinned: the low-pass side is the authors' down_N = 32 as a factor (8 px at 256 px, 1 at 28 px), on every
    budget; 8 px stays reachable."""
    from bench.methods.egsde import EGSDE, lowpass_rule
    from bench.testing import tiny_images
    assert [lowpass_rule((3, s, s)) for s in (256, 128, 64, 32, 28, 8)] == [8, 4, 2, 1, 1, 1]
    for budget in ("smoke", "cpu", "fast", "paper"):
        o = EGSDE.resolve_options(budget, {})
        assert (o["lowpass_side"], o["lambda_s"], o["lambda_i"]) == ("auto", "auto", "auto"), budget
    run = FitContext(None, device="cpu", seed=0, budget="smoke", progress=False)
    m = EGSDE(**EGSDE.test_options)
    m.setup(tiny_images(side=28, n=8), run)
    assert m.lowpass == 1
    m = EGSDE(**EGSDE.test_options, lowpass_side=8, lambda_s=500, lambda_i=2)
    m.setup(tiny_images(side=28, n=8), run)
    assert m.lowpass == 8 and m.weights() == (500.0, 2.0)
    with pytest.raises(Exception, match="lowpass_side=0"):
        EGSDE(lowpass_side=0)


def test_egsde_auto_weights_give_the_stated_pulls_from_training_data_only(one_thread):
    """lambda = the stated pull / the measured pull of the energy at weight 1, measured at t0 on training pairs:
    the test split is never read (here it is NaN), and the row records the weights and the pulls."""
    from bench.methods.egsde import AUTHORS_FAITHFULNESS_PULL, EGSDE, REALISM_PULL
    from bench.testing import tiny_images
    data = tiny_images(side=8)
    data.source_test = torch.full_like(data.source_test, float("nan"))
    data.target_test = torch.full_like(data.target_test, float("nan"))
    m = _fit("egsde", data, **{**EGSDE.test_options, "cls_steps": 30, "score_steps": 30})
    b = m.diagnostics()
    assert b["lowpass_side"] == 1 and 0 < b["pull_s"] and 0 < b["pull_i"] and b["eps_rms"] > 0
    assert b["lambda_s"] * b["pull_s"] == pytest.approx(REALISM_PULL)
    assert b["lambda_i"] * b["pull_i"] == pytest.approx(AUTHORS_FAITHFULNESS_PULL)
    assert m.weights() == (b["lambda_s"], b["lambda_i"])
    y = _transport(m, tiny_images(side=8).source_test[:4])
    assert torch.isfinite(y).all()


@pytest.mark.slow
def test_egsde_authors_faithfulness_pull_is_measured_on_afhq():
    """AUTHORS_FAITHFULNESS_PULL is the authors' setting measured on the AFHQ cat / dog samples at 256 px."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from bench.data import resolve_root
    from bench.methods.egsde import AUTHORS_FAITHFULNESS_PULL, authors_faithfulness_pull
    root = resolve_root(None) / "samples" / "afhq_stargan_v2"
    if not root.is_dir():
        pytest.skip(f"no AFHQ samples under {root}")

    def load(kind):
        files = sorted(Path(root).glob(f"*/{kind}/*.jpg"))
        return torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB").resize((256, 256), Image.BICUBIC)))
                            .permute(2, 0, 1).float() / 127.5 - 1 for f in files])
    cat, dog = load("cat"), load("dog")
    assert (len(cat), len(dog)) == (15, 13)
    assert authors_faithfulness_pull(cat, dog) == pytest.approx(AUTHORS_FAITHFULNESS_PULL, abs=5e-4)
