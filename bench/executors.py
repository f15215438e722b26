"""Where the runs of a grid execute: this process, N local worker processes, Ray, or SLURM.

The run directory stays the unit of work.  Every executor hands each worker a :class:`RunSpec`
and the same :class:`Settings`; the worker calls :func:`execute`, which takes the run's lock,
runs it with :func:`bench.runner.run_one` and returns an :class:`Outcome` (plain data, so it
travels back from a Ray task or a SLURM job).  What a worker writes lives only in the run
directory, so a grid can be stopped, re-submitted elsewhere, or shared by several launchers: a
finished run is skipped, a running one is left to its holder, an interrupted one resumes.

- ``local`` (default): ``jobs=1`` runs in this process; ``jobs=N`` starts N worker processes
  (spawned), each with ``torch.set_num_threads(max(1, cores // N))``.
- ``ray``: one Ray task per run with ``num_cpus`` (and ``num_gpus`` with ``--device cuda``), on
  ``--ray-address`` or a local instance started for the grid; needs ``pip install otbench[ray]``.
- ``slurm``: one submitit job per run (``--slurm-partition``, ``--slurm-time``,
  ``--slurm-gpus``), its logs in ``<run dir>.slurm/`` beside the run directory; ``--slurm-local``
  runs the same jobs with submitit's local executor (no cluster: for tests and laptops); needs
  ``pip install otbench[slurm]``.
"""
from __future__ import annotations

import importlib
import math
import multiprocessing as mp
import os
import re
import shutil
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

import torch

from . import store
from .errors import BenchError, RunFailed
from .locks import RunLocked, describe_owner
from .rundir import FAILED_FILE, ROW_FILE, earlier_failure, read_failure, read_row
from .runner import run_one
from .spec import Settings, run_directory

EXECUTORS = ("local", "ray", "slurm")
Log = Callable[[str], Any]


@dataclass
class Outcome:
    """What happened to one run: ``done`` (ran to its row now), ``finished`` (row found, skipped),
    ``failed`` (failed.json, now or earlier), ``locked`` (another process holds it), ``error``
    (crashed: resumable, the traceback is in log.jsonl)."""

    spec: Any
    status: str
    message: str
    rundir: str = ""
    row: dict[str, Any] | None = None


def bench_env() -> dict[str, str]:
    """The BENCH_* variables a worker on another machine needs to see the same plugins and caches."""
    return {k: v for k, v in os.environ.items() if k.startswith("BENCH_")}


def execute(spec, settings: Settings, log: Log | None = None) -> Outcome:
    """Run one spec in this process (the body of every executor's worker)."""
    for key, value in settings.env.items():
        os.environ.setdefault(key, value)
    if settings.threads:
        torch.set_num_threads(max(1, int(settings.threads)))
    log = log or _print
    method, task = spec.build()
    rundir = run_directory(settings.out, spec.task, spec.method, spec.budget, spec.seed, method.options,
                           task.options)
    messages: list[str] = []

    def keep(msg: str) -> None:
        messages.append(msg)
        log(msg)

    try:
        row = run_one(spec, settings, log=keep, warn=keep)
    except RunLocked as exc:
        return Outcome(spec, "locked", f"skip {spec.label()}: running in {describe_owner(exc.owner)} "
                                       f"(--wait-locked waits for it)", str(rundir))
    except RunFailed as exc:
        if getattr(exc, "earlier", False):
            msg = (f"skip {spec.label()}: failed earlier: {exc} ({rundir / 'failed.json'}); "
                   f"--retry-failed runs it again from scratch")
        else:
            msg = f"failed {spec.label()}: {exc} ({rundir / 'failed.json'})"
        return Outcome(spec, "failed", msg, str(rundir))
    except BenchError:
        raise
    except Exception as exc:  # a crash: reported, the grid goes on, the run resumes next time
        first = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
        traceback.print_exc(file=sys.stderr)
        return Outcome(spec, "error", f"error in {spec.label()}: {first} (traceback in {rundir / 'log.jsonl'}; "
                                      f"the run resumes when run again)", str(rundir))
    status = "finished" if any(m.startswith("skip ") for m in messages) else "done"
    return Outcome(spec, status, messages[-1] if messages else f"done {spec.label()}", str(rundir), row)


def _print(msg: str) -> None:
    print(msg, flush=True)


def settled(spec, settings: Settings) -> Outcome | None:
    """A run that needs no worker (finished, or failed and not retried), checked before submitting."""
    if settings.force:
        return None
    method, task = spec.build()
    rundir = run_directory(settings.out, spec.task, spec.method, spec.budget, spec.seed, method.options,
                           task.options)
    try:
        if read_row(rundir) is not None:
            return Outcome(spec, "finished", f"skip {spec.label()}: finished, {rundir / ROW_FILE}", str(rundir))
    except store.CorruptFile:
        return None  # damaged row: a worker moves it aside and re-scores the run
    failure = read_failure(rundir)
    if failure is not None and not settings.retry_failed:
        return Outcome(spec, "failed", f"skip {spec.label()}: failed earlier: {earlier_failure(failure)} "
                                       f"({rundir / FAILED_FILE}); --retry-failed runs it again from scratch",
                       str(rundir))
    return None


