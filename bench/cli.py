"""`bench`: run, status, table, list, eval, data.

The engine modules that import torch are imported inside the commands that use them, so that `bench --help`
and a bad flag answer in a fraction of a second instead of the seconds torch takes to load."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .budgets import BUDGET_NAMES, BUDGETS
from .data import cache_dir, resolve_root
from .errors import BenchError, RunFailed
from .options import declared


def _data_root(value):
    return resolve_root(value)


def _cache_dir():
    return cache_dir()


def _parse_value(raw: str):
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _parse_opts(pairs: tuple[str, ...], methods: list[str]) -> dict[str, dict]:
    """``--opt key=value`` applies to every method; ``--opt method.key=value`` to one."""
    per: dict[str, dict] = {m: {} for m in methods}
    for item in pairs:
        if "=" not in item:
            raise BenchError(f"--opt {item!r} is not KEY=VALUE (e.g. --opt sampler=ddim or --opt otcs.steps=100)")
        key, raw = item.split("=", 1)
        value = _parse_value(raw)
        targets = methods
        if "." in key:
            meth, key = key.split(".", 1)
            if meth not in per:
                raise BenchError(f"--opt {item!r} names method {meth!r}, which is not in --methods")
            targets = [meth]
        for m in targets:
            per[m][key] = value
    return per


def _parse_task_opts(pairs: tuple[str, ...]) -> dict:
    opts = {}
    for item in pairs:
        if "=" not in item:
            raise BenchError(f"--task-opt {item!r} is not KEY=VALUE (e.g. --task-opt prep=plain)")
        key, raw = item.split("=", 1)
        opts[key] = _parse_value(raw)
    return opts


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _seeds(value: str) -> list[int]:
    try:
        seeds = [int(s) for s in _split(value)]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0:
        raise BenchError(f"--seeds {value!r} must be comma-separated integers >= 0, e.g. 0,1,2")
    return seeds


def _grid(methods: str, task: str, seeds: str, budget: str, opts, task_opts) -> list:
    """Every (seed, method) RunSpec, each validated (names, options, budget) before any work."""
    from .registry import get_method, get_task
    from .spec import RunSpec

    names = _split(methods)
    if not names:
        raise BenchError("--methods is empty; name at least one method (see `bench list`)")
    get_task(task)
    for name in names:
        get_method(name)
    seed_list = _seeds(seeds)
    per_opts = _parse_opts(opts, names)
    topts = _parse_task_opts(task_opts)
    specs = [RunSpec(name, task, seed, budget, per_opts[name], topts) for seed in seed_list for name in names]
    for spec in specs[: len(names)]:
        spec.build()  # one-line error for a bad option value, naming option, value and type
    return specs


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="otbench")
def cli():
    """otbench: train OT-guided translation methods, evaluate them, and regenerate OTCS Table 1."""


@cli.command()
@click.option("--methods", "-m", required=True, help="comma-separated method names (see `bench list`)")
@click.option("--task", "-t", required=True, help="task name, e.g. digits, toy1d, toy2d")
@click.option("--seeds", default="0", show_default=True, help="comma-separated seeds")
@click.option("--budget", "-b", default="smoke", show_default=True, type=click.Choice(list(BUDGET_NAMES)))
@click.option("--out", default="runs", show_default=True, type=click.Path(path_type=Path),
              help="results directory (one sub-directory per run)")
@click.option("--data-root", default=None, help="data directory (default: $BENCH_DATA, then ~/.cache/otbench/data)")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N | mps")
@click.option("--bf16/--no-bf16", default=False, help="bf16 autocast on CUDA")
@click.option("--compile/--no-compile", "compile_", default=False, help="torch.compile networks on CUDA")
@click.option("--opt", "opts", multiple=True, help="method option KEY=VALUE or METHOD.KEY=VALUE (repeatable)")
@click.option("--task-opt", "task_opts", multiple=True, help="task option KEY=VALUE (repeatable)")
@click.option("--force", is_flag=True, help="re-run even if a finished row exists")
@click.option("--retry-failed", is_flag=True, help="run failed runs (failed.json) again from scratch; "
              "without it they are reported and skipped")
@click.option("--wait-locked", is_flag=True, help="wait for runs another process holds instead of skipping them")
@click.option("--batch-size", default=500, show_default=True, help="transport batch size")
@click.option("--checkpoint-every", default=120.0, show_default=True, help="seconds between checkpoints in a loop")
@click.option("--progress/--no-progress", default=True, help="progress bars")
@click.option("--probe-every", default=None, type=int,
              help="learning curve: every N steps of the method's main loop, transport a fixed subset of "
                   "the evaluation sources and log the task's cheap metrics (probe stage of log.jsonl)")
@click.option("--probe-n", default=500, show_default=True, help="sources per learning-curve point")
@click.option("--executor", default="local", show_default=True, type=click.Choice(["local", "ray", "slurm"]),
              help="where runs execute: this machine, a Ray cluster, or SLURM jobs (submitit)")
@click.option("--jobs", "-j", default=1, show_default=True, type=int,
              help="local: worker processes (each with cores/N torch threads)")
@click.option("--ray-address", default=None, help="ray: cluster address (default: start a local instance)")
@click.option("--ray-cpus", default=1.0, show_default=True, help="ray: CPUs per run")
@click.option("--ray-gpus", default=None, type=float, help="ray: GPUs per run (default 1 with --device cuda, else 0)")
@click.option("--slurm-partition", default=None, help="slurm: partition")
@click.option("--slurm-time", default="60", show_default=True, help="slurm: time limit per run, minutes or HH:MM:SS")
@click.option("--slurm-gpus", default=None, type=int, help="slurm: GPUs per run (default 1 with --device cuda, else 0)")
@click.option("--slurm-cpus", default=1, show_default=True, help="slurm: CPUs per run")
@click.option("--slurm-local", is_flag=True, help="slurm: run the jobs with submitit's local executor (no cluster)")
def run(methods, task, seeds, budget, out, data_root, device, bf16, compile_, opts, task_opts, force, retry_failed,
        wait_locked, batch_size, checkpoint_every, progress, probe_every, probe_n, executor, jobs, ray_address, ray_cpus, ray_gpus,
        slurm_partition, slurm_time, slurm_gpus, slurm_cpus, slurm_local):
    """Train each method on TASK, transport the test set, evaluate and store one row per run.

    Exit code 0 when every run is finished (or left to the process that holds it), 1 when a run
    failed or crashed, 2 for bad input.
    """
    from .executors import check_executor, run_grid, summary
    from .rundir import check_writable
    from .spec import Settings

    specs = _grid(methods, task, seeds, budget, opts, task_opts)
    settings = Settings(out=Path(out), data_root=_data_root(data_root), cache_dir=_cache_dir(), device=device,
                        bf16=bf16, compile=compile_, force=force, retry_failed=retry_failed,
                        wait_locked=wait_locked, progress=progress and jobs == 1, batch_size=batch_size,
                        checkpoint_every=checkpoint_every, probe_every=probe_every, probe_n=probe_n)
    settings.check()
    check_executor(executor, jobs=jobs, slurm_local=slurm_local, slurm_time=slurm_time, slurm_cpus=slurm_cpus,
                   slurm_gpus=slurm_gpus, ray_cpus=ray_cpus, ray_gpus=ray_gpus)
    check_writable(out)
    outcomes = run_grid(specs, settings, executor=executor, jobs=jobs, ray_address=ray_address,
                        ray_cpus=ray_cpus, ray_gpus=ray_gpus, slurm_partition=slurm_partition,
                        slurm_time=slurm_time, slurm_gpus=slurm_gpus, slurm_cpus=slurm_cpus,
                        slurm_local=slurm_local, log=click.echo)
    click.echo(summary(outcomes))
    click.echo(f"rows stored under {out / task}; show them with `bench table --task {task} --out {out}`")
    if any(o.status in ("failed", "error") for o in outcomes):
        raise SystemExit(1)


@cli.command()
@click.option("--out", default="runs", show_default=True, type=click.Path(path_type=Path))
def upgrade(out):
    """Move run directories made under former option names to today's, so that `bench run` resumes them."""
    from .locks import RunLocked
    from .rundir import CONFIG_FILE, upgrade_run

    moved = skipped = 0
    for config in sorted(Path(out).glob(f"*/*/*/{CONFIG_FILE}")):
        try:
            target = upgrade_run(config.parent)
        except RunLocked as exc:
            click.echo(f"skipped (in use): {exc}")
            skipped += 1
            continue
        if target is not None:
            click.echo(f"{config.parent} -> {target.name}")
            moved += 1
    click.echo(f"{moved} run directories moved to today's option names" + (f", {skipped} in use" if skipped else ""))
    if skipped:
        sys.exit(1)


