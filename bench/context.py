"""The fit context: device, precision, seed, budget, progress, checkpoints and logs for one fit.

A method never touches files or devices itself. It writes its training loops as::

    for step in run.loop("stage1", total=run.budget.pick(smoke=200, fast=20_000)):
        ...
        if run.should_log(step):
            run.log("stage1", step, loss=loss)     # .item() only here

``run.loop`` resumes at the step the last checkpoint recorded, shows a progress bar, and
checkpoints the method every ``checkpoint_every`` seconds and at the end of the loop.  Work
done between loops must be either cheap and deterministic or kept in the method's state.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import time
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from . import store
from .budgets import Budget
from .errors import BenchError, RunFailed
from .schema import check_checkpoint


def stream_seed(seed: int, name: str | int) -> int:
    """The seed of the random stream ``name`` of a run with ``seed`` (stable across processes)."""
    key = name if isinstance(name, int) else zlib.crc32(str(name).encode())
    return (int(seed) * 1_000_003 + int(key)) % (2**63 - 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def pick_device(name: str = "auto") -> torch.device:
    """The torch device for ``--device``: auto, cpu, cuda, cuda:N or mps; a one-line BenchError for a name torch
    cannot parse or a device this machine does not have."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise BenchError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {name} was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BenchError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if dev.type == "mps" and not mps:
        raise BenchError(f"--device {name} was asked for but MPS is not available; use --device cpu or auto")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise BenchError(f"--device {name}: otbench runs on cpu, cuda or mps; use --device auto")
    return dev


