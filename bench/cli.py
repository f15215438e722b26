"""`bench`: run, table, list, eval, data."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .api import BenchError
from .budgets import BUDGETS, Budget


def _data_root(value):
    from .data import resolve_root
    return resolve_root(value)


def _cache_dir():
    from .data import cache_dir
    return cache_dir()


def _parse_opts(pairs: tuple[str, ...], methods: list[str]) -> dict[str, dict]:
    """``--opt key=value`` applies to every method; ``--opt method.key=value`` to one."""
    per: dict[str, dict] = {m: {} for m in methods}
    for item in pairs:
        if "=" not in item:
            raise BenchError(f"--opt {item!r} is not KEY=VALUE (e.g. --opt sampler=ddim or --opt otcs.steps=100)")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        targets = methods
        if "." in key:
            meth, key = key.split(".", 1)
            if meth not in per:
                raise BenchError(f"--opt {item!r} names method {meth!r}, which is not in --methods")
            targets = [meth]
        for m in targets:
            per[m][key] = value
    return per


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="otbench")
def cli():
    """otbench: train OT-guided translation methods, evaluate them, and regenerate OTCS Table 1."""


@cli.command()
@click.option("--methods", "-m", required=True, help="comma-separated method names (see `bench list`)")
@click.option("--task", "-t", required=True, help="task name, e.g. digits, toy1d, toy2d")
@click.option("--seeds", default="0", show_default=True, help="comma-separated seeds")
@click.option("--budget", "-b", default="smoke", show_default=True, help="smoke | fast | paper")
@click.option("--out", default="runs", show_default=True, type=click.Path(path_type=Path),
              help="results directory (one sub-directory per run)")
@click.option("--data-root", default=None, help="data directory (default: $BENCH_DATA, then ~/.cache/otbench/data)")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N | mps")
@click.option("--bf16/--no-bf16", default=False, help="bf16 autocast on CUDA")
@click.option("--compile/--no-compile", "compile_", default=False, help="torch.compile networks on CUDA")
@click.option("--opt", "opts", multiple=True, help="method option KEY=VALUE or METHOD.KEY=VALUE (repeatable)")
@click.option("--force", is_flag=True, help="re-run even if a finished row exists")
@click.option("--batch-size", default=500, show_default=True, help="transport batch size")
@click.option("--progress/--no-progress", default=True, help="progress bars")
def run(methods, task, seeds, budget, out, data_root, device, bf16, compile_, opts, force, batch_size, progress):
    """Train each method on TASK, transport the test set, evaluate and store one row per run."""
    from .registry import get_method, get_task
    from .runner import RunSpec, check_writable, run_one

    names = _split(methods)
    if not names:
        raise BenchError("--methods is empty; name at least one method (see `bench list`)")
    get_task(task)
    for name in names:
        get_method(name)
    Budget(budget)
    try:
        seed_list = [int(s) for s in _split(seeds)]
    except ValueError:
        raise BenchError(f"--seeds {seeds!r} must be comma-separated integers, e.g. 0,1,2") from None
    per_opts = _parse_opts(opts, names)
    for name in names:  # validate options before any training starts
        get_method(name)(**per_opts[name])
    check_writable(out)
    root = _data_root(data_root)
    cache = _cache_dir()
    for seed in seed_list:
        for name in names:
            run_one(RunSpec(name, task, seed, budget, per_opts[name]), out=out, data_root=root,
                    cache_dir=cache, device=device, bf16=bf16, compile=compile_, force=force,
                    progress=progress, batch_size=batch_size, log=click.echo)
    click.echo(f"rows stored under {out / task}; show them with `bench table --task {task} --out {out}`")


@cli.command()
@click.option("--task", "-t", required=True)
@click.option("--out", default="runs", show_default=True, type=click.Path(path_type=Path))
@click.option("--format", "fmt", default="markdown", show_default=True,
              type=click.Choice(["markdown", "latex", "csv"]))
@click.option("--budget", default=None, help="only rows of this budget")
@click.option("--save", default=None, type=click.Path(path_type=Path), help="also write the table to this file")
@click.option("--paper-rows/--no-paper-rows", default=True, help="list paper-only methods too")
def table(task, out, fmt, budget, save, paper_rows):
    """Render Table 1 for TASK from the stored rows."""
    from . import store
    from .registry import get_task
    from .tables import render

    text = render(out, get_task(task), fmt=fmt, budget=budget, paper_rows=paper_rows)
    click.echo(text)
    if save:
        store.write_bytes(save, (text + "\n").encode())


@cli.command(name="list")
@click.option("--methods", "show_methods", is_flag=True, help="only methods")
@click.option("--tasks", "show_tasks", is_flag=True, help="only tasks")
def list_(show_methods, show_tasks):
    """Registered methods, tasks, metrics and budgets."""
    from tabulate import tabulate

    from .registry import methods, tasks
    from .tables import METRICS

    both = not (show_methods or show_tasks)
    if show_methods or both:
        lines = []
        for name, cls in methods().items():
            try:
                nfe = cls().nfe
            except BenchError:
                nfe = "by budget"
            lines.append([name + (" (oracle)" if cls.oracle else ""), cls.family, ", ".join(cls.settings), nfe,
                          cls.notes])
        click.echo(tabulate(lines, headers=["method", "family", "settings", "NFE", "notes"], tablefmt="simple"))
    if show_tasks or both:
        click.echo("")
        lines = [[name, cls.setting, ", ".join(cls.metrics), cls.description] for name, cls in tasks().items()]
        click.echo(tabulate(lines, headers=["task", "setting", "metrics", "description"], tablefmt="simple"))
    if both:
        click.echo("\nmetrics: " + ", ".join(f"{k} ({v[0]}, {'higher' if v[1] else 'lower'} is better)"
                                              for k, v in METRICS.items()))
        click.echo("budgets: " + "; ".join(f"{k}: {v}" for k, v in BUDGETS.items()))
        click.echo("task facts such as the digits classifier's accuracy: `bench data --task digits`")


@cli.command(name="eval")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--data-root", default=None)
@click.option("--device", default="auto", show_default=True)
def eval_(run_dir, data_root, device):
    """Recompute a run's metrics from its stored samples and rewrite its row."""
    from .runner import evaluate_dir

    row = evaluate_dir(run_dir, data_root=_data_root(data_root), cache_dir=_cache_dir(), device=device)
    click.echo(json.dumps({k: v for k, v in row.items() if not isinstance(v, dict)}, indent=2, default=str))


@cli.command()
@click.option("--task", "-t", default="digits", show_default=True)
@click.option("--data-root", default=None)
@click.option("--download", is_flag=True, help="download missing files from the canonical sources")
def data(task, data_root, download):
    """Verify (or download) a task's data and print its facts, e.g. the classifier's test accuracy."""
    from .registry import get_task

    cls = get_task(task)
    root = _data_root(data_root)
    if download:
        from .data import TASK_FILES, ensure_task
        if cls.name in TASK_FILES:
            ensure_task(cls.name, root, download=True)
    info = cls().info(root, _cache_dir())
    click.echo(f"data root: {root}")
    for key, value in info.items():
        click.echo(f"{key}: {value}")


def main(argv=None):
    try:
        cli.main(args=argv, standalone_mode=False)
    except BenchError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted: the last checkpoint is kept; run the same command again to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
