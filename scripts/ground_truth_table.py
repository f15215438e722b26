"""Every method on every ground-truth task (issue 37): run the grid, collect its rows, write the table.

    python scripts/ground_truth_table.py run --budget cpu --seeds 0,1,2      # the grid, then collect + table
                                                        [--jobs 2] [--tasks gauss-16,...] [--methods not,...]
    python scripts/ground_truth_table.py collect --budget cpu --seeds 0,1,2  # copy finished rows only
    python scripts/ground_truth_table.py table                               # results/ground_truth/table.md

``run`` calls ``bench run`` once per (task, method), one after the other (one heavy job on a 2-core
machine; a finished run is skipped, an interrupted one resumes), for every method whose settings
cover the task; a pair that cannot run is listed with the reason in the table instead.  ``collect``
copies each finished run's row.json (today's default options only) to
``results/ground_truth/rows/<task>-<method>-<budget>-seed<S>.json``; ``table`` renders those rows:
method x task, mean ± std over the seeds found (sample std), and the minutes of a whole run (fit,
transport and scoring).  ``bench table --task gauss-16 --rows results/ground_truth/rows`` shows one
task's rows in the generic layout.
"""
from __future__ import annotations

import argparse
import functools
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.api import BenchError  # noqa: E402
from bench.datasets.ground_truth import GROUND_TRUTH_TASKS  # noqa: E402
from bench.registry import get_task, methods  # noqa: E402
from bench.tables import load_rows  # noqa: E402

RESULTS = ROOT / "results" / "ground_truth"
MAP_TASKS = [t for t in GROUND_TRUTH_TASKS if not t.startswith("clusters")]
PAIRED_TASKS = [t for t in GROUND_TRUTH_TASKS if t.startswith("clusters")]


@functools.lru_cache(maxsize=None)
def _data(task: str):
    return get_task(task)().load(None, 0)


@functools.lru_cache(maxsize=None)
def applicable(method: str, task: str, budget: str = "smoke") -> tuple[bool, str]:
    """(True, "") when ``method`` can run on ``task``; else (False, why), in a few words."""
    cls, tcls = methods()[method], get_task(task)
    if tcls.setting not in cls.settings:
        return False, f"{'/'.join(cls.settings)} only"
    data = _data(task)
    if cls.oracle and data.source_train_labels is None:
        return False, "needs class labels (task has none)"
    try:
        cls(budget=budget, kind=data.kind).check_setting(data)
    except BenchError as exc:
        return False, str(exc)
    return True, ""


def grid(tasks: list[str], names: list[str] | None) -> list[tuple[str, str]]:
    names = names or list(methods())
    return [(t, m) for t in tasks for m in names if applicable(m, t)[0]]


def run(args) -> int:
    failed = 0
    for task, method in grid(args.tasks, args.methods):
        cmd = [sys.executable, "-m", "bench.cli", "run", "--methods", method, "--task", task, "--budget", args.budget,
               "--seeds", args.seeds, "--out", str(args.out), "--no-progress", "--jobs", str(args.jobs)]
        print("$ bench", " ".join(cmd[3:]), flush=True)
        if args.dry_run:
            continue
        res = subprocess.run(cmd, cwd=ROOT)
        failed += res.returncode != 0
        collect(args, quiet=True)
        write_table(args.rows, args.table, args.budget)
    return 1 if failed else 0


def collect(args, quiet: bool = False) -> int:
    """Copy the finished rows of today's default options into the rows folder."""
    from bench.spec import RunSpec
    rows = Path(args.rows)
    rows.mkdir(parents=True, exist_ok=True)
    copied = 0
    for task, method in grid(args.tasks, args.methods):
        for seed in (int(s) for s in args.seeds.split(",")):
            src = RunSpec(method, task, seed, args.budget).directory(Path(args.out)) / "row.json"
            if src.exists():
                shutil.copyfile(src, rows / f"{task}-{method}-{args.budget}-seed{seed}.json")
                copied += 1
    if not quiet:
        print(f"copied {copied} rows into {rows}")
    return 0


