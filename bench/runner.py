"""The runner: one (method, task, seed, budget) at a time, resumable, locked, skippable.

A run directory ``OUT/<task>/<method>/<budget>-seed<seed>-<hash>/`` is the unit of work; the hash
is taken over the fully resolved method and task options, so two runs share a directory exactly
when they would compute the same thing.  It holds ``config.json``, ``checkpoint.pt`` (during and
after fit), ``samples.pt`` (transported test sources), ``log.jsonl`` (training scalars and the
runner's events), ``grid.png`` and, last, ``row.json``; or, instead of the row, ``failed.json``.

One run path serves ``bench run`` and ``bench eval``:

1. :func:`prepare`  load the task's data, build and set up the method, make its :class:`Run`;
2. :func:`fit_and_transport`  train (resuming at the last checkpoint) and transport the test
   sources, stored as ``samples.pt``;
3. :func:`score`  the task's metrics (plus the method's bound terms), checked for sanity;
4. :func:`annotate`  the row: what ran, where, how long, which code.

States of a directory: ``row.json`` readable = finished (skipped); ``failed.json`` = failed (a
NaN/inf loss, non-finite samples or an impossible metric; reported and skipped unless
``retry_failed``, which starts it again from scratch); anything else = resumable.  Every file is
checked on read against the directory's identity and its schema (:mod:`bench.schema`); a damaged
or unusable one is moved aside as ``<name>.corrupt`` with a one-line warning and rebuilt: a
checkpoint by training from scratch, samples by transporting again from the checkpoint, a row by
re-scoring, a config from the copy the row or checkpoint records.  Bad input found before any
work (data, options, device) leaves no run directory behind.
Every step runs under the directory's lock (:mod:`bench.locks`), so two processes never work on
one run.
"""
from __future__ import annotations

import json
import math
import os
import platform
import socket
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from . import __version__, schema, store
from .api import BenchError, EvalContext, Metric, Method, Task, TaskData
from .budgets import Budget
from .locks import RunLock
from .options import check_path, sampling_names
from .plots import save_grid
from .registry import _plain, get_method, get_task, options_variant
from .run import Run, RunFailed, pick_device, seed_everything
from .schema import options_digest

ROW_FILE = "row.json"
FAILED_FILE = "failed.json"
SAMPLES_FILE = "samples.pt"
CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"

Log = Callable[[str], Any]


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
        method = get_method(self.method)(budget=self.budget, **self.options)
        return method, task

    def directory(self, out: Path) -> Path:
        method, task = self.build()
        return run_directory(out, self.task, self.method, self.budget, self.seed, method.options, task.options)

    def label(self) -> str:
        return f"{self.method} on {self.task} (seed {self.seed}, {self.budget})"


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


def cpu_model() -> str:
    """The CPU's model name and widest vector unit (run minutes differ ~2-3x between this project's machines)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
                platform.machine())
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    simd = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else None
    return f"{name}, {simd}" if simd else name


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model()}, {torch.get_num_threads()} threads)"


# -- sanity of what a run produces ----------------------------------------------------------------
def metric_range(metric: Metric) -> tuple[float, float]:
    """The values a metric column can take; anything outside means the run is broken.

    A metric may declare ``bounds = (lo, hi)``; otherwise: percentages (``acc``, ``*_acc``, or a
    header with ``%``) lie in [0, 100]; ``ssim`` in [-1, 1]; distances (``fid``, ``cfd``, ``w2``,
    ``*_fid``, ``*_fd``, ``*_w2``) are >= 0; anything else only has to be finite.
    """
    bounds = getattr(metric, "bounds", None)
    if bounds is not None:
        return float(bounds[0]), float(bounds[1])
    key, header = str(metric), getattr(metric, "header", str(metric))
    if key == "acc" or key.endswith("_acc") or "%" in header:
        return 0.0, 100.0
    if key == "ssim" or key.endswith("_ssim"):
        return -1.0, 1.0
    if key in ("fid", "cfd", "w2", "kid") or key.endswith(("_fid", "_fd", "_w2")):
        return 0.0, math.inf
    return -math.inf, math.inf


def check_metrics(task: Task, metrics: dict[str, Any]) -> None:
    """Raise :class:`RunFailed` (stage ``score``) for a metric that is not a finite number in range."""
    for m in task.metrics:
        m = m if isinstance(m, Metric) else Metric(m)
        if metrics.get(str(m)) is None:
            continue
        value = metrics[str(m)]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RunFailed("score", None, f"metric {m}={value!r} is not a number")
        lo, hi = metric_range(m)
        if not math.isfinite(value):
            raise RunFailed("score", None, f"metric {m}={value} is not finite")
        if not lo <= value <= hi:
            raise RunFailed("score", None, f"metric {m}={value:.6g} is outside its range [{lo:g}, {hi:g}]")


def check_samples(outputs: torch.Tensor) -> None:
    """Raise :class:`RunFailed` (stage ``transport``) when a transported sample is NaN or inf."""
    finite = torch.isfinite(outputs.reshape(len(outputs), -1)).all(1) if len(outputs) else torch.ones(0)
    bad = int((~finite.bool()).sum())
    if bad:
        raise RunFailed("transport", None, f"{bad} of {len(outputs)} transported samples hold NaN or inf")


# -- the four steps of a run ----------------------------------------------------------------------
@dataclass
class Prepared:
    """Everything a run's later steps need, built once by :func:`prepare`."""

    spec: RunSpec
    rundir: Path
    task: Task
    method: Method
    data: TaskData
    run: Run
    device: torch.device
    sources: torch.Tensor
    labels: torch.Tensor | None
    bf16: bool = False
    compile: bool = False


