"""A method added from outside the repository (issue 40, "honest seams"): one module of its own, written here the
way the README tells a newcomer to add a single-file plugin (a module that calls
``bench.registry.register_method``, imported through ``BENCH_PLUGINS``).  `bench list`, `bench run`, `bench table`
and the README's digits table (scripts/readme_table.py) serve it without any edit of the engine or the scripts."""
from __future__ import annotations

import json
import sys
import textwrap

import pytest


MODULE = "otbench_plugin_shift"  # the third-party module's name (unique: nothing else may import it)
METHOD = "plugin-shift"
LABEL = "plugin-shift (moment matching, 50 steps)"
GRIDS = "the sources, brightened"

PLUGIN = '''
"""A per-coordinate affine map fitted by moment matching: the README's example baseline, as a newcomer writes it."""
import torch

from bench.api import SEMI_PAIRED, UNPAIRED, Method
from bench.options import Option
from bench.registry import register_method


class ShiftMap(Method):
    name = "{method}"
    family = "Toy"
    settings = (UNPAIRED, SEMI_PAIRED)
    notes = "matches each coordinate's mean and std; guiding pairs unused"
    probe_loop = "fit"
    probe_every = {{"cpu": 100}}
    readme_label = "{label}"
    readme_grids = "{grids}"
    default_options = {{
        "steps": Option(smoke=20, cpu=500, fast=500, paper=500),
        "lr": 0.05,
    }}
    test_options = {{"steps": 5}}
    state_attrs = ("scale", "shift")  # what a checkpoint saves and a resume restores

    def setup(self, data, run):
        self.scale = torch.nn.Parameter(torch.ones(data.shape))
        self.shift = torch.nn.Parameter(torch.zeros(data.shape))

    def fit(self, data, run):
        x, y = data.source_train.to(run.device), data.target_train.to(run.device)
        opt = self.optimizer("adam", torch.optim.Adam([self.scale, self.shift], lr=self.options["lr"]))
        g = run.generator("shift-batches")
        for step in run.loop("fit", self.options["steps"]):
            xb = x[torch.randint(len(x), (64,), generator=g, device=run.device)]
            yb = y[torch.randint(len(y), (64,), generator=g, device=run.device)]
            out = xb * self.scale + self.shift
            loss = (out.mean(0) - yb.mean(0)).pow(2).mean() + (out.std(0) - yb.std(0)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if run.should_log(step):
                run.log("fit", step, loss=loss)

    @torch.no_grad()
    def transport(self, x, generator=None):
        y = x * self.scale + self.shift
        return y.clamp(-1, 1) if x.dim() == 4 else y


register_method(ShiftMap)
'''


@pytest.fixture
def plugin(tmp_path, third_party_plugin):
    """The plugin's module in a folder outside the repository, loaded through BENCH_PLUGINS."""
    src = tmp_path / "plugin"
    src.mkdir()
    (src / f"{MODULE}.py").write_text(textwrap.dedent(PLUGIN).format(method=METHOD, label=LABEL, grids=GRIDS))
    third_party_plugin(src, MODULE)


def test_a_method_plugin_is_listed_run_tabled_and_in_the_readme_table(plugin, tmp_path, one_thread, script,
                                                                      monkeypatch, bench_ok):
    listed = bench_ok("list", "--methods")
    (line,) = [ln for ln in listed.splitlines() if ln.startswith(METHOD)]
    assert "Toy" in line and "matches each coordinate's mean and std" in line

    out = tmp_path / "runs"
    bench_ok("run", "--methods", METHOD, "--task", "toy1d", "--budget", "smoke", "--out", out,
           "--data-root", tmp_path, "--device", "cpu", "--no-progress")
    (path,) = (out / "toy1d" / METHOD).glob("smoke-seed0*/row.json")
    row = json.loads(path.read_text())
    assert row["method"] == METHOD and row["options"] == {"steps": 20, "lr": 0.05}

    table = bench_ok("table", "--task", "toy1d", "--out", out, "--format", "markdown")
    first = table.split("\n\n")[0].splitlines()  # the metrics table (the Theorem 2 terms follow it)
    headers = [c.strip() for c in first[0].strip("|").split("|")]
    (cells,) = [[c.strip() for c in ln.strip("|").split("|")] for ln in first if ln.startswith(f"| {METHOD} ")]
    assert cells[headers.index("Family")] == "Toy" and cells[headers.index("W2")] == f"{row['w2']:.2f}"

    # the README's digits `cpu` table: the plugin's row under its declared label and grid note, before the
    # references, with no edit of scripts/readme_table.py
    rows = tmp_path / "rows"
    rows.mkdir()
    for method, acc in ((METHOD, 12.5), ("identity", 9.5)):
        (rows / f"{method}-cpu-seed0.json").write_text(json.dumps(
            {"method": method, "budget": "cpu", "task": "digits", "seed": 0, "acc": acc, "fid": 80.0,
             "fit_s": 600.0, "transport_s": 60.0, "eval_s": 240.0}))
    readme = tmp_path / "README.md"
    mod = script("readme_table")
    readme.write_text(f"# a README\n\n{mod.BEGIN}\nold\n{mod.END}\n\nthe rest\n")
    monkeypatch.setattr(sys, "argv", ["readme_table.py", "--rows", str(rows), "--write", str(readme)])
    mod.main()
    text = readme.read_text()
    assert text.startswith("# a README\n") and text.endswith("\nthe rest\n") and "\nold\n" not in text
    lines = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| method")]
    assert lines[0].startswith(f"| {LABEL} | 0 | 12.50 | 80.0 |") and lines[0].endswith(f"| {GRIDS} |")
    assert lines[1].startswith("| identity (reference")
