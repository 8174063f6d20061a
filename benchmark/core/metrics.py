"""Evaluation metrics for deformable registration: overlap, surface distance, landmarks, regularity.

Conventions (see :mod:`benchmark.core.spatial`):

* A displacement ``u`` is ``(ndim, *spatial)`` (or ``(1, ndim, *spatial)``) in **voxels of the
  fixed grid**, channel ``d`` = shift along array axis ``d``; pull: ``warped(x) = moving(x + u(x))``.
  The deformation is ``phi(x) = x + u(x)``.
* Segmentations are integer label maps ``(*spatial)`` (numpy arrays or CPU/CUDA tensors); the
  warped one is the moving segmentation already pulled onto the fixed grid (nearest neighbour).
* Distances are in mm: ``spacing`` (per array axis) for HD95, the moving image's 4x4
  voxel->world affine for TRE.

Everything is vectorised: one pass over the volume for all labels (Dice, centroids), shared
difference arrays for the Jacobian and the ten NDV schemes. The only per-label loop is HD95's,
where each label needs its own distance transform, on a crop around the label.

Where these definitions differ from the public Learn2Reg / LUMIR evaluation scripts, the
docstring says how (Dice/HD95 absent-label rule, HD95 surfel weighting, SDlogJ, TRE sampling,
the robustness aggregate).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Sequence

import numpy as np
import scipy.ndimage as ndi
import torch

from benchmark.core import registry

__all__ = [
    "dice_per_label",
    "dice",
    "hd95_per_label",
    "hd95",
    "jacobian_determinant",
    "displacement_jacobian",
    "fold_pct",
    "sdlogj",
    "sdlogj_l2r",
    "ndv_pct",
    "tre_points",
    "endpoint_error",
    "label_centroids",
    "tre_centroids",
    "tre_centroids_warped",
    "aggregate",
    "worst_count",
    "worst_fraction_mean",
    "DeformableCase",
    "deformable_metrics",
]

ArrayLike = np.ndarray | torch.Tensor


# ----------------------------------------------------------------------------------------------
# conversions
# ----------------------------------------------------------------------------------------------
def _as_tensor(x: ArrayLike) -> torch.Tensor:
    """Tensor view of an array (a copy only for negative strides, which torch cannot view)."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    a = np.asarray(x)
    if any(st < 0 for st in a.strides):
        a = np.ascontiguousarray(a)
    return torch.from_numpy(a)


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _labels_to_torch(seg: ArrayLike, device: torch.device | None = None) -> torch.Tensor:
    """Integer label map as an int64 tensor (float maps, e.g. nibabel's get_fdata, are rounded)."""
    if isinstance(seg, torch.Tensor):
        t = seg.detach()
        if device is not None:
            t = t.to(device)
    else:
        a = np.asarray(seg)
        if a.dtype.kind == "f":
            a = np.rint(a)
        t = _as_tensor(a.astype(np.int64, copy=False)).to(device or "cpu")
    if t.is_floating_point():
        t = t.round()
    return t.to(torch.int64)


def _labels_to_numpy(seg: ArrayLike) -> np.ndarray:
    a = _to_numpy(seg)
    if a.dtype.kind == "f":
        a = np.rint(a)
    return a.astype(np.int64, copy=False)


