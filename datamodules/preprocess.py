"""Preprocessing shared by the real-data modules: intensities, orientation, spacing, shape.

Every spatial step is a map between voxel grids, recorded as a ``(4, 4)`` homogeneous
matrix ``M`` taking **output voxel indices to input voxel indices**. The output affine is
then ``A_out = A_in @ M`` (so every voxel keeps its world position), the image is resampled
as ``out(i) = in(M i)`` (linear for images, nearest for labels), and landmarks given as
input voxel indices ``p`` move to ``M⁻¹ p``. The steps compose: the whole pipeline's map is
the product of the steps' maps, returned as :attr:`Preprocessed.voxel_map`.

Pipeline (:func:`preprocess_subject`), in this order:

1. **intensity normalisation** of the image (:func:`normalize_intensity`): ``"minmax"`` to
   ``[0, 1]``, ``"percentile"`` (clip to the ``percentiles`` then scale to ``[0, 1]``),
   ``"range"`` (a fixed ``intensity_range``, e.g. LUMIR's ``(0, 255)``, scaled to ``[0, 1]``
   and clipped), or ``"none"``. Done first, on the original voxels, so padding added later
   is 0 = the minimum;
2. **reorientation to canonical RAS** (:func:`reorient_to_ras`): axis permutation and flips
   read from the affine, no interpolation; array axis ``d`` then points along world axis ``d``
   (R, A, S). Obliquity is kept in the affine;
3. **resampling to a target spacing** (:func:`resample_to_spacing`): voxel 0 keeps its world
   position, the axes keep their directions, ``n_out = round(n_in · s_in / s_out)``; images
   trilinear, labels nearest, edges replicated;
4. **crop / pad** to a shape (:func:`crop_or_pad`, centred) and/or to a multiple of ``k``
   (:func:`pad_to_multiple`, centred padding), filled with 0.

Landmark arrays are ``(N, 3)`` voxel indices in array axis order.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import scipy.ndimage as ndi

from benchmark.core.io import DataError, closest_axes

__all__ = [
    "PreprocessConfig",
    "Preprocessed",
    "normalize_intensity",
    "reorient_to_ras",
    "resample_to_spacing",
    "crop_or_pad",
    "pad_to_multiple",
    "map_points",
    "preprocess_subject",
    "NORMALIZE_MODES",
]

NORMALIZE_MODES = ("minmax", "percentile", "range", "none")


def _tuple3(value: Any, name: str, cast: type) -> tuple | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        value = [value] * 3
    vals = tuple(cast(v) for v in value)
    if len(vals) != 3:
        raise ValueError(f"{name} must be one number or three, got {value!r}")
    return vals


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing settings (also part of the cache key).

    Attributes:
        normalize: one of :data:`NORMALIZE_MODES`.
        percentiles: ``(low, high)`` in percent for ``"percentile"``.
        intensity_range: ``(low, high)`` input intensities mapped to ``[0, 1]`` for ``"range"``.
        canonical: reorient to RAS through the affine.
        spacing: target voxel size in mm (one or three numbers), ``None`` keeps the spacing.
        shape: target array shape (centred crop / pad), ``None`` keeps it.
        multiple_of: pad (centred) every axis up to a multiple of this, ``None`` for no padding.
    """

    normalize: str = "minmax"
    percentiles: tuple[float, float] = (0.5, 99.5)
    intensity_range: tuple[float, float] | None = None
    canonical: bool = True
    spacing: tuple[float, float, float] | None = None
    shape: tuple[int, int, int] | None = None
    multiple_of: int | None = None

    def __post_init__(self) -> None:
        if self.normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {self.normalize!r}")
        object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")
        if self.normalize == "range":
            if self.intensity_range is None or len(self.intensity_range) != 2:
                raise ValueError("normalize='range' needs intensity_range=(low, high)")
        if self.intensity_range is not None:
            r = tuple(float(v) for v in self.intensity_range)
            if not r[1] > r[0]:
                raise ValueError(f"intensity_range must be (low, high) with high > low, got {self.intensity_range}")
            object.__setattr__(self, "intensity_range", r)
        sp = _tuple3(self.spacing, "spacing", float)
        if sp is not None and min(sp) <= 0:
            raise ValueError(f"spacing must be positive, got {sp}")
        object.__setattr__(self, "spacing", sp)
        shp = _tuple3(self.shape, "shape", int)
        if shp is not None and min(shp) < 1:
            raise ValueError(f"shape must be positive, got {shp}")
        object.__setattr__(self, "shape", shp)
        if self.multiple_of is not None:
            k = int(self.multiple_of)
            if k < 1:
                raise ValueError(f"multiple_of must be >= 1, got {self.multiple_of}")
            object.__setattr__(self, "multiple_of", k)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-able) of the settings."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


