"""The shared saddle-point trainer: schedules, the alternating loop, and exact resume."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bench.api import BenchError, Method
from bench.context import FitContext
from bench.saddle import SADDLE_OPTIONS, SaddleTrainer, lr_factor


pytestmark = pytest.mark.usefixtures("one_thread")


def test_lr_factor_schedules():
    assert lr_factor("constant", 70, 100) == 1.0
    assert [lr_factor("multistep", s, 100, [0.5, 0.8], 0.1) for s in (0, 49, 50, 79, 80, 99)] == \
        pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert lr_factor("cosine", 0, 100) == 1.0
    assert lr_factor("cosine", 50, 100) == pytest.approx(0.5)
    assert lr_factor("cosine", 100, 100) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(BenchError, match="lr_schedule"):
        lr_factor("linear", 0, 10)


class Game(Method):
    """min_theta max_omega  L = 1/2 (theta - 3)^2 + omega * theta - 1/2 omega^2.

    Its unique saddle point is theta = omega = 3/2; the map minimises L, the critic maximises it.
    A noise term drawn from the trainer's generator makes the trajectory depend on that state.
    """

    name = "game"
    default_options = dict(SADDLE_OPTIONS)
    state_attrs = ("theta", "omega", "saddle")

    def __init__(self, noise=0.0, **options):
        super().__init__(**options)
        self.noise = noise
        self.calls = {"map": 0, "critic": 0}
        self.seen_requires_grad = set()

    def setup(self, data, run):
        self.theta = nn.Linear(1, 1, bias=False)
        self.omega = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.theta.weight.zero_()
            self.omega.weight.zero_()
        self.saddle = SaddleTrainer.from_options(self.theta.parameters(), self.omega.parameters(),
                                                 self.options, run)

    def L(self):
        t, w = self.theta.weight[0, 0], self.omega.weight[0, 0]
        eps = self.noise * self.saddle.randn(1)[0]
        return 0.5 * (t - 3 - eps) ** 2 + w * t - 0.5 * w ** 2

    def fit(self, data, run):
        def map_loss(step):
            self.calls["map"] += 1
            self.seen_requires_grad.add(("map", self.theta.weight.requires_grad, self.omega.weight.requires_grad))
            return self.L()

        def critic_loss(step):
            self.calls["critic"] += 1
            self.seen_requires_grad.add(("critic", self.theta.weight.requires_grad, self.omega.weight.requires_grad))
            return -self.L(), {"omega": self.omega.weight[0, 0]}

        self.saddle.fit(run, "saddle", map_loss=map_loss, critic_loss=critic_loss, log_every=50)


def _game(run, **options):
    base = dict(inner_steps=3, map_lr=0.05, critic_lr=0.05)
    g = Game(**{**base, **options})
    run.method = g
    g.setup(None, run)
    return g


def test_alternating_loop_finds_the_saddle_point_and_counts_inner_steps(tmp_path):
    run = FitContext(tmp_path, progress=False)
    g = _game(run, steps=400)
    g.fit(None, run)
    assert g.calls == {"critic": 400, "map": 1200}
    # only the updated player's parameters require gradients during its update
    assert g.seen_requires_grad == {("map", True, False), ("critic", False, True)}
    assert g.theta.weight.item() == pytest.approx(1.5, abs=0.05)
    assert g.omega.weight.item() == pytest.approx(1.5, abs=0.05)
    # logs: critic and map losses, the lr factor and the method's extra scalars
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [*range(0, 400, 50), 399]
    assert {"critic_loss", "map_loss", "lr_factor", "critic_omega"} <= set(json.loads(lines[-1]))


def test_schedule_sets_learning_rates(tmp_path):
    run = FitContext(None, progress=False)
    g = _game(run, steps=10, lr_schedule="multistep", lr_milestones=[0.5], lr_decay=0.1, map_lr=0.2,
              critic_lr=0.4)
    g.fit(None, run)
    assert g.saddle.map_opt.param_groups[0]["lr"] == pytest.approx(0.02)
    assert g.saddle.critic_opt.param_groups[0]["lr"] == pytest.approx(0.04)
    assert g.saddle.map_opt.param_groups[0]["betas"] == (0.9, 0.999)  # the authors' (torch's default) betas


def test_authors_order_map_steps_before_the_critic():
    """Issue 8: NOT's Algorithm 1 makes K_T map updates, then one critic update."""
    order = []
    run = FitContext(None, progress=False)
    g = _game(run, steps=2, inner_steps=3)
    assert g.options["critic_first"] is False and g.options["weight_decay"] == 1e-10
    g.saddle.fit(run, "saddle", map_loss=lambda s: order.append("T") or g.L(),
                 critic_loss=lambda s: order.append("f") or -g.L())
    assert "".join(order) == "TTTfTTTf"


def test_bad_arguments_are_refused():
    p = [nn.Parameter(torch.zeros(1))]
    with pytest.raises(BenchError, match="steps"):
        SaddleTrainer(p, p, steps=0)
    with pytest.raises(BenchError, match="lr_schedule"):
        SaddleTrainer(p, p, steps=3, lr_schedule="linear")


class Interrupt(Exception):
    pass


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    """Optimiser moments, lr schedule position and the generator all survive a checkpoint."""
    opts = dict(steps=30, noise=0.5, lr_schedule="cosine")
    ref_run = FitContext(None, progress=False, seed=3)
    torch.manual_seed(0)
    ref = _game(ref_run, **opts)
    ref.fit(None, ref_run)

    # interrupted after 17 outer steps, checkpointing at every step
    run = FitContext(tmp_path, progress=False, seed=3, checkpoint_every=0.0)
    torch.manual_seed(0)
    g = _game(run, **opts)
    original = g.L

    def failing_L():
        if g.calls["critic"] == 18:
            raise Interrupt
        return original()

    g.L = failing_L
    with pytest.raises(Interrupt):
        g.fit(None, run)
    assert run.progress["saddle"] == 17

    # a fresh process: new objects, different init, restore from disk, continue
    run2 = FitContext(tmp_path, progress=False, seed=3)
    torch.manual_seed(1)
    g2 = _game(run2, **opts)
    assert run2.restore()
    g2.fit(None, run2)
    assert g2.calls["critic"] == 30 - 17
    for a, b in ((g2.theta, ref.theta), (g2.omega, ref.omega)):
        torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=1e-6)


# -- several critic steps per outer step (W2GAN's d_iters) ---------------------------------------------
def test_saddle_trainer_makes_critic_steps_per_outer_step():
    calls = {"map": 0, "critic": 0}
    w_map, w_critic = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))

    def loss(kind, w):
        def fn(step):
            calls[kind] += 1
            return (w ** 2).sum()
        return fn

    trainer = SaddleTrainer([w_map], [w_critic], steps=4, inner_steps=2, critic_steps=3)
    trainer.fit(FitContext(None, progress=False), "s", map_loss=loss("map", w_map), critic_loss=loss("critic", w_critic))
    assert calls == {"map": 8, "critic": 12}
    with pytest.raises(BenchError, match="critic_steps"):
        SaddleTrainer([w_map], [w_critic], steps=1, critic_steps=0)
