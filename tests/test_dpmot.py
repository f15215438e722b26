"""Semi-discrete OT solver against exact answers, and DPM-OT end to end on small problems."""
import numpy as np
import ot
import pytest
import torch

from bench.api import BenchError, EvalContext
from bench.context import FitContext
from bench.semidiscrete import SemiDiscreteOT
from bench.testing import tiny_images, tiny_vectors


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_semidiscrete_on_empirical_measure_is_the_discrete_ot_permutation(seed):
    # mu = empirical measure of n points (sampled uniformly with replacement), n targets with
    # uniform weights: the semi-discrete map must reduce to the optimal permutation.
    n, d = 12, 3
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    Y = torch.randn(n, d, generator=g) + 0.5
    C = ot.dist(X.double().numpy(), Y.double().numpy())
    plan = ot.emd(np.full(n, 1 / n), np.full(n, 1 / n), C)
    perm = plan.argmax(1)
    assert sorted(perm.tolist()) == list(range(n))
    sd = SemiDiscreteOT(Y)
    sd.fit(lambda b, gen: X[torch.randint(0, n, (b,), generator=gen)], steps=500, batch=2048, lr=0.1, generator=g)
    assert sd.assign(X).tolist() == perm.tolist()
    assert torch.equal(sd.cell_masses(X), torch.full((n,), 1 / n))
    assert torch.equal(sd.map(X), Y[torch.as_tensor(perm)])


def test_semidiscrete_1d_cells_have_the_exact_masses():
    # 1-D, mu = U[0, 1], weighted targets: the OT map is monotone, so cell i is the interval
    # [F_{i-1}, F_i) of cumulative weights.
    y = torch.tensor([[0.1], [0.4], [0.5], [0.9]])
    w = torch.tensor([0.1, 0.2, 0.3, 0.4])
    sd = SemiDiscreteOT(y, weights=w)
    g = torch.Generator().manual_seed(0)
    sd.fit(lambda b, gen: torch.rand(b, 1, generator=gen), steps=400, batch=4096, lr=0.1, generator=g)
    masses = sd.cell_masses(torch.rand(400_000, 1, generator=g))
    assert torch.allclose(masses, w, atol=0.01)
    grid = torch.linspace(0, 1, 1001)[:, None]
    edges = torch.tensor([0.1, 0.3, 0.6])
    expected = torch.bucketize(grid[:, 0], edges, right=True)
    far = (grid[:, 0, None] - edges).abs().min(1).values > 0.02
    assert torch.equal(sd.assign(grid)[far], expected[far])


def test_semidiscrete_gaussian_masses_blocks_and_state():
    g = torch.Generator().manual_seed(1)
    Y = torch.randn(40, 4, generator=g) * 1.5
    w = torch.rand(40, generator=g) + 0.5
    sd = SemiDiscreteOT(Y, weights=w, block=7)  # blocks of 7 targets (not a divisor of 40)
    sd.fit(lambda b, gen: torch.randn(b, 4, generator=gen), steps=400, batch=4096, lr=0.1, generator=g)
    x = torch.randn(200_000, 4, generator=g)
    masses = sd.cell_masses(x)
    assert (masses - sd.weights).abs().max() < 0.006  # weights are 0.013-0.038
    # blocked argmax equals the one-shot argmax
    full = (x[:5000] @ Y.T + sd.h).argmax(1)
    assert torch.equal(sd.assign(x[:5000]), full)
    # the solver state round-trips
    other = SemiDiscreteOT(torch.zeros(40, 4))
    other.load_state_dict(sd.state_dict())
    assert torch.equal(other.assign(x[:1000]), sd.assign(x[:1000]))
    with pytest.raises(BenchError):
        sd.assign(torch.zeros(3, 5))


def _fit_dpmot(data, **options):
    from bench.methods.dpmot import DPMOT
    torch.manual_seed(0)
    m = DPMOT(kind=data.kind, **options)
    run = FitContext(None, device="cpu", seed=0, budget="smoke", progress=False)
    run.method = m
    m.check_setting(data)
    m.setup(data, run)
    m.to("cpu")
    m.fit(data, run)
    return m


