"""A run directory on disk: its files, how each is read and checked, its events, and its state.

``OUT/<task>/<method>/<budget>-seed<seed>-<hash>/`` holds ``config.json``, ``checkpoint.pt`` (during and after
fit), ``samples.pt`` (transported test sources), ``log.jsonl`` (training scalars and the runner's events),
``grid.png`` and, last, ``row.json``; or, instead of the row, ``failed.json``.  Every file is checked on read
against the directory's identity and its schema (:mod:`bench.schema`); a damaged one is moved aside
(:func:`quarantine`) so that the runner can rebuild it.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

from . import __version__, schema, store
from .api import BenchError, Metric, Method, Task
from .errors import RunFailed
from .host import git_commit
from .locks import LOCK_FILE, OWNER_FILE, RunLock, describe_owner, holder
from .options import upgrade
from .registry import get_method, get_task
from .spec import RunSpec, run_directory

ROW_FILE = "row.json"
FAILED_FILE = "failed.json"
SAMPLES_FILE = "samples.pt"
CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"

Log = Callable[[str], Any]


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
        "host": socket.gethostname(), "otbench_version": __version__, "commit": git_commit()})
    event(rundir, "failed", stage=exc.stage, step=exc.step, error=str(exc))


def remove_files(rundir: Path, *names: str) -> None:
    for name in names:
        (Path(rundir) / name).unlink(missing_ok=True)


def only_lock_files(rundir: Path) -> bool:
    return all(f.name in (LOCK_FILE, OWNER_FILE) for f in Path(rundir).iterdir())


def remove_empty(rundir: Path) -> None:
    """Remove a run directory this process created and holds, with nothing in it but its lock, and its method and
    task folders when that leaves them empty (so that `bench status` shows no run that never started)."""
    try:
        (rundir / OWNER_FILE).unlink(missing_ok=True)
        (rundir / LOCK_FILE).unlink(missing_ok=True)
        for d in (rundir, rundir.parent, rundir.parent.parent):
            d.rmdir()
    except OSError:  # not empty (another process started there meanwhile), or already gone
        pass


def config_fit_from(rundir: Path) -> str | None:
    """The sibling whose fit this run shares, as recorded when it was started (None if it trained itself)."""
    try:
        config = schema.check_config(rundir / CONFIG_FILE, store.read_json(rundir / CONFIG_FILE), schema.run_id(rundir))
        return config["fit_from"] if isinstance(config.get("fit_from"), str) else None
    except (store.CorruptFile, FileNotFoundError):
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


# -- run directories made under former option names ---------------------------------------------------
def upgrade_run(rundir: Path) -> Path | None:
    """Move a run directory made under former option names (``Method.renamed_options``, ``toy_X`` twins) to
    the directory today's names hash to, with its config.json, row.json, failed.json and the checkpoint's copy
    of the config rewritten in today's names, so that `bench run` resumes or skips it instead of training it
    again.  Returns the new directory, or None when nothing was to do.  Holds the run's lock while it works
    (RunLocked when another process holds it); refuses (BenchError) when the new directory exists already."""
    rundir = Path(rundir)
    config = store.read_json(rundir / CONFIG_FILE)
    cls, kind = get_method(config["method"]), get_task(config["task"]).kind
    options = upgrade(cls.default_options, config["options"], kind, cls.renamed_options)
    if options == config["options"]:
        return None
    target = run_directory(rundir.parent.parent.parent, config["task"], config["method"], config["budget"],
                           config["seed"], options, config.get("task_options", {}))
    if target.exists():
        raise BenchError(f"{rundir} upgrades to {target}, which exists already: keep one of the two and remove "
                         f"the other, then run `bench upgrade` again")
    with RunLock(rundir):
        for name in (CONFIG_FILE, ROW_FILE, FAILED_FILE):
            path = rundir / name
            if path.exists():
                obj = store.read_json(path)
                if isinstance(obj, dict) and isinstance(obj.get("options"), dict):
                    store.write_json(path, {**obj, "options": upgrade(cls.default_options, obj["options"], kind,
                                                                      cls.renamed_options)})
        if (rundir / CHECKPOINT_FILE).exists():
            ckpt = store.torch_load(rundir / CHECKPOINT_FILE)
            if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict):
                ckpt["config"] = {**ckpt["config"], "options": options}
                store.torch_save(rundir / CHECKPOINT_FILE, ckpt)
    os.replace(rundir, target)
    event(target, "upgraded", former=rundir.name)
    return target