# -- local --------------------------------------------------------------------------------------
def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _worker_init(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def run_local(specs: list, settings: Settings, *, jobs: int = 1, log: Log = _print) -> list[Outcome]:
    if jobs < 1:
        raise BenchError(f"--jobs {jobs}: pass a number of worker processes >= 1")
    if jobs == 1:
        outcomes = []
        for spec in specs:
            outcome = execute(spec, settings, log=log)
            if outcome.status not in ("done", "finished"):  # those were logged as they happened
                log(outcome.message)
            outcomes.append(outcome)
        return outcomes

    threads = max(1, cores() // jobs)
    worker_settings = replace(settings, progress=False, threads=threads)
    outcomes, todo = pending(specs, settings, log)
    if not todo:
        return outcomes
    with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=mp.get_context("spawn"),
                             initializer=_worker_init, initargs=(threads,)) as pool:
        futures = {pool.submit(execute, spec, worker_settings): spec for spec in todo}
        for fut in as_completed(futures):
            outcome = fut.result()  # a BenchError (bad input) stops the grid with its one line
            if outcome.status not in ("done", "finished"):
                log(outcome.message)
            outcomes.append(outcome)
    return outcomes


def pending(specs: list, settings: Settings, log: Log) -> tuple[list[Outcome], list]:
    """The outcomes of runs already settled (finished, failed earlier: logged) and the specs still to run."""
    outcomes, todo = [], []
    for spec in specs:
        pre = settled(spec, settings)
        if pre is not None:
            log(pre.message)
            outcomes.append(pre)
        else:
            todo.append(spec)
    return outcomes, todo


# -- Ray ----------------------------------------------------------------------------------------
def _require(module: str, extra: str, flag: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise BenchError(f"{flag} needs the {module!r} package: pip install 'otbench[{extra}]'") from None


def _ray_execute(spec, settings: Settings) -> Outcome:
    return execute(spec, settings)


def run_ray(specs: list, settings: Settings, *, address: str | None = None, cpus_per_run: float = 1,
            gpus_per_run: float | None = None, log: Log = _print) -> list[Outcome]:
    ray = _require("ray", "ray", "--executor ray")
    if gpus_per_run is None:
        gpus_per_run = 1.0 if str(settings.device).startswith("cuda") else 0.0
    outcomes, todo = pending(specs, settings, log)
    if not todo:
        return outcomes
    started_here = not ray.is_initialized()
    if started_here:
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "logging_level": "warning", "ignore_reinit_error": True}
        if address:
            kwargs["address"] = address
            kwargs["runtime_env"] = {"env_vars": settings.env}
        else:
            kwargs["num_cpus"] = max(cores(), int(cpus_per_run))
        try:
            ray.init(**kwargs)
        except ConnectionError as exc:
            raise BenchError(f"cannot connect to the Ray cluster at {address!r} ({exc}); check --ray-address "
                             f"or start one with `ray start --head`") from None
    worker_settings = replace(settings, progress=False, threads=max(1, int(cpus_per_run)))
    remote = ray.remote(_ray_execute).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0)
    refs = {remote.remote(spec, worker_settings): spec for spec in todo}
    waiting = list(refs)
    try:
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            for ref in ready:
                spec = refs[ref]
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, BenchError):
                        raise cause from None
                    outcome = Outcome(spec, "error", f"error in {spec.label()}: Ray task failed: "
                                                     f"{' '.join(str(cause or exc).split())[:300]}")
                except ray.exceptions.RayError as exc:
                    outcome = Outcome(spec, "error", f"error in {spec.label()}: {type(exc).__name__}: "
                                                     f"{' '.join(str(exc).split())[:300]}")
                log(outcome.message)
                outcomes.append(outcome)
    finally:
        if started_here:
            ray.shutdown()
    return outcomes


# -- SLURM (submitit) ---------------------------------------------------------------------------
def parse_minutes(text: str | int | float) -> int:
    """``90``, ``"90"``, ``"1:30:00"``, ``"2-00:00:00"`` or ``"30:00"`` (MM:SS) -> minutes."""
    if isinstance(text, (int, float)):
        return max(1, int(text))
    s = str(text).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", s)
    if not m:
        raise BenchError(f"--slurm-time {text!r}: use minutes (90) or [D-]HH:MM:SS (1:30:00)")
    days, a, b, c = m.groups()
    if b is None:  # minutes
        minutes = int(a)
    elif c is None:  # MM:SS
        minutes = int(a) + (1 if int(b) else 0)
    else:  # HH:MM:SS
        minutes = int(a) * 60 + int(b) + (1 if int(c) else 0)
    return max(1, minutes + int(days or 0) * 24 * 60)


