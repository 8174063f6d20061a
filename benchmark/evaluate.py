"""`regbench evaluate`: the suite's metrics on a displacement field produced by any tool.

The field is a Learn2Reg-format displacement on the fixed grid (voxels, pull). The fixed
segmentation defines that grid. The moving segmentation must lie on the moving image's
grid, which is the fixed grid unless ``moving_image`` is given. Labels on another grid are
refused (the message names the file and the fix) unless ``resample_labels`` is set, in
which case they are resampled through the affines with nearest neighbour.

The field's own grid is checked too. A NIfTI field carries its affine (the fixed grid it was
computed on); a field exported by ``regbench run`` also has a JSON record beside it
(``disp_a_b.json``: the grids of the fixed and moving images the field maps between, the
original files, and the output→input voxel maps of the preprocessing). When that grid is
not the fixed image's (e.g. a run reoriented, resampled or cropped the images), the field is
refused with one line naming both files, or, with ``resample_field``, mapped back onto the
original grids through the affines (:func:`map_field_to_grid`): the field's voxel map
``v_f → v_f + u(v_f)`` becomes, in world terms, ``y → B_p (A_p⁻¹ y + u(A_p⁻¹ y))`` and is
written again in voxels of the original fixed and moving grids.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from benchmark.core import metrics, registry
from benchmark.core.io import (
    GRID_ATOL_MM,
    DataError,
    Volume,
    field_sidecar_path,
    grid_text,
    load_landmarks,
    load_segmentation,
    load_volume,
    read_displacement,
    read_displacement_grid,
)
from benchmark.core.spatial import warp

__all__ = ["evaluate_files", "format_table", "map_field_to_grid", "read_field_record"]


def map_field_to_grid(
    u: np.ndarray,
    field_affine: np.ndarray,
    field_moving_affine: np.ndarray,
    fixed_affine: np.ndarray,
    fixed_shape: tuple[int, ...],
    moving_affine: np.ndarray,
    chunk: int = 1 << 20,
) -> tuple[np.ndarray, float]:
    """Map a displacement field onto other fixed and moving grids through the affines.

    The field ``u`` (voxels of its grid ``A_p``, pull) maps fixed voxel ``p`` to moving voxel
    ``p + u(p)`` of the moving grid ``B_p`` it was computed with. On the target grids
    (fixed ``A_f`` of shape ``fixed_shape``, moving ``B_m``), voxel ``v`` maps to
    ``B_m⁻¹ B_p (p + u(p))`` with ``p = A_p⁻¹ A_f v`` (``u`` sampled trilinearly, edge values
    outside its grid); the returned field is that minus ``v``. Exact for reorientations and
    integer crops/pads, and for any field affine in the voxel index (trilinear reproduces it).

    Args:
        u: ``(3, X, Y, Z)`` float displacement in voxels of ``field_affine``'s grid.
        field_affine, field_moving_affine: ``(4, 4)`` voxel→world of the fixed and moving grids
            the field was computed on (mm).
        fixed_affine, fixed_shape: the target fixed grid.
        moving_affine: ``(4, 4)`` the target moving grid.
        chunk: voxels per pass (bounds the memory).

    Returns:
        ``(3, *fixed_shape)`` float32 displacement in voxels of the target fixed grid, and the
        share (in %) of target voxels whose sample point fell outside the field's grid.
    """
    from scipy.ndimage import map_coordinates

    u = np.asarray(u, dtype=np.float64)
    m_in = np.linalg.inv(np.asarray(field_affine, np.float64)) @ np.asarray(fixed_affine, np.float64)
    m_out = np.linalg.inv(np.asarray(moving_affine, np.float64)) @ np.asarray(field_moving_affine, np.float64)
    shape = tuple(int(n) for n in fixed_shape)
    n = int(np.prod(shape))
    hi = np.asarray(u.shape[1:], dtype=np.float64) - 1
    out = np.empty((3, n), dtype=np.float32)
    outside = 0
    for start in range(0, n, chunk):
        idx = np.arange(start, min(n, start + chunk))
        v = np.stack(np.unravel_index(idx, shape)).astype(np.float64)
        p = m_in[:3, :3] @ v + m_in[:3, 3:4]
        outside += int(((p < -1e-6) | (p > hi[:, None] + 1e-6)).any(0).sum())
        up = np.stack([map_coordinates(u[c], p, order=1, mode="nearest") for c in range(3)])
        q = p + up
        out[:, start : start + len(idx)] = (m_out[:3, :3] @ q + m_out[:3, 3:4] - v).astype(np.float32)
    return out.reshape(3, *shape), 100.0 * outside / max(n, 1)


def read_field_record(disp: str | Path) -> dict | None:
    """The JSON record ``regbench run`` writes beside an exported field (``None`` if absent)."""
    p = field_sidecar_path(disp)
    if not p.is_file():
        return None
    try:
        rec = json.loads(p.read_text())
    except ValueError as exc:
        raise DataError(p, f"is not valid JSON ({exc})", "delete it or write it again with the run") from exc
    if not isinstance(rec, dict):
        raise DataError(p, "must hold a JSON object (the field's grids)")
    for key in ("field_affine", "moving_affine"):
        if key in rec:
            a = np.asarray(rec[key], dtype=np.float64)
            if a.shape != (4, 4) or not np.isfinite(a).all():
                raise DataError(p, f"{key!r} is not a 4x4 affine")
    return rec


def _meta_volume(affine: np.ndarray, shape: tuple[int, ...], path: str) -> Volume:
    """A grid without voxels (for grid checks and affines): data is a zero-size broadcast view."""
    return Volume(np.broadcast_to(np.zeros((), np.uint8), tuple(int(n) for n in shape)), np.asarray(affine, np.float64), path)


def _check_npz_key(disp: str | Path) -> None:
    """An ``.npz`` field must hold its array under ``disp`` (Learn2Reg); another array is not guessed."""
    if not str(disp).lower().endswith(".npz") or not Path(disp).is_file():
        return
    try:
        with np.load(disp, allow_pickle=False) as z:
            keys = list(z.files)
    except (OSError, ValueError) as exc:
        raise DataError(disp, f"not a readable .npz archive ({exc})") from None
    if "disp" not in keys:
        raise DataError(disp, f"has no array named 'disp' (it holds: {', '.join(keys) or 'nothing'})",
                        "save the field with np.savez(path, disp=field), as Learn2Reg does")


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
    resample_field: bool = False,
    landmark_units: str = "voxel",
) -> dict:
    """Evaluate a displacement file; returns the metrics dict (JSON-ready).

    Keys: ``dice``, ``dice_per_label``, ``hd95``, ``hd95_per_label``, ``tre`` (None without
    landmarks), ``fold_pct``, ``sdlogj``, ``sdlogj_l2r``, ``ndv_pct``, every registered
    deformable metric with a ``compute`` (:mod:`benchmark.core.registry`), plus ``labels``,
    ``shape``, ``spacing_mm``, ``hd95_voxel`` (HD95 in voxels rather than mm),
    ``n_landmarks``, ``field_resampled`` (and ``field_outside_pct`` when it was).

    The field's grid (its NIfTI affine, or the run's JSON record beside it) must be the fixed
    grid (fixed image, else fixed labels, else mask); with a run's record, the moving grid it
    names must be the moving image's. Otherwise a :class:`DataError` names both files, unless
    ``resample_field`` maps the field onto those grids (:func:`map_field_to_grid`).
    ``landmark_units`` (``"voxel"`` or ``"mm"``) says how the landmark CSVs are read; either
    way every point must fall inside its image's grid
    (:func:`benchmark.core.io.check_landmarks_on_grid`).
    """
    if (fixed_seg is None) != (moving_seg is None):
        raise DataError(None, "give both --fixed-seg and --moving-seg, or neither")
    _check_npz_key(disp)
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
    record = read_field_record(disp)
    if mvol is None and record is not None and record.get("moving_original_affine") is not None:
        # The run recorded the original moving image's grid: the moving labels and landmarks lie there.
        mvol = _meta_volume(record["moving_original_affine"], tuple(record["moving_original_shape"]),
                            f"{record.get('moving_image', 'the moving image')} (from {field_sidecar_path(disp).name})")
    if moving_seg is not None:
        mseg = load_segmentation(moving_seg, reference=mvol or ref, on_grid_mismatch=on_mismatch)
    mvol = mvol or ref

    mask_vol = None
    if mask is not None:
        try:
            mask_vol = load_segmentation(mask, reference=ref, on_grid_mismatch="error") if ref else load_segmentation(mask)
        except DataError as exc:
            if ref is None or exc.path != str(mask):
                raise
            # load_segmentation's hint (--resample-labels) is for label maps; it does not apply to the mask
            raise DataError(mask, exc.problem, f"a mask must lie on the fixed grid of {ref.path}: resample it onto that "
                                               "grid first (nearest neighbour); --resample-labels applies to label maps only") from None
        ref = ref or mask_vol

    # The field's grid: its header, else the run's record; the moving grid it was computed with.
    f_aff, f_shape = read_displacement_grid(disp)
    if f_aff is None and record is not None and record.get("field_affine") is not None:
        f_aff, f_shape = np.asarray(record["field_affine"], np.float64), tuple(record.get("field_shape") or ()) or None
    fm_aff = np.asarray(record["moving_affine"], np.float64) if record is not None and "moving_affine" in record else f_aff
    resampled, outside_pct = False, 0.0
    reg_u: np.ndarray | None = None  # the field for the regularity metrics, when not ``u`` itself
    if ref is not None and f_aff is not None:
        # Same affine, other shape: a wrong file rather than another grid (read_displacement says so).
        fixed_ok = np.allclose(f_aff, ref.affine, atol=GRID_ATOL_MM, rtol=0)
        mref = mvol or ref
        moving_ok = record is None or fm_aff is None or np.allclose(fm_aff, mref.affine, atol=GRID_ATOL_MM, rtol=0)
        if not (fixed_ok and moving_ok):
            if fixed_ok:
                detail = (f"was computed with a moving image on another grid ({grid_text(fm_aff, f_shape or ref.shape)}) "
                          f"than {mref.path} ({grid_text(mref.affine, mref.shape)})")
            else:
                detail = (f"lies on another grid ({grid_text(f_aff, f_shape or ())}) than the fixed {ref.path} "
                          f"({grid_text(ref.affine, ref.shape)})")
            if not resample_field:
                raise DataError(disp, detail, "pass --resample-field to map it through the affines onto these images' "
                                              "grids, or evaluate it against the images it was computed on")
            raw = read_displacement(disp, shape=f_shape)
            fm = fm_aff if fm_aff is not None else f_aff
            u, outside_pct = map_field_to_grid(raw, f_aff, fm, ref.affine, ref.shape, mref.affine)
            resampled = True
            # Regularity (fold %, SDlogJ, NDV) in the field's own frame, as the run measured it:
            # the moving point written in the field's moving voxels, read as offsets of the field's
            # fixed frame and carried to the fixed voxels (a fixed and a moving grid of opposite
            # handedness would otherwise fold every voxel). Without a run record (moving frame =
            # fixed frame) this is the physical map written in fixed voxels.
            reg_u = _frame_field(u, np.linalg.inv(ref.affine) @ f_aff @ np.linalg.inv(fm) @ mref.affine)
            if outside_pct > 0:
                warnings.warn(f"{disp}: {outside_pct:.2f}% of the fixed grid {ref.path} lies outside the field's grid; "
                              "the field's edge values are used there", UserWarning, stacklevel=2)
        else:
            u = read_displacement(disp, shape=ref.shape)
    else:
        u = read_displacement(disp, shape=ref.shape if ref is not None else f_shape)
    if not resampled and ref is not None and mvol is not None:
        # The same rule on the images' own grids: a moving image on another grid than the fixed
        # one (and no run record saying the field's frame is that grid) gets its regularity
        # from the physical map; a moving grid of opposite handedness would fold every voxel.
        fa = f_aff if f_aff is not None else ref.affine
        k = np.linalg.inv(ref.affine) @ fa @ np.linalg.inv(fm_aff if fm_aff is not None else fa) @ mvol.affine
        if not np.allclose(k, np.eye(4), atol=1e-6):
            reg_u = _frame_field(u, k)
    spatial = tuple(u.shape[1:])
    if ref is not None:
        affine = ref.affine
    elif f_aff is not None:
        affine = f_aff
    else:
        affine = np.eye(4)
    if mvol is not None:
        moving_affine, moving_shape = mvol.affine, mvol.shape
    else:
        moving_affine, moving_shape = (fm_aff if fm_aff is not None and ref is None else affine), spatial
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))

    disp_t = torch.from_numpy(u)
    out: dict = {}
    label_list: list[int] = []
    warped = None
    if fseg is not None and mseg is not None:
        label_list = _parse_labels(labels, fseg.data)
        if not label_list:
            raise DataError(fseg.path, "no foreground labels to evaluate", "pass --labels")
        if labels is not None:  # named labels that neither map holds would score as silent NaNs
            present = {int(v) for v in np.unique(fseg.data)} | {int(v) for v in np.unique(mseg.data)}
            absent = [lab for lab in label_list if lab not in present]
            if absent:
                have = sorted(present - {0})
                raise DataError(None, f"--labels {','.join(map(str, absent))}: not in {fseg.path} nor in {mseg.path} "
                                      f"(labels present: {','.join(map(str, have[:20]))}{' …' if len(have) > 20 else ''})")
        mt = torch.from_numpy(mseg.data)[None, None]
        warped = warp(mt, disp_t[None], mode="nearest")[0, 0].numpy()

    fpts = mpts = None
    if fixed_landmarks is not None:
        fpts = load_landmarks(fixed_landmarks, affine, spatial, landmark_units,
                              ref.path if ref is not None else None)
        mpts = load_landmarks(moving_landmarks, moving_affine, moving_shape, landmark_units,
                              mvol.path if mvol is not None else (ref.path if ref is not None else None))
        if len(fpts) != len(mpts):
            raise DataError(moving_landmarks, f"has {len(mpts)} landmarks, {fixed_landmarks} has {len(fpts)}")

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
        moving_seg=None if mseg is None else mseg.data,
    )
    out.update(res)
    if reg_u is not None:
        jac = metrics.jacobian_determinant(torch.from_numpy(reg_u))
        msk = None if mask_vol is None else mask_vol.data > 0
        out["fold_pct"] = metrics.fold_pct(jac, msk)
        out["sdlogj"] = metrics.sdlogj(jac, msk)
        out["sdlogj_l2r"] = metrics.sdlogj_l2r(jac, msk)
        out["ndv_pct"] = metrics.ndv_pct(torch.from_numpy(reg_u), msk)
    out["labels"] = label_list
    out["shape"] = list(spatial)
    out["spacing_mm"] = list(spacing)
    out["hd95_voxel"] = bool(hd95_voxel)  # HD95's unit: voxels, else mm (the table and the JSON say so)
    out["n_landmarks"] = 0 if fpts is None else int(len(fpts))
    out["field_resampled"] = resampled
    if resampled:
        out["field_outside_pct"] = outside_pct
    return out


def _frame_field(u: np.ndarray, k: np.ndarray) -> np.ndarray:
    """``(3, *S)`` displacement, in fixed voxels, of the map ``i ↦ k·(i + u(i))``: the moving
    point ``i + u`` (voxels of a moving frame) carried to fixed voxels by the ``(4, 4)`` affine
    ``k`` (moving frame → fixed voxels)."""
    from benchmark.core.spatial import affine_to_disp

    # k·(i + u) − i = (A·i + t − i) + A·u: the affine's own field plus the carried displacement
    carried = np.einsum("de,e...->d...", k[:3, :3].astype(np.float32), u)
    return (affine_to_disp(k, u.shape[1:])[0].numpy() + carried).astype(np.float32)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def format_table(res: dict) -> str:
    """Readable two-column table of the summary metrics (the registry's entries with a
    ``label``) and per-label Dice."""
    rows = []
    for m in registry.evaluate_rows("deformable"):
        label = m.label.replace("(mm)", "(vox)") if m.key == "hd95" and res.get("hd95_voxel") else m.label
        rows.append((label, res.get(m.key)))
    width = max(len(r[0]) for r in rows)
    lines = [f"{k:<{width}}  {_fmt(v)}" for k, v in rows]
    per = res.get("dice_per_label") or {}
    if per:
        lines.append("")
        lines.append("Dice per label:")
        for k, v in per.items():
            lines.append(f"  {k:>6}  {_fmt(v)}")
    return "\n".join(lines)
