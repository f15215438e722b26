"""A small CNN judge for class-preserving translation (``acc``) and its feature Frechet distance (``cfd``).

The network is trained once per (task key, training data) on the CPU with a fixed seed, one
intra-op thread and torch's deterministic algorithms, so the same weights come out of every
process on the same CPU kind and torch build (tests/test_metrics.py trains twice in fresh
processes, with 1 and 2 threads set outside); it is saved under ``<cache_dir>/classifiers/``
next to a json record holding the sha256 of the weights themselves (``weights_sha256``: the
file's own bytes change with every ``torch.save``), checked every time the weights are loaded.  The 128-d penultimate activations
(``features``) give the classifier Frechet distance, a cheap domain-specific complement to FID
(never to be reported as FID).

Bit-identical weights need the same CPU kind as well: the digits judge trained on three of this
project's machines had three sha256s (float rounding differs between instruction sets and BLAS
kernels). So a task may ship **pinned** weights (``pinned_dir``): one trained instance, committed
with its record, which every machine copies into its cache instead of training its own, so Acc is
scored by the same network everywhere. ``BENCH_TRAIN_JUDGE=1`` trains locally instead (the
recipe's own check: on the CPU kind the pinned record names, training gives the same sha256).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import BenchError
from ..host import cpu_model
from ..locks import cache_entry_lock
from .frechet import FeatureStats

# v2: pixel-noise augmentation in training. v1 read faint sampler noise as a class: Gaussian noise
# of std 0.02 on the real Chinese-MNIST test images took it from 95.75 % to 36 %, std 0.05 to 10 % (everything
# 零), and diffusion samples carry ~0.05 RMS of it in their background (results/digits/PROTOCOL.md)
ARCH_VERSION = "cnn16-v2"
NOISE_MAX = 0.1    # training: each image gets Gaussian pixel noise of std ~ U[0, NOISE_MAX], then clamped
NOISY_TEST_STD = 0.05  # the record's ``test_acc_noisy``: test accuracy with this pixel noise (fixed seed)
# the label of a row judged by a classifier without a noise-robustness record (the first digits / animal judges,
# which read faint pixel noise as one class): never averaged with rows of a noise-robust judge
FRAGILE_JUDGE = "judge=noise-fragile"


class SmallCNN(nn.Module):
    """conv16-conv16-pool-conv32-conv32-pool-fc128-fc(classes) (width 16) for 1x28x28 inputs in [-1, 1]."""

    def __init__(self, classes: int = 10, channels: int = 1, width: int = 16, feat_dim: int = 128) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(2 * w * 16, feat_dim), nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feat_dim, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, feat_dim)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.body(x)))


def _augment(x: torch.Tensor, g: torch.Generator, max_shift: float = 0.1, max_rot: float = 0.15,
             scale: float = 0.1, noise: float = NOISE_MAX, noise_p: float = 1.0) -> torch.Tensor:
    """Random small affine jitter (shift, rotation, scale) and pixel noise, so the judge reads the glyph
    whatever its placement and whatever faint noise a generator leaves around it."""
    n = len(x)
    ang = (torch.rand(n, generator=g) * 2 - 1) * max_rot
    s = 1 + (torch.rand(n, generator=g) * 2 - 1) * scale
    t = (torch.rand(n, 2, generator=g) * 2 - 1) * max_shift * 2
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1
    std = torch.rand(n, 1, 1, 1, generator=g) * noise
    if noise_p < 1.0:  # only this share of the images gets noise (drawn only here: p = 1 keeps the stream)
        std = std * (torch.rand(n, 1, 1, 1, generator=g) < noise_p)
    return _add_noise(x, std, g)


def _add_noise(x: torch.Tensor, std, g: torch.Generator) -> torch.Tensor:
    return (x + std * torch.randn(x.shape, generator=g)).clamp(-1.0, 1.0)


def noisy(x: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    """x plus Gaussian pixel noise of ``std``, clamped to [-1, 1] (fixed seed): the robustness check."""
    return _add_noise(x, std, torch.Generator().manual_seed(seed))


def judge_label(row: dict, pinned: frozenset[str] | tuple[str, ...] = ()) -> str:
    """A row's label when its judge makes it incomparable: noise-fragile, or another network than the ``pinned``
    ones (a judge trained on another CPU kind differs bit for bit); '' for a row scored by a pinned judge."""
    judge = row.get("classifier_sha256")
    if not judge:
        return ""
    if row.get("classifier_test_acc_noisy") is None:
        return FRAGILE_JUDGE
    return f"judge={judge[:8]}" if pinned and judge not in pinned else ""


def judge_notes(rows: list[dict]) -> list[str]:
    """What a table of ``rows`` says about their judges: several networks (a judge trained on another CPU kind
    differs bit for bit), or rows judged by the first, noise-fragile one."""
    notes = []
    judges = sorted({r["classifier_sha256"] for r in rows if r.get("classifier_sha256")})
    if len(judges) > 1:
        notes.append(f"These rows were judged by {len(judges)} different classifiers (sha256 "
                     f"{', '.join(j[:8] for j in judges)}...): their accuracy-type metrics are not strictly comparable; "
                     f"re-evaluate the stored samples on one machine (`bench eval RUN_DIR`) to compare them.")
    fragile = sum(1 for r in rows if r.get("classifier_sha256") and r.get("classifier_test_acc_noisy") is None)
    if fragile:  # rows judged before the classifier learned to ignore pixel noise (cnn16-v1)
        notes.append(f"{fragile} of these rows were judged by a classifier with no noise-robustness record "
                     f"(`classifier_test_acc_noisy`: the first, noise-fragile judge, which reads faint pixel noise "
                     f"as one class): their accuracy-type metrics understate outputs that carry noise; "
                     f"re-evaluate their stored samples (`bench eval RUN_DIR`).")
    return notes


def train_classifier(x: torch.Tensor, y: torch.Tensor, classes: int = 10, epochs: int = 8,
                     batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                     noise: float = NOISE_MAX, noise_p: float = 1.0) -> SmallCNN:
    """Train :class:`SmallCNN` on the CPU with a fixed seed and ONE intra-op thread.

    One thread makes the weights bit-identical on every machine with the same torch build
    (reductions do not depend on the core count), and on small shared CPUs it is also faster
    than oversubscribed threads (~1 min for the digits classifier).
    """
    g = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(x, y, classes, epochs, batch_size, lr, seed, g, noise, noise_p)
    finally:
        torch.set_num_threads(threads)


class _deterministic:
    """torch.use_deterministic_algorithms(True) for a block, restored afterwards."""

    def __enter__(self):
        self.prev = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.prev)


def _train(x, y, classes, epochs, batch_size, lr, seed, g, noise=NOISE_MAX, noise_p=1.0) -> SmallCNN:
    with torch.random.fork_rng(devices=[]), _deterministic():
        torch.manual_seed(seed)
        net = SmallCNN(classes, channels=x.shape[1])
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
        steps = epochs * ((len(x) + batch_size - 1) // batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        net.train()
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), batch_size):
                idx = perm[i:i + batch_size]
                xb = _augment(x[idx], g, noise=noise, noise_p=noise_p)
                loss = F.cross_entropy(net(xb), y[idx], label_smoothing=0.05)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return net.eval()


@torch.no_grad()
def predict(net: nn.Module, x: torch.Tensor, batch_size: int = 512, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted labels, penultimate features) on the CPU for images x, computed on ``device``."""
    device = torch.device(device) if device is not None else next(net.parameters()).device
    preds, feats = [], []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device, torch.float32)
        f = net.features(xb)
        preds.append(net.head(f).argmax(1).cpu())
        feats.append(f.double().cpu())
    if not preds:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, 0, dtype=torch.float64)
    return torch.cat(preds), torch.cat(feats)


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Percentage of x classified as y."""
    pred, _ = predict(net, x)
    return 100.0 * float((pred == y.cpu()).double().mean())


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 of the weights themselves: names, dtypes, shapes and bytes in sorted key order.

    Not the file's sha256: ``torch.save`` writes a random serialization id into every file, so
    two saves of identical weights differ byte for byte."""
    import hashlib
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def _load_verified(weights: Path, record: dict, classes: int, fix: str) -> SmallCNN:
    """The network in ``weights`` if its sha256 is the record's; a one-line BenchError naming ``fix`` if not."""
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BenchError(f"classifier weights {weights} cannot be read ({type(exc).__name__}); {fix}") from None
    got = weights_sha256(state)
    if got != record.get("sha256"):
        raise BenchError(f"classifier weights {weights} do not match their recorded sha256 "
                         f"({got[:12]}... vs {str(record.get('sha256'))[:12]}...); {fix}")
    net = SmallCNN(classes, channels=int(record.get("channels", 1)))
    net.load_state_dict(state)
    return net.eval()


