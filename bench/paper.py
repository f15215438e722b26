"""The published Table 1 of OTCS (Gu et al., NeurIPS 2023), shipped as ``otcs_table1.csv``.

``paper_values("digits")`` -> {registry method name: {"fid": ..., "acc": ...}} for every method
the paper reports on that column (an empty cell is left out, never guessed).
"""
from __future__ import annotations

import csv
from functools import lru_cache
from importlib import resources

# the paper's method names -> this harness's registry names
NAMES = {"W2GAN": "w2gan", "OT-ICNN": "ot-icnn", "OTM": "otm", "NOT": "not", "KNOT": "knot",
         "ReFlow": "reflow", "EGSDE": "egsde", "DDIB": "ddib", "TCR": "tcr", "SCONES": "scones",
         "OTCS": "otcs"}
COLUMNS = {"celeba": ("fid", "ssim"), "animal": ("fid", "acc"), "digits": ("fid", "acc")}


@lru_cache(maxsize=None)
def _rows() -> tuple[dict[str, str], ...]:
    text = resources.files("bench").joinpath("otcs_table1.csv").read_text()
    return tuple(csv.DictReader(text.splitlines()))


def paper_values(column: str) -> dict[str, dict[str, float]]:
    """Table 1's cells for one of its three columns: ``celeba``, ``animal`` or ``digits``."""
    if column not in COLUMNS:
        raise KeyError(f"Table 1 has no column {column!r}; columns: {', '.join(COLUMNS)}")
    out: dict[str, dict[str, float]] = {}
    for row in _rows():
        cells = {m: float(row[f"{column}_{m}"]) for m in COLUMNS[column] if row.get(f"{column}_{m}", "").strip()}
        if cells:
            out[NAMES.get(row["method"], row["method"].lower())] = cells
    return out


def family(method: str) -> str | None:
    """The paper's family label of a method (e.g. 'OT', 'OT, Diffusion'), None if not in Table 1."""
    for row in _rows():
        if NAMES.get(row["method"], row["method"].lower()) == method:
            return row["method_type"]
    return None
