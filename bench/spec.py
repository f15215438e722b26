"""What to run and how: a run's identity (:class:`RunSpec`), the settings every run of a grid shares
(:class:`Settings`), their checks, and the command line that re-creates a run."""
from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .api import Method, Task
from .budgets import Budget
from .context import pick_device
from .errors import BenchError
from .registry import _plain, get_method, get_task, options_variant
from .schema import options_digest


def run_directory(out: Path, task: str, method: str, budget: str, seed: int,
                  method_options: dict[str, Any], task_options: dict[str, Any]) -> Path:
    name = f"{budget}-seed{seed}-{options_digest(method_options, task_options)}"
    return Path(out) / task / method / name


@dataclass
class RunSpec:
    """What to run: method and task names, seed, budget, and the options the user gave."""

    method: str
    task: str
    seed: int = 0
    budget: str = "smoke"
    options: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)

    def build(self) -> tuple[Method, Task]:
        """The method (options resolved for the budget) and the task; BenchError on bad options."""
        Budget(self.budget)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise BenchError(f"seed {self.seed!r} must be an integer >= 0, e.g. --seeds 0,1,2")
        task = get_task(self.task)(**self.task_options)
        method = get_method(self.method)(budget=self.budget, kind=task.kind, **self.options)
        return method, task

    def directory(self, out: Path) -> Path:
        method, task = self.build()
        return run_directory(out, self.task, self.method, self.budget, self.seed, method.options, task.options)

    def label(self) -> str:
        return f"{self.method} on {self.task} (seed {self.seed}, {self.budget})"



@dataclass
class Settings:
    """How every run of a grid runs: the same for all of them, and picklable (it travels to worker processes,
    Ray tasks and SLURM jobs).  Nothing in here changes what a run computes, so none of it is in the run's hash."""

    out: Path
    data_root: Path
    cache_dir: Path
    device: str = "auto"
    bf16: bool = False
    compile: bool = False
    force: bool = False  # train again from scratch, even when finished
    retry_failed: bool = False  # start a failed run again from scratch
    wait_locked: bool = False  # wait for a run another process holds, instead of skipping it
    progress: bool = True
    batch_size: int = 500  # transport and scoring batch
    checkpoint_every: float = 120.0  # seconds between checkpoints within a loop
    probe_every: int | None = None  # learning curve: probe the method's probe_loop every N steps
    probe_n: int = 500
    threads: int | None = None  # torch threads in a worker process (None: leave as is)
    env: dict[str, str] = field(default_factory=dict)  # environment a remote worker needs (BENCH_*)

    def __post_init__(self) -> None:
        self.out, self.data_root, self.cache_dir = Path(self.out), Path(self.data_root), Path(self.cache_dir)

    def check(self) -> None:
        """One-line BenchErrors for settings that would fail (or silently misbehave) after training."""
        pick_device(self.device)
        for flag, value, low in (("--batch-size", self.batch_size, 1), ("--probe-n", self.probe_n, 1),
                                 ("--probe-every", 1 if self.probe_every is None else self.probe_every, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise BenchError(f"{flag} {value!r}: pass an integer >= {low}")
        every = self.checkpoint_every
        number = isinstance(every, (int, float)) and not isinstance(every, bool)
        if not (number and math.isfinite(every) and every >= 0):
            raise BenchError(f"--checkpoint-every {every!r}: pass a number of seconds >= 0")


def variant(spec: RunSpec, method: Method, task: Task) -> str:
    """A short label of the options that differ from the budget's defaults ('' for defaults)."""
    return options_variant(spec.method, spec.budget, spec.task, method.options, task.options)


def rerun_command(spec: RunSpec, rundir: Path, *, force: bool = False) -> str:
    """The `bench run` command line of this run: its options that differ from today's defaults as --opt, its
    --out, and ``--force`` (which trains it again from scratch) when asked."""
    def arg(key: str, value: Any) -> str:
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        if isinstance(value, str):
            try:
                json.loads(value)
                text = json.dumps(value)  # "1" or "true" as a string: quoted, or --opt would read a number
            except ValueError:
                pass
        return f"{key}={text}"

    base = _plain(get_method(spec.method).resolve_options(spec.budget, {}, get_task(spec.task).kind))
    tbase = _plain(get_task(spec.task)().options)
    args = ["bench", "run", "--methods", spec.method, "--task", spec.task, "--seeds", str(spec.seed),
            "--budget", spec.budget, "--out", str(Path(rundir).parent.parent.parent)]
    for key, value in sorted(_plain(spec.options).items()):
        if base.get(key, object()) != value:
            args += ["--opt", arg(f"{spec.method}.{key}", value)]
    for key, value in sorted(_plain(spec.task_options).items()):
        if tbase.get(key, object()) != value:
            args += ["--task-opt", arg(key, value)]
    return " ".join(shlex.quote(a) for a in args + (["--force"] if force else []))