@cli.command()
@click.option("--task", "-t", required=True)
@click.option("--methods", "-m", default=None, help="comma-separated methods (default: every run directory found)")
@click.option("--seeds", default=None, help="comma-separated seeds (default: 0 with --methods, else all found)")
@click.option("--budget", "-b", default=None, type=click.Choice(list(BUDGET_NAMES)),
              help="budget (default: smoke with --methods, else all found)")
@click.option("--opt", "opts", multiple=True, help="with --methods: the options the runs were started with")
@click.option("--task-opt", "task_opts", multiple=True, help="with --methods: the task options of the runs")
@click.option("--out", default="runs", show_default=True, type=click.Path(path_type=Path))
def status(task, methods, seeds, budget, opts, task_opts, out):
    """Per run: done, running (stage and step), interrupted (resumable), failed (why) or not started."""
    from tabulate import tabulate

    from .rundir import find_runs, run_state

    if methods:
        specs = _grid(methods, task, seeds or "0", budget or "smoke", opts, task_opts)
        dirs = [(s.method, s.seed, s.budget, s.directory(out)) for s in specs]
    else:
        dirs = find_runs(out, task, budget=budget, seeds=None if seeds is None else _seeds(seeds))
        if not dirs:
            click.echo(f"no runs of task {task!r} under {out}; start one with `bench run --task {task} ...` "
                       f"or name them with --methods")
            return
    lines, counts = [], {}
    for method, seed, bud, rundir in dirs:
        state, detail = run_state(rundir)
        counts[state] = counts.get(state, 0) + 1
        lines.append([method, seed, bud, state, detail, str(rundir)])
    click.echo(tabulate(lines, headers=["method", "seed", "budget", "state", "detail", "run directory"],
                        tablefmt="simple"))
    click.echo(", ".join(f"{n} {k}" for k, n in sorted(counts.items())))