def run_slurm(specs: list, settings: Settings, *, partition: str | None = None, time: str = "60",
              gpus: int | None = None, cpus: int = 1, local: bool = False,
              log: Log = _print) -> list[Outcome]:
    submitit = _require("submitit", "slurm", "--executor slurm")
    if gpus is None:
        gpus = 1 if str(settings.device).startswith("cuda") else 0
    minutes = parse_minutes(time)
    worker_settings = replace(settings, progress=False, threads=max(1, int(cpus)))
    outcomes, todo = pending(specs, settings, log)
    jobs = []
    for spec in todo:
        method, task = spec.build()
        rundir = run_directory(settings.out, spec.task, spec.method, spec.budget, spec.seed, method.options,
                               task.options)
        folder = rundir.parent / f"{rundir.name}.slurm"
        ex = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="local" if local else "slurm")
        params: dict[str, Any] = {"timeout_min": minutes, "gpus_per_node": int(gpus), "cpus_per_task": int(cpus),
                                  "tasks_per_node": 1, "nodes": 1,
                                  "name": f"otbench-{spec.task}-{spec.method}-s{spec.seed}"}
        if partition and not local:
            params["slurm_partition"] = partition
        ex.update_parameters(**params)
        try:
            job = ex.submit(execute, spec, worker_settings)
        except Exception as exc:  # sbatch missing, partition refused, ...
            raise BenchError(f"could not submit {spec.label()} to SLURM ({' '.join(str(exc).split())[:200]}); "
                             f"check --slurm-partition/--slurm-time, or use --slurm-local") from None
        log(f"submitted {spec.label()}: job {job.job_id}, logs in {folder}")
        jobs.append((spec, job, folder))
    for spec, job, folder in jobs:
        try:
            outcome = job.result()
        except Exception as exc:
            outcome = Outcome(spec, "error", f"error in {spec.label()}: job {job.job_id} failed "
                                             f"({' '.join(str(exc).split())[-300:]}); logs in {folder}")
        log(outcome.message)
        outcomes.append(outcome)
    return outcomes


def check_executor(executor: str, *, jobs: int = 1, slurm_local: bool = False, slurm_time: str = "60",
                   slurm_cpus: int = 1, slurm_gpus: int | None = None, ray_cpus: float = 1,
                   ray_gpus: float | None = None) -> None:
    """One-line BenchErrors, before any run starts, for an executor this machine cannot use or a bad setting."""
    if executor not in EXECUTORS:
        raise BenchError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if jobs < 1:
        raise BenchError(f"--jobs {jobs}: pass a number of worker processes >= 1")
    if executor != "local" and jobs != 1:
        raise BenchError(f"--jobs applies to --executor local; {executor} runs one task per run")
    if executor == "ray":
        _require("ray", "ray", "--executor ray")
        if not (math.isfinite(ray_cpus) and ray_cpus > 0):
            raise BenchError(f"--ray-cpus {ray_cpus}: pass a number of CPUs per run > 0")
        if ray_gpus is not None and not (math.isfinite(ray_gpus) and ray_gpus >= 0):
            raise BenchError(f"--ray-gpus {ray_gpus}: pass a number of GPUs per run >= 0")
    if executor == "slurm":
        _require("submitit", "slurm", "--executor slurm")
        parse_minutes(slurm_time)
        if slurm_cpus < 1 or (slurm_gpus is not None and slurm_gpus < 0):
            raise BenchError(f"--slurm-cpus {slurm_cpus} / --slurm-gpus {slurm_gpus}: pass cpus >= 1 and gpus >= 0")
        missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
        if missing and not slurm_local:
            raise BenchError(f"--executor slurm: no SLURM on this machine ({' and '.join(missing)} not found on "
                             f"PATH); add --slurm-local to run the jobs here, or use --executor local")


def run_grid(specs: Iterable, settings: Settings, *, executor: str = "local", jobs: int = 1,
             ray_address: str | None = None, ray_cpus: float = 1, ray_gpus: float | None = None,
             slurm_partition: str | None = None, slurm_time: str = "60", slurm_gpus: int | None = None,
             slurm_cpus: int = 1, slurm_local: bool = False, log: Log = _print) -> list[Outcome]:
    specs = list(specs)
    settings = replace(settings, env={**bench_env(), **settings.env})
    if executor == "local":
        return run_local(specs, settings, jobs=jobs, log=log)
    if executor == "ray":
        return run_ray(specs, settings, address=ray_address, cpus_per_run=ray_cpus, gpus_per_run=ray_gpus, log=log)
    if executor == "slurm":
        return run_slurm(specs, settings, partition=slurm_partition, time=slurm_time, gpus=slurm_gpus,
                         cpus=slurm_cpus, local=slurm_local, log=log)
    raise BenchError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")


def summary(outcomes: list[Outcome]) -> str:
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    names = [("done", "run now"), ("finished", "finished before"), ("locked", "running elsewhere"),
             ("failed", "failed"), ("error", "crashed (resumable)")]
    parts = [f"{counts[k]} {label}" for k, label in names if counts.get(k)]
    return f"{len(outcomes)} run(s): " + ", ".join(parts)
