"""The diffusion and flow rows of Table 1 (issue 13): ReFlow, DDIB, EGSDE and SCONES.

Each is checked on the toy tasks against what its paper claims there, then all four run on the
digits task through `bench run` (smoke budget, tiny options).  The shared plugin contract
(tests/test_contract.py) covers shapes, determinism, save/load and resume for all four.
"""
from __future__ import annotations

import json

import numpy as np
import ot as pot
import pytest
import torch

from bench import ot
from bench.datasets.toy import SRC_CENTRES, TGT_CENTRES, Toy1D, Toy2D
from bench.registry import methods
from bench.context import FitContext
from bench.testing import fit_until_killed

# small networks and short runs: every fit below takes seconds on one CPU thread
TOY = {"mlp_hidden": 128, "mlp_depth": 3, "toy_score_steps": 1000, "toy_score_batch": 256, "score_warmup": 50}


def _fit(name, data, **options):
    """Fit on the CPU in this process (seed 0, smoke budget, no run directory)."""
    run = FitContext(None, device="cpu", seed=0, budget="smoke", progress=False)
    torch.manual_seed(0)
    run.method = m = methods()[name](**options)
    m.check_setting(data)
    m.setup(data, run)
    m.fit(data, run)
    return m


def _transport(m, x, seed=1):
    return m.transport(x, generator=torch.Generator().manual_seed(seed))


def _at_minus4(m, n=1000):
    return _transport(m, torch.full((n, 1), -4.0))


def _modes(y):
    """(share within 1.0 of a target centre, index of the nearest centre: 0 right, 1 left)."""
    d = torch.cdist(y.float(), TGT_CENTRES)
    return float((d.min(1).values < 1.0).float().mean()), d.argmin(1)


def _upper(x):
    return torch.cdist(x.float(), SRC_CENTRES).argmin(1) == 0


