"""DiffOp-net (arXiv 2404.04244 v1): a differential operator on the velocity, a ¼ → ½ → full
cascade of U-Nets with Cross-Coordinate Attention, trained with the Sobolev gradient.

Written for this suite from the method notes (``METHODS.md``); choices the public material
leaves open are parameters and are stated here.

Operator (:class:`DiffOperator`)
    ``L = γ·Id − α·Δ`` on a grid of ``N_0 × N_1 × N_2`` voxels read as the unit cube
    (spacing ``1/N_d``), with the 7-point Laplacian and **periodic boundaries**, so that
    its Fourier symbol at frequency ``k`` is::

        L̂(k) = γ + Σ_d 2·α·N_d² · (1 − cos(2π k_d / N_d))

    (real, even, ``≥ γ > 0``). ``K = (L†L)⁻¹`` has the symbol ``L̂⁻²`` and is applied per
    component with a real FFT. ``‖Lv‖² = Σ_x |Lv(x)|²`` (Parseval: ``Σ_k |L̂ v̂|² / Π N_d``).

Energy per level (``v``: the level's velocity, voxels of the level grid)::

    E(v) = ½‖Lv‖² + λ · D(v),    D(v) = −Σ_x cc(x)   (local squared CC, window ``ncc_window``³,
                                                      warped moving ∘ exp(v) against fixed)

Training signal (``training="sobolev"``, the authors'): the gradient that reaches each
level's velocity is the Sobolev gradient of ``E``, i.e. the L² gradient preconditioned by
``K``: ``v + K ⋆ (λ·F)`` with ``F = ∂D/∂W · ∇W`` the local-CC force (``∂D/∂W``: derivative of
``D`` with respect to the warped moving image ``W``, ``∇W`` its central-difference gradient;
demons/LDDMM style, ``∂u/∂v ≈ Id``). It is injected by :class:`SobolevGradient`, a custom
autograd function; no gradient flows between levels. ``training="autograd"`` instead
back-propagates the same energy written as a loss, ``D + (1/(2λ))·‖Lv‖²`` (so ``lambda_``
means the same in both modes: the weight of the similarity against the operator norm). Both
are divided by the level's voxel count (the optimiser, Adam, does not care about the scale).

``λ``: the authors use ``λ = 1/σ``, ``σ = 1e-6``, with their own normalisation of the
force; here ``D`` is a plain sum of local CC values (each in ``[0, 1]``), the force is
``O(1)`` per voxel, and the default ``lambda_ = 10`` was set on the synthetic brain data
(direct Sobolev descent on ``E`` at 32³, quickstart ``alpha``, 6 test pairs: Dice
0.666 → 0.78 at λ = 20 with windows (3, 3, 3) and at λ = 10 with (3, 3, 5); with windows
(5, 7, 9) only 0.71 at λ = 10 and 0.72 at λ = 20). The ``γ²‖v‖²``
part of ``‖Lv‖²`` shrinks the field: a 1.5-voxel translation is recovered as ~0.5 voxel by
the full level alone at λ = 10 (window 9).

Networks (:class:`CascadeUNet`), three with no weight sharing, input ``cat(moving, fixed)``:
encoder conv k3 + LeakyReLU(0.2) ``2→c`` (full), ``c→2c`` stride 2, then three stride-2
convs at ``2c`` (down to 1/16); decoder steps: ConvTranspose3d k2 s2 + LeakyReLU to the
skip's width, the skip through :class:`CrossCoordinateAttention`, concatenation, conv
``2·C_skip → C_skip`` + LeakyReLU (open in the notes: this merge conv is the choice made
here); then conv ``C → c`` + LeakyReLU and an output conv ``c → 3`` (small init). Net 1
stops at ¼, net 2 at ½, net 3 at full resolution. The networks run on the image resampled
to the nearest multiple of 16 per axis (rounded up; no resampling when it divides); each
level's field is brought back with :func:`benchmark.spatial.resize_field`.

Each level's energy is evaluated on its own grid: fixed and (previously warped) moving image
Gaussian-smoothed (σ = half the downsampling factor, an anti-aliasing choice made here) and
resampled to the level grid.

Grid size: ``alpha`` is defined on the unit cube, so the same ``alpha`` smooths less per voxel
on a small grid; for small volumes scale it by ``(N_authors / N)²`` (the quickstart at 32³
uses ``(0.125, 0.025, 0.001)``, see ``benchmark/configs/diffop_quickstart.yaml``). The
local-CC window should shrink with the grid as well (the authors' 9 voxels at ~160³; the
quickstart uses 3 at every level): windows that cover a large part of a small volume bias the
similarity — at 32³ the ¼ level (8³) with window 5 moves landmarks away from their truth.

Cascade: ``v1 = net1(I, J)``, ``I1 = I ∘ φ1``, ``v2 = net2(I1, J)``, ``I2 = I1 ∘ φ2``,
``v3 = net3(I2, J)`` with ``φk = exp(vk)`` by **scaling and squaring** (``int_steps``, 7;
the authors' 2-step midpoint scheme is replaced by it). At test the three displacements are
composed into one, ``u = (u1 ∘ u2) ∘ u3`` in :func:`benchmark.spatial.compose`'s notation
(``u3`` applied first), and ``warp(I, u)`` equals the sequential warps up to interpolation.

Per-level constants (authors'): ``alpha = (0.005, 0.001, 0.001)`` for ¼, ½, full; ``gamma = 1``.
The sweep parameters are ``gamma`` (the operator's identity weight γ, shared by the levels,
log scale) and ``lambda_``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmark.losses import local_ncc
from benchmark.spatial import compose, gaussian_smooth, integrate_velocity, resize_field, resize_image, warp
from systems.base import RegistrationSystem

__all__ = [
    "operator_symbol",
    "DiffOperator",
    "local_cc_force",
    "SobolevGradient",
    "CrossCoordinateAttention",
    "CascadeUNet",
    "DiffOpNet",
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
) -> torch.Tensor:
    """Fourier symbol of ``L = γ·Id − α·Δ`` (7-point Laplacian, unit cube, periodic).

    ``L̂(k) = γ + Σ_d 2·α·N_d²·(1 − cos(2π k_d / N_d))``.

    Args:
        shape: spatial grid ``(N_0, ..., N_{n-1})``.
        half: the last axis holds ``N_{n-1}//2 + 1`` frequencies (the ``rfftn`` layout);
            ``False`` gives the full ``fftn`` grid.

    Returns:
        Real tensor of shape ``shape`` (last axis halved when ``half``).
    """
    shape = [int(n) for n in shape]
    sym = torch.full([1] * len(shape), float(gamma), device=device, dtype=dtype)
    for d, n in enumerate(shape):
        m = n // 2 + 1 if (half and d == len(shape) - 1) else n
        k = torch.arange(m, device=device, dtype=dtype)
        term = 2.0 * alpha * n * n * (1.0 - torch.cos(2.0 * math.pi * k / n))
        view = [1] * len(shape)
        view[d] = m
        sym = sym + term.view(view)
    return sym


class DiffOperator:
    """``L``, ``L†L`` and ``K = (L†L)⁻¹`` on one grid, applied by real FFT per component.

    Args:
        shape: spatial grid of the fields.
        alpha: Laplacian weight (unit-cube grid).
        gamma: identity weight.

    Fields are ``(B, C, *shape)``; every method returns the same shape and dtype.
    """

    def __init__(self, shape: Sequence[int], alpha: float, gamma: float = 1.0,
                 device: torch.device | str | None = None) -> None:
        self.shape = tuple(int(n) for n in shape)
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        self.symbol = operator_symbol(self.shape, self.alpha, self.gamma, device=device, dtype=torch.float64)

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


class SobolevGradient(torch.autograd.Function):
    """Identity on the energy value; injects the Sobolev gradient into ``v``.

    ``forward(v, force, dissim, op, lam, scale)`` returns the scalar
    ``scale · (½‖Lv‖² + λ·D)`` (for logging and divergence checks); ``backward`` hands
    ``v`` the gradient ``grad_out · scale · (v + K ⋆ (λ·F))`` (and nothing to the others).

    Args:
        v: ``(B, ndim, *S)`` velocity (the network's output).
        force: ``(B, ndim, *S)`` ``F`` from :func:`local_cc_force` (detached).
        dissim: scalar ``D``.
        op: the level's :class:`DiffOperator` (grid ``S``).
        lam: ``λ``.
        scale: normalisation (``1 / voxels``).
    """

    @staticmethod
    def forward(ctx: Any, v: torch.Tensor, force: torch.Tensor, dissim: torch.Tensor, op: DiffOperator,
                lam: float, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.op = op
        ctx.lam = float(lam)
        ctx.scale = float(scale)
        ctx.save_for_backward(v, force)
        energy = 0.5 * op.norm2(v.detach()) + ctx.lam * dissim.to(v.dtype)
        return (energy * ctx.scale).to(v.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        v, force = ctx.saved_tensors
        g = v + ctx.op.K(ctx.lam * force)
        return grad_out * ctx.scale * g, None, None, None, None, None


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
    return nn.Conv3d(cin, cout, 3, stride=stride, padding=1)


class CascadeUNet(nn.Module):
    """One level's U-Net: ``cat(moving, fixed) (B, 2, *M) → velocity (B, 3, *M/out_scale)``.

    Args:
        width: ``c`` (authors: 48).
        out_scale: 4, 2 or 1 — the resolution divisor of the output.

    ``M`` must be divisible by 16 (the encoder goes down to 1/16).
    """

    def __init__(self, width: int = 16, out_scale: int = 1) -> None:
        super().__init__()
        if out_scale not in (4, 2, 1):
            raise ValueError(f"out_scale must be 4, 2 or 1, got {out_scale}")
        c = int(width)
        self.out_scale = out_scale
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
            self.ccas.append(CrossCoordinateAttention(cs))
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
            x = F.leaky_relu(merge(torch.cat([cca(copy, x), x], dim=1)), _LEAKY)
        x = F.leaky_relu(self.head(x), _LEAKY)
        return self.out(x)


def _net_grid(shape: Sequence[int]) -> tuple[int, ...]:
    """The networks' grid: each axis rounded up to a multiple of 16."""
    return tuple(max(16, 16 * math.ceil(int(n) / 16)) for n in shape)


# --------------------------------------------------------------------------------------
# the system


class DiffOpNet(RegistrationSystem):
    """DiffOp-net as a suite system (3D).

    Args:
        width: U-Net width ``c`` (authors: 48; CPU quickstart: 8).
        alpha: Laplacian weight per level (¼, ½, full); authors ``(0.005, 0.001, 0.001)``.
        gamma: identity weight ``γ`` of the operator, shared by the levels (authors: 1).
        lambda_: ``λ``, weight of the similarity (local-CC) energy against ``½‖Lv‖²``.
        training: ``"sobolev"`` (default: the Sobolev gradient ``v + K⋆(λF)`` per level) or
            ``"autograd"`` (the loss ``D + ‖Lv‖²/(2λ)`` back-propagated).
        ncc_window: local CC window per level (int or three ints; authors 9).
        int_steps: scaling-and-squaring steps per level.
        lr: Adam learning rate (authors 1e-4).

    ``register`` returns the composed displacement ``(B, 3, *S)`` in voxels of the fixed grid.
    """

    learns: ClassVar[bool] = True
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "gamma": {"type": "float", "low": 0.1, "high": 10.0, "log": True},
        "lambda_": {"type": "float", "low": 1.0, "high": 100.0, "log": True},
    }

    def __init__(
        self,
        width: int = 48,
        alpha: Sequence[float] = (0.005, 0.001, 0.001),
        gamma: float = 1.0,
        lambda_: float = 10.0,
        training: str = "sobolev",
        ncc_window: int | Sequence[int] = 9,
        int_steps: int = 7,
        lr: float = 1e-4,
        warmup_calls: int | None = None,
        compute_hd95: bool = True,
        compute_ndv: bool = True,
    ) -> None:
        super().__init__(lambda_=lambda_, lr=lr, warmup_calls=warmup_calls, compute_hd95=compute_hd95, compute_ndv=compute_ndv)
        self.save_hyperparameters()
        if training not in ("sobolev", "autograd"):
            raise ValueError(f"training must be 'sobolev' or 'autograd', got {training!r}")
        alpha = [float(a) for a in alpha]
        if len(alpha) != 3 or any(a < 0 for a in alpha):
            raise ValueError(f"alpha needs three non-negative values (¼, ½, full), got {alpha}")
        if gamma <= 0 or lambda_ <= 0:
            raise ValueError(f"gamma and lambda_ must be > 0, got gamma={gamma}, lambda_={lambda_}")
        wins = [int(ncc_window)] * 3 if isinstance(ncc_window, (int, float)) else [int(w) for w in ncc_window]
        if len(wins) != 3 or any(w < 1 or w % 2 == 0 for w in wins):
            raise ValueError(f"ncc_window must be odd, one value or one per level, got {ncc_window}")
        self.alpha = alpha
        self.gamma = float(gamma)
        self.training_mode = training
        self.ncc_windows = wins
        self.int_steps = int(int_steps)
        self.nets = nn.ModuleList([CascadeUNet(width, s) for s in LEVEL_SCALES])
        self._ops: dict[tuple, DiffOperator] = {}

    def operator(self, level: int, shape: Sequence[int], device: torch.device) -> DiffOperator:
        """The (cached) operator of a level on a grid."""
        key = (level, tuple(int(s) for s in shape), str(device))
        if key not in self._ops:
            self._ops[key] = DiffOperator(shape, self.alpha[level], self.gamma, device=device)
        return self._ops[key]

    # ---- the cascade ----------------------------------------------------------------
    def level_velocity(self, level: int, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """``v_k = net_k(cat(moving, fixed))``: ``(B, 3, *M/scale)``, voxels of that level grid."""
        grid = _net_grid(fixed.shape[2:])
        x = torch.cat([moving, fixed], dim=1)
        if tuple(x.shape[2:]) != grid:
            x = resize_image(x, grid)
        return self.nets[level](x)

    def cascade(self, moving: torch.Tensor, fixed: torch.Tensor, train: bool = False):
        """Run the three levels.

        Args:
            moving, fixed: ``(B, 1, *S)``.
            train: also compute the per-level training energies.

        Returns:
            ``(disps, energies, parts)``: the per-level displacements ``u_k (B, 3, *S)`` (voxels
            of the fixed grid; detached when ``train``), the per-level training energies when
            ``train`` (scalars carrying the Sobolev / autograd gradient to ``v_k``; else empty)
            and the per-level dissimilarities for logging (``dissim0..2``, per voxel).
        """
        full = fixed.shape[2:]
        cur = moving
        disps, energies, parts = [], [], {}
        for k in range(3):
            v = self.level_velocity(k, cur.detach(), fixed)
            n = v.shape[2:]
            # the Sobolev path needs no graph through the integration (its gradient is injected)
            v_int = v.detach() if (train and self.training_mode == "sobolev") else v
            phi = integrate_velocity(v_int, self.int_steps) if self.int_steps > 0 else v_int
            if train:
                fk = self._level_image(fixed, n)
                mk = self._level_image(cur.detach(), n)
                op = self.operator(k, n, v.device)
                scale = 1.0 / (v.shape[0] * math.prod(n))
                if self.training_mode == "sobolev":
                    force, dissim = local_cc_force(warp(mk, phi.detach()), fk, self.ncc_windows[k])
                    e = SobolevGradient.apply(v, force, dissim, op, self.lambda_, scale)
                    parts[f"dissim{k}"] = dissim.detach() * scale
                else:
                    dissim = -local_ncc(fk, warp(mk, phi), self.ncc_windows[k], reduction="none").sum()
                    e = scale * (dissim + op.norm2(v) / (2.0 * self.lambda_))
                    parts[f"dissim{k}"] = dissim.detach() * scale
                energies.append(e)
            u = resize_field(phi.detach() if train else phi, full)
            disps.append(u)
            cur = warp(cur, u)
        return disps, energies, parts

    @staticmethod
    def _level_image(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """``image (B, 1, *S)`` on a level grid ``size``: Gaussian anti-aliasing (σ = half the
        downsampling factor, voxels of ``S``) then trilinear resampling."""
        factors = [s / max(n, 1) for s, n in zip(image.shape[2:], size)]
        if all(f <= 1.0 for f in factors):
            return resize_image(image, size)
        sig = [0.5 * f if f > 1.0 else 0.0 for f in factors]
        return resize_image(gaussian_smooth(image, sig), size)

    @staticmethod
    def compose_levels(disps: Sequence[torch.Tensor]) -> torch.Tensor:
        """One displacement equal to the sequential warps: ``((u1 ∘ u2) ∘ u3)``."""
        total = disps[0]
        for u in disps[1:]:
            total = compose(total, u)
        return total

    def register(self, batch: dict[str, Any]) -> torch.Tensor:
        disps, _, _ = self.cascade(batch["moving"], batch["fixed"], train=False)
        return self.compose_levels(disps)

    def training_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _, energies, parts = self.cascade(batch["moving"], batch["fixed"], train=True)
        loss = energies[0] + energies[1] + energies[2]
        return loss, parts
