"""bench.ot: costs, guidance, the L2 dual, compatibility in blocks, resampling, exact plans, the entropic dual."""
from __future__ import annotations

import math

import numpy as np
import ot as pot
import pytest
import torch
from scipy.spatial.distance import jensenshannon

from bench import ot
from bench.api import BenchError


def _problem(n=7, m=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    y = rng.normal(size=(m, 2)) + 1.0
    return x, y, ((x[:, None] - y[None]) ** 2).mean(-1)


def test_costs_match_direct_formulas():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 2, generator=g), torch.randn(5, 3, 2, generator=g)
    xf, yf = x.flatten(1), y.flatten(1)
    torch.testing.assert_close(ot.cost_matrix(x, y), ((xf[:, None] - yf[None]) ** 2).mean(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(ot.cost_matrix(x, y, "l2"), ot.cost_matrix(x, y, "mean-squared"))
    torch.testing.assert_close(ot.cost_matrix(x, y, "mean-l1"), (xf[:, None] - yf[None]).abs().mean(-1),
                               atol=1e-5, rtol=0)
    cos = torch.nn.functional.cosine_similarity(xf[:, None], yf[None], dim=-1)
    torch.testing.assert_close(ot.cost_matrix(x, y, "cosine"), 1 - cos, atol=1e-5, rtol=0)
    assert ot.cost_matrix(x, y, lambda a, b: torch.zeros(len(a), len(b))).shape == (4, 5)
    with pytest.raises(BenchError):
        ot.cost_matrix(x, y, "euclid")


def test_js_and_relation_vectors_against_scipy():
    g = torch.Generator().manual_seed(1)
    P = torch.softmax(torch.randn(4, 3, generator=g, dtype=torch.float64), 1)
    Q = torch.softmax(torch.randn(6, 3, generator=g, dtype=torch.float64), 1)
    ref = np.array([[jensenshannon(p, q) ** 2 for q in Q.numpy()] for p in P.numpy()])
    np.testing.assert_allclose(ot.js_matrix(P, Q).numpy(), ref, atol=1e-8)
    # relation vectors: softmax of -c / tau over the keypoints
    x, k = torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    R = ot.relation_vectors(x, k, tau=0.5)
    c = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    torch.testing.assert_close(R, torch.softmax(-c / 0.5, 1))
    # xi mixes the plain cost with weight alpha
    y = torch.tensor([[3.0, 0.0]])
    xi0 = ot.guiding_cost(x, y, k, k, tau=0.5)
    xi1 = ot.guiding_cost(x, y, k, k, tau=0.5, alpha=0.25)
    torch.testing.assert_close(xi1, 0.25 * ot.cost_matrix(x, y) + 0.75 * xi0)


def test_keypoint_mask_exact():
    # 4 sources (keypoint = index 3), 3 targets (keypoint = index 0): m[3, 0] only, column 0 only from row 3
    M = ot.keypoint_mask(torch.arange(4), torch.arange(3), torch.tensor([3]), torch.tensor([0]))
    expected = torch.tensor([[0, 1, 1], [0, 1, 1], [0, 1, 1], [1, 0, 0]], dtype=torch.float32)
    torch.testing.assert_close(M, expected)
    # a block of rows gives the same rows
    torch.testing.assert_close(ot.keypoint_mask(torch.arange(2, 4), torch.arange(3), torch.tensor([3]),
                                                torch.tensor([0])), expected[2:])


def test_pot_plan_solves_the_otcs_primal_and_strong_duality():
    x, y, C = _problem()
    eps = 0.05
    H, u, v = ot.exact_l2_plan(C, eps)
    n, m = C.shape
    P = solve_l2_primal(C, eps)  # independent solver (projected gradient), no POT
    np.testing.assert_allclose(H / (n * m), P, atol=1e-6)
    np.testing.assert_allclose(H.mean(1), 1, atol=1e-5)
    np.testing.assert_allclose(H.mean(0), 1, atol=1e-5)
    # POT's potentials are OTCS's u, v: H = (u + v - C)_+ / (2 eps)
    Hc = ot.compatibility(torch.tensor(u), torch.tensor(v), torch.tensor(C), eps).numpy()
    np.testing.assert_allclose(Hc, H, atol=1e-10)
    # the dual objective at the optimum equals the primal value (strong duality)
    dual = float(ot.dual_l2_objective(torch.tensor(u), torch.tensor(v), torch.tensor(C), eps))
    assert dual == pytest.approx(l2_primal_objective(H / (n * m), C, eps), abs=1e-6)
    # any other (u, v) gives a smaller dual value
    assert float(ot.dual_l2_objective(torch.tensor(u) + 0.1, torch.tensor(v), torch.tensor(C), eps)) < dual


def test_dual_objective_by_hand():
    u, v = torch.tensor([1.0, 0.0]), torch.tensor([0.5])
    xi = torch.tensor([[0.25], [1.0]])
    # E u = 0.5, E v = 0.5, penalty mean = (1.25^2 + 0) / 2, eps = 0.5 -> divided by 2
    assert float(ot.dual_l2_objective(u, v, xi, 0.5)) == pytest.approx(1.0 - 1.25 ** 2 / 2 / 2)
    mask = torch.tensor([[0.0], [1.0]])
    assert float(ot.dual_l2_objective(u, v, xi, 0.5, mask)) == pytest.approx(1.0)


def test_masked_plan_ties_the_guiding_pair():
    x, y, C = _problem(6, 6, seed=3)
    mask = ot.keypoint_mask(torch.arange(6), torch.arange(6), torch.tensor([5]), torch.tensor([5])).numpy()
    H, u, v = ot.exact_l2_plan(C, 0.05, mask)
    assert np.all(H[mask == 0] == 0)
    assert H[5, 5] == pytest.approx(6.0, rel=1e-4)  # the whole row's mass on its partner
    np.testing.assert_allclose(H.mean(1), 1, atol=1e-4)
    np.testing.assert_allclose(H.mean(0), 1, atol=1e-4)


@pytest.mark.parametrize("block", [1, 3, 64])
def test_sparse_compatibility_in_blocks_matches_dense(block):
    g = torch.Generator().manual_seed(2)
    n, m = 9, 7
    u, v = torch.randn(n, generator=g), torch.randn(m, generator=g)
    xi = torch.rand(n, m, generator=g)
    mask = (torch.rand(n, m, generator=g) > 0.2).float()
    dense = ot.compatibility(u, v, xi, 0.3, mask)
    H = ot.sparse_compatibility(u, v, lambda i0, i1: xi[i0:i1], 0.3, threshold=0.5, block_rows=block,
                                mask_block=lambda i0, i1: mask[i0:i1])
    torch.testing.assert_close(H.to_dense(m), torch.where(dense > 0.5, dense, torch.zeros_like(dense)))
    torch.testing.assert_close(H.row_mean, dense.mean(1))
    torch.testing.assert_close(H.col_mean, dense.mean(0))
    assert H.kept_mass == pytest.approx(float(dense[dense > 0.5].sum() / dense.sum()), rel=1e-5)
    mx, my = H.marginal_violation()
    assert mx == pytest.approx(float((dense.mean(1) - 1).abs().mean()), rel=1e-5)
    assert my == pytest.approx(float((dense.mean(0) - 1).abs().mean()), rel=1e-5)
    # at most k per row keeps the k largest
    Hk = ot.sparse_compatibility(u, v, lambda i0, i1: xi[i0:i1], 0.3, threshold=0.0, max_per_row=2,
                                 block_rows=block)
    assert int(Hk.row_nnz().max()) <= 2
    full = ot.compatibility(u, v, xi, 0.3)
    for i in range(n):
        a, b = int(Hk.crow[i]), int(Hk.crow[i + 1])
        top = torch.sort(full[i][full[i] > 0], descending=True).values[:2]
        torch.testing.assert_close(torch.sort(Hk.val[a:b], descending=True).values, top)


def test_resampling_frequencies_and_empty_rows():
    Hd = torch.tensor([[1.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.5, 0.5, 2.0, 1.0]])
    H = ot.sparse_compatibility(torch.zeros(3), torch.zeros(4), lambda i0, i1: -2 * 0.5 * Hd[i0:i1], 0.5,
                                threshold=0.0)
    torch.testing.assert_close(H.to_dense(4), Hd)
    assert H.empty_rows().tolist() == [1]
    g = torch.Generator().manual_seed(0)
    i, j = ot.resample_by_compatibility(H, 200_000, generator=g)
    assert not (i == 1).any()  # an empty row is never drawn as a condition
    assert abs(float((i == 0).float().mean()) - 0.5) < 0.01  # rows uniform over the non-empty ones
    for r in (0, 2):
        freq = torch.bincount(j[i == r], minlength=4).double()
        freq /= freq.sum()
        torch.testing.assert_close(freq, (Hd[r] / Hd[r].sum()).double(), atol=0.01, rtol=0)
    i2, _ = ot.resample_by_compatibility(H, 100, generator=g, rows=torch.tensor([1, 2]))
    assert (i2 == 2).all()
    empty = ot.sparse_compatibility(torch.zeros(2), torch.zeros(2), lambda i0, i1: torch.ones(i1 - i0, 2), 0.5)
    with pytest.raises(BenchError):
        ot.resample_by_compatibility(empty, 4)


def test_conditional_weights_extend_the_exact_dual():
    x, y, C = _problem(8, 6, seed=4)
    eps = 0.03
    H, u, v = ot.exact_l2_plan(C, eps)
    w, uu = ot.conditional_weights(torch.tensor(C), torch.tensor(v), eps)
    torch.testing.assert_close(w, torch.tensor(H / 6), atol=1e-5, rtol=0)  # training rows: the plan's rows
    torch.testing.assert_close(uu, torch.tensor(u), atol=1e-5, rtol=0)
    # masked columns get no weight and rows still sum to 1
    mask = torch.ones(8, 6)
    mask[:, 0] = 0
    wm, _ = ot.conditional_weights(torch.tensor(C), torch.tensor(v), eps, mask)
    assert torch.all(wm[:, 0] == 0)
    torch.testing.assert_close(wm.sum(1), torch.ones(8, dtype=torch.float64))


def test_w2_helpers_closed_forms():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 1, generator=g)
    assert ot.w2_empirical(x, x + 1.5) == pytest.approx(1.5, abs=1e-7)
    x2 = torch.randn(200, 2, generator=g)
    assert ot.w2_empirical(x2, x2 + torch.tensor([3.0, 4.0])) == pytest.approx(5.0, abs=1e-6)
    # weighted 1-D: point masses
    assert ot.w2_empirical(torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [1.0]]),
                           torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])) == pytest.approx(math.sqrt(0.5))
    # p_T for a Dirac pi_hat(.|x) = delta_y0 is N(a y0, s^2 I): W2 to N(0, I) in closed form
    y0 = torch.tensor([[1.0, -2.0, 0.5]])
    a, s = 0.1, 0.9
    expected = math.sqrt(a * a * float((y0 ** 2).sum()) + 3 * (s - 1) ** 2)
    assert ot.forward_prior_w2(y0, torch.ones(1), a, s) == pytest.approx(expected, rel=1e-9)
    # two equally weighted points +-1 in 1-D: variance 1 -> sqrt(a^2 + s^2) - 1
    ys = torch.tensor([[1.0], [-1.0]])
    assert ot.forward_prior_w2(ys, torch.ones(2), a, s) == pytest.approx(abs(math.sqrt(a * a + s * s) - 1), rel=1e-9)


