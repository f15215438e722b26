"""Small synthetic tasks for the shared plugin contract test and for plugin authors.

``tiny_images`` is an image task small enough that every method trains on it in seconds on a
CPU: 8x8 one-channel "source" blobs in the left half, "target" blobs in the right half, with
class labels (which blob) and one guiding pair per class.  ``tiny_vectors`` is its 2-D analogue.
"""
from __future__ import annotations

import torch

from .api import DISTANCE, SEMI_PAIRED, UNPAIRED, Metric, Task, TaskData
from .context import FitContext
from .registry import register_task


def _blobs(n: int, classes: int, side: int, shift: int, g: torch.Generator):
    labels = torch.randint(0, classes, (n,), generator=g)
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    cy = 1.5 + labels.float() * (side - 3) / max(classes - 1, 1) + 0.3 * torch.randn(n, generator=g)
    cx = torch.full((n,), side / 4 + shift) + 0.3 * torch.randn(n, generator=g)
    img = torch.exp(-((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2) / 2.0)
    return (img * 2 - 1).unsqueeze(1).clamp(-1, 1), labels


def tiny_images(setting: str = UNPAIRED, n: int = 96, side: int = 8, classes: int = 2, seed: int = 0) -> TaskData:
    g = torch.Generator().manual_seed(seed)
    xs, ls = _blobs(n, classes, side, 0, g)
    yt, lt = _blobs(n, classes, side, side // 2, g)
    xs_test, ls_test = _blobs(n // 4, classes, side, 0, g)
    yt_test, lt_test = _blobs(n // 4, classes, side, side // 2, g)
    pairs = None
    if setting == SEMI_PAIRED:
        idx_s = torch.stack([torch.nonzero(ls == c)[0, 0] for c in range(classes)])
        idx_t = torch.stack([torch.nonzero(lt == c)[0, 0] for c in range(classes)])
        pairs = (xs[idx_s].clone(), yt[idx_t].clone())
    return TaskData(name=f"tiny-images-{setting}", setting=setting, source_train=xs, target_train=yt,
                    source_test=xs_test, target_test=yt_test, pairs=pairs, source_train_labels=ls,
                    target_train_labels=lt, source_test_labels=ls_test, target_test_labels=lt_test)


def tiny_vectors(setting: str = UNPAIRED, n: int = 128, seed: int = 0) -> TaskData:
    """Two source modes at (0, +-2) and two target modes at (+-2, 0) in 2-D."""
    g = torch.Generator().manual_seed(seed)

    def modes(n, centres):
        lab = torch.randint(0, 2, (n,), generator=g)
        return centres[lab] + 0.3 * torch.randn(n, 2, generator=g), lab

    src_c = torch.tensor([[0.0, 2.0], [0.0, -2.0]])
    tgt_c = torch.tensor([[2.0, 0.0], [-2.0, 0.0]])
    xs, ls = modes(n, src_c)
    yt, lt = modes(n, tgt_c)
    xs_test, ls_test = modes(n // 4, src_c)
    yt_test, lt_test = modes(n // 4, tgt_c)
    pairs = (src_c.clone(), tgt_c.clone()) if setting == SEMI_PAIRED else None
    return TaskData(name=f"tiny-vectors-{setting}", setting=setting, source_train=xs, target_train=yt,
                    source_test=xs_test, target_test=yt_test, pairs=pairs, source_train_labels=ls,
                    target_train_labels=lt, source_test_labels=ls_test, target_test_labels=lt_test)


class _TinyTask(Task):
    """A seconds-long task for engine tests; scores the mean distance to the nearest test target.

    Not an entry point: importing this module (or ``BENCH_PLUGINS=bench.testing``) registers
    ``tiny-images`` (semi-paired 8x8 images) and ``tiny-vectors`` (unpaired 2-D).
    """

    metrics = (Metric("w2", "W2", False, bounds=DISTANCE),)
    eval_sizes = {"smoke": None, "cpu": None, "fast": None, "paper": None}
    description = "synthetic test task (bench.testing)"

    def make(self, seed: int) -> TaskData:
        raise NotImplementedError

    def load(self, data_root, seed, budget="smoke"):
        return self.make(seed)

    def evaluate(self, data, sources, outputs, labels, ctx):
        d = torch.cdist(outputs.flatten(1).float(), data.target_test.flatten(1).float()).min(1).values
        return {"w2": float(d.mean())}


class TinyImagesTask(_TinyTask):
    name = "tiny-images"
    setting = SEMI_PAIRED

    def make(self, seed):
        return tiny_images(SEMI_PAIRED, seed=seed)


class TinyVectorsTask(_TinyTask):
    name = "tiny-vectors"
    kind = "vector"
    setting = UNPAIRED

    def make(self, seed):
        return tiny_vectors(UNPAIRED, seed=seed)


register_task(TinyImagesTask)
register_task(TinyVectorsTask)


def fit_in_memory(cls, data: TaskData, seed: int = 0, **options):
    """Construct ``cls(**options)`` and fit it on ``data`` on the CPU with a throwaway run (smoke budget,
    no run directory): the plugin's own check_setting / setup / fit, as the runner calls them."""
    torch.manual_seed(seed)
    m = cls(kind=data.kind, **options)
    m.check_setting(data)
    run = FitContext(None, device="cpu", seed=seed, budget="smoke", progress=False)
    run.method = m
    m.setup(data, run)
    m.fit(data, run)
    return m


class Killed(Exception):
    """Raised by :func:`fit_until_killed` right after its ``kill_after``-th checkpoint, as a kill -9 would stop a fit."""


def fit_until_killed(cls, data: TaskData, directory, options: dict, kill_after: int | None = None):
    """Fit ``cls(**options)`` on ``data`` in run directory ``directory`` (resuming from what is there), with a
    checkpoint after every step; with ``kill_after``, stop right after that many checkpoints and return
    ``(None, count)``, else ``(method, count)``: the resume tests' kill."""
    run = FitContext(directory, device="cpu", seed=0, budget="smoke", progress=False, checkpoint_every=0.0)
    torch.manual_seed(0)
    run.method = m = cls(kind=data.kind, **options)
    m.setup(data, run)
    run.restore()
    saved, count = run.checkpoint, [0]

    def checkpoint():
        saved()
        count[0] += 1
        if kill_after is not None and count[0] >= kill_after:
            raise Killed
    run.checkpoint = checkpoint
    try:
        m.fit(data, run)
    except Killed:
        return None, count[0]
    return m, count[0]
