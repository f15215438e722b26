"""Result rows -> Table 1 layout (text for a terminal, markdown, LaTeX, CSV).

Rows are the ``row.json`` files under ``OUT/<task>/**``, each checked against its run directory
(:mod:`bench.schema`). Cells are mean +- std over seeds for each (method, budget); the best value
per metric column is bold and the second underlined where the gap exceeds the rows' seed spread
(:func:`ranks`; reference rows, oracles and the smoke budget are shown but never ranked); the
paper's published value stands beside each measured cell.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
from tabulate import tabulate

from .api import BenchError, Metric
from .options import problem_changes
from .registry import get_method, options_variant, tasks
from .rundir import read_row_file
from .schema import run_id
from .store import CorruptFile

BOUND_PREFIX = "bound_"
FORMATS = ("text", "markdown", "latex", "csv")  # text: for a terminal (bold/underline as ANSI styles)


def task_metrics(task_cls) -> list[Metric]:
    """The task's declared metric columns (a bare string counts as lower-is-better, 2 digits)."""
    return [m if isinstance(m, Metric) else Metric(m) for m in task_cls.metrics]


def load_rows(out: Path, task: str | None = None, rows_dir: Path | None = None) -> pd.DataFrame:
    """The finished rows under ``out``'s run directories, or, with ``rows_dir``, the collected row
    files ``rows_dir/*.json`` (copies of row.json kept in the repository, e.g. results/digits/rows)."""
    if rows_dir is not None:
        paths = sorted(Path(rows_dir).glob("*.json"))
    else:
        pattern = f"{task}/*/*/row.json" if task else "*/*/*/row.json"
        paths = sorted(Path(out).glob(pattern))
    rows = []
    for path in paths:
        # a run directory's row must agree with its path (task, method, budget, seed, options digest): what the
        # table shows of a run is what its directory proves, never a field someone edited
        rid = run_id(path.parent) if rows_dir is None else None
        try:
            row = read_row_file(path, rid)
        except CorruptFile as exc:
            fix = (f"score the run again with `bench eval {path.parent}`" if rows_dir is None
                   else f"restore it from git or remove it from {path.parent}")
            raise BenchError(f"{path} is not a result row ({exc.reason}); {fix}") from None
        if task and row.get("task", task) != task:
            continue
        row["run_dir"] = str(path.parent if rows_dir is None else path)
        row["variant"] = current_variant(row)
        task_cls = tasks().get(row.get("task"))
        label = task_cls.row_label(row) if task_cls is not None else ""
        if label:  # the task's protocol says this row is not comparable (e.g. another judge)
            row["variant"] = ",".join(filter(None, [row["variant"], label]))
        rows.append(row)
    return pd.DataFrame(rows)


def current_variant(row: dict) -> str:
    """The row's options that differ from its method's defaults *today*: a row run before a default changed
    is labelled (and so never averaged with runs of the new default); the label stored at run time is kept
    for a method or task that is not installed here."""
    if "options" not in row or "task" not in row:
        return row.get("variant") or ""
    try:
        return options_variant(row["method"], row["budget"], row["task"], row["options"],
                               row.get("task_options", {}))
    except (BenchError, TypeError, ValueError, KeyError):  # not installed here, or its options no longer build
        return row.get("variant") or ""


def _fmt(mean: float, std: float, n: int, digits: int) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    s = f"{mean:.{digits}f}"
    if n > 1 and std is not None and not math.isnan(std):
        s += f" ± {std:.{digits}f}"
    return s


def _mark(text: str, rank: int | None, fmt: str) -> str:
    # text: ANSI bold / underline, which click.echo drops when the output is not a terminal
    if rank == 0:
        return {"markdown": f"**{text}**", "latex": f"\\textbf{{{text}}}",
                "text": f"\033[1m{text}\033[0m"}.get(fmt, text)
    if rank == 1:
        return {"markdown": f"<ins>{text}</ins>", "latex": f"\\underline{{{text}}}",
                "text": f"\033[4m{text}\033[0m"}.get(fmt, text)
    return text


def _cell(text: str, fmt: str) -> str:
    """A name or label cell that cannot break the table: one line, its separators escaped."""
    text = " ".join(str(text).split())
    if fmt == "markdown":
        return text.replace("|", "\\|")
    if fmt == "latex":
        return "".join("\\" + c if c in "&%$#_{}" else c for c in text)
    return text


