"""One process per run directory: an OS file lock plus a note of who holds it.

``RunLock(rundir)`` takes ``rundir/.lock`` with :mod:`filelock` (``fcntl.flock`` on Linux and
macOS, ``msvcrt.locking`` on Windows).  The kernel releases such a lock when its process dies,
``kill -9`` included (tests/test_faults.py checks it), so a lock left by a killed run is never
stale: the next process simply gets it.  While holding the lock the process writes
``rundir/.lock.owner.json`` (pid, host, start time, command) so that a second process can say who
holds the run; that note is only advisory and may outlive a killed holder.

Caveat: ``flock`` on some network filesystems (old NFS, some FUSE mounts) is not shared between
machines; with runs of one grid on several machines, put ``--out`` on a filesystem whose locks
are cluster-wide (NFSv4, Lustre with ``flock`` mount option, GPFS) or give each machine its runs.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import filelock

from . import store
from .errors import BenchError

LOCK_FILE = ".lock"
OWNER_FILE = ".lock.owner.json"


class RunLocked(BenchError):
    """The run directory is held by another process (``owner`` describes it when known)."""

    def __init__(self, rundir: Path, owner: dict[str, Any] | None):
        self.rundir, self.owner = Path(rundir), owner or {}
        super().__init__(f"{rundir} is being run by {describe_owner(self.owner)}")


def describe_owner(owner: dict[str, Any] | None) -> str:
    if not owner or "pid" not in owner:
        return "another process"
    since = owner.get("since")
    when = f" since {time.strftime('%H:%M:%S', time.localtime(since))}" if since else ""
    return f"pid {owner['pid']} on {owner.get('host', '?')}{when}"


def read_owner(rundir: Path) -> dict[str, Any]:
    try:
        owner = store.read_json(Path(rundir) / OWNER_FILE)
        return owner if isinstance(owner, dict) else {}
    except (OSError, BenchError):
        return {}


class RunLock:
    """Exclusive lock of one run directory, for ``with`` use.

    ``wait=False``: give up after ``grace`` seconds (a short grace rides out a ``bench status``
    probe holding the lock for a moment) and raise :class:`RunLocked`; ``wait=True``: block until
    the holder finishes or dies.
    """

    def __init__(self, rundir: Path, *, wait: bool = False, grace: float = 0.5):
        self.rundir = Path(rundir)
        self.wait, self.grace = wait, grace
        self._lock = filelock.FileLock(str(self.rundir / LOCK_FILE), thread_local=False)

    def acquire(self) -> "RunLock":
        self.rundir.mkdir(parents=True, exist_ok=True)
        while True:  # waiting = repeated finite tries (stays interruptible with Ctrl-C)
            try:
                self._lock.acquire(timeout=1.0 if self.wait else self.grace, poll_interval=0.05)
                break
            except filelock.Timeout:
                if not self.wait:
                    raise RunLocked(self.rundir, read_owner(self.rundir)) from None
        store.write_json(self.rundir / OWNER_FILE, {
            "pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
            "argv": " ".join(sys.argv[:12])})
        return self

    def release(self) -> None:
        if self._lock.is_locked:
            try:
                (self.rundir / OWNER_FILE).unlink(missing_ok=True)
            finally:
                self._lock.release()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder(rundir: Path) -> dict[str, Any] | None:
    """Who holds ``rundir``'s lock right now (``{}`` when unknown), or None when nobody does.

    Probes by trying the lock without waiting and releasing it at once; never creates a lock
    file in a directory that has none (nothing has ever run there, or the last holder released).
    """
    rundir = Path(rundir)
    if not (rundir / LOCK_FILE).exists():
        return None
    probe = filelock.FileLock(str(rundir / LOCK_FILE), thread_local=False)
    try:
        probe.acquire(timeout=0)
    except filelock.Timeout:
        return read_owner(rundir)
    except OSError:
        return None
    probe.release()
    return None


@contextmanager
def cache_entry_lock(path: Path) -> Iterator[None]:
    """Hold the lock for building one shared cache entry (``path``): concurrent runs, test workers or executor
    jobs that need the same classifier, FID statistics or decoded images wait while one process builds it,
    then load its file, instead of each building it. The lock file ``.<name>.lock`` sits beside it.

    A cache folder where the lock file cannot be created (read-only, e.g. a shared pre-filled cache) is used
    without the lock: nothing can be built there, so there is nothing to serialise, and readers go on."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(path.with_name(f".{path.name}.lock")), thread_local=False)
        lock.acquire()
    except OSError:
        lock = None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
