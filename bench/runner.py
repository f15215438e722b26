"""The runner: one (method, task, seed, budget) at a time, resumable and skippable.

Run directory ``OUT/<task>/<method>/<budget>-seed<seed>[-<options hash>]/`` holds
``config.json``, ``checkpoint.pt`` (during fit), ``samples.pt`` (transported test sources),
``log.jsonl``, ``grid.png`` and, last, ``row.json``. A directory with ``row.json`` is finished
and skipped; one with a checkpoint resumes from it; one with samples but no row is re-scored.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import __version__, store
from .api import BenchError, EvalContext, Method, TaskData
from .budgets import Budget
from .registry import get_method, get_task
from .run import Run, pick_device, seed_everything

ROW_FILE = "row.json"
SAMPLES_FILE = "samples.pt"


@dataclass
class RunSpec:
    method: str
    task: str
    seed: int = 0
    budget: str = "smoke"
    options: dict[str, Any] = field(default_factory=dict)

    def directory(self, out: Path) -> Path:
        name = f"{self.budget}-seed{self.seed}"
        if self.options:
            digest = hashlib.sha256(json.dumps(self.options, sort_keys=True).encode()).hexdigest()[:8]
            name += f"-{digest}"
        return Path(out) / self.task / self.method / name


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def check_writable(out: Path) -> None:
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise BenchError(f"results directory {out} is not writable ({exc.strerror}); "
                         f"pass --out DIR with a writable directory") from None


def transport_all(method: Method, x: torch.Tensor, device: torch.device, batch_size: int,
                  seed: int, progress: bool = True, desc: str = "transport") -> torch.Tensor:
    """Transport ``x`` in batches with a seeded generator; returns CPU float32."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 7919 + 17)
    outs = []
    with torch.no_grad():
        for start in tqdm(range(0, len(x), batch_size), desc=desc, disable=not progress, leave=False):
            xb = x[start:start + batch_size].to(device, non_blocking=True)
            yb = method.transport(xb, generator=gen)
            outs.append(yb.detach().float().cpu())
    return torch.cat(outs) if outs else x[:0].clone()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_one(spec: RunSpec, *, out: Path, data_root: Path, cache_dir: Path, device: str = "auto",
            bf16: bool = False, compile: bool = False, force: bool = False, progress: bool = True,
            batch_size: int = 500, checkpoint_every: float = 120.0, log=print) -> dict[str, Any]:
    task = get_task(spec.task)()
    method_cls = get_method(spec.method)
    budget = Budget(spec.budget)
    method = method_cls(**spec.options)  # validates options before any work
    rundir = spec.directory(out)
    if (rundir / ROW_FILE).exists() and not force:
        log(f"skip {spec.method} on {spec.task} (seed {spec.seed}, {spec.budget}): finished, {rundir / ROW_FILE}")
        return store.read_json(rundir / ROW_FILE)
    check_writable(rundir)
    if force:
        for name in (ROW_FILE, SAMPLES_FILE, "checkpoint.pt"):
            (rundir / name).unlink(missing_ok=True)

    dev = pick_device(device)
    seed_everything(spec.seed)
    data = task.load(data_root, spec.seed)
    method.check_setting(data)
    config = {"method": spec.method, "task": spec.task, "seed": spec.seed, "budget": spec.budget,
              "options": method.options, "device": str(dev), "bf16": bool(bf16), "compile": bool(compile)}
    store.write_json(rundir / "config.json", config)

    run = Run(rundir, device=dev, seed=spec.seed, budget=budget, bf16=bf16, compile=compile,
              checkpoint_every=checkpoint_every, progress=progress)
    run.method = method
    seed_everything(spec.seed)
    method.setup(data, run)
    method.to(dev)

    n_eval = task.eval_sizes.get(budget.name)
    sources = data.source_test if n_eval is None else data.source_test[:n_eval]
    labels = None
    if data.source_test_labels is not None:
        labels = data.source_test_labels[: len(sources)]

    samples_path = rundir / SAMPLES_FILE
    timings: dict[str, float] = {}
    if samples_path.exists():
        saved = store.torch_load(samples_path)
        outputs, timings = saved["outputs"], saved.get("timings", {})
        log(f"re-scoring stored samples in {rundir}")
        if (rundir / "checkpoint.pt").exists():
            run.restore()
    else:
        resumed = run.restore()
        if resumed:
            log(f"resuming {spec.method} on {spec.task} from {rundir / 'checkpoint.pt'} ({run.progress})")
        _sync(dev)
        run.start_fit_clock()
        method.fit(data, run)
        _sync(dev)
        fit_s = run.fit_seconds()
        run.checkpoint()
        t0 = time.perf_counter()
        outputs = transport_all(method, sources, dev, batch_size, spec.seed, progress)
        _sync(dev)
        transport_s = time.perf_counter() - t0
        timings = {**run.timings, "fit_s": fit_s, "transport_s": transport_s}
        store.torch_save(samples_path, {"outputs": outputs, "n": len(sources), "timings": timings})
    run.close()

    row = score(task, data, method, run, sources, outputs, labels, spec, cache_dir, dev, data_root,
                batch_size, progress)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    row.update({
        "fit_s": round(timings.get("fit_s", 0.0), 3),
        "transport_s": round(timings.get("transport_s", 0.0), 3),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "device": str(dev), "device_name": _device_name(dev), "bf16": bool(bf16),
        "gpu_minutes": round((timings.get("fit_s", 0.0) + timings.get("transport_s", 0.0)) / 60, 3)
        if dev.type == "cuda" else None,
        "peak_gpu_mem_gib": None if peak is None else round(peak, 3),
    })
    save_grid(rundir / "grid.png", sources, outputs, data)
    store.write_json(rundir / ROW_FILE, row)
    log(f"done {spec.method} on {spec.task} (seed {spec.seed}, {spec.budget}): "
        + ", ".join(f"{k}={_fmt(row.get(k))}" for k in task.metrics if k in row))
    return row


