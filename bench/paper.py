"""Published values beside measured cells: reading them is the engine's, which table and column is the task's.

A task declares ``paper_values`` ({registry method name: {metric: value}}); one published table shared by
several tasks is best kept as a CSV next to them, with one row per method and a ``<column>_<metric>`` header per
cell, read with :func:`csv_column`::

    paper_values = csv_column(TABLE, "<column>", names={"<name in the table>": "<registry name>"})

The mapping from the table's method names to registry names (``names``) stays with the table it maps.
"""
from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path
from typing import Mapping

from .errors import BenchError


@lru_cache(maxsize=None)
def _rows(path: str) -> tuple[tuple[str, ...], tuple[dict[str, str], ...]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return tuple(reader.fieldnames or ()), tuple(reader)


def csv_column(path: str | Path, column: str, names: Mapping[str, str] | None = None,
               method: str = "method") -> dict[str, dict[str, float]]:
    """The cells of one column of a published table: {registry name: {metric: value}}.

    ``column``'s cells are the headers ``<column>_<metric>``; the row's method is in the ``method`` header,
    mapped through ``names`` (a name it lacks is lower-cased).  An empty cell is left out, never guessed, and
    a method without any cell in the column is left out."""
    fields, rows = _rows(str(Path(path).resolve()))
    prefix = f"{column}_"
    own = lambda f: f == method or f.startswith(f"{method}_")  # noqa: E731  (the row's name and its labels)
    metrics = [f[len(prefix):] for f in fields if f.startswith(prefix) and not own(f)]
    if not metrics or method not in fields:
        columns = sorted({f.split("_", 1)[0] for f in fields if "_" in f and not own(f)})
        raise BenchError(f"{path} has no column {column!r} (headers {prefix}<metric>) or no {method!r} header; "
                         f"its columns: {', '.join(columns)}")
    names = names or {}
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        cells = {m: float(row[prefix + m]) for m in metrics if (row.get(prefix + m) or "").strip()}
        if cells:
            out[names.get(row[method], row[method].lower())] = cells
    return out

