"""cdreg: correlation-driven 2D/3D X-ray → CT registration (arXiv 2402.02498, ISBI 2024).

A learned, fully differentiable similarity ``S(X-ray, DRR(θ; CT))`` trained so that its
pose gradient points along the SE(3) geodesic away from the true pose; registration is
gradient descent on ``θ`` from the starting pose. What is known and what was chosen here
(``docs/methods.md``, "cdreg"):

* **3D residual before projection**: ``x3d = x.repeat(3) + convstack(x)``, convstack
  ``1→4→8→16→8→4→3``, 3×3×3, ReLU after each; the CT is scaled by ``mu_ref`` (water = 1)
  inside and back after, so the residual acts on O(1) values. The 3-channel volume is
  projected by :func:`benchmark.core.drr.render` (ProST-style ray sampling).
* **Encoder** (shared by X-ray and DRR; each image instance-normalised, the X-ray repeated
  to 3 channels): two 3×3 conv + InstanceNorm + ReLU (3→``widths[0]``), then 4 stages, each
  a stride-2 3×3 patch embedding and 2 PoolFormer-like blocks. Token mixer (choice):
  ``avgpool3×3(y) − y`` plus a linear map of the per-channel global spatial mean broadcast
  back over H×W, residual; channel MLP ×2 with GELU, residual.
* **Decomposition** (separate modules for X-ray and DRR): low-frequency branch of Fast
  Fourier Convolution residual blocks (half the channels through an FFT-domain 1×1 conv);
  high-frequency branch of 3 invertible coupling blocks
  ``z2 += φ(z1); z1 = z1·exp(ρ(z2)) + η(z2)`` with φ, ρ, η inverted-residual blocks
  (ρ bounded by ``tanh`` for stability — a choice).
* **Similarity**: high head on ``[H_d − H_x, (H_d − H_x)²]``, low head on ``L_d − L_x``,
  each a per-location MLP giving value × sigmoid(gate), averaged over space; ``S`` = sum of
  the two (the open choice). Lower ``S`` = better aligned.
* **Losses**: ``L_appro``: ``g = ∂S/∂θ`` (``create_graph=True``) at a pose ``θ`` drawn
  around the true pose, ``r`` = :func:`benchmark.core.se3.geodesic_grad` (gradient of the squared
  geodesic distance); loss = ``|ĝ_rot − r̂_rot|² + |ĝ_t − r̂_t|²`` of the normalised parts;
  the backward of this is the double backward that trains the network. ``L_decomp``
  (CDDFuse form, assigned so that high-frequency features correlate and low-frequency
  ones decorrelate): ``CC(L_x, L_d)² / (1.01 + CC(H_x, H_d))``. Total with learned
  uncertainty: ``L_a/(2σ1²) + L_d/(2σ2²) + log(σ1² σ2²)``, ``log σ²`` learned (option
  ``loss_weighting: learned``, bounded; default fixed weights).
  Training poses: the true pose plus ``u · N(0, train_*)`` per axis with ``u ~ U(train_radius)``
  per sample (default ``(0.05, 1.5)``; ``(1, 1)``, a plain Gaussian, leaves the field next to
  the truth untrained, as a 6-D Gaussian hardly ever samples there).
* **Per-axis calibration** (ours, ``calibrate_axes``): after training, a positive scale per pose
  axis of ``∂S/∂θ`` is fitted on training draws with the same direction loss: at a start far
  from the truth the rotation about the C-arm y axis moves the body's image along x as an x
  translation does, so that component of any image similarity's gradient follows
  the translation error (measured, held-out: its sign right in ~50 % of cases, the in-plane
  rotation's in ~90 %); the fitted scale weighs it down. Off in the shipped configs: on the
  quickstart it raised the held-out start direction (128 cases: 74 → 81 %) but made registration
  worse (``docs/cdreg.md``).
* **Registration**: ``iterations`` steps of normalised gradient descent on the rotation and
  the translation parts separately (step sizes ``step_rot_deg`` / ``step_trans_mm``, decayed
  geometrically to ``final_step_frac`` of them), optionally finished by ``finish_iterations``
  Adam steps on gradient-NCC (:class:`systems.pose_baseline.GradientPose`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmark.core.drr import MU_WATER_PER_MM, render_pose
from benchmark.core.se3 import geodesic_grad, recentre, uncentre
from systems.pose_base import PoseSystem
from systems.speed import check_compile, float32_only

__all__ = ["Residual3D", "PoolFormerEncoder", "FFCBranch", "InvertibleBranch", "GatedHead", "FlatHead", "CDRegNet", "CDReg", "cc",
           "feature_size", "toward_truth_cosines", "direction_loss", "fit_axis_scale"]


class Residual3D(nn.Module):
    """``x3d = x.repeat(3) + convstack(x)`` on ``(B, 1, X, Y, Z)`` attenuation → ``(B, 3, X, Y, Z)``."""

    def __init__(self, mu_ref: float = MU_WATER_PER_MM) -> None:
        super().__init__()
        ch = [1, 4, 8, 16, 8, 4, 3]
        layers: list[nn.Module] = []
        for a, b in zip(ch[:-1], ch[1:]):
            layers += [nn.Conv3d(a, b, 3, padding=1), nn.ReLU(inplace=False)]
        self.stack = nn.Sequential(*layers)
        self.mu_ref = float(mu_ref)
        nn.init.normal_(self.stack[-2].weight, std=1e-3)
        nn.init.zeros_(self.stack[-2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xn = x / self.mu_ref
        return self.mu_ref * (xn.repeat(1, 3, 1, 1, 1) + self.stack(xn))


class _PoolFormerBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.n1 = nn.GroupNorm(1, c)
        self.glob = nn.Linear(c, c)
        self.n2 = nn.GroupNorm(1, c)
        self.mlp = nn.Sequential(nn.Conv2d(c, 2 * c, 1), nn.GELU(), nn.Conv2d(2 * c, c, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.n1(x)
        mix = F.avg_pool2d(y, 3, 1, 1, count_include_pad=False) - y + self.glob(y.mean((2, 3)))[:, :, None, None]
        x = x + mix
        return x + self.mlp(self.n2(x))


class PoolFormerEncoder(nn.Module):
    """Stem (two conv3×3 + IN + ReLU, 3→w0) and 4 stages (strided patch embedding + 2 PoolFormer blocks).

    ``(B, 3, H, W)`` → ``(B, widths[-1], H/prod(strides), W/prod(strides))``; the paper's
    strides ``(2, 2, 2, 2)`` give ``H/16`` (256 → 16). Small detectors (e.g. 32 px) keep more
    than a 2×2 map with a stride of 1 in the first stage(s).
    """

    def __init__(self, widths: Sequence[int] = (8, 16, 32, 64, 64), strides: Sequence[int] = (2, 2, 2, 2)) -> None:
        super().__init__()
        w = list(widths)
        if len(w) != 5:
            raise ValueError(f"widths needs 5 entries (stem + 4 stages), got {w}")
        st = [int(v) for v in strides]
        if len(st) != 4 or min(st) < 1:
            raise ValueError(f"strides needs 4 positive entries (one per stage), got {strides!r}")
        self.stem = nn.Sequential(
            nn.Conv2d(3, w[0], 3, padding=1), nn.InstanceNorm2d(w[0], affine=True), nn.ReLU(),
            nn.Conv2d(w[0], w[0], 3, padding=1), nn.InstanceNorm2d(w[0], affine=True), nn.ReLU(),
        )
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 3, stride=k, padding=1), _PoolFormerBlock(b), _PoolFormerBlock(b))
            for a, b, k in zip(w[:-1], w[1:], st)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for s in self.stages:
            x = s(x)
        return x


class _SpectralTransform(nn.Module):
    """FFT-domain 1×1 conv: rfft2 → conv over (real, imag) channels → ReLU → irfft2."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2 * c, 2 * c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        f = torch.fft.rfft2(x, norm="ortho")
        z = F.relu(self.conv(torch.cat([f.real, f.imag], 1))).float()  # no bfloat16 complex (systems.speed)
        re, im = z.chunk(2, 1)
        return torch.fft.irfft2(torch.complex(re, im), s=(h, w), norm="ortho")


