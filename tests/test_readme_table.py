"""The README's digits cpu table is computed from the committed rows, and stays in step with them."""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pinned_judge() -> str:
    from bench.datasets.digits import DigitsTask
    assert len(DigitsTask.pinned_judges) == 1
    return next(iter(DigitsTask.pinned_judges))


PINNED = _pinned_judge()


def _row(tmp: Path, method: str, seed: int, acc: float, fid: float, **extra):
    row = {"method": method, "budget": "cpu", "task": "digits", "seed": seed, "acc": acc, "fid": fid,
           "fit_s": 600.0, "transport_s": 60.0, "eval_s": 240.0, **extra}
    (tmp / f"{method}-cpu-seed{seed}.json").write_text(json.dumps(row))


def test_cells_are_mean_and_sample_std_over_seeds(tmp_path, script):
    mod = script("readme_table")
    _row(tmp_path, "otcs", 0, 10.0, 90.0, plan_acc=20.0, copy=4.0)
    _row(tmp_path, "otcs", 1, 12.0, 110.0, plan_acc=16.0, copy=6.0)
    _row(tmp_path, "not", 0, 8.0, 80.0, copy=90.0)
    text = mod.table(tmp_path)
    otcs = next(line for line in text.splitlines() if line.startswith("| OTCS"))
    cells = [c.strip() for c in otcs.strip("|").split("|")]
    # seeds, Acc, FID, copy, plan_acc, paper Acc, paper FID, minutes per seed
    assert cells[1:9] == ["0, 1", "11.00 ± 1.41", "100.0 ± 14.1", "5.0 ± 1.4", "18.0 ± 2.8", "67.42", "5.12",
                          "15.0 / 15.0"]
    nrow = next(line for line in text.splitlines() if line.startswith("| NOT"))
    assert "| 0 | 8.00 | 80.0 | 90.0 **copies** | - |" in nrow  # a retrieving row is marked
    assert "KNOT" not in text                     # a method with no row is left out


def test_comparisons_with_the_paper_and_otcs_against_not_are_computed(tmp_path, script):
    mod = script("readme_table")
    _row(tmp_path, "otcs", 0, 70.0, 4.0)          # paper: Acc 67.42, FID 5.12
    _row(tmp_path, "otcs", 1, 60.0, 4.5)
    _row(tmp_path, "not", 0, 8.0, 30.0)           # paper: Acc 15.72, FID 23.90
    _row(tmp_path, "not", 1, 80.0, 3.0)
    _row(tmp_path, "not", 2, 9.0, 40.0)
    text = mod.table(tmp_path)
    cells = {line.split("|")[1].strip().split(" ")[0]: [c.strip() for c in line.strip("|").split("|")]
             for line in text.splitlines() if line.startswith("| ") and not line.startswith("| method")}
    assert cells["OTCS"][9] == "mixed / better"
    assert cells["NOT"][9] == "mixed / mixed"
    assert "OTCS against NOT on the 2 seeds both have run: higher Acc on 1 of 2, lower FID on 1 of 2" in text


def test_rows_of_an_older_default_are_named_not_averaged(tmp_path, script):
    from bench.registry import get_method, get_task
    mod = script("readme_table")
    opts = get_method("otcs")(budget="cpu").options
    task_opts = get_task("digits")().options
    _row(tmp_path, "otcs", 1, 12.0, 110.0, options=opts, task_options=task_opts)
    _row(tmp_path, "otcs", 2, 14.0, 130.0, options=opts, task_options=task_opts)
    _row(tmp_path, "otcs", 0, 99.0, 10.0, options={**opts, "steps": 1}, task_options=task_opts)
    text = mod.table(tmp_path)
    otcs = next(line for line in text.splitlines() if line.startswith("| OTCS"))
    assert "| 1, 2 | 13.00 ± 1.41 | 120.0 ± 14.1 |" in otcs
    assert "otcs seed 0 (steps=1)" in text.splitlines()[-1]


def test_rows_follow_the_methods_declarations_and_a_method_not_installed_keeps_its_name(tmp_path, script):
    """Labels, grid notes and order are the method classes' (readme_label, readme_grids, readme_order): a new method
    needs no edit of the script; rows of a method not installed here are shown under its name, after the others."""
    from bench.registry import get_method
    mod = script("readme_table")
    for method in ("identity", "knot", "not", "mymethod"):
        _row(tmp_path, method, 0, 10.0, 90.0)
    lines = [ln for ln in mod.table(tmp_path).splitlines() if ln.startswith("| ") and not ln.startswith("| method")]
    assert [ln.split(" | ")[0] for ln in lines] == ["| " + get_method("not").readme_label,
                                                   "| " + get_method("knot").readme_label,
                                                   "| " + get_method("identity").readme_label, "| mymethod"]
    assert lines[0].endswith(f"| {get_method('not').readme_grids} |") and lines[-1].endswith("| not yet viewed |")


def test_readme_block_matches_committed_rows(script):
    """Run `python scripts/readme_table.py --write README.md` after adding a row to results/digits/rows."""
    mod = script("readme_table")
    readme = (ROOT / "README.md").read_text()
    block = readme.split(mod.BEGIN, 1)[1].split(mod.END, 1)[0].strip()
    assert block == mod.table(ROOT / "results/digits/rows")


def test_rows_of_the_noise_fragile_judge_get_their_own_table(tmp_path, script):
    mod = script("readme_table")
    _row(tmp_path, "otcs", 0, 10.0, 90.0, classifier_sha256="a" * 64)          # no noisy record: the first judge
    _row(tmp_path, "otcs", 1, 30.0, 95.0, classifier_sha256=PINNED, classifier_test_acc_noisy=93.9)
    _row(tmp_path, "not", 0, 8.0, 80.0, classifier_sha256="a" * 64)
    text = mod.table(tmp_path)
    top, rest = text.split("Not yet regenerated: 2 rows judged by the first, noise-fragile classifier", 1)
    assert "| OTCS (" in top and "| 1 | 30.00 | 95.0 |" in top and "NOT" not in top.replace("OTCS against NOT", "")
    assert "| 0 | 10.00 | 90.0 |" in rest and "| NOT (" in rest
    (tmp_path / "otcs-cpu-seed1.json").unlink()
    assert mod.table(tmp_path).startswith("No `cpu` row judged by the noise-robust classifier yet")


def test_rows_scored_by_another_judge_than_the_pinned_one_are_named_not_averaged(tmp_path, script):
    """A noise-robust judge trained on some machine (each CPU kind trains other weights) is not the pinned one:
    its rows are kept apart, never averaged with the pinned judge's."""
    mod = script("readme_table")
    _row(tmp_path, "otcs", 0, 10.0, 90.0, classifier_sha256=PINNED, classifier_test_acc_noisy=93.7)
    _row(tmp_path, "otcs", 1, 14.0, 94.0, classifier_sha256=PINNED, classifier_test_acc_noisy=93.7)
    _row(tmp_path, "otcs", 2, 50.0, 50.0, classifier_sha256="7e7d9caa" + "0" * 56, classifier_test_acc_noisy=93.8)
    text = mod.table(tmp_path)
    otcs = next(line for line in text.splitlines() if line.startswith("| OTCS"))
    assert "| 0, 1 | 12.00 ± 2.83 | 92.0 ± 2.8 |" in otcs
    assert "otcs seed 2 (judge=7e7d9caa)" in text.splitlines()[-1]