@pytest.mark.slow
def test_dpmot_on_tiny_vectors_lands_in_the_target_modes():
    data = tiny_vectors("semi-paired", n=512)  # pairs are accepted and ignored
    # t_M = 0.5 (not the authors' near-data 0.002): at a high level the diffused sources form a
    # continuous measure, which is what this check of the semi-discrete solver's cell masses needs
    m = _fit_dpmot(data, steps=1500, batch_size=128, mlp_hidden=128, lr=2e-3, warmup=50,
                   ot_steps=200, ot_batch=512, M=10, t_M=0.5)
    assert m.nfe == 10
    x = data.source_test.repeat(8, 1)
    y = m.transport(x, generator=torch.Generator().manual_seed(1))
    centres = torch.tensor([[2.0, 0.0], [-2.0, 0.0]])
    dist = torch.cdist(y, centres).min(1).values
    assert (dist < 1.0).float().mean() > 0.9
    right = (y[:, 0] > 0).float().mean()
    assert 0.3 < right < 0.7  # both target modes are used
    # the OT cells of diffused sources carry the uniform target mass
    g = torch.Generator().manual_seed(2)
    xs = data.source_train[torch.randint(0, len(data.source_train), (50_000,), generator=g)]
    xt = m.sde.perturb(xs, torch.full((len(xs),), m.t_M), torch.randn(xs.shape, generator=g))
    assert (m.ot.cell_masses(xt) - m.ot.weights).abs().max() < 0.01  # weights are 1/512


def test_dpmot_default_maps_near_the_data_end_as_the_authors():
    from bench.methods.dpmot import DPMOT
    m = DPMOT(budget="paper")
    sigma = float(m_sde_sigma(m.options))
    assert 0.01 < sigma < 0.02 and m.nfe == 10  # the authors' latents sit at sigma ~0.014


def m_sde_sigma(o):
    from bench.diffusion import VPSDE
    return VPSDE(o["beta_min"], o["beta_max"]).sigma(torch.tensor(o["t_M"]))


def test_dpmot_refuses_mismatched_shapes():
    from bench.methods.dpmot import DPMOT
    data = tiny_vectors()
    data.source_train = torch.zeros(10, 3)
    with pytest.raises(BenchError):
        DPMOT().check_setting(data)
    with pytest.raises(BenchError):
        DPMOT(sampler="euler").check_setting(tiny_vectors())


class _FakeTask:
    """Stands in for the digits task: a classifier (logits) and an FID-like score."""

    def __init__(self, shape):
        g = torch.Generator().manual_seed(0)
        self.lin = torch.nn.Linear(int(np.prod(shape)), 4)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(self.lin.weight.shape, generator=g))
        self.calls = []

    def classifier(self, ctx):
        return torch.nn.Sequential(torch.nn.Flatten(), self.lin)

    def fid(self, outputs, ctx):
        self.calls.append(len(outputs))
        return {"fid": float(outputs.mean().abs()), "fid_n": int(len(outputs)), "fid_ref": "fake"}


def test_generation_experiment_rows(script):
    from bench.methods.dpmot import DPMOT
    generation_experiment = script("studies/dpmot_generation/dpmot_generation.py").generation_experiment
    data = tiny_images()
    m = _fit_dpmot(data, **DPMOT.test_options)
    task = _FakeTask(data.shape)
    ctx = EvalContext(cache_dir=None, device=torch.device("cpu"), budget="smoke", seed=0)
    rows = generation_experiment(m, data, task, ctx, nfes=(2, 3), baseline_steps=(4,), n=10, batch=4,
                                 ot_steps=20, ot_batch=64)
    assert [(r["sampler"].split()[0], r["nfe"]) for r in rows] == [("dpm-ot", 2), ("dpm-ot", 3), ("ancestral", 4)]
    for r in rows:
        assert {"sampler", "nfe", "fid", "fid_n", "mode_mixture", "mean_max_prob", "n", "t_M"} <= set(r)
        assert 0.0 <= r["mode_mixture"] <= 1.0 and r["fid_n"] == 10
    assert task.calls == [10, 10, 10]
    # mode mixture is the share of max-softmax < 0.5: a classifier that is never sure gives 1
    task.lin.weight.data.zero_()
    task.lin.bias.data.zero_()
    rows = generation_experiment(m, data, task, ctx, nfes=(2,), baseline_steps=(), n=6, batch=6,
                                 ot_steps=5, ot_batch=32)
    assert rows[0]["mode_mixture"] == 1.0 and rows[0]["mean_max_prob"] == pytest.approx(0.25)
