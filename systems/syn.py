"""ANTs-style symmetric greedy diffeomorphic registration (SyN) as a pure-torch optimiser.

:class:`GreedySyN` registers a moving image to a fixed image that share one voxel grid and
returns dense displacements in the suite's convention (:mod:`benchmark.core.spatial`):
``(B, ndim, *spatial)`` in voxels of the fixed grid, pull, ``warped(x) = moving(x + u(x))``.
It has no Lightning in it; a ``LightningModule`` wraps :meth:`GreedySyN.register`.

Warping, composition, resizing and smoothing come from :mod:`benchmark.core.spatial`, the local
cross-correlation from :mod:`benchmark.core.losses` (its box sums, with the analytic gradient
written out here so no autograd graph is needed; it matches ``autograd`` of
:func:`benchmark.core.losses.local_ncc`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Sequence

import torch

from benchmark.core._omp import warn_if_spinning
from benchmark.core.losses import box_sum
from benchmark.core.memory import kept_freed_memory
from benchmark.core.metrics import displacement_jacobian
from benchmark.core.spatial import compose, gaussian_smooth, resize_field, resize_image, spacing_from_affine, warp
from systems.base import RegistrationSystem

__all__ = ["SyN", "GreedySyN", "SYN_PRESETS", "local_ncc_and_grad", "invert_displacement", "log_jacobian_penalty"]


#: What the presets share: Adam steps of at most 0.25 mm (× shrink), 1 mm force smoothing, exact CC gradient.
_PRESET_BASE: dict[str, Any] = dict(lr=0.25, optimizer="adam", smooth_grad_sigma=1.0, cc_gradient="exact")

SYN_PRESETS: dict[str, dict[str, Any]] = {
    # Tuned on the OASIS pair (moving image_A, fixed image_B, 160x192x144 at 1 mm). Figures
    # and the command that measures them: see the class docstring.
    "accurate": dict(_PRESET_BASE, scales=(4, 2, 1), iterations=(100, 50, 15), cc_window=7, smooth_warp_sigma=0.6,
                     jacobian_weight=0.6),
    # No volume penalty: it would cost ~10 % more time, for SDlogJ 0.21 instead of 0.40 at Dice
    # 0.829 instead of 0.832 (jacobian_weight=0.8).
    "fast": dict(_PRESET_BASE, scales=(4, 2, 1), iterations=(60, 10, 2), cc_window=7, smooth_warp_sigma=0.6,
                 jacobian_weight=0.0),
    # Closer to volume-preserving (SDlogJ 0.15 on the pair) for a little Dice.
    "regular": dict(_PRESET_BASE, scales=(4, 2, 1), iterations=(100, 50, 15), cc_window=7, smooth_warp_sigma=0.7,
                    jacobian_weight=2.0),
}


def _odd_window(window: int | Sequence[int], nd: int) -> list[int]:
    win = [int(window)] * nd if isinstance(window, (int, float)) else [int(w) for w in window]
    if len(win) != nd or any(w < 1 or w % 2 == 0 for w in win):
        raise ValueError(f"cc_window must be odd and positive, one per axis or a scalar; got {window}")
    return win


#: Windows up to this size (voxels, per axis) are summed directly; larger ones by running sums.
_DIRECT_BOX_MAX = 15


def _box_sum_direct(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """:func:`benchmark.core.losses.box_sum` in ``x``'s dtype, summing small windows directly.

    Per axis, the ``w - 1`` neighbours within the window are added in place (those outside
    the image count as zero). For SyN's windows this is faster on CPU than running sums
    (window 7, five 160×192×144 maps in float64: 0.54 s against 0.78 s, 2 threads), and in
    float32 it is as accurate as the inputs allow (no running sums of ~1e4 that swamp small
    values). Windows above :data:`_DIRECT_BOX_MAX` go to ``box_sum`` (running sums in float64).

    Args:
        x: ``(B, C, *spatial)``.
        window: odd window per spatial axis.

    Returns:
        ``(B, C, *spatial)``, ``x``'s dtype.
    """
    if max(window) > _DIRECT_BOX_MAX:
        return box_sum(x, window)
    out = x
    for axis, w in enumerate(window):
        if w <= 1:
            continue
        dim, n = 2 + axis, out.shape[2 + axis]
        acc = out.clone()
        for k in range(1, min(w // 2, n - 1) + 1):  # neighbours k before and after (zeros outside)
            acc.narrow(dim, k, n - k).add_(out.narrow(dim, 0, n - k))
            acc.narrow(dim, 0, n - k).add_(out.narrow(dim, k, n - k))
        out = acc
    return out


def local_ncc_and_grad(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    window: int | Sequence[int] = 7,
    eps: float = 1e-5,
    exact: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean local squared NCC and its gradient with respect to both images, without autograd.

    The similarity is exactly :func:`benchmark.core.losses.local_ncc` (box window, zero padding,
    ``cc = cov² / (var_f var_m + eps)``, mean over voxels and batch). With ``exact=True`` the
    gradients are the exact derivatives of that mean (the box sum is self-adjoint, so the
    chain rule is five more box sums); with ``exact=False`` they are ANTs' local
    approximation, which keeps only the window centred on each voxel:
    ``2 cov / (var_f var_m) (f̄ - cov / var_m · m̄)`` (no second pass of box sums).

    Args:
        fixed, moving: ``(B, 1, *spatial)`` images.
        window: odd window size in voxels, scalar or one per axis.
        eps: the denominator's stabiliser, as in ``local_ncc``.
        exact: exact gradient (default) or ANTs' local approximation (scaled to the same
            ``1 / numel`` normalisation).

    Returns:
        ``(cc, d cc / d fixed, d cc / d moving)``: scalar mean CC (higher is better) and two
        ``(B, 1, *spatial)`` gradients of it.
    """
    nd = fixed.dim() - 2
    win = _odd_window(window, nd)
    n = float(math.prod(win))
    f, m = fixed, moving
    # The moments' box sums in float32 lose small local variances (running sums of ~1e4 in
    # box_sum, and even direct 343-voxel sums of ~200 against variances of ~1e-3): on the OASIS
    # pair the float32 gradient was 5-30 % off (relative L2) against float64. These sums and
    # the centred moments are therefore taken in float64, the rest in the input's precision.
    dt = f.dtype
    acc = torch.float64 if dt in (torch.float32, torch.float16, torch.bfloat16) else dt

    sums = _box_sum_direct(torch.cat([f, m, f * f, m * m, f * m], dim=1).to(acc), win)
    s_f, s_m, s_ff, s_mm, s_fm = sums.split(1, dim=1)
    cross = (s_fm - s_m * s_f / n).to(dt)
    var_f = (s_ff - s_f * s_f / n).clamp_min(0).to(dt)
    var_m = (s_mm - s_m * s_m / n).clamp_min(0).to(dt)
    s_f, s_m = s_f.to(dt), s_m.to(dt)
    den = var_f * var_m + eps
    cc_map = cross * cross / den
    numel = float(cc_map.numel())
    cc = cc_map.mean()
    if exact:
        # d cc / d (S_fm, S_ff, S_mm, S_f, S_m) at every window centre, then adjoint box sum.
        a = 2.0 * cross / den
        cc_over_den = cc_map / den
        b_f = -cc_over_den * var_m  # d cc / d S_ff
        b_m = -cc_over_den * var_f  # d cc / d S_mm
        g_f = -(a * s_m + 2.0 * b_f * s_f) / n  # d cc / d S_f
        g_m = -(a * s_f + 2.0 * b_m * s_m) / n  # d cc / d S_m
        # The adjoint sums need no float64: summed directly, their float32 rounding is that of
        # the inputs (OASIS pair, 80³ crop: gradient 2.8e-5 off float64 either way).
        back = _box_sum_direct(torch.cat([a, b_f, b_m, g_f, g_m], dim=1), win) / numel
        ba, bbf, bbm, bgf, bgm = back.split(1, dim=1)
        grad_f = bgf + 2.0 * f * bbf + m * ba
        grad_m = bgm + 2.0 * m * bbm + f * ba
    else:
        fbar = f - s_f / n
        mbar = m - s_m / n
        a = 2.0 * cross / den
        grad_m = a * (fbar - cross / (var_m + eps) * mbar) / numel
        grad_f = a * (mbar - cross / (var_f + eps) * fbar) / numel
    return cc, grad_f, grad_m


