"""The batch contract shared by every pairwise (3D/3D) datamodule and system.

A batch is a plain ``dict``. ``B`` is the batch size, ``S = (X, Y, Z)`` a spatial shape in
nibabel's array order, ``N`` the number of landmarks.

=====================  ==================  =========  ==================================================
key                    shape               dtype      meaning
=====================  ==================  =========  ==================================================
``"fixed"``            ``(B, 1, *S_f)``    float32    fixed image, intensities scaled to ``[0, 1]``
``"moving"``           ``(B, 1, *S_m)``    float32    moving image
``"fixed_seg"``        ``(B, 1, *S_f)``    int64      fixed label map (0 = background, any ids)
``"moving_seg"``       ``(B, 1, *S_m)``    int64      moving label map
``"fixed_affine"``     ``(B, 4, 4)``       float64    voxel→world (NIfTI, RAS, mm) of the fixed image
``"moving_affine"``    ``(B, 4, 4)``       float64    voxel→world of the moving image
``"fixed_landmarks"``  ``(B, N, 3)``       float32    voxel indices (array axis order) in the fixed image
``"moving_landmarks"`` ``(B, N, 3)``       float32    corresponding voxel indices in the moving image
``"case_id"``          ``list[str]``, B               ``"{fixed_id}_{moving_id}"``
``"fixed_id"``         ``list[str]``, B               subject id of the fixed image
``"moving_id"``        ``list[str]``, B               subject id of the moving image
=====================  ==================  =========  ==================================================

Rules checked by :func:`validate_batch`:

* images, affines and ids are required; the two segmentations are optional as a pair (a
  dataset without labels leaves both out), and so are the two landmark arrays;
* a segmentation has its image's shape; the fixed and moving images may have different
  spatial shapes (the built-in datasets always share one grid; most systems require it);
* landmark rows may be all-NaN (padding when samples of a batch have different ``N``);
  a row is either all finite or all NaN, and the fixed and moving arrays have the same NaN
  rows; ``N = 0`` is allowed;
* images and affines are finite, affines invertible with last row ``(0, 0, 0, 1)``;
* extra keys are allowed and left alone.

A *sample* (one item of a pair dataset) has the same keys without the batch axis: images
``(1, *S)``, affines ``(4, 4)``, landmarks ``(N, 3)``, ids ``str``. :func:`collate_pairs`
stacks samples into a batch, padding landmarks with NaN rows to the largest ``N``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import default_collate

__all__ = [
    "IMAGE_KEYS",
    "SEG_KEYS",
    "AFFINE_KEYS",
    "LANDMARK_KEYS",
    "ID_KEYS",
    "REQUIRED_KEYS",
    "collate_pairs",
    "validate_batch",
]

IMAGE_KEYS = ("fixed", "moving")
SEG_KEYS = ("fixed_seg", "moving_seg")
AFFINE_KEYS = ("fixed_affine", "moving_affine")
LANDMARK_KEYS = ("fixed_landmarks", "moving_landmarks")
ID_KEYS = ("case_id", "fixed_id", "moving_id")
REQUIRED_KEYS = IMAGE_KEYS + AFFINE_KEYS + ID_KEYS


def _as_tensor(key: str, value: Any, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(dtype)
    try:
        return torch.as_tensor(value, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"sample key {key!r}: cannot convert {type(value).__name__} to a tensor ({exc})") from exc


def _stack(tensors: list[torch.Tensor], copy: bool) -> torch.Tensor:
    """``torch.stack``; with ``copy=False`` a single tensor becomes a view with a new batch
    axis instead (no copy of a whole volume for the common batch size 1)."""
    if len(tensors) == 1 and not copy:
        return tensors[0].unsqueeze(0)
    return torch.stack(tensors)


def collate_pairs(samples: Sequence[Mapping[str, Any]], copy: bool = True) -> dict[str, Any]:
    """Stack pair samples into a batch following the contract (see the module docstring).

    Args:
        samples: non-empty list of sample dicts: images/segs ``(1, *S)``, affines ``(4, 4)``,
            landmarks ``(N_i, 3)``, ids ``str``. All samples carry the same keys.
        copy: ``False`` lets a batch of one sample share memory with the sample's tensors
            (a view, no copy) when they already have the batch dtype. Only for datasets
            that hand out fresh tensors on every ``__getitem__`` (the real-data modules):
            a system writing into its batch would otherwise change the dataset.

    Returns:
        The batch dict: images ``(B, 1, *S)`` float32, segs int64, affines ``(B, 4, 4)``
        float64, landmarks ``(B, max N_i, 3)`` float32 padded with NaN rows, ids ``list[str]``.
        Other keys go through :func:`torch.utils.data.default_collate`.
    """
    if len(samples) == 0:
        raise ValueError("collate_pairs: got an empty list of samples")
    keys = list(samples[0].keys())
    for i, s in enumerate(samples[1:], start=1):
        if set(s.keys()) != set(keys):
            raise ValueError(
                f"collate_pairs: sample {i} has keys {sorted(s.keys())}, sample 0 has {sorted(keys)}"
            )
    out: dict[str, Any] = {}
    for key in keys:
        values = [s[key] for s in samples]
        if key in IMAGE_KEYS:
            out[key] = _stack([_as_tensor(key, v, torch.float32) for v in values], copy)
        elif key in SEG_KEYS:
            out[key] = _stack([_as_tensor(key, v, torch.int64) for v in values], copy)
        elif key in AFFINE_KEYS:
            out[key] = _stack([_as_tensor(key, v, torch.float64) for v in values], copy)
        elif key in LANDMARK_KEYS:
            pts = [_as_tensor(key, v, torch.float32).reshape(-1, 3) for v in values]
            n = max(p.shape[0] for p in pts)
            batch = torch.full((len(pts), n, 3), math.nan, dtype=torch.float32)
            for i, p in enumerate(pts):
                batch[i, : p.shape[0]] = p
            out[key] = batch
        elif key in ID_KEYS:
            out[key] = [str(v) for v in values]
        else:
            out[key] = default_collate(values)
    return out


def _fail(key: str, problem: str) -> None:
    raise ValueError(f"batch key {key!r}: {problem}")


def _check_tensor(batch: Mapping[str, Any], key: str, dtype: torch.dtype, ndim: int | None = None) -> torch.Tensor:
    value = batch[key]
    if not isinstance(value, torch.Tensor):
        _fail(key, f"expected a torch.Tensor, got {type(value).__name__}")
    if value.dtype != dtype:
        _fail(key, f"expected dtype {dtype}, got {value.dtype}")
    if ndim is not None and value.dim() != ndim:
        _fail(key, f"expected {ndim} dimensions, got shape {tuple(value.shape)}")
    return value


def validate_batch(batch: Mapping[str, Any]) -> None:
    """Check a batch against the contract; raise ``ValueError`` naming the key and the problem.

    Args:
        batch: the batch dict (see the module docstring).

    Raises:
        ValueError: on a missing key, a wrong type, dtype or shape, inconsistent batch sizes,
            non-finite images or affines, or malformed landmark padding.
    """
    if not isinstance(batch, Mapping):
        raise ValueError(f"batch must be a dict, got {type(batch).__name__}")
    for key in REQUIRED_KEYS:
        if key not in batch:
            _fail(key, "missing (required keys: " + ", ".join(REQUIRED_KEYS) + ")")
    for pair in (SEG_KEYS, LANDMARK_KEYS):
        present = [k in batch for k in pair]
        if any(present) and not all(present):
            missing = pair[present.index(False)]
            _fail(missing, f"missing while {pair[present.index(True)]!r} is present (give both or neither)")

    b = None
    for key in IMAGE_KEYS:
        img = _check_tensor(batch, key, torch.float32, ndim=5)
        if img.shape[1] != 1:
            _fail(key, f"expected 1 channel, shape (B, 1, X, Y, Z); got {tuple(img.shape)}")
        if min(img.shape[2:]) < 1:
            _fail(key, f"empty spatial shape {tuple(img.shape)}")
        if b is None:
            b = img.shape[0]
        elif img.shape[0] != b:
            _fail(key, f"batch size {img.shape[0]} differs from 'fixed' ({b})")
        if not bool(torch.isfinite(img).all()):
            _fail(key, "contains NaN or Inf")
    assert b is not None
    if b < 1:
        _fail("fixed", "batch size is 0")

    if SEG_KEYS[0] in batch:
        for key, img_key in zip(SEG_KEYS, IMAGE_KEYS):
            seg = _check_tensor(batch, key, torch.int64, ndim=5)
            if seg.shape != batch[img_key].shape:
                _fail(key, f"shape {tuple(seg.shape)} differs from {img_key!r} {tuple(batch[img_key].shape)}")

    for key in AFFINE_KEYS:
        aff = _check_tensor(batch, key, torch.float64, ndim=3)
        if tuple(aff.shape) != (b, 4, 4):
            _fail(key, f"expected shape ({b}, 4, 4), got {tuple(aff.shape)}")
        if not bool(torch.isfinite(aff).all()):
            _fail(key, "contains NaN or Inf")
        bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
        if not bool(torch.allclose(aff[:, 3], bottom.expand(b, 4))):
            _fail(key, "last row must be (0, 0, 0, 1)")
        if bool((torch.linalg.det(aff[:, :3, :3]).abs() < 1e-12).any()):
            _fail(key, "linear part is singular")

    if LANDMARK_KEYS[0] in batch:
        pts = {}
        for key in LANDMARK_KEYS:
            lm = _check_tensor(batch, key, torch.float32, ndim=3)
            if lm.shape[0] != b or lm.shape[2] != 3:
                _fail(key, f"expected shape ({b}, N, 3), got {tuple(lm.shape)}")
            nan = torch.isnan(lm)
            if bool((nan.any(-1) != nan.all(-1)).any()):
                _fail(key, "a row mixes NaN and numbers (padding rows must be all NaN)")
            if bool(torch.isinf(lm).any()):
                _fail(key, "contains Inf")
            pts[key] = lm
        f, m = (pts[k] for k in LANDMARK_KEYS)
        if f.shape != m.shape:
            _fail("moving_landmarks", f"shape {tuple(m.shape)} differs from 'fixed_landmarks' {tuple(f.shape)}")
        if bool((torch.isnan(f).all(-1) != torch.isnan(m).all(-1)).any()):
            _fail("moving_landmarks", "NaN padding rows differ from those of 'fixed_landmarks'")

    for key in ID_KEYS:
        ids = batch[key]
        if not isinstance(ids, (list, tuple)) or not all(isinstance(s, str) for s in ids):
            _fail(key, f"expected a list of str, got {type(ids).__name__}")
        if len(ids) != b:
            _fail(key, f"has {len(ids)} entries for batch size {b}")