# -- a reference solver of the primal, independent of POT (test-only) ---------------------------------
def l2_primal_objective(pi: np.ndarray, C: np.ndarray, eps: float) -> float:
    """<pi, C> + eps * E_{p x q}[(pi / (p q))^2] for uniform p, q (pi sums to 1)."""
    n, m = pi.shape
    return float((pi * C).sum() + eps * n * m * (pi ** 2).sum())


def solve_l2_primal(C: np.ndarray, eps: float, iters: int = 20000, tol: float = 1e-12) -> np.ndarray:
    """Reference solver of the primal (no POT): accelerated projected gradient onto the
    transport polytope, the projection computed by Dykstra's alternating projections.
    Only for small problems (tests)."""
    C = np.asarray(C, dtype=np.float64)
    n, m = C.shape
    a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)

    def project(P, rounds=500):
        # Dykstra between {row sums = a}, {col sums = b} (affine) and {P >= 0}
        X = P.copy()
        q = np.zeros_like(X)
        for _ in range(rounds):
            Y = X
            Y = Y + (a - Y.sum(1))[:, None] / m
            Y = Y + (b - Y.sum(0))[None, :] / n
            Z = np.maximum(Y + q, 0.0)
            q = Y + q - Z
            if np.abs(Z - X).max() < 1e-15:
                X = Z
                break
            X = Z
        return X

    L = 2 * eps * n * m
    P = np.outer(a, b)
    Pprev = P
    for k in range(1, iters + 1):
        Yk = P + (k - 1) / (k + 2) * (P - Pprev)
        grad = C + 2 * eps * n * m * Yk
        Pnew = project(Yk - grad / L)
        Pprev, P = P, Pnew
        if np.abs(P - Pprev).max() < tol:
            break
    return P


