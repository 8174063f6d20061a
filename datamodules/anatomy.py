"""Real anatomy for the built-in brain data: the MNI ICBM152 2009a template shipped in ``nilearn``.

The ``nilearn`` wheel carries three volumes of the symmetric ICBM152 2009a non-linear
template (1 mm, 197×233×189, RAS, skull-stripped): the T1-weighted average and the grey- and
white-matter probability maps (``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``).
They are read from the installed package; nothing is downloaded. Only the file locations are
taken from ``nilearn`` (its spec), not its code, so importing this module is cheap.

Label map (derived here, at 1 mm, before any resampling)
    ``brain`` = T1 > 0 (the template is skull-stripped). Tissue per voxel = argmax of
    (CSF, GM, WM) with CSF = ``1 − GM − WM`` (clipped). World coordinates (mm, MNI) split
    the hemispheres at ``x = 0`` (RAS: ``x ≥ 0`` is the subject's right; the midline plane of
    the 1 mm template, one voxel thick, goes right, so the 1 mm right labels are slightly larger;
    no centre of the 4 or 5 mm grids lies on it) and mark three
    regions by simple geometric rules; ``depth`` is the distance (mm) to the outside of
    the brain mask:

    ====  ==================  ==========================================================
    id    name                rule
    ====  ==================  ==========================================================
    1     cortex_left         GM, ``x < 0``, not deep GM, not posterior fossa
    2     cortex_right        GM, ``x ≥ 0``, idem
    3     white_matter_left   WM, ``x < 0``, not posterior fossa
    4     white_matter_right  WM, ``x ≥ 0``, idem
    5     deep_gm_left        GM with depth > 18 mm inside the central box
                              ``|x| < 30, −35 < y < 25, −15 < z < 20`` (thalamus, basal ganglia)
    6     deep_gm_right       idem, ``x ≥ 0``
    7     ventricle_left      CSF with depth > 12 mm inside ``|x| < 30, −45 < y < 30, −5 < z < 35``
    8     ventricle_right     idem, ``x ≥ 0``
    9     csf_external        every other CSF voxel of the brain mask (sulci, cisterns)
    10    posterior_fossa     brain voxels with ``z < −20`` and ``y < −35`` (cerebellum), or
                              ``|x| < 12, −45 < y < −12, z < −12`` (brainstem); any tissue
    ====  ==================  ==========================================================

    The box rules are approximate anatomy (the posterior-fossa box cuts the inferior
    occipito-temporal cortex in places); they are fixed, so every subject carries the same
    structures and Dice over them is a consistent measure of alignment.

Resampling to a spacing ``s`` (mm, isotropic)
    Output grid: the world bounding box of the brain mask plus one voxel of margin, its
    shape rounded up to a multiple of 8 (U-Nets with three poolings), centred on the box,
    diagonal RAS affine. The T1 is Gaussian-prefiltered (σ = 0.4·s mm when s > 1) and
    sampled trilinearly, scaled to [0, 1]; labels by the argmax of prefiltered one-hot
    maps (a soft majority vote, so thin structures are kept where they dominate). Results
    are cached per spacing in the process.

Licence of the anatomy: the ICBM152 2009 templates are © 1993–2009 Louis Collins, McConnell
Brain Imaging Centre, Montreal Neurological Institute, McGill University; permission to use,
copy, modify and distribute them for any purpose without fee is granted provided the
copyright notice appears in all copies (a permissive, attribution-only licence). ``nilearn``
itself is BSD-3-Clause.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["MNI_LABELS", "MNITemplate", "mni_template", "mni_template_files", "TemplateError"]

#: Output label ids and names of the derived label map (0 = background).
MNI_LABELS: dict[int, str] = {
    1: "cortex_left",
    2: "cortex_right",
    3: "white_matter_left",
    4: "white_matter_right",
    5: "deep_gm_left",
    6: "deep_gm_right",
    7: "ventricle_left",
    8: "ventricle_right",
    9: "csf_external",
    10: "posterior_fossa",
}

_FILE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


class TemplateError(RuntimeError):
    """The MNI template could not be found or read; the message names the file."""


def mni_template_files() -> dict[str, Path]:
    """Paths of the T1, GM and WM volumes inside the installed ``nilearn`` package.

    Raises:
        TemplateError: ``nilearn`` is not installed (naming the package to install).
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise TemplateError(
            "the built-in anatomy needs the MNI ICBM152 template shipped in the 'nilearn' package, "
            "which is not installed: pip install nilearn"
        )
    data = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return {k: data / _FILE.format(k) for k in ("t1", "gm", "wm")}


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    if not path.is_file():
        raise TemplateError(f"{path}: MNI template file not found (reinstall nilearn: pip install --force-reinstall nilearn)")
    try:
        img = nib.load(str(path))
        arr = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the same user problem
        raise TemplateError(f"{path}: cannot read the MNI template ({type(exc).__name__}: {exc})") from None
    if arr.ndim != 3:
        raise TemplateError(f"{path}: expected a 3D volume, got shape {arr.shape}")
    return arr, np.asarray(img.affine, dtype=np.float64)


