"""Similarity losses and regularisers, 2D and 3D.

All losses take ``(B, C, *spatial)`` tensors (``ndim = 2`` or ``3`` spatial axes) and the
module forms return a scalar to *minimise* (a similarity is returned negated). The functional
forms return the similarity itself (higher is better) or the penalty. Displacements follow
:mod:`benchmark.core.spatial`: ``(B, ndim, *spatial)`` in voxels, channel ``d`` = shift along array
axis ``d``.

Similarities: :func:`local_ncc` (windowed squared NCC), :func:`mse`,
:func:`mutual_information` (global, Parzen-window joint histogram), :func:`gradient_ncc`
(gradient correlation). Regularisers: :func:`diffusion` (squared first differences) and
:func:`bending_energy` (squared second differences).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "box_sum",
    "local_ncc",
    "LocalNCC",
    "mse",
    "MSE",
    "mutual_information",
    "MutualInformation",
    "gradient_ncc",
    "GradientNCC",
    "diffusion",
    "Diffusion",
    "bending_energy",
    "BendingEnergy",
]


def _spatial_ndim(x: torch.Tensor, what: str = "input") -> int:
    nd = x.dim() - 2
    if nd not in (2, 3):
        raise ValueError(f"{what}: expected (B, C, *spatial) with 2 or 3 spatial axes, got shape {tuple(x.shape)}")
    return nd


def _check_pair(fixed: torch.Tensor, warped: torch.Tensor) -> int:
    nd = _spatial_ndim(fixed, "fixed")
    if fixed.shape != warped.shape:
        raise ValueError(f"fixed {tuple(fixed.shape)} and warped {tuple(warped.shape)} must have the same shape")
    return nd


def box_sum(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """Sum over a centred box window at every voxel, zero outside the image.

    Separable, by cumulative sums: per axis, pad by the window radius, take the running sum
    and subtract it from itself shifted by the window, so the cost is ``O(1)`` per voxel and
    axis whatever the window (on CPU about 10× faster than 1D convolutions). The
    running sums are taken in float64 and the result cast back, so the window sums are as
    accurate as a direct summation.

    Args:
        x: ``(B, C, *spatial)``.
        window: odd window size per spatial axis (voxels).

    Returns:
        ``(B, C, *spatial)``.
    """
    nd = x.dim() - 2
    # Running sums are accumulated in float64: in float32 the difference of two large running
    # sums loses digits, and the variances built from box sums then cancel badly.
    acc = torch.float64 if x.dtype in (torch.float32, torch.float16, torch.bfloat16) else x.dtype
    out = x.to(acc)
    for axis, w in enumerate(window):
        if w <= 1:
            continue
        dim = 2 + axis
        n = out.shape[dim]
        r = w // 2
        pad = [0, 0] * nd
        # F.pad lists (before, after) pairs from the last axis backwards; one extra zero in
        # front makes c[i + w] - c[i] the sum of the window centred at i.
        pad[2 * (nd - 1 - axis)] = r + 1
        pad[2 * (nd - 1 - axis) + 1] = r
        c = F.pad(out, pad).cumsum(dim)
        out = c.narrow(dim, w, n) - c.narrow(dim, 0, n)
    return out.to(x.dtype)


def local_ncc(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    window: int | Sequence[int] = 9,
    eps: float = 1e-5,
    reduction: str = "mean",
) -> torch.Tensor:
    """Local (windowed) squared normalised cross-correlation, as in VoxelMorph / ANTs CC.

    ``cc(x) = cov(x)^2 / (var_f(x) var_w(x) + eps)`` over a box window around ``x`` (zero
    padding at the border; the window always counts ``prod(window)`` voxels). ``cov`` and
    ``var`` are window *sums* of centred products (not divided by the window size), as in
    VoxelMorph. A variance below ``32·eps_dtype·Σx²`` (float rounding level) counts as 0,
    and ``cov^2`` is capped at ``var_f var_w`` (Cauchy–Schwarz), so float rounding can never
    push ``cc`` above 1 and a constant patch gives exactly 0, never NaN or a rounding residue
    divided by ``eps`` (which, at CT intensity levels, used to give values far above 1).

    Args:
        fixed, warped: ``(B, 1, *spatial)`` (several channels are treated independently).
        window: window size in voxels (odd), scalar or one per axis.
        eps: added to the denominator (units: intensity⁴ · voxels²).
        reduction: ``"mean"`` gives the scalar mean CC; ``"none"`` the ``(B, C, *spatial)`` map.

    Returns:
        Mean local CC in ``[0, 1]`` (a similarity: higher is better) or the map.
    """
    nd = _check_pair(fixed, warped)
    win = [int(window)] * nd if isinstance(window, (int, float)) else [int(w) for w in window]
    if len(win) != nd:
        raise ValueError(f"window {win} has {len(win)} axes, images have {nd}")
    if any(w % 2 == 0 or w < 1 for w in win):
        raise ValueError(f"NCC window must be odd and positive, got {win}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    n = float(math.prod(win))
    f, m = fixed, warped
    c = f.shape[1]
    stacked = torch.cat([f, m, f * f, m * m, f * m], dim=1)
    sums = box_sum(stacked, win)
    f_sum, m_sum, ff_sum, mm_sum, fm_sum = sums.split(c, dim=1)
    f_mean = f_sum / n
    m_mean = m_sum / n
    cross = fm_sum - m_mean * f_sum
    # Variances at float-rounding level of the window's sum of squares are exactly 0.
    tol = 32.0 * torch.finfo(sums.dtype).eps
    f_var = ff_sum - f_mean * f_sum
    m_var = mm_sum - m_mean * m_sum
    f_var = torch.where(f_var > tol * ff_sum, f_var, torch.zeros_like(f_var))
    m_var = torch.where(m_var > tol * mm_sum, m_var, torch.zeros_like(m_var))
    var_prod = f_var * m_var
    cross2 = torch.minimum(cross * cross, var_prod)
    cc = cross2 / (var_prod + eps)
    if reduction == "none":
        return cc
    return cc.mean()


class LocalNCC(nn.Module):
    """Loss ``-mean local NCC`` (window ``window``³ voxels). See :func:`local_ncc`."""

    def __init__(self, window: int | Sequence[int] = 9, eps: float = 1e-5) -> None:
        super().__init__()
        self.window = window
        self.eps = eps

    def forward(self, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        return -local_ncc(fixed, warped, self.window, self.eps)


# --------------------------------------------------------------------------- MSE


def mse(fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
    """Mean squared intensity difference.

    Args:
        fixed, warped: ``(B, C, *spatial)``, same shape.

    Returns:
        Scalar ``mean((fixed - warped)^2)`` (intensity² units; lower is better).
    """
    _check_pair(fixed, warped)
    return (fixed - warped).square().mean()


class MSE(nn.Module):
    """Loss ``mse(fixed, warped)``. See :func:`mse`."""

    def forward(self, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        return mse(fixed, warped)


# --------------------------------------------------------------------------- mutual information

_MI_TRUNCATE = 3.0  # Parzen kernel support, in kernel standard deviations (at least one bin)


def _parzen_weights(
    values: torch.Tensor, bins: int, sigma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact Parzen weights of intensities in ``[0, 1]`` over ``bins`` bin centres.

    Kernel (``d`` = distance to a bin centre in bin widths, ``s = sigma``, ``T`` = support):
    ``k(d) = max(exp(-d²/2s²) - exp(-T²/2s²), 0)``, a Gaussian shifted down so that it
    reaches 0 continuously at ``|d| = T`` (a hard cut would make the histogram jump when a
    value crosses a bin boundary). Weights are normalised to sum to 1 over the bins inside
    ``[0, bins-1]``, so every voxel contributes unit mass.

    Args:
        values: ``(B, N)`` intensities, already clamped to ``[0, 1]``.

    Returns:
        ``(weights, index)``, both ``(B, N, K)``: ``K`` candidate bins per value (index
        clamped into range; weights of out-of-range bins are 0).
    """
    support = max(_MI_TRUNCATE * sigma, 1.0)
    pos = values * (bins - 1)
    base = pos.detach().floor()
    offsets = torch.arange(-math.floor(support), math.ceil(support) + 1, device=values.device, dtype=values.dtype)
    index = base.unsqueeze(-1) + offsets
    dist = pos.unsqueeze(-1) - index
    floor_val = math.exp(-0.5 * (support / sigma) ** 2)
    w = (torch.exp(-0.5 * (dist / sigma) ** 2) - floor_val).clamp_min(0)
    valid = (index >= 0) & (index <= bins - 1)
    w = w * valid.to(w.dtype)
    w = w / w.sum(-1, keepdim=True)
    return w, index.clamp(0, bins - 1).long()