# -- the table ------------------------------------------------------------------------------------
def _cell(values: pd.Series, digits: int) -> str:
    v = pd.to_numeric(values, errors="coerce").dropna()
    if v.empty:
        return ""
    if abs(v.mean()) >= 1e4:  # a diverged run: the order of magnitude is the information
        return f"{v.mean():.1e}" + (f" ± {v.std():.1e}" if len(v) > 1 else "") + " (diverged)"
    text = f"{v.mean():.{digits}f}"
    if len(v) > 1:
        text += f" ± {v.std():.{digits}f}"
    return text


def _minutes(df: pd.DataFrame) -> pd.Series:
    parts = [pd.to_numeric(df[c], errors="coerce").fillna(0) for c in ("fit_s", "transport_s", "eval_s") if c in df]
    return sum(parts) / 60 if parts else pd.Series(dtype=float)


def _markdown(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


def render(rows_dir: Path, budget: str, table: str = "results/ground_truth/table.md") -> str:
    frames = []
    for task in GROUND_TRUTH_TASKS:
        df = load_rows(Path(rows_dir), task, rows_dir=Path(rows_dir)) if Path(rows_dir).is_dir() else pd.DataFrame()
        if not df.empty:
            frames.append(df)
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["task", "method", "budget", "variant"])
    df = df[df["budget"] == budget]
    other = df[df["variant"].fillna("") != ""]
    df = df[df["variant"].fillna("") == ""]
    df = df.assign(minutes=_minutes(df)) if not df.empty else df.assign(minutes=[])
    names = list(methods())
    seeds = sorted({int(s) for s in df["seed"]}) if not df.empty else []
    devices = sorted(set(df["device_name"].dropna())) if "device_name" in df else []

    def group(task, method):
        return df[(df["task"] == task) & (df["method"] == method)]

    def cell(task, method, key, digits, minutes=True):
        g = group(task, method)
        if g.empty:
            ok, why = applicable(method, task)
            return "not run" if ok else f"– ({why})"
        text = _cell(g[key], digits) if key in g else ""
        n = g["seed"].nunique()
        if minutes:
            text += f" <sub>n={n}, {g['minutes'].mean():.1f} min</sub>"
        return text

    parts = [f"# Ground-truth tasks: every method against a known OT map ({budget} budget)", "",
             f"Generated by `python scripts/ground_truth_table.py table --budget {budget}"
             + ("" if str(table).endswith("results/ground_truth/table.md") else f" --table {table}")
             + "` from the rows in "
             f"`results/ground_truth/rows/` (`{budget}` budget, today's default options; "
             f"seeds found: {', '.join(map(str, seeds)) or 'none'}).  Cells: mean ± std over seeds "
             "(sample std), then <sub>n = seeds, minutes per whole run (fit + transport + scoring)</sub>. "
             "Tasks and metrics: `datasets/ground_truth.py`, `bench/metrics/ot_map.py`. The whole grid: "
             f"`python scripts/ground_truth_table.py run --budget {budget} --seeds 0,1,2` (finished runs are skipped, "
             "interrupted ones resume).", ""]
    if devices:
        parts += ["Machines: " + "; ".join(devices) + ". Minutes are wall-clock: on a machine shared with other jobs "
                  "they overstate a run's cost (each row's `timings` and `fit_s` are in its row file).", ""]
    map_methods = [m for m in names if any(applicable(m, t)[0] for t in MAP_TASKS)]
    skipped = [m for m in names if m not in map_methods]

    def block(title, key, digits, better, note=""):
        head = ["method"] + MAP_TASKS
        lines = [[m] + [cell(t, m, key, digits, minutes=(key == "l2_uvp")) for t in MAP_TASKS] for m in map_methods]
        return [f"## {title} ({better})", "", *( [note, ""] if note else []), _markdown(head, lines), ""]

    parts += block("L2-UVP (%) of the map", "l2_uvp", 2, "lower is better; 0 = the exact map",
                   "100 E||T(x) - T*(x)||^2 / Var(Q); a stochastic method's map is its barycentric projection "
                   "(16 draws per source; the draws' own noise is the row's `l2_uvp_draw_noise`). KNOT solves a "
                   "different (kernel) cost, so its distance to the quadratic-cost map is by design.")
    parts += block("BW2-UVP (%) of the output marginal", "bw2_uvp", 2, "lower is better",
                   "100 BW2^2(Gaussian fit of the outputs, Q) / Var(Q): a marginal check; n exact target samples "
                   "score `bw2_uvp_floor` (about 0.1 / 0.2-0.3 / 0.7 in 2 / 16 / 64-D at n = 2,000).")
    parts += block("cos of the displacement fields", "cos", 3, "higher is better; 1 = the exact direction")
    plan_cols = [c for c in ("bound_marginal_x", "bound_marginal_y") if c in df]
    planned = df[df[plan_cols].notna().any(axis=1)] if plan_cols else df.iloc[:0]
    if not planned.empty:
        head = ["method", *GROUND_TRUTH_TASKS]
        lines = [[m] + [" / ".join(_cell(planned[(planned["task"] == t) & (planned["method"] == m)][c], 3) or "-"
                                   for c in plan_cols) for t in GROUND_TRUTH_TASKS]
                 for m in sorted(set(planned["method"]))]
        parts += ["## The fitted plans' marginal errors (x / y)", "",
                  "For methods that fit a plan first (OTCS): its marginal errors `bound_marginal_x / bound_marginal_y` "
                  "(Theorem 2's terms), beside the barycentric map scored above.", "", _markdown(head, lines), ""]
    if skipped:
        parts += ["Not run on these tasks: " + "; ".join(f"{m} ({applicable(m, MAP_TASKS[0])[1]})" for m in skipped)
                  + ".", ""]

    for task in PAIRED_TASKS:
        head = ["method", "right cluster (%)", "cost's cluster (%)", "L2-UVP", "BW2-UVP", "seeds", "min/run"]
        lines = []
        for m in names:
            g = group(task, m)
            if g.empty:
                ok, why = applicable(m, task)
                lines.append([m, "not run" if ok else f"– ({why})", "", "", "", "", ""])
                continue
            lines.append([m, _cell(g["cluster_hit"], 1), _cell(g.get("cost_cluster_hit", pd.Series(dtype=float)), 1),
                          _cell(g["l2_uvp"], 1), _cell(g["bw2_uvp"], 1), str(g["seed"].nunique()),
                          f"{g['minutes'].mean():.1f}"])
        parts += [f"## {task}: semi-paired, the right pairing shown only by the guiding pairs", "",
                  "Right cluster: share of outputs nearest the target cluster the pairs name (the quadratic cost "
                  "alone sends each cluster to another one: the `cost's cluster` column). L2-UVP against the "
                  "right map (each cluster translated onto its partner).", "", _markdown(head, lines), ""]
    if not other.empty:
        parts += ["Rows with other options (not averaged above): " + "; ".join(
            sorted({f"{r.method} on {r.task} [{r.variant}]" for r in other.itertuples()})) + ".", ""]
    return "\n".join(parts).rstrip() + "\n"


def write_table(rows_dir: Path, path: Path, budget: str) -> None:
    try:
        shown = Path(path).resolve().relative_to(ROOT)
    except ValueError:
        shown = Path(path)
    text = render(rows_dir, budget, str(shown))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=("run", "collect", "table"))
    ap.add_argument("--budget", default="cpu")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", type=Path, default=ROOT / "runs", help="bench run's results directory")
    ap.add_argument("--tasks", default=",".join(GROUND_TRUTH_TASKS))
    ap.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    ap.add_argument("--rows", type=Path, default=RESULTS / "rows")
    ap.add_argument("--table", type=Path, default=RESULTS / "table.md")
    ap.add_argument("--jobs", type=int, default=1, help="run: bench run --jobs (worker processes per call)")
    ap.add_argument("--dry-run", action="store_true", help="run: print the bench commands only")
    args = ap.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.methods = [m for m in args.methods.split(",") if m] if args.methods else None
    if args.command == "run":
        return run(args)
    if args.command == "collect":
        collect(args)
    write_table(args.rows, args.table, args.budget)
    print(f"wrote {args.table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