@cli.command()
@click.option("--task", "-t", required=True)
@click.option("--out", default="runs", show_default=True, type=click.Path(path_type=Path))
@click.option("--format", "fmt", default=None, type=click.Choice(["text", "markdown", "latex", "csv"]),
              help="default: text on a terminal (best bold, second underlined), markdown when piped or saved")
@click.option("--budget", default=None, help="only rows of this budget")
@click.option("--save", default=None, type=click.Path(path_type=Path), help="also write the table to this file")
@click.option("--paper-rows/--no-paper-rows", default=True, help="list paper-only methods too")
@click.option("--rows", "rows_dir", default=None, type=click.Path(path_type=Path, file_okay=False),
              help="read the collected row files DIR/*.json (e.g. results/digits/rows) instead of --out")
def table(task, out, fmt, budget, save, paper_rows, rows_dir):
    """Render Table 1 for TASK from the stored rows."""
    from . import store
    from .registry import get_task
    from .tables import render

    if rows_dir is not None and not rows_dir.is_dir():
        raise click.UsageError(f"--rows {rows_dir}: no such directory; pass the folder that holds the *.json rows")
    if fmt is None:
        fmt = "text" if sys.stdout.isatty() and not save else "markdown"
    text = render(out, get_task(task), fmt=fmt, budget=budget, paper_rows=paper_rows, rows_dir=rows_dir)
    click.echo(text)
    if save:
        store.write_bytes(save, (click.unstyle(text) + "\n").encode())


@cli.command()
@click.option("--write", "write_to", default=None, type=click.Path(path_type=Path),
              help="rewrite the generated block of this file (e.g. results/deviations.md), keeping its notes")
def deviations(write_to):
    """Every method's differences from its authors' code: option values per budget and declared differences."""
    from .deviations import generate, write

    block = generate()
    if write_to is None:
        click.echo(block)
        return
    changed = write(write_to, block)
    click.echo(f"{write_to}: {'updated' if changed else 'already current'}")


