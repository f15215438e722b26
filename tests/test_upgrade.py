"""One option vocabulary: former names (``toy_X`` twins, renamed options) read as today's, and `bench upgrade`
moves a run directory made under them to the directory today's names hash to."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import store
from bench.api import BenchError
from bench.options import upgrade
from bench.registry import _plain, get_method, methods, options_variant
from bench.rundir import CHECKPOINT_FILE, CONFIG_FILE, ROW_FILE, upgrade_run
from bench.runner import run_one
from bench.spec import RunSpec, Settings, run_directory

# every method's options on the smoke and cpu budgets as rows stored them before the vocabulary was one
# (``toy_*`` twins, DPM-OT's and OT-ICNN's former names): a frozen record of the earlier code's resolved options
BEFORE = json.loads((Path(__file__).parent / "data" / "options_before_one_vocabulary.json").read_text())


@pytest.mark.parametrize("key", sorted(BEFORE))
def test_rows_stored_under_former_names_read_as_todays_defaults_on_both_kinds(key):
    name, budget = key.split("/")
    if name not in methods():
        pytest.skip(f"{name} is not registered")
    cls = get_method(name)
    for kind, task in (("image", "digits"), ("vector", "toy1d")):
        today = _plain(cls(budget=budget, kind=kind).options)
        before = {k: v for k, v in cls.options_before.items() if k in today}  # options added since
        read = {**before, **upgrade(cls.default_options, BEFORE[key], kind, cls.renamed_options)}
        assert _plain(read) == today, (key, kind)
        assert options_variant(name, budget, task, BEFORE[key], {}) in ("", "task.prep=unset"), (key, task)


def test_the_twin_rules():
    not_ = get_method("not")
    old = {"map_lr": 1e-4, "critic_lr": 1e-4, "toy_lr": 1e-3, "steps": 24, "toy_steps": 400}
    assert upgrade(not_.default_options, old, "vector") == {"map_lr": 1e-3, "critic_lr": 1e-3, "steps": 400}
    assert upgrade(not_.default_options, old, "image") == {"map_lr": 1e-4, "critic_lr": 1e-4, "steps": 24}
    # a toy_Y without Y stands for every *_Y that has no twin of its own
    w2gan = get_method("w2gan")
    old = {"map_lr": 1e-4, "critic_lr": 1e-4, "toy_lr": 1e-3, "toy_map_lr": 3e-4}
    assert upgrade(w2gan.default_options, old, "vector") == {"map_lr": 3e-4, "critic_lr": 1e-3}
    # image_X twins (TCR's image-only MLP) the other way round
    tcr = get_method("tcr")
    old = {"mlp_hidden": 256, "image_mlp_hidden": 1024}
    assert upgrade(tcr.default_options, old, "image") == {"mlp_hidden": 1024}
    assert upgrade(tcr.default_options, old, "vector") == {"mlp_hidden": 256}
    # renamed options, one of them with values of another form
    dpmot = get_method("dpmot")
    old = {"base": 16, "attention": False, "score_steps": 40}
    assert upgrade(dpmot.default_options, old, "image", dpmot.renamed_options) == \
        {"unet_base": 16, "unet_attention": [], "steps": 40}
    assert upgrade(dpmot.default_options, {"attention": True}, "image", dpmot.renamed_options) == \
        {"unet_attention": [1]}


@pytest.mark.parametrize("name,key,today", [("not", "toy_lr", "map_lr"), ("dpmot", "base", "unet_base"),
                                            ("ot-icnn", "hidden", "potential_hidden"), ("tcr", "image_mlp_depth",
                                                                                        "mlp_depth")])
def test_a_former_name_given_today_is_one_line_naming_todays(name, key, today):
    with pytest.raises(BenchError, match=f"option {key} .*--opt {name}.{today}=") as info:
        get_method(name)(**{key: 1})
    assert "\n" not in str(info.value)


def _legacy_not(options: dict) -> dict:
    """NOT's options on a vector task as the code before one vocabulary stored them (the toy_* twins)."""
    legacy = dict(options)
    for key, image in (("steps", 24), ("batch_size", 16), ("z_std", 0.1)):
        legacy["toy_" + key], legacy[key] = options[key], image
    assert options["map_lr"] == options["critic_lr"]
    legacy["toy_lr"], legacy["map_lr"], legacy["critic_lr"] = options["map_lr"], 1e-4, 1e-4
    return legacy


@pytest.mark.slow
def test_bench_upgrade_moves_a_run_made_under_former_names_where_bench_run_finds_it(tmp_path, one_thread, bench_ok):
    out = tmp_path / "runs"
    spec = RunSpec("not", "toy1d", 0, "smoke", {"steps": 20, "inner_steps": 2, "mlp_hidden": 16})
    settings = Settings(out=out, data_root=tmp_path, cache_dir=tmp_path / "cache", device="cpu", progress=False)
    row = run_one(spec, settings, log=lambda *_: None)
    today = spec.directory(out)
    # the same run as the former code would have left it: former names in every file, and their directory
    legacy = _legacy_not(row["options"])
    former = run_directory(out, "toy1d", "not", "smoke", 0, legacy, row["task_options"])
    assert former != today
    today.rename(former)
    for name in (CONFIG_FILE, ROW_FILE):
        store.write_json(former / name, {**store.read_json(former / name), "options": legacy})
    ckpt = store.torch_load(former / CHECKPOINT_FILE)
    store.torch_save(former / CHECKPOINT_FILE, {**ckpt, "config": {**ckpt["config"], "options": legacy}})

    assert "1 run directories moved" in bench_ok("upgrade", "--out", out)
    assert today.is_dir() and not former.exists()
    assert store.read_json(today / CONFIG_FILE)["options"] == row["options"]
    assert store.torch_load(today / CHECKPOINT_FILE)["config"]["options"] == row["options"]
    again = bench_ok("run", "--methods", "not", "--task", "toy1d", "--out", out, "--no-progress",
                     "--opt", "steps=20", "--opt", "inner_steps=2", "--opt", "mlp_hidden=16")
    assert "1 finished before" in again, again
    assert "0 run directories moved" in bench_ok("upgrade", "--out", out)


def test_upgrade_refuses_to_overwrite_a_run_of_todays_names(tmp_path):
    out = tmp_path / "runs"
    spec = RunSpec("not", "toy1d", 0, "smoke", {})
    options = spec.build()[0].options
    legacy = _legacy_not(options)
    for opts in (legacy, options):
        d = run_directory(out, "toy1d", "not", "smoke", 0, opts, {})
        d.mkdir(parents=True)
        store.write_json(d / CONFIG_FILE, {"method": "not", "task": "toy1d", "budget": "smoke", "seed": 0,
                                           "options": opts, "task_options": {}})
    with pytest.raises(BenchError, match="exists already"):
        upgrade_run(run_directory(out, "toy1d", "not", "smoke", 0, legacy, {}))
