"""`regbench perf data`: how long a real-size pair takes to reach the model.

A pair of synthetic NIfTI files at LUMIR's size, 160×224×192 (float32 images, int16 label
maps with 36 labels, gzip-compressed like real releases), is written to a temporary folder
and read through :class:`datamodules.nifti_pairs.NiftiPairsDataModule` and its test
DataLoader (``num_workers=0``, so the time is the loading path itself, collate included).
"Reaches the model" = the batch is out of the loader and one value per 4 KiB memory page of
every tensor has been read (so memory-mapped cache pages are really paged in).

* **cold**: empty cache (fresh folder, in-process hash memo cleared): decode the four NIfTI
  files, hash them, preprocess (min–max; RAS, already canonical), write the cache;
* **warm**: the cache filled: load the memory-mapped ``.npy`` arrays, assemble and collate
  (also reported without memory mapping, reading the arrays into memory: ``warm_no_mmap_s``).

Each figure is the median over ``repeats`` (cold: fresh caches; warm: fresh iterators).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

__all__ = ["perf_data", "main_perf_data", "SHAPE"]

SHAPE = (160, 224, 192)
TARGET_WARM_S = 0.050


def write_pair(folder: Path, shape: tuple[int, int, int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    aff[:3, 3] = -(np.asarray(shape) - 1) / 2
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij", sparse=True)
    r = np.sqrt(x**2 + y**2 + z**2)
    for name in ("A", "B"):
        shift = rng.uniform(-0.05, 0.05, 3).astype(np.float32)
        rr = np.sqrt((x - shift[0]) ** 2 + (y - shift[1]) ** 2 + (z - shift[2]) ** 2)
        inside = rr < 0.8
        ang = np.floor((np.arctan2(y - shift[1], x - shift[0]) + np.pi) / (2 * np.pi) * 6).astype(np.int16)
        seg = np.where(inside, 1 + ang + 6 * np.minimum((rr / 0.8 * 6).astype(np.int16), 5), 0).astype(np.int16)
        img = (seg.astype(np.float32) / 36.0 + 0.05 * rng.standard_normal(shape).astype(np.float32)) * (r < 0.95)
        nib.save(nib.Nifti1Image(img.astype(np.float32), aff), str(folder / f"image_{name}.nii.gz"))
        nib.save(nib.Nifti1Image(seg, aff), str(folder / f"image_{name}_seg.nii.gz"))


def _touch(batch: dict[str, Any]) -> float:
    """Read one value per 4 KiB page of every tensor (pages in memory-mapped data)."""
    total = 0.0
    for v in batch.values():
        if isinstance(v, torch.Tensor):
            flat = v.reshape(-1)
            step = max(1, 4096 // v.element_size())
            total += float(flat[::step].double().sum())
    return total


def _one_batch_seconds(dm: Any) -> float:
    t0 = time.perf_counter()
    batch = next(iter(dm.test_dataloader()))
    _touch(batch)
    return time.perf_counter() - t0


def perf_data(repeats: int = 5, threads: int | None = None, shape: tuple[int, int, int] = SHAPE,
              workdir: str | None = None) -> dict[str, Any]:
    """Cold and warm time for one labelled pair of ``shape`` to come out of the DataLoader.

    Returns:
        JSON-able dict: ``cold_s`` / ``warm_s`` medians and all samples, settings, the target.
    """
    from datamodules import cache as cache_mod
    from datamodules.nifti_pairs import NiftiPairsDataModule

    if threads:
        torch.set_num_threads(int(threads))
    repeats = max(1, int(repeats))
    tmp = Path(tempfile.mkdtemp(prefix="regbench_perf_data_", dir=workdir))
    try:
        data = tmp / "pair"
        data.mkdir()
        t0 = time.perf_counter()
        write_pair(data, shape)
        write_s = time.perf_counter() - t0
        file_mb = sum(p.stat().st_size for p in data.iterdir()) / 2**20

        def module(cache_dir: Path) -> NiftiPairsDataModule:
            dm = NiftiPairsDataModule(str(data), cache_dir=str(cache_dir), num_workers=0, pin_memory=False,
                                      label_ids=list(range(1, 37)), val_pairs=1)
            dm.setup("test")
            return dm

        cold = []
        for i in range(repeats):
            cache_mod._memo.clear()
            cdir = tmp / f"cache_cold_{i}"
            dm = module(cdir)
            cold.append(_one_batch_seconds(dm))
            if i < repeats - 1:
                shutil.rmtree(cdir, ignore_errors=True)
        dm = module(tmp / f"cache_cold_{repeats - 1}")
        _one_batch_seconds(dm)  # warm-up of the warm path (page cache, allocator)
        warm = [_one_batch_seconds(dm) for _ in range(repeats)]
        dm.cache.mmap = False  # the same, reading the .npy files into memory instead of mapping them
        warm_read = [_one_batch_seconds(dm) for _ in range(repeats)]
        cache_mb = sum(p.stat().st_size for p in (tmp / f"cache_cold_{repeats - 1}").rglob("*.npy")) / 2**20
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "benchmark": "data",
        "shape": list(shape),
        "what": "one labelled pair through NiftiPairsDataModule's test DataLoader (num_workers=0, collate included), "
                "every tensor paged in",
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "nifti_files_mb": round(file_mb, 1),
        "cache_entry_mb": round(cache_mb, 1),
        "write_inputs_s": write_s,
        "cold_s": statistics.median(cold),
        "cold_samples_s": cold,
        "warm_s": statistics.median(warm),
        "warm_samples_s": warm,
        "warm_no_mmap_s": statistics.median(warm_read),
        "warm_no_mmap_samples_s": warm_read,
        "target_warm_s": TARGET_WARM_S,
        "warm_meets_target": statistics.median(warm) <= TARGET_WARM_S,
        "cpu_count": os.cpu_count(),
    }


def main_perf_data(args: Any) -> dict[str, Any]:
    """CLI entry: ``args.out`` (JSON path or None), ``args.repeats``, ``args.threads``."""
    from benchmark.perf.anatomy import perf_anatomy, print_perf_anatomy

    res = perf_data(repeats=getattr(args, "repeats", 5) or 5, threads=getattr(args, "threads", None))
    res["anatomy"] = perf_anatomy(repeats=min(getattr(args, "repeats", 3) or 3, 3), threads=getattr(args, "threads", None))
    print_perf_anatomy(res["anatomy"])
    text = json.dumps(res, indent=2)
    out = getattr(args, "out", None)
    if out:
        from benchmark.core.io import atomic_write_text

        atomic_write_text(out, text + "\n")
    print(f"data loading, {'x'.join(map(str, res['shape']))} pair with labels: cold {res['cold_s'] * 1e3:.0f} ms, "
          f"warm {res['warm_s'] * 1e3:.1f} ms (target {res['target_warm_s'] * 1e3:.0f} ms: "
          f"{'met' if res['warm_meets_target'] else 'NOT met'})")
    if not out:
        print(text)
    return res