class FitContext:
    """What a method's ``fit`` receives: device, precision, seed, budget, named random streams, resumable
    loops with progress and checkpoints, and the training log of one run."""


    def __init__(self, directory: Path | None, *, device: torch.device | str = "cpu", seed: int = 0,
                 budget: Budget | str = "smoke", bf16: bool = False, checkpoint_every: float = 120.0,
                 progress: bool = True, compile: bool = False, step_cap: int | None = None):
        self.dir = Path(directory) if directory is not None else None
        self.device = torch.device(device)
        self.seed = int(seed)
        self.budget = budget if isinstance(budget, Budget) else Budget(budget)
        self.bf16 = bool(bf16) and self.device.type == "cuda"
        self.compile = bool(compile) and self.device.type == "cuda"
        self.checkpoint_every = checkpoint_every
        self.progress_bars = progress
        self.step_cap = step_cap  # benchmarks only: cap every loop at this many steps
        self.progress: dict[str, int] = {}  # loop name -> steps completed
        self.timings: dict[str, float] = {}  # loop/stage name -> seconds
        self.method = None  # set by the runner so loops can checkpoint it
        self.config: dict | None = None  # the run's config.json, recorded in every checkpoint (set by the runner)
        self.fit_elapsed_before = 0.0  # fit seconds spent in earlier (interrupted) sessions
        self._fit_t0: float | None = None
        self._last_ckpt = time.monotonic()
        self._log_fh = None
        # learning curves: the runner sets probe(loop, step) and {loop name: every N steps}; probe
        # time is kept out of the loop's timing (timings["probe"])
        self.probe = None
        self.probe_loops: dict[str, int] = {}
        # named random streams handed out by generator(name); their states travel in the checkpoint
        # so a resumed run draws the same numbers as an uninterrupted one
        self._streams: dict[str, torch.Generator] = {}
        self._saved_streams: dict[str, torch.Tensor] = {}

    # -- randomness and precision ----------------------------------------------------------
    def generator(self, name: str | int = 0, device: torch.device | str | None = None) -> torch.Generator:
        """A named random stream of this run: the same (seed, name) always gives the same numbers,
        and different names are independent; the one seed formula of the harness."""
        g = torch.Generator(device=device or self.device)
        g.manual_seed(stream_seed(self.seed, name))
        saved = self._saved_streams.pop(str(name), None)
        if saved is not None:  # resumed: continue the stream where the checkpoint left it
            try:
                g.set_state(saved)
            except (RuntimeError, TypeError, ValueError):  # another device type: keep the fresh seed
                pass
        self._streams[str(name)] = g
        return g

    def autocast(self):
        """bf16 autocast on CUDA when asked for, else a no-op."""
        if self.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def maybe_compile(self, module: torch.nn.Module):
        return torch.compile(module) if self.compile else module

    # -- loops, checkpoints, logs ----------------------------------------------------------
    def loop(self, name: str, total: int, desc: str | None = None) -> Iterator[int]:
        if self.step_cap is not None:
            total = min(total, self.step_cap)
        start = self.progress.get(name, 0)
        if start >= total:
            return
        bar = tqdm(range(start, total), initial=start, total=total, desc=desc or name,
                   disable=not self.progress_bars, leave=False, dynamic_ncols=True)
        t0 = time.perf_counter()
        try:
            every = self.probe_loops.get(name) if self.probe is not None else None
            for step in bar:
                yield step
                self.progress[name] = step + 1
                if every and ((step + 1) % every == 0 or step + 1 == total):
                    self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0
                    with self.stage("probe"):
                        self.probe(name, step + 1)
                    t0 = time.perf_counter()
                if self.dir is not None and time.monotonic() - self._last_ckpt > self.checkpoint_every:
                    self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0
                    t0 = time.perf_counter()
                    self.checkpoint()
        finally:
            bar.close()
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0
        self.checkpoint()

    @contextlib.contextmanager
    def stage(self, name: str):
        """Time a block that is not a loop (e.g. computing a coupling)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def done(self, name: str) -> bool:
        """True when a one-shot stage finished before an interruption (see ``mark_done``)."""
        return self.progress.get(name, 0) > 0

    def mark_done(self, name: str) -> None:
        self.progress[name] = 1
        self.checkpoint()

    def start_fit_clock(self) -> None:
        self._fit_t0 = time.perf_counter()

    def fit_seconds(self) -> float:
        """Wall time spent fitting, summed over every session of this run (resumes included)."""
        now = 0.0 if self._fit_t0 is None else time.perf_counter() - self._fit_t0
        return self.fit_elapsed_before + now

    def checkpoint(self) -> None:
        if self.dir is None or self.method is None:
            return
        state = {"method": self.method.state_dict(), "progress": dict(self.progress),
                 "timings": dict(self.timings), "fit_seconds": self.fit_seconds(),
                 "streams": {**self._saved_streams, **{k: g.get_state() for k, g in self._streams.items()}},
                 **({"config": self.config} if self.config is not None else {})}
        store.torch_save(self.dir / "checkpoint.pt", state)
        self._last_ckpt = time.monotonic()

    def restore(self) -> bool:
        """Load the last checkpoint into ``self.method``; True when there was one.  A checkpoint that is damaged
        or does not fit the method's networks raises :class:`bench.store.CorruptFile` (the method may then be
        half loaded: set it up again)."""
        path = None if self.dir is None else self.dir / "checkpoint.pt"
        if path is None or not path.exists():
            return False
        state = check_checkpoint(path, store.torch_load(path))
        try:
            self.method.load_state_dict(state["method"])
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError) as exc:
            raise store.CorruptFile(path, f"it does not fit the method's networks: "
                                          f"{' '.join(str(exc).split())[:200]}") from None
        self.method.to(self.device)
        self.progress = dict(state["progress"])
        self.timings = dict(state.get("timings", {}))
        self.fit_elapsed_before = float(state.get("fit_seconds", 0.0))
        self._saved_streams = dict(state.get("streams", {}))
        return True

    def should_log(self, step: int, every: int = 100) -> bool:
        return step % every == 0

    def log(self, stage: str, step: int, **scalars: Any) -> None:
        """Append the scalars to log.jsonl; a NaN or infinite value stops the run (:class:`RunFailed`)."""
        values = {k: (float(v.detach().float().item()) if isinstance(v, torch.Tensor) else v)
                  for k, v in scalars.items()}
        bad = [f"{k}={v}" for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]
        if self.dir is not None:
            if self._log_fh is None:
                self.dir.mkdir(parents=True, exist_ok=True)
                self._log_fh = open(self.dir / "log.jsonl", "a")
            self._log_fh.write(json.dumps({"stage": stage, "step": step, "time": time.time(), **values}) + "\n")
            self._log_fh.flush()
        if bad:
            raise RunFailed(stage, step, f"training diverged: {', '.join(bad)}")

    def close(self) -> None:
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