def _store(weights: Path, record_path: Path, net: nn.Module, record: dict) -> None:
    """Weights, then their record, each written atomically (a record never names weights not yet there)."""
    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_name(f".{weights.name}.{os.getpid()}.tmp")
    torch.save(net.state_dict(), tmp)
    os.replace(tmp, weights)
    tmp = record_path.with_name(f".{record_path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, record_path)


def trained_on() -> str:
    """The CPU that trains a judge (its weights are bit-identical only on the same CPU kind)."""
    return f"cpu ({cpu_model()}), torch {torch.__version__}"


def load_or_train(cache_dir, key: str, train: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                  test: Callable[[], tuple[torch.Tensor, torch.Tensor]], classes: int = 10,
                  epochs: int = 8, seed: int = 0, pinned_dir=None) -> tuple[SmallCNN, dict]:
    """The cached classifier for ``key``, and its record: {"sha256", "test_acc", "test_acc_noisy", "key",
    "arch", "epochs", "seed", "origin", ...}.  The weights' sha256 is verified on every load.

    Pinned weights of the same name in ``pinned_dir``, when there are some, replace any other cached network
    (their accuracies re-measured on this machine; ``origin`` "pinned"); otherwise, or with ``BENCH_TRAIN_JUDGE=1``,
    a cache without the network gets one trained here on ``train()`` (``origin`` "trained here")."""
    folder = Path(cache_dir) / "classifiers"
    name = f"{key}_{ARCH_VERSION}_e{epochs}_s{seed}_w.pt"
    weights = folder / name
    record_path = weights.with_suffix(".json")
    pinned = Path(pinned_dir) / name if pinned_dir is not None else None
    use_pinned = (pinned is not None and pinned.is_file() and pinned.with_suffix(".json").is_file()
                  and os.environ.get("BENCH_TRAIN_JUDGE", "") in ("", "0"))
    pinned_record = json.loads(pinned.with_suffix(".json").read_text()) if use_pinned else None
    with cache_entry_lock(weights):  # one process trains; concurrent ones wait, then load its files
        if weights.is_file() and record_path.is_file():
            record = json.loads(record_path.read_text())
            # a judge cached before one was pinned (trained on this machine) gives way to the pinned one
            if pinned_record is None or record.get("sha256") == pinned_record.get("sha256"):
                net = _load_verified(weights, record, classes, "delete it and its .json record to rebuild it")
                return net, record
        import sys
        print(f"note: {'measuring the pinned judge' if use_pinned else f'training the judge ({epochs} epochs)'} "
              f"{key} on this machine ({'seconds' if use_pinned else 'minutes on a CPU'}; once, cached in {folder})",
              file=sys.stderr, flush=True)
        if use_pinned:
            record = dict(pinned_record)
            net = _load_verified(pinned, record, classes, "the installed package is damaged: reinstall otbench, "
                                 "or set BENCH_TRAIN_JUDGE=1 to train a judge here")
            record["origin"] = f"pinned ({pinned.name}, trained on {record.get('trained_on', 'an unrecorded CPU')})"
        else:
            x, y = train()
            net = train_classifier(x, y, classes=classes, epochs=epochs, seed=seed)
            record = {"sha256": weights_sha256(net.state_dict()),
                      "sha256_of": "weights (bench.metrics.classifier.weights_sha256)",
                      "key": key, "arch": ARCH_VERSION, "channels": int(x.shape[1]), "epochs": epochs, "seed": seed,
                      "train_n": len(x), "trained_on": trained_on(), "origin": "trained here"}
        # the accuracies are measured on this machine, also for pinned weights (float rounding may differ)
        xt, yt = test()
        record.update(test_acc=accuracy(net, xt, yt), test_acc_noisy=accuracy(net, noisy(xt.float(), NOISY_TEST_STD), yt),
                      noisy_test_std=NOISY_TEST_STD, test_n=len(xt))
        _store(weights, record_path, net, record)
        return net, record


def feature_stats_of(net: nn.Module, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    s = FeatureStats()
    s.update(predict(net, images)[1])
    return s.compute()
