"""Name registries for methods and tasks.

Built-ins and third-party packages are found the same way: through the entry-point groups
``otbench.methods`` and ``otbench.tasks`` (see pyproject.toml). A plugin can also register
itself at import time with :func:`register_method` / :func:`register_task`, and
``BENCH_PLUGINS=module,module`` imports extra modules (handy for a single-file plugin).
"""
from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points

from .api import BenchError, Method, Task

METHOD_GROUP = "otbench.methods"
TASK_GROUP = "otbench.tasks"

_methods: dict[str, type[Method]] = {}
_tasks: dict[str, type[Task]] = {}
_loaded = False


def register_method(cls: type[Method]) -> type[Method]:
    if not (isinstance(cls, type) and issubclass(cls, Method)) or not cls.name:
        raise TypeError(f"{cls!r} is not a Method subclass with a name")
    _methods[cls.name] = cls
    return cls


def register_task(cls: type[Task]) -> type[Task]:
    if not (isinstance(cls, type) and issubclass(cls, Task)) or not cls.name:
        raise TypeError(f"{cls!r} is not a Task subclass with a name")
    _tasks[cls.name] = cls
    return cls


def _load_group(group: str, table: dict, register) -> None:
    for ep in entry_points(group=group):
        if ep.name in table:
            continue
        try:
            obj = ep.load()
        except Exception as exc:  # a broken third-party plugin must not take the CLI down
            import warnings
            warnings.warn(f"otbench: could not load plugin {ep.name!r} ({ep.value}): {exc}")
            continue
        if getattr(obj, "name", "") != ep.name:
            raise BenchError(f"plugin entry point {ep.name!r} points at {obj!r} whose name is "
                             f"{getattr(obj, 'name', None)!r}; make them equal")
        register(obj)


def load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in filter(None, os.environ.get("BENCH_PLUGINS", "").split(",")):
        importlib.import_module(mod.strip())
    _load_group(METHOD_GROUP, _methods, register_method)
    _load_group(TASK_GROUP, _tasks, register_task)


def methods() -> dict[str, type[Method]]:
    load_plugins()
    return dict(sorted(_methods.items()))


def tasks() -> dict[str, type[Task]]:
    load_plugins()
    return dict(sorted(_tasks.items()))


def get_method(name: str) -> type[Method]:
    table = methods()
    if name not in table:
        raise BenchError(f"unknown method {name!r}; known methods: {', '.join(table)} "
                         f"(see `bench list`)")
    return table[name]


def get_task(name: str) -> type[Task]:
    table = tasks()
    if name not in table:
        raise BenchError(f"unknown task {name!r}; known tasks: {', '.join(table)} (see `bench list`)")
    return table[name]