def _label_list(labels: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    lab = np.asarray(_to_numpy(labels) if isinstance(labels, torch.Tensor) else labels, dtype=np.int64).ravel()
    if lab.size == 0:
        raise ValueError("the label list is empty")
    return lab


def _disp_tensor(disp: ArrayLike) -> torch.Tensor:
    """``(ndim, *spatial)`` floating tensor from ``(ndim, *spatial)`` or ``(1, ndim, *spatial)``."""
    u = _as_tensor(disp)
    if not u.is_floating_point() or u.dtype in (torch.float16, torch.bfloat16):
        u = u.float()
    if u.dim() in (4, 5) and u.shape[0] == 1 and u.shape[1] == u.dim() - 2:
        u = u[0]
    nd = u.dim() - 1
    if nd not in (2, 3) or u.shape[0] != nd:
        raise ValueError(
            f"displacement must be (ndim, *spatial) or (1, ndim, *spatial) with ndim 2 or 3, got {tuple(u.shape)}"
        )
    return u


def _mask_tensor(mask: ArrayLike | None, shape: Sequence[int], device: torch.device) -> torch.Tensor | None:
    if mask is None:
        return None
    m = _as_tensor(mask).to(device)
    if tuple(m.shape) != tuple(shape):
        raise ValueError(f"mask shape {tuple(m.shape)} does not match the field's spatial shape {tuple(shape)}")
    return m != 0


def _codes_numpy(seg: np.ndarray, sorted_labels: np.ndarray) -> np.ndarray:
    n = sorted_labels.size
    idx = np.searchsorted(sorted_labels, seg)
    hit = sorted_labels[np.minimum(idx, n - 1)] == seg
    return np.where(hit, idx + 1, 0)


# ----------------------------------------------------------------------------------------------
# Dice
# ----------------------------------------------------------------------------------------------
def _absent_from(seg: ArrayLike | None, sorted_labels: np.ndarray) -> np.ndarray:
    """``(L,)`` bool: which of ``sorted_labels`` ``seg`` does not hold (all False for None).

    One pass where the map lives, as :func:`dice_per_label` counts (rank by ``searchsorted``
    against ``[l, l+1)`` intervals, then ``bincount``): no sort of the whole map, which
    ``unique`` would do."""
    if seg is None:
        return np.zeros(sorted_labels.size, dtype=bool)
    t = _labels_to_torch(seg)
    bounds = torch.as_tensor(np.stack([sorted_labels, sorted_labels + 1], axis=1).ravel(), device=t.device)
    ranks = torch.searchsorted(bounds, t.reshape(-1), right=True)
    counts = torch.bincount(ranks, minlength=2 * sorted_labels.size + 1)[1::2]
    return (counts == 0).cpu().numpy()


def dice_per_label(fixed_seg: ArrayLike, warped_seg: ArrayLike, labels: Sequence[int],
                   moving_seg: ArrayLike | None = None) -> np.ndarray:
    """Dice overlap of every label in ``labels``, in one pass over the volume.

    Ids are mapped to their rank in the sorted label list by ``searchsorted`` (ids not in the
    list fall in the gaps between labels), then a single joint ``bincount`` of (fixed rank,
    warped rank) gives the confusion matrix, whose row sums, column sums and diagonal are
    ``|F_l|``, ``|W_l|`` and ``|F_l ∩ W_l|``. Sparse ids (DKT 1002…2035, LUMIR 0…207) need no
    dense table; CUDA tensors stay on the GPU.

    Args:
        fixed_seg: ``(*spatial)`` integer label map of the fixed image (array or CPU/CUDA tensor).
        warped_seg: ``(*spatial)`` moving label map warped onto the fixed grid.
        labels: label ids to score, any order (duplicates allowed).
        moving_seg: the un-warped moving label map (any grid: only which labels it holds is
            read). Pass it whenever you have it: without it, a label the moving scan never
            had is indistinguishable from one the warp erased and scores 0.

    Returns:
        ``(L,)`` float64 in the order of ``labels``: ``2|F∩W| / (|F|+|W|)``; NaN where the label
        is absent from the fixed segmentation or from ``moving_seg`` (there is nothing to
        match), as in Learn2Reg's script. A label that the warp erased (in both inputs, not in
        the warped map) scores 0: left out of the mean, erasing a structure would raise a
        method's Dice.
    """
    lab = _label_list(labels)
    f = _labels_to_torch(fixed_seg)
    w = _labels_to_torch(warped_seg, device=f.device)
    if f.shape != w.shape:
        raise ValueError(f"fixed {tuple(f.shape)} and warped {tuple(w.shape)} segmentations differ in shape")
    uniq, inverse = np.unique(lab, return_inverse=True)
    n = uniq.size
    # Interval boundaries [l_0, l_0+1, l_1, l_1+1, ...]: searchsorted(side="right") returns the
    # odd index 2k+1 exactly for voxels of the k-th sorted label and an even index otherwise,
    # so the rank needs no gather/compare pass: the joint histogram is taken over the raw
    # indices and only its odd rows/columns are read.
    bounds = torch.as_tensor(np.stack([uniq, uniq + 1], axis=1).ravel(), device=f.device)
    nb = 2 * n + 1
    i_f = torch.searchsorted(bounds, f.reshape(-1), right=True)
    i_w = torch.searchsorted(bounds, w.reshape(-1), right=True)
    if nb * nb <= 1 << 24:
        joint = torch.bincount(i_f.mul_(nb).add_(i_w), minlength=nb * nb).reshape(nb, nb)
        joint = joint.cpu().numpy().astype(np.float64)
        nf = joint.sum(axis=1)[1::2]
        nw = joint.sum(axis=0)[1::2]
        inter = np.diagonal(joint)[1::2]
    else:  # thousands of labels: three histograms instead of an L x L one
        same = (i_f == i_w) & (i_f % 2 == 1)
        nf = torch.bincount(i_f, minlength=nb)[1::2].cpu().numpy().astype(np.float64)
        nw = torch.bincount(i_w, minlength=nb)[1::2].cpu().numpy().astype(np.float64)
        inter = torch.bincount(i_f[same], minlength=nb)[1::2].cpu().numpy().astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = 2.0 * inter / (nf + nw)
    d[(nf == 0) | _absent_from(moving_seg, uniq)] = np.nan
    return d[inverse]


def _nanmean(values: np.ndarray) -> float:
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else float("nan")


def dice(fixed_seg: ArrayLike, warped_seg: ArrayLike, labels: Sequence[int],
         moving_seg: ArrayLike | None = None) -> float:
    """Mean Dice over ``labels`` ignoring NaN (absent) labels; NaN if every label is absent."""
    return _nanmean(dice_per_label(fixed_seg, warped_seg, labels, moving_seg))


# ----------------------------------------------------------------------------------------------
# HD95
# ----------------------------------------------------------------------------------------------
def _surface(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    return mask & ~ndi.binary_erosion(mask, structure=structure, border_value=0)


def hd95_per_label(
    fixed_seg: ArrayLike,
    warped_seg: ArrayLike,
    labels: Sequence[int],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    voxel: bool = False,
    moving_seg: ArrayLike | None = None,
) -> np.ndarray:
    """95th-percentile Hausdorff distance of every label, in mm (or voxels with ``voxel=True``).

    Definition (voxel-surface, unweighted): the surface of a mask is its voxels that have a
    face neighbour outside it (``mask & ~binary_erosion(mask, face connectivity,
    border_value=0)``). For every surface voxel of A the distance to the nearest surface voxel
    of B is read from ``distance_transform_edt(~surface_B, sampling=spacing)``; the directed
    HD95 is the 95th percentile (``np.percentile``, linear) of those distances, and the HD95
    is the larger of the two directed values.

    This differs from DeepMind's surface-distance package (used by the Learn2Reg / LUMIR
    scripts via ``compute_robust_hausdorff``): that one places surface elements on the voxel
    *faces* and weights every distance by its surfel area before taking the percentile. With
    isotropic voxels the two agree to within about a voxel; ours counts every surface voxel
    once, whatever its orientation. ``voxel=True`` uses spacing 1, as Learn2Reg does.

    Args:
        fixed_seg, warped_seg: ``(*spatial)`` integer label maps on the fixed grid.
        labels: ids to score.
        spacing: voxel size in mm per array axis (ignored when ``voxel``).
        voxel: report in voxels (spacing 1).
        moving_seg: the un-warped moving label map (any grid; only which labels it holds is read).

    Returns:
        ``(L,)`` float64 in the order of ``labels``; NaN where the label is absent from the
        fixed map or from ``moving_seg`` (as :func:`dice_per_label`). A label the warp erased
        gets the grid's diagonal, ``√Σ((n_i − 1)·s_i)²``, the largest distance two voxels of
        the grid can have, so erasing a label never scores better than keeping any part of it,
        and a finite penalty keeps means and confidence intervals defined (Learn2Reg's script
        gives ∞).
    """
    lab = _label_list(labels)
    f = _labels_to_numpy(fixed_seg)
    w = _labels_to_numpy(warped_seg)
    if f.shape != w.shape:
        raise ValueError(f"fixed {f.shape} and warped {w.shape} segmentations differ in shape")
    nd = f.ndim
    sp = (1.0,) * nd if voxel else tuple(float(s) for s in spacing)
    if len(sp) != nd:
        raise ValueError(f"spacing {tuple(spacing)} has {len(sp)} entries for a {nd}D segmentation")
    uniq, inverse = np.unique(lab, return_inverse=True)
    cf = _codes_numpy(f, uniq)
    cw = _codes_numpy(w, uniq)
    # Bounding boxes of every label in one pass per map.
    boxes_f = ndi.find_objects(cf, max_label=uniq.size)
    boxes_w = ndi.find_objects(cw, max_label=uniq.size)
    structure = ndi.generate_binary_structure(nd, 1)
    out = np.full(uniq.size, np.nan)
    skip = _absent_from(moving_seg, uniq)
    diagonal = float(np.sqrt(sum(((n - 1) * s) ** 2 for n, s in zip(f.shape, sp))))
    for k in range(uniq.size):
        bf, bw = boxes_f[k], boxes_w[k]
        if bf is None or skip[k]:
            continue
        if bw is None:  # erased by the warp
            out[k] = diagonal
            continue
        # Crop to the union bounding box plus one voxel. Exact: (1) every voxel of either mask
        # keeps all its face neighbours inside the crop (or the crop edge is the image edge,
        # where border_value=0 acts as before), so the erosion and hence both surfaces are
        # unchanged; (2) the EDT is the exact Euclidean distance to the nearest surface voxel
        # of B, all of which lie inside the crop, so cropping cannot change it.
        crop = tuple(
            slice(max(min(a.start, b.start) - 1, 0), min(max(a.stop, b.stop) + 1, n))
            for a, b, n in zip(bf, bw, f.shape)
        )
        ma = cf[crop] == k + 1
        mb = cw[crop] == k + 1
        sa = _surface(ma, structure)
        sb = _surface(mb, structure)
        d_ab = ndi.distance_transform_edt(~sb, sampling=sp)[sa]
        d_ba = ndi.distance_transform_edt(~sa, sampling=sp)[sb]
        out[k] = max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))
    return out[inverse]


