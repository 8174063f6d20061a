"""Reading and writing volumes, label maps, displacement fields and landmarks.

Every reader checks its input where it enters and raises :class:`DataError`, whose message
names the file, says what is wrong and, where there is one, the fix.

Arrays keep nibabel's axis order (no transposes). Learn2Reg displacement files are
``[X, Y, Z, 3]`` float32 in voxels of the fixed grid (channel = array axis) with the
fixed image's affine; LUMIR-style ``[3, X, Y, Z]`` is read as well.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import shutil
import tempfile
import zlib
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import nibabel as nib
import numpy as np

__all__ = [
    "DataError",
    "Volume",
    "load_volume",
    "load_segmentation",
    "same_grid",
    "resample_labels_to",
    "read_displacement",
    "write_displacement",
    "read_landmarks_csv",
    "atomic_path",
    "atomic_write_text",
    "atomic_write_bytes",
    "atomic_write_json",
    "replace_folder",
    "set_default_mode",
    "plain",
    "orientation_codes",
    "closest_axes",
    "GRID_ATOL_MM",
    "LANDMARK_UNITS",
    "landmarks_to_voxels",
    "check_landmarks_on_grid",
    "load_landmarks",
    "read_displacement_grid",
    "field_sidecar_path",
    "grid_text",
]

#: Two affines describe the same grid when every entry agrees within this many mm.
GRID_ATOL_MM = 1e-3


class DataError(ValueError):
    """Bad input: the message names the file, the problem and, when known, the fix."""

    def __init__(self, path: str | os.PathLike | None, problem: str, fix: str | None = None) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        self.fix = fix
        msg = f"{self.path}: {problem}" if self.path else problem
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)


@dataclass
class Volume:
    """A volume on its grid.

    Attributes:
        data: ``(X, Y, Z)`` array in nibabel's axis order.
        affine: ``(4, 4)`` float64 voxel→world (RAS, mm).
        path: where it was read from (for messages).
    """

    data: np.ndarray
    affine: np.ndarray
    path: str = "<memory>"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def _check_exists(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise DataError(p, "file not found", "check the path")
    if p.is_dir():
        raise DataError(p, "is a folder, expected a NIfTI file")
    return p


def _read_nifti(p: Path) -> nib.Nifti1Image:
    try:
        img = nib.load(str(p))
    except Exception as exc:  # nibabel raises several types for corrupt / wrong files
        raise DataError(p, f"cannot be read as NIfTI ({type(exc).__name__}: {exc})") from exc
    return img


def _read_data(p: Path, img: Any) -> np.ndarray:
    """The voxel array; a file whose header reads but whose data does not (a truncated or
    corrupt ``.nii.gz`` fails only here) becomes a :class:`DataError` naming it."""
    try:
        return np.asanyarray(img.dataobj)
    except (EOFError, OSError, ValueError, zlib.error) as exc:
        raise DataError(p, f"cannot be read: its voxel data is truncated or corrupt ({type(exc).__name__}: {exc})",
                        "copy the file again from its source") from exc


def _check_numeric(p: Path, data: np.ndarray, what: str) -> None:
    """Refuse voxel types that are not one real number per voxel (RGB records, complex)."""
    if data.dtype.fields is not None or not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)
                                             or data.dtype == np.bool_):
        raise DataError(p, f"has voxel type {data.dtype}, expected one real number per voxel for {what}",
                        "convert it to a scalar (grey-level or label) volume")


def _check_affine(p: Path, affine: np.ndarray) -> None:
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(p, "has a singular or non-finite affine")


def load_volume(path: str | os.PathLike, dtype: Any = np.float32, ndim: int = 3) -> Volume:
    """Read an image volume and check it.

    Args:
        path: ``.nii`` / ``.nii.gz`` file.
        dtype: array dtype of the result.
        ndim: required number of spatial axes (a trailing singleton 4th axis is dropped).

    Raises:
        DataError: missing or unreadable file, wrong dimensionality, non-numeric voxels
            (RGB, complex), NaN/Inf, bad affine.
    """
    p = _check_exists(path)
    img = _read_nifti(p)
    data = _read_data(p, img)
    while data.ndim > ndim and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != ndim:
        raise DataError(p, f"has shape {data.shape}, expected a {ndim}D volume")
    _check_numeric(p, data, "an image")
    data = np.asarray(data, dtype=dtype)
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        n = int((~np.isfinite(data)).sum())
        raise DataError(p, f"contains {n} NaN/Inf values", "clean or mask the image before registration")
    affine = np.asarray(img.affine, dtype=np.float64)
    _check_affine(p, affine)
    return Volume(data, affine, str(p))


def same_grid(a: Volume, b: Volume, atol: float = GRID_ATOL_MM) -> bool:
    """True when both volumes have the same shape and affine (within ``atol`` mm)."""
    return a.shape == b.shape and np.allclose(a.affine, b.affine, atol=atol, rtol=0)


def _grid_text(v: Volume) -> str:
    sp = "×".join(f"{s:.4g}" for s in v.spacing)
    org = ", ".join(f"{o:.4g}" for o in v.affine[:3, 3])
    return f"shape {v.shape}, spacing {sp} mm, origin ({org}) mm"


def resample_labels_to(labels: Volume, reference: Volume) -> Volume:
    """Resample a label map onto ``reference``'s grid through the affines, nearest neighbour.

    For each reference voxel ``v``: ``world = A_ref v``, label voxel ``= A_lab⁻¹ world``;
    outside the label map is background 0.
    """
    from scipy.ndimage import map_coordinates

    m = np.linalg.inv(labels.affine) @ reference.affine
    grid = np.indices(reference.shape, dtype=np.float64).reshape(3, -1)
    coords = m[:3, :3] @ grid + m[:3, 3:4]
    out = map_coordinates(labels.data, coords, order=0, mode="constant", cval=0)
    return Volume(out.reshape(reference.shape).astype(labels.data.dtype), reference.affine.copy(), labels.path)


def load_segmentation(
    path: str | os.PathLike,
    reference: Volume | None = None,
    on_grid_mismatch: str = "error",
) -> Volume:
    """Read an integer label map and check it against the grid it must lie on.

    Args:
        path: NIfTI label map.
        reference: the volume (image) whose grid the labels must share; ``None`` skips the check.
        on_grid_mismatch: ``"error"`` refuses labels on another grid (shape or affine differ);
            ``"resample"`` resamples them through the affines (nearest neighbour) with a warning.
            Arrays on different grids are never paired voxel for voxel.

    Raises:
        DataError: unreadable file, non-numeric voxels, singular or non-finite affine,
            non-integer values, empty label map, grid mismatch.
    """
    p = _check_exists(path)
    img = _read_nifti(p)
    raw = _read_data(p, img)
    while raw.ndim > 3 and raw.shape[-1] == 1:
        raw = raw[..., 0]
    if raw.ndim != 3:
        raise DataError(p, f"has shape {raw.shape}, expected a 3D label map")
    _check_numeric(p, raw, "a label map")
    _check_affine(p, np.asarray(img.affine, dtype=np.float64))
    if np.issubdtype(raw.dtype, np.floating):
        if not np.isfinite(raw).all():
            raise DataError(p, "label map contains NaN/Inf")
        if not np.allclose(raw, np.round(raw), atol=1e-3):
            raise DataError(p, "label map has non-integer values", "is this an image rather than a segmentation?")
        raw = np.round(raw)
    seg = Volume(np.asarray(raw, dtype=np.int64), np.asarray(img.affine, dtype=np.float64), str(p))
    if not seg.data.any():
        raise DataError(p, "label map is empty (all background)")
    if reference is not None and not same_grid(seg, reference):
        detail = f"lies on another grid ({_grid_text(seg)}) than {reference.path} ({_grid_text(reference)})"
        if on_grid_mismatch == "error":
            raise DataError(
                p, detail, "resample it through the affines (nearest neighbour), e.g. `--resample-labels`, or supply labels on the image grid"
            )
        if on_grid_mismatch != "resample":
            raise ValueError(f"on_grid_mismatch must be 'error' or 'resample', got {on_grid_mismatch!r}")
        warnings.warn(f"{p}: {detail}; resampled through the affines (nearest neighbour)", stacklevel=2)
        seg = resample_labels_to(seg, reference)
    return seg


def read_displacement(path: str | os.PathLike, shape: Sequence[int] | None = None) -> np.ndarray:
    """Read a displacement field in Learn2Reg format.

    Accepts ``.nii.gz`` / ``.nii`` / ``.npz`` / ``.npy`` with array ``[X, Y, Z, 3]`` (Learn2Reg)
    or ``[3, X, Y, Z]`` (LUMIR); values in voxels of the fixed grid.

    Args:
        path: the field.
        shape: expected spatial shape (the fixed grid); resolves the layout and is checked.

    Returns:
        ``(3, X, Y, Z)`` float32 (our channel-first convention).
    """
    p = Path(path)
    if not p.exists():
        raise DataError(p, "displacement file not found", "check the path")
    name = p.name.lower()
    try:
        if name.endswith(".npz"):
            with np.load(p) as z:
                keys = list(z.keys())
                if not keys:
                    raise DataError(p, "npz file holds no array")
                arr = z["disp"] if "disp" in keys else z[keys[0]]
        elif name.endswith(".npy"):
            arr = np.load(p)
        elif name.endswith(".nii") or name.endswith(".nii.gz"):
            arr = np.asanyarray(nib.load(str(p)).dataobj)
        else:
            raise DataError(p, "unknown displacement format", "use .nii.gz, .npz or .npy")
    except DataError:
        raise
    except Exception as exc:
        raise DataError(p, f"cannot be read ({type(exc).__name__}: {exc})") from exc
    arr = np.asarray(arr, dtype=np.float32)
    # NIfTI vector fields are sometimes stored as [X, Y, Z, 1, 3].
    if arr.ndim == 5 and arr.shape[3] == 1:
        arr = arr[:, :, :, 0, :]
    if arr.ndim != 4 or (arr.shape[-1] != 3 and arr.shape[0] != 3):
        raise DataError(p, f"displacement has shape {arr.shape}, expected [X, Y, Z, 3] or [3, X, Y, Z]")
    last = arr.shape[-1] == 3 and (shape is None or tuple(arr.shape[:3]) == tuple(shape))
    first = arr.shape[0] == 3 and (shape is None or tuple(arr.shape[1:]) == tuple(shape))
    if last:
        arr = np.moveaxis(arr, -1, 0)
    elif not first:
        got = arr.shape[:3] if arr.shape[-1] == 3 else arr.shape[1:]
        raise DataError(p, f"displacement grid {tuple(got)} does not match the fixed grid {tuple(shape)}")
    if not np.isfinite(arr).all():
        raise DataError(p, f"displacement contains {int((~np.isfinite(arr)).sum())} NaN/Inf values")
    return np.ascontiguousarray(arr)


def write_displacement(path: str | os.PathLike, disp: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Write ``(3, X, Y, Z)`` voxel displacement as a Learn2Reg file ``[X, Y, Z, 3]`` float32.

    ``.nii.gz`` gets the fixed image's ``affine`` (identity if None); ``.npz`` stores key ``disp``.
    The write is atomic (temporary file, then rename).
    """
    p = Path(path)
    arr = np.asarray(disp, dtype=np.float32)
    if arr.ndim != 4 or arr.shape[0] != 3:
        raise ValueError(f"expected a (3, X, Y, Z) displacement, got {arr.shape}")
    out = np.ascontiguousarray(np.moveaxis(arr, 0, -1))
    p.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".npz" if p.name.endswith(".npz") else ".nii.gz"
    with atomic_path(p, suffix=suffix) as tmp:
        if suffix == ".npz":
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, disp=out)
        else:
            nib.save(nib.Nifti1Image(out, np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)), str(tmp))
    return p


