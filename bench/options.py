"""Options of methods and tasks: declared once with a type and a value per budget, resolved once.

A plugin declares ``default_options = {"lr": 2e-4, "steps": Option(smoke=100, cpu=4000,
fast=20_000, paper=300_000)}``.  A plain value is an :class:`Option` with that default for every
budget.  :func:`resolve` turns the user's ``--opt`` values and the budget into the complete, typed
set of values the run uses; that set (never ``None`` for "the budget decides") is what the run
directory's hash and the result row record, so a row is enough to re-run it.
"""
from __future__ import annotations

from typing import Any, Mapping

from .api import BenchError

_UNSET = object()
_TYPES = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string",
          list: "a JSON list, e.g. [1,2]", dict: "a JSON object"}


class Option:
    """One option: a default (or one value per budget), its type, and optional choices."""

    def __init__(self, default: Any = _UNSET, *, type: type | None = None, choices: tuple | None = None,
                 nullable: bool | None = None, help: str = "", sampling: bool = False,
                 authors: Any = _UNSET, source: str = "", **per_budget: Any) -> None:
        from .budgets import BUDGET_NAMES
        bad = set(per_budget) - set(BUDGET_NAMES)
        if bad:
            raise TypeError(f"Option got unknown budget(s) {sorted(bad)}; budgets: {BUDGET_NAMES}")
        if default is _UNSET and set(per_budget) != set(BUDGET_NAMES):
            raise TypeError(f"Option without a default needs a value for every budget {BUDGET_NAMES}, "
                            f"got {sorted(per_budget)}")
        self.default, self.per_budget, self.choices, self.help = default, dict(per_budget), choices, help
        # sampling=True: the option acts only in ``transport``, never in ``fit``, so runs that differ only in such
        # options share one fit (the runner starts them from a finished sibling's final checkpoint)
        self.sampling = bool(sampling)
        # the value the method's authors use and where it is written (repository file or paper section);
        # `bench deviations` lists every budget whose value differs from it
        if authors is not _UNSET and not source:
            raise TypeError("Option(authors=...) needs source= naming where the authors' value is written")
        self.authors, self.source = authors, str(source)
        values = [v for v in ([default] if default is not _UNSET else []) + list(per_budget.values())
                  if v is not None]
        if type is None and values:
            type = _kind(values[0])
        self.type = type
        self.nullable = any(v is None for v in [default, *per_budget.values()]) if nullable is None else nullable

    @property
    def has_authors(self) -> bool:
        return self.authors is not _UNSET

    def value_for(self, budget: str) -> Any:
        return self.per_budget.get(budget, self.default)

    def validate(self, owner: str, name: str, value: Any) -> Any:
        """The value coerced to the declared type, or a one-line BenchError naming the fix."""
        if value is None:
            if self.nullable:
                return None
            raise BenchError(f"{owner} option {name} cannot be null; expected {_TYPES.get(self.type, self.type)}")
        t = self.type
        ok = True
        if t is None:
            pass
        elif t is bool:
            ok = isinstance(value, bool)
        elif t is int:
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif t is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif t is list:
            if isinstance(value, tuple):
                value = list(value)
            ok = isinstance(value, list)
        else:
            ok = isinstance(value, t)
        if not ok:
            raise BenchError(f"{owner} option {name}={value!r} is not {_TYPES.get(t, t.__name__)}; "
                             f"pass e.g. --opt {name}={_example(self)}")
        if self.choices is not None and value not in self.choices:
            raise BenchError(f"{owner} option {name}={value!r} is not one of {', '.join(map(str, self.choices))}")
        return value

    def describe(self) -> str:
        if self.per_budget:
            return ", ".join(f"{b}={self.value_for(b)!r}" for b in _budget_names())
        return repr(self.default)


def _budget_names():
    from .budgets import BUDGET_NAMES
    return BUDGET_NAMES


def _kind(value: Any) -> type | None:
    for t in (bool, int, float, str, list, dict):
        if isinstance(value, t):
            return t
    if isinstance(value, tuple):
        return list
    return None


def _example(opt: Option) -> str:
    if opt.choices:
        return str(opt.choices[0])
    v = opt.default if opt.default is not _UNSET and opt.default is not None else next(
        (x for x in opt.per_budget.values() if x is not None), None)
    return "null" if v is None else str(v).replace(" ", "").replace("'", '"').lower() if isinstance(v, (bool, list)) else str(v)


def as_option(value: Any) -> Option:
    return value if isinstance(value, Option) else Option(value)


def declared(defaults: Mapping[str, Any]) -> dict[str, Option]:
    return {k: as_option(v) for k, v in defaults.items()}


def sampling_names(defaults: Mapping[str, Any]) -> set[str]:
    """The options declared ``sampling=True`` (transport-only)."""
    return {k for k, opt in declared(defaults).items() if opt.sampling}


def resolve(owner: str, defaults: Mapping[str, Any], given: Mapping[str, Any], budget: str) -> dict[str, Any]:
    """Every declared option's value for ``budget``, with ``given`` (validated) taking precedence."""
    from .budgets import Budget
    Budget(budget)  # one-line error for an unknown budget
    spec = declared(defaults)
    unknown = sorted(set(given) - set(spec))
    if unknown:
        raise BenchError(f"{owner} has no option(s) {unknown}; known: {sorted(spec) or 'none'}")
    out = {}
    for name, opt in spec.items():
        value = given[name] if name in given else opt.value_for(budget)
        out[name] = opt.validate(owner, name, value) if name in given else value
    return out
