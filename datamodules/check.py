"""The data check's shared parts (``regbench data check``; each data module's ``check()``).

:class:`DataCheck` collects a summary, notes and problems and hands them over as
:class:`datamodules.base.CheckLine` s; :func:`check_subjects` reads every subject of a list
the way the loaders will (shapes, spacings, orientations, label ids, landmarks) and
:func:`check_pairs` counts pairs and flags pairs whose images lie on different grids.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from benchmark.core.io import DataError, load_landmarks, load_segmentation, load_volume, orientation_codes
from datamodules.base import CheckLine
from datamodules.real_base import guarded

__all__ = ["DataCheck", "check_subjects", "check_pairs"]


class DataCheck:
    """A data check under way: ``summary`` (JSON-able), ``problems`` and ``notes`` (one line
    each, file first); :meth:`lines` gives them as :class:`CheckLine` s."""

    def __init__(self, root: str | Path) -> None:
        self.root = str(root)
        self.summary: dict[str, Any] = {}
        self.problems: list[str] = []
        self.notes: list[str] = []

    def lines(self) -> list[CheckLine]:
        return ([CheckLine.summary(k, v) for k, v in self.summary.items()] + [CheckLine.note(n) for n in self.notes]
                + [CheckLine.problem(p) for p in self.problems])


def check_subjects(subjects: list[Any], report: DataCheck, resample_labels: bool, stray: tuple[int, ...] = (),
                    headers_only: bool = False, landmark_units: str = "voxel",
                    canonical: bool = True) -> dict[str, tuple[int, ...]]:
    """Read every subject; fill shape/spacing/orientation/label statistics; return id → shape of the readable ones.

    ``canonical``: the data module reorients every image to RAS on load; without it, mixed
    orientations are a problem (pairs would be matched voxel for voxel across flipped axes)."""
    shapes: Counter = Counter()
    spacings: Counter = Counter()
    orients: Counter = Counter()
    labels: set[int] = set()
    grid: dict[str, tuple[int, ...]] = {}
    seen: set[str] = set()
    for s in subjects:
        key = str(s.image)
        if key in seen:
            continue
        seen.add(key)
        try:
            if headers_only:
                img = nib.load(str(s.image))
                shape, affine = tuple(int(v) for v in img.shape[:3]), np.asarray(img.affine)
            else:
                vol = guarded(s.image, load_volume)
                shape, affine = vol.shape, vol.affine
        except DataError as exc:
            report.problems.append(str(exc))
            continue
        except Exception as exc:  # nibabel header errors in headers_only mode
            report.problems.append(f"{s.image}: cannot be read as NIfTI ({type(exc).__name__}: {exc})")
            continue
        grid[s.subject_id] = shape
        shapes[str(shape)] += 1
        spacings["×".join(f"{v:.3g}" for v in np.linalg.norm(affine[:3, :3], axis=0))] += 1
        orients[orientation_codes(affine)] += 1
        if s.seg is not None and not headers_only:
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    seg = guarded(s.seg, load_segmentation, reference=vol,
                                   on_grid_mismatch="resample" if resample_labels else "error")
                for w in caught:
                    report.notes.append(str(w.message))
                ids = {int(v) for v in np.unique(seg.data) if v != 0}
                bad = sorted(ids & set(stray))
                if bad:
                    report.notes.append(f"{s.seg}: stray labels {bad} present (mapped to background on load)")
                labels |= ids
            except DataError as exc:
                report.problems.append(str(exc))
        if s.landmarks is not None and (not headers_only or str(s.landmarks).lower().endswith(".csv")):
            try:
                if str(s.landmarks).lower().endswith(".csv"):
                    n = load_landmarks(s.landmarks, affine, shape, landmark_units, s.image).shape[0]
                else:
                    lm = guarded(s.landmarks, load_volume, dtype=np.int64)
                    n = int(np.count_nonzero(np.unique(lm.data)))
                    if n == 0:
                        report.problems.append(f"{s.landmarks}: landmark volume holds no landmark ids")
                report.summary.setdefault("landmarks_per_subject", {})[s.subject_id] = n
            except DataError as exc:
                report.problems.append(str(exc))
    report.summary["shapes"] = dict(shapes)
    report.summary["spacings_mm"] = dict(spacings)
    report.summary["orientations"] = dict(orients)
    if len(orients) > 1 and canonical:
        report.notes.append(f"{report.root}: mixed orientations {dict(orients)} (reoriented to RAS on load)")
    elif len(orients) > 1:
        report.problems.append(f"{report.root}: mixed orientations {dict(orients)} with `canonical: false`: pairs across "
                               "them would be matched voxel for voxel (set `canonical: true` to reorient to RAS on load)")
    if len(spacings) > 1:
        report.notes.append(f"{report.root}: mixed spacings {dict(spacings)} (set `spacing` to resample)")
    if not headers_only:
        report.summary["label_ids_found"] = sorted(labels)
        report.summary["n_label_ids"] = len(labels)
    return grid


def check_pairs(report: DataCheck, name: str, pairs: list[tuple[Any, Any]], grid: dict[str, tuple[int, ...]],
                 preprocessed_shape: Any) -> None:
    report.summary.setdefault("pairs", {})[name] = len(pairs)
    if preprocessed_shape is not None:
        return
    for f, m in pairs:
        gf, gm = grid.get(f.subject_id), grid.get(m.subject_id)
        if gf is not None and gm is not None and gf != gm:
            report.problems.append(f"{m.image}: shape {gm} differs from its fixed image {f.image.name} {gf} "
                                   "(set a common `shape`/`spacing` in the data module)")