def score(task, data: TaskData, method: Method, run: Run, sources, outputs, labels, spec: RunSpec,
          cache_dir: Path, dev: torch.device, data_root: Path, batch_size: int, progress: bool) -> dict:
    def extra_transport(x: torch.Tensor) -> torch.Tensor:
        return transport_all(method, x, dev, batch_size, spec.seed + 1, progress=False)

    ctx = EvalContext(cache_dir=Path(cache_dir), device=dev, budget=run.budget, seed=spec.seed,
                      method=method, transport=extra_transport, data_root=data_root)
    t0 = time.perf_counter()
    metrics = task.evaluate(data, sources, outputs, labels, ctx)
    eval_s = time.perf_counter() - t0
    bounds = method.bound_terms() or {}
    row: dict[str, Any] = {
        "method": spec.method, "task": spec.task, "seed": spec.seed, "budget": spec.budget,
        "options": method.options, "variant": _variant(spec.options), "family": method.family, "oracle": method.oracle,
        "nfe": method.nfe, "setting": data.setting, "n_eval": len(sources),
        **metrics,
        **{(k if k.startswith("bound_") else f"bound_{k}"): v for k, v in bounds.items()},
        "eval_s": round(eval_s, 3),
        "otbench_version": __version__, "commit": _git_commit(), "torch": torch.__version__,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return row


def evaluate_dir(rundir: Path, *, data_root: Path, cache_dir: Path, device: str = "auto",
                 batch_size: int = 500, progress: bool = True) -> dict[str, Any]:
    """Recompute a run's metrics from its stored samples (``bench eval``)."""
    rundir = Path(rundir)
    if not (rundir / "config.json").exists() or not (rundir / SAMPLES_FILE).exists():
        raise BenchError(f"{rundir} is not a finished run directory (needs config.json and {SAMPLES_FILE}); "
                         f"pass a directory under your --out tree, e.g. runs/digits/identity/smoke-seed0")
    config = store.read_json(rundir / "config.json")
    spec = RunSpec(config["method"], config["task"], config["seed"], config["budget"],
                   {k: v for k, v in config["options"].items()
                    if v != get_method(config["method"]).default_options.get(k)})
    task = get_task(spec.task)()
    dev = pick_device(device)
    data = task.load(data_root, spec.seed)
    method = get_method(spec.method)(**config["options"])
    run = Run(rundir, device=dev, seed=spec.seed, budget=spec.budget, progress=progress)
    run.method = method
    seed_everything(spec.seed)
    method.setup(data, run)
    method.to(dev)
    if (rundir / "checkpoint.pt").exists():
        run.restore()
    saved = store.torch_load(rundir / SAMPLES_FILE)
    outputs = saved["outputs"]
    sources = data.source_test[: len(outputs)]
    labels = None if data.source_test_labels is None else data.source_test_labels[: len(outputs)]
    row = score(task, data, method, run, sources, outputs, labels, spec, cache_dir, dev, data_root,
                batch_size, progress)
    old = store.read_json(rundir / ROW_FILE) if (rundir / ROW_FILE).exists() else {}
    for key in ("fit_s", "transport_s", "timings", "device", "device_name", "bf16", "gpu_minutes",
                "peak_gpu_mem_gib"):
        if key in old:
            row[key] = old[key]
    timings = saved.get("timings", {})
    row.setdefault("fit_s", round(timings.get("fit_s", 0.0), 3))
    row.setdefault("transport_s", round(timings.get("transport_s", 0.0), 3))
    store.write_json(rundir / ROW_FILE, row)
    return row


def save_grid(path: Path, sources: torch.Tensor, outputs: torch.Tensor, data: TaskData, n: int = 16) -> None:
    """Source row above translated row (images); a scatter for 1-D/2-D vector tasks."""
    import io

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


def _variant(options: dict) -> str:
    """A short label for non-default options, e.g. ``sampler=ddim,nfe=20`` ('' for defaults)."""
    return ",".join(f"{k}={options[k]}" for k in sorted(options))


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)
