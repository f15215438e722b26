"""Ground-truth tasks (issue 37): the exact maps are exact, the scores measure what they say, and they tell a
right map from a wrong one that has the right marginal.

- gauss-*: the closed form pushes S1 onto S2 and is symmetric positive definite (a gradient of a convex
  quadratic); convex-*: the map is the autograd gradient of the stated potential, whose Hessian is positive
  definite; for both, POT's exact discrete plan between sources and their shuffled images is the identity
  pairing (the map is cyclically monotone, i.e. optimal);
- the scores of an exact, an identity, a noisy stochastic and an anti-monotone "method";
- clusters-16: POT's exact plan keeps every cluster on the cost's partner (the cost alone is wrong), the
  guiding pairs lie on the right map, and the references score what they must;
- NOT, trained for seconds, reaches a few % L2-UVP on gauss-16, and does not without its cost term.
"""
from __future__ import annotations

import json
import re

import numpy as np
import ot as pot
import pytest
import torch

from bench.api import SEMI_PAIRED, UNPAIRED, EvalContext
from bench.datasets import ground_truth as gt
from bench.metrics import ot_map
from bench.registry import methods, tasks
from bench.runner import run_one
from bench.spec import RunSpec, Settings
from bench.testing import fit_in_memory

UNPAIRED_TASKS = [t for t in gt.GROUND_TRUTH_TASKS if t != "clusters-16"]


def _ctx(method=None, transport=None):
    return EvalContext(cache_dir=None, device=torch.device("cpu"), budget="smoke", seed=0, method=method,
                       transport=transport)


class _Fixed:
    """A 'method' for evaluate: deterministic unless ``noise`` (then a stochastic map around ``fn``)."""

    def __init__(self, fn, noise: float = 0.0):
        self.fn, self.noise, self.stochastic = fn, noise, noise > 0
        self.g = torch.Generator().manual_seed(3)

    def transport(self, x):
        y = self.fn(x).float()
        return y + self.noise * torch.randn(y.shape, generator=self.g) if self.noise else y


def _evaluate(task, data, method, n=None):
    x = data.source_test[:n]
    labels = None if data.source_test_labels is None else data.source_test_labels[: len(x)]
    return task.evaluate(data, x, method.transport(x), labels, _ctx(method, method.transport))


# -- registration and data ------------------------------------------------------------------------
def test_registered_with_their_dimensions_and_settings():
    reg = tasks()
    for name in gt.GROUND_TRUTH_TASKS:
        cls = reg[name]
        assert cls.name == name and cls.setting == (SEMI_PAIRED if name == "clusters-16" else UNPAIRED)
        assert cls.dim == int(name.rsplit("-", 1)[1])
        directions = {m.key: m.higher_is_better for m in cls.metrics}
        assert directions["l2_uvp"] is False and directions["bw2_uvp"] is False
        assert directions.get("cos", True) is True and directions.get("cluster_hit", True) is True


@pytest.mark.parametrize("name", ["gauss-16", "convex-16", "clusters-16"])
def test_data_is_deterministic_per_seed_and_hides_the_map(name):
    cls = tasks()[name]
    a, b, c = cls().load(None, 0), cls().load(None, 0), cls().load(None, 1)
    assert a.source_train.shape == (gt.N_TRAIN, cls.dim) and a.target_test.shape == (gt.N_TEST, cls.dim)
    assert a.source_train.dtype == torch.float32
    torch.testing.assert_close(a.source_train, b.source_train, rtol=0, atol=0)
    torch.testing.assert_close(a.target_train, b.target_train, rtol=0, atol=0)
    assert not torch.equal(a.source_train, c.source_train)
    assert a.extra == {}  # nothing about the map travels with the data
    if name != "clusters-16":
        task = cls()
        assert a.pairs is None and a.source_train_labels is None
        # the targets are independent draws, not the sources' images in the same order
        paired = (task.exact_map(a.source_train[:500]) - a.target_train[:500].double()).pow(2).sum(1).mean()
        assert paired > 0.5 * task.target_stats()[2]
        # the problem is fixed per task; only the samples change with the seed
        assert all(np.array_equal(v, cls().problem[k]) for k, v in task.problem.items())


