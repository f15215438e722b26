"""The committed deviation table is what the plugins declare, and every method declares something."""
from pathlib import Path

import pytest

from bench.deviations import committed_block, generate, method_section, write
from bench.options import Option
from bench.registry import methods

ROOT = Path(__file__).resolve().parents[1]


def test_committed_deviation_table_is_current():
    committed = committed_block(ROOT / "results" / "deviations.md")
    assert committed is not None, "results/deviations.md has no generated block"
    assert committed == generate(), ("results/deviations.md is stale: run "
                                     "`bench deviations --write results/deviations.md` and commit it")


@pytest.mark.parametrize("name", sorted(methods()))
def test_every_method_says_what_it_was_compared_against(name):
    cls = methods()[name]
    assert cls.family == "Reference" or cls.compared_against, f"{name} declares no compared_against"


def test_a_budget_that_differs_from_the_authors_is_listed_and_bold():
    from bench.api import Method

    class Toy(Method):
        name = "toy-deviations"
        compared_against = "nothing real"
        default_options = {"lr": Option(1e-3, authors=1e-4, source="their train.py"),
                           "steps": Option(smoke=10, cpu=10, fast=10, paper=500, authors=500, source="paper"),
                           "width": Option(64, authors=64, source="model.py")}

    text = method_section(Toy)
    assert "| `lr` | **0.001** | **0.001** | **0.001** | **0.001** | 0.0001 | their train.py |" in text
    assert "| `steps` | **10** | **10** | **10** | 500 | 500 | paper |" in text
    assert "At the authors' value on every budget: `width`." in text
    assert "none found" not in text  # it has differing values


def test_write_keeps_the_notes_below_the_block(tmp_path):
    path = tmp_path / "d.md"
    write(path, generate({}))
    path.write_text(path.read_text() + "a hand-written note\n")
    assert write(path, generate({})) is False
    assert "a hand-written note" in path.read_text()


def test_an_authors_value_needs_its_source():
    with pytest.raises(TypeError, match="source"):
        Option(1.0, authors=2.0)


def test_bench_deviations_writes_the_table_and_reports_when_it_is_current(tmp_path):
    from click.testing import CliRunner

    from bench.cli import cli
    path = tmp_path / "deviations.md"
    first = CliRunner().invoke(cli, ["deviations", "--write", str(path)])
    assert first.exit_code == 0 and "updated" in first.output
    assert committed_block(path) == generate()
    again = CliRunner().invoke(cli, ["deviations", "--write", str(path)])
    assert again.exit_code == 0 and "already current" in again.output


def test_a_budget_that_changes_a_problem_option_is_named_under_the_table():
    from bench.options import problem_changes
    defaults = {"eps": Option(smoke=1e-2, cpu=1e-2, fast=1e-2, paper=2e-5, authors=2e-5, source="s", problem=True),
                "steps": Option(smoke=1, cpu=1, fast=1, paper=9, authors=9, source="s")}  # compute, not problem
    assert problem_changes(defaults, {"eps": 1e-2, "steps": 1}) == ["eps 0.01 (authors: 2e-05)"]
    assert problem_changes(defaults, {"eps": 2e-5, "steps": 1}) == []
