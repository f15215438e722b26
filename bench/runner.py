"""Execute one run: one (method, task, seed, budget), resumable, locked, skippable.

One path serves ``bench run`` and ``bench eval``:

1. :func:`prepare`  load the task's data, build and set up the method, make its :class:`~bench.context.FitContext`;
2. :func:`fit_and_transport`  train (resuming at the last checkpoint) and transport the test
   sources, stored as ``samples.pt``;
3. :func:`score`  the task's metrics (plus the method's bound terms), checked against their declared bounds;
4. :func:`annotate`  the row: what ran, where, how long, which code.

States of a run directory (:mod:`bench.rundir`): ``row.json`` readable = finished (skipped); ``failed.json`` =
failed (a NaN/inf loss, non-finite samples or an impossible metric; reported and skipped unless
``retry_failed``, which starts it again from scratch); anything else = resumable.  A damaged or unusable file
is moved aside with a one-line warning and rebuilt: a checkpoint by training from scratch, samples by
transporting again from the checkpoint, a row by re-scoring, a config from the copy the row or checkpoint
records.  Bad input found before any work (data, options, device) leaves no run directory behind.  Every step
runs under the directory's lock (:mod:`bench.locks`), so two processes never work on one run.
"""
from __future__ import annotations

import math
import os
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import __version__, schema, store
from .api import BenchError, EvalContext, Metric, Method, Task, TaskData
from .budgets import Budget
from .context import FitContext, pick_device, seed_everything
from .data import cache_dir as default_cache_dir
from .errors import RunFailed
from .host import device_name, git_commit, sync
from .locks import RunLock
from .options import sampling_names
from .plots import save_grid
from .registry import _plain
from .rundir import (CHECKPOINT_FILE, CONFIG_FILE, FAILED_FILE, ROW_FILE, SAMPLES_FILE, Log, check_writable,
                     config_fit_from, earlier_failure, event, finished_row, only_lock_files, quarantine,
                     read_failure, read_spec, record_failure, remove_empty, remove_files)
from .rundir import RUN_DIR_HINT
from .spec import RunSpec, Settings, rerun_command, run_directory, variant


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


def check_metrics(task: Task, metrics: dict[str, Any]) -> None:
    """Raise :class:`RunFailed` (stage ``score``) for a metric that is not a finite number in range."""
    for m in task.metrics:
        m = m if isinstance(m, Metric) else Metric(m)
        if metrics.get(str(m)) is None:
            continue
        value = metrics[str(m)]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RunFailed("score", None, f"metric {m}={value!r} is not a number")
        lo, hi = m.bounds
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


@dataclass
class Prepared:
    """Everything a run's later steps need, built once by :func:`prepare`."""

    spec: RunSpec
    rundir: Path
    task: Task
    method: Method
    data: TaskData
    run: FitContext
    device: torch.device
    sources: torch.Tensor
    labels: torch.Tensor | None
    settings: Settings


def prepare(spec: RunSpec, rundir: Path, method: Method, task: Task, settings: Settings) -> Prepared:
    """Load the data, check the setting (and that the data is the kind of task, image or vector, whose option
    values the method resolved), set the method up on its device (no training)."""
    dev = pick_device(settings.device)
    seed_everything(spec.seed)
    data = task.load(settings.data_root, spec.seed, budget=spec.budget)
    if data.kind != task.kind:
        raise BenchError(f"task {spec.task!r} declares kind {task.kind!r} but its data is {data.kind} data: "
                         f"set its class attribute kind = {data.kind!r}")
    method.check_setting(data)
    bf16, compile = settings.bf16, settings.compile
    run = FitContext(rundir, device=dev, seed=spec.seed, budget=Budget(spec.budget), bf16=bf16, compile=compile,
                     checkpoint_every=settings.checkpoint_every, progress=settings.progress)
    n_eval = task.eval_sizes.get(spec.budget)
    sources = data.source_test if n_eval is None else data.source_test[:n_eval]
    labels = None if data.source_test_labels is None else data.source_test_labels[: len(sources)]
    p = Prepared(spec, Path(rundir), task, method, data, run, dev, sources, labels, settings)
    set_up(p, method)
    return p


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


def attach_probe(p: Prepared) -> None:
    """A learning curve: every ``--probe-every`` steps of the method's ``probe_loop``, transport a fixed subset of
    ``--probe-n`` evaluation sources (``probe_indices``: class-balanced when labels are known; own random stream) and
    log the task's ``probe`` metrics as stage "probe" of log.jsonl.  Training is not changed by it: the probe
    draws no number from the training streams, and its time is kept out of the loop's timing."""
    every, n = p.settings.probe_every, p.settings.probe_n
    if not every or not p.method.probe_loop:
        return
    idx, subset = probe_indices(len(p.sources), n, p.labels)
    src = p.sources[idx]
    lab = None if p.labels is None else p.labels[idx]
    ctx = EvalContext(cache_dir=p.settings.cache_dir, device=p.device, budget=p.run.budget, seed=p.spec.seed,
                      method=p.method, data_root=p.settings.data_root)

    def probe(loop: str, step: int) -> None:
        out = transport_all(p.method, src, p.device, p.settings.batch_size, p.spec.seed + 2, progress=False)
        values = p.task.probe(p.data, src, out, lab, ctx)
        if values is not None:
            p.run.log("probe", step, loop=loop, subset=subset, **values)

    p.run.probe, p.run.probe_loops = probe, {p.method.probe_loop: int(every)}