@contextmanager
def open_text_table(path: Path) -> Iterator[Iterator[str]]:
    """The lines of a user's CSV, read as UTF-8 with or without a byte-order mark; a file
    that is not UTF-8 text (a binary file, another encoding) is a :class:`DataError`
    naming it rather than a ``UnicodeDecodeError`` traceback."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        def lines() -> Iterator[str]:
            try:
                yield from fh
            except UnicodeDecodeError as exc:
                raise DataError(path, f"is not UTF-8 text (byte {exc.start}: {exc.reason})",
                                "save it as a UTF-8 CSV") from None
        yield lines()


def read_landmarks_csv(path: str | os.PathLike, ndim: int = 3) -> np.ndarray:
    """Read landmarks: one point per row, ``x,y,z`` voxel indices of their own image.

    A header row is skipped when it is not numeric. Read as UTF-8 with an optional byte-order
    mark (spreadsheets write one; read as text it would make the first point look like a
    header and drop it). Returns ``(N, ndim)`` float64.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(p, "landmark file not found", "check the path")
    rows: list[list[float]] = []
    with open_text_table(p) as table:
        for i, row in enumerate(csv.reader(table)):
            row = [c.strip() for c in row if c.strip() != ""]
            if not row:
                continue
            try:
                vals = [float(c) for c in row]
            except ValueError:
                if i == 0:
                    continue  # header
                raise DataError(p, f"row {i + 1} is not numeric: {row}") from None
            if len(vals) != ndim:
                raise DataError(p, f"row {i + 1} has {len(vals)} values, expected {ndim} (x,y,z voxel indices)")
            rows.append(vals)
    if not rows:
        raise DataError(p, "holds no landmarks")
    pts = np.asarray(rows, dtype=np.float64)
    if not np.isfinite(pts).all():
        raise DataError(p, "landmarks contain NaN/Inf")
    return pts


