"""animal on a tiny AFHQ root built from the 41 distinct genuine AFHQ samples (tests/sample_roots.py).

The images are real AFHQ images, but their SPECIES ARE SYNTHETIC: the samples only come foldered
cat / dog / wild, so the test-only species.csv calls the cats cats, the wild animals fox / leopard
and the dogs lion / tiger / wolf.  Only the code path is exercised (layout, species list, guiding
pairs, classifier caching, Acc's definition, FID plumbing); no number here says anything about
translating real lions.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import sample_roots as sr
from bench.api import EvalContext
from bench.datasets import animal as A

pytestmark = pytest.mark.skipif(not sr.have_samples(), reason="sample images not found (set BENCH_DATA)")

N_TRAIN_SRC, N_TRAIN_TGT, N_VAL_SRC, N_VAL_TGT = 20, 7, 10, 3  # from sample_roots.AFHQ_SPECIES


@pytest.fixture
def root(tmp_path) -> Path:
    return sr.build_afhq_root(tmp_path / "data")


_one_line_error = sr.one_line_error


def _edit_species(root: Path, fn) -> None:
    path = root / "afhq" / "species.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(fn(lines)) + "\n")


# -- layout and species list -------------------------------------------------------------------
def test_layout_is_found_nested_or_flat(root):
    assert A.find_afhq(root) == root / "afhq"
    assert A.find_afhq(root / "afhq") == root / "afhq"
    facts = A.AnimalTask().check_data(root)
    assert facts["images"].startswith("41 in AFHQ, 40 labelled")  # the unlisted train dog is ignored
    assert facts["train"] == "cat 10, fox 5, leopard 5, lion 3, tiger 3, wolf 1"
    assert facts["val"] == "cat 5, fox 2, leopard 3, lion 1, tiger 1, wolf 1"


def test_species_list_matches_jpg_and_png_names(root):
    before = A.read_species(root / "afhq")
    _edit_species(root, lambda lines: [lines[0]] + [ln.replace(".jpg", ".png") for ln in lines[1:]])
    after = A.read_species(root / "afhq")
    assert after == before  # paths resolve to the files on disk whatever extension the list uses
    assert all(p.endswith(".jpg") for s in after.values() for v in s.values() for p in v)


def test_load_shapes_labels_and_resolution_by_budget(root, cache):
    data = A.AnimalTask().load(root, seed=0, budget="smoke")
    assert data.setting == "semi-paired"
    assert data.source_train.shape == (N_TRAIN_SRC, 3, 32, 32) and data.target_train.shape == (N_TRAIN_TGT, 3, 32, 32)
    assert data.source_test.shape == (N_VAL_SRC, 3, 32, 32) and data.target_test.shape == (N_VAL_TGT, 3, 32, 32)
    for t in (data.source_train, data.target_train, data.source_test, data.target_test):
        assert t.min() >= -1.0 and t.max() <= 1.0 and t.std() > 0.1
    assert data.source_train_labels.tolist() == [0] * 10 + [1] * 5 + [2] * 5       # cat, fox, leopard
    assert data.target_train_labels.tolist() == [0] * 3 + [1] * 3 + [2]            # lion, tiger, wolf
    assert sorted(data.source_test_labels.tolist()) == [0] * 5 + [1] * 2 + [2] * 3
    # the test sources' shuffled order is fixed, not the seed's
    assert A.AnimalTask().load(root, seed=5, budget="smoke").extra["source_test_files"] == data.extra["source_test_files"]
    # each test image is the file it claims to be, bicubic-resized (independent PIL call)
    from PIL import Image
    rel = data.extra["source_test_files"][0]
    img = Image.open(root / "afhq" / rel).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)
    assert torch.equal(data.source_test[0], A.to_unit(torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy())))
    cpu = A.AnimalTask().load(root, seed=0, budget="cpu")
    assert cpu.source_train.shape[-2:] == (64, 64) and cpu.extra["resolution"] == 64


def test_guiding_pairs_one_per_species_pair_drawn_by_the_seed(root, cache):
    task = A.AnimalTask()
    picks = []
    for seed in range(4):
        data = task.load(root, seed=seed, budget="smoke")
        xs, yt = data.pairs
        assert xs.shape == (3, 3, 32, 32) and yt.shape == (3, 3, 32, 32)
        idx = data.extra["pair_indices"]
        for k in range(3):  # pair k: a source of species k (cat/fox/leopard) -> a target of species k
            assert torch.equal(xs[k], data.source_train[idx["source"][k]])
            assert torch.equal(yt[k], data.target_train[idx["target"][k]])
            assert data.source_train_labels[idx["source"][k]] == k and data.target_train_labels[idx["target"][k]] == k
        picks.append((tuple(idx["source"]), tuple(idx["target"])))
    assert task.load(root, seed=0, budget="smoke").extra["pair_indices"]["source"] == list(picks[0][0])
    assert len(set(picks)) > 1  # the seed draws them
    pairs = task.load(root, seed=0, budget="smoke").extra["pairs"]
    assert [p.split("->")[0].split("/")[1] for p in pairs] == ["cat", "wild", "wild"]


def test_train_cap_is_stratified_and_seed_independent(root, cache, monkeypatch):
    monkeypatch.setitem(A.TRAIN_CAP, "smoke", 6)
    a = A.AnimalTask().load(root, 0, "smoke")
    b = A.AnimalTask().load(root, 3, "smoke")
    # floor(6 * n_k / n) per species, at least one: cat 3, fox 1, leopard 1 / lion 2, tiger 2, wolf 1
    assert torch.bincount(a.source_train_labels).tolist() == [3, 1, 1]
    assert torch.bincount(a.target_train_labels).tolist() == [2, 2, 1]
    assert torch.equal(a.source_train, b.source_train) and torch.equal(a.target_train, b.target_train)


# -- metrics -----------------------------------------------------------------------------------
class _ChannelJudge(torch.nn.Module):
    """A stand-in classifier: the class is the brightest colour channel (0 lion, 1 tiger, 2 wolf)."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def features(self, x):
        return x.mean(dim=(2, 3))

    def head(self, f):
        return f


