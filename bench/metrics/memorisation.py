"""Copying: how many outputs sit closer to a target *training* image than held-out target images do.

A translator that retrieves or memorises its training targets scores well on FID without generating
anything.  The measure, for outputs Y, target training images T and held-out target test images Z:

    d(a) = min_{t in T} ||a - t||_2                       (pixels, images flattened)
    r    = the ``quantile`` (5 %) quantile of {d(z) : z in Z}
    copy = 100 * #{y in Y : d(y) < r} / |Y|

A held-out image is that close to the training set only ``quantile`` of the time, so an output drawn
as a fresh image of the target domain scores about 100 * quantile (5 %); a method that returns training
images scores ~100 %.  The held-out images come from other writers / identities than the training
images where the task splits that way, so the reference is "as novel as a new sample of the domain".
"""
from __future__ import annotations

import torch

COPY_QUANTILE = 0.05
# a row whose share is four times what a fresh sample of the domain scores is marked as copying
COPY_FLAG = 4 * 100 * COPY_QUANTILE


def nearest_distance(a: torch.Tensor, bank: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """(len(a),) Euclidean distance from each row of ``a`` to its nearest row of ``bank`` (both flattened)."""
    a, bank = a.flatten(1).double(), bank.flatten(1).double()
    bank_sq = bank.pow(2).sum(1)
    out = []
    for i in range(0, len(a), chunk):
        x = a[i:i + chunk]
        d2 = x.pow(2).sum(1, keepdim=True) - 2 * x @ bank.T + bank_sq
        out.append(d2.min(1).values.clamp(min=0).sqrt())
    return torch.cat(out).float()


def copy_share(outputs: torch.Tensor, train: torch.Tensor, held_out: torch.Tensor,
               quantile: float = COPY_QUANTILE) -> dict[str, float]:
    """The row's ``copy`` share (%) with its reference radius and the outputs' median nearest distance."""
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    ref = nearest_distance(held_out, train)
    radius = float(torch.quantile(ref, quantile))
    d = nearest_distance(outputs.float().cpu(), train)
    return {"copy": 100.0 * float((d < radius).double().mean()), "copy_radius": radius,
            "copy_nn_median": float(d.median()), "copy_ref_nn_median": float(ref.median()),
            "copy_quantile": quantile}
