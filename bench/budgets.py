"""Budgets scale iteration counts and evaluation sizes; they never change the protocol."""
from __future__ import annotations

from dataclasses import dataclass

from .api import BenchError

BUDGETS = {
    "smoke": "CPU, about a minute per method (CI); tiny networks and short training",
    "fast": "one GPU, minutes per method",
    "paper": "the paper's iteration counts",
}


@dataclass(frozen=True)
class Budget:
    name: str

    def __post_init__(self):
        if self.name not in BUDGETS:
            raise BenchError(f"unknown budget {self.name!r}; choose one of: {', '.join(BUDGETS)}")

    def pick(self, smoke, fast, paper=None):
        """The value for this budget; ``paper`` defaults to ``fast``."""
        return {"smoke": smoke, "fast": fast, "paper": fast if paper is None else paper}[self.name]

    def __str__(self) -> str:
        return self.name