def restore(p: Prepared, warn: Log) -> str:
    """Load the last checkpoint: 'restored', 'none', or 'corrupt' (moved aside with a warning)."""
    try:
        return "restored" if p.run.restore() else "none"
    except store.CorruptFile as exc:
        quarantine(exc, warn, "training again from scratch")
        set_up(p, type(p.method)(budget=p.spec.budget, kind=p.method.kind, **p.method.given_options))
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


def fit_and_transport(p: Prepared, *, resumed: bool = False, log: Log = print) -> dict[str, Any]:
    """Train (continuing from the restored checkpoint), checkpoint, then transport and store."""
    if resumed:
        log(f"resuming {p.spec.label()} from {p.rundir / CHECKPOINT_FILE} ({p.run.progress})")
    event(p.rundir, "fit_start", resume=dict(p.run.progress))
    sync(p.device)
    p.run.start_fit_clock()
    p.method.fit(p.data, p.run)
    sync(p.device)
    fit_s = p.run.fit_seconds()
    p.run.checkpoint()
    event(p.rundir, "fit_done", fit_s=round(fit_s, 3))
    return transport_and_store(p, {**p.run.timings, "fit_s": fit_s})


def transport_and_store(p: Prepared, timings: dict[str, float]) -> dict[str, Any]:
    t0 = time.perf_counter()
    outputs = transport_all(p.method, p.sources, p.device, p.settings.batch_size, p.spec.seed, p.settings.progress)
    sync(p.device)
    check_samples(outputs)
    peak = torch.cuda.max_memory_allocated(p.device) / 2**30 if p.device.type == "cuda" else None
    saved = {"outputs": outputs, "n": len(outputs),
             "timings": {**timings, "transport_s": time.perf_counter() - t0},
             "facts": {"device": str(p.device), "device_name": device_name(p.device), "bf16": p.run.bf16,
                       "compile": p.run.compile, "peak_gpu_mem_gib": None if peak is None else round(peak, 3)}}
    store.torch_save(p.rundir / SAMPLES_FILE, saved)
    event(p.rundir, "samples_stored", n=len(outputs))
    return saved


def score(p: Prepared, outputs: torch.Tensor) -> dict[str, Any]:
    """The task's metrics on ``outputs`` and the method's bound terms; RunFailed when impossible."""
    sources = p.sources[: len(outputs)]
    labels = None if p.labels is None else p.labels[: len(outputs)]

    def extra_transport(x: torch.Tensor) -> torch.Tensor:
        return transport_all(p.method, x, p.device, p.settings.batch_size, p.spec.seed + 1, progress=False)

    ctx = EvalContext(cache_dir=p.settings.cache_dir, device=p.device, budget=p.run.budget, seed=p.spec.seed,
                      method=p.method, transport=extra_transport, data_root=p.settings.data_root)
    t0 = time.perf_counter()
    metrics = p.task.evaluate(p.data, sources, outputs, labels, ctx)
    eval_s = time.perf_counter() - t0
    check_metrics(p.task, metrics)
    bounds = p.method.diagnostics() or {}
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
        "device": device, "device_name": fact("device_name", device_name(p.device)),
        "bf16": bool(fact("bf16", p.run.bf16)),
        "gpu_minutes": round((fit_s + transport_s) / 60, 3) if str(device).startswith("cuda") else None,
        "peak_gpu_mem_gib": fact("peak_gpu_mem_gib", None),
        "otbench_version": __version__, "commit": git_commit(), "torch": torch.__version__,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def run_one(spec: RunSpec, settings: Settings, *, log: Log = print, warn: Log | None = None) -> dict[str, Any]:
    """Run ``spec`` to its row (or skip it when finished) under the directory's lock.

    Raises :class:`RunFailed` when the run fails now (``failed.json`` written) or failed before
    (``exc.earlier``; re-run with ``settings.retry_failed``), :class:`bench.locks.RunLocked` when another
    process holds the run and ``settings.wait_locked`` is false.
    """
    warn = warn or log
    method, task = spec.build()
    settings.check()
    force = settings.force
    rundir = run_directory(settings.out, spec.task, spec.method, spec.budget, spec.seed, method.options, task.options)

    def settled() -> dict | None:
        if force:
            return None
        row = finished_row(rundir, warn)
        if row is not None:
            log(f"skip {spec.label()}: finished, {rundir / ROW_FILE}")
            return row
        failure = read_failure(rundir)
        if failure is not None and not settings.retry_failed:
            raise earlier_failure(failure)
        return None

    row = settled()
    if row is not None:
        return row
    fresh = not rundir.exists()
    check_writable(rundir)
    with RunLock(rundir, wait=settings.wait_locked):
        row = settled()  # again under the lock: another process may have finished it meanwhile
        if row is not None:
            return row
        store.remove_temporaries(rundir)  # left by a writer killed mid-write; we hold the lock
        if force:
            remove_files(rundir, ROW_FILE, SAMPLES_FILE, CHECKPOINT_FILE, FAILED_FILE)
        elif read_failure(rundir) is not None:  # retry_failed: start again from scratch
            remove_files(rundir, FAILED_FILE, SAMPLES_FILE, CHECKPOINT_FILE)
            event(rundir, "retry")
        try:
            return _run_locked(spec, rundir, method, task, settings, log=log, warn=warn)
        except RunFailed as exc:
            record_failure(rundir, spec, method, task, exc)
            raise
        except Exception as exc:
            if isinstance(exc, BenchError) and fresh and only_lock_files(rundir):
                remove_empty(rundir)  # bad input (data, options) found before any work: no run left
            else:  # a crash is an interruption: the run resumes next time
                event(rundir, "error", error=f"{type(exc).__name__}: {exc}"[:500],
                      traceback=traceback.format_exc()[-4000:])
            raise


