"""`regbench evaluate`: the suite's metrics on a displacement field produced by any tool.

The field is a Learn2Reg-format displacement on the fixed grid (voxels, pull). The fixed
segmentation defines that grid. The moving segmentation must lie on the moving image's
grid, which is the fixed grid unless ``moving_image`` is given. Labels on another grid are
refused (the message names the file and the fix) unless ``resample_labels`` is set, in
which case they are resampled through the affines with nearest neighbour.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from benchmark import metrics
from benchmark.io import DataError, Volume, load_segmentation, load_volume, read_displacement, read_landmarks_csv
from benchmark.spatial import warp

__all__ = ["evaluate_files", "format_table"]


def _parse_labels(labels: str | Sequence[int] | None, fixed: np.ndarray) -> list[int]:
    if labels is None:
        found = np.unique(fixed)
        return [int(v) for v in found if v != 0]
    if isinstance(labels, str):
        try:
            return [int(t) for t in labels.replace(" ", "").split(",") if t]
        except ValueError:
            raise DataError(None, f"--labels {labels!r} is not a comma-separated list of integers") from None
    return [int(v) for v in labels]


def evaluate_files(
    disp: str | Path,
    fixed_seg: str | Path | None = None,
    moving_seg: str | Path | None = None,
    labels: str | Sequence[int] | None = None,
    fixed_landmarks: str | Path | None = None,
    moving_landmarks: str | Path | None = None,
    mask: str | Path | None = None,
    moving_image: str | Path | None = None,
    fixed_image: str | Path | None = None,
    resample_labels: bool = False,
    hd95_voxel: bool = False,
) -> dict:
    """Evaluate a displacement file; returns the metrics dict (JSON-ready).

    Keys: ``dice``, ``dice_per_label``, ``hd95``, ``hd95_per_label``, ``tre`` (None without
    landmarks), ``fold_pct``, ``sdlogj``, ``sdlogj_l2r``, ``ndv_pct``, plus ``labels``,
    ``shape``, ``spacing_mm``, ``n_landmarks``.
    """
    if (fixed_seg is None) != (moving_seg is None):
        raise DataError(None, "give both --fixed-seg and --moving-seg, or neither")
    if (fixed_landmarks is None) != (moving_landmarks is None):
        raise DataError(None, "give both --fixed-landmarks and --moving-landmarks, or neither")
    on_mismatch = "resample" if resample_labels else "error"

    # The fixed grid: the fixed image if given, else the fixed segmentation, else the mask.
    ref: Volume | None = None
    if fixed_image is not None:
        ref = load_volume(fixed_image)
    fseg = mseg = None
    if fixed_seg is not None:
        fseg = load_segmentation(fixed_seg, reference=ref, on_grid_mismatch=on_mismatch)
        ref = ref or Volume(fseg.data, fseg.affine, fseg.path)
    mvol: Volume | None = load_volume(moving_image) if moving_image is not None else None
    if moving_seg is not None:
        mseg = load_segmentation(moving_seg, reference=mvol or ref, on_grid_mismatch=on_mismatch)
    mvol = mvol or ref

    mask_vol = None
    if mask is not None:
        mask_vol = load_segmentation(mask, reference=ref, on_grid_mismatch="error") if ref else load_segmentation(mask)
        ref = ref or mask_vol

    shape = ref.shape if ref is not None else None
    u = read_displacement(disp, shape=shape)
    spatial = tuple(u.shape[1:])
    affine = ref.affine if ref is not None else np.eye(4)
    moving_affine = mvol.affine if mvol is not None else affine
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))

    disp_t = torch.from_numpy(u)
    out: dict = {}
    label_list: list[int] = []
    warped = None
    if fseg is not None and mseg is not None:
        label_list = _parse_labels(labels, fseg.data)
        if not label_list:
            raise DataError(fseg.path, "no foreground labels to evaluate", "pass --labels")
        mt = torch.from_numpy(mseg.data)[None, None]
        warped = warp(mt, disp_t[None], mode="nearest")[0, 0].numpy()

    fpts = mpts = None
    if fixed_landmarks is not None:
        fpts = read_landmarks_csv(fixed_landmarks)
        mpts = read_landmarks_csv(moving_landmarks)
        if len(fpts) != len(mpts):
            raise DataError(moving_landmarks, f"has {len(mpts)} landmarks, {fixed_landmarks} has {len(fpts)}")
        for pts, path in ((fpts, fixed_landmarks), (mpts, moving_landmarks)):
            if (pts < -0.5).any() or (pts > np.asarray(spatial) - 0.5).any():
                raise DataError(path, f"landmarks fall outside the grid {spatial} (they must be voxel indices, not mm)")

    res = metrics.deformable_metrics(
        disp_t,
        fixed_seg=None if fseg is None else fseg.data,
        warped_seg=warped,
        labels=label_list or None,
        spacing=spacing,
        fixed_points=fpts,
        moving_points=mpts,
        moving_affine=moving_affine,
        mask=None if mask_vol is None else mask_vol.data > 0,
        hd95_voxel=hd95_voxel,
    )
    out.update(res)
    out["labels"] = label_list
    out["shape"] = list(spatial)
    out["spacing_mm"] = list(spacing)
    out["n_landmarks"] = 0 if fpts is None else int(len(fpts))
    return out


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def format_table(res: dict) -> str:
    """Readable two-column table of the summary metrics and per-label Dice."""
    rows = [
        ("Dice (mean)", res.get("dice")),
        ("HD95 (mm)" if not res.get("hd95_voxel") else "HD95 (vox)", res.get("hd95")),
        ("TRE (mm)", res.get("tre")),
        ("fold %", res.get("fold_pct")),
        ("SDlogJ", res.get("sdlogj")),
        ("SDlogJ (Learn2Reg)", res.get("sdlogj_l2r")),
        ("NDV %", res.get("ndv_pct")),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{k:<{width}}  {_fmt(v)}" for k, v in rows]
    per = res.get("dice_per_label") or {}
    if per:
        lines.append("")
        lines.append("Dice per label:")
        for k, v in per.items():
            lines.append(f"  {k:>6}  {_fmt(v)}")
    return "\n".join(lines)
