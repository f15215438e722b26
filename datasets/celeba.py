"""CelebA unpaired super-resolution (OTCS Table 1, CelebA column): FID and SSIM.

Data: the user's copy of aligned CelebA in torchvision's layout (it cannot be downloaded here)::

    ROOT/celeba/img_align_celeba/000001.jpg ... 202599.jpg      (178x218 RGB JPEGs)
    ROOT/celeba/list_eval_partition.txt                          ("000001.jpg 0" per line; 0 train, 1 valid, 2 test)

``ROOT`` may also be the ``celeba`` folder itself.  ``bench data --task celeba-sr`` verifies it
(:meth:`CelebASR.check_data`): the partition file parses, every listed image is present, and a
full-size partition file (202,599 rows) has the official md5 ``d32c9cbf5e040fd4025c592c306e6668``.
A smaller partition file is accepted (a subset of CelebA, e.g. for tests) and reported as such.

Split and degradation: the SCONES / OTCS protocol, as the authors' code does it
(``OTCS datasets/data_list.py`` and ``datasets/celeba.py``; methods.md section 1.6)
    The parity rule uses the 0-based row index ``i`` of ``list_eval_partition.txt`` (the whole
    file, so for the train split, which is its first 162,770 rows, the index within the split):
    the authors' ``subset="even"`` keeps ``i % 2 == 1`` and is the *source*; ``subset="odd"``
    keeps ``i % 2 == 0`` and is the *target*.  Hence:

    - sources: train rows with odd ``i`` (files 000002.jpg, 000004.jpg, ...), degraded by
      ``CenterCrop(140) -> Resize(lr) -> Resize(hr)``;
    - targets: train rows with even ``i`` (files 000001.jpg, 000003.jpg, ...),
      ``CenterCrop(140) -> Resize(hr)``;
    - test sources: every test row (partition 2), degraded like the sources; their ground truth
      (``target_test``, aligned pixel for pixel) is the same image processed like a target.

    (DESIGN.md states the opposite parity; the authors' code is followed.)  Resizes are
    torchvision's bilinear resize on PIL images (anti-aliased), as in the authors' transforms.
    The authors' random horizontal flip is a training augmentation and is not applied: the task
    hands methods fixed tensors.  The validation split (partition 1) is not used.

Resolution: chosen by the budget, never an option (``RESOLUTION``): 64 px on ``fast``/``paper``
(the paper), 32 px on ``cpu``, 16 px on ``smoke``.  The low resolution is always half the high
one (``LR_FACTOR`` = 2: the authors' 32 -> 64), so at 64 px the degradation is exactly the
authors'.  The row records ``resolution``, ``lr_resolution`` and ``crop``.

Streaming: only a budget-sized subset is decoded (``TRAIN_CAP`` per domain; a fixed,
seed-independent random subset of each parity list; the test split is taken in file order up to
``eval_sizes``).  Decoded images are cached as uint8 tensors under
``$BENCH_CACHE/celeba/`` keyed by role, resolution, preprocessing version and the sha256 of the
file list (names and sizes), so a second run reads one file instead of thousands of JPEGs.

Metrics (every value the row needs to be re-read is recorded)
    ``fid``: clean-fid "clean" FID (:mod:`bench.metrics.fid`) of the outputs against the
    high-resolution test images (``fid_ref`` names the reference and its size; ``fid_n`` the
    number of outputs).  ``ssim``: mean SSIM (:mod:`bench.metrics.ssim`, Gaussian window 11,
    sigma 1.5) of each output against the ground-truth high-resolution image of its test source.
    ``ssim_src``: SSIM against the (upsampled, degraded) source itself, as EGSDE reports SSIM.
    Which SSIM the paper's column uses is not known (methods.md section 5); the ``paper`` column
    stands beside ``ssim``.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import data as bdata
from bench.api import CORRELATION, DISTANCE, PERCENT, UNPAIRED, BenchError, EvalContext, Metric, Task, TaskData
from bench.datasets import otcs_table1
from bench.metrics.fid import fid_against
from bench.metrics.memorisation import copy_share
from bench.metrics.ssim import ssim
from bench.paper import csv_column

PREP_VERSION = 1
CROP = 140
LR_FACTOR = 2  # lr = hr // LR_FACTOR (the authors' Resize(32) -> Resize(64))
IMAGE_SIZE = (178, 218)  # (width, height) of every aligned CelebA image
RESOLUTION = {"smoke": 16, "cpu": 32, "fast": 64, "paper": 64}
# at most this many images per domain (source, target) from the train split: never all of CelebA in memory
TRAIN_CAP = {"smoke": 256, "cpu": 4000, "fast": 20000, "paper": 60000}
SUBSET_SEED = 20240  # the fixed subset of each parity list (seed-independent, so caches are shared)
OFFICIAL_ROWS = 202_599
OFFICIAL_PARTITION_MD5 = "d32c9cbf5e040fd4025c592c306e6668"
SPLITS = {0: "train", 1: "valid", 2: "test"}
LAYOUT_HINT = "see the README section 'CelebA and AFHQ: laying out the real data'"


def _budget_name(budget) -> str:
    return str(getattr(budget, "name", budget) or "smoke")


# -- layout ------------------------------------------------------------------------------------
def find_celeba(data_root) -> Path:
    """The CelebA folder (holding ``img_align_celeba/`` and ``list_eval_partition.txt``): ROOT/celeba or ROOT."""
    root = Path(data_root).expanduser()
    for cand in (root / "celeba", root):
        if (cand / "img_align_celeba").is_dir():
            if not (cand / "list_eval_partition.txt").is_file():
                kaggle = (" (Kaggle's list_eval_partition.csv has the same rows: write them as '000001.jpg 0' lines)"
                          if (cand / "list_eval_partition.csv").is_file() else "")
                raise BenchError(f"{cand / 'list_eval_partition.txt'} not found: place CelebA's "
                                 f"Eval/list_eval_partition.txt there{kaggle} ({LAYOUT_HINT})")
            return cand
    raise BenchError(f"CelebA not found under {root}: unzip img_align_celeba.zip into "
                     f"{root / 'celeba' / 'img_align_celeba'}/ and put list_eval_partition.txt in "
                     f"{root / 'celeba'}/, or pass --data-root DIR ({LAYOUT_HINT})")


def read_partition(path: Path) -> tuple[list[str], np.ndarray]:
    """(file names, partition codes 0/1/2) in file order; a one-line BenchError for a bad line."""
    names: list[str] = []
    codes: list[int] = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise BenchError(f"{path} line {lineno} is {line.strip()[:60]!r}, expected '<image file> <0|1|2>'; "
                                 "use CelebA's original Eval/list_eval_partition.txt")
            names.append(parts[0])
            codes.append(int(parts[1]))
    if not names:
        raise BenchError(f"{path} is empty; use CelebA's original Eval/list_eval_partition.txt")
    return names, np.asarray(codes, np.int64)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def split_indices(codes: np.ndarray) -> dict[str, np.ndarray]:
    """Row indices of the SCONES/OTCS roles: train sources (odd rows), train targets (even rows), test."""
    idx = np.arange(len(codes))
    train = codes == 0
    return {"source": idx[train & (idx % 2 == 1)], "target": idx[train & (idx % 2 == 0)],
            "test": idx[codes == 2]}


def fixed_subset(indices: np.ndarray, cap: int | None, salt: int) -> np.ndarray:
    """A seed-independent random subset of at most ``cap`` indices, in file order."""
    if cap is None or len(indices) <= cap:
        return indices
    rng = np.random.default_rng(SUBSET_SEED + salt)
    return np.sort(indices[rng.permutation(len(indices))[:cap]])


# -- decoding ------------------------------------------------------------------------------------
def degrade(img, hr: int):
    """(high-resolution target, degraded source upsampled back to ``hr``) of one PIL image, SCONES-style."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF
    crop = TF.center_crop(img, [CROP, CROP])
    high = TF.resize(crop, [hr, hr], interpolation=InterpolationMode.BILINEAR)
    low = TF.resize(crop, [hr // LR_FACTOR, hr // LR_FACTOR], interpolation=InterpolationMode.BILINEAR)
    return high, TF.resize(low, [hr, hr], interpolation=InterpolationMode.BILINEAR)


def decode(path: Path, hr: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (3, hr, hr) arrays (high, degraded) of one aligned CelebA JPEG."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            img = im.convert("RGB")
    except FileNotFoundError:
        raise BenchError(f"{path} not found; re-extract img_align_celeba.zip ({LAYOUT_HINT})") from None
    except OSError as exc:
        raise BenchError(f"cannot decode {path} ({exc}); re-extract it from img_align_celeba.zip") from None
    if img.size != IMAGE_SIZE:
        raise BenchError(f"{path} is {img.size[0]}x{img.size[1]}, aligned CelebA images are 178x218: put the "
                         "aligned-and-cropped img_align_celeba images there (not in-the-wild or CelebA-HQ)")
    high, low = degrade(img, hr)
    return (np.asarray(high, np.uint8).transpose(2, 0, 1).copy(),
            np.asarray(low, np.uint8).transpose(2, 0, 1).copy())


def _list_hash(folder: Path, names: list[str]) -> str:
    h = hashlib.sha256()
    for name in names:
        try:
            size = (folder / name).stat().st_size
        except FileNotFoundError:
            raise BenchError(f"{folder / name} not found; re-extract img_align_celeba.zip ({LAYOUT_HINT})") from None
        h.update(f"{name}\t{size}\n".encode())
    return h.hexdigest()


def load_images(folder: Path, names: list[str], hr: int, want: str, cache: Path) -> torch.Tensor:
    """uint8 (N, 3, hr, hr) for ``names``: ``want`` = "high", "low" (degraded) or "both" -> (2, N, 3, hr, hr).

    Decoded once (threads: PIL releases the GIL while decoding) and cached in ``cache/celeba/``."""
    key = _list_hash(folder, names)
    path = Path(cache) / "celeba" / f"{want}_{hr}px_p{PREP_VERSION}_n{len(names)}_{key[:16]}.pt"
    n = len(names)
    high = np.empty((n, 3, hr, hr), np.uint8) if want in ("high", "both") else None
    low = np.empty((n, 3, hr, hr), np.uint8) if want in ("low", "both") else None

    def work(i: int) -> None:
        h, lo = decode(folder / names[i], hr)
        if high is not None:
            high[i] = h
        if low is not None:
            low[i] = lo

    def assemble() -> torch.Tensor:
        if want == "both":
            return torch.from_numpy(np.stack([high, low]))
        return torch.from_numpy(high if want == "high" else low)

    return bdata.cached_images(path, n, work, assemble)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [-1, 1]."""
    return x.float() / 127.5 - 1.0


# -- the task ------------------------------------------------------------------------------------
class CelebASR(Task):
    name = "celeba-sr"
    setting = UNPAIRED
    metrics = (Metric("fid", "FID", higher_is_better=False, digits=2, bounds=DISTANCE, sample_size="fid_n"),
               Metric("ssim", "SSIM", higher_is_better=True, digits=4, bounds=CORRELATION),
               Metric("ssim_src", "SSIM vs source", higher_is_better=True, digits=4, bounds=CORRELATION),
               Metric("copy", "Copy (%)", higher_is_better=False, digits=1, bounds=PERCENT))
    description = ("CelebA unpaired super-resolution (SCONES/OTCS split): train odd rows degraded "
                   "(crop 140, down to hr/2, up to hr) -> train even rows (crop 140, hr); 64 px fast/paper, "
                   "32 cpu, 16 smoke")
    paper_values = csv_column(otcs_table1.TABLE, "celeba", names=otcs_table1.NAMES)
    paper_source = otcs_table1.SOURCE
    # test sources transported and scored per budget (None: the whole test split, 19,962 images)
    eval_sizes = {"smoke": 64, "cpu": 1000, "fast": 5000, "paper": None}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._partition: dict[str, tuple[list[str], np.ndarray]] = {}

    def _read(self, folder: Path) -> tuple[list[str], np.ndarray, str]:
        """(names, codes, md5) of the partition file, verified: the official md5 for a full-size file,
        and rows for every role."""
        key = str(folder)
        if key not in self._partition:
            path = folder / "list_eval_partition.txt"
            names, codes = read_partition(path)
            md5 = _md5(path)
            if len(names) == OFFICIAL_ROWS and md5 != OFFICIAL_PARTITION_MD5:
                raise BenchError(f"{path} has {OFFICIAL_ROWS} rows but md5 {md5}, not the official "
                                 f"{OFFICIAL_PARTITION_MD5}; replace it with CelebA's Eval/list_eval_partition.txt")
            roles = split_indices(codes)
            for role in ("source", "target", "test"):
                if len(roles[role]) == 0:
                    what = "test (2)" if role == "test" else "train (0)"
                    raise BenchError(f"{path} has no {what} rows for the {role} set; "
                                     "use CelebA's original Eval/list_eval_partition.txt")
            self._partition[key] = (names, codes, md5)
        return self._partition[key]

    # -- data --------------------------------------------------------------------------------
    def check_data(self, data_root, download: bool = False) -> dict[str, Any]:
        folder = find_celeba(data_root)  # CelebA sits behind a Google Drive quota: never downloaded
        names, codes, md5 = self._read(folder)
        official = len(names) == OFFICIAL_ROWS
        present = set(os.listdir(folder / "img_align_celeba"))
        missing = [n for n in names if n not in present]
        if missing:
            nested = folder / "img_align_celeba" / "img_align_celeba"
            fix = (f"move the images of {nested}/ up one level (Kaggle's zip nests them)" if nested.is_dir()
                   else "re-extract img_align_celeba.zip there")
            raise BenchError(f"{len(missing)} of the {len(names)} images listed in list_eval_partition.txt are "
                             f"missing from {folder / 'img_align_celeba'}/ (first: {missing[0]}); {fix}")
        roles = split_indices(codes)
        counts = {SPLITS[c]: int((codes == c).sum()) for c in SPLITS}
        return {"celeba": str(folder),
                "partition": (f"official (md5 {md5})" if official else
                              f"a {len(names)}-row subset of CelebA (the official file has {OFFICIAL_ROWS} rows)"),
                "images": f"{len(names)} listed, all present; train {counts['train']}, valid {counts['valid']} "
                          f"(unused), test {counts['test']}",
                "source": f"train rows with odd 0-based index: {len(roles['source'])} (degraded)",
                "target": f"train rows with even 0-based index: {len(roles['target'])}",
                "resolution": ", ".join(f"{b} {r}px (lr {r // LR_FACTOR}px)" for b, r in RESOLUTION.items()),
                "train cap per domain": ", ".join(f"{b} {c}" for b, c in TRAIN_CAP.items()),
                "test sources scored": ", ".join(f"{b} {min(n, counts['test']) if n else counts['test']}"
                                                 for b, n in self.eval_sizes.items())}

    def load(self, data_root, seed: int, budget: str = "smoke", cache_dir=None) -> TaskData:
        b = _budget_name(budget)
        if b not in RESOLUTION:
            raise BenchError(f"unknown budget {b!r}; choose one of: {', '.join(RESOLUTION)}")
        folder = find_celeba(data_root)
        cache = Path(cache_dir) if cache_dir is not None else bdata.cache_dir()
        names, codes, md5 = self._read(folder)
        roles = split_indices(codes)
        hr = RESOLUTION[b]
        src_idx = fixed_subset(roles["source"], TRAIN_CAP[b], 1)
        tgt_idx = fixed_subset(roles["target"], TRAIN_CAP[b], 2)
        n_test = self.eval_sizes[b]
        test_idx = roles["test"] if n_test is None else roles["test"][:n_test]
        images = folder / "img_align_celeba"
        pick = lambda idx: [names[i] for i in idx]  # noqa: E731
        source_train = to_unit(load_images(images, pick(src_idx), hr, "low", cache))
        target_train = to_unit(load_images(images, pick(tgt_idx), hr, "high", cache))
        both = load_images(images, pick(test_idx), hr, "both", cache)
        target_test, source_test = to_unit(both[0]), to_unit(both[1])
        facts = {"resolution": hr, "lr_resolution": hr // LR_FACTOR, "crop": CROP, "prep_version": PREP_VERSION,
                 "train_n_source": len(src_idx), "train_n_target": len(tgt_idx), "test_n": len(test_idx),
                 "partition_md5": md5,
                 "test_list_sha256": _list_hash(images, pick(test_idx))}
        return TaskData(
            name=self.name, setting=self.setting, source_train=source_train, target_train=target_train,
            source_test=source_test, target_test=target_test, aligned=True,
            extra={**facts, "source_train_rows": src_idx.tolist(), "target_train_rows": tgt_idx.tolist(),
                   "test_rows": test_idx.tolist(), "data_root": str(folder)})

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, data: TaskData, sources: torch.Tensor, outputs: torch.Tensor,
                 labels: torch.Tensor | None, ctx: EvalContext) -> dict[str, Any]:

        n = len(outputs)
        outputs = self.images_to_score(data, outputs)
        truth = data.target_test[:n]
        x, ref = data.extra, data.target_test
        fid = fid_against(outputs, ref, f"celeba_{x['resolution']}px_p{PREP_VERSION}_{x['test_list_sha256'][:12]}",
                          "test-hr", f"celeba:test-hr:{len(ref)}", ctx)
        return {**fid, **copy_share(outputs, data.target_train, data.target_test),
                "ssim": ssim(outputs, truth), "ssim_ref": "ground-truth high-resolution test image",
                "ssim_src": ssim(outputs, sources.detach().float().cpu()),
                **{k: x[k] for k in ("resolution", "lr_resolution", "crop", "prep_version", "train_n_source",
                                     "train_n_target", "test_n", "partition_md5")}}