def set_default_mode(path: str | os.PathLike, folder: bool = False) -> None:
    """Give a temporary file (``folder``: folder) the mode a plain ``open()`` (``mkdir()``) would,
    0666 (0777) minus the umask: ``mkstemp``/``mkdtemp`` make 0600/0700, which would leave
    results and shared caches unreadable to a lab's group."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if folder else 0o666) & ~mask)


# ----------------------------------------------------------------------------- atomic writes
@contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = "", prefix: str = ".tmp_", folder: bool = False,
                exist_ok: bool = False) -> Iterator[Path]:
    """The suite's one atomic write: a temporary file (``folder``: folder) beside ``path`` to
    write into; when the block ends without an error it gets the default mode
    (:func:`set_default_mode`) and is renamed onto ``path`` in one step, so a reader sees the
    old state or the whole new one, never half of it. On an error it is removed.

    Args:
        suffix, prefix: of the temporary name (a writer that picks the format by the
            extension, e.g. ``nib.save``, needs ``suffix``).
        exist_ok: a rename that fails because ``path`` exists by then (a concurrent identical
            write won the race, e.g. a cache entry) is not an error.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        tmp = Path(tempfile.mkdtemp(dir=p.parent, prefix=prefix, suffix=suffix))
    else:
        fd, name = tempfile.mkstemp(dir=p.parent, prefix=prefix, suffix=suffix)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        set_default_mode(tmp, folder=folder)
        try:
            os.replace(tmp, p)
        except OSError:
            if not (exist_ok and p.exists()):
                raise
    finally:
        if folder:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = False) -> Path:
    """Write bytes to ``path`` atomically (:func:`atomic_path`); ``fsync`` before the rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, newline: str | None = None) -> Path:
    """Write text to ``path`` atomically: a temporary file in the same folder, fsync, rename."""
    with atomic_path(path) as tmp, open(tmp, "w", newline=newline) as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """JSON (indent 2, NaN written as null) written atomically."""
    return atomic_write_text(path, json.dumps(plain(obj, finite=True), indent=2, sort_keys=False) + "\n")


def replace_folder(new: str | os.PathLike, final: str | os.PathLike, backup: str | os.PathLike) -> None:
    """Put folder ``new`` at ``final``; the folder there moves to ``backup`` first (two renames,
    each atomic; the caller removes ``backup``)."""
    os.replace(final, backup)
    os.replace(new, final)


def plain(obj: Any, finite: bool = False) -> Any:
    """A JSON/YAML-ready copy: the suite's one sanitiser.

    Mapping keys become ``str``, tuples lists, NumPy/torch scalars Python numbers, arrays
    (nested) lists; with ``finite``, a NaN/Inf float becomes ``None`` (JSON ``null``), else it
    is kept (``json.dumps`` writes ``NaN``).
    """
    if isinstance(obj, dict):
        return {str(k): plain(v, finite) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v, finite) for v in obj]
    if isinstance(obj, np.ndarray) and obj.ndim > 0:
        return plain(obj.tolist(), finite)
    if not isinstance(obj, (str, bytes)) and callable(getattr(obj, "item", None)):
        try:
            obj = obj.item()
        except (ValueError, RuntimeError):  # a tensor of more than one element
            return plain(obj.tolist(), finite)
    if finite and isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ----------------------------------------------------------------------------- landmark units
#: How a landmark CSV's rows are read: voxel indices of their own image, or world mm (RAS).
LANDMARK_UNITS = ("voxel", "mm")


def landmarks_to_voxels(points: np.ndarray, affine: np.ndarray, units: str, path: str | os.PathLike | None = None) -> np.ndarray:
    """Landmarks ``(N, 3)`` in ``units`` → voxel indices ``(N, 3)`` float64 of the image with ``affine``.

    ``"voxel"`` rows are returned as they are; ``"mm"`` rows are world (RAS, mm) points taken
    through the inverse affine.
    """
    if units not in LANDMARK_UNITS:
        raise DataError(path, f"landmark_units {units!r} is not one of {', '.join(LANDMARK_UNITS)}")
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if units == "voxel":
        return pts
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    return pts @ inv[:3, :3].T + inv[:3, 3]


def check_landmarks_on_grid(voxels: np.ndarray, shape: Sequence[int], path: str | os.PathLike | None,
                            units: str = "voxel", image: str | os.PathLike | None = None) -> None:
    """The one rule every entry point (``evaluate``, ``data check``, the data modules, ``run``)
    applies to landmarks: each point, as voxel indices of its image, lies inside that image's
    grid, ``-0.5 <= p_d <= N_d - 0.5`` on every axis.

    A CSV of world-mm coordinates read as voxel indices (or the reverse) almost always breaks
    it, so the message says which units were assumed and how to declare the other.

    Args:
        voxels: ``(N, 3)`` voxel indices (after any mm → voxel conversion).
        shape: the image's spatial shape.
        path: the landmark file (named in the message).
        units: the units the file was read in (``"voxel"`` or ``"mm"``).
        image: the image whose grid is meant (named in the message), when known.

    Raises:
        DataError: one line naming the file, the first offending row and the fix.
    """
    v = np.asarray(voxels, dtype=np.float64).reshape(-1, 3)
    hi = np.asarray(shape, dtype=np.float64)[:3] - 0.5
    bad = np.flatnonzero(((v < -0.5) | (v > hi)).any(axis=1) | ~np.isfinite(v).all(axis=1))
    if bad.size == 0:
        return
    other = "mm" if units == "voxel" else "voxel"
    read_as = "voxel indices" if units == "voxel" else "world mm (RAS)"
    row = bad[0]
    where = f" of {image}" if image is not None else ""
    pt = ", ".join(f"{c:.4g}" for c in v[row])
    raise DataError(
        path,
        f"{bad.size} of {len(v)} landmarks fall outside the voxel grid {tuple(int(n) for n in shape[:3])}{where} "
        f"when read as {read_as} (landmark_units: {units}); first: row {row + 1} -> voxel ({pt})",
        f"if the file holds {'world mm' if other == 'mm' else 'voxel indices'}, declare landmark_units: {other} "
        f"in the data module or pass --landmark-units {other} to evaluate",
    )


def load_landmarks(path: str | os.PathLike, affine: np.ndarray, shape: Sequence[int], units: str = "voxel",
                   image: str | os.PathLike | None = None) -> np.ndarray:
    """Read a landmark CSV (see :func:`read_landmarks_csv`) in ``units``, convert it to voxel
    indices of the image (``affine``, ``shape``) and check it with :func:`check_landmarks_on_grid`.

    Returns:
        ``(N, 3)`` float64 voxel indices.
    """
    pts = landmarks_to_voxels(read_landmarks_csv(path), affine, units, path)
    check_landmarks_on_grid(pts, shape, path, units, image)
    return pts


# ----------------------------------------------------------------------------- field grids
def read_displacement_grid(path: str | os.PathLike) -> tuple[np.ndarray | None, tuple[int, int, int] | None]:
    """The grid a displacement file says it lies on: ``(affine (4, 4) float64, spatial shape)``.

    NIfTI fields carry it in their header (``[X, Y, Z, 3]``: the first three axes; a LUMIR-style
    ``[3, X, Y, Z]`` NIfTI: the last three). ``.npz`` files carry it when they hold an
    ``affine`` array. Otherwise ``(None, None)``: the grid is unknown (see
    :func:`field_sidecar_path` for the run's JSON record).
    """
    p = Path(path)
    if not p.exists():
        raise DataError(p, "displacement file not found", "check the path")
    name = p.name.lower()
    try:
        if name.endswith(".nii") or name.endswith(".nii.gz"):
            img = nib.load(str(p))
            shp = tuple(int(n) for n in img.shape)
            if len(shp) == 5 and shp[3] == 1:
                shp = shp[:3] + shp[4:]
            spatial = shp[:3] if shp[-1] == 3 else shp[1:4]
            return np.asarray(img.affine, dtype=np.float64), tuple(spatial)  # type: ignore[return-value]
        if name.endswith(".npz"):
            with np.load(p) as z:
                if "affine" in z.files:
                    arr = z["disp"] if "disp" in z.files else None
                    spatial = None if arr is None else (tuple(arr.shape[:3]) if arr.shape[-1] == 3 else tuple(arr.shape[1:]))
                    return np.asarray(z["affine"], dtype=np.float64), spatial
    except Exception as exc:
        raise DataError(p, f"cannot be read ({type(exc).__name__}: {exc})") from exc
    return None, None


def field_sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON record written beside an exported field: ``disp_a_b.nii.gz`` → ``disp_a_b.json``."""
    p = Path(path)
    n = p.name
    for ext in (".nii.gz", ".nii", ".npz", ".npy"):
        if n.lower().endswith(ext):
            n = n[: -len(ext)]
            break
    return p.with_name(n + ".json")


def grid_text(affine: np.ndarray, shape: Sequence[int]) -> str:
    """Short description of a grid for messages: shape, spacing, orientation codes, origin."""
    a = np.asarray(affine, dtype=np.float64)
    sp = "×".join(f"{s:.4g}" for s in np.linalg.norm(a[:3, :3], axis=0))
    org = ", ".join(f"{o:.4g}" for o in a[:3, 3])
    codes = orientation_codes(a)
    return f"shape {tuple(int(n) for n in shape)}, spacing {sp} mm, {codes}, origin ({org}) mm"


# ----------------------------------------------------------------------------- orientation
def orientation_codes(affine: np.ndarray) -> str:
    """Axis codes of the closest orthogonal orientation, e.g. ``"RAS"`` or ``"LPI"``.

    Letter ``d`` is the world direction array axis ``d`` points to (R/L, A/P, S/I). The suite's
    one orientation rule (:func:`closest_axes`): the reorientation to RAS in preprocessing, the
    data check and the grid descriptions in messages all use it, so they agree on oblique scans.
    """
    perm, signs = closest_axes(affine)
    pos, neg = "RAS", "LPI"
    return "".join(pos[w] if s > 0 else neg[w] for w, s in zip(perm, signs))


def closest_axes(affine: np.ndarray) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """World axis (0 R, 1 A, 2 S) and sign of every array axis: the assignment (a permutation)
    that maximises the summed |cosine| between array axes and world axes."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(a, axis=0)
    if np.any(norms < 1e-12):
        raise ValueError("affine has a zero-length axis")
    r = a / norms
    best = max(itertools.permutations(range(3)), key=lambda p: sum(abs(r[p[j], j]) for j in range(3)))
    signs = tuple(1 if r[best[j], j] >= 0 else -1 for j in range(3))
    return tuple(best), signs  # type: ignore[return-value]
