"""Name registries for methods and tasks: one generic :class:`Registry`, two instances.

Built-ins and third-party packages are found the same way: through the entry-point groups
``otbench.methods`` and ``otbench.tasks`` (see pyproject.toml). A plugin can also register
itself at import time with :func:`register_method` / :func:`register_task`, and
``BENCH_PLUGINS=module,module`` imports extra modules (handy for a single-file plugin; note that
this imports, i.e. executes, those modules). Two different classes under one name are refused
with an error naming both, never silently skipped.
"""
from __future__ import annotations

import importlib
import json
import os
import warnings
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from .api import BenchError, Method, Task
from .options import Option, suggest, upgrade

T = TypeVar("T")


class Registry(Generic[T]):
    """Named plugin classes of one kind (``base``), loaded from an entry-point group on first use."""

    def __init__(self, kind: str, base: type, group: str) -> None:
        self.kind, self.base, self.group = kind, base, group
        self._table: dict[str, type] = {}
        self._origin: dict[str, str] = {}
        self._loaded = False

    def register(self, cls: type, origin: str | None = None) -> type:
        if not (isinstance(cls, type) and issubclass(cls, self.base)) or not getattr(cls, "name", ""):
            raise TypeError(f"{cls!r} is not a {self.base.__name__} subclass with a name")
        where = origin or f"{cls.__module__}.{cls.__qualname__}"
        old = self._table.get(cls.name)
        if old is not None and old is not cls and f"{old.__module__}.{old.__qualname__}" != \
                f"{cls.__module__}.{cls.__qualname__}":
            raise BenchError(f"two {self.kind}s are named {cls.name!r}: {self._origin[cls.name]} and {where}; "
                             f"rename one of them (its class attribute `name` and its entry point)")
        self._table[cls.name] = cls
        self._origin.setdefault(cls.name, where)
        return cls

    def load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for ep in entry_points(group=self.group):
            try:
                obj = ep.load()
            except Exception as exc:  # a broken third-party plugin must not take the CLI down
                warnings.warn(f"otbench: could not load {self.kind} plugin {ep.name!r} ({ep.value}): {exc}")
                continue
            if getattr(obj, "name", "") != ep.name:
                raise BenchError(f"plugin entry point {ep.name!r} points at {obj!r} whose name is "
                                 f"{getattr(obj, 'name', None)!r}; make them equal")
            self.register(obj, origin=f"entry point {ep.name} = {ep.value}")

    def origin(self, name: str) -> str:
        """Where ``name`` was registered from: ``entry point ...`` for installed plugins, else a module path."""
        self.load()
        return self._origin.get(name, "")

    def all(self) -> dict[str, type]:
        load_plugins()
        return dict(sorted(self._table.items()))

    def get(self, name: str) -> type:
        table = self.all()
        if name not in table:
            close = suggest(name, table)
            raise BenchError(f"unknown {self.kind} {name!r}; " + (f"did you mean {close!r}? " if close else "")
                             + f"known {self.kind}s: {', '.join(table)} (see `bench list`)")
        return table[name]


METHODS: Registry[Method] = Registry("method", Method, "otbench.methods")
TASKS: Registry[Task] = Registry("task", Task, "otbench.tasks")
_extra_loaded = False


def register_method(cls: type[Method]) -> type[Method]:
    return METHODS.register(cls)


def register_task(cls: type[Task]) -> type[Task]:
    return TASKS.register(cls)


def load_plugins() -> None:
    global _extra_loaded
    if not _extra_loaded:
        _extra_loaded = True
        for mod in filter(None, os.environ.get("BENCH_PLUGINS", "").split(",")):
            try:
                importlib.import_module(mod.strip())
            except ImportError as exc:
                raise BenchError(f"BENCH_PLUGINS names {mod.strip()!r}, which cannot be imported ({exc}); "
                                 f"fix the module name or your PYTHONPATH") from None
    METHODS.load()
    TASKS.load()


def methods() -> dict[str, type[Method]]:
    return METHODS.all()


def tasks() -> dict[str, type[Task]]:
    return TASKS.all()


def get_method(name: str) -> type[Method]:
    return METHODS.get(name)


def get_task(name: str) -> type[Task]:
    return TASKS.get(name)


def _plain(value):
    """A JSON round trip, so that options read back from a row (lists, str keys) compare equal to defaults."""
    return json.loads(json.dumps(value, default=str))


def options_variant(method: str, budget: str, task: str, options: dict, task_options: dict) -> str:
    """A short label of the options that differ from the budget's *current* defaults ('' for defaults).

    A default option the row does not have (added after it ran) is labelled ``name=unset``, so a row run
    before a default changed never reads as a run of today's defaults; unless the method's ``options_before``
    names the value that reproduces the code the row ran (then the row is read as having it).  Options stored
    under former names read as today's (:func:`bench.options.upgrade`)."""
    cls, task_cls = get_method(method), get_task(task)
    kind = task_cls.kind
    base_m = _plain(cls(budget=budget, kind=kind).options)
    base_t = _plain(task_cls().options)
    before = {k: v.value_for(budget, kind) if isinstance(v, Option) else v for k, v in cls.options_before.items()}
    options = upgrade(cls.default_options, options or {}, kind, cls.renamed_options)
    options, task_options = _plain({**before, **options}), _plain(task_options or {})
    parts = [f"{k}={v}" for k, v in sorted(options.items()) if base_m.get(k, object()) != v]
    parts += [f"{k}=unset" for k in sorted(set(base_m) - set(options))]
    parts += [f"task.{k}={v}" for k, v in sorted(task_options.items()) if base_t.get(k, object()) != v]
    parts += [f"task.{k}=unset" for k in sorted(set(base_t) - set(task_options))]
    return ",".join(parts)