@dataclass(frozen=True)
class MNITemplate:
    """The template on one grid.

    Attributes:
        t1: ``(X, Y, Z)`` float32 T1 intensities in [0, 1] (0 outside the brain).
        seg: ``(X, Y, Z)`` int64 label map with the ids of :data:`MNI_LABELS`.
        affine: ``(4, 4)`` float64 voxel→world (RAS, mm; MNI coordinates).
        spacing: voxel size in mm (isotropic).
    """

    t1: np.ndarray
    seg: np.ndarray
    affine: np.ndarray
    spacing: float

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.t1.shape)  # type: ignore[return-value]


def _labels_1mm(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, affine: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    brain = t1 > 0
    g = gm / 255.0
    w = wm / 255.0
    c = np.clip(1.0 - g - w, 0.0, 1.0)
    tissue = np.argmax(np.stack([c, g, w]), axis=0)  # 0 csf, 1 gm, 2 wm
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    depth = ndimage.distance_transform_edt(brain, sampling=spacing)
    ii = np.indices(t1.shape, dtype=np.float32)
    x, y, z = (affine[d, 0] * ii[0] + affine[d, 1] * ii[1] + affine[d, 2] * ii[2] + affine[d, 3] for d in range(3))
    left = x < 0
    fossa = brain & (((z < -20) & (y < -35)) | ((np.abs(x) < 12) & (y > -45) & (y < -12) & (z < -12)))
    central = (np.abs(x) < 30) & (y > -35) & (y < 25) & (z > -15) & (z < 20)
    deep_gm = brain & (tissue == 1) & central & (depth > 18) & ~fossa
    vent_box = (np.abs(x) < 30) & (y > -45) & (y < 30) & (z > -5) & (z < 35)
    vent = brain & (tissue == 0) & vent_box & (depth > 12) & ~fossa
    seg = np.zeros(t1.shape, dtype=np.int64)
    seg[brain & (tissue == 0)] = 9
    seg[brain & (tissue == 1)] = np.where(left, 1, 2)[brain & (tissue == 1)]
    seg[brain & (tissue == 2)] = np.where(left, 3, 4)[brain & (tissue == 2)]
    seg[deep_gm] = np.where(left, 5, 6)[deep_gm]
    seg[vent] = np.where(left, 7, 8)[vent]
    seg[fossa] = 10
    return seg


#: Bump when the derivation below changes: cached templates of older versions are ignored.
_DERIVATION_VERSION = 1


def _cache_file(spacing: float, files: dict[str, Path]) -> Path | None:
    """Where the template at ``spacing`` is cached on disk (``$REGBENCH_CACHE_DIR`` or
    ``~/.cache/regbench``), keyed by the source files' sizes and mtimes; ``None`` when the
    sources cannot be stat'ed (the build then reports the missing file)."""
    import hashlib
    import os

    try:
        stamp = "|".join(f"{files[k].stat().st_size}:{files[k].stat().st_mtime_ns}" for k in ("t1", "gm", "wm"))
    except OSError:
        return None
    key = hashlib.sha256(f"{_DERIVATION_VERSION}|{spacing:.6f}|{stamp}".encode()).hexdigest()[:16]
    root = Path(os.environ["REGBENCH_CACHE_DIR"]) if os.environ.get("REGBENCH_CACHE_DIR") else Path.home() / ".cache" / "regbench"
    return root / "mni_template" / f"mni_{spacing:g}mm_{key}.npz"


@functools.lru_cache(maxsize=8)
def mni_template(spacing: float = 2.0) -> MNITemplate:
    """The template (T1 and derived labels) on an isotropic grid of ``spacing`` mm.

    Built once per spacing and kept on disk (:func:`_cache_file`; a few seconds to build
    from the 1 mm volumes, milliseconds to read), and in memory for the process.

    Args:
        spacing: voxel size in mm, 1 to 8.

    Raises:
        TemplateError: a file is missing or unreadable (the message names it).
        ValueError: ``spacing`` out of range.
    """
    from benchmark.core.io import atomic_path

    s = float(spacing)
    if not 1.0 <= s <= 8.0:
        raise ValueError(f"spacing must be in [1, 8] mm; got {spacing!r}")
    files = mni_template_files()
    cache = _cache_file(s, files)
    if cache is not None and cache.is_file():
        try:
            with np.load(cache) as z:
                return MNITemplate(t1=z["t1"], seg=z["seg"], affine=z["affine"], spacing=s)
        except (OSError, KeyError, ValueError):
            pass  # a damaged cache entry is rebuilt below
    tpl = _build_template(s, files)
    if cache is not None:
        try:
            with atomic_path(cache, suffix=".tmp.npz") as tmp, open(tmp, "wb") as fh:  # readers never see half a file
                np.savez(fh, t1=tpl.t1, seg=tpl.seg, affine=tpl.affine)
        except OSError:
            pass  # a read-only home only costs the rebuild next time
    return tpl


def _build_template(s: float, files: dict[str, Path]) -> MNITemplate:
    from scipy import ndimage

    t1, aff = _read(files["t1"])
    gm, aff_g = _read(files["gm"])
    wm, aff_w = _read(files["wm"])
    for name, arr, a in (("gm", gm, aff_g), ("wm", wm, aff_w)):
        if arr.shape != t1.shape or not np.allclose(a, aff):
            raise TemplateError(f"{files[name]}: grid differs from {files['t1'].name} (shape {arr.shape} vs {t1.shape})")
    if not np.allclose(aff[:3, :3], np.eye(3)):
        raise TemplateError(f"{files['t1']}: expected a 1 mm RAS diagonal affine, got {aff[:3, :3].tolist()}")
    seg1 = _labels_1mm(t1, gm, wm, aff)
    # world bounding box of the brain, one output voxel of margin
    idx = np.argwhere(t1 > 0)
    lo_w = idx.min(0) + aff[:3, 3] - s
    hi_w = idx.max(0) + aff[:3, 3] + s
    shape = np.ceil((hi_w - lo_w) / s).astype(int) + 1
    shape = (np.ceil(shape / 8) * 8).astype(int)
    centre = 0.5 * (lo_w + hi_w)
    origin = centre - 0.5 * (shape - 1) * s
    out_aff = np.eye(4)
    out_aff[:3, :3] = np.eye(3) * s
    out_aff[:3, 3] = origin
    # output voxel -> input (1 mm) voxel coordinates
    grid = np.indices(tuple(shape), dtype=np.float32).reshape(3, -1)
    coords = (grid * s + origin[:, None] - aff[:3, 3][:, None]).astype(np.float32)
    sigma = 0.4 * s if s > 1.0 else 0.0

    def resample(vol: np.ndarray) -> np.ndarray:
        v = ndimage.gaussian_filter(vol, sigma) if sigma > 0 else vol
        return ndimage.map_coordinates(v, coords, order=1, mode="constant", cval=0.0).reshape(tuple(shape))

    t1_out = resample(t1 / max(float(t1.max()), 1e-6)).clip(0.0, 1.0).astype(np.float32)
    best = np.full(tuple(shape), -1.0, dtype=np.float32)
    seg_out = np.zeros(tuple(shape), dtype=np.int64)
    for lab in range(0, len(MNI_LABELS) + 1):
        p = resample((seg1 == lab).astype(np.float32))
        win = p > best
        seg_out[win] = lab
        best[win] = p[win]
    t1_out[seg_out == 0] = 0.0
    return MNITemplate(t1=t1_out, seg=seg_out, affine=out_aff, spacing=s)