# -- the exact maps are exact ------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [2, 16, 64])
def test_gaussian_closed_form_pushes_s1_onto_s2(dim):
    p = tasks()[f"gauss-{dim}"]().problem
    A = p["A"]
    np.testing.assert_allclose(A, A.T, atol=1e-12)
    assert np.linalg.eigvalsh(A).min() > 0  # the gradient of a convex quadratic
    np.testing.assert_allclose(A @ p["S1"] @ A, p["S2"], atol=1e-9 * np.abs(p["S2"]).max())
    np.testing.assert_allclose(A @ p["m1"] + p["b"], p["m2"], atol=1e-12)
    # BW2 between the two Gaussians is the cost of this map: E||T(x) - x||^2 = ||m2 - m1||^2 + tr (A - I) S1 (A - I)
    D = A - np.eye(dim)
    cost = float(np.sum((p["m2"] - p["m1"]) ** 2) + np.trace(D @ p["S1"] @ D))
    assert ot_map.bures_w2_sq(p["m1"], p["S1"], p["m2"], p["S2"]) == pytest.approx(cost, rel=1e-9)


@pytest.mark.parametrize("dim", [2, 16, 64])
def test_convex_map_is_the_gradient_of_a_strictly_convex_potential(dim):
    task = tasks()[f"convex-{dim}"]()
    x = task.sample_source(64, torch.Generator().manual_seed(0)).requires_grad_(True)
    (grad,) = torch.autograd.grad(task.potential(x).sum(), x)
    torch.testing.assert_close(grad, task.exact_map(x.detach()), rtol=1e-10, atol=1e-10)
    for i in range(3):
        H = torch.autograd.functional.hessian(lambda z: task.potential(z[None])[0], x[i].detach(), vectorize=True)
        assert torch.linalg.eigvalsh(H).min() > 0.2  # >= the smallest eigenvalue of the B_k (1/4), minus rounding
    # and it is far from affine: the best affine map leaves a share of Var(Q) unexplained
    assert task.affine_floor(task.load(None, 0).source_test) > {2: 4, 16: 10, 64: 10}[dim]


@pytest.mark.parametrize("name", ["gauss-16", "convex-2", "convex-16", "convex-64"])
def test_pot_recovers_the_map_as_the_optimal_discrete_plan(name):
    """Cyclical monotonicity: between n sources and their shuffled images, the exact OT plan is T*."""
    task = tasks()[name]()
    x = task.sample_source(300, torch.Generator().manual_seed(1))
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(2))
    y = task.exact_map(x)[perm]
    w = np.full(300, 1 / 300)
    plan = pot.emd(w, w, pot.dist(x.numpy(), y.numpy()), numItermax=1_000_000)
    assert np.array_equal(plan.argmax(1), np.argsort(perm.numpy()))
    assert plan.max(1).min() == pytest.approx(1 / 300)


