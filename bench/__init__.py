"""otbench: a benchmark harness for optimal-transport guided image translation.

What a plugin author needs is importable from here::

    from bench import Method, Task, Option, Metric, TaskData, FitContext, register_method

The names resolve on first use (PEP 562), so that `import bench.cli` does not load torch before a command needs it.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "Method": "api", "Task": "api", "TaskData": "api", "Metric": "api", "EvalContext": "api", "DataFile": "api",
    "UNPAIRED": "api", "SEMI_PAIRED": "api", "PERCENT": "api", "DISTANCE": "api", "CORRELATION": "api",
    "Option": "options", "FitContext": "context", "BenchError": "errors", "RunFailed": "errors",
    "register_method": "registry", "register_task": "registry", "get_method": "registry", "get_task": "registry",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
