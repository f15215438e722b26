"""Stage I's feature maps (bench/features.py), their cache, and the spread relation on a toy with a known answer."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench import features as fmaps
from bench import graph
from bench.api import SEMI_PAIRED, BenchError, TaskData


def _glyph(side=28, box=(4, 10, 4, 10), level=0.6, width=1):
    """A white-on-black '+' of ink ``level`` (0..1) inside ``box`` (r0, r1, c0, c1) on a side x side image in [-1, 1]."""
    img = torch.full((1, side, side), -1.0)
    r0, r1, c0, c1 = box
    rm, cm = (r0 + r1) // 2, (c0 + c1) // 2
    img[0, r0:r1, cm:cm + width] = 2 * level - 1
    img[0, rm:rm + width, c0:c1] = 2 * level - 1
    return img


def _images(n=6, side=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = min(8, side - 2)
    return torch.stack([_glyph(side, box=(r, r + b, c, c + b), level=0.4 + 0.1 * (i % 6))
                        for i, (r, c) in enumerate(torch.randint(0, side - b + 1, (n, 2), generator=g).tolist())])


@pytest.mark.parametrize("name", ["flatten", "pool", "hog", "glyph", "glyph-hog"])
def test_each_fixed_map_gives_its_declared_size_on_small_inputs(name):
    x = _images(5)
    f = fmaps.compute(name, x)
    assert f.shape == (5, fmaps.dim(name, (1, 28, 28))) and f.dtype == torch.float32 and torch.isfinite(f).all()
    assert fmaps.compute(name, x[:0]).shape == (0, f.shape[1])
    small = _images(3, side=8)  # the tiny test images: HOG uses 2 x 2 px cells, glyphs land in 28 x 28
    assert fmaps.compute(name, small).shape == (3, fmaps.dim(name, (1, 8, 8)))


def test_pixel_maps_are_the_pixels_and_their_pooling():
    x = _images(4)
    assert torch.equal(fmaps.compute("flatten", x), x.flatten(1))
    assert torch.allclose(fmaps.compute("pool", x), F.avg_pool2d(x, 2).flatten(1))


def test_hog_sees_orientation_not_brightness():
    bar_v = torch.full((1, 1, 28, 28), -1.0)
    bar_v[..., 4:24, 13:15] = 1.0
    bar_h = bar_v.transpose(2, 3).clone()
    faint_v = torch.where(bar_v > 0, torch.tensor(-0.5), bar_v)  # the same bar, a quarter of the ink
    h = fmaps.compute("hog", torch.cat([bar_v, bar_h, faint_v]))
    assert torch.allclose(h[0], h[2], atol=1e-4)  # block-normalised: the ink level does not matter
    assert (h[0] - h[1]).norm() > 0.5 * h[0].norm()  # a vertical and a horizontal bar differ


def test_glyph_normalisation_fixes_position_size_ink_and_stroke_width():
    """The label-free per-image normalisation: contrast to the image's own ink, crop to the ink box, fit 20 x 20,
    centre of mass at the centre; so a small faint glyph in a corner and a large bright one in the middle agree."""
    small = _glyph(box=(1, 9, 1, 9), level=0.3)  # 8 px, faint, top-left
    large = _glyph(box=(4, 24, 4, 24), level=1.0, width=2)  # 20 px, full ink, centred
    g = fmaps.glyph_images(torch.stack([small, large]))
    assert g.shape == (2, 1, 28, 28) and float(g.min()) >= -1 and float(g.max()) <= 1
    for img in g[:, 0]:
        ink = (img + 1) / 2
        assert float(ink.max()) > 0.95  # contrast stretched to the image's own ink level
        rows, cols = torch.nonzero(ink > 0.3, as_tuple=True)
        assert int(rows.max() - rows.min()) + 1 <= 20 and int(cols.max() - cols.min()) + 1 <= 20
        assert int(rows.max() - rows.min()) + 1 >= 18  # fitted: its long side fills the 20 px box
        yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
        cy, cx = float((ink * yy).sum() / ink.sum()), float((ink * xx).sum() / ink.sum())
        assert abs(cy - 13.5) <= 1.0 and abs(cx - 13.5) <= 1.0
    gh = fmaps.compute("glyph-hog", torch.stack([small, large]))
    raw = fmaps.compute("hog", torch.stack([small, large]))
    assert (gh[0] - gh[1]).norm() < 0.5 * (raw[0] - raw[1]).norm()  # normalised, the two glyphs look alike
    assert torch.equal(fmaps.compute("glyph", torch.stack([small, large])), g.flatten(1))


def test_contrastive_map_reads_its_encoder_and_needs_one():
    from bench.nn.contrastive import Encoder
    torch.manual_seed(0)
    enc = Encoder(in_ch=1, width=4, dim=16).eval()
    f = fmaps.compute("contrastive", _images(3), encoder=enc)
    assert f.shape == (3, 16) and torch.allclose(f.norm(dim=1), torch.ones(3), atol=1e-5)
    assert fmaps.dim("contrastive", (1, 28, 28), encoder_dim=16) == 16
    with pytest.raises(BenchError, match="encoder"):
        fmaps.compute("contrastive", _images(3))
    with pytest.raises(BenchError, match="unknown feature map"):
        fmaps.compute("sift", _images(3))


def test_expensive_maps_are_cached_by_content(tmp_path, monkeypatch):
    monkeypatch.setattr(fmaps, "CACHE_MIN", 4)
    x = _images(6)
    first = fmaps.compute("glyph-hog", x, cache_dir=tmp_path)
    files = sorted(p.name for p in (tmp_path / "features").glob("*.pt"))
    assert len(files) == 2 and any(f.startswith("glyph_6_") for f in files)  # glyph-hog reads glyph's entry
    monkeypatch.setattr(fmaps, "_compute", lambda *a, **k: pytest.fail("recomputed a cached entry"))
    assert torch.equal(fmaps.compute("glyph-hog", x, cache_dir=tmp_path), first)
    assert torch.equal(fmaps.compute("glyph-hog", x.clone(), cache_dir=tmp_path), first)  # content, not identity
    x2 = x.clone()
    x2[0, 0, 0, 0] = 0.5  # one pixel changed: another key
    assert fmaps.cache_path("glyph-hog", x2, cache_dir=tmp_path) != fmaps.cache_path("glyph-hog", x, cache_dir=tmp_path)
    monkeypatch.undo()
    monkeypatch.setattr(fmaps, "CACHE_MIN", 4)
    assert fmaps.compute("pool", x, cache_dir=tmp_path).shape == (6, 196)  # cheap maps are never stored
    assert len(list((tmp_path / "features").glob("pool*"))) == 0


def test_knn_graph_is_cached_and_extended_by_appended_points(tmp_path, monkeypatch):
    monkeypatch.setattr(fmaps, "CACHE_MIN", 4)
    g = torch.Generator().manual_seed(1)
    base, extra = torch.randn(300, 5, generator=g), torch.randn(4, 5, generator=g)
    d, j = fmaps.knn(base, 7, cache_dir=tmp_path)
    d0, j0 = graph.knn(base, base, 7, exclude_self=True)
    assert torch.equal(j, j0) and torch.allclose(d, d0)
    assert len(list((tmp_path / "features").glob("knn*"))) == 1
    both = torch.cat([base, extra])
    de, je = graph.knn_extended(base, extra, 7, base_knn=(d, j))
    dw, jw = graph.knn(both, both, 7, exclude_self=True)
    assert torch.equal(je, jw) and torch.allclose(de, dw, atol=1e-5)


# -- the spread relation on a toy whose right pairing is known ----------------------------------------------------
def _chains(n_per=150, vertical=False, key_ends=(0, 1, 0), seed=0, gap=1.0, length=7.5):
    """Three parallel chains of points ``gap`` apart (class c on chain c, points ``length / n_per`` apart along
    it); each class's keypoint at one end of its chain (``key_ends``), so a point at the far end of its chain is
    nearer another class's keypoint than its own: the distance relation errs there, spreading along the chain
    does not."""
    g = torch.Generator().manual_seed(seed)
    pts, lab = [], []
    for c in range(3):
        t = torch.linspace(0, length, n_per)
        p = torch.stack([t, torch.full_like(t, c * gap)], 1) + 0.005 * torch.randn(n_per, 2, generator=g)
        pts.append(p.flip(1) if vertical else p)
        lab.append(torch.full((n_per,), c))
    x, y = torch.cat(pts), torch.cat(lab)
    keys = torch.tensor([c * n_per + (n_per - 1 if key_ends[c] else 0) for c in range(3)])
    return x, y, keys


def _toy_task() -> TaskData:
    xs, ls, ks = _chains(key_ends=(0, 1, 0))
    yt, lt, kt = _chains(vertical=True, key_ends=(0, 0, 1), seed=1, gap=0.5, length=4.0)  # another geometry
    xs_test, ls_test, _ = _chains(n_per=20, key_ends=(0, 1, 0), seed=2)
    return TaskData(name="chains", setting=SEMI_PAIRED, source_train=xs, target_train=yt, source_test=xs_test,
                    target_test=yt[:60], pairs=(xs[ks].clone(), yt[kt].clone()), source_train_labels=ls,
                    target_train_labels=lt, source_test_labels=ls_test, target_test_labels=lt[:60],
                    extra={"pair_indices": {"source": ks.tolist(), "target": kt.tolist()}})


def _prepared(data, **options):
    from bench.methods.otcs import OTCS
    from bench.context import FitContext
    m = OTCS(kind=data.kind, **{**OTCS.test_options, **options})
    run = FitContext(None, device="cpu", seed=0, budget="smoke", progress=False)
    m.check_setting(data)
    m.setup(data, run)
    m.prepare_ot(data, run)
    return m


def test_spread_relation_pairs_the_right_chains_where_the_distance_relation_cannot():
    data = _toy_task()
    spread = _prepared(data, relations="spread", spread_k=6).plan_metrics(data, n=450)
    dist = _prepared(data, relations="distance").plan_metrics(data, n=450)
    assert spread["rel_acc_src"] == 100.0 and spread["rel_acc_tgt"] == 100.0
    assert spread["plan_acc_exact"] > 99.0  # the exact plan of JS(R_x, R_y) joins chain c to chain c
    assert dist["rel_acc_src"] < 60.0 and dist["plan_acc_exact"] < 70.0  # the toy does separate the two
    assert spread["plan_exact_n"] == [450, 450]


def test_a_test_source_relates_through_its_k_nearest_graph_points():
    """The out-of-sample rule: a new point's relation vector is the mean normalised spread score of its k nearest
    graph points, as every graph point's is (itself among them), so a copy of a training point relates as it does."""
    data = _toy_task()
    m = _prepared(data, relations="spread", spread_k=6)
    Fx, fx = m.spread_Fx, m.spread_fx
    new = torch.tensor([[7.0, 0.02], [0.3, 1.01], [3.0, 2.0]])  # far ends of chains 0 and 1, the middle of 2
    R = m._relations(new, "x")
    Fn = Fx / Fx.sum(1, keepdim=True)
    nearest = torch.cdist(new, fx).topk(6, largest=False).indices
    assert torch.allclose(R, Fn[nearest].mean(1) / Fn[nearest].mean(1).sum(1, keepdim=True), atol=1e-6)
    assert R.argmax(1).tolist() == [0, 1, 2]  # each relates to its own chain's keypoint
    copies = data.source_train[[5, 200, 400]]
    own = torch.cat([torch.arange(len(fx))[:, None], graph.knn(fx, fx, 6, exclude_self=True)[1][:, :5]], 1)
    R_train = graph.relations(Fx, fx, fx, k=6, neighbours=own)
    assert torch.allclose(m._relations(copies, "x"), R_train[[5, 200, 400]], atol=1e-6)
    assert math.isclose(float(R.sum(1).mean()), 1.0, rel_tol=1e-6)


def test_sharpening_keeps_the_largest_relation_and_concentrates_the_rest():
    data = _toy_task()
    m = _prepared(data, relations="spread", spread_k=6)
    x = data.source_test
    R1 = m._relations(x, "x")
    m.options["spread_sharpen"] = 0.3
    R3 = m._relations(x, "x")
    assert torch.equal(R1.argmax(1), R3.argmax(1))
    assert bool((R3.max(1).values >= R1.max(1).values - 1e-6).all())
    assert np.allclose(R3.sum(1).numpy(), 1.0, atol=1e-5)