def prepare(spec: RunSpec, rundir: Path, method: Method, task: Task, *, data_root: Path, device: str = "auto",
            bf16: bool = False, compile: bool = False, progress: bool = True,
            checkpoint_every: float = 120.0, check_options: bool = False) -> Prepared:
    """Load the data, check the setting (and, with ``check_options``, that no given option is one this kind of
    task never reads), set the method up on its device (no training)."""
    dev = pick_device(device)
    seed_everything(spec.seed)
    data = task.load(data_root, spec.seed, budget=spec.budget)
    method.check_setting(data)
    if check_options:
        check_options_apply(spec, method, data.is_image)
    run = Run(rundir, device=dev, seed=spec.seed, budget=Budget(spec.budget), bf16=bf16, compile=compile,
              checkpoint_every=checkpoint_every, progress=progress)
    n_eval = task.eval_sizes.get(spec.budget)
    sources = data.source_test if n_eval is None else data.source_test[:n_eval]
    labels = None if data.source_test_labels is None else data.source_test_labels[: len(sources)]
    p = Prepared(spec, Path(rundir), task, method, data, run, dev, sources, labels, bool(bf16), bool(compile))
    set_up(p, method)
    return p


def check_options_apply(spec: RunSpec, method: Method, is_image: bool) -> None:
    """A one-line BenchError for a given option that this kind of task (images or vectors) never reads
    (:func:`bench.options.check_path`): the run would record and hash a setting that changed nothing."""
    check_path(f"method {spec.method!r}", type(method).default_options,
               {k: method.options[k] for k in method.given_options}, spec.budget, is_image=is_image,
               task=spec.task, prefix=f"{spec.method}.")


def set_up(p: Prepared, method: Method) -> None:
    """Seed, then build ``method``'s networks for the data on the run's device (again after a checkpoint that
    did not fit: a half-loaded method must not be trained on)."""
    p.method = p.run.method = method
    seed_everything(p.spec.seed)
    method.setup(p.data, p.run)
    method.to(p.device)


