"""Budgets scale iteration counts, network sizes and evaluation sizes; the row records which.

The one list of budgets lives here.  A method or task declares its budget-dependent values next
to each option (:class:`bench.options.Option`), so every budget has an explicit value: nothing
silently falls back to another budget's.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import BenchError

BUDGETS = {
    "smoke": "CPU, about a minute per method (CI): a plumbing check with tiny networks, not a quality run",
    "cpu": "the project's 2-core CPU machine: at most 45 minutes per method and seed, and every method learns",
    "fast": "one GPU, minutes per method",
    "paper": "the paper's iteration counts (where a paper publishes none, the method's notes say so)",
}
BUDGET_NAMES: tuple[str, ...] = tuple(BUDGETS)


@dataclass(frozen=True)
class Budget:
    name: str

    def __post_init__(self):
        if self.name not in BUDGETS:
            raise BenchError(f"unknown budget {self.name!r}; choose one of: {', '.join(BUDGETS)}")

    def pick(self, **values):
        """The value declared for this budget; every budget must be given one."""
        missing = [b for b in BUDGET_NAMES if b not in values]
        if missing:
            raise TypeError(f"Budget.pick needs a value for every budget; missing {missing}")
        return values[self.name]

    def __str__(self) -> str:
        return self.name