def _central_gradient(x: torch.Tensor) -> torch.Tensor:
    """Central differences of ``(B, 1, *spatial)`` along every axis → ``(B, ndim, *spatial)``.

    One-sided differences at the borders; units: intensity per voxel.
    """
    nd = x.dim() - 2
    dims = tuple(range(2, 2 + nd))
    grads = torch.gradient(x[:, 0], dim=tuple(d - 1 for d in dims))
    return torch.stack(grads, dim=1)


def _solve_small(a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Solve ``A x = r`` per voxel for ``ndim`` 2 or 3 by the adjugate (no batched LAPACK).

    Args:
        a: ``(B, ndim * ndim, *spatial)`` row-major matrices.
        r: ``(B, ndim, *spatial)``.

    Returns:
        ``(B, ndim, *spatial)``; where ``|det A|`` is tiny the determinant is clamped away
        from zero (keeping its sign), which damps the step there.
    """
    nd = r.shape[1]
    if nd == 2:
        a00, a01, a10, a11 = a.unbind(1)
        det = a00 * a11 - a01 * a10
        det = torch.where(det >= 0, det.clamp_min(1e-3), det.clamp_max(-1e-3))
        r0, r1 = r.unbind(1)
        return torch.stack([(a11 * r0 - a01 * r1) / det, (a00 * r1 - a10 * r0) / det], dim=1)
    a00, a01, a02, a10, a11, a12, a20, a21, a22 = a.unbind(1)
    c00 = a11 * a22 - a12 * a21
    c01 = a02 * a21 - a01 * a22
    c02 = a01 * a12 - a02 * a11
    c10 = a12 * a20 - a10 * a22
    c11 = a00 * a22 - a02 * a20
    c12 = a02 * a10 - a00 * a12
    c20 = a10 * a21 - a11 * a20
    c21 = a01 * a20 - a00 * a21
    c22 = a00 * a11 - a01 * a10
    det = a00 * c00 + a01 * c10 + a02 * c20
    det = torch.where(det >= 0, det.clamp_min(1e-3), det.clamp_max(-1e-3))
    r0, r1, r2 = r.unbind(1)
    return torch.stack(
        [
            (c00 * r0 + c01 * r1 + c02 * r2) / det,
            (c10 * r0 + c11 * r1 + c12 * r2) / det,
            (c20 * r0 + c21 * r1 + c22 * r2) / det,
        ],
        dim=1,
    )


def _add_difference_adjoint(out: torch.Tensor, h: torch.Tensor, dim: int) -> None:
    """``out += Dᵀ h``: the adjoint (transpose) of the metrics' finite difference along ``dim``.

    The forward operator ``D`` is :func:`benchmark.core.metrics.displacement_jacobian`'s
    ``(x[k+1] - x[k-1]) / 2`` inside and ``x[1] - x[0]``, ``x[n-1] - x[n-2]`` at the two ends
    (voxel units), so that ``<D x, h> = <x, Dᵀ h>``. In place on ``out`` (same shape as ``h``).
    """
    n = h.shape[dim]
    if n < 2:
        return
    if n > 2:  # rows 1..n-2: +1/2 at k+1, -1/2 at k-1
        inner = h.narrow(dim, 1, n - 2)
        out.narrow(dim, 2, n - 2).add_(inner, alpha=0.5)
        out.narrow(dim, 0, n - 2).add_(inner, alpha=-0.5)
    first, last = h.narrow(dim, 0, 1), h.narrow(dim, n - 1, 1)
    out.narrow(dim, 1, 1).add_(first)
    out.narrow(dim, 0, 1).sub_(first)
    out.narrow(dim, n - 1, 1).add_(last)
    out.narrow(dim, n - 2, 1).sub_(last)


def _cofactor(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x y - z w`` with one allocation."""
    return torch.mul(x, y).addcmul_(z, w, value=-1.0)


def log_jacobian_penalty(disp: torch.Tensor, min_det: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squared log Jacobian determinant of a batch of fields and its exact gradient in ``u``.

    ``P = 1 / (B N) · Σ_b Σ_x (log det(I + ∇u_b(x)))²`` with the metrics' finite differences
    (:func:`benchmark.core.metrics.displacement_jacobian`), N voxels per field. It is zero for
    any volume-preserving map and grows with local expansion and compression alike
    (a volume ratio of 2 or 1/2 costs the same). ``∂P/∂J_ij = 2 log det · C_ij / det``
    (``C`` the cofactor matrix), pulled back through the finite differences by their adjoint.
    Where ``det < min_det`` the log is clamped there and contributes no gradient (a folded
    voxel adds ``log(min_det)²`` to ``P`` but is not pushed to unfold).

    Args:
        disp: ``(B, ndim, *spatial)`` displacements in voxels, ndim 2 or 3.
        min_det: the determinant's lower clamp.

    Returns:
        ``(P, ∂P/∂u)``: a scalar and a ``(B, ndim, *spatial)`` tensor (per voxel of displacement).
    """
    b, nd = disp.shape[:2]
    if nd not in (2, 3) or disp.dim() != nd + 2:
        raise ValueError(f"expected a 2D or 3D field (B, ndim, *spatial), got {tuple(disp.shape)}")
    numel = float(b * math.prod(disp.shape[2:]))
    a = displacement_jacobian(disp).unbind(1)  # a[i * nd + j] = δ_ij + ∂u_i/∂x_j, views of one tensor
    if nd == 2:
        cof = [a[3].clone(), -a[2], -a[1], a[0].clone()]
        det = _cofactor(a[0], a[3], a[1], a[2])
    else:
        a00, a01, a02, a10, a11, a12, a20, a21, a22 = a
        cof = [
            _cofactor(a11, a22, a12, a21), _cofactor(a12, a20, a10, a22), _cofactor(a10, a21, a11, a20),
            _cofactor(a02, a21, a01, a22), _cofactor(a00, a22, a02, a20), _cofactor(a01, a20, a00, a21),
            _cofactor(a01, a12, a02, a11), _cofactor(a02, a10, a00, a12), _cofactor(a00, a11, a01, a10),
        ]
        det = torch.mul(a00, cof[0]).addcmul_(a01, cof[1]).addcmul_(a02, cof[2])
        del a00, a01, a02, a10, a11, a12, a20, a21, a22
    del a  # the Jacobian is no longer needed: cofactors and det are fresh tensors
    ok = det > min_det
    det.clamp_(min=min_det)
    logdet = det.log()
    penalty = logdet.square().sum() / numel
    weight = logdet.div_(det).mul_(2.0 / numel).masked_fill_(~ok, 0.0)  # ∂P/∂J_ij = weight · C_ij
    del det, ok
    grad = torch.zeros_like(disp)
    for i in range(nd):
        gi = grad[:, i]
        for j in range(nd):  # each cofactor is used once: scale it in place
            _add_difference_adjoint(gi, cof[i * nd + j].mul_(weight), j + 1)
    return penalty, grad


def invert_displacement(
    disp: torch.Tensor,
    iterations: int = 5,
    init: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of a displacement by Newton's method on ``v + u(x + v) = 0``.

    The map ``x ↦ x + v(x)`` undoes ``x ↦ x + u(x)`` (``compose(u, v) ≈ 0``). Each step
    solves ``(I + ∇u(x + v)) Δ = v + u(x + v)`` per voxel and sets ``v ← v - Δ`` (the
    Jacobian ``I + ∇u`` by central differences, sampled at ``x + v``). Unlike the plain
    fixed point ``v ← -u(x + v)`` (which only converges where ``|∇u| < 1`` and stalls
    where a field stretches more than 2×), Newton converges wherever the map is locally
    invertible; on a registered brain half (det J in 0.15…4) five steps from ``-u`` give
    a residual below 0.01 voxel, and one or two suffice from a warm start.

    Args:
        disp: ``(B, ndim, *spatial)`` in voxels.
        iterations: Newton steps.
        init: ``(B, ndim, *spatial)`` starting guess (default ``-disp``).

    Returns:
        ``(B, ndim, *spatial)`` in voxels, same grid.
    """
    nd = disp.shape[1]
    v = -disp if init is None else init
    jac = displacement_jacobian(disp)  # I + ∇u, the metrics' finite differences
    both = torch.cat([disp, jac], dim=1)
    for _ in range(iterations):
        sampled = warp(both, v, mode="bilinear", padding_mode="border")
        resid = v + sampled[:, :nd]
        v = v - _solve_small(sampled[:, nd:], resid)
    return v


class GreedySyN:
    r"""Symmetric greedy diffeomorphic registration with local CC (ANTs' SyN, greedy variant).

    Model. Two transforms meet in a midpoint space sampled on the fixed grid: ``φ_m(x) =
    x + u_m(x)`` maps the midpoint into the moving image and ``φ_f(x) = x + u_f(x)`` into the
    fixed image. Every iteration warps both (level-smoothed) images to the midpoint,
    ``J_m = M∘φ_m`` and ``J_f = F∘φ_f``, takes the local CC between them and its exact
    gradient with respect to each warped image (:func:`local_ncc_and_grad`), and turns it
    into the force for a compositive update at the midpoint, ``dCC/dJ · ∇J``. Both halves
    are updated by composition, ``φ ← φ ∘ (id ± δ)`` (:func:`benchmark.core.spatial.compose`),
    then the fields are Gaussian-smoothed.

    Midpoint (``antisymmetric=True``, default). The pair takes one update: ``+δ`` for the
    moving half and ``-δ`` for the fixed half, driven by the difference of the two forces.
    A deformation applied to both images alike leaves the midpoint CC unchanged, so with
    free halves (``antisymmetric=False``) Adam's normalisation lets the halves drift
    together (in the 40³ test each half grew to ~1.4× the whole displacement, and on the
    OASIS pair to 4–9 mm of common drift, with folds after composition); the antisymmetric
    update keeps each half at about half of the
    total, which is what "meeting at the midpoint" means.

    Invertibility. Each update is at most ``lr`` mm and the fields are smoothed, so both
    halves stay diffeomorphic (no folds in the tests or on the real pair). Their inverses
    are computed by Newton's method (:func:`invert_displacement`) at the end of every
    level, warm-started from the previous level's. The outputs are
    ``φ_m ∘ φ_f⁻¹`` (``disp``: fixed → moving, the pull displacement) and ``φ_f ∘ φ_m⁻¹``
    (``inverse``, on the moving grid).

    Multi-resolution. Levels with shrink factors ``scales`` (e.g. 4, 2, 1): images are
    min-max normalised, smoothed with a Gaussian (``image_sigmas`` in mm; default
    0.5·shrink voxels, none at full resolution) and resampled to ``round(n / f)`` voxels per
    axis (``align_corners`` geometry); the halves (and their inverses) are upsampled
    between levels with :func:`benchmark.core.spatial.resize_field`. If the last factor is above
    1 (the "fast" preset), the outputs are composed at that level and upsampled.

    World units. ``smooth_grad_sigma``, ``smooth_warp_sigma`` and the step ``lr`` are in mm
    at full resolution and scale with the shrink factor at coarser levels (for 1-mm images
    they are ANTs' / FireANTs' "voxels of the current level"). The force is converted to
    mm before the step and each axis is smoothed with its own voxel sigma
    ``sigma / spacing_d``, so one physical problem gives one physical answer at any
    spacing (tested at 1 mm and (1, 1, 2) mm). The CC window is in voxels of each level,
    as in ANTs (radius) and FireANTs (kernel size). Smoothing uses
    :func:`benchmark.core.spatial.gaussian_smooth` (a sampled Gaussian): its sigma 0.6–0.7 is
    about FireANTs' 0.25 with an erf-integrated kernel, which smooths more at small sigma.

    Optimiser (``optimizer``):

    * ``"adam"`` (default; FireANTs' choice): Adam moments of the smoothed force (reset at
      each level), the Adam direction scaled so its longest vector is ``lr`` mm.
    * ``"gd"`` (ANTs' choice): the smoothed force scaled so its longest vector is ``lr`` mm
      (ANTs' normalised gradient step); it converged more slowly in our tests.

    CC gradient (``cc_gradient``): ``"exact"`` derivative of the mean local CC (default), or
    ``"local"``, ANTs' centred-window approximation (half the box sums).

    Volume penalty (``jacobian_weight`` w; 0 turns it off). The pair minimises
    ``-CC + w · P``, ``P`` the mean over both halves and all voxels of ``(log det(I + ∇u))²``
    (:func:`log_jacobian_penalty`): zero for volume-preserving maps, and expansion and
    compression by the same factor cost alike. Its gradient in ``u`` joins the CC force
    (a first-order stand-in for the compositive update's) before the force smoothing and
    Adam. Gaussian field smoothing alone trades Dice for regularity along one curve on the
    OASIS pair (0.84 at SDlogJ 0.41, 0.80 at 0.26); the penalty moves off it: with w = 0.6 and
    a little less field smoothing (0.6 mm) ``accurate`` gains Dice and nearly halves SDlogJ
    (table below). Measured limits (docs/methods.md): it biases maps towards preserving
    volume, so where the true map changes volume it moves away from it (built-in anatomy,
    true SDlogJ 0.15: w 0.8 raised TRE by 0.07 mm, p 0.002; ``quickstart.yaml`` sets 0), and
    with too little field smoothing for its weight the composed map folds voxels (w 0.8 at
    warp 0.5 mm: 19). Cost: one Jacobian and its adjoint per iteration, ~0.2 s at
    160×192×144 (2 threads), ~10 % of the run.

    Presets (:data:`SYN_PRESETS`, :meth:`preset`, :meth:`accurate`, :meth:`fast`), tuned on
    the real OASIS pair (moving image_A, fixed image_B, 160×192×144 at 1 mm, Dice over
    tissue labels 1 and 2, initial 0.640). Reproduce with
    ``regbench perf systems --only syn --threads 2 --peer-python <fireants venv>`` (or
    :func:`benchmark.perf.systems.perf_syn`), which runs FireANTs 1.5 ``GreedyRegistration``
    side by side: at the brief's setting (scales 4,2,1, iterations 200,100,50, CC 7, Adam lr
    0.25, smooth_grad_sigma 1, smooth_warp_sigma 0.25), at its published OASIS setting
    (250,200,100, Adam β1 0.1) and at the brief's with glibc keeping freed memory, as
    :meth:`register` does (:mod:`benchmark.core.memory`). One such run (2 threads, idle 2-core
    CPU; wall s, CPU s in brackets; no folded voxel in any row; B→A, which the presets were not
    tuned on, after the slash):

    ============================  ==================================  ===============  =============  ==============
    run                           levels / iterations / warp / w      Dice             SDlogJ         time
    ============================  ==================================  ===============  =============  ==============
    ``fast``                      4,2,1 / 60,10,2 / 0.6 mm / 0        0.832 / 0.825    0.40 / 0.37    8.7 s (13.1)
    ``regular``                   4,2,1 / 100,50,15 / 0.7 mm / 2      0.833 / 0.829    0.15 / 0.14    37.6 s (64.7)
    ``accurate``                  4,2,1 / 100,50,15 / 0.6 mm / 0.6    0.847 / 0.839    0.23 / 0.22    38.5 s (67.1)
    FireANTs, brief               4,2,1 / 200,100,50                  0.821            0.45           292 s (486)
    FireANTs, published           4,2,1 / 250,200,100                 0.815            0.38           564 s (953)
    FireANTs, brief, kept         as brief                            0.821            0.45           134 s (220)
    ============================  ==================================  ===============  =============  ==============

    Time ratios (wall): ``fast`` 0.030× FireANTs' brief run, 0.015× its published one,
    0.065× the brief run with freed memory kept; ``accurate`` 0.132×, 0.068×, 0.288×. The
    allocator setting halves both tools' time here, so at equal allocator the ratios are
    about twice those against FireANTs as users run it. ANTs' SyNOnly (cached): 0.793 at
    SDlogJ 0.28.

    Without the volume penalty (w = 0, warp 0.7 mm, the previous ``accurate``) the pair gave
    Dice 0.842 at SDlogJ 0.41, and every other knob tried (CC window, force and field
    smoothing, Adam's epsilon, ANTs' local CC gradient, image smoothing, the iteration split)
    moved along one curve, about 0.84 at 0.40, 0.82 at 0.32, 0.80 at 0.26
    (``scripts/syn_frontier.py``, docs/methods.md).

    Args:
        scales: shrink factor per level, coarse to fine.
        iterations: iterations per level (0 skips a level's optimisation).
        cc_window: odd CC window in voxels of each level (scalar or per axis).
        lr: largest update per iteration, mm at full resolution (× shrink factor).
        optimizer: ``"adam"`` or ``"gd"``.
        smooth_grad_sigma: Gaussian sigma of the update (force) smoothing, mm (× shrink).
        smooth_warp_sigma: Gaussian sigma of the field smoothing after each update,
            mm (× shrink); 0 turns it off.
        image_sigmas: image smoothing per level in mm, or ``None`` for 0.5·shrink voxels.
        cc_gradient: ``"exact"`` or ``"local"``.
        betas: Adam's moment decay rates.
        adam_eps: Adam's denominator stabiliser.
        inverse_iterations: Newton iterations per level for the halves' inverses, warm-started
            from the previous level (3 more at the first level).
        min_level_size: smallest size of an axis at a coarse level.
        cc_eps: the CC denominator's stabiliser.
        antisymmetric: one update for the pair (``+δ`` / ``-δ``) instead of free halves.
        jacobian_weight: weight of the volume penalty (mean squared log Jacobian
            determinant of the halves) against the mean local CC; 0 turns it off.
    """

    def __init__(
        self,
        scales: Sequence[int] = (4, 2, 1),
        iterations: Sequence[int] = (100, 50, 15),
        cc_window: int | Sequence[int] = 7,
        lr: float = 0.25,
        optimizer: str = "adam",
        smooth_grad_sigma: float = 1.0,
        smooth_warp_sigma: float = 0.7,
        image_sigmas: Sequence[float] | None = None,
        cc_gradient: str = "exact",
        betas: tuple[float, float] = (0.9, 0.99),
        adam_eps: float = 1e-8,
        inverse_iterations: int = 2,
        min_level_size: int = 8,
        cc_eps: float = 1e-5,
        antisymmetric: bool = True,
        jacobian_weight: float = 0.0,
    ) -> None:
        self.scales = tuple(int(s) for s in scales)
        self.iterations = tuple(int(i) for i in iterations)
        if len(self.scales) != len(self.iterations) or not self.scales:
            raise ValueError(f"scales {scales} and iterations {iterations} must have the same, non-zero length")
        if any(s < 1 for s in self.scales) or any(i < 0 for i in self.iterations):
            raise ValueError("scales must be >= 1 and iterations >= 0")
        if optimizer not in ("adam", "gd"):
            raise ValueError(f"optimizer must be 'adam' or 'gd', got {optimizer!r}")
        if cc_gradient not in ("exact", "local"):
            raise ValueError(f"cc_gradient must be 'exact' or 'local', got {cc_gradient!r}")
        if image_sigmas is not None and len(image_sigmas) != len(self.scales):
            raise ValueError("image_sigmas needs one value per level")
        if lr <= 0 or smooth_grad_sigma < 0 or smooth_warp_sigma < 0:
            raise ValueError("lr must be > 0 and the smoothing sigmas >= 0")
        if not (math.isfinite(jacobian_weight) and jacobian_weight >= 0):
            raise ValueError(f"jacobian_weight must be a finite number >= 0, got {jacobian_weight}")
        wins = [cc_window] if isinstance(cc_window, (int, float)) else list(cc_window)
        if not wins or any(int(w) != w or w < 1 or int(w) % 2 == 0 for w in wins):
            raise ValueError(f"cc_window must be odd and positive (voxels), got {cc_window}")
        self.cc_window = cc_window
        self.lr = float(lr)
        self.optimizer = optimizer
        self.smooth_grad_sigma = float(smooth_grad_sigma)
        self.smooth_warp_sigma = float(smooth_warp_sigma)
        self.image_sigmas = None if image_sigmas is None else tuple(float(s) for s in image_sigmas)
        self.cc_gradient = cc_gradient
        self.betas = (float(betas[0]), float(betas[1]))
        self.adam_eps = float(adam_eps)
        self.inverse_iterations = int(inverse_iterations)
        self.min_level_size = int(min_level_size)
        self.cc_eps = float(cc_eps)
        self.antisymmetric = bool(antisymmetric)
        self.jacobian_weight = float(jacobian_weight)
        self.history: list[dict[str, float]] = []

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "GreedySyN":
        """Build from :data:`SYN_PRESETS` (``"accurate"``, ``"fast"``, ``"regular"``), with overrides."""
        if name not in SYN_PRESETS:
            raise ValueError(f"unknown SyN preset {name!r}; choose one of {sorted(SYN_PRESETS)}")
        scales = SYN_PRESETS[name]["scales"]
        its = overrides.get("iterations")
        if its is not None and overrides.get("scales") is None and len(its) != len(scales):
            raise ValueError(f"preset {name!r} has {len(scales)} levels (scales {list(scales)}) but iterations "
                             f"{list(its)} has {len(its)} values: give one per level, or scales as well")
        return cls(**{**SYN_PRESETS[name], **overrides})

    @classmethod
    def accurate(cls, **overrides: Any) -> "GreedySyN":
        """The ``"accurate"`` preset (levels 4, 2, 1)."""
        return cls.preset("accurate", **overrides)

    @classmethod
    def fast(cls, **overrides: Any) -> "GreedySyN":
        """The ``"fast"`` preset (levels 4, 2, 1; two iterations at full resolution)."""
        return cls.preset("fast", **overrides)

    def hparams(self) -> dict[str, Any]:
        """The constructor arguments, for logging."""
        return dict(
            scales=self.scales,
            iterations=self.iterations,
            cc_window=self.cc_window,
            lr=self.lr,
            optimizer=self.optimizer,
            smooth_grad_sigma=self.smooth_grad_sigma,
            smooth_warp_sigma=self.smooth_warp_sigma,
            image_sigmas=self.image_sigmas,
            cc_gradient=self.cc_gradient,
            betas=self.betas,
            adam_eps=self.adam_eps,
            inverse_iterations=self.inverse_iterations,
            min_level_size=self.min_level_size,
            cc_eps=self.cc_eps,
            antisymmetric=self.antisymmetric,
            jacobian_weight=self.jacobian_weight,
        )

    # ------------------------------------------------------------------ helpers
    def _level_size(self, shape: Sequence[int], factor: int) -> list[int]:
        return [n if factor == 1 else max(int(round(n / factor)), min(n, self.min_level_size)) for n in shape]

    @staticmethod
    def _normalise(x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        lo = flat.min(dim=1).values.view(-1, *([1] * (x.dim() - 1)))
        hi = flat.max(dim=1).values.view(-1, *([1] * (x.dim() - 1)))
        return (x - lo) / (hi - lo).clamp_min(1e-12)

    def _pyramid(
        self, images: torch.Tensor, shape: Sequence[int], spacing: Sequence[float]
    ) -> dict[int, torch.Tensor]:
        """Smoothed, resampled images of every level, ``{level: (2B, 1, *size)}``.

        Level ``l`` is the full image smoothed with ``image_sigmas[l]`` mm (default 0.5·shrink
        voxels per axis, none at full resolution) and resampled to the level's size. Built
        fine to coarse: each level smooths the next finer one with the remaining sigma
        (Gaussians compose by adding variances), so only the finest coarse level pays for
        a full-resolution blur.
        """
        nd = len(shape)
        order = sorted(range(len(self.scales)), key=lambda lv: self.scales[lv])
        prev, prev_size, prev_sig = images, list(shape), [0.0] * nd  # sigmas in full-res voxels
        out: dict[int, torch.Tensor] = {}
        for lv in order:
            size = self._level_size(shape, self.scales[lv])
            if self.image_sigmas is not None:
                target = [self.image_sigmas[lv] / sp for sp in spacing]
            elif size == list(shape):
                target = [0.0] * nd
            else:
                target = [0.5 * (n - 1) / max(sz - 1, 1) for n, sz in zip(shape, size)]
            # Remaining smoothing, in voxels of the finer level it is applied on.
            inc = [
                math.sqrt(max(t * t - p * p, 0.0)) * (ps - 1) / max(n - 1, 1)
                for t, p, ps, n in zip(target, prev_sig, prev_size, shape)
            ]
            img = gaussian_smooth(prev, inc) if any(x > 0 for x in inc) else prev
            if size != prev_size:
                img = resize_image(img, size)
            out[lv] = img
            prev, prev_size, prev_sig = img, size, [max(t, p) for t, p in zip(target, prev_sig)]
        return out

    # ------------------------------------------------------------------ main call
    def register(
        self,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        progress: bool = False,
        with_inverse: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Register ``moving`` to ``fixed`` (same grid).

        Runs without autograd (works under ``torch.no_grad`` / ``inference_mode``), on the
        inputs' device, in float32.

        Args:
            moving, fixed: ``(B, 1, *spatial)`` images on one grid (2D or 3D).
            spacing: voxel size in mm per array axis (``ndim`` values).
            progress: show a tqdm bar per level.
            with_inverse: also return ``inverse``. Without it only the fixed half is inverted
                (at every level, for the warm start): about a third less time with a
                full-resolution level; ``disp`` is the same.

        Returns:
            dict with

            * ``disp``: ``(B, ndim, *spatial)`` voxels of the fixed grid, pull, moving →
              fixed: ``warp(moving, disp) ≈ fixed``.
            * ``inverse`` (with ``with_inverse``): ``(B, ndim, *spatial)`` voxels of the
              moving grid, the inverse: ``warp(fixed, inverse) ≈ moving``.
            * ``mid_moving``, ``mid_fixed``: the two halves ``u_m``, ``u_f`` (midpoint →
              moving, midpoint → fixed), ``(B, ndim, *spatial)`` voxels.
        """
        if moving.dim() not in (4, 5) or fixed.dim() != moving.dim():
            raise ValueError(f"expected (B, 1, *spatial) images, got {tuple(moving.shape)} and {tuple(fixed.shape)}")
        if moving.shape != fixed.shape:
            raise ValueError(
                f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} must share one grid; "
                "resample the moving image onto the fixed grid (e.g. through the affines) first"
            )
        if moving.shape[1] != 1:
            raise ValueError(f"expected single-channel images, got {moving.shape[1]} channels")
        nd = moving.dim() - 2
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != nd or any(s <= 0 for s in spacing):
            raise ValueError(f"spacing must be {nd} positive values, got {spacing}")
        if moving.device.type == "cpu":  # torch loaded before the suite: OpenMP may spin (benchmark.core._omp)
            warn_if_spinning(torch.get_num_threads())
        # full-volume temporaries every iteration: keep freed memory for reuse instead of
        # faulting fresh pages in (benchmark.core.memory; 62 -> 33 s for `accurate` on the pair)
        with torch.inference_mode(False), torch.no_grad(), kept_freed_memory():
            return self._register(
                self._normalise(moving.detach().float().clone()),
                self._normalise(fixed.detach().float().clone()),
                spacing,
                progress,
                with_inverse,
            )

    def _register(
        self, moving: torch.Tensor, fixed: torch.Tensor, spacing: tuple[float, ...], progress: bool,
        with_inverse: bool = True,
    ) -> dict[str, torch.Tensor]:
        b = moving.shape[0]
        nd = moving.dim() - 2
        shape = list(moving.shape[2:])
        dev = moving.device
        win = _odd_window(self.cc_window, nd)
        self.history = []
        images = torch.cat([moving, fixed], dim=0)  # (2B, 1, *S): halves stacked on the batch
        pyramid = self._pyramid(images, shape, spacing)
        u: torch.Tensor | None = None  # (2B, nd, *size): [u_m; u_f]
        inv: torch.Tensor | None = None
        size = shape
        for level, (factor, iters) in enumerate(zip(self.scales, self.iterations)):
            size = self._level_size(shape, factor)
            lsp = [sp * (n - 1) / max(s - 1, 1) for sp, n, s in zip(spacing, shape, size)]
            shrink = float(factor)
            imgs = pyramid[level]
            if u is None:
                u = torch.zeros(2 * b, nd, *size, device=dev, dtype=torch.float32)
            else:
                u = resize_field(u, size)
                inv = None if inv is None else resize_field(inv, size)
            sp_t = torch.tensor(lsp, device=dev, dtype=torch.float32).view(1, nd, *([1] * nd))
            grad_sig = [self.smooth_grad_sigma * shrink / s for s in lsp]
            warp_sig = [self.smooth_warp_sigma * shrink / s for s in lsp]
            step = self.lr * shrink  # mm
            n_state = b if self.antisymmetric else 2 * b
            m1 = u.new_zeros(n_state, *u.shape[1:]) if self.optimizer == "adam" else None
            m2 = u.new_zeros(n_state, *u.shape[1:]) if self.optimizer == "adam" else None
            bar = range(iters)
            if progress and iters > 0:
                from tqdm.auto import tqdm

                bar = tqdm(bar, desc=f"SyN level {level + 1}/{len(self.scales)} (x{factor})", leave=False)
            last_cc: torch.Tensor | None = None
            for it in bar:
                warped = warp(imgs, u, mode="bilinear", padding_mode="border")
                jm, jf = warped[:b], warped[b:]
                cc, g_f, g_m = local_ncc_and_grad(jf, jm, win, self.cc_eps, exact=self.cc_gradient == "exact")
                # Force = d(-CC)/dδ for a compositive update δ of each half at the midpoint,
                # per mm: -dCC/dJ · ∇J / spacing.
                grads = _central_gradient(warped) / sp_t
                if self.antisymmetric:
                    # One force for the pair: moving half along +δ, fixed half along -δ.
                    force = grads[b:] * g_f - grads[:b] * g_m
                else:
                    force = -torch.cat([g_m, g_f], dim=0) * grads
                if self.jacobian_weight > 0:
                    # + w · ∂P/∂u of the halves' mean squared log-Jacobian (voxels -> per mm): the
                    # additive gradient, a first-order stand-in for the compositive update's
                    pen = log_jacobian_penalty(u)[1] / sp_t
                    pen = pen[:b] - pen[b:] if self.antisymmetric else pen
                    force.add_(pen, alpha=self.jacobian_weight)
                if self.antisymmetric:
                    force.mul_(0.5)
                if self.smooth_grad_sigma > 0:
                    force = gaussian_smooth(force, grad_sig)
                if self.optimizer == "adam":
                    b1, b2 = self.betas
                    m1.mul_(b1).add_(force, alpha=1 - b1)
                    m2.mul_(b2).addcmul_(force, force, value=1 - b2)
                    c1 = 1 - b1 ** (it + 1)
                    c2 = 1 - b2 ** (it + 1)
                    direction = (m1 / c1) / ((m2 / c2).sqrt_() + self.adam_eps)
                else:
                    direction = force
                norm = direction.square().sum(1, keepdim=True).sqrt_().flatten(1).amax(1)
                scale = step / norm.clamp_min(1e-12)
                delta = direction * (-scale.view(-1, *([1] * (nd + 1)))) / sp_t  # voxels
                if self.antisymmetric:
                    delta = torch.cat([delta, -delta], dim=0)
                u = compose(u, delta)
                if self.smooth_warp_sigma > 0:
                    u = gaussian_smooth(u, warp_sig)
                last_cc = cc  # a tensor: no device sync per iteration unless a bar shows it
                if progress and iters > 0:
                    bar.set_postfix(cc=f"{float(cc):.4f}")
            cc_val = float(last_cc) if last_cc is not None else float("nan")
            self.history.append(dict(level=level, factor=factor, iterations=iters, cc=cc_val))
            # Inverses of both halves, warm-started from the previous level's.
            # (only u_f's when the caller does not want the inverse: disp needs u_f⁻¹ alone)
            inv = invert_displacement(u if with_inverse else u[b:],
                                      self.inverse_iterations + (3 if inv is None else 0), init=inv)
        u_m, u_f = u[:b], u[b:]
        inv_f = inv[b:] if with_inverse else inv
        out = dict(disp=compose(u_m, inv_f), mid_moving=u_m, mid_fixed=u_f)
        if with_inverse:
            out["inverse"] = compose(u_f, inv[:b])
        if list(size) != shape:
            # Last level above full resolution: compose there, upsample the smooth results.
            out = {k: resize_field(t, shape) for k, t in out.items()}
        return out


class SyN(RegistrationSystem):
    """ANTs-style SyN baseline as a suite system: :class:`GreedySyN` behind the system interface.

    Iterative: nothing to train (``learns = False``); each test case is optimised inside
    :meth:`register` (gradients are not needed: the CC gradient is analytic). The world
    spacing comes from the fixed image's affine.

    Args:
        preset: ``"accurate"``, ``"fast"`` or ``"regular"`` (:data:`SYN_PRESETS`); the other arguments,
            when given, override the preset's value.
        scales, iterations, cc_window, lr, optimizer, smooth_grad_sigma, smooth_warp_sigma,
            jacobian_weight: see :class:`GreedySyN`.
        progress: a tqdm bar per resolution level during registration.
    """

    learns: ClassVar[bool] = False
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "smooth_grad_sigma": {"type": "float", "low": 0.5, "high": 3.0},
        "smooth_warp_sigma": {"type": "float", "low": 0.0, "high": 1.5},
        "lr": {"type": "float", "low": 0.05, "high": 0.5, "log": True},
        "jacobian_weight": {"type": "float", "low": 0.0, "high": 3.0},
    }

    def __init__(
        self,
        preset: str = "accurate",
        scales: Sequence[int] | None = None,
        iterations: Sequence[int] | None = None,
        cc_window: int | None = None,
        lr: float | None = None,
        optimizer: str | None = None,
        smooth_grad_sigma: float | None = None,
        smooth_warp_sigma: float | None = None,
        jacobian_weight: float | None = None,
        progress: bool = True,
        compute_hd95: bool = True,
        compute_ndv: bool = True,
    ) -> None:
        super().__init__(warmup_calls=0, compute_hd95=compute_hd95, compute_ndv=compute_ndv)
        self.save_hyperparameters()
        overrides = dict(scales=scales, iterations=iterations, cc_window=cc_window, lr=lr, optimizer=optimizer,
                         smooth_grad_sigma=smooth_grad_sigma, smooth_warp_sigma=smooth_warp_sigma,
                         jacobian_weight=jacobian_weight)
        self.engine = GreedySyN.preset(preset, **{k: v for k, v in overrides.items() if v is not None})
        self.progress = bool(progress)

    def configure_optimizers(self):
        return None

    def register(self, batch: dict[str, Any]) -> torch.Tensor:
        affines = batch["fixed_affine"]
        spacing = spacing_from_affine(affines[0])
        for a in affines[1:]:
            if not torch.allclose(a.double(), affines[0].double(), atol=1e-4):
                raise ValueError("SyN registers a batch on one spacing; use batch_size 1 for mixed grids")
        return self.engine.register(batch["moving"], batch["fixed"], spacing=spacing, progress=self.progress,
                                    with_inverse=False)["disp"]