@dataclass
class Preprocessed:
    """Output of :func:`preprocess_subject`.

    Attributes:
        image: ``(X, Y, Z)`` float32.
        affine: ``(4, 4)`` float64 voxel→world of the output grid.
        seg: ``(X, Y, Z)`` integer labels on the output grid, or ``None``.
        landmarks: ``(N, 3)`` float64 output voxel indices, or ``None``.
        voxel_map: ``(4, 4)`` output voxel → input voxel.
    """

    image: np.ndarray
    affine: np.ndarray
    seg: np.ndarray | None = None
    landmarks: np.ndarray | None = None
    voxel_map: np.ndarray = field(default_factory=lambda: np.eye(4))


# ----------------------------------------------------------------------------- intensities
def normalize_intensity(
    image: np.ndarray,
    mode: str = "minmax",
    percentiles: Sequence[float] = (0.5, 99.5),
    intensity_range: Sequence[float] | None = None,
    path: str | None = None,
) -> np.ndarray:
    """Scale intensities to ``[0, 1]`` (float32).

    Args:
        image: any-shape array.
        mode: ``"minmax"``, ``"percentile"``, ``"range"`` or ``"none"``.
        percentiles: ``(low, high)`` percent for ``"percentile"`` (values outside are clipped).
        intensity_range: ``(low, high)`` for ``"range"`` (values outside are clipped).
        path: file name for error messages.

    Raises:
        DataError: a constant image under ``"minmax"`` / ``"percentile"``.
    """
    x = np.asarray(image, dtype=np.float32)
    if mode == "none":
        return x
    if mode == "range":
        if intensity_range is None:
            raise ValueError("mode 'range' needs intensity_range")
        lo, hi = (float(v) for v in intensity_range)
    elif mode == "minmax":
        lo, hi = float(x.min()), float(x.max())
    elif mode == "percentile":
        lo, hi = (float(v) for v in np.percentile(x, list(percentiles)))
    else:
        raise ValueError(f"unknown normalisation {mode!r}; use one of {NORMALIZE_MODES}")
    if not hi > lo:
        raise DataError(path, f"image intensities are constant ({lo:g}) under {mode!r} normalisation", "is the file empty?")
    out = (x - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    if mode in ("percentile", "range"):
        np.clip(out, 0.0, 1.0, out=out)
    return out


# ----------------------------------------------------------------------------- orientation
def _reorient_map(affine: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, list[int], list[int]]:
    """Voxel map (output → input) of the RAS reorientation, the transpose order and flipped output axes."""
    perm, signs = closest_axes(affine)
    m = np.zeros((4, 4))
    m[3, 3] = 1.0
    order = [0, 0, 0]
    flips = []
    for j in range(3):  # input axis j becomes output axis perm[j]
        i = perm[j]
        order[i] = j
        if signs[j] > 0:
            m[j, i] = 1.0
        else:
            m[j, i] = -1.0
            m[j, 3] = shape[j] - 1
            flips.append(i)
    return m, order, flips


def reorient_to_ras(
    data: np.ndarray, affine: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Permute and flip array axes so that array axis ``d`` points along +world axis ``d``.

    Args:
        data: ``(X, Y, Z)`` array (any dtype).
        affine: ``(4, 4)`` voxel→world.

    Returns:
        ``(data_ras, affine_ras, voxel_map)``; ``voxel_map`` takes output voxel indices to
        input voxel indices; ``affine_ras = affine @ voxel_map``. ``data_ras`` is a view when
        nothing moves, else a contiguous copy.
    """
    m, order, flips = _reorient_map(affine, data.shape)
    if np.allclose(m, np.eye(4)):
        return data, np.asarray(affine, dtype=np.float64), m
    out = np.transpose(data, order)
    if flips:
        sl = tuple(slice(None, None, -1) if i in flips else slice(None) for i in range(3))
        out = out[sl]
    return np.ascontiguousarray(out), np.asarray(affine, dtype=np.float64) @ m, m


# ----------------------------------------------------------------------------- spacing
def resample_to_spacing(
    data: np.ndarray,
    affine: np.ndarray,
    spacing: Sequence[float],
    order: int,
    rtol: float = 1e-4,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resample to voxel size ``spacing`` (mm), keeping voxel 0's world position and the axis directions.

    Args:
        data: ``(X, Y, Z)``.
        affine: ``(4, 4)`` voxel→world.
        spacing: target voxel size per array axis, mm.
        order: 1 (trilinear, images) or 0 (nearest, labels; dtype kept).
        rtol: axes whose spacing already matches within this relative tolerance are untouched.

    Returns:
        ``(data_out, affine_out, voxel_map)``, ``voxel_map = diag(s_out / s_in, 1)``.
    """
    aff = np.asarray(affine, dtype=np.float64)
    s_in = np.linalg.norm(aff[:3, :3], axis=0)
    s_out = np.asarray(spacing, dtype=np.float64)
    if np.allclose(s_in, s_out, rtol=rtol, atol=0):
        return data, aff, np.eye(4)
    zoom = s_out / s_in
    shape_out = tuple(max(1, int(round(n * si / so))) for n, si, so in zip(data.shape, s_in, s_out))
    m = np.diag([*zoom, 1.0])
    src = data if order == 0 else np.asarray(data, dtype=np.float32)
    with warnings.catch_warnings():
        # A 1-D matrix is scipy's fast diagonal path; it warns that its meaning changed in 0.18.
        warnings.simplefilter("ignore", UserWarning)
        out = ndi.affine_transform(src, zoom, output_shape=shape_out, order=order, mode="nearest", prefilter=False)
    return out, aff @ m, m


# ----------------------------------------------------------------------------- shape
def crop_or_pad(
    data: np.ndarray, affine: np.ndarray, shape: Sequence[int], fill: float = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centred crop and/or zero pad to ``shape``; ``out[i] = in[i + o]`` with ``o = (n_in - n_out) // 2``.

    Returns:
        ``(data_out, affine_out, voxel_map)`` with ``voxel_map`` the translation by ``o``.
    """
    shape = tuple(int(s) for s in shape)
    aff = np.asarray(affine, dtype=np.float64)
    if tuple(data.shape) == shape:
        return data, aff, np.eye(4)
    off = [(n_in - n_out) // 2 for n_in, n_out in zip(data.shape, shape)]
    out = np.full(shape, fill, dtype=data.dtype)
    src, dst = [], []
    for o, n_in, n_out in zip(off, data.shape, shape):
        lo, hi = max(0, -o), min(n_out, n_in - o)  # output indices whose input index lies inside
        if hi <= lo:
            src.append(slice(0, 0))
            dst.append(slice(0, 0))
        else:
            dst.append(slice(lo, hi))
            src.append(slice(lo + o, hi + o))
    out[tuple(dst)] = data[tuple(src)]
    m = np.eye(4)
    m[:3, 3] = off
    return out, aff @ m, m


def pad_to_multiple(data: np.ndarray, affine: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centred zero padding of every axis up to the next multiple of ``k`` (see :func:`crop_or_pad`)."""
    target = [int(math.ceil(n / k) * k) for n in data.shape]
    return crop_or_pad(data, affine, target)


def map_points(points: np.ndarray, voxel_map: np.ndarray) -> np.ndarray:
    """Input voxel indices ``(N, 3)`` → output voxel indices: ``voxel_map⁻¹ p``."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    inv = np.linalg.inv(voxel_map)
    return p @ inv[:3, :3].T + inv[:3, 3]


# ----------------------------------------------------------------------------- pipeline
def preprocess_subject(
    image: np.ndarray,
    affine: np.ndarray,
    config: PreprocessConfig,
    seg: np.ndarray | None = None,
    landmarks: np.ndarray | None = None,
    path: str | None = None,
) -> Preprocessed:
    """Run the pipeline on one subject (image, optional labels on the image's grid, optional landmarks).

    Args:
        image: ``(X, Y, Z)`` intensities.
        affine: ``(4, 4)`` voxel→world of the image (and of ``seg``).
        config: the settings.
        seg: ``(X, Y, Z)`` integer labels on the image's grid, or ``None``.
        landmarks: ``(N, 3)`` voxel indices of the image, or ``None``.
        path: image file name for error messages.

    Returns:
        :class:`Preprocessed` (image float32, labels in their dtype, landmarks in output voxels).
    """
    if seg is not None and tuple(seg.shape) != tuple(image.shape):
        raise DataError(path, f"labels of shape {tuple(seg.shape)} do not match the image's {tuple(image.shape)}")
    img = normalize_intensity(image, config.normalize, config.percentiles, config.intensity_range, path)
    aff = np.asarray(affine, dtype=np.float64)
    total = np.eye(4)
    lab = seg
    if config.canonical:
        img, aff_new, m = reorient_to_ras(img, aff)
        if lab is not None:
            lab, _, _ = reorient_to_ras(lab, aff)
        aff, total = aff_new, total @ m
    if config.spacing is not None:
        img2, aff_new, m = resample_to_spacing(img, aff, config.spacing, order=1)
        if lab is not None:
            lab, _, _ = resample_to_spacing(lab, aff, config.spacing, order=0)
        img, aff, total = img2, aff_new, total @ m
    if config.shape is not None:
        img2, aff_new, m = crop_or_pad(img, aff, config.shape)
        if lab is not None:
            lab, _, _ = crop_or_pad(lab, aff, config.shape)
        img, aff, total = img2, aff_new, total @ m
    if config.multiple_of is not None:
        img2, aff_new, m = pad_to_multiple(img, aff, config.multiple_of)
        if lab is not None:
            lab, _, _ = pad_to_multiple(lab, aff, config.multiple_of)
        img, aff, total = img2, aff_new, total @ m
    pts = None if landmarks is None else map_points(landmarks, total)
    return Preprocessed(
        image=np.ascontiguousarray(img, dtype=np.float32),
        affine=aff,
        seg=None if lab is None else np.ascontiguousarray(lab),
        landmarks=pts,
        voxel_map=total,
    )
