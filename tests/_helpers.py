"""Helpers shared by several test files (tests/ is on sys.path: ``from _helpers import ...``)."""
from __future__ import annotations

import torch

from bench.api import UNPAIRED, TaskData
from bench.context import FitContext
from bench.datasets.toy import SRC_CENTRES, TGT_CENTRES
from bench.registry import methods


# -- NOT and KNOT (tests/test_not.py, test_knot.py, test_not_knot.py) ------------------------------
def gaussians(src_mean, src_std, tgt_mean, tgt_std, n=4096, seed=0) -> TaskData:
    g = torch.Generator().manual_seed(seed)

    def draw(m, s, k):
        return m + s * torch.randn(k, 1, generator=g)

    return TaskData("toy1d-like", UNPAIRED, draw(src_mean, src_std, n), draw(tgt_mean, tgt_std, n),
                    draw(src_mean, src_std, 256), draw(tgt_mean, tgt_std, 256))


def samples(m, x0: float, n: int = 4000, seed: int = 1) -> torch.Tensor:
    return m.transport(torch.full((n, 1), x0), torch.Generator().manual_seed(seed)).squeeze(1)


# Small MLPs, K_T = 5, lr 1e-3 (the vector default); settings checked stable over seeds 0-5.
# Adam betas (0, 0.9), not the authors' (0.9, 0.999) default: with the latter NOT collapsed the
# 2-D toy onto one mode (measured in the session of 2026-11-23); kept as a documented option.
NOT_TOY = dict(inner_steps=5, mlp_hidden=64, mlp_depth=2, batch_size=64, betas=[0.0, 0.9])
ANNEAL = dict(NOT_TOY, lr_schedule="cosine")  # a decaying lr settles the last oscillations


def with_options(cls, **options):
    m = cls(**options)
    return m


# -- the authors' defaults (tests/test_w2gan.py, test_otm.py) ---------------------------------------
def set_up(cls, data, **options):
    m = cls(kind=data.kind, **{**cls.test_options, **options})
    m.setup(data, FitContext(None, progress=False))
    return m


# -- the diffusion and flow baselines (tests/test_reflow.py, test_ddib.py, test_egsde.py, test_scones.py,
# test_baselines_diffusion.py) ---------------------------------------------------------------------------
# small networks and short runs: every fit below takes seconds on one CPU thread
SCORE_TOY = {"mlp_hidden": 128, "mlp_depth": 3, "score_steps": 1000, "score_batch": 256, "score_warmup": 50}


def fit_by_name(name, data, **options):
    """Fit on the CPU in this process (seed 0, smoke budget, no run directory)."""
    run = FitContext(None, device="cpu", seed=0, budget="smoke", progress=False)
    torch.manual_seed(0)
    run.method = m = methods()[name](kind=data.kind, **options)
    m.check_setting(data)
    m.setup(data, run)
    m.fit(data, run)
    return m


def transport(m, x, seed=1):
    return m.transport(x, generator=torch.Generator().manual_seed(seed))


def at_minus4(m, n=1000):
    return transport(m, torch.full((n, 1), -4.0))


def target_modes(y):
    """(share within 1.0 of a target centre, index of the nearest centre: 0 right, 1 left)."""
    d = torch.cdist(y.float(), TGT_CENTRES)
    return float((d.min(1).values < 1.0).float().mean()), d.argmin(1)


def in_upper_mode(x):
    return torch.cdist(x.float(), SRC_CENTRES).argmin(1) == 0
