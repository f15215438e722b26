"""Data root resolution, the tasks' declared files, and verification errors (missing / corrupt files)."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from bench import data as bdata
from bench.api import BenchError
from bench.datasets.digits import CHINESE_MNIST_FILE, MNIST_FILES
from bench.metrics.fid import OFFLINE_FILE
from bench.registry import get_task, tasks


def test_resolve_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("BENCH_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert bdata.resolve_root(str(tmp_path / "cli")) == tmp_path / "cli"
    assert bdata.resolve_root(None) == tmp_path / "env"
    monkeypatch.delenv("BENCH_DATA")
    assert bdata.resolve_root(None) == tmp_path / "xdg" / "otbench" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert bdata.resolve_root(None) == Path.home() / ".cache" / "otbench" / "data"


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "c"))
    assert bdata.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("BENCH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert bdata.cache_dir() == tmp_path / "xdg" / "otbench"


def test_declared_files_match_the_offline_mirror(data_root):
    """Every file a registered task declares, and the engine's FID network, has the size recorded in SOURCES.md
    and verifies against the mirror."""
    sources = (data_root / "SOURCES.md").read_text()
    declared = {f for cls in tasks().values() for f in cls.data_files}
    assert set(MNIST_FILES) | {CHINESE_MNIST_FILE} <= declared
    for f in declared | {OFFLINE_FILE}:
        assert len(f.sha256) == 64 and f.size > 0
        assert f.urls or f.manual, f.path
        if f is not OFFLINE_FILE:
            assert f.sha256 in sources, f.path
        p = data_root / f.path
        if p.exists():
            assert p.stat().st_size == f.size, f.path
    for f in MNIST_FILES:
        assert all(u.startswith(("https://", "http://")) and u.endswith(Path(f.path).name) for u in f.urls)
    assert "kaggle.com/datasets/gpreda/chinese-mnist" in CHINESE_MNIST_FILE.manual
    found = bdata.ensure(data_root, get_task("digits").data_files)
    assert set(found) == {f.path for f in (*MNIST_FILES, CHINESE_MNIST_FILE)}


def _small_root(tmp_path: Path, data_root: Path) -> tuple[Path, list]:
    """A temp data root holding copies of the two MNIST label files (small)."""
    files = [f for f in MNIST_FILES if "labels" in f.path]
    root = tmp_path / "root"
    for f in files:
        (root / f.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data_root / f.path, root / f.path)
    return root, files


def test_missing_root_is_one_line_with_the_fix(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(BenchError) as err:
        bdata.ensure(root, MNIST_FILES, download=False)
    msg = str(err.value)
    assert "\n" not in msg
    assert "mnist/train-images-idx3-ubyte.gz not found under" in msg and str(root) in msg
    assert "--data-root" in msg and "BENCH_DATA" in msg and "bench data --download" in msg


def test_missing_kaggle_file_names_the_page(tmp_path):
    with pytest.raises(BenchError) as err:
        bdata.ensure(tmp_path, [CHINESE_MNIST_FILE], download=True)  # no URL: cannot download
    msg = str(err.value)
    assert "\n" not in msg and "kaggle.com/datasets/gpreda/chinese-mnist" in msg
    assert str(tmp_path / "chinese_mnist" / "chinese_mnist.npz") in msg


def test_optional_file_may_be_absent(tmp_path):
    assert bdata.ensure(tmp_path, [OFFLINE_FILE]) == {}


def test_corrupt_file_flipped_byte(tmp_path, data_root, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    root, files = _small_root(tmp_path, data_root)
    assert set(bdata.ensure(root, files)) == {f.path for f in files}  # intact copies verify
    target = root / files[0].path
    raw = bytearray(target.read_bytes())
    raw[100] ^= 0xFF
    st = target.stat()
    target.write_bytes(bytes(raw))
    # same size; make sure the mtime differs from the cached verification even on coarse clocks
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(BenchError) as err:
        bdata.ensure(root, files)
    msg = str(err.value)
    got = hashlib.sha256(bytes(raw)).hexdigest()
    assert "\n" not in msg and str(target) in msg and "corrupt" in msg
    assert got[:12] in msg and files[0].sha256[:12] in msg
    assert "bench data --download" in msg


def test_verification_is_hashed_once_per_process(tmp_path, data_root, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    root, files = _small_root(tmp_path, data_root)
    calls = []
    real = bdata.sha256_file
    monkeypatch.setattr(bdata, "sha256_file", lambda p, *a: calls.append(Path(p)) or real(p, *a))
    bdata.ensure(root, files)
    assert len(calls) == len(files)
    bdata.ensure(root, files)
    assert len(calls) == len(files)  # once per process: nothing is trusted from an earlier one
    assert not (tmp_path / "cache" / "verified.json").exists()
    os.utime(root / files[1].path, ns=(0, 10**18))  # touched: hashed again
    bdata.ensure(root, files)
    assert calls[-1] == (root / files[1].path).resolve() and len(calls) == len(files) + 1


def test_download_is_atomic_and_verified(tmp_path, data_root, monkeypatch):
    """`download=True` fetches from the URL list (here a file:// mirror), verifies, renames into place."""
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    spec = [f for f in MNIST_FILES if "t10k-labels" in f.path][0]
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    shutil.copyfile(data_root / spec.path, mirror / "good.gz")
    (mirror / "bad.gz").write_bytes(b"not mnist")
    local = bdata.DataFile(spec.path, spec.sha256, spec.size,
                           urls=((mirror / "bad.gz").as_uri(), (mirror / "good.gz").as_uri()))
    root = tmp_path / "root"
    found = bdata.ensure(root, [local], download=True)
    assert found[spec.path].read_bytes() == (data_root / spec.path).read_bytes()
    assert not [p for p in (root / "mnist").iterdir() if p.name.startswith(".")]  # no partial files left
    only_bad = bdata.DataFile("mnist/x.gz", spec.sha256, spec.size, urls=((mirror / "bad.gz").as_uri(),))
    with pytest.raises(BenchError, match="checksum mismatch"):
        bdata.ensure(root, [only_bad], download=True)
    assert not (root / "mnist" / "x.gz").exists()


def test_cached_images_concurrent_first_users_decode_once(tmp_path, in_two_threads):
    """Two workers asking for the same not-yet-cached decode: one decodes and writes, the other waits for
    the entry's lock and loads that file (without the lock both decode, and one may read a half-renamed file)."""
    import time

    import torch

    calls = []

    def decode_one(i):
        calls.append(i)  # list.append is atomic under the GIL
        time.sleep(0.2)  # the other worker arrives while this one decodes

    results = in_two_threads(lambda: bdata.cached_images(tmp_path / "imgs.pt", 2, decode_one, lambda: torch.arange(6.0)))
    assert sorted(calls) == [0, 1], calls  # 2 images, decoded by one worker only
    assert len(results) == 2 and torch.equal(results[0], results[1])
    assert torch.equal(torch.load(tmp_path / "imgs.pt", weights_only=True), torch.arange(6.0))


def test_a_prefilled_cache_where_no_lock_file_can_be_created_still_loads(tmp_path, monkeypatch):
    """A read-only shared cache (simulated: creating the lock file fails, as it would without write access;
    tests run as root here, so chmod would not stop them) serves its entries without the lock."""
    import filelock
    import torch

    bdata.cached_images(tmp_path / "imgs.pt", 1, lambda i: None, lambda: torch.ones(3))

    def refuse(self, *a, **k):
        raise PermissionError(13, "Permission denied", self.lock_file)
    monkeypatch.setattr(filelock.FileLock, "acquire", refuse)
    out = bdata.cached_images(tmp_path / "imgs.pt", 1, lambda i: pytest.fail("decoded again"), lambda: None)
    assert torch.equal(out, torch.ones(3))
