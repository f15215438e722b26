"""Options of methods and tasks: declared once with a type and a value per budget, resolved once.

A plugin declares ``default_options = {"lr": 2e-4, "steps": Option(smoke=100, cpu=4000,
fast=20_000, paper=300_000)}``.  A plain value is an :class:`Option` with that default for every
budget.  :func:`resolve` turns the user's ``--opt`` values and the budget into the complete, typed
set of values the run uses; that set (never ``None`` for "the budget decides") is what the run
directory's hash and the result row record, so a row is enough to re-run it.
"""
from __future__ import annotations

import difflib
import math
from typing import Any, Mapping

from .budgets import BUDGET_NAMES, Budget
from .errors import BenchError

_UNSET = object()
POSITIVE_SUFFIXES = ("lr", "steps", "batch_size", "batch")
_TYPES = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string",
          list: "a JSON list, e.g. [1,2]", dict: "a JSON object"}


class Option:
    """One option: a default (or one value per budget), its type, and optional choices."""

    def __init__(self, default: Any = _UNSET, *, type: type | None = None, choices: tuple | None = None,
                 nullable: bool | None = None, help: str = "", sampling: bool = False,
                 authors: Any = _UNSET, source: str = "", problem: bool = False, low: float | None = None, high: float | None = None,
                 **per_budget: Any) -> None:
        bad = set(per_budget) - set(BUDGET_NAMES)
        if bad:
            raise TypeError(f"Option got unknown budget(s) {sorted(bad)}; budgets: {BUDGET_NAMES}")
        if default is _UNSET and set(per_budget) != set(BUDGET_NAMES):
            raise TypeError(f"Option without a default needs a value for every budget {BUDGET_NAMES}, "
                            f"got {sorted(per_budget)}")
        self.default, self.per_budget, self.choices, self.help = default, dict(per_budget), choices, help
        # the valid range of a number given on the command line, both ends included; without one, an option
        # named *lr, *steps, *batch_size or *batch must be > 0 (see ``bounds``)
        self.low, self.high = low, high
        # sampling=True: the option acts only in ``transport``, never in ``fit``, so runs that differ only in such
        # options share one fit (the runner starts them from a finished sibling's final checkpoint)
        self.sampling = bool(sampling)
        # the value the method's authors use and where it is written (repository file or paper section);
        # `bench deviations` lists every budget whose value differs from it
        if authors is not _UNSET and not source:
            raise TypeError("Option(authors=...) needs source= naming where the authors' value is written")
        self.authors, self.source = authors, str(source)
        # problem=True: the option defines the problem the method solves (a regulariser, a cost), not the compute
        # spent on it; a budget whose value differs from the authors' then solves another problem, and tables say so
        self.problem = bool(problem)
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
        low, high, strict = self.bounds(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (low, high) != (None, None):
            if not math.isfinite(value):
                raise BenchError(f"{owner} option {name}={value!r} is not a finite number; pass e.g. "
                                 f"--opt {name}={_example(self)}")
            if (low is not None and (value <= low if strict else value < low)) or (high is not None and value > high):
                want = " and ".join(([f"{'>' if strict else '>='} {low:g}"] if low is not None else [])
                                    + ([f"<= {high:g}"] if high is not None else []))
                raise BenchError(f"{owner} option {name}={value!r} must be {want}; "
                                 f"pass e.g. --opt {name}={_example(self)}")
        return value

    def bounds(self, name: str) -> tuple[float | None, float | None, bool]:
        """(low, high, low is exclusive): the declared range, else > 0 for learning rates, step counts and batch
        sizes (named *lr, *steps, *batch_size, *batch), else none.  A number with a range must also be finite."""
        if self.low is not None or self.high is not None:
            return self.low, self.high, False
        if name.endswith(POSITIVE_SUFFIXES):
            return 0, None, True
        return None, None, False

    def describe(self) -> str:
        if self.per_budget:
            return ", ".join(f"{b}={self.value_for(b)!r}" for b in BUDGET_NAMES)
        return repr(self.default)


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


def problem_changes(defaults: Mapping[str, Any], options: Mapping[str, Any]) -> list[str]:
    """``name value (authors: a)`` for each ``problem=True`` option whose value in ``options`` is not the authors'."""
    out = []
    for name, opt in declared(defaults).items():
        if opt.problem and opt.has_authors and name in options and options[name] != opt.authors:
            out.append(f"{name} {options[name]!r} (authors: {opt.authors!r})")
    return out


def as_option(value: Any) -> Option:
    return value if isinstance(value, Option) else Option(value)


def declared(defaults: Mapping[str, Any]) -> dict[str, Option]:
    return {k: as_option(v) for k, v in defaults.items()}


def sampling_names(defaults: Mapping[str, Any]) -> set[str]:
    """The options declared ``sampling=True`` (transport-only)."""
    return {k for k, opt in declared(defaults).items() if opt.sampling}


def resolve(owner: str, defaults: Mapping[str, Any], given: Mapping[str, Any], budget: str) -> dict[str, Any]:
    """Every declared option's value for ``budget``, with ``given`` (validated) taking precedence."""
    Budget(budget)  # one-line error for an unknown budget
    spec = declared(defaults)
    unknown = sorted(set(given) - set(spec))
    if unknown:
        raise BenchError(f"{owner} has no option(s) {unknown}; {_suggest(unknown[0], spec, owner)}")
    out = {}
    for name, opt in spec.items():
        value = given[name] if name in given else opt.value_for(budget)
        out[name] = opt.validate(owner, name, value) if name in given else value
    return out


def suggest(name: str, known) -> str | None:
    """The known name closest to a mistyped ``name`` ("did you mean"), or None."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return close[0] if close else None


def _suggest(name: str, spec: Mapping[str, Any], owner: str) -> str:
    close = suggest(name, spec)
    hint = f"did you mean {close}? " if close else ""
    if owner.startswith("method ") and len(spec) > 8:  # "method 'otcs'": the list is long, point at it
        return hint + f"all of them: `bench list --method {owner.split(' ', 1)[1].strip(chr(39))}`"
    return hint + f"known: {', '.join(sorted(spec)) or 'none'}"


# -- options one kind of task ignores ----------------------------------------------------------------
def path_only(defaults: Mapping[str, Any]) -> dict[str, tuple[str, list[str]]]:
    """``{option: (kind, counterparts)}`` for the options only image or only vector tasks read, by the naming
    convention of the methods: ``toy_X`` is read on vector tasks in place of ``X`` (then ``X`` is image-only),
    and a ``toy_Y`` with no ``Y`` stands for every ``*_Y`` on vector tasks (NOT's ``toy_lr`` replaces its
    ``map_lr`` and ``critic_lr``).  ``kind`` is "image" or "vector"; ``counterparts`` the options that play
    the same part on the other kind."""
    names = list(defaults)
    out: dict[str, tuple[str, list[str]]] = {}
    for toy in (n for n in names if n.startswith("toy_")):
        base = toy[4:]
        images = [base] if base in names else [n for n in names if n.endswith("_" + base) and not n.startswith("toy_")
                                                  and "toy_" + n not in names]
        out[toy] = ("vector", images)
        for n in images:
            out[n] = ("image", [toy])
    return out


def check_path(owner: str, defaults: Mapping[str, Any], given: Mapping[str, Any], budget: str, *,
               is_image: bool, task: str, prefix: str = "") -> None:
    """A one-line BenchError for a given option (not at its default) that a task of this kind never reads:
    a run would record and hash a setting that changed nothing."""
    spec = declared(defaults)
    for name, (kind, other) in path_only(spec).items():
        if name not in given or given[name] == spec[name].value_for(budget) or (kind == "image") == is_image:
            continue
        fix = (f"where {' / '.join(other)} plays its part: pass " + " or ".join(f"--opt {prefix}{o}=..." for o in other)
               + " instead") if other else "which never reads it: drop it"
        raise BenchError(f"{owner} option {name} applies to {kind} tasks only and {task} is "
                         f"{'an image' if is_image else 'a vector'} task, {fix}")