def probe_indices(count: int, n: int, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
    """Sorted indices of at most ``n`` of ``count`` evaluation sources for learning-curve probes, chosen
    without drawing a random number, and how they were chosen.  With labels, the same number from each
    class, evenly spread within it ("class-balanced"), so a curve's Acc is not the share of one class when a
    method maps everything there; without labels, or with ``n`` below the number of classes, evenly spread
    over all sources ("evenly spread")."""
    def spread(ids: torch.Tensor, k: int) -> torch.Tensor:
        return ids[torch.linspace(0, len(ids) - 1, min(k, len(ids))).round().long().unique()]

    everything = torch.arange(count)
    labels = None if labels is None else labels.reshape(-1).cpu()
    classes = None if labels is None else labels.unique()
    if classes is None or n < len(classes):
        return spread(everything, n), "evenly spread"
    per = n // len(classes)
    return torch.cat([spread(everything[labels == c], per) for c in classes]).sort().values, "class-balanced"


def attach_probe(p: Prepared, every: int, n: int, *, cache_dir: Path, data_root: Path, batch_size: int = 500) -> None:
    """A learning curve: every ``every`` steps of the method's ``probe_loop``, transport a fixed subset of
    ``n`` evaluation sources (``probe_indices``: class-balanced when labels are known; own random stream) and
    log the task's ``probe`` metrics as stage "probe" of log.jsonl.  Training is not changed by it: the probe
    draws no number from the training streams, and its time is kept out of the loop's timing."""
    if not p.method.probe_loop:
        return
    idx, subset = probe_indices(len(p.sources), n, p.labels)
    src = p.sources[idx]
    lab = None if p.labels is None else p.labels[idx]
    ctx = EvalContext(cache_dir=Path(cache_dir), device=p.device, budget=p.run.budget, seed=p.spec.seed,
                      method=p.method, data_root=data_root)

    def probe(loop: str, step: int) -> None:
        out = transport_all(p.method, src, p.device, batch_size, p.spec.seed + 2, progress=False)
        values = p.task.probe(p.data, src, out, lab, ctx)
        if values is not None:
            p.run.log("probe", step, loop=loop, subset=subset, **values)

    p.run.probe, p.run.probe_loops = probe, {p.method.probe_loop: int(every)}


def restore(p: Prepared, warn: Log) -> str:
    """Load the last checkpoint: 'restored', 'none', or 'corrupt' (moved aside with a warning)."""
    path = p.rundir / CHECKPOINT_FILE
    try:
        return "restored" if p.run.restore() else "none"
    except store.CorruptFile as exc:
        quarantine(exc, warn, "training again from scratch")
        set_up(p, type(p.method)(budget=p.spec.budget, **p.method.given_options))
        return "corrupt"


def load_samples(p: Prepared, warn: Log, action: str = "transporting again from the checkpoint") -> dict | None:
    """The stored samples, or None when missing or unusable (then moved aside with a warning): unreadable, or
    not 1 to len(p.sources) samples of the task's target shape."""
    path = p.rundir / SAMPLES_FILE
    if not path.exists():
        return None
    try:
        return schema.check_samples(path, store.torch_load(path), len(p.sources), tuple(p.data.shape))
    except store.CorruptFile as exc:
        quarantine(exc, warn, action)
        return None


def fit_and_transport(p: Prepared, *, batch_size: int = 500, progress: bool = True,
                      resumed: bool = False, log: Log = print) -> dict[str, Any]:
    """Train (continuing from the restored checkpoint), checkpoint, then transport and store."""
    if resumed:
        log(f"resuming {p.spec.label()} from {p.rundir / CHECKPOINT_FILE} ({p.run.progress})")
    event(p.rundir, "fit_start", resume=dict(p.run.progress))
    _sync(p.device)
    p.run.start_fit_clock()
    p.method.fit(p.data, p.run)
    _sync(p.device)
    fit_s = p.run.fit_seconds()
    p.run.checkpoint()
    event(p.rundir, "fit_done", fit_s=round(fit_s, 3))
    return transport_and_store(p, {**p.run.timings, "fit_s": fit_s}, batch_size=batch_size, progress=progress)


def transport_and_store(p: Prepared, timings: dict[str, float], *, batch_size: int = 500,
                        progress: bool = True) -> dict[str, Any]:
    t0 = time.perf_counter()
    outputs = transport_all(p.method, p.sources, p.device, batch_size, p.spec.seed, progress)
    _sync(p.device)
    check_samples(outputs)
    peak = torch.cuda.max_memory_allocated(p.device) / 2**30 if p.device.type == "cuda" else None
    saved = {"outputs": outputs, "n": len(outputs),
             "timings": {**timings, "transport_s": time.perf_counter() - t0},
             "facts": {"device": str(p.device), "device_name": _device_name(p.device), "bf16": p.bf16,
                       "compile": p.compile, "peak_gpu_mem_gib": None if peak is None else round(peak, 3)}}
    store.torch_save(p.rundir / SAMPLES_FILE, saved)
    event(p.rundir, "samples_stored", n=len(outputs))
    return saved


def score(p: Prepared, outputs: torch.Tensor, *, cache_dir: Path, data_root: Path, batch_size: int = 500,
          progress: bool = True) -> dict[str, Any]:
    """The task's metrics on ``outputs`` and the method's bound terms; RunFailed when impossible."""
    sources = p.sources[: len(outputs)]
    labels = None if p.labels is None else p.labels[: len(outputs)]

    def extra_transport(x: torch.Tensor) -> torch.Tensor:
        return transport_all(p.method, x, p.device, batch_size, p.spec.seed + 1, progress=False)

    ctx = EvalContext(cache_dir=Path(cache_dir), device=p.device, budget=p.run.budget, seed=p.spec.seed,
                      method=p.method, transport=extra_transport, data_root=data_root)
    t0 = time.perf_counter()
    metrics = p.task.evaluate(p.data, sources, outputs, labels, ctx)
    eval_s = time.perf_counter() - t0
    check_metrics(p.task, metrics)
    bounds = p.method.bound_terms() or {}
    return {**metrics, **{(k if k.startswith("bound_") else f"bound_{k}"): v for k, v in bounds.items()},
            "eval_s": round(eval_s, 3)}


def annotate(p: Prepared, scored: dict[str, Any], saved: dict[str, Any],
             fallback: dict[str, Any] | None = None) -> dict[str, Any]:
    """The result row: identity and options, metrics, then where and how long it ran."""
    fallback = fallback or {}
    timings = {k: float(v) for k, v in (saved.get("timings") or {}).items()}
    facts = saved.get("facts") or {}

    def fact(key, default):
        return facts.get(key, fallback.get(key, default))

    device = fact("device", str(p.device))
    fit_s, transport_s = timings.get("fit_s", 0.0), timings.get("transport_s", 0.0)
    m, spec = p.method, p.spec
    return {
        "method": spec.method, "task": spec.task, "seed": spec.seed, "budget": spec.budget,
        "options": m.options, "task_options": p.task.options, "variant": variant(spec, m, p.task),
        "family": m.family, "oracle": m.oracle, "nfe": m.nfe, "setting": p.data.setting,
        "n_eval": int(saved.get("n", len(saved.get("outputs", ())))),
        **scored,
        "fit_s": round(fit_s, 3), "transport_s": round(transport_s, 3),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "device": device, "device_name": fact("device_name", _device_name(p.device)),
        "bf16": bool(fact("bf16", p.bf16)),
        "gpu_minutes": round((fit_s + transport_s) / 60, 3) if str(device).startswith("cuda") else None,
        "peak_gpu_mem_gib": fact("peak_gpu_mem_gib", None),
        "otbench_version": __version__, "commit": _git_commit(), "torch": torch.__version__,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def variant(spec: RunSpec, method: Method, task: Task) -> str:
    """A short label of the options that differ from the budget's defaults ('' for defaults)."""
    return options_variant(spec.method, spec.budget, spec.task, method.options, task.options)


# -- run directory bookkeeping --------------------------------------------------------------------
def event(rundir: Path, name: str, **fields: Any) -> None:
    """One runner event in log.jsonl (``fit_start`` marks every training session)."""
    store.append_jsonl(Path(rundir) / LOG_FILE, {"event": name, "time": time.time(), "pid": os.getpid(),
                                                 "host": socket.gethostname(), **fields})


def quarantine(exc: store.CorruptFile, warn: Log, action: str) -> None:
    path = exc.path
    target = path.with_name(path.name + ".corrupt")
    try:
        os.replace(path, target)
    except FileNotFoundError:
        return
    warn(f"warning: {exc}; moved to {target.name}, {action}")
    event(path.parent, "recovered", file=path.name, reason=exc.reason, action=action)


def task_metric_keys(task: str) -> list[Metric]:
    """The metric columns of a task by name ([] when it is not installed here)."""
    try:
        return [m if isinstance(m, Metric) else Metric(m) for m in get_task(task).metrics]
    except BenchError:
        return []


def read_row(rundir: Path) -> dict | None:
    """The row of a finished run checked against its directory (:func:`bench.schema.check_row`), None when there
    is none; :class:`bench.store.CorruptFile` when it is damaged, incomplete or another run's."""
    path = Path(rundir) / ROW_FILE
    return read_row_file(path, schema.run_id(rundir)) if path.exists() else None


def read_row_file(path: Path, rid: schema.RunId | None) -> dict:
    """A row file checked against the run identity ``rid`` (None: a collected copy, checked on its own)."""
    row = store.read_json(path)
    task = rid.task if rid is not None else row.get("task") if isinstance(row, dict) else None
    return schema.check_row(path, row, rid, task_metric_keys(task) if isinstance(task, str) else [])


def finished_row(rundir: Path, warn: Log) -> dict | None:
    """The row of a finished run, or None (a damaged row is moved aside: the run is re-scored)."""
    path = Path(rundir) / ROW_FILE
    try:
        return read_row(rundir)
    except store.CorruptFile as exc:
        quarantine(exc, warn, "scoring the run again")
        return None


def read_failure(rundir: Path) -> dict | None:
    path = Path(rundir) / FAILED_FILE
    if not path.exists():
        return None
    try:
        rec = store.read_json(path)
        return rec if isinstance(rec, dict) else {"error": "failed.json holds no record"}
    except store.CorruptFile as exc:
        return {"error": f"failed.json is unreadable ({exc.reason})"}


def earlier_failure(rec: dict) -> RunFailed:
    exc = RunFailed(rec.get("stage") or "?", rec.get("step"), rec.get("reason") or rec.get("error") or "failed")
    exc.earlier = True
    return exc


def record_failure(rundir: Path, spec: RunSpec, method: Method, task: Task, exc: RunFailed) -> None:
    store.write_json(Path(rundir) / FAILED_FILE, {
        "method": spec.method, "task": spec.task, "seed": spec.seed, "budget": spec.budget,
        "options": method.options, "task_options": task.options,
        "stage": exc.stage, "step": exc.step, "reason": exc.reason, "error": str(exc),
        "failed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "pid": os.getpid(),
        "host": socket.gethostname(), "otbench_version": __version__, "commit": _git_commit()})
    event(rundir, "failed", stage=exc.stage, step=exc.step, error=str(exc))


def _remove(rundir: Path, *names: str) -> None:
    for name in names:
        (Path(rundir) / name).unlink(missing_ok=True)


# -- bench run / bench eval ----------------------------------------------------------------------
def run_one(spec: RunSpec, *, out: Path, data_root: Path, cache_dir: Path, device: str = "auto",
            bf16: bool = False, compile: bool = False, force: bool = False, retry_failed: bool = False,
            wait_locked: bool = False, progress: bool = True, batch_size: int = 500,
            checkpoint_every: float = 120.0, probe_every: int | None = None, probe_n: int = 500,
            log: Log = print, warn: Log | None = None) -> dict[str, Any]:
    """Run ``spec`` to its row (or skip it when finished) under the directory's lock.

    Raises :class:`RunFailed` when the run fails now (``failed.json`` written) or failed before
    (``exc.earlier``; re-run with ``retry_failed``), :class:`bench.locks.RunLocked` when another
    process holds the run and ``wait_locked`` is false.
    """
    warn = warn or log
    method, task = spec.build()
    check_run_settings(device=device, batch_size=batch_size, checkpoint_every=checkpoint_every,
                       probe_every=probe_every, probe_n=probe_n)
    rundir = run_directory(out, spec.task, spec.method, spec.budget, spec.seed, method.options, task.options)

    def settled() -> dict | None:
        if force:
            return None
        row = finished_row(rundir, warn)
        if row is not None:
            log(f"skip {spec.label()}: finished, {rundir / ROW_FILE}")
            return row
        failure = read_failure(rundir)
        if failure is not None and not retry_failed:
            raise earlier_failure(failure)
        return None

    row = settled()
    if row is not None:
        return row
    fresh = not rundir.exists()
    check_writable(rundir)
    with RunLock(rundir, wait=wait_locked):
        row = settled()  # again under the lock: another process may have finished it meanwhile
        if row is not None:
            return row
        store.remove_temporaries(rundir)  # left by a writer killed mid-write; we hold the lock
        if force:
            _remove(rundir, ROW_FILE, SAMPLES_FILE, CHECKPOINT_FILE, FAILED_FILE)
        elif read_failure(rundir) is not None:  # retry_failed: start again from scratch
            _remove(rundir, FAILED_FILE, SAMPLES_FILE, CHECKPOINT_FILE)
            event(rundir, "retry")
        try:
            return _run_locked(spec, rundir, method, task, data_root=data_root, cache_dir=cache_dir,
                               device=device, bf16=bf16, compile=compile, progress=progress,
                               batch_size=batch_size, checkpoint_every=checkpoint_every,
                               probe_every=probe_every, probe_n=probe_n, log=log, warn=warn)
        except RunFailed as exc:
            record_failure(rundir, spec, method, task, exc)
            raise
        except Exception as exc:
            if isinstance(exc, BenchError) and fresh and _only_lock_files(rundir):
                _remove_empty(rundir)  # bad input (data, options) found before any work: no run left
            else:  # a crash is an interruption: the run resumes next time
                event(rundir, "error", error=f"{type(exc).__name__}: {exc}"[:500],
                      traceback=traceback.format_exc()[-4000:])
            raise


def _only_lock_files(rundir: Path) -> bool:
    from .locks import LOCK_FILE, OWNER_FILE
    return all(f.name in (LOCK_FILE, OWNER_FILE) for f in Path(rundir).iterdir())


def _remove_empty(rundir: Path) -> None:
    """Remove a run directory this process created and holds, with nothing in it but its lock, and its method and
    task folders when that leaves them empty (so that `bench status` shows no run that never started)."""
    from .locks import LOCK_FILE, OWNER_FILE
    try:
        (rundir / OWNER_FILE).unlink(missing_ok=True)
        (rundir / LOCK_FILE).unlink(missing_ok=True)
        for d in (rundir, rundir.parent, rundir.parent.parent):
            d.rmdir()
    except OSError:  # not empty (another process started there meanwhile), or already gone
        pass


def check_run_settings(*, device: str = "auto", batch_size: int = 500, checkpoint_every: float = 120.0,
                       probe_every: int | None = None, probe_n: int = 500) -> None:
    """One-line BenchErrors for run settings that would fail (or silently misbehave) after training."""
    pick_device(device)
    for flag, value, low in (("--batch-size", batch_size, 1), ("--probe-n", probe_n, 1),
                             ("--probe-every", 1 if probe_every is None else probe_every, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise BenchError(f"{flag} {value!r}: pass an integer >= {low}")
    if not (isinstance(checkpoint_every, (int, float)) and math.isfinite(checkpoint_every) and checkpoint_every >= 0):
        raise BenchError(f"--checkpoint-every {checkpoint_every!r}: pass a number of seconds >= 0")


def _run_locked(spec: RunSpec, rundir: Path, method: Method, task: Task, *, data_root, cache_dir, device,
                bf16, compile, progress, batch_size, checkpoint_every, log: Log, warn: Log,
                probe_every: int | None = None, probe_n: int = 500) -> dict[str, Any]:
    p = prepare(spec, rundir, method, task, data_root=data_root, device=device, bf16=bf16, compile=compile,
                progress=progress, checkpoint_every=checkpoint_every, check_options=True)
    if probe_every:
        attach_probe(p, probe_every, probe_n, cache_dir=cache_dir, data_root=data_root, batch_size=batch_size)
    fit_from = share_fit(rundir, spec, method, task, bf16=bool(bf16), log=log)
    if fit_from is None and (rundir / CHECKPOINT_FILE).exists():  # resumed: keep what its start recorded
        fit_from = _config_fit_from(rundir)
    config = {"method": spec.method, "task": spec.task, "seed": spec.seed, "budget": spec.budget,
              "options": method.options, "task_options": task.options, "device": str(p.device),
              "bf16": bool(bf16), "compile": bool(compile), "probe_every": probe_every,
              **({"fit_from": fit_from} if fit_from else {})}
    store.write_json(rundir / CONFIG_FILE, config)
    p.run.config = _plain(config)  # every checkpoint records it: config.json can be rebuilt from it
    state = restore(p, warn)
    saved = None
    if state == "corrupt":  # samples came from a model that can no longer be restored
        _remove(rundir, SAMPLES_FILE)
    else:
        saved = load_samples(p, warn)
    try:
        if saved is None:
            saved = fit_and_transport(p, batch_size=batch_size, progress=progress,
                                      resumed=state == "restored", log=log)
        else:
            log(f"re-scoring stored samples in {rundir}")
            check_samples(saved["outputs"])
        scored = score(p, saved["outputs"], cache_dir=cache_dir, data_root=data_root, batch_size=batch_size,
                       progress=progress)
    finally:
        p.run.close()
    row = annotate(p, scored, saved)
    if fit_from:
        row["fit_from"] = fit_from
    save_grid(rundir / "grid.png", p.sources[: len(saved["outputs"])], saved["outputs"], p.data)
    store.write_json(rundir / ROW_FILE, row)
    event(rundir, "done")
    log(f"done {spec.label()}: " + ", ".join(f"{k}={_fmt(row.get(k))}" for k in task.metrics if k in row))
    return row


def _config_fit_from(rundir: Path) -> str | None:
    """The sibling whose fit this run shares, as recorded when it was started (None if it trained itself)."""
    try:
        config = schema.check_config(rundir / CONFIG_FILE, store.read_json(rundir / CONFIG_FILE), schema.run_id(rundir))
        return config["fit_from"] if isinstance(config.get("fit_from"), str) else None
    except (store.CorruptFile, FileNotFoundError):
        return None


def share_fit(rundir: Path, spec: RunSpec, method: Method, task: Task, *, bf16: bool, log: Log = print) -> str | None:
    """Start a new run from a finished sibling's final checkpoint when the two differ only in options declared
    ``sampling=True`` (they act only in ``transport``): e.g. OTCS re-sampled with another guidance weight.

    The sibling must be a finished run (``row.json``) of the same method, task, budget and seed, with equal task
    options and bf16 setting; its checkpoint is hard-linked (copied across file systems) into ``rundir``, which
    then restores it as a completed fit and only transports.  Returns the sibling's directory name, or None.
    """
    if (rundir / CHECKPOINT_FILE).exists() or (rundir / SAMPLES_FILE).exists():
        return None
    transport_only = sampling_names(type(method).default_options)
    if not transport_only:
        return None
    mine = _plain({k: v for k, v in method.options.items() if k not in transport_only})
    for sib in sorted(rundir.parent.glob(f"{spec.budget}-seed{spec.seed}-*")):
        if sib == rundir or not all((sib / f).exists() for f in (ROW_FILE, CHECKPOINT_FILE, CONFIG_FILE)):
            continue
        try:
            cfg = schema.check_config(sib / CONFIG_FILE, store.read_json(sib / CONFIG_FILE), schema.run_id(sib))
        except store.CorruptFile:
            continue
        theirs = _plain({k: v for k, v in (cfg.get("options") or {}).items() if k not in transport_only})
        if theirs != mine or _plain(cfg.get("task_options") or {}) != _plain(task.options) \
                or bool(cfg.get("bf16")) != bf16 or cfg.get("fit_from"):
            continue
        rundir.mkdir(parents=True, exist_ok=True)
        tmp = rundir / f".{CHECKPOINT_FILE}.shared.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(sib / CHECKPOINT_FILE, tmp)  # checkpoints are replaced, never rewritten in place: a link is safe
        except OSError:
            import shutil
            shutil.copyfile(sib / CHECKPOINT_FILE, tmp)
        os.replace(tmp, rundir / CHECKPOINT_FILE)
        differ = {k: v for k, v in method.options.items()
                  if k in transport_only and _plain(v) != _plain((cfg.get("options") or {}).get(k))}
        log(f"{spec.label()}: sharing the fit of {sib} (differs only in transport-only options "
            f"{', '.join(f'{k}={v}' for k, v in differ.items()) or 'none'}); transporting only")
        event(rundir, "fit_shared", source=sib.name)
        return sib.name
    return None


RUN_DIR_HINT = (f"pass a run directory under your --out tree (one with {CONFIG_FILE} and {SAMPLES_FILE}), "
                f"e.g. runs/digits/identity/smoke-seed0-1a2b3c4d")


def read_config(rundir: Path, warn: Log | None = None) -> dict:
    """A run's config.json, checked against its directory (:func:`bench.schema.check_config`).

    When it is damaged, or was edited after the run (its options no longer hash to the directory's digest), the
    copy that row.json or checkpoint.pt records and that does agree is used, and written back with a one-line
    warning; a one-line BenchError naming the file and the fix when no copy agrees."""
    rundir = Path(rundir)
    path = rundir / CONFIG_FILE
    if not path.exists():
        raise BenchError(f"{rundir} is not a run directory (no {CONFIG_FILE}); {RUN_DIR_HINT}")
    rid = schema.run_id(rundir)
    try:
        return schema.check_config(path, store.read_json(path), rid)
    except store.CorruptFile as exc:
        problem = exc
    for name in (ROW_FILE, CHECKPOINT_FILE):
        if not (rundir / name).exists():
            continue
        try:
            found = store.read_json(rundir / name) if name == ROW_FILE else store.torch_load(rundir / name)
            found = found.get("config") if name == CHECKPOINT_FILE and isinstance(found, dict) else found
            config = {k: v for k, v in schema.check_config(rundir / name, found, rid).items()
                      if k in ("method", "task", "seed", "budget", "options", "task_options", "fit_from")}
        except store.CorruptFile:
            continue
        (warn or print)(f"warning: {problem}; using the run's options as {name} records them, written back to "
                        f"{CONFIG_FILE}")
        store.write_json(path, config)
        return config
    digest = f" (they hash to {rid.digest})" if rid is not None and rid.digest else ""
    raise BenchError(f"{problem}, and neither {ROW_FILE} nor {CHECKPOINT_FILE} records the run's options; restore it "
                     f"from a copy, or start the run again with `bench run` and the options it was made with{digest}")


def read_spec(rundir: Path, warn: Log | None = None) -> RunSpec:
    """The RunSpec a run directory was made from (:func:`read_config`); a one-line error if it has none."""
    c = read_config(rundir, warn)
    return RunSpec(c["method"], c["task"], c["seed"], c["budget"], dict(c["options"]), dict(c["task_options"]))


def rerun_command(spec: RunSpec, rundir: Path, *, force: bool = False) -> str:
    """The `bench run` command line of this run: its options that differ from today's defaults as --opt, its
    --out, and ``--force`` (which trains it again from scratch) when asked."""
    import shlex

    def arg(key: str, value: Any) -> str:
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        if isinstance(value, str):
            try:
                json.loads(value)
                text = json.dumps(value)  # "1" or "true" as a string: quoted, or --opt would read a number
            except ValueError:
                pass
        return f"{key}={text}"

    base = _plain(get_method(spec.method).resolve_options(spec.budget, {}))
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


def load_run(rundir: Path, *, data_root: Path, device: str = "cpu") -> Prepared:
    """A trained run's method, set up on its task's data with the run's own options and restored from its
    checkpoint: for scripts that inspect or re-sample a run.  A one-line error when there is no checkpoint."""
    rundir = Path(rundir)
    spec = read_spec(rundir)
    method, task = spec.build()
    p = prepare(spec, rundir, method, task, data_root=data_root, device=device, progress=False)
    if not p.run.restore():
        raise BenchError(f"{rundir} has no {CHECKPOINT_FILE}; run `bench run` to train it first")
    return p


def evaluate_dir(rundir: Path, *, data_root: Path, cache_dir: Path, device: str = "auto",
                 batch_size: int = 500, progress: bool = True, log: Log = print,
                 warn: Log | None = None) -> dict[str, Any]:
    """Recompute a finished run's metrics from its stored samples (``bench eval``) and rewrite its row.

    Unreadable samples are transported again from the final checkpoint; an unreadable
    checkpoint or config is a one-line error naming the file.
    """
    warn = warn or log
    rundir = Path(rundir)
    spec = read_spec(rundir, warn)
    method, task = spec.build()
    old_row = finished_row(rundir, warn) or {}
    has_samples = (rundir / SAMPLES_FILE).exists()
    if not has_samples and not (old_row and (rundir / CHECKPOINT_FILE).exists()):
        raise BenchError(f"{rundir} is not a finished run (no {SAMPLES_FILE}); finish it with "
                         f"`{rerun_command(spec, rundir)}`, or {RUN_DIR_HINT}")
    with RunLock(rundir, wait=False):
        p = prepare(spec, rundir, method, task, data_root=data_root, device=device, progress=progress)
        try:
            restored = False
            if (rundir / CHECKPOINT_FILE).exists():
                try:
                    restored = p.run.restore()
                except store.CorruptFile as exc:
                    raise BenchError(f"{exc}; train the run again with "
                                     f"`{rerun_command(spec, rundir, force=True)}`") from None
            saved = load_samples(p, warn)
            if saved is None:  # a finished run's checkpoint is its final state: transport again
                if not (old_row and restored):
                    raise BenchError(f"{rundir / SAMPLES_FILE} is unusable and the run never finished; finish it "
                                     f"with `{rerun_command(spec, rundir)}`")
                saved = transport_and_store(p, dict(old_row.get("timings") or {}), batch_size=batch_size,
                                            progress=progress)
            check_samples(saved["outputs"])
            scored = score(p, saved["outputs"], cache_dir=cache_dir, data_root=data_root,
                           batch_size=batch_size, progress=progress)
        finally:
            p.run.close()
        row = annotate(p, scored, saved, fallback=old_row)
        store.write_json(rundir / ROW_FILE, row)
        event(rundir, "rescored")
    return row


# -- bench status ---------------------------------------------------------------------------------
def find_runs(out: Path, task: str, *, budget: str | None = None,
              seeds: list[int] | None = None) -> list[tuple[str, int, str, Path]]:
    """(method, seed, budget, directory) of every run directory of ``task`` under ``out``."""
    found = []
    for d in sorted(Path(out, task).glob("*/*")):
        m = schema.RUN_NAME.match(d.name)
        if not d.is_dir() or not m:
            continue
        if budget is not None and m["budget"] != budget:
            continue
        if seeds is not None and int(m["seed"]) not in seeds:
            continue
        found.append((d.parent.name, int(m["seed"]), m["budget"], d))
    return found


def _position(records: list[dict]) -> str:
    """Where a run is, from its log: the last training line, or the runner step after fitting."""
    where = ""
    for rec in records:
        if "event" in rec:
            where = {"fit_done": "transporting", "samples_stored": "scoring",
                     "fit_start": where or "starting"}.get(rec["event"], where)
        elif "stage" in rec and "step" in rec:
            where = f"{rec['stage']} step {rec['step']}"
    return where


def run_state(rundir: Path) -> tuple[str, str]:
    """``(state, detail)``: done / running / interrupted / failed / not started, with one line of detail."""
    from .locks import describe_owner, holder

    rundir = Path(rundir)
    if not rundir.is_dir():
        return "not started", ""
    records = store.read_jsonl(rundir / LOG_FILE)
    owner = holder(rundir)
    if owner is not None:
        where = _position(records)
        return "running", f"{describe_owner(owner)}" + (f", at {where}" if where else "")
    try:
        row = read_row(rundir)
        if row is not None:
            shown = [f"{k}={row[k]:.4g}" for k in map(str, task_metric_keys(row["task"]))
                     if isinstance(row.get(k), (int, float))]
            return "done", ", ".join(shown[:4])
    except store.CorruptFile as exc:
        return "interrupted", (f"{exc.path.name} is unusable ({exc.reason[:120]}); `bench eval` on this directory "
                               f"scores the run again")
    failure = read_failure(rundir)
    if failure is not None:
        return "failed", str(earlier_failure(failure))
    if any((rundir / f).exists() for f in (CHECKPOINT_FILE, SAMPLES_FILE, CONFIG_FILE)) or records:
        where = _position(records)
        detail = (f"at {where}; " if where else "") + "`bench run` resumes it"
        last_start = max((i for i, r in enumerate(records) if r.get("event") == "fit_start"), default=-1)
        errors = [r for r in records[last_start + 1:] if r.get("event") == "error"]
        if errors:
            detail += f" (last error: {errors[-1].get('error', '?')[:160]})"
        return "interrupted", detail
    return "not started", ""


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)
