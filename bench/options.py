"""Options of methods and tasks: declared once with a type and a value per budget, resolved once.

A plugin declares ``default_options = {"lr": 2e-4, "steps": Option(smoke=100, cpu=4000,
fast=20_000, paper=300_000)}``.  A plain value is an :class:`Option` with that default for every
budget.  ``Option(..., vector=...)`` gives the value on vector tasks (a plain value, or an Option with one
value per budget) where it differs from the images' one: one name per concept, two kinds of task.
:func:`resolve` turns the user's ``--opt`` values, the budget and the task's kind into the complete, typed
set of values the run uses; that set (never ``None`` for "the budget decides") is what the run
directory's hash and the result row record, so a row is enough to re-run it.

The names every method shares: the main network's training is ``steps``, ``batch_size``, ``lr``, ``ema``,
``warmup``, ``grad_clip``, ``loss_weighting``; a method's other networks prefix their part (``ot_steps``,
``ot_batch``, ``ot_lr``; ``score_*``, ``flow_*``, ``cls_*`` in the shared blocks); network sizes are ``unet_base``,
``unet_mults``, ``unet_blocks``, ``unet_attention`` (levels, 0 = full resolution), ``mlp_hidden``, ``mlp_depth``,
``critic_base``, ``potential_hidden``, ``potential_depth``.  A renamed option keeps its former name in the
method's ``renamed_options`` (:func:`upgrade`).
"""
from __future__ import annotations

import copy
import difflib
import math
from typing import Any, Mapping

from .budgets import BUDGET_NAMES, Budget
from .errors import BenchError

_UNSET = object()
KINDS = ("image", "vector")
POSITIVE_SUFFIXES = ("lr", "steps", "batch_size", "batch")
_TYPES = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string",
          list: "a JSON list, e.g. [1,2]", dict: "a JSON object"}


class Option:
    """One option: a default (or one value per budget), its type, and optional choices."""

    def __init__(self, default: Any = _UNSET, *, type: type | None = None, choices: tuple | None = None,
                 nullable: bool | None = None, help: str = "", sampling: bool = False,
                 authors: Any = _UNSET, source: str = "", problem: bool = False, low: float | None = None, high: float | None = None,
                 vector: Any = _UNSET, **per_budget: Any) -> None:
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
        # the value on vector tasks, where it differs (an Option: one per budget); the images' one otherwise
        if isinstance(vector, Option) and (vector.vector is not _UNSET or vector.choices or vector.help):
            raise TypeError("Option(vector=Option(...)) takes values only (one per budget, or a default)")
        self.vector = vector

    @property
    def has_authors(self) -> bool:
        return self.authors is not _UNSET

    def on_vectors(self, vector: Any) -> "Option":
        """This option with ``vector`` as its value on vector tasks (a value, or an Option per budget)."""
        out = copy.copy(self)
        out.per_budget = dict(self.per_budget)
        out.vector = vector
        return out

    @property
    def has_vector(self) -> bool:
        return self.vector is not _UNSET

    def value_for(self, budget: str, kind: str = "image") -> Any:
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} is not one of {KINDS}")
        if kind == "vector" and self.vector is not _UNSET:
            return self.vector.value_for(budget) if isinstance(self.vector, Option) else self.vector
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

    def describe(self, kind: str = "image") -> str:
        """The value per budget on tasks of ``kind`` (one value when no budget differs)."""
        values = [self.value_for(b, kind) for b in BUDGET_NAMES]
        if all(v == values[0] for v in values):
            return repr(values[0])
        return ", ".join(f"{b}={v!r}" for b, v in zip(BUDGET_NAMES, values))


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


def resolve(owner: str, defaults: Mapping[str, Any], given: Mapping[str, Any], budget: str,
            kind: str = "image") -> dict[str, Any]:
    """Every declared option's value for ``budget`` on tasks of ``kind`` (image or vector), with ``given``
    (validated) taking precedence."""
    Budget(budget)  # one-line error for an unknown budget
    if kind not in KINDS:
        raise BenchError(f"{owner}: task kind {kind!r} is not one of {', '.join(KINDS)}")
    spec = declared(defaults)
    unknown = sorted(set(given) - set(spec))
    if unknown:
        raise BenchError(f"{owner} has no option(s) {unknown}; {_suggest(unknown[0], spec, owner)}")
    out = {}
    for name, opt in spec.items():
        value = given[name] if name in given else opt.value_for(budget, kind)
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


# -- rows and run directories written with older option names ---------------------------------------
def upgrade(defaults: Mapping[str, Any], options: Mapping[str, Any], kind: str,
            renamed: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``options`` as stored by a run that predates today's names, in today's names.

    ``renamed`` maps a method's former option names to today's (or to ``(name, {old value: new value})`` where
    the values changed form too, as DPM-OT's boolean ``attention`` became the list ``unet_attention``).  Options
    once came in ``toy_X`` twins, read on vector tasks in place of ``X`` (a ``toy_Y`` with no ``Y`` stood for
    every ``*_Y`` without its own twin, as NOT's ``toy_lr`` for its ``map_lr`` and ``critic_lr``); today each is
    one option with a vector value (``Option(vector=...)``).  On a vector task a twin's value becomes its
    counterpart's, on an image task (which never read it) it is dropped; an ``image_X`` twin (read on images in
    place of ``X``) the other way round.  Options already in today's names pass unchanged."""
    old: dict[str, Any] = {}
    for k, v in options.items():
        new = (renamed or {}).get(k, k)
        if isinstance(new, tuple):
            new, values = new
            v = next((b for a, b in values.items() if a == v and type(a) is type(v)), v)
        old[new] = v
    names_now = {k: (v[0] if isinstance(v, tuple) else v) for k, v in (renamed or {}).items()}
    names = {k for k in old if not k.startswith(("toy_", "image_"))} or set(defaults)  # the names the row's code had
    out = {k: v for k, v in old.items() if not k.startswith(("toy_", "image_"))}
    for k in sorted(k for k in old if k.startswith("image_")):  # image-only twins (TCR's image_mlp_*)
        if kind == "image":
            out[k[6:]] = old[k]
    for toy in sorted(k for k in old if k.startswith("toy_")):
        if kind != "vector":
            continue
        base = names_now.get(toy[4:], toy[4:])
        targets = [base] if base in names else sorted(
            n for n in names if n.endswith("_" + base) and "toy_" + n not in old)
        for n in targets:
            out[n] = old[toy]
    return out


