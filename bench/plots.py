"""Pictures of a run: the source/transported grid (images) or a scatter/histogram (vectors)."""
from __future__ import annotations

import io
from pathlib import Path

import torch

from . import store
from .api import TaskData


def save_grid(path: Path, sources: torch.Tensor, outputs: torch.Tensor, data: TaskData, n: int = 16) -> None:
    """Source row above translated row (images); a scatter for 1-D/2-D vector tasks (atomic PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    if sources.dim() == 4 and outputs.dim() == 4:
        from torchvision.utils import make_grid
        k = min(n, len(sources))
        src = sources[:k]
        if src.shape[1:] != outputs.shape[1:]:
            src = torch.nn.functional.interpolate(src, size=outputs.shape[-2:], mode="nearest")
            if src.shape[1] != outputs.shape[1]:
                src = src.mean(1, keepdim=True).expand(-1, outputs.shape[1], -1, -1)
        grid = make_grid(torch.cat([src, outputs[:k]]).clamp(-1, 1) * 0.5 + 0.5, nrow=k, padding=2)
        arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        fig = plt.figure(figsize=(arr.shape[1] / 50, arr.shape[0] / 50), dpi=100)
        plt.imshow(arr.squeeze(), cmap="gray" if arr.shape[-1] == 1 else None, interpolation="nearest")
        plt.axis("off")
        plt.title("top: source, bottom: transported", fontsize=8)
    else:
        fig = plt.figure(figsize=(4, 4), dpi=100)
        s = sources.reshape(len(sources), -1)
        o = outputs.reshape(len(outputs), -1)
        t = data.target_test.reshape(len(data.target_test), -1)
        if s.shape[1] == 1:
            plt.hist(s[:, 0].numpy(), bins=40, alpha=0.5, label="source")
            plt.hist(t[:, 0].numpy(), bins=40, alpha=0.5, label="target")
            plt.hist(o[:, 0].numpy(), bins=40, alpha=0.5, label="transported")
        else:
            plt.scatter(s[:, 0], s[:, 1], s=3, label="source")
            plt.scatter(t[:, 0], t[:, 1], s=3, label="target")
            plt.scatter(o[:, 0], o[:, 1], s=3, label="transported")
        plt.legend(fontsize=7)
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    store.write_bytes(path, buf.getvalue())
