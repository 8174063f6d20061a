"""Tiny fake copies of the real dataset layouts, built on the fly for the tests.

Every subject shows the same "anatomy" defined in **world** coordinates (mm), sampled on its
own grid (random orientation, spacing, small rotation, origin), so correspondences between
subjects and across preprocessing are known exactly:

* image ``world_image(w)``: a smooth function of the world point;
* labels ``world_labels(w)``: ids by position relative to planes and a sphere;
* landmarks: fixed world points (``WORLD_POINTS``), written as voxel indices of each image.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy.spatial.transform import Rotation

__all__ = [
    "random_affine",
    "world_image",
    "world_labels",
    "sample_world",
    "write_subject",
    "build_mindboggle",
    "build_lumir",
    "build_nifti_folder",
    "corrupt_gz",
    "WORLD_POINTS",
]

#: Landmarks in world mm (inside the field of view of every fake subject).
WORLD_POINTS = np.array([[2.0, -3.0, 1.5], [-4.0, 2.5, -2.0], [5.5, 4.0, 3.0], [-1.0, -5.0, -4.5]])
#: Label ids of the fake DKT-like maps (left/right cortical ids).
FAKE_IDS = (1002, 1003, 2002, 2003, 1005)


def random_affine(rng: np.random.Generator, shape: Sequence[int], spacing_range=(0.8, 1.6), max_rot: float = 0.15,
                  centre: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """Voxel→world affine with a random axis permutation and flips, anisotropic spacing and a
    small rotation, whose grid centre lies at ``centre`` (mm)."""
    perm = rng.permutation(3)
    signs = rng.choice([-1.0, 1.0], 3)
    sp = rng.uniform(*spacing_range, 3)
    r = np.zeros((3, 3))
    for j in range(3):
        r[perm[j], j] = signs[j] * sp[j]
    r = Rotation.from_rotvec(rng.uniform(-max_rot, max_rot, 3)).as_matrix() @ r
    a = np.eye(4)
    a[:3, :3] = r
    mid = (np.asarray(shape, float) - 1) / 2
    a[:3, 3] = np.asarray(centre, float) - r @ mid
    return a


def world_image(w: np.ndarray) -> np.ndarray:
    """Smooth intensity at world points ``(..., 3)`` mm, in about ``[0, 1]``."""
    x, y, z = w[..., 0], w[..., 1], w[..., 2]
    return 0.5 + 0.2 * np.sin(0.35 * x + 0.2) * np.cos(0.3 * y) + 0.15 * np.tanh(0.2 * z) + 0.01 * x


def world_labels(w: np.ndarray, ids: Sequence[int] = FAKE_IDS) -> np.ndarray:
    """Integer labels at world points: background outside a 9 mm sphere; inside, ids by octant-like cuts."""
    x, y, z = w[..., 0], w[..., 1], w[..., 2]
    r = np.sqrt(x**2 + y**2 + z**2)
    out = np.zeros(w.shape[:-1], np.int16)
    inside = r < 9.0
    out[inside & (x < 0) & (y < 0)] = ids[0]
    out[inside & (x < 0) & (y >= 0)] = ids[1]
    out[inside & (x >= 0) & (y < 0)] = ids[2]
    out[inside & (x >= 0) & (y >= 0)] = ids[3]
    out[(r < 3.5) & (z > 0)] = ids[4]
    return out


def sample_world(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """World coordinates ``(*shape, 3)`` of every voxel centre."""
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def write_subject(image_path: Path, affine: np.ndarray, shape: Sequence[int], seg_path: Path | None = None,
                  seg_affine: np.ndarray | None = None, seg_shape: Sequence[int] | None = None,
                  landmarks_path: Path | None = None, scale: float = 1.0, dtype=np.float32,
                  extra_labels: dict[int, int] | None = None, ids: Sequence[int] = FAKE_IDS) -> None:
    """Write one subject: image (``scale * world_image``), optional labels (on their own grid
    when ``seg_affine`` / ``seg_shape`` differ) and optional landmarks CSV (voxel indices)."""
    image_path.parent.mkdir(parents=True, exist_ok=True)
    w = sample_world(shape, affine)
    img = (scale * world_image(w)).astype(dtype)
    nib.save(nib.Nifti1Image(img, affine), str(image_path))
    if seg_path is not None:
        sa = affine if seg_affine is None else seg_affine
        ss = shape if seg_shape is None else seg_shape
        lab = world_labels(sample_world(ss, sa), ids)
        for src_id, count in (extra_labels or {}).items():  # a few stray voxels
            flat = np.flatnonzero(lab)
            lab.flat[flat[:count]] = src_id
        seg_path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(lab, sa), str(seg_path))
    if landmarks_path is not None:
        inv = np.linalg.inv(affine)
        vox = WORLD_POINTS @ inv[:3, :3].T + inv[:3, 3]
        landmarks_path.parent.mkdir(parents=True, exist_ok=True)
        with open(landmarks_path, "w", newline="") as fh:
            wr = csv.writer(fh)
            wr.writerow(["x", "y", "z"])
            wr.writerows(vox.tolist())


def corrupt_gz(path: Path) -> None:
    """Truncate a ``.nii.gz`` in the middle of its compressed data."""
    raw = path.read_bytes()
    path.write_bytes(raw[: max(40, len(raw) // 2)])


def build_mindboggle(root: Path, cohorts: dict[str, int] | None = None, shape=(14, 16, 12), seed: int = 0,
                     missing_label: str | None = None, corrupt: str | None = None, stray: bool = True,
                     native_mixed: bool = True) -> Path:
    """Fake MindBoggle-101 release under ``root``: ``<cohort>_volumes/<cohort>-<n>/`` folders with
    MNI152 files (one shared 1 mm grid) and native files (random grids when ``native_mixed``).

    Args:
        cohorts: cohort → number of subjects.
        missing_label: subject id whose label files are left out.
        corrupt: subject id whose MNI152 image is truncated.
        stray: subject ``-1`` of every cohort carries stray labels 1001 and 2032.
    """
    rng = np.random.default_rng(seed)
    cohorts = cohorts or {"OASIS-TRT-20": 3, "NKI-RS-22": 2, "NKI-TRT-20": 1, "MMRR-21": 2}
    mni = np.diag([1.0, 1.0, 1.0, 1.0])
    mni[:3, 3] = -(np.asarray(shape) - 1) / 2
    for cohort, n in cohorts.items():
        for i in range(1, n + 1):
            sid = f"{cohort}-{i}"
            d = root / f"{cohort}_volumes" / sid
            extra = {1001: 3, 2032: 2} if (stray and i == 1) else None
            no_lab = sid == missing_label
            nat = random_affine(rng, shape) if native_mixed else mni
            for suffix, aff in ((".MNI152", mni), ("", nat)):
                write_subject(
                    d / f"t1weighted_brain{suffix}.nii.gz", aff, shape,
                    None if no_lab else d / f"labels.DKT31.manual{suffix}.nii.gz",
                    extra_labels=extra, scale=100.0,
                )
                if not no_lab:
                    write_subject(d / f"_tmp{suffix}.nii.gz", aff, shape, d / f"labels.DKT31.manual+aseg{suffix}.nii.gz",
                                  extra_labels=extra, ids=(1002, 1003, 2002, 2003, 17))
                    (d / f"_tmp{suffix}.nii.gz").unlink()
            if sid == corrupt:
                corrupt_gz(d / "t1weighted_brain.MNI152.nii.gz")
    return root


def build_lumir(root: Path, n_train: int = 4, n_val: int = 3, shape=(12, 14, 10), with_validation: bool = True,
                labels: bool = False, landmarks: bool = False) -> Path:
    """Fake LUMIR folder: ``imagesTr`` (training), ``imagesVal`` (validation), the JSON, and
    optionally ``labelsVal`` / ``landmarksVal`` (label-volume landmarks) with the same names."""
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    aff[:3, 3] = -(np.asarray(shape) - 1) / 2
    train, val = [], []
    for i in range(n_train):
        name = f"imagesTr/LUMIRMRI_{i:04d}_0000.nii.gz"
        write_subject(root / name, aff, shape, scale=255.0, dtype=np.uint8)
        train.append({"image": f"./{name}"})
    names = []
    for i in range(n_val):
        name = f"LUMIRMRI_{3455 + i:04d}_0000.nii.gz"
        write_subject(root / "imagesVal" / name, aff, shape, (root / "labelsVal" / name) if labels else None,
                      scale=255.0, dtype=np.uint8)
        if landmarks:
            vol = np.zeros(shape, np.int16)
            inv = np.linalg.inv(aff)
            for k, p in enumerate(WORLD_POINTS, start=1):
                v = np.round(p @ inv[:3, :3].T + inv[:3, 3]).astype(int)
                vol[tuple(v)] = k
            (root / "landmarksVal").mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(vol, aff), str(root / "landmarksVal" / name))
        names.append(name)
    for i in range(n_val - 1):
        val.append({"fixed": f"./imagesVal/{names[i + 1]}", "moving": f"./imagesVal/{names[i]}"})
    data = {"name": "LUMIR", "training": train}
    if with_validation:
        data["validation"] = val
    (root / "LUMIR_dataset.json").write_text(json.dumps(data, indent=1))
    return root


def build_nifti_folder(root: Path, n: int = 3, shape=(14, 16, 12), seed: int = 0, labels: bool = True,
                       landmarks: bool = True, off_grid: str | None = None, pairs: list[tuple[str, str, str]] | None = None,
                       mixed: bool = True) -> Path:
    """Folder ``root`` of ``subj{i}.nii.gz`` (+ ``subj{i}_seg.nii.gz``, ``subj{i}_landmarks.csv``).

    Args:
        off_grid: subject id whose labels are written on another grid (other spacing and origin).
        pairs: rows ``(fixed, moving, split)`` for a ``pairs.csv``.
        mixed: random orientations/spacings per subject (else one shared 1 mm grid).
    """
    rng = np.random.default_rng(seed)
    base = np.eye(4)
    base[:3, 3] = -(np.asarray(shape) - 1) / 2
    for i in range(n):
        sid = f"subj{i}"
        aff = random_affine(rng, shape) if mixed else base
        seg_aff = seg_shape = None
        if sid == off_grid:
            seg_aff = aff.copy()
            seg_aff[:3, :3] = aff[:3, :3] @ np.diag([0.9, 1.1, 1.0])
            seg_aff[:3, 3] += np.array([0.7, -0.5, 0.3])
            seg_shape = tuple(int(v) + 2 for v in shape)
        write_subject(root / f"{sid}.nii.gz", aff, shape, (root / f"{sid}_seg.nii.gz") if labels else None,
                      seg_affine=seg_aff, seg_shape=seg_shape,
                      landmarks_path=(root / f"{sid}_landmarks.csv") if landmarks else None, scale=50.0)
    if pairs:
        with open(root / "pairs.csv", "w", newline="") as fh:
            wr = csv.writer(fh)
            wr.writerow(["fixed", "moving", "split"])
            wr.writerows(pairs)
    return root


def gz_is_valid(path: Path) -> bool:
    """True when the gzip stream decodes fully (helper for tests of corruption)."""
    try:
        with gzip.open(path) as fh:
            while fh.read(1 << 20):
                pass
        return True
    except (OSError, EOFError):
        return False
