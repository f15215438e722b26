"""Where the data lives, and checking that a task's files are intact.

Each task declares the files it reads (:attr:`bench.api.Task.data_files`, a tuple of :class:`DataFile`:
path under the data root, size, sha256, download source); the engine only resolves the root
(:func:`resolve_root`: ``--data-root`` > ``$BENCH_DATA`` > a per-user cache) and verifies (and, when
allowed, downloads) such files with :func:`ensure`.  Verification results are cached once per process
(:func:`file_sha256`), never trusted from an earlier process.
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
    # imported here: this module stays free of torch, so the CLI that imports it starts in a fraction of a second
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


# -- a declared file ----------------------------------------------------------------------------
@dataclass(frozen=True)
class DataFile:
    """One file of the data root: where it goes, what it must hash to, and how to get it."""

    path: str  # relative to the data root, '/'-separated
    sha256: str
    size: int
    urls: tuple[str, ...] = ()  # tried in order by `bench data --download`
    manual: str = ""  # how to obtain it when it cannot be downloaded automatically
    optional: bool = False  # a task works without it (e.g. FID falls back to clean-fid's download)


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
    mtime put back.  Hashing is cheap next to loading: 17.8 MB of data files take 25 ms warm (measured), the
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