def mutual_information(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    bins: int = 32,
    sigma_ratio: float = 0.5,
    mask: torch.Tensor | None = None,
    eps: float = 1e-10,
) -> torch.Tensor:
    """Global mutual information from a Parzen-window joint histogram (differentiable).

    Intensities are assumed to lie in ``[0, 1]`` (min–max normalised images) and are
    clamped to it. ``bins`` bin centres are evenly spaced on ``[0, 1]`` (width
    ``1/(bins-1)``); each intensity spreads its mass over nearby bins with a Gaussian kernel
    of standard deviation ``sigma_ratio`` bin widths, truncated smoothly at
    ``max(3·sigma_ratio, 1)`` bin widths (see :func:`_parzen_weights`), so the histogram
    costs ``O(N·K²)`` with ``K`` ≈ 4 candidate bins per voxel instead of ``O(N·bins)``
    memory. ``MI = Σ p_fw log(p_fw / (p_f p_w))`` per batch element.

    Args:
        fixed, warped: ``(B, C, *spatial)``, same shape; all channels and voxels of one
            batch element pool into one histogram.
        bins: number of histogram bins per image (>= 2).
        sigma_ratio: Parzen kernel standard deviation in bin widths (>= 0.1).
        mask: optional ``(B or 1, 1 or C, *spatial)`` voxel weights (bool or float in
            ``[0, 1]``); voxels with weight 0 do not count.
        eps: added inside the logarithms.

    Returns:
        Scalar MI in nats, averaged over the batch (a similarity: higher is better).
    """
    _check_pair(fixed, warped)
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    if sigma_ratio < 0.1:
        raise ValueError(f"sigma_ratio must be >= 0.1 bin widths, got {sigma_ratio}")
    b = fixed.shape[0]
    f = fixed.clamp(0.0, 1.0).reshape(b, -1)
    m = warped.clamp(0.0, 1.0).reshape(b, -1)
    wf, idf = _parzen_weights(f, bins, sigma_ratio)
    wm, idm = _parzen_weights(m, bins, sigma_ratio)
    joint_w = wf.unsqueeze(-1) * wm.unsqueeze(-2)  # (B, N, K, K)
    joint_i = idf.unsqueeze(-1) * bins + idm.unsqueeze(-2)
    if mask is not None:
        mw = mask.to(joint_w.dtype).expand_as(fixed).reshape(b, -1)
        joint_w = joint_w * mw[:, :, None, None]
    hist = torch.zeros(b, bins * bins, device=f.device, dtype=joint_w.dtype)
    hist = hist.scatter_add(1, joint_i.reshape(b, -1), joint_w.reshape(b, -1))
    total = hist.sum(1, keepdim=True)
    if bool((total <= 0).any()):
        raise ValueError("mutual_information: the mask selects no voxel in some batch element")
    p = (hist / total).view(b, bins, bins)
    pf = p.sum(2, keepdim=True)
    pm = p.sum(1, keepdim=True)
    mi = (p * (torch.log(p + eps) - torch.log(pf * pm + eps))).sum((1, 2))
    return mi.mean()