class _FFCResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.cg = c // 2
        self.cl = c - self.cg
        self.l2l = nn.Conv2d(self.cl, self.cl, 3, padding=1)
        self.g2l = nn.Conv2d(self.cg, self.cl, 3, padding=1)
        self.l2g = nn.Conv2d(self.cl, self.cg, 3, padding=1)
        self.g2g = _SpectralTransform(self.cg)
        self.norm = nn.GroupNorm(1, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xl, xg = x[:, : self.cl], x[:, self.cl :]
        yl = self.l2l(xl) + self.g2l(xg)
        yg = self.l2g(xl) + self.g2g(xg)
        return x + F.relu(self.norm(torch.cat([yl, yg], 1)))


class FFCBranch(nn.Module):
    """Low-frequency branch: ``n`` Fast Fourier Convolution residual blocks, ``(B, C, h, w)`` → same."""

    def __init__(self, c: int, n: int = 2) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[_FFCResBlock(c) for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int = 2) -> None:
        super().__init__()
        h = cin * expand
        self.body = nn.Sequential(nn.Conv2d(cin, h, 1, bias=False), nn.ReLU6(), nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False),
                                  nn.ReLU6(), nn.Conv2d(h, cout, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _Coupling(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1 = c // 2
        c2 = c - self.c1
        self.phi = _InvertedResidual(self.c1, c2)
        self.rho = _InvertedResidual(c2, self.c1)
        self.eta = _InvertedResidual(c2, self.c1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z1, z2 = x[:, : self.c1], x[:, self.c1 :]
        z2 = z2 + self.phi(z1)
        z1 = z1 * torch.exp(torch.tanh(self.rho(z2))) + self.eta(z2)
        return torch.cat([z1, z2], 1)


class InvertibleBranch(nn.Module):
    """High-frequency branch: ``n`` invertible affine coupling blocks, ``(B, C, h, w)`` → same."""

    def __init__(self, c: int, n: int = 3) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[_Coupling(c) for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class GatedHead(nn.Module):
    """Per-location MLP → value × sigmoid(gate), averaged over space: ``(B, Cin, h, w)`` → ``(B,)``."""

    def __init__(self, cin: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(cin, hidden, 1), nn.GELU(), nn.Conv2d(hidden, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v, g = self.mlp(x).unbind(1)
        return (v * torch.sigmoid(g)).mean((1, 2))


class FlatHead(nn.Module):
    """The authors' flattened head: features average-pooled to ``pool × pool``, flattened, MLP →
    value × sigmoid(gate): ``(B, Cin, h, w)`` → ``(B,)``. Unlike :class:`GatedHead` it sees where
    on the detector a difference is (a location-aware similarity)."""

    def __init__(self, cin: int, hidden: int, pool: int = 4) -> None:
        super().__init__()
        self.pool = int(pool)
        self.mlp = nn.Sequential(nn.Linear(cin * self.pool * self.pool, hidden), nn.GELU(), nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.adaptive_avg_pool2d(x, self.pool).flatten(1)
        v, g = self.mlp(z).unbind(1)
        return v * torch.sigmoid(g)


class MetricHead(nn.Module):
    """A learned metric: ``mean over space and channels of (P d)²`` with ``P`` a 1×1 convolution
    (initialised to the identity): ``(B, C, h, w)`` feature difference → ``(B,)``, ``≥ 0`` and
    ``0`` where the features agree, so the true pose is a minimum by construction."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(c, c, 1, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(c)[:, :, None, None])

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        return (self.proj(d) ** 2).mean((1, 2, 3))


def cc(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Pearson correlation per sample of ``(B, ...)`` tensors → ``(B,)``."""
    a = a.flatten(1) - a.flatten(1).mean(1, keepdim=True)
    b = b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
    return (a * b).sum(1) / torch.sqrt((a * a).sum(1) * (b * b).sum(1) + eps)


def _instance_norm(x: torch.Tensor) -> torch.Tensor:
    m = x.mean((2, 3), keepdim=True)
    s = x.std((2, 3), keepdim=True)
    return (x - m) / (s + 1e-6)


def feature_size(height: int, width: int, strides: Sequence[int]) -> tuple[int, int]:
    """Feature-map size ``(h, w)`` of :class:`PoolFormerEncoder` on an ``height × width`` detector
    (3×3 convolutions with padding 1: ``n → ⌊(n − 1)/s⌋ + 1`` per stage)."""
    h, w = int(height), int(width)
    for s in strides:
        h, w = (h - 1) // int(s) + 1, (w - 1) // int(s) + 1
    return h, w


class CDRegNet(nn.Module):
    """The similarity network: ``forward(xray (B,1,H,W), drr (B,3,H,W)) → (S (B,), features)``.

    ``head``: ``"local"`` (per-location :class:`GatedHead`, averaged over space) or ``"flat"``
    (the authors' flattened :class:`FlatHead`, pooled to ``flat_pool × flat_pool``).
    """

    def __init__(self, widths: Sequence[int] = (8, 16, 32, 64, 64), ffc_blocks: int = 2, inv_blocks: int = 3,
                 strides: Sequence[int] = (2, 2, 2, 2), head: str = "local", flat_pool: int = 4) -> None:
        super().__init__()
        if head not in ("local", "flat", "metric"):
            raise ValueError(f"head must be 'local', 'flat' or 'metric', got {head!r}")
        self.head = head
        c = int(widths[-1])
        self.strides = tuple(int(v) for v in strides)
        self.encoder = PoolFormerEncoder(widths, strides)
        self.low_x, self.low_d = FFCBranch(c, ffc_blocks), FFCBranch(c, ffc_blocks)
        self.high_x, self.high_d = InvertibleBranch(c, inv_blocks), InvertibleBranch(c, inv_blocks)
        if head == "local":
            self.head_high: nn.Module = GatedHead(2 * c, c)
            self.head_low: nn.Module = GatedHead(c, c)
        elif head == "metric":
            self.head_high, self.head_low = MetricHead(c), MetricHead(c)
            # the DRR branches start as copies of the X-ray branches: identical images give
            # identical features, S = 0, so the untrained field already descends toward alignment
            self.low_d.load_state_dict(self.low_x.state_dict())
            self.high_d.load_state_dict(self.high_x.state_dict())
        else:
            self.head_high = FlatHead(2 * c, c, flat_pool)
            self.head_low = FlatHead(c, c, flat_pool)

    def forward(self, xray: torch.Tensor, drr: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if xray.shape[0] != drr.shape[0]:
            xray = xray.expand(drr.shape[0], *xray.shape[1:])
        fx = self.encoder(_instance_norm(xray).repeat(1, 3, 1, 1))
        fd = self.encoder(_instance_norm(drr))
        lx, ld = self.low_x(fx), self.low_d(fd)
        hx, hd = self.high_x(fx), self.high_d(fd)
        dh = hd - hx
        if self.head == "metric":
            s = self.head_high(dh) + self.head_low(ld - lx)
        else:
            s = self.head_high(torch.cat([dh, dh * dh], 1)) + self.head_low(ld - lx)
        return s, {"low_x": lx, "low_d": ld, "high_x": hx, "high_d": hd}


def _unit(v: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return v / (v.norm(dim=-1, keepdim=True) + eps)


def direction_loss(g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``L_appro`` per sample ``(B,)``: ``|ĝ_rot − r̂_rot|² + |ĝ_t − r̂_t|²`` of the normalised rotation
    and translation parts of a pose gradient ``g (B, 6)`` and the geodesic gradient ``r (B, 6)``."""
    return ((_unit(g[:, :3]) - _unit(r[:, :3])) ** 2).sum(-1) + ((_unit(g[:, 3:]) - _unit(r[:, 3:])) ** 2).sum(-1)


def fit_axis_scale(g: torch.Tensor, r: torch.Tensor, iterations: int = 300, lr: float = 0.05) -> torch.Tensor:
    """Log per-axis scales ``s (6,)`` minimising ``mean direction_loss(g · e^s, r)`` over pose gradients
    ``g (N, 6)`` and geodesic gradients ``r (N, 6)`` (Adam from ``s = 0``; only the ratios within the
    rotation and within the translation part matter). ``e^s`` is a diagonal positive preconditioner:
    ``−e^s · g`` stays a descent direction of the similarity."""
    g, r = g.detach().float(), r.detach().float()
    with torch.inference_mode(False), torch.enable_grad():
        s = torch.zeros(6, dtype=g.dtype, device=g.device, requires_grad=True)
        opt = torch.optim.Adam([s], lr=lr)
        for _ in range(int(iterations)):
            loss = direction_loss(g * torch.exp(s), r).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return s.detach()


def toward_truth_cosines(g: torch.Tensor, theta: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Cosines ``(B, 2)`` (rotation, translation) between the descent direction ``−g`` of a pose
    gradient ``g (B, 6)`` at ``theta (B, 6)`` and the geodesic direction toward ``true (B, 6)``
    (``−`` :func:`benchmark.core.se3.geodesic_grad`); ``> 0`` means a descent step moves toward the truth."""
    r = geodesic_grad(theta.detach().double(), true.detach().double()).to(g.dtype)
    return torch.stack([(_unit(g[:, :3]) * _unit(r[:, :3])).sum(-1), (_unit(g[:, 3:]) * _unit(r[:, 3:])).sum(-1)], 1)


class CDReg(PoseSystem):
    """Correlation-driven 2D/3D registration (see module doc).

    Args:
        lr: Adam learning rate.
        widths: encoder channels (stem + 4 stages); the paper: ``(8, 16, 32, 64, 64)``.
        strides: encoder stage strides; the paper: ``(2, 2, 2, 2)`` (256 px → 16×16). Choose them
            so that the feature map (:func:`feature_size`) is at least ``min_feature × min_feature``
            on the detector: at 32 px, ``(1, 1, 2, 2)`` gives 8×8. Checked when fitting/testing.
        ffc_blocks, inv_blocks: blocks of the low / high branches.
        head: ``"local"`` (per-location gated MLP averaged over space) or ``"flat"`` (the
            authors' flattened head, features pooled to ``flat_pool × flat_pool``).
        n_samples: samples per ray of the DRRs.
        train_rot_deg, train_trans_mm, train_depth_mm: std of the offset of the training pose
            ``θ`` from the true pose (per axis).
        train_radius: ``(lo, hi)``: the offset is scaled by ``u ~ U(lo, hi)`` per sample. With
            ``(1, 1)`` (a plain Gaussian) the poses next to the truth are hardly ever drawn and
            the learned field there is untrained (measured: reversed near the truth); the
            default ``(0.05, 1.5)`` covers the truth's neighbourhood and 1.5× the pose spread.
        decomp_loss: add the correlation-driven decomposition loss ``L_decomp`` (ablation
            switch: ``False`` trains on ``L_appro`` alone; the branches stay in the network).
        loss_weighting: ``"fixed"`` (default): ``L_appro + decomp_weight · L_decomp``;
            ``"learned"``: the paper's uncertainty weighting
            ``L_a/(2σ1²) + L_d/(2σ2²) + log σ1² + log σ2²`` (``log σ²`` learned) with
            ``log σ² = log_var_bound · tanh(raw)``, so that neither weight can grow past
            ``e^bound / 2`` (unbounded, the near-zero ``L_decomp`` drives its own weight up and
            starves ``L_appro``: measured 2.2 vs 0.3 after 300 steps).
        decomp_weight: weight of ``L_decomp`` with fixed weighting.
        log_var_bound: bound of the learned log-variances.
        iterations, step_rot_deg, step_trans_mm, final_step_frac: registration descent.
        finish_iterations, finish_lr_rot_deg, finish_lr_trans_mm: gradient-NCC finish (0 = off),
            the same optimiser as the ``gradient-ncc`` row (:class:`GradientPose`, ``gncc``, one level).
        checkpoint_render: recompute DRR chunks in backward (less training memory).
        min_feature: smallest feature-map side accepted at the data's detector size.
        compile: ``torch.compile`` the network for registration (``True`` or a backend name;
            training differentiates twice, which compiled graphs do not support, so it runs
            eager). Under a mixed-precision trainer (``precision: bf16-mixed``) training and
            registration stay float32 (comment at :meth:`training_loss`; :mod:`systems.speed`).
        rotation_centre: ``"isocentre"`` or ``"centroid"``: the chart of the pose the network's
            gradient is taken in, trained on and followed (:class:`systems.pose_base.PoseSystem`):
            rotation about the CT's isocentre or its attenuation centroid. The geodesic target and
            ``grad_toward_truth`` are in the same chart (the rotation part is the same in every
            chart; the translation part is that of the centre). Estimates stay in the suite's convention.
        drr_method: renderer of the DRRs the network compares (``"trilinear"``, default, or
            ``"slices"``: :func:`benchmark.core.drr.render`).
        calibrate_axes: ``> 0``: after training, fit a per-axis positive scale ``e^s (6,)`` of the pose
            gradient on that many fresh training draws (training CTs, poses as in training) by
            minimising the same direction loss (:meth:`calibrate`, :func:`fit_axis_scale`);
            registration and ``grad_toward_truth`` then follow ``e^s · ∂S/∂θ`` (a diagonal
            preconditioner: still a descent direction of ``S``), and ``cases.csv`` also carries the
            unscaled cosines (``grad_toward_truth_rot_raw`` / ``_trans_raw``). ``0``: off.

    ``rot_scale_mm`` (ρ of the geodesic) is gone: the loss compares the rotation and the
    translation directions separately, on which ρ has no effect.
    """

    learns: ClassVar[bool] = True
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
        "step_rot_deg": {"type": "float", "low": 0.5, "high": 5.0, "log": True},
        "step_trans_mm": {"type": "float", "low": 1.0, "high": 10.0, "log": True},
        "iterations": {"type": "int", "low": 20, "high": 200},
    }

    def __init__(
        self,
        lr: float = 1e-3,
        widths: Sequence[int] = (8, 16, 32, 64, 64),
        ffc_blocks: int = 2,
        inv_blocks: int = 3,
        n_samples: int = 64,
        train_rot_deg: float = 10.0,
        train_trans_mm: float = 15.0,
        train_depth_mm: float = 30.0,
        train_radius: Sequence[float] = (0.05, 1.5),
        iterations: int = 60,
        step_rot_deg: float = 2.0,
        step_trans_mm: float = 4.0,
        final_step_frac: float = 0.05,
        finish_iterations: int = 0,
        finish_lr_rot_deg: float = 1.0,
        finish_lr_trans_mm: float = 2.0,
        checkpoint_render: bool = False,
        warmup_calls: int | None = None,
        strides: Sequence[int] = (2, 2, 2, 2),
        head: str = "local",
        flat_pool: int = 4,
        decomp_loss: bool = True,
        loss_weighting: str = "fixed",
        decomp_weight: float = 0.1,
        log_var_bound: float = 1.0,
        min_feature: int = 4,
        compile: bool | str = False,
        calibrate_axes: int = 0,
        rotation_centre: str = "isocentre",
        drr_method: str = "trilinear",
    ) -> None:
        super().__init__(lr=lr, n_samples=n_samples, warmup_calls=warmup_calls, rotation_centre=rotation_centre,
                         drr_method=drr_method)
        self.save_hyperparameters()
        self.compile_network = check_compile(compile)
        self._net_compiled: Callable[..., Any] | None = None
        if loss_weighting not in ("fixed", "learned"):
            raise ValueError(f"loss_weighting must be 'fixed' or 'learned', got {loss_weighting!r}")
        self.residual = Residual3D()
        self.net = CDRegNet(widths, ffc_blocks, inv_blocks, strides, head, flat_pool)
        self.decomp_loss = bool(decomp_loss)
        self.loss_weighting = loss_weighting
        self.decomp_weight = float(decomp_weight)
        self.log_var_bound = float(log_var_bound)
        if loss_weighting == "learned":
            #: unconstrained parameters of the two bounded log σ² (uncertainty weighting).
            self.log_var_raw = nn.Parameter(torch.zeros(2))
        self.train_std = torch.tensor([math.radians(train_rot_deg)] * 3 + [train_trans_mm, train_trans_mm, train_depth_mm])
        self.train_radius = (float(train_radius[0]), float(train_radius[1]))
        if not 0.0 <= self.train_radius[0] <= self.train_radius[1]:
            raise ValueError(f"train_radius must be (lo, hi) with 0 <= lo <= hi, got {train_radius!r}")
        self.iterations = int(iterations)
        self.step_rot = math.radians(float(step_rot_deg))
        self.step_trans = float(step_trans_mm)
        self.final_step_frac = float(final_step_frac)
        self.finish_iterations = int(finish_iterations)
        self.finish_lr_rot = math.radians(float(finish_lr_rot_deg))
        self.finish_lr_trans = float(finish_lr_trans_mm)
        self.checkpoint_render = bool(checkpoint_render)
        self.min_feature = int(min_feature)
        self.calibrate_axes = int(calibrate_axes)
        if self.calibrate_axes > 0:
            #: log of the per-axis scale of the pose gradient, fitted at the end of training
            #: (:meth:`calibrate`); zeros (no scaling) until then
            self.register_buffer("log_axis_scale", torch.zeros(6))

    # ---- checks -------------------------------------------------------------------------------
    def check_detector(self, height: int, width: int) -> tuple[int, int]:
        """Feature-map size on an ``height × width`` detector; ``ValueError`` when a side is below
        ``min_feature`` (a 2×2 map leaves the low/high decomposition nothing to decompose)."""
        fs = feature_size(height, width, self.net.strides)
        if min(fs) < self.min_feature:
            raise ValueError(f"cdreg: strides {list(self.net.strides)} give a {fs[0]}x{fs[1]} feature map on the "
                             f"{height}x{width} detector (need >= {self.min_feature}x{self.min_feature}): use smaller strides")
        return fs

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        geom = getattr(dm, "geometry", None)
        if geom is not None:
            self.check_detector(geom.height, geom.width)

    # ---- similarity -------------------------------------------------------------------------
    def similarity(self, batch: dict[str, Any], x3d: torch.Tensor, pose: torch.Tensor, xray: torch.Tensor | None = None,
                   centre: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``S (B,)`` and features for poses ``(B, 6)`` in the chart about ``centre (B, 3)``
        (default: :meth:`chart_centre`); ``x3d`` the residual volume ``(B|1, 3, X, Y, Z)``."""
        aff = batch["affine"][0] if x3d.shape[0] == 1 else batch["affine"]
        c = self.chart_centre(batch) if centre is None else centre
        drr = render_pose(x3d, aff, uncentre(pose, c), batch["base"].to(pose.dtype), batch["geometry"], self.n_samples,
                          checkpoint=self.checkpoint_render and self.training, method=self.drr_method)
        # training differentiates twice (create_graph), which torch.compile does not support:
        # the compiled network serves registration only
        net = self._net_compiled if (self._net_compiled is not None and not self.training) else self.net
        return net(batch["xray"] if xray is None else xray, drr)

    def configure_model(self) -> None:
        """Lightning hook: with ``compile``, a compiled view of the network for registration."""
        if self.compile_network is not False and self._net_compiled is None:
            backend = "inductor" if self.compile_network is True else self.compile_network
            object.__setattr__(self, "_net_compiled", torch.compile(self.net, backend=backend))

    def pose_gradient(self, batch: dict[str, Any], x3d: torch.Tensor, pose: torch.Tensor, create_graph: bool = False,
                      scaled: bool = True, centre: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``(g (B, 6), S (B,), features)`` at the chart pose ``pose`` (about ``centre``, default
        :meth:`chart_centre`): ``g = ∂S/∂θ``, times the calibrated per-axis scale ``e^s``
        (:meth:`calibrate`) when ``scaled`` and ``calibrate_axes > 0``."""
        theta = pose if pose.requires_grad else pose.detach().clone().requires_grad_(True)
        s, feats = self.similarity(batch, x3d, theta, centre=centre)
        (g,) = torch.autograd.grad(s.sum(), theta, create_graph=create_graph)
        if scaled and self.calibrate_axes > 0:
            g = g * torch.exp(self.log_axis_scale).to(g.dtype)
        return g, s, feats

    def sample_train_theta(self, true: torch.Tensor) -> torch.Tensor:
        """Training poses around ``true (B, 6)``: ``true + u · N(0, train_*)`` per axis, ``u ~ U(train_radius)``
        per sample (a radius mixture: the field is trained from next to the truth, where a plain
        6-D Gaussian rarely lands, out beyond the test starting distances)."""
        lo, hi = self.train_radius
        u = lo + (hi - lo) * torch.rand(true.shape[0], 1, device=true.device, dtype=true.dtype)
        return true + torch.randn_like(true) * self.train_std.to(true.device, true.dtype) * u

    @float32_only
    def calibrate(self, batches: Any) -> torch.Tensor:
        """Fit the per-axis scale of the pose gradient on training batches (training CTs, poses drawn
        as in training) with :func:`fit_axis_scale`; stores and returns it (``(6,)``, ``e^s``).

        Why: at a start far from the truth, the rotation about the C-arm y axis moves the body's
        image along x as an x translation does, so its component of ``∂S/∂θ`` follows
        the translation error rather than the rotation error (measured: its sign agrees with the true
        direction in about half of the held-out cases, the in-plane rotation's in about 90 %). The
        learned direction loss, fitted over the training distribution, weighs such an axis down.
        """
        gs, rs = [], []
        with torch.inference_mode(False), torch.enable_grad():
            for batch in batches:
                c = self.chart_centre(batch)
                true = recentre(batch["pose_true"].float(), c)
                theta = self.sample_train_theta(true)
                with torch.no_grad():
                    x3d = self.residual(batch["volume"])
                g, _, _ = self.pose_gradient(batch, x3d, theta, scaled=False, centre=c)
                gs.append(g.detach())
                rs.append(geodesic_grad(theta.detach().double(), true.double()).float())
        s = fit_axis_scale(torch.cat(gs), torch.cat(rs))
        self.log_axis_scale.copy_(s.to(self.log_axis_scale))
        return torch.exp(s)

    def on_train_end(self) -> None:
        """With ``calibrate_axes > 0``: :meth:`calibrate` on that many fresh training draws."""
        if self.calibrate_axes <= 0:
            return
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            return

        def batches():
            n = 0
            for batch in dm.train_dataloader():
                if n >= self.calibrate_axes:
                    return
                yield {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
                n += batch["pose_true"].shape[0]

        was_training = self.training
        self.eval()
        scale = self.calibrate(batches())
        self.train(was_training)
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info("cdreg: calibrated per-axis scale of the pose gradient (rx, ry, rz, tx, ty, tz): "
                       + ", ".join(f"{float(v):.3g}" for v in scale))

    def grad_toward_truth(self, batch: dict[str, Any], pose: torch.Tensor | None = None, scaled: bool = True) -> torch.Tensor:
        """Cosines ``(B, 2)`` (rotation, translation) between the learned descent direction at
        ``pose`` (default ``batch["pose_init"]``) and the geodesic direction to ``batch["pose_true"]``
        (``scaled=False``: of ``∂S/∂θ`` without the calibrated per-axis scale)."""
        with torch.inference_mode(False), torch.enable_grad():
            clean = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            c = self.chart_centre(clean)
            theta = recentre((clean["pose_init"] if pose is None else pose.clone()).float(), c)
            with torch.no_grad():
                x3d = self.residual(clean["volume"])
            g, _, _ = self.pose_gradient(clean, x3d, theta, scaled=scaled, centre=c)
            return toward_truth_cosines(g.detach(), theta, recentre(clean["pose_true"].float(), c))

    # ---- training ---------------------------------------------------------------------------
    def loss_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounded ``(log σ1², log σ2²)`` of the learned weighting (zeros with fixed weights)."""
        if self.loss_weighting != "learned":
            z = torch.zeros((), device=self.device)
            return z, z
        lv = self.log_var_bound * torch.tanh(self.log_var_raw)
        return lv[0], lv[1]

    # float32 even under a mixed-precision trainer (systems.speed.float32_only): what cdreg
    # learns and follows is the direction of dS/dtheta, which 16-bit convolutions change
    # (measured, untrained net at 32x32: translation components flipped sign; training loss
    # 3.84 under bf16 autocast vs 5.88 in float32)
    @float32_only
    def training_loss(self, batch: dict[str, Any], theta: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss at poses ``theta (B, 6)`` in the chart about :meth:`chart_centre` (default: the true
        pose in that chart plus ``u · N(0, train_*)`` per axis, ``u ~ U(train_radius)`` per sample)."""
        c = self.chart_centre(batch)
        true = recentre(batch["pose_true"].float(), c)  # in the chart about c (rotation_centre)
        if theta is None:
            # radius mixture: the Gaussian offset is scaled per sample by u ~ U(lo, hi), so the
            # field is trained from next to the truth (where a plain 6-D Gaussian rarely lands)
            # out beyond the test starting distances
            theta = self.sample_train_theta(true)
        theta = theta.detach().float().clone().requires_grad_(True)
        x3d = self.residual(batch["volume"])
        # the network learns the direction of ∂S/∂θ itself (the per-axis scale is fitted after training)
        g, _, f = self.pose_gradient(batch, x3d, theta, create_graph=True, scaled=False, centre=c)
        r = geodesic_grad(theta.detach().double(), true.double()).float()
        l_appro = direction_loss(g, r).mean()
        l_decomp = (cc(f["low_x"], f["low_d"]) ** 2 / (1.01 + cc(f["high_x"], f["high_d"]))).mean()
        if self.loss_weighting == "learned":
            s1, s2 = self.loss_weights()
            loss = 0.5 * torch.exp(-s1) * l_appro + s1
            if self.decomp_loss:
                loss = loss + 0.5 * torch.exp(-s2) * l_decomp + s2
        else:
            loss = l_appro + (self.decomp_weight * l_decomp if self.decomp_loss else 0.0)
        cos = toward_truth_cosines(g.detach(), theta.detach(), true)
        return loss, {"appro": l_appro.detach(), "decomp": l_decomp.detach(), "cos_rot": cos[:, 0].mean(), "cos_trans": cos[:, 1].mean()}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Held-out pose-gradient direction at the starting pose: ``val/toward_rot``,
        ``val/toward_trans`` (share of cases whose learned descent points toward the truth),
        ``val/cos_rot``, ``val/cos_trans`` (mean cosines). No registration (cheap)."""
        cos = self.grad_toward_truth(batch)
        bs = cos.shape[0]
        self.log("val/toward_rot", (cos[:, 0] > 0).float().mean(), sync_dist=True, batch_size=bs)
        self.log("val/toward_trans", (cos[:, 1] > 0).float().mean(), sync_dist=True, batch_size=bs, prog_bar=True)
        self.log("val/cos_rot", cos[:, 0].mean(), sync_dist=True, batch_size=bs)
        self.log("val/cos_trans", cos[:, 1].mean(), sync_dist=True, batch_size=bs)

    def case_records(self, batch: dict[str, Any], pose: torch.Tensor, runtime_s: float, peak_mem_mb: float) -> list[dict[str, Any]]:
        """The shared records plus ``grad_toward_truth_rot`` / ``grad_toward_truth_trans``: cosines
        of the learned descent direction at the starting pose with the geodesic direction to the truth;
        with ``calibrate_axes`` also ``grad_toward_truth_rot_raw`` / ``_trans_raw``: the same for
        ``∂S/∂θ`` without the calibrated per-axis scale."""
        out = super().case_records(batch, pose, runtime_s, peak_mem_mb)
        cos = self.grad_toward_truth(batch).cpu()
        raw = self.grad_toward_truth(batch, scaled=False).cpu() if self.calibrate_axes > 0 else None
        for b, rec in enumerate(out):
            rec["grad_toward_truth_rot"] = float(cos[b, 0])
            rec["grad_toward_truth_trans"] = float(cos[b, 1])
            if raw is not None:
                rec["grad_toward_truth_rot_raw"] = float(raw[b, 0])
                rec["grad_toward_truth_trans_raw"] = float(raw[b, 1])
        return out

    # ---- registration ------------------------------------------------------------------------
    @float32_only
    def register(self, batch: dict[str, Any]) -> torch.Tensor:
        with torch.no_grad():
            x3d = self.residual(batch["volume"])
        c = self.chart_centre(batch)
        pose = recentre(batch["pose_init"].float().detach(), c)  # descent in the chart about c
        n = max(self.iterations, 1)
        decay = self.final_step_frac ** (1.0 / max(n - 1, 1))
        for k in range(self.iterations):
            g, _, _ = self.pose_gradient(batch, x3d, pose, centre=c)
            f = decay**k
            with torch.no_grad():
                pose[:, :3] -= self.step_rot * f * _unit(g[:, :3])
                pose[:, 3:] -= self.step_trans * f * _unit(g[:, 3:])
        pose = uncentre(pose, c)
        if self.finish_iterations > 0:
            from systems.pose_baseline import GradientPose

            fin = GradientPose(similarity="gncc", levels=[1], n_samples=self.n_samples, iterations=self.finish_iterations,
                               lr_rot_deg=math.degrees(self.finish_lr_rot), lr_trans_mm=self.finish_lr_trans,
                               rotation_centre=self.rotation_centre)
            pose = torch.stack([fin.optimise(batch, b, pose[b], [1], [self.finish_iterations], self.finish_lr_rot, self.finish_lr_trans)
                                for b in range(pose.shape[0])])
        return pose.detach()