def ranks(summary: pd.DataFrame, metrics: list[str], specs: dict[str, Metric]) -> dict[tuple, dict[str, int]]:
    """{(method, variant, budget): {metric: 0 best / 1 second}} among the non-reference, non-oracle rows of each
    budget but smoke (a plumbing check whose values are near chance): the best is marked only when it beats the
    next row by more than either row's seed std and by something visible at the column's digits, the second only
    when the best is marked and it beats the third likewise (a single seed has no spread: its std counts as 0)."""
    out: dict[tuple, dict[str, int]] = {}
    oracle = summary["oracle"].fillna(False).astype(bool) if "oracle" in summary else False
    keep = (summary["family"] != "Reference") & ~oracle & (summary["budget"] != "smoke")
    for _, group in summary[keep].groupby("budget", sort=False):
        for m in metrics:
            digits, col = specs[m].digits, f"{m}_mean"
            order = group.dropna(subset=[col]).sort_values(col, ascending=not specs[m].higher_is_better)
            vals = [((r["method"], r["variant"], r["budget"]), r[col], 0.0 if pd.isna(r[f"{m}_std"]) else r[f"{m}_std"])
                    for _, r in order.iterrows()]
            for k in (0, 1):  # the second is looked at only once the best is marked
                if k + 1 >= len(vals):
                    break
                (key, a, sa), (_, b, sb) = vals[k], vals[k + 1]
                if abs(a - b) <= max(sa, sb) or round(a, digits) == round(b, digits):
                    break
                out.setdefault(key, {})[m] = k
    return out


