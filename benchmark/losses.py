"""Similarity losses and regularisers, 2D and 3D.

All losses take ``(B, C, *spatial)`` tensors and return a scalar to *minimise* (so a
similarity is returned negated). Displacements follow :mod:`benchmark.spatial`:
``(B, ndim, *spatial)`` in voxels.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["box_sum", "local_ncc", "LocalNCC"]


def box_sum(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """Sum over a centred box window at every voxel, zero outside the image.

    Separable: one 1D convolution with a ones-kernel per axis, so the cost is
    ``O(sum(window))`` per voxel instead of ``O(prod(window))``.

    Args:
        x: ``(B, C, *spatial)``.
        window: odd window size per spatial axis (voxels).

    Returns:
        ``(B, C, *spatial)``.
    """
    nd = x.dim() - 2
    conv = F.conv3d if nd == 3 else F.conv2d
    b, c = x.shape[:2]
    out = x.reshape(b * c, 1, *x.shape[2:])
    for axis, w in enumerate(window):
        if w <= 1:
            continue
        shape = [1, 1] + [1] * nd
        shape[2 + axis] = w
        padding = [0] * nd
        padding[axis] = w // 2
        out = conv(out, torch.ones(shape, device=x.device, dtype=x.dtype), padding=tuple(padding))
    return out.reshape(b, c, *x.shape[2:])


def local_ncc(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    window: int | Sequence[int] = 9,
    eps: float = 1e-5,
    reduction: str = "mean",
) -> torch.Tensor:
    """Local (windowed) squared normalised cross-correlation, as in VoxelMorph / ANTs CC.

    ``cc(x) = cov(x)^2 / (var_f(x) var_w(x) + eps)`` over a box window around ``x`` (zero
    padding at the border). Constant patches give ``0 / eps = 0``, never NaN.

    Args:
        fixed, warped: ``(B, 1, *spatial)``.
        window: window size in voxels (odd), scalar or one per axis.
        reduction: ``"mean"`` gives the scalar mean CC; ``"none"`` the ``(B, 1, *spatial)`` map.

    Returns:
        Mean local CC in ``[0, 1]`` (a similarity: higher is better) or the map.
    """
    nd = fixed.dim() - 2
    win = [int(window)] * nd if isinstance(window, (int, float)) else [int(w) for w in window]
    if any(w % 2 == 0 for w in win):
        raise ValueError(f"NCC window must be odd, got {win}")
    n = float(torch.tensor(win).prod())
    f, m = fixed, warped
    stacked = torch.cat([f, m, f * f, m * m, f * m], dim=1)
    sums = box_sum(stacked, win)
    f_sum, m_sum, ff_sum, mm_sum, fm_sum = sums.unbind(1)
    f_mean = f_sum / n
    m_mean = m_sum / n
    cross = fm_sum - m_mean * f_sum
    f_var = (ff_sum - f_mean * f_sum).clamp_min(0)
    m_var = (mm_sum - m_mean * m_sum).clamp_min(0)
    cc = (cross * cross / (f_var * m_var + eps)).unsqueeze(1)
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
