"""celeba-sr on a tiny CelebA root built from the 32 genuine aligned CelebA samples (tests/sample_roots.py).

The partition file of that root is made up (rows 1-22 train, 23-24 valid, 25-32 test); the images
are real.  What is checked: layout detection, the SCONES/OTCS parity rule and degradation (against
the authors' torchvision transforms, built independently here), shapes and ranges per budget, the
cache, the SSIM columns' meaning, a one-line error for every missing piece, and `bench run` +
`bench table` end to end on the smoke budget.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import sample_roots as sr
from bench.api import BenchError, EvalContext
from bench.datasets import celeba as C

pytestmark = pytest.mark.skipif(not sr.have_samples(), reason="sample images not found (set BENCH_DATA)")


@pytest.fixture
def root(tmp_path) -> Path:
    return sr.build_celeba_root(tmp_path / "data")


_one_line_error = sr.one_line_error


# -- layout and split ------------------------------------------------------------------------
def test_layout_is_found_nested_or_flat(tmp_path):
    nested = sr.build_celeba_root(tmp_path / "a")
    assert C.find_celeba(nested) == nested / "celeba"
    flat = sr.build_celeba_root(tmp_path / "b", nested=False)
    assert C.find_celeba(flat) == flat
    facts = C.CelebASR().check_data(nested)
    assert "32-row subset" in facts["partition"]
    assert "train 22, valid 2 (unused), test 8" in facts["images"]
    assert facts["source"].endswith(": 11 (degraded)") and facts["target"].endswith(": 11")


def test_parity_rule_follows_the_authors_code():
    # the authors' subset="even" keeps 0-based rows with i % 2 == 1 and is the SOURCE
    codes = np.array([0, 0, 0, 0, 0, 1, 0, 2, 2, 0])
    roles = C.split_indices(codes)
    assert roles["source"].tolist() == [1, 3, 9]      # odd rows of the train split (row 5 is valid)
    assert roles["target"].tolist() == [0, 2, 4, 6]   # even rows
    assert roles["test"].tolist() == [7, 8]


def test_split_on_the_sample_root(root, cache):
    data = C.CelebASR().load(root, seed=0, budget="smoke")
    x = data.extra
    # files 000002, 000004, ... are sources; 000001, 000003, ... targets; valid rows 23-24 unused
    assert [r + 1 for r in x["source_train_rows"]] == list(range(2, 23, 2))
    assert [r + 1 for r in x["target_train_rows"]] == list(range(1, 22, 2))
    assert [r + 1 for r in x["test_rows"]] == list(range(25, 33))
    assert data.setting == "unpaired" and data.pairs is None and data.aligned


def test_degradation_matches_the_authors_transforms():
    from PIL import Image
    from torchvision import transforms as T
    path = sr.CELEBA_SAMPLES / "000025.jpg"
    img = Image.open(path).convert("RGB")
    authors_source = T.Compose([T.CenterCrop(140), T.Resize(32), T.Resize(64), T.PILToTensor()])(img)
    authors_target = T.Compose([T.CenterCrop(140), T.Resize(64), T.PILToTensor()])(img)
    high, low = C.decode(path, 64)
    assert torch.equal(torch.from_numpy(low), authors_source)
    assert torch.equal(torch.from_numpy(high), authors_target)
    # smaller budgets keep the factor 2: 16 px is 8 px upsampled
    high16, low16 = C.decode(path, 16)
    assert high16.shape == low16.shape == (3, 16, 16)
    expect = T.Compose([T.CenterCrop(140), T.Resize(8), T.Resize(16), T.PILToTensor()])(img)
    assert torch.equal(torch.from_numpy(low16), expect)

    def detail(a):  # high-frequency energy: the degraded image must have less
        a = a.astype(np.float64)
        return np.abs(np.diff(a, axis=1)).mean() + np.abs(np.diff(a, axis=2)).mean()
    assert detail(low) < 0.8 * detail(high)


@pytest.mark.parametrize("budget,res", [("smoke", 16), ("cpu", 32)])
def test_shapes_ranges_and_resolution_by_budget(root, cache, budget, res):
    data = C.CelebASR().load(root, seed=0, budget=budget)
    assert data.source_train.shape == data.target_train.shape == (11, 3, res, res)
    assert data.source_test.shape == data.target_test.shape == (8, 3, res, res)
    for t in (data.source_train, data.target_train, data.source_test, data.target_test):
        assert t.dtype == torch.float32 and t.min() >= -1.0 and t.max() <= 1.0 and t.std() > 0.1
    assert data.extra["resolution"] == res and data.extra["lr_resolution"] == res // 2
    # test pairs are aligned: the source is the degraded ground truth, close but not equal
    err = (data.source_test - data.target_test).abs().mean()
    assert 0.0 < err < 0.2, err
    high, low = C.decode(sr.CELEBA_SAMPLES / "000025.jpg", res)
    assert torch.equal(data.target_test[0], C.to_unit(torch.from_numpy(high)))
    assert torch.equal(data.source_test[0], C.to_unit(torch.from_numpy(low)))


def test_decoded_images_are_cached(root, cache, monkeypatch):
    first = C.CelebASR().load(root, seed=0, budget="smoke")
    assert len(list((cache / "celeba").glob("*.pt"))) == 3

    def no_decoding(*a, **k):
        raise AssertionError("decoded again although cached")
    monkeypatch.setattr(C, "decode", no_decoding)
    again = C.CelebASR().load(root, seed=1, budget="smoke")
    assert torch.equal(first.source_train, again.source_train) and torch.equal(first.target_test, again.target_test)


def test_train_cap_takes_a_fixed_subset(root, cache, monkeypatch):
    monkeypatch.setitem(C.TRAIN_CAP, "smoke", 4)
    a = C.CelebASR().load(root, seed=0, budget="smoke")
    b = C.CelebASR().load(root, seed=3, budget="smoke")
    assert len(a.source_train) == len(a.target_train) == 4
    assert a.extra["source_train_rows"] == b.extra["source_train_rows"]  # seed-independent
    assert all(r % 2 == 1 for r in a.extra["source_train_rows"])
    assert all(r % 2 == 0 for r in a.extra["target_train_rows"])


# -- metrics ---------------------------------------------------------------------------------
def test_ssim_columns_compare_with_truth_and_source(root, cache, monkeypatch):
    """ssim is against the ground-truth HR image, ssim_src against the degraded source (FID stubbed here;
    the end-to-end test runs the real one)."""
    import bench.metrics.fid as fid
    monkeypatch.setattr(fid, "fid_features", lambda x, *a, **k: x.flatten(1)[:, :4].double().numpy())
    monkeypatch.setattr(fid, "reference_stats", lambda name, split, imgs, n, *a, **k:
                        (imgs.flatten(1)[:, :4].double().mean(0).numpy(), np.eye(4), "0" * 64))
    task = C.CelebASR()
    data = task.load(root, seed=0, budget="smoke")
    ctx = EvalContext(cache_dir=cache, device=torch.device("cpu"), budget="smoke", seed=0, data_root=root)
    truth = task.evaluate(data, data.source_test, data.target_test.clone(), None, ctx)
    ident = task.evaluate(data, data.source_test, data.source_test.clone(), None, ctx)
    assert truth["ssim"] == pytest.approx(1.0) and truth["ssim_src"] < 0.95
    assert ident["ssim_src"] == pytest.approx(1.0) and ident["ssim"] < 0.95
    assert ident["ssim"] == pytest.approx(truth["ssim_src"])  # SSIM is symmetric
    assert truth["fid_n"] == 8 and truth["fid_ref"] == "celeba:test-hr:8" and truth["resolution"] == 16
    with pytest.raises(BenchError):
        task.evaluate(data, data.source_test, data.source_test[:, :1], None, ctx)


# -- errors ----------------------------------------------------------------------------------
def test_missing_pieces_give_one_line_errors(tmp_path, cache):
    task = C.CelebASR()
    _one_line_error(lambda: task.check_data(tmp_path / "empty"), "CelebA not found", "img_align_celeba")

    r = sr.build_celeba_root(tmp_path / "nopart")
    (r / "celeba" / "list_eval_partition.txt").unlink()
    _one_line_error(lambda: C.CelebASR().check_data(r), "list_eval_partition.txt not found")

    r = sr.build_celeba_root(tmp_path / "missing")
    (r / "celeba" / "img_align_celeba" / "000007.jpg").unlink()
    _one_line_error(lambda: C.CelebASR().check_data(r), "1 of the 32 images", "first: 000007.jpg")
    _one_line_error(lambda: C.CelebASR().load(r, 0, "smoke"), "000007.jpg not found")

    r = sr.build_celeba_root(tmp_path / "kaggle")  # Kaggle's zip: images one level deeper, partition as .csv
    images = r / "celeba" / "img_align_celeba"
    (images / "img_align_celeba").mkdir()
    for f in sorted(images.glob("*.jpg")):
        f.rename(images / "img_align_celeba" / f.name)
    _one_line_error(lambda: C.CelebASR().check_data(r), "32 of the 32 images", "up one level")
    part = r / "celeba" / "list_eval_partition.txt"
    part.rename(part.with_suffix(".csv"))
    _one_line_error(lambda: C.CelebASR().check_data(r), "list_eval_partition.txt not found", "Kaggle")

    r = sr.build_celeba_root(tmp_path / "bad")
    part = r / "celeba" / "list_eval_partition.txt"
    lines = part.read_text().splitlines()
    lines[2] = "000003.jpg train"
    part.write_text("\n".join(lines) + "\n")
    _one_line_error(lambda: C.CelebASR().check_data(r), "line 3", "<0|1|2>")

    r = sr.build_celeba_root(tmp_path / "notest", partition={i: 0 for i in range(1, 33)})
    _one_line_error(lambda: C.CelebASR().check_data(r), "no test (2) rows")
    _one_line_error(lambda: C.CelebASR().load(r, 0, "smoke"), "no test (2) rows")


def test_a_full_size_partition_must_be_the_official_file(root):
    part = root / "celeba" / "list_eval_partition.txt"
    part.write_text("".join(f"{i:06d}.jpg {0 if i < 30 else 2}\n" for i in range(1, C.OFFICIAL_ROWS + 1)))
    _one_line_error(lambda: C.CelebASR().check_data(root), "not the official", C.OFFICIAL_PARTITION_MD5)


def test_non_aligned_images_are_refused(tmp_path, cache):
    """A CelebA-HQ image (1024x1024) where an aligned 178x218 one belongs is named, not silently cropped."""
    r = sr.build_celeba_root(tmp_path / "hq")
    target = r / "celeba" / "img_align_celeba" / "000025.jpg"
    target.unlink()
    target.symlink_to(next((sr.CELEBA_HQ_SAMPLES / "src" / "female").glob("*.jpg")))
    _one_line_error(lambda: C.CelebASR().load(r, 0, "smoke"), "000025.jpg is 1024x1024", "178x218")


# -- end to end ------------------------------------------------------------------------------
_bench = sr.bench_cli


@pytest.mark.slow
def test_bench_data_reports_and_refuses(root, tmp_path):
    res = _bench("data", "--task", "celeba-sr", "--data-root", str(root), root=root, cache=tmp_path / "c")
    assert res.returncode == 0, res.stderr
    assert "32-row subset of CelebA" in res.stdout and "test 8" in res.stdout
    res = _bench("data", "--task", "celeba-sr", "--data-root", str(tmp_path / "nowhere"), root=root,
                 cache=tmp_path / "c")
    assert res.returncode == 2 and res.stderr.startswith("error: CelebA not found")
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


@pytest.mark.slow
def test_smoke_run_and_table(root, tmp_path):
    rows, text = sr.smoke_rows_and_table("celeba-sr", root, tmp_path)
    for row in rows.values():
        assert row["fid_n"] == 8 and row["fid_ref"] == "celeba:test-hr:8" and len(row["fid_net_sha256"]) == 64
        assert row["fid"] > 0 and -1 <= row["ssim"] <= 1 and -1 <= row["ssim_src"] <= 1
        assert (row["resolution"], row["lr_resolution"], row["train_n_source"]) == (16, 8, 11)
    assert rows["identity"]["ssim_src"] == pytest.approx(1.0)
    assert rows["identity"]["ssim"] < 1.0
    assert "identity" in text and "otcs" in text and "SSIM" in text and "(n=8)" in text
    assert "1.77" in text and "0.9313" in text  # OTCS's published CelebA FID and SSIM stand beside
