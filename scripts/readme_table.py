"""The README's digits `cpu` summary table, computed from the committed rows (results/digits/rows).

Only rows run with today's `cpu` defaults are averaged (a row whose options differ, e.g. one run before a
default changed, is named under the table instead). Every number comes from the rows' row.json copies: Acc, FID and plan_acc as mean ± std over the seeds
that have run (sample std, as `bench table`), the whole-run minutes (fit + transport + evaluation) per seed. The two text
columns (the label with the `cpu` settings, what the grids show) and the rows' order are each method's declarations
(``readme_label``, ``readme_grids`` written by whoever looked at the grids, ``readme_order``; bench.api.Method), so a
new method's rows appear here with no edit of this script.

    python scripts/readme_table.py                  # print the table
    python scripts/readme_table.py --write README.md  # replace the block between the cpu-table markers
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.metrics.memorisation import COPY_FLAG  # noqa: E402
from bench.registry import get_task, methods  # noqa: E402
from bench.metrics.classifier import FRAGILE_JUDGE  # noqa: E402
from bench.tables import _fmt, _problem_notes, load_rows  # noqa: E402

BEGIN, END = "<!-- cpu-table:begin -->", "<!-- cpu-table:end -->"


def notes(present=()) -> dict[str, tuple[str, str]]:
    """method -> (label with its cpu settings, what its grids show), in the README's order: every registered method's
    declarations (``readme_label``, ``readme_grids``, ``readme_order``; references last), then any ``present``
    method that is not installed here, under its name."""
    known = methods()
    order = sorted(known, key=lambda m: (known[m].family == "Reference", known[m].readme_order, m))
    out = {m: (known[m].readme_label or m, known[m].readme_grids or "not yet viewed") for m in order}
    out.update({m: (m, "not yet viewed") for m in sorted(set(present) - set(known))})
    return out


def _numbers(values) -> pd.Series:
    return pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce").dropna()


def _cell(values, digits: int) -> str:
    vals = _numbers(values)
    if vals.empty:
        return "-"
    return _fmt(vals.mean(), vals.std(), len(vals), digits)  # `bench table`'s cell: mean ± sample std


def _versus(ours, ref, higher_is_better: bool) -> str:
    """'better' / 'worse' when every seed is on that side of ``ref``, 'mixed' when seeds fall on both sides."""
    vals = _numbers(ours)
    if vals.empty or ref is None:
        return "-"
    better = (vals > ref) if higher_is_better else (vals < ref)
    worse = (vals < ref) if higher_is_better else (vals > ref)
    return "better" if better.all() else "worse" if worse.all() else "mixed"


def _head_to_head(df: pd.DataFrame, a: str, b: str, paper: dict) -> str:
    """Seed-by-seed comparison of two methods on the seeds both have run (the paper's headline pair)."""
    x, y = (df[df["method"] == m].set_index("seed") for m in (a, b))
    seeds = sorted(set(x.index) & set(y.index))
    if not seeds:
        return ""
    n = len(seeds)
    acc = sum(float(x.at[s, "acc"]) > float(y.at[s, "acc"]) for s in seeds)
    fid = sum(float(x.at[s, "fid"]) < float(y.at[s, "fid"]) for s in seeds)
    pa, pb = paper.get(a, {}), paper.get(b, {})
    num = lambda d, k: f"{d[k]:.2f}" if k in d else "-"  # noqa: E731
    return (f"{a.upper()} against {b.upper()} on the {n} seed{'s' if n > 1 else ''} both have run: higher Acc on "
            f"{acc} of {n}, lower FID on {fid} of {n} (the paper: Acc {num(pa, 'acc')} against {num(pb, 'acc')}, "
            f"FID {num(pa, 'fid')} against {num(pb, 'fid')}).")


HEADER = ["| method | seeds | Acc (%) | FID (n = 2,000) | copy (%) | plan_acc (%) | paper Acc | paper FID "
          "| run min (per seed) | vs paper: Acc / FID | what the grids show |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]


def _copy_cell(values) -> str:
    """The copy share, marked when its mean is at the flag (bench.metrics.memorisation): the row retrieves."""
    vals = _numbers(values)
    if vals.empty:
        return "-"
    return _cell(vals, 1) + (" **copies**" if vals.mean() >= COPY_FLAG else "")


def _lines(df: pd.DataFrame, paper: dict) -> list[str]:
    """One line per method (README order): mean ± std over its seeds, minutes per seed, the paper's values."""
    lines = []
    for method, (label, grid) in notes(df["method"]).items():
        sub = df[df["method"] == method].sort_values("seed")
        if sub.empty:
            continue
        seeds = ", ".join(str(int(s)) for s in sub["seed"])
        total = (sub["fit_s"] + sub["transport_s"] + sub["eval_s"]) / 60
        plan = sub["plan_acc"] if "plan_acc" in sub else []
        p = paper.get(method, {})
        lines.append(" | ".join([
            f"| {label}", seeds, _cell(sub["acc"], 2), _cell(sub["fid"], 1),
            _copy_cell(sub["copy"] if "copy" in sub else []), _cell(list(plan), 1),
            f"{p['acc']:.2f}" if "acc" in p else "-", f"{p['fid']:.2f}" if "fid" in p else "-",
            " / ".join(f"{m:.1f}" for m in total),
            f"{_versus(sub['acc'], p.get('acc'), True)} / {_versus(sub['fid'], p.get('fid'), False)}",
            f"{grid} |"]))
    return lines


def table(rows_dir: Path) -> str:
    df = load_rows(Path("runs"), task="digits", rows_dir=rows_dir)
    df = df[df["budget"] == "cpu"]
    # rows judged by the first, noise-fragile classifier (of today's defaults otherwise) get a table of their own
    fragile = df[df["variant"] == FRAGILE_JUDGE]
    # only runs of today's `cpu` defaults are averaged; older settings are named under the table
    # (including rows scored by another judge than the pinned one: `judge=<sha256 prefix>`)
    stale = df[(df["variant"] != "") & (df["variant"] != FRAGILE_JUDGE)].sort_values(["method", "seed"])
    # variants that are references by construction (OTCS's plan retrieval): named with their figures, not as stale
    refs = stale[stale["family"] == "Reference"] if "family" in stale else stale.iloc[:0]
    stale = stale.drop(refs.index)
    df = df[df["variant"] == ""]
    paper = dict(get_task("digits").paper_values)
    if df.empty:
        lines = ["No `cpu` row judged by the noise-robust classifier yet: the table is being regenerated "
                 "(`SEEDS=\"0 1 2\" bash scripts/cpu_table.sh`, one run at a time; rows land in results/digits/rows)."]
    else:
        lines = HEADER + _lines(df, paper)
        legend = ("\"vs paper\": *better* / *worse* when every seed is on that side of the published value, "
                  "*mixed* when the seeds fall on both sides. \"copy\": the share of outputs closer to a target "
                  "training image than 95 % of held-out target images are (a fresh sample of the domain scores ~5 %); "
                  f"**copies** marks a mean of {COPY_FLAG:.0f} % or more; - where the row predates the measure.")
        lines += ["", " ".join(filter(None, [legend, _head_to_head(df, "otcs", "not", paper)]))]
        lines += ["", *_problem_notes(df.assign(budget="cpu"))]
    if not refs.empty:
        lines += ["", "Reference variants (each output a target training image, so copy 100 %; not ranked): " + "; ".join(
            f"{r.method} [{r.variant}] seed {int(r.seed)}: Acc {r.acc:.2f} %, FID {r.fid:.1f}"
            + (f", plan_acc {r.plan_acc:.1f} %" if getattr(r, "plan_acc", None) == getattr(r, "plan_acc", None) else "")
            for r in refs.itertuples()) + "."]
    if not stale.empty:
        lines += ["", "Not in the means (run before a `cpu` default changed, or scored by another judge than the pinned one; their rows are kept): " + "; ".join(
            f"{r.method} seed {int(r.seed)} ({r.variant})" for r in stale.itertuples()) + "."]
    if not fragile.empty:
        lines += ["", f"Not yet regenerated: {len(fragile)} rows judged by the first, noise-fragile classifier "
                  "(their FID stands; their Acc reads a sampler's faint background noise as 零, so it is not "
                  "comparable with the rows above):", "", *HEADER, *_lines(fragile, paper)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=Path, default=ROOT / "results/digits/rows")
    ap.add_argument("--write", type=Path, help="replace the block between the cpu-table markers in this file")
    args = ap.parse_args()
    text = table(args.rows)
    if not args.write:
        print(text)
        return
    doc = args.write.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{args.write} has no {BEGIN} ... {END} block; add the two markers where the table goes")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    tmp = args.write.with_suffix(args.write.suffix + ".tmp")
    tmp.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
    tmp.replace(args.write)


if __name__ == "__main__":
    main()