def _run_locked(spec: RunSpec, rundir: Path, method: Method, task: Task, settings: Settings, *, log: Log,
                warn: Log) -> dict[str, Any]:
    p = prepare(spec, rundir, method, task, settings)
    attach_probe(p)
    bf16, compile = bool(settings.bf16), bool(settings.compile)
    fit_from = share_fit(rundir, spec, method, task, bf16=bf16, log=log)
    if fit_from is None and (rundir / CHECKPOINT_FILE).exists():  # resumed: keep what its start recorded
        fit_from = config_fit_from(rundir)
    config = {"method": spec.method, "task": spec.task, "seed": spec.seed, "budget": spec.budget,
              "options": method.options, "task_options": task.options, "device": str(p.device),
              "bf16": bf16, "compile": compile, "probe_every": settings.probe_every,
              **({"fit_from": fit_from} if fit_from else {})}
    store.write_json(rundir / CONFIG_FILE, config)
    p.run.config = _plain(config)  # every checkpoint records it: config.json can be rebuilt from it
    state = restore(p, warn)
    saved = None
    if state == "corrupt":  # samples came from a model that can no longer be restored
        remove_files(rundir, SAMPLES_FILE)
    else:
        saved = load_samples(p, warn)
    try:
        if saved is None:
            saved = fit_and_transport(p, resumed=state == "restored", log=log)
        else:
            log(f"re-scoring stored samples in {rundir}")
            check_samples(saved["outputs"])
        scored = score(p, saved["outputs"])
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
            shutil.copyfile(sib / CHECKPOINT_FILE, tmp)
        os.replace(tmp, rundir / CHECKPOINT_FILE)
        differ = {k: v for k, v in method.options.items()
                  if k in transport_only and _plain(v) != _plain((cfg.get("options") or {}).get(k))}
        log(f"{spec.label()}: sharing the fit of {sib} (differs only in transport-only options "
            f"{', '.join(f'{k}={v}' for k, v in differ.items()) or 'none'}); transporting only")
        event(rundir, "fit_shared", source=sib.name)
        return sib.name
    return None


def load_run(rundir: Path, *, data_root: Path, device: str = "cpu") -> Prepared:
    """A trained run's method, set up on its task's data with the run's own options and restored from its
    checkpoint: for scripts that inspect or re-sample a run.  A one-line error when there is no checkpoint."""
    rundir = Path(rundir)
    spec = read_spec(rundir)
    method, task = spec.build()
    settings = Settings(out=rundir.parent.parent.parent, data_root=data_root, cache_dir=default_cache_dir(),
                        device=device, progress=False)
    p = prepare(spec, rundir, method, task, settings)
    if not p.run.restore():
        raise BenchError(f"{rundir} has no {CHECKPOINT_FILE}; run `bench run` to train it first")
    return p


def evaluate_dir(rundir: Path, settings: Settings, *, log: Log = print, warn: Log | None = None) -> dict[str, Any]:
    """Recompute a finished run's metrics from its stored samples (``bench eval``) and rewrite its row.

    ``settings.out`` is ignored (the row stays in ``rundir``).  Unreadable samples are transported again from the
    final checkpoint; an unreadable checkpoint or config is a one-line error naming the file.
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
        p = prepare(spec, rundir, method, task, settings)
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
                saved = transport_and_store(p, dict(old_row.get("timings") or {}))
            check_samples(saved["outputs"])
            scored = score(p, saved["outputs"])
        finally:
            p.run.close()
        row = annotate(p, scored, saved, fallback=old_row)
        store.write_json(rundir / ROW_FILE, row)
        event(rundir, "rescored")
    return row


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)
