"""Performance harness for the core operations and the metrics (``regbench perf metrics``).

Times, on one synthetic case of a given shape: the warp (trilinear), local NCC 9³ forward +
backward, scaling and squaring (7 steps), Dice over 133 sparse labels, HD95 over 16 labels,
Jacobian + fold %, and NDV — ours and a direct NumPy implementation of the ten schemes, so the
speed-up is measured side by side in one run. Every figure is the median wall-clock of
``repeats`` calls (at most 3 for local NCC, HD95 and the direct NumPy NDV) after one warm-up
call, which is reported apart; process CPU time is given too, since wall-clock on a shared
machine is noisy.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from benchmark.core import metrics as M
from benchmark.core.losses import local_ncc
from benchmark.core.spatial import gaussian_smooth, integrate_velocity, warp

__all__ = ["perf_metrics", "main_perf_metrics", "ndv_pct_numpy_direct"]

HD95_LABELS = 16


def ndv_pct_numpy_direct(disp: np.ndarray, mask: np.ndarray | None = None, dtype: type = np.float64) -> float:
    """NDV % written directly in NumPy, as a typical user would: each scheme on its own.

    Same definition as :func:`benchmark.core.metrics.ndv_pct` (interior ``[1:-1]``, tetrahedral
    determinants unscaled): for each of the ten schemes, the three edge vectors of
    ``phi = x + u`` are formed by slicing, the determinant by the cofactor formula (faster than
    ``np.linalg.det``), and ``-0.5 * min(J, 0) / 6`` is summed over the mask. Nothing is shared
    between schemes. The baseline for the speed-up figure.

    Args:
        disp: ``(3, *spatial)`` voxels.
        mask: optional ``(*spatial)``.
        dtype: arithmetic precision (``np.float64``, the reference values; ``np.float32``,
            the precision of ours, for the speed comparison at equal precision).
    """
    shape = disp.shape[1:]
    grid = np.meshgrid(*[np.arange(n, dtype=dtype) for n in shape], indexing="ij")
    phi = disp.astype(dtype) + np.stack(grid)
    inner = tuple(slice(1, n - 1) for n in shape)
    centre = phi[(slice(None), *inner)]
    m = np.ones([n - 2 for n in shape], bool) if mask is None else np.asarray(mask, bool)[inner]

    def at(offset: Sequence[int]) -> np.ndarray:
        return phi[(slice(None), *(slice(1 + o, n - 1 + o) for o, n in zip(offset, shape)))]

    def det3(c0: np.ndarray, c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
        return (
            c0[0] * (c1[1] * c2[2] - c1[2] * c2[1])
            - c1[0] * (c0[1] * c2[2] - c0[2] * c2[1])
            + c2[0] * (c0[1] * c1[2] - c0[2] * c1[1])
        )

    total = 0.0
    for signs in itertools.product((1, -1), repeat=3):
        cols = []
        for axis, s in enumerate(signs):
            off = [0, 0, 0]
            off[axis] = s
            cols.append((at(off) - centre) * s)
        total += float(np.sum(-0.5 * np.minimum(det3(*cols), 0) / 6 * m))
    for offsets in (((-1, -1, 0), (-1, 0, -1), (0, -1, -1)), ((1, 1, 0), (0, 1, 1), (1, 0, 1))):
        cols = [at(o) - centre for o in offsets]
        total += float(np.sum(-0.5 * np.minimum(det3(*cols), 0) / 6 * m))
    return total / m.sum() * 100


def _time(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> dict:
    def once() -> tuple[float, float]:
        sync()
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync()
        return time.perf_counter() - w0, time.process_time() - c0

    warm = once()
    runs = [once() for _ in range(repeats)]
    return {
        "median_s": float(np.median([r[0] for r in runs])),
        "min_s": float(min(r[0] for r in runs)),
        "cpu_median_s": float(np.median([r[1] for r in runs])),
        "warmup_s": warm[0],
    }


def _smooth_noise(
    shape: Sequence[int], channels: int, sigma: float, scale: float, gen: torch.Generator, device
) -> torch.Tensor:
    """``(1, channels, *shape)`` Gaussian-smoothed noise with standard deviation ``scale``."""
    x = torch.randn(1, channels, *shape, generator=gen).to(device)
    x = gaussian_smooth(x, sigma)
    return x * (scale / x.std())


def _voronoi_brain(shape: Sequence[int], ids: np.ndarray, gen: np.random.Generator) -> torch.Tensor:
    """An ellipsoid split into Voronoi regions (one per id); background 0. ``(*shape)`` int64."""
    nd = len(shape)

    def column(v: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(v, dtype=torch.float32).view(nd, *[1] * nd)

    centre = (np.asarray(shape) - 1) / 2
    radii = 0.42 * np.asarray(shape)
    seeds = centre + (gen.random((len(ids), nd)) - 0.5) * radii
    coords = [torch.arange(n, dtype=torch.float32) for n in shape]
    grid = torch.stack(torch.meshgrid(*coords, indexing="ij"))  # (nd, *shape)
    inside = (((grid - column(centre)) / column(radii)) ** 2).sum(0) <= 1
    best = torch.full(tuple(shape), float("inf"))
    lab = torch.zeros(tuple(shape), dtype=torch.int64)
    for k, s in enumerate(seeds):  # setup only, one pass per region
        d = ((grid - column(s)) ** 2).sum(0)
        closer = d < best
        best = torch.where(closer, d, best)
        lab[closer] = int(ids[k])
    lab[~inside] = 0
    return lab


def perf_metrics(
    shape: Sequence[int] = (160, 224, 192),
    repeats: int = 5,
    threads: int | None = None,
    labels: int = 133,
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    """Time the core operations and the metrics on one synthetic case.

    Args:
        shape: 3D grid (default LUMIR's 160×224×192).
        repeats: timed calls per item (median reported), after one warm-up call.
        threads: ``torch.set_num_threads`` for the run (None keeps the current setting).
        labels: number of sparse label ids for Dice, drawn from 0…207 like LUMIR's (0 included).
        device: ``"cpu"`` or ``"cuda"`` for the torch parts (NDV-direct is NumPy on the CPU).

    Returns:
        JSON-serialisable dict: ``torch_version``, ``torch_threads``, ``device``, ``shape``,
        ``repeats``, ``dice_labels``, ``hd95_labels``, ``timings`` (per item: ``median_s``,
        ``min_s``, ``cpu_median_s``, ``warmup_s``), ``ndv_speedup`` (direct / ours, medians),
        ``ndv_pct_ours`` / ``ndv_pct_direct`` (the two values must agree), ``fold_pct``.
    """
    if threads is not None:
        torch.set_num_threads(int(threads))
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"perf_metrics needs a 3D shape, got {shape}")
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)

    image = _smooth_noise(shape, 1, 3.0, 1.0, gen, dev)
    moving = _smooth_noise(shape, 1, 3.0, 1.0, gen, dev)
    # A smooth field of a few voxels with some folding, as an unregularised network gives.
    disp = _smooth_noise(shape, 3, 2.0, 0.8, gen, dev)
    velocity = _smooth_noise(shape, 3, 4.0, 3.0, gen, dev)

    # Dice: `labels` ids spread over 0..207 (0 = background included, as in LUMIR's list).
    ids = np.sort(np.concatenate([[0], rng.choice(np.arange(1, 208), labels - 1, replace=False)]))
    low = torch.as_tensor(ids)[torch.randint(0, labels, tuple(max(n // 8, 1) for n in shape), generator=gen)]
    fixed_seg = torch.nn.functional.interpolate(low[None, None].float(), size=shape, mode="nearest")[0, 0].long()
    warped_seg = warp(fixed_seg[None, None].to(dev), disp, mode="nearest")[0, 0]
    fixed_seg = fixed_seg.to(dev)

    # HD95: a brain-like ellipsoid cut into 16 Voronoi regions, and a perturbed copy.
    hd_ids = np.sort(rng.choice(np.arange(1, 208), HD95_LABELS, replace=False))
    hd_fixed = _voronoi_brain(shape, hd_ids, np.random.default_rng(seed + 1))
    hd_warped = warp(hd_fixed[None, None].to(dev), disp, mode="nearest")[0, 0].cpu()
    hd_fixed_np, hd_warped_np = hd_fixed.numpy(), hd_warped.numpy()

    disp0 = disp[0]
    disp_np = disp0.cpu().numpy().astype(np.float64)
    timings: dict[str, dict] = {}

    timings["warp_trilinear"] = _time(lambda: warp(moving, disp), repeats, sync)

    def ncc_fb() -> None:
        w = moving.detach().clone().requires_grad_(True)
        loss = -local_ncc(image, w, 9)
        loss.backward()

    heavy = max(1, min(repeats, 3))  # fewer repeats for the slow items
    timings["local_ncc9_fwd_bwd"] = _time(ncc_fb, heavy, sync)
    timings["integrate_velocity_7"] = _time(lambda: integrate_velocity(velocity, 7), repeats, sync)
    timings["dice_%d_labels" % labels] = _time(lambda: M.dice_per_label(fixed_seg, warped_seg, ids), repeats, sync)
    timings["hd95_%d_labels" % HD95_LABELS] = _time(
        lambda: M.hd95_per_label(hd_fixed_np, hd_warped_np, hd_ids, spacing=(1.0, 1.0, 1.0)), heavy, sync
    )
    timings["jacobian_fold"] = _time(lambda: M.fold_pct(M.jacobian_determinant(disp0)), repeats, sync)
    timings["ndv_ours"] = _time(lambda: M.ndv_pct(disp0), repeats, sync)
    timings["ndv_numpy_direct"] = _time(lambda: ndv_pct_numpy_direct(disp_np), heavy, lambda: None)
    disp_np32 = disp_np.astype(np.float32)
    timings["ndv_numpy_direct_f32"] = _time(lambda: ndv_pct_numpy_direct(disp_np32, dtype=np.float32), heavy, lambda: None)

    ours = M.ndv_pct(disp0)
    direct = ndv_pct_numpy_direct(disp_np)
    return {
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(dev),
        "shape": list(shape),
        "repeats": repeats,
        "dice_labels": int(labels),
        "hd95_labels": HD95_LABELS,
        "timings": timings,
        "ndv_speedup": timings["ndv_numpy_direct"]["median_s"] / timings["ndv_ours"]["median_s"],
        "ndv_speedup_cpu": timings["ndv_numpy_direct"]["cpu_median_s"] / max(timings["ndv_ours"]["cpu_median_s"], 1e-9),
        # equal precision: the reference algorithm in float32, as ours computes
        "ndv_speedup_f32": timings["ndv_numpy_direct_f32"]["median_s"] / timings["ndv_ours"]["median_s"],
        "ndv_speedup_f32_cpu": timings["ndv_numpy_direct_f32"]["cpu_median_s"] / max(timings["ndv_ours"]["cpu_median_s"], 1e-9),
        "ndv_pct_direct_f32": ndv_pct_numpy_direct(disp_np32, dtype=np.float32),
        "ndv_pct_ours": ours,
        "ndv_pct_direct": direct,
        "fold_pct": M.fold_pct(M.jacobian_determinant(disp0)),
    }


def format_perf(res: dict) -> str:
    """A plain-text table of :func:`perf_metrics`' result."""
    lines = [
        f"torch {res['torch_version']}  threads {res['torch_threads']}  device {res['device']}  "
        f"shape {'x'.join(map(str, res['shape']))}  repeats {res['repeats']}",
        f"{'item':26s} {'median s':>9s} {'min s':>8s} {'cpu s':>8s} {'warm-up s':>9s}",
    ]
    for name, t in res["timings"].items():
        lines.append(f"{name:26s} {t['median_s']:9.3f} {t['min_s']:8.3f} {t['cpu_median_s']:8.3f} {t['warmup_s']:9.3f}")
    if "ndv_speedup_f32" in res:
        lines.append(
            f"NDV speed-up at equal precision (direct NumPy float32 / ours float32): {res['ndv_speedup_f32']:.1f}x wall, "
            f"{res['ndv_speedup_f32_cpu']:.1f}x cpu; NDV direct float32 {res['ndv_pct_direct_f32']:.5f} %"
        )
    lines.append(
        f"NDV speed-up (direct NumPy float64 / ours): {res['ndv_speedup']:.1f}x wall, {res['ndv_speedup_cpu']:.1f}x cpu; "
        f"NDV ours {res['ndv_pct_ours']:.5f} %  direct {res['ndv_pct_direct']:.5f} %  (fold {res['fold_pct']:.3f} %)"
    )
    return "\n".join(lines)


def main_perf_metrics(
    out: str | None = None,
    repeats: int = 5,
    threads: int | None = None,
    shape: Sequence[int] = (160, 224, 192),
    device: str = "cpu",
) -> dict:
    """Run :func:`perf_metrics`, print the table, and write the JSON to ``out`` if given."""
    res = perf_metrics(shape=shape, repeats=repeats, threads=threads, device=device)
    print(format_perf(res))
    if out:
        p = Path(out)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(res, indent=2, allow_nan=True))
        print(f"wrote {p}")
    if not math.isclose(res["ndv_pct_ours"], res["ndv_pct_direct"], rel_tol=1e-3, abs_tol=1e-6):
        print("WARNING: NDV of ours and of the direct NumPy version disagree")
    return res
