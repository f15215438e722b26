"""Files of a run: atomic writes, safe reads, and one-line errors for damaged files.

Every file is written to a temporary name in the same directory, fsynced and renamed, so a killed
process leaves either the old file or the new one, never half of one.  Reads never execute code:
``torch_load`` uses ``weights_only=True`` (tensors, dicts, lists, python scalars, optimizer state
dicts and generator states load; an arbitrary pickled object is refused), and a file that cannot
be read (truncated, malformed, crafted) raises :class:`CorruptFile`, a one-line ``BenchError``
that names the file, which the runner turns into a recovery (re-train, re-transport, re-score).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import BenchError


class CorruptFile(BenchError):
    """A run file exists but cannot be read safely; ``path`` names it."""

    def __init__(self, path: Path, reason: str, what: str = "unreadable"):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path} is {what} ({reason})")


_TMP_SUFFIX = ".tmp"  # _atomic writes ``.<name>.<random>.tmp`` beside its target, then renames it


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def remove_temporaries(directory: Path) -> None:
    """Delete the half-written temporaries of :func:`_atomic` that a killed writer left in ``directory``.

    :func:`_atomic` removes its temporary file on any exception, but a SIGKILL or a power cut between
    ``mkstemp`` and ``os.replace`` leaves it behind. Only call this while holding the directory's
    lock, so that no live writer's temporary file is taken.
    """
    for tmp in Path(directory).glob(f".*{_TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: Any) -> None:
    data = json.dumps(obj, indent=2, sort_keys=True, default=_jsonable).encode()
    _atomic(path, lambda fh: fh.write(data))


def read_json(path: Path) -> Any:
    """Parse a JSON file; :class:`CorruptFile` when it is truncated or not JSON."""
    try:
        with open(path, "rb") as fh:
            return json.loads(fh.read().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFile(path, f"not valid JSON: {_one_line(exc)}") from None


def torch_save(path: Path, obj: Any) -> None:
    _atomic(path, lambda fh: torch.save(obj, fh))


def torch_load(path: Path) -> Any:
    """Load a checkpoint or samples file without executing code (``weights_only=True``).

    Raises :class:`CorruptFile` naming the file when it is truncated, malformed, or holds
    anything but tensors, containers and plain values (a crafted pickle is refused, never run).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as exc:  # weights_only refused a global, or garbage bytes
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            raise CorruptFile(path, f"it holds a reference to {found.group(1)}, which a safe load refuses "
                                    f"to execute") from None
        raise CorruptFile(path, "malformed: not a torch file of tensors") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, IndexError,
            AttributeError, TypeError) as exc:
        return _raise_corrupt(path, exc)


def _raise_corrupt(path: Path, exc: BaseException):
    msg = _one_line(exc)
    if "central directory" in msg or "PytorchStreamReader" in msg or isinstance(exc, EOFError):
        msg = "truncated or not a torch file"
    raise CorruptFile(path, msg) from None


def write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda fh: fh.write(data))


def append_jsonl(path: Path, obj: Any) -> None:
    """Append one JSON line with a single ``write`` on an ``O_APPEND`` descriptor, so lines from
    concurrent writers never interleave; a kill can at worst leave the last line cut short."""
    line = (json.dumps(obj, default=_jsonable) + "\n").encode()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict]:
    """The readable lines of a JSON-lines log (a line cut short by a kill is skipped)."""
    out = []
    try:
        with open(path, "rb") as fh:
            for raw in fh:
                try:
                    obj = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue
                if isinstance(obj, dict):
                    out.append(obj)
    except FileNotFoundError:
        pass
    return out


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def _jsonable(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
