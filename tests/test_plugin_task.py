"""A task added from outside the repository (issue 40, "honest seams"): one module of its own, written here the
way the README tells a newcomer to add a single-file plugin (a module that calls
``bench.registry.register_task``, imported through ``BENCH_PLUGINS``), declaring its own data file, its own
published values and a metric the engine has never seen.  `bench list`, `bench data`, `bench run` and
`bench table` serve it without any edit of the engine."""
from __future__ import annotations

import hashlib
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from bench.api import BenchError
from bench.cli import cli, main

MODULE = "otbench_plugin_points"  # the third-party module's name (unique: nothing else may import it)
TASK = "plugin-points"
SHIFT = 3.0  # the target is the source moved by (SHIFT, 0): the identity map is off by exactly SHIFT

PLUGIN = '''
"""Points: 2-D source points read from the data root; the target is the source moved by ({shift}, 0)."""
from pathlib import Path

import numpy as np
import torch

from bench.api import UNPAIRED, DataFile, Metric, Task, TaskData
from bench.data import ensure, resolve_root
from bench.paper import csv_column
from bench.registry import register_task

HERE = Path(__file__).resolve().parent
POINTS = DataFile("plugin_points/points.npy", "{sha256}", {size},
                  manual="write ROOT/plugin_points/points.npy with the plugin's own generator")


class PointsTask(Task):
    name = "{task}"
    kind = "vector"
    setting = UNPAIRED
    metrics = (Metric("gap", "Mean gap", higher_is_better=False, digits=3),)
    description = "2-D points moved by ({shift}, 0), read from a file of the data root"
    eval_sizes = {{"smoke": None, "cpu": None, "fast": None, "paper": None}}
    data_files = (POINTS,)
    paper_values = csv_column(HERE / "published.csv", "points", names={{"Identity map": "identity"}})

    def load(self, data_root, seed, budget="smoke"):
        found = ensure(resolve_root(data_root), self.data_files)
        x = torch.from_numpy(np.load(found[POINTS.path])).float()
        shift = torch.tensor([{shift}, 0.0])
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(x), generator=g)
        train, test = x[perm[:48]], x[perm[48:]]
        return TaskData(name=self.name, setting=self.setting, source_train=train, target_train=train + shift,
                        source_test=test, target_test=test + shift)

    def evaluate(self, data, sources, outputs, labels, ctx):
        truth = sources + torch.tensor([{shift}, 0.0])
        return {{"gap": float((outputs - truth).norm(dim=1).mean())}}


register_task(PointsTask)
'''

PUBLISHED = """\
method,method_type,points_gap,other_gap
Identity map,Reference,2.5,
NOT,OT,0.125,1.0
"""


@pytest.fixture
def plugin(tmp_path, third_party_plugin):
    """The plugin's module and data root in folders outside the repository, loaded through BENCH_PLUGINS."""
    root = tmp_path / "data"
    points = root / "plugin_points" / "points.npy"
    points.parent.mkdir(parents=True)
    np.save(points, np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32))
    raw = points.read_bytes()
    src = tmp_path / "plugin"
    src.mkdir()
    (src / f"{MODULE}.py").write_text(textwrap.dedent(PLUGIN).format(
        sha256=hashlib.sha256(raw).hexdigest(), size=len(raw), task=TASK, shift=SHIFT))
    (src / "published.csv").write_text(PUBLISHED)
    third_party_plugin(src, MODULE)
    return root, points


def test_a_task_plugin_brings_its_own_files_and_paper_values(plugin, tmp_path, one_thread, capsys, bench_ok):
    root, points = plugin
    listed = bench_ok("list", "--tasks")
    (line,) = [ln for ln in listed.splitlines() if ln.startswith(TASK)]
    assert "gap (Mean gap, lower is better)" in line and "moved by (3.0, 0)" in line

    out = bench_ok("data", "--task", TASK, "--data-root", root)
    assert f"data root: {root}" in out and "verified files: 1" in out

    out = tmp_path / "runs"
    bench_ok("run", "--methods", "identity", "--task", TASK, "--budget", "smoke", "--out", out,
           "--data-root", root, "--device", "cpu", "--no-progress")
    (row,) = (out / TASK / "identity").glob("smoke-seed0*/row.json")

    table = bench_ok("table", "--task", TASK, "--out", out, "--format", "markdown")
    lines = [ln for ln in table.splitlines() if ln.startswith("|")]
    headers = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {r[0]: r for r in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:])}
    gap = headers.index("Mean gap")
    assert headers[gap + 1] == "paper"
    assert rows["identity"][gap] == f"{SHIFT:.3f}" and rows["identity"][gap + 1] == "2.500"  # measured, then published
    assert rows["not"][1] == "(paper only)" and rows["not"][gap + 1] == "0.125"

    # corrupted in place, size kept: `bench data` refuses in one line naming the file and both sha256 prefixes
    raw = bytearray(points.read_bytes())
    raw[-1] ^= 0xFF
    points.write_bytes(bytes(raw))
    with pytest.raises(BenchError, match="corrupt"):
        CliRunner().invoke(cli, ["data", "--task", TASK, "--data-root", str(root)], catch_exceptions=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["data", "--task", TASK, "--data-root", str(root)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert str(points) in err[0] and "is corrupt" in err[0] and hashlib.sha256(raw).hexdigest()[:12] in err[0]
    assert "plugin's own generator" in err[0]  # the file's own `manual` says how to get it back
    points.unlink()
    with pytest.raises(SystemExit):
        main(["data", "--task", TASK, "--data-root", str(root)])
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "plugin_points/points.npy not found under" in err
