"""Tiny data roots in the published CelebA / AFHQ layouts, built from the genuine samples in
``../shared/data/samples/`` (see its SOURCES.md), for the celeba-sr and animal tests.

The image files are genuine (symlinked, never copied into the repo).  Two things are made up here,
because the samples come without them:

- CelebA: ``list_eval_partition.txt`` for the 32 aligned images 000001-000032 (the first 32 of
  CelebA, whose real partition is all train): rows 1-22 train (0), 23-24 valid (1), 25-32 test (2),
  so both splits and the ignored validation split are exercised.
- AFHQ: ``species.csv``.  The StarGAN v2 samples are only foldered cat / dog / wild, so the species
  below are SYNTHETIC labels that let the code path run: cats are labelled ``cat`` (true), the
  wild images fox / leopard (in sorted order), and the dogs lion / tiger / wolf (false, of course).
  One train dog is deliberately left out of the list (unlisted images must be ignored).
  StarGAN's ``ref/`` images become ``train/`` and its ``src/`` images ``val/``; the two dogs that
  appear in both are kept only in ``train/``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLES = Path(os.environ.get("BENCH_DATA", REPO.parent / "shared" / "data")) / "samples"
CELEBA_SAMPLES = SAMPLES / "celeba_align_32"
CELEBA_HQ_SAMPLES = SAMPLES / "celeba_hq_stargan_v2"
AFHQ_SAMPLES = SAMPLES / "afhq_stargan_v2"

CELEBA_PARTITION = {**{i: 0 for i in range(1, 23)}, 23: 1, 24: 1, **{i: 2 for i in range(25, 33)}}

# synthetic species, by sorted position inside each (split, AFHQ class) folder; None: left unlisted
AFHQ_SPECIES = {
    ("train", "cat"): ["cat"] * 10,
    ("train", "wild"): ["fox"] * 5 + ["leopard"] * 5,
    ("train", "dog"): ["lion"] * 3 + ["tiger"] * 3 + ["wolf"] + [None],
    ("val", "cat"): ["cat"] * 5,
    ("val", "wild"): ["fox"] * 2 + ["leopard"] * 3,
    ("val", "dog"): ["lion", "tiger", "wolf"],
}


def have_samples() -> bool:
    return CELEBA_SAMPLES.is_dir() and AFHQ_SAMPLES.is_dir()


def link_inception(root: Path) -> None:
    """Make the offline Inception network visible under ``root/inception`` (FID without a download)."""
    src = SAMPLES.parent / "inception"
    if src.is_dir() and not (root / "inception").exists():
        root.mkdir(parents=True, exist_ok=True)
        (root / "inception").symlink_to(src, target_is_directory=True)


def build_celeba_root(root: Path, partition: dict[int, int] | None = None, nested: bool = True) -> Path:
    """``root/celeba/{img_align_celeba/, list_eval_partition.txt}`` (or without ``celeba/`` when not nested)."""
    partition = CELEBA_PARTITION if partition is None else partition
    folder = root / "celeba" if nested else root
    images = folder / "img_align_celeba"
    images.mkdir(parents=True, exist_ok=True)
    for i in sorted(partition):
        name = f"{i:06d}.jpg"
        (images / name).symlink_to(CELEBA_SAMPLES / name)
    (folder / "list_eval_partition.txt").write_text("".join(f"{i:06d}.jpg {c}\n" for i, c in sorted(partition.items())))
    link_inception(root)
    return root


def afhq_assignment() -> list[tuple[str, str, Path, str | None]]:
    """(split, AFHQ class, sample file, synthetic species or None) for every image of the tiny AFHQ root."""
    out = []
    train_names = {p.name for p in (AFHQ_SAMPLES / "ref").rglob("*.jpg")}
    for split, stargan in (("train", "ref"), ("val", "src")):
        for cls in ("cat", "dog", "wild"):
            files = sorted((AFHQ_SAMPLES / stargan / cls).glob("*.jpg"))
            if split == "val":
                files = [f for f in files if f.name not in train_names]
            species = AFHQ_SPECIES[(split, cls)]
            assert len(files) == len(species), (split, cls, len(files))
            out.extend((split, cls, f, s) for f, s in zip(files, species))
    return out


def build_afhq_root(root: Path, species_file: bool = True) -> Path:
    """``root/afhq/{train,val}/{cat,dog,wild}/*.jpg`` plus ``root/afhq/species.csv`` (synthetic labels)."""
    lines = ["file,species"]
    for split, cls, src, species in afhq_assignment():
        dest = root / "afhq" / split / cls / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(src)
        if species is not None:
            lines.append(f"{split}/{cls}/{src.name},{species}")
    if species_file:
        (root / "afhq" / "species.csv").write_text("\n".join(lines) + "\n")
    link_inception(root)
    return root


def one_line_error(fn, *match: str) -> str:
    """Call ``fn``, expect a BenchError whose message is one line containing every ``match``; return it."""
    import pytest

    from bench.api import BenchError
    with pytest.raises(BenchError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for m in match:
        assert m in msg, msg
    return msg


def bench_cli(*args, root, cache, timeout=600):
    """``python -m bench.cli ARGS`` in a subprocess on a sample data root and its own cache, one thread."""
    import subprocess
    import sys
    env = {**os.environ, "BENCH_DATA": str(root), "BENCH_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


# OTCS shrunk to seconds on the sample images (a pipeline check, not a quality run)
TINY_OTCS = ["--opt", "otcs.ot_steps=30", "--opt", "otcs.ot_batch=8", "--opt", "otcs.potential_hidden=16",
             "--opt", "otcs.potential_depth=2", "--opt", "otcs.steps=4", "--opt", "otcs.batch_size=8",
             "--opt", "otcs.unet_base=8", "--opt", "otcs.unet_mults=[1,2]", "--opt", "otcs.unet_blocks=1",
             "--opt", "otcs.unet_attention=[]", "--opt", "otcs.sde_steps=3", "--opt", "otcs.h_threshold=0.0",
             "--opt", "otcs.epsilon_rel=0.1"]


def smoke_rows_and_table(task: str, root: Path, tmp_path: Path, methods=("identity", "otcs")) -> tuple[dict, str]:
    """`bench run` of ``methods`` (OTCS shrunk to TINY_OTCS) on ``task``'s sample root at the smoke budget, then
    `bench table`: each method's row and the table's text; the test fails on a non-zero exit."""
    out, cache = tmp_path / "runs", tmp_path / "cache"
    res = bench_cli("run", "--methods", ",".join(methods), "--task", task, "--budget", "smoke", "--data-root",
                    str(root), "--out", str(out), "--no-progress", *TINY_OTCS, root=root, cache=cache)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {m: json.loads(next((out / task / m).glob("smoke-seed0*/row.json")).read_text()) for m in methods}
    res = bench_cli("table", "--task", task, "--out", str(out), root=root, cache=cache)
    assert res.returncode == 0, res.stderr
    return rows, res.stdout