def summarise(df: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """One line per (method, budget): mean/std/count of each metric and the run facts."""
    if df.empty:
        return df
    df = df.copy()
    df["variant"] = df["variant"].fillna("") if "variant" in df else ""
    df["family"] = df["family"].fillna("") if "family" in df else ""
    keys = ["method", "variant", "budget"]
    sizes = sorted({m.sample_size for m in metrics if getattr(m, "sample_size", None)})
    agg: dict[str, Any] = {}
    for m in metrics:
        if m in df:
            df[m] = pd.to_numeric(df[m], errors="coerce")
            agg[f"{m}_mean"] = (m, "mean")
            agg[f"{m}_std"] = (m, "std")
    for col, how in (("seed", "nunique"), ("nfe", "first"), ("family", "first"), ("oracle", "first"),
                     ("gpu_minutes", "mean"), ("fit_s", "mean"), ("transport_s", "mean"),
                     ("device_name", "first"), ("n_eval", "first"), *((n, "first") for n in sizes)):
        if col in df:
            agg[col] = (col, how)
    return df.groupby(keys, sort=False).agg(**agg).reset_index()


def render(out: Path, task_cls, fmt: str = "markdown", budget: str | None = None,
           paper_rows: bool = True, rows_dir: Path | None = None) -> str:
    if fmt not in FORMATS:
        raise BenchError(f"unknown table format {fmt!r}; use {', '.join(FORMATS)}")
    df = load_rows(out, task_cls.name, rows_dir)
    if rows_dir is not None:
        out = rows_dir
    if df.empty:
        raise BenchError(f"no finished runs for task {task_cls.name!r} under {out}; "
                         f"run `bench run --task {task_cls.name} --methods ...` first (or pass --out)")
    if budget:
        df = df[df["budget"] == budget]
        if df.empty:
            raise BenchError(f"no runs with budget {budget!r} for task {task_cls.name!r} under {out}")
    specs = {m.key: m for m in task_metrics(task_cls)}
    metrics = [m for m in specs if m in df.columns]
    summary = summarise(df, [specs[m] for m in metrics])
    paper = getattr(task_cls, "paper_values", {}) or {}

    if fmt == "csv":
        table = summary.copy()
        for m in metrics:
            table[f"{m}_paper"] = [paper.get(meth, {}).get(m) for meth in table["method"]]
        return table.to_csv(index=False)

    marks = ranks(summary, metrics, specs)

    headers = ["Method", "Family", "Budget", "Seeds"]
    for m in metrics:
        headers += [specs[m].header, "paper"]
    headers += ["NFE", "GPU min", "fit+transport s"]
    lines = []
    for _, s in summary.iterrows():
        name = s["method"] + (f" [{s['variant']}]" if s["variant"] else "")
        name += " (oracle)" if bool(s.get("oracle")) else ""
        cells = [_cell(name, fmt), _cell(s.get("family", ""), fmt), s["budget"], int(s.get("seed", 1))]
        n_seeds = int(s.get("seed", 1))
        for m in metrics:
            digits = specs[m].digits
            text = _fmt(s.get(f"{m}_mean"), s.get(f"{m}_std"), n_seeds, digits)
            n_key = specs[m].sample_size
            if n_key and text != "-" and not pd.isna(s.get(n_key)):
                text += f" (n={int(s[n_key])})"
            cells.append(_mark(text, marks.get((s["method"], s["variant"], s["budget"]), {}).get(m), fmt))
            pv = paper.get(s["method"], {}).get(m)
            cells.append("-" if pv is None else f"{pv:.{digits}f}")
        gpu = s.get("gpu_minutes")
        cells += [int(s["nfe"]) if not pd.isna(s.get("nfe")) else "-",
                  "-" if gpu is None or pd.isna(gpu) else f"{gpu:.1f}",
                  f"{(s.get('fit_s') or 0) + (s.get('transport_s') or 0):.0f}"]
        lines.append(cells)
    if paper_rows:
        measured = set(summary["method"])
        for meth, vals in paper.items():
            if meth in measured:
                continue
            cells = [_cell(meth, fmt), "(paper only)", "-", 0]
            for m in metrics:
                pv = vals.get(m)
                cells += ["-", "-" if pv is None else f"{pv:.{specs[m].digits}f}"]
            cells += ["-", "-", "-"]
            lines.append(cells)
    tablefmt = {"markdown": "github", "latex": "latex_raw", "text": "simple"}[fmt]
    text = tabulate(lines, headers=headers, tablefmt=tablefmt, disable_numparse=True)

    bound_cols = sorted(c for c in df.columns if c.startswith(BOUND_PREFIX) or c.startswith("lhs_"))
    if bound_cols:
        bdf = df.dropna(subset=bound_cols, how="all")
        if not bdf.empty:
            bdf = bdf.assign(variant=bdf["variant"].fillna(""))
            g = bdf.groupby(["method", "variant", "budget"], sort=False)[bound_cols].mean(
                numeric_only=True).reset_index()
            bl = [[_cell(r["method"] + (f" [{r['variant']}]" if r["variant"] else ""), fmt), r["budget"],
                   *[_num(r.get(c)) for c in bound_cols]] for _, r in g.iterrows()]
            text += "\n\nTheorem 2 terms (mean over seeds; C1..C3 unknown, so terms not a bound):\n\n"
            text += tabulate(bl, headers=["Method", "Budget", *bound_cols], tablefmt=tablefmt,
                             disable_numparse=True)
    changed = _problem_notes(summary)
    if changed and fmt in ("markdown", "text"):
        text += "\n\n" + "\n".join(changed)
    if fmt in ("markdown", "text"):
        text += ("\n\n" + ("Bold: best, <ins>underlined</ins>: second best" if fmt == "markdown" else
                            "Bold: best, underlined: second best (on a terminal)")
                 + " among the non-reference, non-oracle rows of a budget, marked only where the gap exceeds both "
                   "rows' seed std, and never on smoke."
                 + (f" `paper`: the value published in {task_cls.paper_source} (protocols differ; see PROTOCOL.md)."
                    if getattr(task_cls, "paper_source", "") else ""))
        rows = [{k: v for k, v in r.items() if not (isinstance(v, float) and v != v)}  # pandas' NaN: absent
                for r in df.to_dict("records")]
        for note in task_cls.table_notes(rows) if task_cls is not None else ():
            text += "\n\n" + note
    return text


def _problem_notes(summary: pd.DataFrame) -> list[str]:
    """One line per (method, budget) of the table whose budget solves another problem than the authors' (an
    option declared ``problem=True`` at a value that is not theirs, e.g. a larger regulariser)."""
    notes = []
    for (method, budget), _ in summary.groupby(["method", "budget"], sort=False):
        try:
            cls = get_method(method)
        except BenchError:
            continue
        changes = problem_changes(cls.default_options, cls.resolve_options(budget, {}))
        if changes:
            notes.append(f"{method} on {budget} solves another problem than its authors': {'; '.join(changes)} "
                         f"(results/deviations.md).")
    return notes


def _num(v) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(v) else f"{v:.4g}"