# -- bench/ot.py: the entropic dual SCONES maximises --------------------------------------------------
def test_entropic_dual_recovers_the_sinkhorn_plan():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 2, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64) + 1
    C, eps = ot.cost_matrix(x, y), 0.3
    u = torch.zeros(7, dtype=torch.float64, requires_grad=True)
    v = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([u, v], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -ot.dual_entropic_objective(u, v, C, eps)
        loss.backward()
        return loss
    opt.step(closure)
    H = ot.entropic_log_compatibility(u, v, C, eps).exp().detach()
    # pi = H p q is the plan of min <C, pi> + eps KL(pi | p q), POT's sinkhorn with reg = eps
    plan = pot.sinkhorn(np.full(7, 1 / 7), np.full(5, 1 / 5), C.numpy(), eps, stopThr=1e-13, numItermax=100_000)
    np.testing.assert_allclose(H.numpy() / 35, plan, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(H.mean(1).numpy(), 1.0, atol=1e-6)  # the x-marginal of H p q is p
    # aligned pairs: log H on the diagonal
    diag = ot.entropic_log_compatibility(u[:5], v, torch.diagonal(C[:5]), eps)
    torch.testing.assert_close(diag, torch.diagonal(ot.entropic_log_compatibility(u, v, C, eps)[:5]))


# -- ReFlow -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_reflow_toy1d_moves_minus4_to_4_and_reflow_straightens_the_paths(one_thread):
    data = Toy1D().load(None, 0)
    m = _fit("reflow", data, reflow=1, toy_flow_steps=1200, toy_ode_steps=50, mlp_hidden=128,
             straightness_n=256, reflow_pairs=1000)
    assert abs(float(_at_minus4(m).mean()) - 4.0) < 0.5
    assert ot.w2_empirical(_transport(m, data.source_test), data.target_test) < 0.3
    b = m.diagnostics()
    # Liu et al.: rectification straightens the flow (S of the 2-rectified flow far below the 1-rectified one)
    assert b["straightness_round1"] < 0.1 * b["straightness_round0"] and b["straightness"] == b["straightness_round1"]
    assert m.nfe == 50 and b["reflow_rounds"] == 1
    assert len(m.pair_x0) == 0  # the generated pairs do not stay in the checkpoint


@pytest.mark.slow
def test_reflow_toy2d_lands_in_the_target_modes_with_a_cheaper_coupling(one_thread):
    data = Toy2D().load(None, 0)  # semi-paired: the pairs are ignored
    m = _fit("reflow", data, toy_flow_steps=1500, toy_ode_steps=50, mlp_hidden=128)
    y = _transport(m, data.source_test)
    near, _ = _modes(y)
    assert near > 0.85
    # the rectified coupling is no costlier than the independent one it was trained on (their Theorem 3.5)
    cost_rectified = float((y - data.source_test).pow(2).sum(1).mean())
    cost_independent = float(torch.cdist(data.source_test, data.target_test).pow(2).mean())
    assert cost_rectified < cost_independent


# -- ReFlow's translation loss (Liu et al. 2023, Sec. 5.3) ---------------------------------------------
def _velocity(d):
    """A tiny differentiable v(x, t) on flat rows."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(d + 1, d)
    return lambda x, t: lin(torch.cat([x, t[:, None]], 1)), lin


def test_feature_loss_with_identity_h_is_the_pixel_flow_matching_loss():
    from bench import ode
    from bench.methods.reflow import feature_loss
    g = torch.Generator().manual_seed(0)
    x0, x1, t = torch.randn(32, 5, generator=g), torch.randn(32, 5, generator=g) + 3, torch.rand(32, generator=g)
    net, lin = _velocity(5)
    a = feature_loss(net, lambda x: x, x0, x1, t=t)
    ga = torch.autograd.grad(a, list(lin.parameters()))
    b = ode.flow_matching_loss(net, x0, x1, t=t)
    gb = torch.autograd.grad(b, list(lin.parameters()))
    torch.testing.assert_close(a, b)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v)


def test_feature_loss_with_a_linear_h_is_the_projected_loss():
    """h(x) = A x: grad h^T w = A w, so the loss is mean_k (A (x1 - x0 - v))_k^2; with A the projection on the
    first coordinate, the error in the other coordinates costs nothing (it is what h does not see)."""
    from bench.methods.reflow import feature_loss
    g = torch.Generator().manual_seed(1)
    x0, x1, t = torch.randn(16, 4, generator=g), torch.randn(16, 4, generator=g), torch.rand(16, generator=g)
    A = torch.randn(3, 4, generator=g)
    net, lin = _velocity(4)
    w = (x1 - x0) - net(x0 + t[:, None] * (x1 - x0), t)
    expected = (w @ A.T).pow(2).mean()
    got = feature_loss(net, lambda x: x @ A.T, x0, x1, t=t, scale=2.0)
    torch.testing.assert_close(got, 4.0 * expected)
    ge = torch.autograd.grad(4.0 * expected, list(lin.parameters()))
    gg = torch.autograd.grad(got, list(lin.parameters()))
    for u, v in zip(ge, gg):
        torch.testing.assert_close(u, v)
    e1 = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    free = lambda x, t: torch.cat([(x1 - x0)[:, :1], torch.randn(len(x), 3, generator=g)], 1)
    assert float(feature_loss(free, lambda x: x @ e1.T, x0, x1, t=t)) == pytest.approx(0.0, abs=1e-10)


def test_reflow_trains_with_the_papers_translation_loss_by_default():
    """Pinned: the default image loss is Sec. 5.3's (on every budget), declared with the authors' value and its
    source; vectors keep the plain loss (the paper's toy experiments); rows stored before the option read as
    the plain loss with the classifier options at today's values."""
    from bench.methods.reflow import ReFlow
    from bench.options import declared
    from bench.registry import get_task, options_variant
    from bench.testing import fit_in_memory, tiny_images
    for budget in ("smoke", "cpu", "fast", "paper"):
        o = ReFlow.resolve_options(budget, {})
        assert o["loss"] == "classifier" and o["toy_loss"] == "pixel", budget
    spec = declared(ReFlow.default_options)
    assert spec["loss"].authors == "classifier" and "Sec. 5.3" in spec["loss"].source
    assert ReFlow.options_before["loss"] == "pixel"
    old_row = {k: v for k, v in ReFlow(budget="cpu").options.items()
               if k not in ("loss", "toy_loss") and not k.startswith(("cls_", "toy_cls_"))}
    task_options = get_task("digits")().options
    assert options_variant("reflow", "cpu", "digits", old_row, task_options) == "loss=pixel"
    m = fit_in_memory(ReFlow, tiny_images(), **ReFlow.test_options)
    assert m.uses_classifier and not any(p.requires_grad for p in m.classifier.parameters())
    assert m.diagnostics()["feature_scale"] > 0
    plain = fit_in_memory(ReFlow, tiny_images(), **{**ReFlow.test_options, "loss": "pixel"})
    assert plain.classifier is None and "feature_scale" not in plain.diagnostics()


# -- DDIB ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddib_toy1d_bridges_minus4_to_4_and_is_cycle_consistent(one_thread):
    data = Toy1D().load(None, 0)
    m = _fit("ddib", data, **TOY, toy_ddim_steps=200, cycle_n=256)
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
    m = _fit("ddib", data, **TOY, encoder="pf-heun", toy_ddim_steps=50, cycle_n=256)
    near, _ = _modes(_transport(m, data.source_test))
    assert near > 0.85
    assert m.diagnostics()["cycle_rmse"] < 0.05 and m.nfe == 200


# -- EGSDE --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_egsde_toy1d_realism_guidance_reaches_the_target_marginal(one_thread):
    data = Toy1D().load(None, 0)
    # in 1-D the low-pass filter is the identity, so the faithfulness energy only pulls back to the
    # source (lambda_i = 0 here); the authors' lambda_s = 500 is for 256-px feature maps, 5 is the toy scale
    m = _fit("egsde", data, **TOY, toy_cls_steps=800, toy_sde_steps=100, lambda_s=5.0, lambda_i=0.0)
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
    m = _fit("egsde", data, **TOY, toy_cls_steps=800, toy_sde_steps=100, lambda_s=0.0, lambda_i=0.0)
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


# -- SCONES -------------------------------------------------------------------------------------------
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


# -- every stage resumes -----------------------------------------------------------------------------
RESUMABLE = {  # a few steps in every loop, on the 2-D task
    "reflow": {"reflow": 1, "toy_flow_steps": 12, "reflow_pairs": 64},
    "ddib": {"toy_score_steps": 12, "toy_ddim_steps": 5},
    "egsde": {"toy_score_steps": 12, "toy_cls_steps": 12, "toy_sde_steps": 5},
    "scones": {"toy_score_steps": 12, "ot_steps": 12, "toy_levels": 3},
}


def _fit_in(directory, name, data, kill_after=None):
    """Fit with a checkpoint after every step; with ``kill_after``, stop right after that many checkpoints
    (as a kill would) and return None."""
    cls = methods()[name]
    return fit_until_killed(cls, data, directory, {**cls.test_options, **RESUMABLE[name]}, kill_after)[0]


@pytest.mark.parametrize("name", list(RESUMABLE))
def test_a_fit_killed_in_any_stage_resumes_to_the_same_model(name, tmp_path, one_thread):
    data = Toy2D().load(None, 0)
    whole = _fit_in(tmp_path / "whole", name, data)
    x = data.source_test[:16]
    expected = _transport(whole, x)
    for cut in (5, 17, 30):  # early in the first loop, in a later loop, past the last one
        d = tmp_path / f"cut{cut}"
        assert _fit_in(d, name, data, kill_after=cut) is None or cut >= 30
        resumed = _fit_in(d, name, data)
        torch.testing.assert_close(_transport(resumed, x), expected, rtol=0, atol=0)
        assert resumed.diagnostics() == whole.diagnostics()


# -- all four on digits through `bench run` ------------------------------------------------------------
TINY_DIGITS = {  # seconds of training each: a plumbing check of the whole pipeline, not a quality run
    "reflow": ["flow_steps=3", "flow_batch=8", "ode_steps=2", "straightness_n=8"],
    "ddib": ["score_steps=3", "score_batch=8", "ddim_steps=2", "cycle_n=8"],
    "egsde": ["score_steps=3", "score_batch=8", "cls_steps=3", "cls_batch=8", "cls_width=8", "sde_steps=2"],
    "scones": ["score_steps=3", "score_batch=8", "ot_steps=3", "potential_hidden=32", "levels=2",
               "n_steps_each=1"],
}


@pytest.mark.slow
def test_all_four_run_on_digits_through_bench_run(tmp_path, run_bench):
    """The plumbing on the real task: `bench run` trains, transports, scores and stores a row for each, with
    the bound terms each method reports. Tiny --opt settings and 30 evaluation sources (FID on the CPU
    dominates a smoke run)."""
    out = tmp_path / "runs"
    opts = ["--opt", "unet_base=8"] + [a for name, kv in TINY_DIGITS.items() for o in kv for a in ("--opt", f"{name}.{o}")]
    run_bench("run", "--methods", "reflow,ddib,egsde,scones", "--task", "digits", "--budget", "smoke",
              "--out", str(out), "--no-progress", *opts, eval_per_class=3)
    for name, key in [("reflow", "bound_straightness"), ("ddib", "bound_cycle_rmse"),
                      ("egsde", None), ("scones", "bound_marginal_x")]:
        row = json.loads(next((out / "digits" / name).glob("smoke-seed0*/row.json")).read_text())
        assert row["fid_n"] == 30 and 0.0 <= row["acc"] <= 100.0 and row["nfe"] >= 1, name
        assert key is None or key in row, (name, sorted(row))
        assert row["options"]["unet_base"] == 8, name


def test_cpu_score_lr_is_the_measured_winner_and_only_on_cpu():
    """The `cpu` lr of the score models (OTCS's stage II too) is the lowest held-out eps-MSE of the committed
    studies, and only the `cpu` budget uses it."""
    import csv
    from pathlib import Path

    from bench.registry import get_method
    from bench.scoremodel import CPU_SCORE_LR

    # studies/score_lr: the unconditional score models' study, and OTCS's own for its conditional stage II
    for study in ("unconditional_2000", "otcs_stage2"):
        rows = list(csv.DictReader(open(Path(__file__).parents[1] / "studies/score_lr" / study / "curve.csv")))
        last = max(int(r["step"]) for r in rows)
        best = min((r for r in rows if int(r["step"]) == last), key=lambda r: float(r["held_out_mse"]))
        assert float(best["lr"]) == CPU_SCORE_LR, study
    for name, key in (("ddib", "score_lr"), ("egsde", "score_lr"), ("scones", "score_lr"), ("dpmot", "lr"),
                      ("otcs", "lr")):
        cls = get_method(name)
        assert cls.resolve_options("cpu", {})[key] == CPU_SCORE_LR, name
        for budget in ("smoke", "fast", "paper"):
            assert cls.resolve_options(budget, {})[key] == 2e-4, (name, budget)