def _stub_fid(monkeypatch):
    import bench.metrics.fid as fid
    monkeypatch.setattr(fid, "fid_features", lambda x, *a, **k: x.flatten(1)[:, :4].double().numpy())
    monkeypatch.setattr(fid, "reference_stats", lambda name, split, imgs, n, *a, **k:
                        (imgs.flatten(1)[:, :4].double().mean(0).numpy(), np.eye(4), "0" * 64))


def test_acc_counts_the_paired_target_species(root, cache, monkeypatch):
    _stub_fid(monkeypatch)
    task = A.AnimalTask()
    data = task.load(root, seed=0, budget="smoke")
    monkeypatch.setattr(task, "classifier", lambda d, c: (_ChannelJudge(), {"test_acc": 100.0, "sha256": "f" * 64}))
    ctx = EvalContext(cache_dir=cache, device=torch.device("cpu"), budget="smoke", seed=0, data_root=root)
    labels = data.source_test_labels

    def painted(classes):  # an image whose brightest channel is the given class
        out = -torch.ones(len(classes), 3, 32, 32)
        out[torch.arange(len(classes)), classes] = 1.0
        return out

    right = task.evaluate(data, data.source_test, painted(labels), labels, ctx)
    wrong = task.evaluate(data, data.source_test, painted((labels + 1) % 3), labels, ctx)
    assert right["acc"] == 100.0 and wrong["acc"] == 0.0
    half = painted(torch.where(labels == 0, labels, (labels + 1) % 3))  # only cat -> lion right
    row = task.evaluate(data, data.source_test, half, labels, ctx)
    assert row["acc"] == pytest.approx(50.0)  # 5 cats of 10 test sources
    assert (row["acc_cat_lion"], row["acc_fox_tiger"], row["acc_leopard_wolf"]) == (100.0, 0.0, 0.0)
    assert row["fid_n"] == N_VAL_SRC and row["fid_ref"] == f"afhq:val:lion+tiger+wolf:{N_VAL_TGT}"


