"""``paused_jobs(on)``: while timing, stop every other `bench run` / `bench eval` process (SIGSTOP) and resume
it after (SIGCONT), so that a benchmark can be taken cleanly beside a long job. Shared by the benchmarks that
take ``--pause``."""
from __future__ import annotations

import os
import signal
import subprocess
from contextlib import contextmanager


@contextmanager
def paused_jobs(on: bool = True):
    pids = []
    if on:
        out = subprocess.run(["pgrep", "-f", "bench (run|eval)"], capture_output=True, text=True).stdout
        pids = [int(s) for s in out.split()]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield pids
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
