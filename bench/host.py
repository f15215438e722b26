"""Facts about the machine a run executes on, recorded in its row: code commit, CPU, device."""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch


def git_commit() -> str | None:
    """The short commit of the checkout this code runs from (None outside git)."""
    try:
        here = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


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


def device_name(device: torch.device) -> str:
    """The device as a row records it: the GPU's name, or the CPU's model and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model()}, {torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
