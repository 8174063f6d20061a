"""DiffOp-net (arXiv 2404.04244 v1): a differential operator on the velocity, a ¼ → ½ → full
cascade of U-Nets with Cross-Coordinate Attention, trained with the Sobolev gradient.

Written for this suite from the method notes (``docs/methods.md``); choices the public material
leaves open are parameters and are stated here.

Operator (:class:`DiffOperator`)
    ``L = γ·Id − α·Δ`` with the 7-point Laplacian and **periodic boundaries**, so that its
    Fourier symbol at frequency ``k`` is::

        L̂(k) = γ + Σ_d 2·c_d · (1 − cos(2π k_d / N_d))

    (real, even, ``≥ γ > 0``), ``c_d = α/h_d²`` on a grid of spacing ``h_d`` mm (physical
    units, what the systems use) or ``c_d = α·N_d²`` on the paper's unit cube. ``K = (L†L)⁻¹``
    has the symbol ``L̂⁻²`` and is applied per component with a real FFT.
    ``‖Lv‖² = Σ_x |Lv(x)|²`` (Parseval: ``Σ_k |L̂ v̂|² / Π N_d``).

Per-level constants in physical units (issue 16): level ``k`` (¼, ½, full) uses
``L_k = γ·(Id − ℓ_k²·Δ)`` with ``ℓ_k = smoothing_mm[k]`` in mm and ``Δ`` in mm⁻² on the
level's own grid (its spacing: the image spacing times ``(S−1)/(N−1)``), so ``K`` smooths
over the same millimetres at every image size, spacing and level: its per-axis standard
deviation is ``2ℓ_k`` mm whatever the grid and ``γ`` (tested at 32³/1 mm, 64³/0.5 mm, a ½
level and an anisotropic grid). The paper's unit-cube ``alpha``
smooths over a fixed *fraction of the field of view* instead (twice the mm on twice the
field of view), and one ``alpha`` meant different things at 32³ and 160³ (the old
quickstart scaled it by 25×). The authors' constants, ``alpha = (0.005, 0.001, 0.001)`` on a
~160 mm brain with ``γ = 1``, are ``ℓ = √α · 160 mm = (11.3, 5.1, 5.1)`` mm
(:data:`AUTHORS_SMOOTHING_MM`, the default). ``smoothing_mm=None`` restores the unit cube.

Energy per level, with the velocity in mm (``v_mm = h·v``, ``v`` in voxels of the level
grid; unit-cube mode: ``h = 1``)::

    E(v) = ½‖L v_mm‖² + λ · D(v),    D(v) = −Σ_x cc(x)   (local squared CC, window ``ncc_window``³,
                                                          warped moving ∘ exp(v) against fixed)

Training signal (``training="sobolev"``, the authors'): the gradient that reaches each
level's velocity is the Sobolev gradient of ``E``, the L² gradient preconditioned by ``K``:
``v_mm + K ⋆ (λ·∂D/∂v_mm)``, in level voxels ``v + K ⋆ (λ·F) / h²`` with ``F = ∂D/∂v`` the
similarity force. It is injected by :class:`SobolevGradient`, a custom autograd function; no
gradient flows between levels. ``training="autograd"`` instead back-propagates the same
energy written as a loss, ``D + (1/(2λ))·‖L v_mm‖²`` (so ``lambda_`` means the same in both
modes). Both are divided by the level's voxel count (Adam does not care about the scale).
Since ``D`` sums over level voxels and the force is per level voxel, ``λ`` acting on ``v_mm``
weighs a coarse level's similarity by ``1/h²`` against the full level's: without it one ``λ``
pushed the ¼ level 16× harder per mm than the full level (measured: direct optimisation at
λ = 30 on the blob phantom then fell from Dice 0.44 to 0.13 through the ¼ level alone).

Force (``force=``):

* ``"level"``: images Gaussian-smoothed (σ = half the downsampling factor) and
  resampled to the level grid; ``F = ∂D/∂W · ∇W`` there (``∂D/∂W``: derivative of ``D`` with
  respect to the warped moving image ``W``, ``∇W`` its central-difference gradient;
  demons/LDDMM style, ``∂u/∂v ≈ Id``), :func:`local_cc_force`.
* ``"full"`` (the authors', the default): the exact gradient, with respect to the level's velocity, of the
  full-resolution similarity of the moving image warped by the upsampled level field
  (through scaling and squaring, the upsampling and the warp; :func:`full_resolution_force`,
  scaled by ``|level| / |full|`` voxels so ``λ`` keeps its meaning); the local-CC window is
  then the full level's at every level.

Comparison, and the default: :class:`DiffOpEnergy` (30 steps per level, ``ℓ = (12, 6, 3)`` mm,
λ = 100, window 3) on 3 test pairs of the built-in anatomy at 4 mm (40×48×48), one thread on
a shared 2-core CPU (load ~24), both options timed back to back per pair in one process
(the rows of ``regbench run benchmark/configs/diffop_cascade.yaml --methods diffop_energy``
with ``--set methods.diffop_energy.init_args.force=level`` or ``full`` give the same
comparison with ``runtime_s`` per case)::

    force    Dice    EPE (brain, mm)    s / pair
    level    0.724   4.18               69.7
    full     0.759   2.72               133.5     (initial: Dice ≈ 0.56)

The full-resolution force is better on every pair (+0.034 Dice, −1.5 mm EPE) for about 1.9×
the time, so the downsampled force is *not* as accurate, and ``force="full"`` is the default
(``"level"`` stays as the cheaper option and an ablation). On the 6 test pairs of
``diffop_cascade.yaml`` at 4 mm (runner rows ``diffop_energy`` / ``diffop_energy-one_level``,
initial Dice 0.557, brain EPE 6.92 mm): full force, 3 levels 0.755 / 2.58 mm, full level
alone 0.702 / 5.18 mm; level force, 3 levels 0.713 / 4.62 mm, full level alone 0.679 /
5.30 mm (the cascade wins on all 6 pairs with either force). Caveat: with the full force each
level's similarity is the full-resolution local CC (the full level's window), so a coarse
level no longer sees a wide window on a smoothed image; a 4-voxel shift of a smooth
32×16×16 blob is recovered by the cascade with ``force="level"`` (error 0.31 voxel) but not
with ``"full"`` and a 3-voxel window (3.97 voxels). Widen ``ncc_window`` (its full-level
entry) for shifts beyond a few voxels of the full grid.

``λ`` and the window: the authors use ``λ = 1/σ``, ``σ = 1e-6``, with their own normalisation
of the force; here ``D`` is a plain sum of local CC values (each in ``[0, 1]``). On the
built-in anatomy at 4 mm, direct optimisation of ``E`` with ``ℓ = (12, 6, 3)`` mm and window
3 at every level (12 mm, the closest odd window to the authors' 9 mm) reaches, on 6 test pairs
(initial Dice 0.581, mean EPE 9.33 mm over the whole grid): λ = 100: Dice 0.734 (EPE 8.00) with
the three levels, 0.699 (8.65) with the full level alone; λ = 300: 0.723 (7.93).

Networks (:class:`CascadeUNet`), three with no weight sharing, input ``cat(moving, fixed)``:
encoder conv k3 + LeakyReLU(0.2) ``2→c`` (full), ``c→2c`` stride 2, then three stride-2
convs at ``2c`` (down to 1/16); decoder steps: ConvTranspose3d k2 s2 + LeakyReLU to the
skip's width, the skip through :class:`CrossCoordinateAttention`, concatenation, conv
``2·C_skip → C_skip`` + LeakyReLU (open in the notes: this merge conv is the choice made
here); then conv ``C → c`` + LeakyReLU and an output conv ``c → 3`` (small init). Net 1
stops at ¼, net 2 at ½, net 3 at full resolution. The networks run on the image resampled
to the nearest multiple of 16 per axis (rounded up; no resampling when it divides); each
level's field is brought back with :func:`benchmark.core.spatial.resize_field`.

Cascade: ``v1 = net1(I, J)``, ``I1 = I ∘ φ1``, ``v2 = net2(I1, J)``, ``I2 = I1 ∘ φ2``,
``v3 = net3(I2, J)`` with ``φk = exp(vk)`` by **scaling and squaring** (``int_steps``, 7;
the authors' 2-step midpoint scheme is replaced by it). At test the three displacements are
composed into one, ``u = (u1 ∘ u2) ∘ u3`` in :func:`benchmark.core.spatial.compose`'s notation
(``u3`` applied first), and ``warp(I, u)`` equals the sequential warps up to interpolation.

Ablation switches (issue 14), each an init argument: ``cca`` (Cross-Coordinate Attention on
the skips or plain skips), ``levels`` (3: the cascade; 1: the full-resolution network alone),
``training`` (``"sobolev"`` or ``"autograd"``), ``force`` (``"level"`` or ``"full"``).
:class:`DiffOpEnergy` minimises the same energy per pair without a network (``learns =
False``): the upper reference row and a test oracle.

Sweep (``search_space``): ``gamma`` and ``lambda_`` (log) and the per-level lengths
``smoothing_mm.0/.1/.2`` (log, mm; :mod:`sweeps.space` gathers indexed names into the list).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmark.core.losses import local_ncc
from benchmark.core.spatial import (compose, gaussian_smooth, integrate_velocity, resize_field, resize_image,
                               spacing_from_affine, warp)
from systems.base import RegistrationSystem
from systems.speed import Conv3x3

__all__ = [
    "operator_symbol",
    "DiffOperator",
    "local_cc_force",
    "full_resolution_force",
    "SobolevGradient",
    "CrossCoordinateAttention",
    "CascadeUNet",
    "DiffOpNet",
    "DiffOpEnergy",
    "AUTHORS_SMOOTHING_MM",
]

_LEAKY = 0.2
LEVEL_SCALES: tuple[int, int, int] = (4, 2, 1)


# --------------------------------------------------------------------------------------
# the operator


def operator_symbol(
    shape: Sequence[int],
    alpha: float,
    gamma: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
    half: bool = True,
    spacing: Sequence[float] | None = None,
) -> torch.Tensor:
    """Fourier symbol of ``L = γ·Id − α·Δ`` (7-point Laplacian, periodic).

    ``L̂(k) = γ + Σ_d 2·c_d·(1 − cos(2π k_d / N_d))`` with ``c_d = α·N_d²`` on the unit cube
    (``spacing=None``: ``α`` in unit-cube units) or ``c_d = α / h_d²`` on a grid of spacing
    ``h_d`` mm (``α`` in mm²).

    Args:
        shape: spatial grid ``(N_0, ..., N_{n-1})``.
        half: the last axis holds ``N_{n-1}//2 + 1`` frequencies (the ``rfftn`` layout);
            ``False`` gives the full ``fftn`` grid.
        spacing: grid spacing per axis in mm (physical units), or ``None`` (unit cube).

    Returns:
        Real tensor of shape ``shape`` (last axis halved when ``half``).
    """
    shape = [int(n) for n in shape]
    if spacing is not None:
        spacing = [float(h) for h in spacing]
        if len(spacing) != len(shape) or any(h <= 0 for h in spacing):
            raise ValueError(f"spacing {spacing} needs one positive value per axis of {shape}")
    sym = torch.full([1] * len(shape), float(gamma), device=device, dtype=dtype)
    for d, n in enumerate(shape):
        m = n // 2 + 1 if (half and d == len(shape) - 1) else n
        k = torch.arange(m, device=device, dtype=dtype)
        coef = alpha * n * n if spacing is None else alpha / spacing[d] ** 2
        term = 2.0 * coef * (1.0 - torch.cos(2.0 * math.pi * k / n))
        view = [1] * len(shape)
        view[d] = m
        sym = sym + term.view(view)
    return sym


class DiffOperator:
    """``L``, ``L†L`` and ``K = (L†L)⁻¹`` on one grid, applied by real FFT per component.

    Args:
        shape: spatial grid of the fields.
        alpha: Laplacian weight (unit-cube grid, or mm² with ``spacing``).
        gamma: identity weight.
        spacing: grid spacing in mm per axis (physical units) or ``None`` (unit cube).

    Fields are ``(B, C, *shape)``; every method returns the same shape and dtype.
    """

    def __init__(self, shape: Sequence[int], alpha: float, gamma: float = 1.0,
                 device: torch.device | str | None = None, spacing: Sequence[float] | None = None) -> None:
        self.shape = tuple(int(n) for n in shape)
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        self.spacing = None if spacing is None else tuple(float(h) for h in spacing)
        self.symbol = operator_symbol(self.shape, self.alpha, self.gamma, device=device, dtype=torch.float64,
                                      spacing=self.spacing)

    def _apply(self, x: torch.Tensor, power: int) -> torch.Tensor:
        dims = tuple(range(2, x.dim()))
        if tuple(x.shape[2:]) != self.shape:
            raise ValueError(f"field grid {tuple(x.shape[2:])} is not the operator's {self.shape}")
        sym = self.symbol.to(x.device) ** power
        spec = torch.fft.rfftn(x.to(torch.float64), dim=dims)
        return torch.fft.irfftn(spec * sym, s=self.shape, dim=dims).to(x.dtype)

    def L(self, v: torch.Tensor) -> torch.Tensor:
        """``L v``."""
        return self._apply(v, 1)

    def LtL(self, v: torch.Tensor) -> torch.Tensor:
        """``L†L v`` (``L`` is self-adjoint: symbol ``L̂²``)."""
        return self._apply(v, 2)

    def K(self, f: torch.Tensor) -> torch.Tensor:
        """``K ⋆ f = (L†L)⁻¹ f`` (symbol ``L̂⁻²``)."""
        return self._apply(f, -2)

    def norm2(self, v: torch.Tensor) -> torch.Tensor:
        """``‖Lv‖² = Σ_x |Lv(x)|²`` summed over batch and components (scalar, ``v``'s dtype)."""
        dims = tuple(range(2, v.dim()))
        spec = torch.fft.rfftn(v, dim=dims)
        sym = self.symbol.to(device=v.device, dtype=v.dtype)
        # rfft keeps half the last axis: interior frequencies count twice (Hermitian pairs).
        n_last = self.shape[-1]
        w = torch.full((n_last // 2 + 1,), 2.0, device=v.device, dtype=sym.dtype)
        w[0] = 1.0
        if n_last % 2 == 0:
            w[-1] = 1.0
        power = (spec.abs() ** 2) * (sym**2) * w
        return power.sum() / math.prod(self.shape)


# --------------------------------------------------------------------------------------
# similarity force and the Sobolev gradient


def local_cc_force(warped: torch.Tensor, fixed: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The local-CC force ``F = ∂D/∂W · ∇W`` and ``D = −Σ_x cc(x)``.

    Args:
        warped: ``(B, 1, *S)`` moving image warped by the current field (``W``).
        fixed: ``(B, 1, *S)``.
        window: local CC window (voxels, odd).

    Returns:
        ``(F (B, ndim, *S), D scalar)``; ``F`` in similarity units per voxel of displacement,
        channel ``d`` along array axis ``d``. Both detached.
    """
    with torch.enable_grad():
        w = warped.detach().requires_grad_(True)
        d = -local_ncc(fixed.detach(), w, window, reduction="none").sum()
        (dw,) = torch.autograd.grad(d, w)
    nd = warped.dim() - 2
    grads = torch.gradient(warped.detach()[:, 0], dim=tuple(range(1, nd + 1)))
    force = torch.stack([dw[:, 0] * g for g in grads], dim=1)
    return force, d.detach()


def full_resolution_force(
    v: torch.Tensor,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    window: int,
    int_steps: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The similarity force of a level computed at full resolution (the authors' way).

    ``D̃(v) = (|level| / |full|) · (−Σ_x cc(fixed, warp(moving, R(exp(v))))(x))`` where ``R`` is
    :func:`benchmark.core.spatial.resize_field` (level grid → full grid, magnitudes rescaled) and
    ``|·|`` counts voxels (the factor keeps ``D̃`` on the scale of a level-grid sum, so
    ``lambda_`` means the same for both force options). Returns ``(∂D̃/∂v, D̃)``: the exact
    gradient through scaling and squaring, the upsampling and the trilinear warp (no
    demons approximation).

    Args:
        v: ``(B, ndim, *N)`` level velocity (voxels of the level grid).
        moving, fixed: ``(B, 1, *S)`` full-resolution images (``moving``: as the level sees it,
            i.e. already warped by the previous levels).
        window: local CC window on the full grid (voxels, odd).
        int_steps: scaling-and-squaring steps.

    Returns:
        ``(force (B, ndim, *N), D̃ scalar)``, both detached.
    """
    full = fixed.shape[2:]
    ratio = math.prod(v.shape[2:]) / math.prod(full)
    with torch.enable_grad():
        vv = v.detach().requires_grad_(True)
        phi = integrate_velocity(vv, int_steps) if int_steps > 0 else vv
        u = resize_field(phi, full)
        d = -ratio * local_ncc(fixed.detach(), warp(moving.detach(), u), window, reduction="none").sum()
        (g,) = torch.autograd.grad(d, vv)
    return g, d.detach()


class SobolevGradient(torch.autograd.Function):
    """Identity on the energy value; injects the Sobolev gradient into ``v``.

    ``forward(v, force, dissim, op, lam, scale, unit=None)`` returns the scalar
    ``scale · (½‖L(h·v)‖² + λ·D)`` (for logging and divergence checks); ``backward`` hands
    ``v`` the gradient ``grad_out · scale · (v + K ⋆ (λ·F) / h²)`` (and nothing to the others),
    with ``h`` = ``unit`` per component (mm per voxel of the level grid; 1 without ``unit``).
    With ``unit`` the energy is that of the velocity in mm, ``v_mm = h·v``: its Sobolev gradient
    ``v_mm + K⋆(λ·∂D/∂v_mm)``, ``∂D/∂v_mm = F/h``, expressed in voxels (divided by ``h``).

    Args:
        v: ``(B, ndim, *S)`` velocity (the network's output, voxels of the level grid).
        force: ``(B, ndim, *S)`` ``F = ∂D/∂v`` per voxel of displacement (detached).
        dissim: scalar ``D``.
        op: the level's :class:`DiffOperator` (grid ``S``).
        lam: ``λ``.
        scale: normalisation (``1 / voxels``).
        unit: ``(ndim,)`` mm per level voxel, or ``None``.
    """

    @staticmethod
    def forward(ctx: Any, v: torch.Tensor, force: torch.Tensor, dissim: torch.Tensor, op: DiffOperator,
                lam: float, scale: float, unit: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        ctx.op = op
        ctx.lam = float(lam)
        ctx.scale = float(scale)
        ctx.unit = unit
        ctx.save_for_backward(v, force)
        vm = v.detach() if unit is None else v.detach() * _unit_view(unit, v)
        energy = 0.5 * op.norm2(vm) + ctx.lam * dissim.to(v.dtype)
        return (energy * ctx.scale).to(v.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        v, force = ctx.saved_tensors
        kf = ctx.op.K(ctx.lam * force)
        if ctx.unit is not None:
            kf = kf / _unit_view(ctx.unit, v) ** 2
        return grad_out * ctx.scale * (v + kf), None, None, None, None, None, None


def _unit_view(unit: torch.Tensor | Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """``unit (ndim,)`` as ``(1, ndim, 1, ..)`` in ``like``'s dtype and device."""
    u = torch.as_tensor(unit, dtype=like.dtype, device=like.device)
    return u.view(1, -1, *([1] * (like.dim() - 2)))


# --------------------------------------------------------------------------------------
# networks


class CrossCoordinateAttention(nn.Module):
    """Cross-Coordinate Attention on a skip feature.

    With ``p_D, p_H, p_W`` average pools that keep only axis D, H or W::

        a_D = σ(conv1(p_W(up) · p_H(up) · p_D(copy)))
        a_H = σ(conv2(p_W(up) · p_H(copy) · p_D(up)))
        a_W = σ(conv3(p_W(copy) · p_H(up) · p_D(up)))
        out = copy · a_D · a_H · a_W

    (broadcast outer products; 1×1×1 convs ``C → C``).

    Shapes: ``copy, up (B, C, D, H, W) → (B, C, D, H, W)``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(channels, channels, 1)
        self.conv2 = nn.Conv3d(channels, channels, 1)
        self.conv3 = nn.Conv3d(channels, channels, 1)

    @staticmethod
    def pools(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(p_D, p_H, p_W)``: means keeping axis D ``(B,C,D,1,1)``, H ``(B,C,1,H,1)``, W ``(B,C,1,1,W)``."""
        return x.mean(dim=(3, 4), keepdim=True), x.mean(dim=(2, 4), keepdim=True), x.mean(dim=(2, 3), keepdim=True)

    def products(self, copy: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three outer products before the convolutions, each ``(B, C, D, H, W)``."""
        cd, ch, cw = self.pools(copy)
        ud, uh, uw = self.pools(up)
        return uw * uh * cd, uw * ch * ud, cw * uh * ud

    def attention(self, copy: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(a_D, a_H, a_W)``, each ``(B, C, D, H, W)`` in ``(0, 1)``."""
        pd, ph, pw = self.products(copy, up)
        return torch.sigmoid(self.conv1(pd)), torch.sigmoid(self.conv2(ph)), torch.sigmoid(self.conv3(pw))

    def forward(self, copy: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if copy.shape != up.shape or copy.dim() != 5:
            raise ValueError(f"CCA needs two (B, C, D, H, W) tensors of one shape, got {tuple(copy.shape)}, {tuple(up.shape)}")
        a_d, a_h, a_w = self.attention(copy, up)
        return copy * a_d * a_h * a_w


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Conv3d:
    return Conv3x3(cin, cout, stride)  # nn.Conv3d(cin, cout, 3, stride, padding=1), small volumes on oneDNN


class CascadeUNet(nn.Module):
    """One level's U-Net: ``cat(moving, fixed) (B, 2, *M) → velocity (B, 3, *M/out_scale)``.

    Args:
        width: ``c`` (authors: 48).
        out_scale: 4, 2 or 1 — the resolution divisor of the output.
        cca: pass each skip feature through :class:`CrossCoordinateAttention` (the paper's);
            ``False`` concatenates the plain skip feature (ablation: no CCA parameters).

    ``M`` must be divisible by 16 (the encoder goes down to 1/16).
    """

    def __init__(self, width: int = 16, out_scale: int = 1, cca: bool = True) -> None:
        super().__init__()
        if out_scale not in (4, 2, 1):
            raise ValueError(f"out_scale must be 4, 2 or 1, got {out_scale}")
        c = int(width)
        self.out_scale = out_scale
        self.use_cca = bool(cca)
        self.enc = nn.ModuleList([_conv(2, c), _conv(c, 2 * c, 2), _conv(2 * c, 2 * c, 2), _conv(2 * c, 2 * c, 2),
                                  _conv(2 * c, 2 * c, 2)])
        skip_ch = [c, 2 * c, 2 * c, 2 * c]  # at 1, 1/2, 1/4, 1/8
        n_up = {4: 2, 2: 3, 1: 4}[out_scale]
        self.ups = nn.ModuleList()
        self.ccas = nn.ModuleList()
        self.merges = nn.ModuleList()
        cin = 2 * c
        for i in range(n_up):
            cs = skip_ch[3 - i]
            self.ups.append(nn.ConvTranspose3d(cin, cs, 2, stride=2))
            self.ccas.append(CrossCoordinateAttention(cs) if self.use_cca else nn.Identity())
            self.merges.append(_conv(2 * cs, cs))
            cin = cs
        self.head = _conv(cin, c)
        self.out = _conv(c, 3)
        # He initialisation for LeakyReLU(0.2): features of order 1 at every depth (with
        # PyTorch's default the last features are ~0.03 and the field grows very slowly).
        # (A k2 s2 transposed conv feeds each output voxel from one tap per input channel: fan-in
        # = input channels, not what PyTorch's fan computation assumes for transposed weights.)
        gain = math.sqrt(2.0 / (1.0 + _LEAKY**2))
        for m in self.modules():
            if isinstance(m, nn.ConvTranspose3d):
                nn.init.normal_(m.weight, 0.0, gain / math.sqrt(m.in_channels))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv3d) and m.kernel_size != (1, 1, 1):
                nn.init.kaiming_normal_(m.weight, a=_LEAKY, nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.out.weight, 0.0, 1e-5)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s % 16 for s in x.shape[2:]):
            raise ValueError(f"CascadeUNet needs spatial sizes divisible by 16, got {tuple(x.shape[2:])}")
        skips = []
        for conv in self.enc[:-1]:
            x = F.leaky_relu(conv(x), _LEAKY)
            skips.append(x)
        x = F.leaky_relu(self.enc[-1](x), _LEAKY)
        for up, cca, merge in zip(self.ups, self.ccas, self.merges):
            x = F.leaky_relu(up(x), _LEAKY)
            copy = skips.pop()
            skip = cca(copy, x) if self.use_cca else copy
            x = F.leaky_relu(merge(torch.cat([skip, x], dim=1)), _LEAKY)
        x = F.leaky_relu(self.head(x), _LEAKY)
        return self.out(x)


def _net_grid(shape: Sequence[int]) -> tuple[int, ...]:
    """The networks' grid: each axis rounded up to a multiple of 16."""
    return tuple(max(16, 16 * math.ceil(int(n) / 16)) for n in shape)


# --------------------------------------------------------------------------------------
# the energy shared by the network and the direct optimisation

#: The authors' per-level constants (``alpha = (0.005, 0.001, 0.001)`` on the unit cube of a
#: ~160 mm, 1 mm brain, ``γ = 1``) as smoothing lengths ``ℓ = √(α/γ) · 160 mm`` for ¼, ½, full.
AUTHORS_SMOOTHING_MM: tuple[float, float, float] = (11.3, 5.1, 5.1)
FORCES = ("level", "full")


def _per_level(value: Any, name: str, cast: type = float) -> list:
    """One value per level (¼, ½, full) from a scalar or three values."""
    if isinstance(value, (int, float)):
        return [cast(value)] * 3
    out = [cast(x) for x in value]
    if len(out) != 3:
        raise ValueError(f"{name} needs one value or three (¼, ½, full), got {list(value)}")
    return out


def _spacing_of(batch: dict[str, Any], ndim: int) -> tuple[float, ...]:
    """The fixed image's voxel size in mm (the batch's first affine)."""
    aff = batch.get("fixed_affine")
    if aff is None:
        raise ValueError("DiffOp needs batch['fixed_affine'] for the operator's physical units")
    a = aff[0] if aff.dim() == 3 else aff
    return spacing_from_affine(a)[:ndim]


class DiffOpEnergyTerms:
    """The per-level energy ``E_k(v) = ½‖L_k v‖² + λ·D_k(v)`` of DiffOp-net, shared by
    :class:`DiffOpNet` (which learns to minimise it) and :class:`DiffOpEnergy` (which
    minimises it per pair). A mixin: the host sets the attributes in :meth:`_init_energy`.

    Level ``k`` (``levels=3``: ¼, ½, full; ``levels=1``: full only) lives on the grid
    :meth:`level_grid` (the networks' grid, each axis rounded up to a multiple of 16, divided
    by the level's factor). Its spacing in mm is the image spacing times ``(S−1)/(N−1)`` per
    axis (``align_corners`` geometry).

    Operator constants in **physical units** (``smoothing_mm``, the default): level ``k``'s
    operator is ``L_k = γ·(Id − ℓ_k²·Δ)`` with ``Δ`` the Laplacian in mm⁻² on the level's grid
    (``α_k = γ·ℓ_k²`` mm², per-axis voxel weight ``α_k / h_d²``). ``K = (L†L)⁻¹`` is then a
    smoothing kernel of the same width in mm at every image size, spacing and level (its
    decay length is ``ℓ_k/√γ`` in mm); ``γ`` sets the operator's overall weight against
    ``λ``. With ``smoothing_mm=None`` the unit-cube ``alpha`` of the paper is used instead
    (``α N_d²`` per axis: the smoothing then scales with the field of view).
    """

    def _init_energy(self, alpha: Sequence[float], smoothing_mm: float | Sequence[float] | None, gamma: float,
                     lambda_: float, ncc_window: int | Sequence[int], int_steps: int, force: str,
                     levels: int) -> None:
        alpha = [float(a) for a in alpha]
        if len(alpha) != 3 or any(a < 0 for a in alpha):
            raise ValueError(f"alpha needs three non-negative values (¼, ½, full), got {alpha}")
        if gamma <= 0 or lambda_ <= 0:
            raise ValueError(f"gamma and lambda_ must be > 0, got gamma={gamma}, lambda_={lambda_}")
        wins = _per_level(ncc_window, "ncc_window", int)
        if any(w < 1 or w % 2 == 0 for w in wins):
            raise ValueError(f"ncc_window must be odd, one value or one per level, got {ncc_window}")
        smooth = None if smoothing_mm is None else _per_level(smoothing_mm, "smoothing_mm")
        if smooth is not None and any(x < 0 for x in smooth):
            raise ValueError(f"smoothing_mm must be >= 0 mm, got {smooth}")
        if force not in FORCES:
            raise ValueError(f"force must be one of {FORCES}, got {force!r}")
        if int(levels) not in (1, 3):
            raise ValueError(f"levels must be 1 (full resolution only) or 3 (¼ → ½ → full), got {levels}")
        self.alpha = alpha
        self.smoothing_mm = smooth
        self.gamma = float(gamma)
        self.ncc_windows = wins
        self.int_steps = int(int_steps)
        self.force = force
        self.n_levels = int(levels)
        #: indices into the per-level settings (0 = ¼, 1 = ½, 2 = full) of the levels that run
        self.level_ids: tuple[int, ...] = (0, 1, 2) if self.n_levels == 3 else (2,)
        self._ops: dict[tuple, DiffOperator] = {}

    # ---- grids and operators --------------------------------------------------------
    @staticmethod
    def level_grid(level: int, shape: Sequence[int]) -> tuple[int, ...]:
        """Level ``level``'s grid (0 = ¼, 1 = ½, 2 = full) for images of spatial ``shape``."""
        return tuple(n // LEVEL_SCALES[level] for n in _net_grid(shape))

    @staticmethod
    def level_spacing(grid: Sequence[int], shape: Sequence[int], spacing: Sequence[float]) -> tuple[float, ...]:
        """Spacing in mm of a level grid covering an image of ``shape`` voxels of ``spacing`` mm."""
        return tuple(float(h) * (s - 1) / max(n - 1, 1) for h, s, n in zip(spacing, shape, grid))

    def operator(self, level: int, grid: Sequence[int], spacing: Sequence[float],
                 device: torch.device) -> DiffOperator:
        """The (cached) operator of a level on its grid (``spacing``: the grid's, mm)."""
        key = (level, tuple(int(s) for s in grid), tuple(round(float(h), 9) for h in spacing), str(device))
        if key not in self._ops:
            if self.smoothing_mm is None:
                self._ops[key] = DiffOperator(grid, self.alpha[level], self.gamma, device=device)
            else:
                a = self.gamma * self.smoothing_mm[level] ** 2
                self._ops[key] = DiffOperator(grid, a, self.gamma, device=device, spacing=spacing)
        return self._ops[key]

    def unit(self, spacing: Sequence[float]) -> torch.Tensor | None:
        """mm per level voxel when the energy is in physical units (``smoothing_mm``), else ``None``."""
        return None if self.smoothing_mm is None else torch.tensor([float(h) for h in spacing], dtype=torch.float64)

    def window(self, level: int) -> int:
        """Local-CC window of a level: its own on its grid (``force="level"``), the full level's
        on the full grid (``force="full"``: every level's similarity is on the full grid)."""
        return self.ncc_windows[level] if self.force == "level" else self.ncc_windows[2]

    @staticmethod
    def _level_image(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """``image (B, 1, *S)`` on a level grid ``size``: Gaussian anti-aliasing (σ = half the
        downsampling factor, voxels of ``S``) then trilinear resampling."""
        factors = [s / max(n, 1) for s, n in zip(image.shape[2:], size)]
        if all(f <= 1.0 for f in factors):
            return resize_image(image, size)
        sig = [0.5 * f if f > 1.0 else 0.0 for f in factors]
        return resize_image(gaussian_smooth(image, sig), size)

    def level_force(self, level: int, v: torch.Tensor, moving: torch.Tensor,
                    fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(F, D)`` of a level at velocity ``v (B, 3, *N)`` for full-resolution images
        ``moving`` (already warped by the previous levels) and ``fixed`` ``(B, 1, *S)``.

        ``force="level"``: images smoothed and resampled to the level grid, demons force
        ``∂D/∂W · ∇W`` there (:func:`local_cc_force`). ``force="full"``: the exact gradient of
        the full-resolution similarity (:func:`full_resolution_force`).
        """
        n = v.shape[2:]
        if self.force == "full":
            return full_resolution_force(v, moving, fixed, self.window(level), self.int_steps)
        phi = integrate_velocity(v.detach(), self.int_steps) if self.int_steps > 0 else v.detach()
        fk = self._level_image(fixed, n)
        mk = self._level_image(moving.detach(), n)
        return local_cc_force(warp(mk, phi), fk, self.window(level))

    def level_dissim(self, level: int, v: torch.Tensor, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """``D`` (or ``D̃``) of a level as a differentiable function of ``v`` (autograd training)."""
        n = v.shape[2:]
        phi = integrate_velocity(v, self.int_steps) if self.int_steps > 0 else v
        if self.force == "full":
            ratio = math.prod(n) / math.prod(fixed.shape[2:])
            w = warp(moving.detach(), resize_field(phi, fixed.shape[2:]))
            return -ratio * local_ncc(fixed, w, self.window(level), reduction="none").sum()
        fk = self._level_image(fixed, n)
        mk = self._level_image(moving.detach(), n)
        return -local_ncc(fk, warp(mk, phi), self.window(level), reduction="none").sum()

    def level_displacement(self, v: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """``exp(v)`` brought to the full grid: ``(B, 3, *shape)`` voxels of the fixed grid."""
        phi = integrate_velocity(v, self.int_steps) if self.int_steps > 0 else v
        return resize_field(phi, shape)

    @staticmethod
    def compose_levels(disps: Sequence[torch.Tensor]) -> torch.Tensor:
        """One displacement equal to the sequential warps: ``((u1 ∘ u2) ∘ u3)``."""
        total = disps[0]
        for u in disps[1:]:
            total = compose(total, u)
        return total


# --------------------------------------------------------------------------------------
# the systems


class DiffOpNet(DiffOpEnergyTerms, RegistrationSystem):
    """DiffOp-net as a suite system (3D).

    Args:
        width: U-Net width ``c`` (authors: 48; CPU quickstart: 8).
        smoothing_mm: operator smoothing length ``ℓ_k`` per level (¼, ½, full) in mm, or one
            value; default the authors' constants in these units (11.3, 5.1, 5.1 mm). ``None``
            uses the unit-cube ``alpha``. See :class:`DiffOpEnergyTerms`.
        alpha: unit-cube Laplacian weight per level (used only with ``smoothing_mm=None``);
            authors ``(0.005, 0.001, 0.001)``.
        gamma: weight ``γ`` of the operator (authors: 1).
        lambda_: ``λ``, weight of the similarity (local-CC) energy against ``½‖Lv‖²``.
        training: ``"sobolev"`` (default: the Sobolev gradient ``v + K⋆(λF)`` per level) or
            ``"autograd"`` (the loss ``D + ‖Lv‖²/(2λ)`` back-propagated) — ablation switch.
        force: ``"full"`` (default, the authors': the exact gradient of the full-resolution
            similarity; better than ``"level"`` at ~2× the cost, figures above) or ``"level"``
            (each level's demons force on the level grid).
        levels: 3 (the ¼ → ½ → full cascade) or 1 (the full-resolution network alone; the
            per-level settings' full entry is used) — ablation switch.
        cca: Cross-Coordinate Attention on the skips (default) or plain skips — ablation switch.
        ncc_window: local CC window per level (int or three ints; authors 9).
        int_steps: scaling-and-squaring steps per level.
        lr: Adam learning rate (authors 1e-4).

    ``register`` returns the composed displacement ``(B, 3, *S)`` in voxels of the fixed grid.
    """

    learns: ClassVar[bool] = True
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "gamma": {"type": "float", "low": 0.1, "high": 10.0, "log": True},
        "lambda_": {"type": "float", "low": 1.0, "high": 300.0, "log": True},
        "smoothing_mm.0": {"type": "float", "low": 1.0, "high": 30.0, "log": True},
        "smoothing_mm.1": {"type": "float", "low": 0.5, "high": 15.0, "log": True},
        "smoothing_mm.2": {"type": "float", "low": 0.25, "high": 10.0, "log": True},
    }

    def __init__(
        self,
        width: int = 48,
        smoothing_mm: float | Sequence[float] | None = AUTHORS_SMOOTHING_MM,
        alpha: Sequence[float] = (0.005, 0.001, 0.001),
        gamma: float = 1.0,
        lambda_: float = 10.0,
        training: str = "sobolev",
        force: str = "full",
        levels: int = 3,
        cca: bool = True,
        ncc_window: int | Sequence[int] = 9,
        int_steps: int = 7,
        lr: float = 1e-4,
        warmup_calls: int | None = None,
        compute_hd95: bool = True,
        compute_ndv: bool = True,
        compile: bool | str = False,
    ) -> None:
        super().__init__(lambda_=lambda_, lr=lr, warmup_calls=warmup_calls, compute_hd95=compute_hd95, compute_ndv=compute_ndv,
                         compile=compile)
        self.save_hyperparameters()
        if training not in ("sobolev", "autograd"):
            raise ValueError(f"training must be 'sobolev' or 'autograd', got {training!r}")
        self._init_energy(alpha, smoothing_mm, gamma, lambda_, ncc_window, int_steps, force, levels)
        self.training_mode = training
        self.nets = nn.ModuleList([CascadeUNet(width, LEVEL_SCALES[k], cca=cca) for k in self.level_ids])

    # ---- the cascade ----------------------------------------------------------------
    def level_velocity(self, level: int, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """``v_k = net_k(cat(moving, fixed))``: ``(B, 3, *level_grid)``, voxels of that grid.
        ``level``: position in the cascade (0 .. levels−1)."""
        grid = _net_grid(fixed.shape[2:])
        x = torch.cat([moving, fixed], dim=1)
        if tuple(x.shape[2:]) != grid:
            x = resize_image(x, grid)
        return self.nets[level](x).float()  # fields and the FFT operator stay float32/64 (systems.speed)

    def cascade(self, moving: torch.Tensor, fixed: torch.Tensor, train: bool = False,
                spacing: Sequence[float] = (1.0, 1.0, 1.0)):
        """Run the levels.

        Args:
            moving, fixed: ``(B, 1, *S)``.
            train: also compute the per-level training energies.
            spacing: image voxel size in mm (the operator's physical units).

        Returns:
            ``(disps, energies, parts)``: the per-level displacements ``u_k (B, 3, *S)`` (voxels
            of the fixed grid; detached when ``train``), the per-level training energies when
            ``train`` (scalars carrying the Sobolev / autograd gradient to ``v_k``; else empty)
            and the per-level dissimilarities for logging (``dissim0..``, per voxel).
        """
        full = fixed.shape[2:]
        cur = moving
        disps, energies, parts = [], [], {}
        for pos, k in enumerate(self.level_ids):
            v = self.level_velocity(pos, cur.detach(), fixed)
            n = v.shape[2:]
            if train:
                h = self.level_spacing(n, full, spacing)
                op = self.operator(k, n, h, v.device)
                unit = self.unit(h)
                scale = 1.0 / (v.shape[0] * math.prod(n))
                if self.training_mode == "sobolev":
                    force, dissim = self.level_force(k, v, cur.detach(), fixed)
                    e = SobolevGradient.apply(v, force, dissim, op, self.lambda_, scale, unit)
                else:
                    dissim = self.level_dissim(k, v, cur.detach(), fixed)
                    vm = v if unit is None else v * _unit_view(unit, v)
                    e = scale * (dissim + op.norm2(vm) / (2.0 * self.lambda_))
                parts[f"dissim{pos}"] = dissim.detach() * scale
                energies.append(e)
            u = self.level_displacement(v.detach() if train else v, full)
            disps.append(u)
            cur = warp(cur, u)
        return disps, energies, parts

    def register(self, batch: dict[str, Any]) -> torch.Tensor:
        disps, _, _ = self.cascade(batch["moving"], batch["fixed"], train=False)
        return self.compose_levels(disps)

    def training_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        spacing = _spacing_of(batch, batch["fixed"].dim() - 2)
        _, energies, parts = self.cascade(batch["moving"], batch["fixed"], train=True, spacing=spacing)
        loss = torch.stack(energies).sum()
        return loss, parts


class DiffOpEnergy(DiffOpEnergyTerms, RegistrationSystem):
    """DiffOp-net's energy minimised directly per pair, without a network (``learns = False``).

    The upper reference row for :class:`DiffOpNet` and a test oracle: the same levels, grids,
    operator, force and ``λ``; per level, ``iterations`` steps of Sobolev gradient descent
    ``v ← v − step · (v + K⋆(λ·F(v)))`` from ``v = 0`` (the Sobolev gradient of
    ``E(v) = ½‖Lv‖² + λ·D(v)``, the signal the network's level receives in training), then
    the level's displacement warps the moving image for the next level, as in the cascade.

    Args (besides the energy's, see :class:`DiffOpNet`):
        iterations: descent steps per level.
        step: step length (1 is the fixed-point iteration ``v = −K⋆(λF(v))``).
        max_update: the longest change of ``v`` per step, in voxels of the level grid (the
            step is shortened when the Sobolev gradient would move further; stationary points
            are unchanged). Without it large ``λ`` makes the fixed-step iteration oscillate.
    """

    learns: ClassVar[bool] = False
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        k: v for k, v in DiffOpNet.search_space.items()
    }

    def __init__(
        self,
        smoothing_mm: float | Sequence[float] | None = AUTHORS_SMOOTHING_MM,
        alpha: Sequence[float] = (0.005, 0.001, 0.001),
        gamma: float = 1.0,
        lambda_: float = 10.0,
        force: str = "full",
        levels: int = 3,
        ncc_window: int | Sequence[int] = 9,
        int_steps: int = 7,
        iterations: int = 60,
        step: float = 0.5,
        max_update: float = 0.5,
        warmup_calls: int | None = None,
        compute_hd95: bool = True,
        compute_ndv: bool = True,
    ) -> None:
        super().__init__(lambda_=lambda_, warmup_calls=warmup_calls, compute_hd95=compute_hd95, compute_ndv=compute_ndv)
        self.save_hyperparameters()
        if int(iterations) < 1 or not 0 < float(step) <= 1:
            raise ValueError(f"iterations must be >= 1 and step in (0, 1], got {iterations}, {step}")
        self._init_energy(alpha, smoothing_mm, gamma, lambda_, ncc_window, int_steps, force, levels)
        if float(max_update) <= 0:
            raise ValueError(f"max_update must be > 0 voxels, got {max_update}")
        self.iterations = int(iterations)
        self.step = float(step)
        self.max_update = float(max_update)

    def optimise(self, moving: torch.Tensor, fixed: torch.Tensor, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                 history: list | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Minimise each level's energy in turn.

        Args:
            moving, fixed: ``(B, 1, *S)``.
            spacing: image voxel size in mm.
            history: when a list, each level appends its energies ``E_k`` (floats, per voxel)
                before every step and after the last.

        Returns:
            ``(velocities, disps)``: per level ``v_k (B, 3, *N_k)`` and ``u_k (B, 3, *S)``.
        """
        full = fixed.shape[2:]
        cur = moving.detach()
        fixed = fixed.detach()
        vs, disps = [], []
        with torch.no_grad():
            for k in self.level_ids:
                n = self.level_grid(k, full)
                h = self.level_spacing(n, full, spacing)
                op = self.operator(k, n, h, fixed.device)
                v = torch.zeros(fixed.shape[0], fixed.dim() - 2, *n, dtype=fixed.dtype, device=fixed.device)
                unit = self.unit(h)
                u2 = 1.0 if unit is None else _unit_view(unit, v) ** 2
                trace = []
                for it in range(self.iterations + 1):
                    force, dissim = self.level_force(k, v, cur, fixed)
                    if history is not None:
                        vm = v if unit is None else v * _unit_view(unit, v)
                        trace.append(float((0.5 * op.norm2(vm) + self.lambda_ * dissim) / (v.shape[0] * math.prod(n))))
                    if it == self.iterations:
                        break
                    delta = self.step * (v + op.K(self.lambda_ * force) / u2)
                    longest = float(delta.norm(dim=1).max())
                    if longest > self.max_update:  # safeguard: at most max_update level voxels per step
                        delta = delta * (self.max_update / longest)
                    v = v - delta
                if history is not None:
                    history.append(trace)
                u = self.level_displacement(v, full)
                vs.append(v)
                disps.append(u)
                cur = warp(cur, u)
        return vs, disps

    def register(self, batch: dict[str, Any]) -> torch.Tensor:
        spacing = _spacing_of(batch, batch["fixed"].dim() - 2)
        _, disps = self.optimise(batch["moving"], batch["fixed"], spacing)
        return self.compose_levels(disps)