def hd95(
    fixed_seg: ArrayLike,
    warped_seg: ArrayLike,
    labels: Sequence[int],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    voxel: bool = False,
    moving_seg: ArrayLike | None = None,
) -> float:
    """Mean of :func:`hd95_per_label` ignoring NaN labels (NaN if all are absent)."""
    return _nanmean(hd95_per_label(fixed_seg, warped_seg, labels, spacing, voxel, moving_seg))


# ----------------------------------------------------------------------------------------------
# Jacobian determinant and regularity
# ----------------------------------------------------------------------------------------------
# The Jacobian and NDV kernels below use only slicing and arithmetic operators, so the same
# code runs on NumPy arrays (the CPU path) and on torch tensors (the CUDA path). On the CPU the
# volume is processed in slabs of a few rows along axis 0: every temporary then stays in cache,
# and NumPy runs each small operation on one thread. (Many small multi-threaded torch ops on a
# busy machine are slowed down many-fold by OpenMP barrier waits; one thread over cache-sized
# slabs was the fastest and the most stable on 2 shared cores.)
Array = np.ndarray | torch.Tensor


def _empty_like(x: Array) -> Array:
    return np.empty_like(x) if isinstance(x, np.ndarray) else torch.empty_like(x)


def _neg_part_(x: Array) -> Array:
    """In place ``min(x, 0)``."""
    if isinstance(x, np.ndarray):
        return np.minimum(x, 0.0, out=x)
    return x.clamp_max_(0.0)


def _sum64(x: Array) -> float:
    if isinstance(x, np.ndarray):
        return float(x.sum(dtype=np.float64))
    return float(x.double().sum().item())


def _kernel_array(u: torch.Tensor) -> Array:
    """CPU tensors as (zero-copy) NumPy arrays, CUDA tensors as they are."""
    return u if u.is_cuda else u.numpy()


_SLAB_VOXELS = 1 << 16  # voxels per CPU slab: ~256 KiB per float32 temporary