# -- the scores -----------------------------------------------------------------------------------------
def test_score_functions_on_known_values():
    m, S = np.zeros(2), np.diag([1.0, 4.0])
    assert ot_map.bures_w2_sq(m, S, m, S) == pytest.approx(0.0, abs=1e-12)
    # commuting covariances: sum (sqrt a - sqrt b)^2, plus the squared mean difference
    assert ot_map.bures_w2_sq(m, S, np.ones(2), np.diag([4.0, 9.0])) == pytest.approx(2 + 1 + 1)
    A, b = ot_map.gaussian_ot_map(m, S, np.ones(2), np.diag([4.0, 9.0]))
    np.testing.assert_allclose(A, np.diag([2.0, 1.5]), atol=1e-12)
    np.testing.assert_allclose(b, np.ones(2), atol=1e-12)
    x = torch.randn(100, 3, generator=torch.Generator().manual_seed(0))
    y = x + torch.tensor([1.0, 0.0, 0.0])
    assert ot_map.l2_uvp(y, y, 2.0) == 0.0
    assert ot_map.l2_uvp(x, y, 2.0) == pytest.approx(50.0)
    assert ot_map.displacement_cosine(x, y, y) == pytest.approx(1.0)
    assert ot_map.displacement_cosine(x, 2 * x - y, y) == pytest.approx(-1.0)
    mean, var = ot_map.barycentric(lambda z: z + 1, x[:4], 3)
    torch.testing.assert_close(mean, x[:4].double() + 1)
    torch.testing.assert_close(var, torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("name", ["gauss-16", "convex-16"])
def test_evaluate_tells_the_exact_map_from_identity_noise_and_an_anti_monotone_push_forward(name):
    task = tasks()[name]()
    data = task.load(None, 0)
    var = task.target_stats()[2]
    exact = _evaluate(task, data, _Fixed(task.exact_map))
    assert exact["l2_uvp"] < 1e-8 and exact["cos"] == pytest.approx(1.0)
    assert exact["barycentric_draws"] == 1 and exact["var_target"] == pytest.approx(var)
    # an exact push-forward of n test sources is as far from Q's fit as n exact target samples
    assert exact["bw2_uvp"] < 3 * exact["bw2_uvp_floor"] + 0.3
    ident = _evaluate(task, data, _Fixed(lambda x: x))
    assert ident["l2_uvp"] == pytest.approx(task.info(None, None)["L2-UVP of the identity"], abs=0.01)
    # a stochastic map scattered around T*: one draw is far off, the barycentric projection of 16 is not,
    # and the part that remains is the draws' own noise
    noisy = _evaluate(task, data, _Fixed(task.exact_map, noise=1.0), n=500)
    single = 100 * task.dim / var
    assert noisy["barycentric_draws"] == gt.DRAWS
    assert noisy["l2_uvp_single_draw"] == pytest.approx(single, rel=0.1)
    assert noisy["l2_uvp"] == pytest.approx(single / gt.DRAWS, rel=0.15)
    assert noisy["l2_uvp_draw_noise"] == pytest.approx(single / gt.DRAWS, rel=0.1)
    if name.startswith("gauss"):
        # x -> m2 - A (x - m1) also pushes P onto Q (Q is symmetric about m2) but is anti-monotone: the
        # marginal cannot tell, the map scores can
        p = task.problem
        flip = _evaluate(task, data, _Fixed(lambda x: torch.as_tensor(2 * p["m2"]) - task.exact_map(x)))
        assert flip["bw2_uvp"] < 3 * exact["bw2_uvp_floor"] + 0.3
        assert flip["l2_uvp"] > 300 and flip["cos"] < exact["cos"] - 0.2


# -- the semi-paired clusters -----------------------------------------------------------------------------
def test_clusters_cost_alone_picks_the_wrong_partner_and_the_pairs_name_the_right_one():
    task = tasks()["clusters-16"]()
    data = task.load(None, 0)
    xs, yt = data.source_train[:800].double(), data.target_train[:800].double()
    w = np.full(800, 1 / 800)
    plan = pot.emd(w, w, pot.dist(xs.numpy(), yt.numpy()), numItermax=1_000_000)
    src, tgt = task.source_cluster(xs).numpy(), task.target_cluster(yt).numpy()
    to_cost_partner = sum(plan[src == k][:, tgt == k].sum() for k in range(gt.K_CLUSTERS))
    assert to_cost_partner > 0.97  # the exact plan keeps each cluster on its nearest target cluster
    px, py = data.pairs
    assert len(px) == gt.K_CLUSTERS
    assert sorted(task.source_cluster(px).tolist()) == list(range(gt.K_CLUSTERS))
    torch.testing.assert_close(py.double(), task.exact_map(px, task.source_cluster(px)), rtol=0, atol=1e-5)
    assert torch.equal(task.target_cluster(py), torch.as_tensor(task.right)[task.source_cluster(px)])
    # labels: a target cluster is labelled by the source cluster the pairs send there
    assert torch.equal(data.target_test_labels, torch.as_tensor(np.argsort(task.right))[task.target_cluster(data.target_test)])
    assert torch.equal(data.source_test_labels, task.source_cluster(data.source_test))


@pytest.mark.parametrize("name,hit", [("identity", 0.0), ("keypoint-nn", 100.0), ("label-oracle", 100.0)])
def test_clusters_scores_of_the_references(name, hit):
    task = tasks()["clusters-16"]()
    data = task.load(None, 0)
    m = fit_in_memory(methods()[name], data)
    gen = torch.Generator().manual_seed(0)
    res = _evaluate(task, data, _Fixed(lambda x: m.transport(x, generator=gen)), n=400)
    assert res["cluster_hit"] == hit
    if name == "identity":
        assert res["cost_cluster_hit"] == 100.0
    exact = _evaluate(task, data, _Fixed(lambda x: task.exact_map(x, task.source_cluster(x))), n=400)
    assert exact["cluster_hit"] == 100.0 and exact["l2_uvp"] < 1e-8 and exact["bw2_uvp"] < 2.0


# -- a method against the answer ------------------------------------------------------------------------
NOT_FAST = dict(steps=500, inner_steps=5, mlp_hidden=64, mlp_depth=2, batch_size=64, lr_schedule="cosine")


@pytest.mark.slow
def test_not_maps_gauss16_within_a_few_percent_and_not_without_its_cost(one_thread):
    """NOT's map is the OT map only because of its cost term: with the cost zeroed it still pushes P onto
    Q (a GAN), but not by the right map."""
    task = tasks()["gauss-16"]()
    data = task.load(None, 0)
    x = data.source_test[:1000]
    scores = {}
    for scale in (1.0, 0.0):
        m = fit_in_memory(methods()["not"], data, cost_scale=scale, **NOT_FAST)
        scores[scale] = task.evaluate(data, x, m.transport(x), None, _ctx(m))
    assert scores[1.0]["l2_uvp"] < 5.0 and scores[1.0]["cos"] > 0.97, scores[1.0]
    assert scores[0.0]["l2_uvp"] > 4 * scores[1.0]["l2_uvp"], scores


def test_bench_run_stores_the_scores_and_the_table_script_renders_them(tmp_path, script):
    out = tmp_path / "runs"
    for method in ("identity", "keypoint-nn"):
        for task in ("gauss-2", "clusters-16"):
            spec = RunSpec(method, task, 0, "smoke")
            if method == "keypoint-nn" and task == "gauss-2":
                continue
            row = run_one(spec,
                          Settings(out=out, data_root=tmp_path, cache_dir=tmp_path / "cache", device="cpu",
                                   progress=False),
                          log=lambda *_: None)
            assert row["n_eval"] == 512
    row = json.loads(next((out / "gauss-2" / "identity").glob("smoke-seed0-*/row.json")).read_text())
    assert row["l2_uvp"] == pytest.approx(tasks()["gauss-2"]().info(None, None)["L2-UVP of the identity"], rel=0.1)
    mod = script("ground_truth_table")
    rows = tmp_path / "rows"
    assert mod.main(["collect", "--budget", "smoke", "--seeds", "0", "--out", str(out), "--rows", str(rows),
                     "--table", str(tmp_path / "table.md"), "--methods", "identity,keypoint-nn,tcr,not"]) == 0
    assert len(list(rows.glob("*.json"))) == 3
    text = (tmp_path / "table.md").read_text()
    assert re.search(r"\| identity \| 4\d\d\.\d\d <sub>n=1, 0\.\d min</sub> \| not run \|", text), text
    assert "keypoint-nn (semi-paired only)" in text and "tcr (semi-paired only)" in text
    assert "| keypoint-nn | 100.0 | 0.0 |" in text
    assert mod.applicable("label-oracle", "gauss-16") == (False, "needs class labels (task has none)")
    assert mod.applicable("tcr", "clusters-16") == (True, "")


def _applicable(name: str, task: str) -> bool:
    cls, tcls = methods()[name], tasks()[task]
    if tcls.setting not in cls.settings:
        return False
    return not (cls.oracle and tcls.setting == UNPAIRED)  # the map tasks have no labels for an oracle to read


@pytest.mark.parametrize("name,task", [(n, t) for t in ("gauss-64", "clusters-16") for n in methods()
                                       if _applicable(n, t) and not methods()[n].__module__.rsplit(".", 1)[-1].startswith("test_")])
def test_every_method_runs_on_the_ground_truth_tasks(name, task, tmp_path, one_thread):
    """Plumbing at each method's test options: 64-D vectors and the semi-paired clusters go through `bench run`'s
    path (fit, transport, barycentric draws, scores in range) for every method that declares the setting."""
    cls = methods()[name]
    options = dict(cls.test_options)
    if "ot_max_train" in cls.default_options:  # a plan over 512 x 512 training points, not 4,000 x 4,000 (seconds)
        options["ot_max_train"] = 512
    spec = RunSpec(name, task, 0, "smoke", options)
    row = run_one(spec,
                  Settings(out=tmp_path / "runs", data_root=tmp_path, cache_dir=tmp_path / "cache", device="cpu",
                           progress=False),
                  log=lambda *_: None)
    assert row is not None and np.isfinite(row["l2_uvp"]) and np.isfinite(row["bw2_uvp"])
    assert row["barycentric_draws"] == (gt.DRAWS if methods()[name](**spec.options).stochastic else 1)