def test_knn_matches_brute_force_and_can_exclude_self():
    from bench import graph
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 5, generator=g, dtype=torch.float64)
    d, j = graph.knn(x, x, 4, chunk=8, exclude_self=True)
    full = torch.cdist(x, x) ** 2
    full.fill_diagonal_(float("inf"))
    v, jj = full.topk(4, dim=1, largest=False)
    assert torch.equal(j, jj) and torch.allclose(d, v)


def test_spread_relations_follow_the_data_where_the_nearest_keypoint_does_not():
    """Two parallel chains 1.5 apart, B shifted right by 1, a keypoint at the left end of each: most of chain A is
    nearer B's keypoint than its own, but spreading along the chains relates every point to its own chain's."""
    from bench import graph
    g = torch.Generator().manual_seed(0)
    t = torch.linspace(0, 1, 200)
    a = torch.stack([10 * t, torch.zeros(200)], 1) + 0.05 * torch.randn(200, 2, generator=g)
    b = torch.stack([10 * t + 1.0, torch.full((200,), 1.5)], 1) + 0.05 * torch.randn(200, 2, generator=g)
    x = torch.cat([a, b])
    seeds = torch.tensor([0, 200])
    labels = torch.arange(400) // 200
    F = graph.spread(x, seeds, k=5)
    assert torch.equal(F.argmax(1), labels)
    # the nearest-keypoint rule gets part of chain A wrong (its right end is nearer B's shifted keypoint)
    near = torch.cdist(x, x[seeds]).argmin(1)
    assert (near != labels).sum() > 20
    R = graph.relations(F, x, torch.tensor([[9.9, 0.0], [10.9, 1.5]]), k=5)
    assert torch.allclose(R.sum(1), torch.ones(2)) and R[0, 0] > 0.9 and R[1, 1] > 0.9


def test_spread_on_a_set_smaller_than_k_links_everyone():
    from bench import graph
    x = torch.tensor([[0.0], [0.1], [5.0]])
    F = graph.spread(x, torch.tensor([0, 2]), k=10)
    assert F.shape == (3, 2) and F[1].argmax() == 0
    assert graph.knn(x, x, 10, exclude_self=True)[1].shape == (3, 2)


# -- the entropic dual SCONES maximises --------------------------------------------------
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