def test_species_classifier_is_trained_once_and_reloaded(root, cache):
    data = A.AnimalTask().load(root, seed=0, budget="smoke")
    torch.set_num_threads(1)
    net, record = A.AnimalTask().classifier(data, cache)
    assert len(record["sha256"]) == 64 and 0.0 <= record["test_acc"] <= 100.0
    assert 0.0 <= record["test_acc_noisy"] <= 100.0  # the noise-robustness record every judge now carries
    assert record["train_n"] == N_TRAIN_TGT and record["test_n"] == N_VAL_TGT
    # a fresh task instance (a new `bench run`) reloads the cached RGB weights, checked by sha256
    net2, record2 = A.AnimalTask().classifier(data, cache)
    assert record2["sha256"] == record["sha256"]
    x = A.classifier_view(data.source_test)
    assert torch.equal(net.eval()(x).argmax(1), net2.eval()(x).argmax(1))


def test_classifier_view_downsamples_large_images():
    x = torch.rand(2, 3, 256, 256) * 2 - 1
    v = A.classifier_view(x)
    assert v.shape == (2, 3, 64, 64)
    assert torch.allclose(v[0, 0, 0, 0], x[0, 0, :4, :4].mean())  # area resize = 4x4 block means
    assert A.classifier_view(x[:, :, :32, :32]).shape == (2, 3, 32, 32)


# -- errors ------------------------------------------------------------------------------------
def test_missing_pieces_give_one_line_errors(tmp_path, root):
    task = A.AnimalTask()
    _one_line_error(lambda: task.check_data(tmp_path / "empty"), "AFHQ not found", "afhq.zip")

    broken = sr.build_afhq_root(tmp_path / "nowild")
    for f in (broken / "afhq" / "val" / "wild").iterdir():
        f.unlink()
    (broken / "afhq" / "val" / "wild").rmdir()
    _one_line_error(lambda: A.AnimalTask().check_data(broken), "val/wild/ not found")

    nolist = sr.build_afhq_root(tmp_path / "nolist", species_file=False)
    _one_line_error(lambda: A.AnimalTask().check_data(nolist), "species.csv not found", "file,species")
    _one_line_error(lambda: A.AnimalTask().load(nolist, 0, "smoke"), "species.csv not found")

    cases = [
        (lambda ls: ["path,label"] + ls[1:], "header 'file,species'"),
        (lambda ls: ls[:3] + ["train/wild/flickr_wild_003969.jpg,lynx"] + ls[3:], "line 4: unknown species 'lynx'"),
        (lambda ls: ls + ["train/wild/flickr_wild_999999.jpg,fox"], "first: train/wild/flickr_wild_999999.jpg"),
        (lambda ls: ls + ["flickr_wild_002159.jpg,fox"], "not a path like"),
        (lambda ls: [ln for ln in ls if not ln.startswith("val/") or not ln.endswith(",lion")],
         "no val image of species 'lion'"),
        (lambda ls: ls + [ls[1].split(",")[0] + ",tiger"], "listed as both cat and tiger"),
    ]
    for i, (edit, match) in enumerate(cases):
        r = sr.build_afhq_root(tmp_path / f"case{i}")
        _edit_species(r, edit)
        _one_line_error(lambda: A.AnimalTask().check_data(r), match)


# -- end to end --------------------------------------------------------------------------------
_bench = sr.bench_cli


@pytest.mark.slow
def test_bench_data_reports_and_refuses(root, tmp_path):
    res = _bench("data", "--task", "animal", "--data-root", str(root), root=root, cache=tmp_path / "c")
    assert res.returncode == 0, res.stderr
    assert "train: cat 10, fox 5, leopard 5, lion 3, tiger 3, wolf 1" in res.stdout
    (root / "afhq" / "species.csv").unlink()
    res = _bench("data", "--task", "animal", "--data-root", str(root), root=root, cache=tmp_path / "c")
    assert res.returncode == 2 and "species.csv not found" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


@pytest.mark.slow
def test_smoke_run_and_table(root, tmp_path):
    rows, text = sr.smoke_rows_and_table("animal", root, tmp_path)
    for row in rows.values():
        assert row["fid_n"] == N_VAL_SRC and row["fid"] > 0 and 0.0 <= row["acc"] <= 100.0
        assert row["resolution"] == 32 and len(row["pairs"]) == 3 and len(row["classifier_sha256"]) == 64
        assert row["setting"] == "semi-paired"
    assert "identity" in text and "otcs" in text and "Acc (%)" in text and f"(n={N_VAL_SRC})" in text
    assert "13.68" in text and "96.44" in text  # OTCS's published Animal FID and Acc stand beside