class MutualInformation(nn.Module):
    """Loss ``-MI`` (nats) for images in ``[0, 1]``. See :func:`mutual_information`."""

    def __init__(self, bins: int = 32, sigma_ratio: float = 0.5) -> None:
        super().__init__()
        self.bins = bins
        self.sigma_ratio = sigma_ratio

    def forward(
        self, fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return -mutual_information(fixed, warped, self.bins, self.sigma_ratio, mask)


# --------------------------------------------------------------------------- gradient NCC


def _sobel(x: torch.Tensor, axis: int) -> torch.Tensor:
    """Sobel derivative along spatial ``axis`` (voxel units), valid region only.

    Kernel: central difference ``[-1, 0, 1] / 2`` along ``axis`` and ``[1, 2, 1] / 4``
    smoothing along every other spatial axis.

    Args:
        x: ``(B, C, *spatial)``.

    Returns:
        ``(B, C, *(s - 2 for s in spatial))``.
    """
    nd = x.dim() - 2
    out = x
    for a in range(nd):  # separable 3-tap passes by slicing (much faster than conv3d on CPU)
        dim = 2 + a
        n = out.shape[dim]
        lo, mid, hi = out.narrow(dim, 0, n - 2), out.narrow(dim, 1, n - 2), out.narrow(dim, 2, n - 2)
        out = 0.5 * (hi - lo) if a == axis else 0.25 * (lo + hi) + 0.5 * mid
    return out


def _global_ncc(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """Pearson correlation per batch element of ``(B, ...)`` tensors → ``(B,)``."""
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / torch.sqrt((a * a).sum(1) * (b * b).sum(1) + eps)


def gradient_ncc(fixed: torch.Tensor, warped: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Gradient correlation (Penney et al. 1998): mean over spatial axes of the global NCC
    of the two images' Sobel derivatives along that axis.

    Used for 2D/3D registration (X-ray vs DRR); works on 3D volumes as well. Only the
    valid region (one voxel in from every border) is compared. Constant images give 0.

    Args:
        fixed, warped: ``(B, C, H, W)`` or ``(B, C, D, H, W)``, same shape, every spatial
            size >= 3.
        eps: added under the square root of the NCC denominator.

    Returns:
        Scalar in ``[-1, 1]`` averaged over the batch (a similarity: higher is better).
    """
    nd = _check_pair(fixed, warped)
    if min(fixed.shape[2:]) < 3:
        raise ValueError(f"gradient_ncc needs every spatial size >= 3, got {tuple(fixed.shape[2:])}")
    per_axis = [_global_ncc(_sobel(fixed, a), _sobel(warped, a), eps) for a in range(nd)]
    return torch.stack(per_axis, 0).mean()


class GradientNCC(nn.Module):
    """Loss ``-gradient_ncc(fixed, warped)``. See :func:`gradient_ncc`."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        return -gradient_ncc(fixed, warped, self.eps)


# --------------------------------------------------------------------------- regularisers


def _physical_scales(
    disp: torch.Tensor, spacing: Sequence[float] | None
) -> tuple[int, list[float], torch.Tensor | None]:
    """Check a displacement and return ``(ndim, spacing, per-channel scale)``.

    With ``spacing`` the field is read in mm (channel ``d`` times ``spacing[d]``); the
    per-channel scale is ``(1, ndim, 1, ...)``, else ``None`` (voxel units).
    """
    nd = _spatial_ndim(disp, "displacement")
    if disp.shape[1] != nd:
        raise ValueError(f"displacement has {disp.shape[1]} channels for {nd} spatial axes")
    if spacing is None:
        return nd, [1.0] * nd, None
    sp = [float(s) for s in spacing]
    if len(sp) != nd or any(s <= 0 for s in sp):
        raise ValueError(f"spacing must be {nd} positive values, got {spacing}")
    scale = torch.tensor(sp, device=disp.device, dtype=disp.dtype).view(1, nd, *([1] * nd))
    return nd, sp, scale


def diffusion(disp: torch.Tensor, spacing: Sequence[float] | None = None) -> torch.Tensor:
    """Diffusion regulariser: mean squared forward-difference gradient of the field.

    VoxelMorph's ``Grad('l2')``: for each spatial axis ``e``, the mean over batch, channels
    and voxels of ``(u(x + e) - u(x))²``; then the mean over the ``ndim`` axes. For a linear
    field ``u(x) = A x`` this is ``Σ A² / ndim²``.

    Args:
        disp: ``(B, ndim, *spatial)`` displacement in voxels.
        spacing: optional voxel size in mm per array axis. When given, the gradient is the
            physical one, ``∂(s_d u_d) / ∂(s_e x_e)`` (mm per mm, dimensionless), so
            anisotropic grids are penalised in world units; ``None`` = voxel units.

    Returns:
        Scalar penalty (lower is smoother).
    """
    nd, sp, scale = _physical_scales(disp, spacing)
    u = disp if scale is None else disp * scale
    terms = [(torch.diff(u, dim=2 + e) / sp[e]).square().mean() for e in range(nd)]
    return torch.stack(terms).mean()


class Diffusion(nn.Module):
    """Regulariser ``diffusion(disp, spacing)``. See :func:`diffusion`."""

    def __init__(self, spacing: Sequence[float] | None = None) -> None:
        super().__init__()
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)

    def forward(self, disp: torch.Tensor) -> torch.Tensor:
        return diffusion(disp, self.spacing)


def _interior(u: torch.Tensor, offset: Sequence[int]) -> torch.Tensor:
    """``u`` shifted by ``offset`` voxels, restricted to the interior (one voxel in)."""
    idx = [slice(None), slice(None)]
    for o, n in zip(offset, u.shape[2:]):
        idx.append(slice(1 + o, n - 1 + o))
    return u[tuple(idx)]


def bending_energy(disp: torch.Tensor, spacing: Sequence[float] | None = None) -> torch.Tensor:
    """Bending energy: mean over interior voxels (and batch, channels) of
    ``Σ_i (∂²u/∂x_i²)² + 2 Σ_{i<j} (∂²u/∂x_i∂x_j)²``.

    Second differences are centred (``u(x+e) - 2u(x) + u(x-e)`` and the four-point mixed
    stencil ``/4``), evaluated only where the stencil fits (one voxel in from every
    border), so affine fields give exactly 0 and quadratic fields their exact second
    derivatives.

    Args:
        disp: ``(B, ndim, *spatial)`` displacement in voxels, every spatial size >= 3.
        spacing: optional voxel size in mm per axis; as in :func:`diffusion`, derivatives
            are then physical (field in mm, positions in mm; units 1/mm).

    Returns:
        Scalar penalty (lower is smoother).
    """
    nd, sp, scale = _physical_scales(disp, spacing)
    if min(disp.shape[2:]) < 3:
        raise ValueError(f"bending_energy needs every spatial size >= 3, got {tuple(disp.shape[2:])}")
    u = disp if scale is None else disp * scale
    centre = _interior(u, [0] * nd)
    energy = torch.zeros_like(centre)
    for i in range(nd):
        e_i = [0] * nd
        e_i[i] = 1
        d2 = _interior(u, e_i) - 2 * centre + _interior(u, [-v for v in e_i])
        energy = energy + (d2 / (sp[i] * sp[i])).square()
        for j in range(i + 1, nd):
            def at(si: int, sj: int) -> torch.Tensor:
                off = [0] * nd
                off[i], off[j] = si, sj
                return _interior(u, off)

            dij = (at(1, 1) - at(1, -1) - at(-1, 1) + at(-1, -1)) / (4.0 * sp[i] * sp[j])
            energy = energy + 2.0 * dij.square()
    return energy.mean()


class BendingEnergy(nn.Module):
    """Regulariser ``bending_energy(disp, spacing)``. See :func:`bending_energy`."""

    def __init__(self, spacing: Sequence[float] | None = None) -> None:
        super().__init__()
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)

    def forward(self, disp: torch.Tensor) -> torch.Tensor:
        return bending_energy(disp, self.spacing)