def _slab_rows(n_rows: int, row_size: int) -> int:
    """Rows per CPU slab so that one slab holds about ``_SLAB_VOXELS`` voxels (at least one row)."""
    return max(1, min(n_rows, _SLAB_VOXELS // max(row_size, 1)))


def _gradient(u: Array, axis: int, h: float) -> Array:
    """``np.gradient(u, h, axis=axis, edge_order=1)``: central inside, one-sided at the two ends."""
    n = u.shape[axis]

    def sl(start: int, stop: int) -> tuple:
        idx = [slice(None)] * u.ndim
        idx[axis] = slice(start, stop)
        return tuple(idx)

    g = _empty_like(u)
    if n < 2:
        g[...] = 0.0
        return g
    if n > 2:
        g[sl(1, n - 1)] = (u[sl(2, n)] - u[sl(0, n - 2)]) * (0.5 / h)
    g[sl(0, 1)] = (u[sl(1, 2)] - u[sl(0, 1)]) * (1.0 / h)
    g[sl(n - 1, n)] = (u[sl(n - 1, n)] - u[sl(n - 2, n - 1)]) * (1.0 / h)
    return g


def displacement_jacobian(disp: torch.Tensor, identity: bool = True) -> torch.Tensor:
    """``I + ∇u`` (``identity=False``: ``∇u``) of a batch of fields, by the finite differences of
    :func:`jacobian_determinant` (central inside, one-sided at the borders), in voxel units.

    The suite's one finite-difference Jacobian as a matrix field (SyN's inverse, the synthetic
    data's preimage solver); differentiable, on the input's device and dtype.

    Args:
        disp: ``(B, ndim, *spatial)`` tensor, voxels.

    Returns:
        ``(B, ndim * ndim, *spatial)``; channel ``i * ndim + j`` is ``δ_ij + ∂u_i/∂x_j``
        (without ``δ_ij`` when ``identity`` is False).
    """
    nd = disp.shape[1]
    rows = []
    for i in range(nd):
        for j in range(nd):
            g = _gradient(disp[:, i], 1 + j, 1.0)
            rows.append(g + 1.0 if identity and i == j else g)
    return torch.stack(rows, dim=1)


def _det_from_gradients(g: list[Array]) -> Array:
    """``det(I + G)`` with ``g[j][i] = ∂u_i/∂x_j``; modifies ``g``."""
    nd = len(g)
    for j in range(nd):
        g[j][j] += 1.0
    J = lambda i, j: g[j][i]  # noqa: E731
    if nd == 2:
        return J(0, 0) * J(1, 1) - J(0, 1) * J(1, 0)
    det = J(1, 1) * J(2, 2)
    det -= J(1, 2) * J(2, 1)
    det *= J(0, 0)
    t = J(1, 2) * J(2, 0)
    t -= J(1, 0) * J(2, 2)
    det += J(0, 1) * t
    t = J(1, 0) * J(2, 1)
    t -= J(1, 1) * J(2, 0)
    det += J(0, 2) * t
    return det


def jacobian_determinant(disp: ArrayLike, spacing: Sequence[float] | None = None) -> torch.Tensor:
    """Determinant of the Jacobian of ``phi(x) = x + u(x)`` by finite differences.

    ``J = I + ∇u`` with ``∂u_i/∂x_j`` by central differences, one-sided at the borders
    (``np.gradient`` with ``edge_order=1``). On the CPU a 3D field is processed in slabs along
    axis 0 (same result, cache-sized temporaries).

    Args:
        disp: ``(ndim, *spatial)`` or ``(1, ndim, *spatial)``, ndim 2 or 3, array or CPU/CUDA tensor.
        spacing: the size of one voxel along each array axis, in the units of ``disp``. ``None``
            means ``disp`` is in voxels (spacing 1). For a displacement in mm pass the voxel
            size in mm. (A voxel displacement between grids of equal spacing has the same
            determinant as its mm version, so ``None`` is right for the suite's fields.)

    Returns:
        ``(*spatial)`` tensor on the input's device, float32 (float64 for float64 input).
    """
    u_t = _disp_tensor(disp)
    nd = u_t.shape[0]
    sp = [1.0] * nd if spacing is None else [float(s) for s in spacing]
    if len(sp) != nd:
        raise ValueError(f"spacing {tuple(sp)} has {len(sp)} entries for a {nd}D field")
    u = _kernel_array(u_t)
    if nd == 2 or u_t.is_cuda:
        det = _det_from_gradients([_gradient(u, 1 + j, sp[j]) for j in range(nd)])
        return det if isinstance(det, torch.Tensor) else torch.from_numpy(det)
    n0 = u.shape[1]
    out = np.empty(u.shape[1:], dtype=u.dtype)
    step = _slab_rows(n0, u.shape[2] * u.shape[3])
    for a in range(0, n0, step):
        b = min(a + step, n0)
        lo, hi = max(a - 1, 0), min(b + 1, n0)
        U = u[:, lo:hi]
        # U has a one-row halo on each side except at the grid's ends, so the rows kept get
        # central differences inside and one-sided ones exactly at rows 0 and n0-1.
        g0 = _gradient(U, 1, sp[0])[:, a - lo : b - lo]
        rows = U[:, a - lo : b - lo]
        g = [g0, _gradient(rows, 2, sp[1]), _gradient(rows, 3, sp[2])]
        out[a:b] = _det_from_gradients(g)
    return torch.from_numpy(out)


def _masked_values(x: torch.Tensor, mask: ArrayLike | None) -> torch.Tensor:
    m = _mask_tensor(mask, x.shape, x.device)
    return x.reshape(-1) if m is None else x[m]


def fold_pct(jacdet: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Percentage of voxels (inside ``mask`` if given) with ``det J <= 0``.

    Args:
        jacdet: ``(*spatial)`` determinants (:func:`jacobian_determinant`).
        mask: optional ``(*spatial)`` boolean/0-1 mask.
    """
    v = _masked_values(_as_tensor(jacdet), mask)
    if v.numel() == 0:
        return float("nan")
    return float((v <= 0).sum().item()) * 100.0 / v.numel()


def sdlogj(jacdet: ArrayLike, mask: ArrayLike | None = None, eps: float = 1e-9) -> float:
    """Standard deviation (ddof 0) of ``log(clip(det J, eps, 1e9))`` over the mask (or all voxels).

    Folded voxels (``det <= 0``) enter at ``log(eps)``, so a folding field gets a large value.
    """
    v = _masked_values(_as_tensor(jacdet), mask).double()
    if v.numel() == 0:
        return float("nan")
    return float(torch.log(v.clamp(eps, 1e9)).std(unbiased=False).item())


def sdlogj_l2r(jacdet: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Learn2Reg's "SDlogJ": ``std(log(clip(det J + 3, 1e-9, 1e9)))`` on the interior ``[2:-2]``.

    The official Learn2Reg / LUMIR evaluation adds 3 to the determinant before the log and
    crops two voxels on every side (its zero-padded central differences are wrong there; our
    central differences equal theirs on ``[2:-2]``), with ddof 0 and, when a mask is given,
    over the mask cropped the same way. This is **not** ``std(log J)``: the shift by 3
    compresses the spread (roughly ``std(J)/4`` for J near 1) and lets folds (J <= 0) through
    without hitting the clip. Reported under its own name; :func:`sdlogj` is the plain one.
    """
    j = _as_tensor(jacdet)
    crop = tuple(slice(2, -2) for _ in range(j.dim()))
    jc = j[crop]
    m = None
    if mask is not None:
        mt = _as_tensor(mask)
        if tuple(mt.shape) != tuple(j.shape):
            raise ValueError(f"mask shape {tuple(mt.shape)} does not match {tuple(j.shape)}")
        m = mt[crop]
    v = _masked_values(jc, m).double()
    if v.numel() == 0:
        return float("nan")
    return float(torch.log((v + 3.0).clamp(1e-9, 1e9)).std(unbiased=False).item())


# ----------------------------------------------------------------------------------------------
# Non-diffeomorphic volume (Liu et al., IJCV 2024)
# ----------------------------------------------------------------------------------------------
def _cross(a: Sequence[Array], b: Sequence[Array]) -> tuple[Array, Array, Array]:
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def _dot_neg_acc(acc: Array, a: Sequence[Array], x: Sequence[Array]) -> None:
    """``acc += min(a · x, 0)``."""
    d = a[0] * x[0]
    d += a[1] * x[1]
    d += a[2] * x[2]
    acc += _neg_part_(d)


def _ndv_block(U: Array) -> Array:
    """Sum over the 10 schemes of ``min(J_s, 0)`` at the interior of a block.

    ``U``: ``(3, m0+2, m1+2, m2+2)`` displacement (voxels) with a one-voxel halo on every side;
    returns ``(m0, m1, m2)``.
    """
    I = (slice(1, -1),) * 3  # noqa: E741
    # Shared one-voxel differences of phi = x + u along each axis (the identity adds 1 to the
    # own component), each computed once and read both as forward (F) and backward (B) difference.
    D0 = U[:, 1:, 1:-1, 1:-1] - U[:, :-1, 1:-1, 1:-1]
    D1 = U[:, 1:-1, 1:, 1:-1] - U[:, 1:-1, :-1, 1:-1]
    D2 = U[:, 1:-1, 1:-1, 1:] - U[:, 1:-1, 1:-1, :-1]
    D0[0] += 1.0
    D1[1] += 1.0
    D2[2] += 1.0
    F0, B0 = D0[:, 1:], D0[:, :-1]
    F1, B1 = D1[:, :, 1:], D1[:, :, :-1]
    F2, B2 = D2[:, :, :, 1:], D2[:, :, :, :-1]
    acc = U[(0, *I)] * 0.0
    # Eight one-sided schemes: det[c0, c1, c2] = c0 · (c1 × c2); 4 cross products serve 8 dets.
    for c1 in (F1, B1):
        for c2 in (F2, B2):
            x = _cross(c1, c2)
            _dot_neg_acc(acc, F0, x)
            _dot_neg_acc(acc, B0, x)
    # Two tetrahedral schemes with diagonal edges phi(x + o) - phi(x). Edge order as in the
    # reference code; both give det +2 for the identity (6 x the central tetrahedron's volume
    # 1/3): positive orientation, and deliberately not rescaled.
    centre = U[(slice(None), *I)]
    ends = U.shape[1:]

    def edge(o: tuple[int, int, int]) -> list[Array]:
        e = U[(slice(None), *(slice(1 + oi, n - 1 + oi) for oi, n in zip(o, ends)))] - centre
        for k in range(3):
            if o[k]:
                e[k] += float(o[k])
        return [e[0], e[1], e[2]]

    for offsets in (((-1, -1, 0), (-1, 0, -1), (0, -1, -1)), ((1, 1, 0), (0, 1, 1), (1, 0, 1))):
        ea, eb, ec = (edge(o) for o in offsets)
        _dot_neg_acc(acc, ea, _cross(eb, ec))
    return acc


def _nda_neg(u: Array) -> Array:
    """2D: sum over the 4 one-sided schemes of ``min(J_s, 0)`` on the interior ``[1:-1, 1:-1]``."""
    D0 = u[:, 1:, 1:-1] - u[:, :-1, 1:-1]
    D1 = u[:, 1:-1, 1:] - u[:, 1:-1, :-1]
    D0[0] += 1.0
    D1[1] += 1.0
    acc = u[0, 1:-1, 1:-1] * 0.0
    for c0 in (D0[:, 1:], D0[:, :-1]):
        for c1 in (D1[:, :, 1:], D1[:, :, :-1]):
            acc += _neg_part_(c0[0] * c1[1] - c0[1] * c1[0])
    return acc


def ndv_pct(disp: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Non-diffeomorphic volume in % (Liu et al., IJCV 2024, "digital diffeomorphism"), as LUMIR reports it.

    ``phi = x + u``. Ten finite-difference Jacobian determinants per voxel: the eight
    one-sided ones (forward or backward difference chosen per axis) and two "tetrahedral"
    ones whose edges are the diagonal offsets ``(-1,-1,0), (-1,0,-1), (0,-1,-1)`` and
    ``(1,1,0), (0,1,1), (1,0,1)``. Each ``|J|`` is six times the signed volume of a
    tetrahedron of one of the two 5-tetrahedra splits of the voxel cube, so

        NDV = Σ_schemes Σ_{x ∈ mask} −0.5 · min(J_s(x), 0) / 6,   reported as 100 · NDV / |mask|.

    Checked against the reference code (``calc_non_diffeomorphic_volume`` of
    yihao6/digital_diffeomorphism and ``calc_measurements`` of the LUMIR evaluation): the
    weighting is exactly this, with the tetrahedral determinants **not** rescaled — they are
    +2 for the identity (the central tetrahedron has volume 1/3), which is what makes the ten
    terms add up to one voxel for a fully inverted cube. Border: like the LUMIR evaluation,
    the determinants are evaluated on the interior ``[1:-1]`` of the grid only (the one-voxel
    border is dropped; edge replication, ``mode='nearest'``, would only ever touch that
    border), and the mask is cropped to the same interior, so ``|mask|`` counts interior
    voxels. (The stand-alone package instead pads the *displacement* by edge replication and
    keeps the border; values differ only by what folds sit on the outermost voxel layer.)
    The LUMIR evaluation passes ``mask = moving image > 0``.

    2D fields give the analogous non-diffeomorphic area (NDA): four one-sided schemes,
    ``Σ −0.5·min(J, 0) / 2``, as a % of the mask's interior pixels.

    Args:
        disp: ``(ndim, *spatial)`` or ``(1, ndim, *spatial)`` in voxels; CPU or CUDA.
        mask: optional ``(*spatial)`` mask on the full grid.

    Returns:
        NDV (or NDA) as a percentage of the (interior) mask volume; NaN if that is empty (also
        on a grid with fewer than 3 voxels along an axis, a single slice say, which has no
        interior: the other metrics of such a case are still defined).
    """
    u_t = _disp_tensor(disp)
    nd = u_t.shape[0]
    shape = tuple(u_t.shape[1:])
    m = _mask_tensor(mask, shape, u_t.device)
    if any(n < 3 for n in shape):
        return float("nan")
    interior = tuple(slice(1, -1) for _ in range(nd))
    mi = None if m is None else _kernel_array(m[interior])
    count = float(np.prod([n - 2 for n in shape])) if mi is None else float(mi.sum())
    if count == 0:
        return float("nan")
    u = _kernel_array(u_t)
    if nd == 2:
        acc = _nda_neg(u)
        neg = _sum64(acc if mi is None else acc[mi])
        return -0.5 * neg / 2.0 / count * 100.0 + 0.0
    n0 = shape[0]
    # CPU: slabs of rows along axis 0 (with a one-row halo); CUDA: the whole volume at once.
    step = n0 - 2 if u_t.is_cuda else _slab_rows(n0 - 2, shape[1] * shape[2])
    neg = 0.0
    for a in range(1, n0 - 1, step):
        b = min(a + step, n0 - 1)
        acc = _ndv_block(u[:, a - 1 : b + 1])
        neg += _sum64(acc if mi is None else acc[mi[a - 1 : b - 1]])
    return -0.5 * neg / 6.0 / count * 100.0 + 0.0


# ----------------------------------------------------------------------------------------------
# TRE
# ----------------------------------------------------------------------------------------------
def _sample_linear(field: torch.Tensor, points: np.ndarray) -> np.ndarray:
    """(Tri/bi)linear sample of ``field`` ``(C, *spatial)`` at voxel positions ``(N, nd)``, border-extended.

    Same values as ``grid_sample(..., align_corners=True, padding_mode='border')``.
    """
    nd = points.shape[1]
    shape = field.shape[1:]
    p = np.clip(points, 0.0, np.asarray(shape, dtype=np.float64) - 1.0)
    i0 = np.floor(p).astype(np.int64)
    i0 = np.minimum(i0, np.maximum(np.asarray(shape) - 2, 0))
    t = p - i0
    out = np.zeros((points.shape[0], field.shape[0]))
    for corner in range(2**nd):
        bits = [(corner >> k) & 1 for k in range(nd)]
        idx = [np.minimum(i0[:, k] + bits[k], shape[k] - 1) for k in range(nd)]
        w = np.ones(points.shape[0])
        for k in range(nd):
            w = w * (t[:, k] if bits[k] else 1.0 - t[:, k])
        ti = [torch.as_tensor(ix, device=field.device) for ix in idx]
        vals = field[(slice(None), *ti)].double().cpu().numpy()  # (C, N)
        out += w[:, None] * vals.T
    return out


def tre_points(
    disp: ArrayLike,
    fixed_points: ArrayLike,
    moving_points: ArrayLike,
    moving_affine: ArrayLike,
) -> np.ndarray:
    """Target registration error of point landmarks, in world mm.

    The displacement is sampled (trilinear, border-extended) at each fixed landmark ``p``;
    ``p + u(p)`` is its correspondence in the moving array (pull convention), and the error is
    ``|| A_m[:3,:3] @ ((p + u(p)) - q) ||`` with ``A_m`` the moving image's voxel->world affine
    and ``q`` the moving landmark. (Learn2Reg's script samples with cubic splines,
    ``map_coordinates`` order 3, and scales by the moving spacing; both agree on an axis-aligned
    affine and a smooth field.)

    Args:
        disp: ``(ndim, *spatial)`` or ``(1, ndim, *spatial)`` voxels of the fixed grid.
        fixed_points: ``(N, ndim)`` voxel indices in the fixed image (array axis order).
        moving_points: ``(N, ndim)`` voxel indices in the moving image.
        moving_affine: ``(ndim+1, ndim+1)`` voxel->world of the moving image.

    Returns:
        ``(N,)`` float64 mm; NaN for rows where either point has a NaN.
    """
    u = _disp_tensor(disp)
    nd = u.shape[0]
    fp = np.asarray(_to_numpy(fixed_points), dtype=np.float64).reshape(-1, nd)
    mp = np.asarray(_to_numpy(moving_points), dtype=np.float64).reshape(-1, nd)
    if fp.shape != mp.shape:
        raise ValueError(f"{fp.shape[0]} fixed and {mp.shape[0]} moving landmarks")
    a = np.asarray(_to_numpy(moving_affine), dtype=np.float64)
    if a.shape != (nd + 1, nd + 1):
        raise ValueError(f"moving_affine must be {(nd + 1, nd + 1)}, got {a.shape}")
    out = np.full(fp.shape[0], np.nan)
    ok = np.isfinite(fp).all(axis=1) & np.isfinite(mp).all(axis=1)
    if ok.any():
        up = _sample_linear(u, fp[ok])
        diff = (fp[ok] + up) - mp[ok]
        out[ok] = np.linalg.norm(diff @ a[:nd, :nd].T, axis=1)
    return out


def label_centroids(label_map: ArrayLike, labels: Sequence[int]) -> np.ndarray:
    """Voxel centroid of every label, one pass (``bincount`` with coordinate weights).

    Args:
        label_map: ``(*spatial)`` integer labels.
        labels: ids.

    Returns:
        ``(L, ndim)`` float64 voxel coordinates (array axis order); NaN rows for absent labels.
    """
    lab = _label_list(labels)
    seg = _labels_to_numpy(label_map)
    uniq, inverse = np.unique(lab, return_inverse=True)
    codes = _codes_numpy(seg.ravel(), uniq)
    nz = np.flatnonzero(codes)
    c = codes[nz]
    coords = np.unravel_index(nz, seg.shape)
    n = np.bincount(c, minlength=uniq.size + 1)[1:].astype(np.float64)
    cent = np.stack(
        [np.bincount(c, weights=coords[k].astype(np.float64), minlength=uniq.size + 1)[1:] for k in range(seg.ndim)],
        axis=1,
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        cent = cent / n[:, None]
    cent[n == 0] = np.nan
    return cent[inverse]


def _landmark_ids(fixed_landmark_labels: ArrayLike, labels: Sequence[int] | None) -> np.ndarray:
    if labels is not None:
        return _label_list(labels)
    ids = np.unique(_labels_to_numpy(fixed_landmark_labels))
    ids = ids[ids != 0]
    if ids.size == 0:
        raise ValueError("the fixed landmark volume has no non-zero labels")
    return ids


def tre_centroids(
    disp: ArrayLike,
    fixed_landmark_labels: ArrayLike,
    moving_landmark_labels: ArrayLike,
    moving_affine: ArrayLike,
    labels: Sequence[int] | None = None,
) -> np.ndarray:
    """TRE with landmarks given as label volumes (LUMIR): centroid per label, then :func:`tre_points`.

    Args:
        disp: ``(3, *spatial)`` voxels of the fixed grid.
        fixed_landmark_labels, moving_landmark_labels: ``(*spatial)`` label volumes, one small
            blob per landmark id, on the fixed and moving grids.
        moving_affine: ``(4, 4)`` moving voxel->world.
        labels: landmark ids; default the non-zero ids of the fixed volume.

    Returns:
        ``(L,)`` mm; NaN where a landmark is missing from either volume. The official LUMIR
        script instead warps the moving landmark volume (nearest) and compares centroids on
        the fixed grid: see :func:`tre_centroids_warped`.
    """
    ids = _landmark_ids(fixed_landmark_labels, labels)
    p = label_centroids(fixed_landmark_labels, ids)
    q = label_centroids(moving_landmark_labels, ids)
    return tre_points(disp, p, q, moving_affine)


def tre_centroids_warped(
    disp: ArrayLike,
    fixed_landmark_labels: ArrayLike,
    moving_landmark_labels: ArrayLike,
    fixed_affine: ArrayLike,
    labels: Sequence[int] | None = None,
) -> np.ndarray:
    """LUMIR's official landmark protocol: warp the moving landmark volume, compare centroids.

    The moving landmark volume is pulled onto the fixed grid with nearest neighbour (the one
    :func:`benchmark.core.spatial.warp`), and for every landmark id the distance between its
    centroid there and its centroid in the fixed volume is measured in mm through the fixed
    affine's linear part (LUMIR's data are 1 mm isotropic, where this equals their voxel value).

    Returns:
        ``(L,)`` mm; NaN where a landmark is missing (e.g. warped out of the grid).
    """
    from benchmark.core.spatial import warp

    u = _disp_tensor(disp)
    nd = u.shape[0]
    ids = _landmark_ids(fixed_landmark_labels, labels)
    mov = _labels_to_torch(moving_landmark_labels, device=u.device)
    warped = warp(mov[None, None], u[None].float(), mode="nearest", padding_mode="zeros")[0, 0]
    p = label_centroids(fixed_landmark_labels, ids)
    q = label_centroids(warped, ids)
    a = np.asarray(_to_numpy(fixed_affine), dtype=np.float64)[:nd, :nd]
    return np.linalg.norm((q - p) @ a.T, axis=1)


# ----------------------------------------------------------------------------------------------
# aggregation and the one engine
# ----------------------------------------------------------------------------------------------
def endpoint_error(
    disp: ArrayLike,
    true_disp: ArrayLike,
    moving_affine: ArrayLike | None = None,
    mask: ArrayLike | None = None,
) -> tuple[float, float]:
    """Endpoint error between a predicted and the true correspondence, in mm.

    Both fields follow the suite's convention: ``x + u(x)`` is the moving-array position
    (voxels) matched to fixed voxel ``x``. The error at ``x`` is the world distance between the
    two end points, ``|A_m[:3, :3] (u(x) - u_true(x))|`` with ``A_m`` the moving voxel→world
    affine (so anisotropic and oblique grids are measured in mm, not voxels).

    Args:
        disp, true_disp: ``(ndim, *spatial)`` or ``(1, ndim, *spatial)`` voxel fields on the
            same grid.
        moving_affine: ``(4, 4)`` (3D) or ``(3, 3)`` (2D) voxel→world; default the identity
            (errors in voxels).
        mask: ``(*spatial)`` bool region to average over (e.g. the fixed brain); default all.

    Returns:
        ``(mean, p90)`` over the masked voxels, mm; NaN for an empty mask.
    """
    u = _disp_tensor(disp).double()
    t = _disp_tensor(true_disp).double().to(u.device)
    if u.shape != t.shape:
        raise ValueError(f"true displacement {tuple(t.shape)} is not on the predicted field's grid {tuple(u.shape)}")
    nd = u.shape[0]
    m = torch.eye(nd, dtype=torch.float64) if moving_affine is None else torch.as_tensor(
        np.asarray(moving_affine, dtype=np.float64)[:nd, :nd])
    diff = torch.einsum("de,e...->d...", m.to(u.device), u - t)
    err = diff.pow(2).sum(0).sqrt()
    msk = _mask_tensor(mask, u.shape[1:], u.device)
    vals = err[msk] if msk is not None else err.reshape(-1)
    if vals.numel() == 0:
        return math.nan, math.nan
    return float(vals.mean()), float(np.quantile(vals.cpu().numpy(), 0.9))


def worst_count(n: int, fraction: float = 0.3) -> int:
    """How many of ``n`` values "the worst ``fraction``" covers: ``max(1, ceil(fraction · n))``
    (0 for ``n == 0``); the one rule of the suite's robustness values and the ranking's DSC30."""
    return max(1, math.ceil(fraction * n - 1e-9)) if n > 0 else 0


def worst_fraction_mean(values: Iterable[float | None], higher_is_better: bool, fraction: float = 0.3) -> float:
    """Mean of the worst ``fraction`` of the finite values: the one definition of Learn2Reg's
    robustness value in the suite (``aggregate``, the leaderboard and ``evaluate`` use it).

    ``k = max(1, ceil(fraction · n))`` values enter (so "the worst 30 %" never covers fewer
    than 30 % of the cases: 2 of 4, 3 of 7, 3 of 8, 3 of 10, 4 of 11); the lowest when higher
    is better (Dice), the highest otherwise (HD95, TRE, folds). NaN without finite values.
    """
    v = np.asarray([np.nan if x is None else float(x) for x in values], dtype=np.float64)
    v = np.sort(v[np.isfinite(v)])
    if v.size == 0:
        return math.nan
    k = worst_count(v.size, fraction)
    return float((v[:k] if higher_is_better else v[-k:]).mean())


def aggregate(values: Iterable[float | None], higher_is_better: bool) -> dict:
    """Summary of per-case values, ignoring NaN/None.

    Returns:
        ``{"mean", "std", "median", "robust30", "n"}``: ``std`` is the population std (ddof 0,
        as LUMIR's ``np.std``); ``robust30`` is Learn2Reg's robustness, the mean of the worst
        30 % of cases (``ceil(0.3 n)``, at least one): the lowest values when
        ``higher_is_better`` (Dice), the highest otherwise (HD95, TRE, folds). ``n`` counts the
        finite values. All NaN when ``n == 0``. (The official scripts' ``"30"`` aggregate is
        ``np.quantile(values, 0.3)``, a percentile rather than a tail mean.)
    """
    v = np.asarray([np.nan if x is None else float(x) for x in values], dtype=np.float64)
    v = v[~np.isnan(v)]
    n = int(v.size)
    if n == 0:
        nan = float("nan")
        return {"mean": nan, "std": nan, "median": nan, "robust30": nan, "n": 0}
    return {
        "mean": float(v.mean()),
        "std": float(v.std()),
        "median": float(np.median(v)),
        "robust30": worst_fraction_mean(v, higher_is_better),
        "n": n,
    }


@dataclasses.dataclass
class DeformableCase:
    """The per-case inputs a registered metric's ``compute`` receives
    (:mod:`benchmark.core.registry`), with the metrics computed so far in ``values``.

    ``disp`` is the ``(ndim, *spatial)`` float tensor (voxels, pull); the others are the
    arguments of :func:`deformable_metrics` (``None`` where the case lacks them; ``labels``
    the resolved list); :attr:`jacdet` is computed once and shared.
    """

    disp: torch.Tensor
    fixed_seg: ArrayLike | None = None
    warped_seg: ArrayLike | None = None
    labels: list[int] = dataclasses.field(default_factory=list)
    spacing: tuple[float, ...] = (1.0, 1.0, 1.0)
    fixed_points: ArrayLike | None = None
    moving_points: ArrayLike | None = None
    moving_affine: ArrayLike | None = None
    mask: ArrayLike | None = None
    true_disp: ArrayLike | None = None
    values: dict[str, Any] = dataclasses.field(default_factory=dict)
    _jac: torch.Tensor | None = dataclasses.field(default=None, repr=False)

    @property
    def jacdet(self) -> torch.Tensor:
        """``det(I + ∇u)`` of the voxel field (:func:`jacobian_determinant`), computed once."""
        if self._jac is None:
            self._jac = jacobian_determinant(self.disp)
        return self._jac


def deformable_metrics(
    disp: ArrayLike,
    fixed_seg: ArrayLike | None = None,
    warped_seg: ArrayLike | None = None,
    labels: Sequence[int] | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    fixed_points: ArrayLike | None = None,
    moving_points: ArrayLike | None = None,
    moving_affine: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    hd95_voxel: bool = False,
    compute_hd95: bool = True,
    compute_ndv: bool = True,
    true_disp: ArrayLike | None = None,
    moving_seg: ArrayLike | None = None,
) -> dict:
    """All per-case deformable metrics: the one engine behind ``regbench evaluate`` and every test step.

    Args:
        disp: ``(ndim, *spatial)`` or ``(1, ndim, *spatial)`` voxels of the fixed grid (pull).
        fixed_seg, warped_seg: ``(*spatial)`` label maps (warped = moving seg pulled by ``disp``).
        labels: ids to score; default the non-zero ids of ``fixed_seg``.
        spacing: fixed voxel size in mm per array axis (HD95); 2D fields take 2 entries (the
            all-ones default adapts).
        fixed_points, moving_points: ``(N, ndim)`` voxel landmarks; ``moving_affine`` the moving
            voxel->world affine (default ``diag(*spacing, 1)``).
        mask: ``(*spatial)`` region for fold %, SDlogJ (both variants) and NDV.
        hd95_voxel: HD95 in voxels (Learn2Reg) instead of mm.
        compute_hd95, compute_ndv: skip the two costliest metrics (reported as NaN).
        true_disp: the true field on the same grid, when the data knows it: gives
            ``epe_mm`` / ``epe_p90_mm`` (:func:`endpoint_error` through ``moving_affine``) over
            ``mask``, else over the fixed foreground ``fixed_seg > 0``, else everywhere.
        moving_seg: the un-warped moving label map (any grid): labels it lacks are NaN in
            Dice and HD95 rather than scored as erased (:func:`dice_per_label`).

    Returns:
        ``{"dice", "dice_per_label", "hd95", "hd95_per_label", "tre", "fold_pct", "sdlogj",
        "sdlogj_l2r", "ndv_pct", "epe_mm", "epe_p90_mm"}``, plus every metric registered for
        the deformable family with a ``compute`` function (:mod:`benchmark.core.registry`,
        called with a :class:`DeformableCase`); plain floats (NaN allowed),
        per-label dicts ``{id: value}``.
        Metrics whose inputs are missing are ``None`` (Dice/HD95 without segmentations, TRE
        without landmarks), with empty per-label dicts. The Jacobian uses the voxel field
        (its determinant equals the physical one when both images share the spacing).
    """
    u = _disp_tensor(disp)
    nd = u.shape[0]
    spacing = tuple(float(v) for v in spacing)
    if len(spacing) != nd and all(v == 1.0 for v in spacing):
        spacing = (1.0,) * nd  # the (1, 1, 1) default on a 2D field
    out: dict = {}
    lab: list[int] = []
    if fixed_seg is not None and warped_seg is not None:
        for name, seg in (("fixed", fixed_seg), ("warped", warped_seg)):
            if tuple(seg.shape) != tuple(u.shape[1:]):
                raise ValueError(
                    f"{name} segmentation {tuple(seg.shape)} is not on the displacement's grid {tuple(u.shape[1:])}"
                )
        if labels is None:
            ids = np.unique(_labels_to_numpy(fixed_seg))
            labels = [int(i) for i in ids if i != 0]
        lab = [int(i) for i in labels]
        d = dice_per_label(fixed_seg, warped_seg, lab, moving_seg) if lab else np.zeros(0)
        if compute_hd95 and lab:
            h = hd95_per_label(fixed_seg, warped_seg, lab, spacing, voxel=hd95_voxel, moving_seg=moving_seg)
        else:
            h = np.full(len(lab), np.nan)
        out["dice"] = _nanmean(d)
        out["dice_per_label"] = {i: float(x) for i, x in zip(lab, d)}
        out["hd95"] = _nanmean(h)
        out["hd95_per_label"] = {i: float(x) for i, x in zip(lab, h)}
    else:
        out.update(dice=None, dice_per_label={}, hd95=None, hd95_per_label={})
    if fixed_points is not None and moving_points is not None:
        aff = np.diag([*spacing, 1.0]) if moving_affine is None else moving_affine
        t = tre_points(u, fixed_points, moving_points, aff)
        out["tre"] = _nanmean(t)
    else:
        out["tre"] = None
    case = DeformableCase(u, fixed_seg, warped_seg, lab, spacing, fixed_points, moving_points, moving_affine, mask, true_disp,
                          out)
    jac = case.jacdet
    out["fold_pct"] = fold_pct(jac, mask)
    out["sdlogj"] = sdlogj(jac, mask)
    out["sdlogj_l2r"] = sdlogj_l2r(jac, mask)
    out["ndv_pct"] = ndv_pct(u, mask) if compute_ndv else math.nan
    if true_disp is not None:
        region = mask if mask is not None else (None if fixed_seg is None else _labels_to_numpy(fixed_seg) > 0)
        aff = np.diag([*spacing, 1.0]) if moving_affine is None else moving_affine
        out["epe_mm"], out["epe_p90_mm"] = endpoint_error(u, true_disp, aff, region)
    else:
        out["epe_mm"] = out["epe_p90_mm"] = None
    for m in registry.metrics_of("deformable", computed=True):
        if m.family == "deformable":
            out[m.key] = m.compute_fn()(case)
    return out