@cli.command(name="list")
@click.option("--methods", "show_methods", is_flag=True, help="only methods")
@click.option("--tasks", "show_tasks", is_flag=True, help="only tasks")
@click.option("--method", "one_method", default=None, help="print this method's resolved options")
@click.option("--budget", default="smoke", show_default=True, type=click.Choice(list(BUDGETS)),
              help="with --method: the budget whose values to print")
def list_(show_methods, show_tasks, one_method, budget):
    """Registered methods, tasks, metrics and budgets (or one method's options for a budget)."""
    from tabulate import tabulate

    from .registry import get_method, methods, tasks
    from .tables import task_metrics

    if one_method:
        cls = get_method(one_method)
        images, vectors = cls.resolve_options(budget, {}, "image"), cls.resolve_options(budget, {}, "vector")
        spec = declared(cls.default_options)
        lines = [[k, json.dumps(v), "" if vectors[k] == v else json.dumps(vectors[k]),
                  spec[k].describe("image") if spec[k].per_budget else "", spec[k].help]
                 for k, v in images.items()]
        click.echo(f"{cls.name} on the {budget} budget (NFE {cls(budget=budget).nfe} on images):")
        click.echo(tabulate(lines, headers=["option", "images", "vectors (where other)", "images per budget", "help"],
                            tablefmt="simple"))
        return
    both = not (show_methods or show_tasks)
    if show_methods or both:
        lines = []
        for name, cls in methods().items():
            nfe = "/".join(str(cls(budget=b).nfe) for b in BUDGETS)
            lines.append([name + (" (oracle)" if cls.oracle else ""), cls.family, ", ".join(cls.settings), nfe,
                          cls.notes])
        click.echo(tabulate(lines, headers=["method", "family", "settings", "NFE (" + "/".join(BUDGETS) + ")",
                                            "notes"], tablefmt="simple"))
    if show_tasks or both:
        click.echo("")
        lines = [[name, cls.setting, ", ".join(f"{m.key} ({m.header}, {'higher' if m.higher_is_better else 'lower'}"
                                                  " is better)" for m in task_metrics(cls)), cls.description]
                 for name, cls in tasks().items()]
        click.echo(tabulate(lines, headers=["task", "setting", "metrics", "description"], tablefmt="simple"))
    if both:
        click.echo("\nbudgets: " + "; ".join(f"{k}: {v}" for k, v in BUDGETS.items()))
        click.echo("one method's options on a budget: `bench list --method otcs --budget cpu`; "
                   "task facts such as the digits classifier's accuracy: `bench data --task digits`")


@cli.command(name="eval")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--data-root", default=None)
@click.option("--device", default="auto", show_default=True)
@click.option("--progress/--no-progress", default=True, help="progress bars")
def eval_(run_dir, data_root, device, progress):
    """Recompute a run's metrics from its stored samples and rewrite its row."""
    from .runner import evaluate_dir
    from .spec import Settings

    settings = Settings(out=Path(run_dir).parent, data_root=_data_root(data_root), cache_dir=_cache_dir(),
                        device=device, progress=progress)
    settings.check()
    row = evaluate_dir(run_dir, settings, log=click.echo, warn=lambda msg: click.echo(msg, err=True))
    click.echo(json.dumps({k: v for k, v in row.items() if not isinstance(v, dict)}, indent=2, default=str))


@cli.command()
@click.option("--task", "-t", default="digits", show_default=True)
@click.option("--data-root", default=None)
@click.option("--download", is_flag=True, help="download missing files from the canonical sources")
def data(task, data_root, download):
    """Verify (or download) a task's data and print its facts, e.g. the classifier's test accuracy."""
    from .registry import get_task

    t = get_task(task)()
    root = _data_root(data_root)
    facts = {**t.check_data(root, download=download), **t.info(root, _cache_dir())}
    click.echo(f"data root: {root}")
    for key, value in facts.items():
        click.echo(f"{key}: {value}")


def main(argv=None):
    """Exit codes: 0 success, 1 a run failed (failed.json) or crashed, 2 bad input (one line)."""

    try:
        cli.main(args=argv, standalone_mode=False)
    except RunFailed as exc:
        click.echo(f"failed: {exc}", err=True)
        sys.exit(1)
    except BenchError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:  # one line, like every other bad input
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        click.echo(f"error: {' '.join(exc.format_message().split())}{hint}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted: the last checkpoint is kept; run the same command again to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
