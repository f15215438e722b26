"""What the harness reads back, checked on read: run identity, rows, configs, samples, checkpoints.

A run directory ``OUT/<task>/<method>/<budget>-seed<seed>-<digest>`` proves the run's identity: its
path names the task, method, budget and seed, and ``digest`` is taken over the resolved options
(:func:`options_digest`).  Every file inside it (``row.json``, ``config.json``, ``checkpoint.pt``,
``samples.pt``) can be edited or damaged, so a reader checks it against that identity and against
the shape the harness wrote, and raises :class:`~bench.store.CorruptFile` naming the file; the
runner turns that into a recovery (re-score, re-transport, retrain), the table and ``bench eval``
into a one-line error that names the fix.  A field of a file is never trusted over the path.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from .budgets import BUDGET_NAMES
from .store import CorruptFile

def _bad(path: Path, reason: str) -> CorruptFile:
    """A file that reads but breaks the schema: a CorruptFile worded "unusable"."""
    return CorruptFile(path, reason, "unusable")


RUN_NAME = re.compile(r"^(?P<budget>[A-Za-z0-9_]+)-seed(?P<seed>\d+)(?:-(?P<digest>[0-9a-f]{8}))?$")
# a method or task name as a table or a path may show it: no separators, spaces or newlines
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


def options_digest(method_options: dict[str, Any], task_options: dict[str, Any]) -> str:
    """8 hex digits of the resolved options: equal digests = the same computation."""
    blob = json.dumps({"method": method_options, "task": task_options}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class RunId:
    """What a run directory's path proves."""

    task: str
    method: str
    budget: str
    seed: int
    digest: str | None  # None: a directory named before options were hashed (nothing to check against)


def run_id(rundir: Path) -> RunId | None:
    """The identity in ``rundir``'s path; None when it is not ``<task>/<method>/<budget>-seed<N>[-<digest>]``."""
    rundir = Path(rundir)
    m = RUN_NAME.match(rundir.name)
    method, task = rundir.parent.name, rundir.parent.parent.name
    if not m or m["budget"] not in BUDGET_NAMES or not NAME.match(method) or not NAME.match(task):
        return None
    return RunId(task, method, m["budget"], int(m["seed"]), m["digest"])


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _identity(path: Path, obj: Any, rid: RunId | None) -> dict:
    """The common part of a row, config or failure record: a JSON object whose identity fields have the right
    types and agree with the directory's path, and whose options hash to its digest."""
    if not isinstance(obj, dict):
        raise _bad(path, f"not a JSON object but {type(obj).__name__}")
    for key, kind in (("method", str), ("task", str), ("budget", str), ("options", dict), ("task_options", dict)):
        if kind is dict and rid is None and key not in obj:  # a collected row copy may predate recorded options
            continue
        if not isinstance(obj.get(key), kind):
            raise _bad(path, f"'{key}' is {'missing' if key not in obj else repr(obj[key])[:40]}, "
                                    f"not a {'JSON object' if kind is dict else 'string'}")
    if not _is_int(obj.get("seed")) or obj["seed"] < 0:
        raise _bad(path, f"'seed' is {obj.get('seed', 'missing')!r}, not an integer >= 0")
    if obj["budget"] not in BUDGET_NAMES:
        raise _bad(path, f"'budget' {obj['budget']!r} is not one of {', '.join(BUDGET_NAMES)}")
    for key in ("method", "task"):
        if not NAME.match(obj[key]):
            raise _bad(path, f"'{key}' {obj[key][:40]!r} is not a {key} name")
    if rid is not None:
        for key in ("task", "method", "budget", "seed"):
            if obj[key] != getattr(rid, key):
                raise _bad(path, f"its {key} {obj[key]!r} is not its run directory's {getattr(rid, key)!r}")
        if rid.digest and options_digest(obj["options"], obj["task_options"]) != rid.digest:
            raise _bad(path, f"its options are not the ones its run directory was made for (they hash to "
                                    f"{options_digest(obj['options'], obj['task_options'])}, the directory to "
                                    f"{rid.digest}): edited after the run?")
    return obj


def check_config(path: Path, obj: Any, rid: RunId | None) -> dict:
    """A ``config.json`` (or the copy a checkpoint records): identity, options and run settings."""
    return _identity(path, obj, rid)


def check_row(path: Path, obj: Any, rid: RunId | None, metrics: Iterable[Any] = ()) -> dict:
    """A ``row.json``: identity (agreeing with ``rid``), a family, and the task's ``metrics``: each present one
    a finite number (or null) in its range, and at least one of them present.  A collected copy (``rid`` None)
    may lack the options and family that early rows did not record."""
    row = _identity(path, obj, rid)
    if not isinstance(row.get("family", "" if rid is None else None), str):
        raise _bad(path, f"'family' is {row.get('family', 'missing')!r}: not a complete result row")
    metrics = list(metrics)
    found = 0
    for m in metrics:
        value = row.get(str(m))
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _bad(path, f"metric {m} is {value!r}, not a finite number")
        lo, hi = getattr(m, "bounds", (-math.inf, math.inf))  # a Metric declares them; a bare key has none
        if not lo <= value <= hi:
            raise _bad(path, f"metric {m}={value:.6g} is outside its range [{lo:g}, {hi:g}]")
        found += 1
    if metrics and not found:
        raise _bad(path, f"it holds none of the task's metrics ({', '.join(map(str, metrics))})")
    return row


def check_samples(path: Path, obj: Any, n_max: int, shape: tuple[int, ...]) -> dict:
    """A ``samples.pt``: ``outputs``, a float tensor of 1..``n_max`` samples of ``shape``, and ``n`` agreeing."""
    if not isinstance(obj, dict) or not isinstance(obj.get("outputs"), torch.Tensor):
        raise _bad(path, "it holds no 'outputs' tensor")
    out = obj["outputs"]
    if not out.is_floating_point():
        raise _bad(path, f"its outputs are {out.dtype}, not floating point")
    if tuple(out.shape[1:]) != tuple(shape) or out.dim() < 2:
        raise _bad(path, f"its outputs have shape {tuple(out.shape)}, not (N, {', '.join(map(str, shape))})")
    if not 1 <= len(out) <= n_max:
        raise _bad(path, f"it holds {len(out)} samples, not 1 to {n_max}")
    if "n" in obj and obj["n"] != len(out):
        raise _bad(path, f"its 'n' ({obj['n']!r}) is not its number of outputs ({len(out)})")
    for key in ("timings", "facts"):
        if not isinstance(obj.get(key, {}), dict):
            raise _bad(path, f"its '{key}' is not a dict")
    return obj


def check_checkpoint(path: Path, obj: Any) -> dict:
    """A ``checkpoint.pt``: the method's state, each loop's completed steps, timings and random streams."""
    if not isinstance(obj, dict) or not isinstance(obj.get("method"), dict):
        raise _bad(path, "it holds no method state")
    progress = obj.get("progress")
    if not isinstance(progress, dict) or not all(isinstance(k, str) and _is_int(v) and v >= 0
                                                 for k, v in progress.items()):
        raise _bad(path, "its 'progress' is not {loop: completed steps}")
    if not isinstance(obj.get("timings", {}), dict) or not isinstance(obj.get("streams", {}), dict):
        raise _bad(path, "its timings or random streams are not dicts")
    fit = obj.get("fit_seconds", 0.0)
    if isinstance(fit, bool) or not isinstance(fit, (int, float)) or not math.isfinite(fit) or fit < 0:
        raise _bad(path, f"its 'fit_seconds' is {fit!r}")
    return obj
