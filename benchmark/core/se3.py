"""Rigid-motion helpers for 2D/3D registration: SO(3)/SE(3) exp and log, composition,
geodesic distance and its analytic gradient.

Pose convention of the suite (docs/design.md §1): a pose is a ``(..., 6)`` tensor
``θ = (ω, t)`` — a rotation vector ``ω`` (radians, axis × angle) and a translation ``t``
(mm). It acts on a point ``p`` as ``p ↦ R(ω) p + t`` with ``R(ω) = exp([ω]×)``; how that
acts on a CT (about its isocentre, in the C-arm frame) is documented in
:mod:`benchmark.core.drr`. The 4×4 matrix of a pose is :func:`pose_to_matrix`.

Geodesic distance: the product metric on ``SO(3) × R³`` (left-invariant, the metric of the
cdreg / ProST papers' "SE(3) geodesic" used with separate rotation and translation parts):
``d(θa, θb)² = ρ² |log(R_a^T R_b)|² + |t_a − t_b|²``, ``ρ`` in mm per radian (default 1).
Its gradient w.r.t. ``θa`` is closed-form: ``2 ρ² J_r(ω_a)^T log(R_b^T R_a)`` for the
rotation part (``J_r`` the right Jacobian of SO(3)) and ``2 (t_a − t_b)`` for the
translation part (:func:`geodesic_grad`).

A pose can also be written in a chart whose rotation turns about a point ``c`` rather than
the origin (:func:`recentre` / :func:`uncentre`): ``p ↦ R (p − c) + c + t'``, so
``t = t' + c − R c``. The rotation part is the same in every chart (and so is the geodesic's
rotation part); the translation is that of ``c``. Pose optimisers use it to turn about the
anatomy they see (``systems.pose_base.PoseSystem``, ``rotation_centre``).

Twist coordinates ``ξ = (v, ω)`` of the proper SE(3) exponential are available as
:func:`se3_exp` / :func:`se3_log` (4×4 matrices).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "hat",
    "vee",
    "so3_exp",
    "so3_log",
    "so3_right_jacobian",
    "so3_left_jacobian",
    "pose_to_matrix",
    "matrix_to_pose",
    "compose",
    "invert",
    "se3_exp",
    "se3_log",
    "geodesic_distance",
    "geodesic_grad",
    "rotation_angle",
    "recentre",
    "uncentre",
]

_SMALL = 1e-4


def hat(w: torch.Tensor) -> torch.Tensor:
    """Skew matrix ``[w]×``: ``(..., 3) → (..., 3, 3)`` with ``hat(w) @ v = w × v``."""
    x, y, z = w.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([torch.stack([o, -z, y], -1), torch.stack([z, o, -x], -1), torch.stack([-y, x, o], -1)], -2)


def vee(m: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`hat` (antisymmetric part): ``(..., 3, 3) → (..., 3)``."""
    return 0.5 * torch.stack([m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1)


def _coeffs(theta2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``A = sin θ/θ``, ``B = (1−cos θ)/θ²``, ``C = (θ − sin θ)/θ³`` from ``θ²``, with
    Taylor series below ``_SMALL`` (smooth, so autograd is exact near 0)."""
    small = theta2 < _SMALL**2
    t2 = torch.where(small, torch.ones_like(theta2), theta2)
    t = torch.sqrt(t2)
    a = torch.where(small, 1 - theta2 / 6 + theta2**2 / 120, torch.sin(t) / t)
    b = torch.where(small, 0.5 - theta2 / 24 + theta2**2 / 720, (1 - torch.cos(t)) / t2)
    c = torch.where(small, 1.0 / 6 - theta2 / 120 + theta2**2 / 5040, (t - torch.sin(t)) / (t2 * t))
    return a, b, c


def so3_exp(w: torch.Tensor) -> torch.Tensor:
    """Rodrigues: rotation vector ``(..., 3)`` (rad) → rotation matrix ``(..., 3, 3)``."""
    a, b, _ = _coeffs((w * w).sum(-1))
    k = hat(w)
    eye = torch.eye(3, dtype=w.dtype, device=w.device).expand(k.shape)
    return eye + a[..., None, None] * k + b[..., None, None] * (k @ k)


def so3_log(r: torch.Tensor) -> torch.Tensor:
    """Rotation matrix ``(..., 3, 3)`` → rotation vector ``(..., 3)`` with angle in ``[0, π]``.

    Stable near 0 (series) and near π: there ``n nᵀ = (S − cos θ·I) / (1 − cos θ)`` with
    ``S = (R + Rᵀ)/2`` the symmetric part (``(R + I)/2`` still holds ``sin θ/2 · [n]×``, which
    put the axis off by ~sin θ/2 just inside the branch), column normalised.
    """
    cos = ((r[..., 0, 0] + r[..., 1, 1] + r[..., 2, 2] - 1) / 2).clamp(-1.0, 1.0)
    theta = torch.acos(cos)
    v = vee(r)  # = sin θ · n
    small = theta < 1e-3
    near_pi = theta > math.pi - 1e-3
    safe_sin = torch.where(small | near_pi, torch.ones_like(theta), torch.sin(theta))
    factor = torch.where(small, 1 + theta**2 / 6 + 7 * theta**4 / 360, theta / safe_sin)
    w = v * factor[..., None]
    if bool(near_pi.any()):
        # n from the column of n nᵀ with the largest diagonal entry, sign from the antisymmetric part.
        eye = torch.eye(3, dtype=r.dtype, device=r.device)
        one_minus_cos = torch.where(near_pi, 1 - cos, torch.ones_like(cos))
        s = ((r + r.transpose(-1, -2)) / 2 - cos[..., None, None] * eye) / one_minus_cos[..., None, None]
        diag = torch.diagonal(s, dim1=-2, dim2=-1)
        i = diag.argmax(-1, keepdim=True)
        col = torch.gather(s, -1, i[..., None, :].expand(*s.shape[:-1], 1)).squeeze(-1)
        n = col / col.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        sign = torch.where((n * v).sum(-1, keepdim=True) < 0, -1.0, 1.0).to(r.dtype)
        w_pi = n * sign * theta[..., None]
        w = torch.where(near_pi[..., None], w_pi, w)
    return w


def so3_right_jacobian(w: torch.Tensor) -> torch.Tensor:
    """Right Jacobian ``J_r(ω) = I − B [ω]× + C [ω]×²``: ``exp(ω+δ) ≈ exp(ω) exp(J_r δ)``."""
    _, b, c = _coeffs((w * w).sum(-1))
    k = hat(w)
    eye = torch.eye(3, dtype=w.dtype, device=w.device).expand(k.shape)
    return eye - b[..., None, None] * k + c[..., None, None] * (k @ k)


def so3_left_jacobian(w: torch.Tensor) -> torch.Tensor:
    """Left Jacobian ``J_l(ω) = J_r(−ω)``: ``exp(ω+δ) ≈ exp(J_l δ) exp(ω)``."""
    return so3_right_jacobian(-w)


def pose_to_matrix(pose: torch.Tensor) -> torch.Tensor:
    """``(..., 6)`` pose ``(ω rad, t mm)`` → ``(..., 4, 4)`` matrix ``[[R, t], [0, 1]]``."""
    r = so3_exp(pose[..., :3])
    top = torch.cat([r, pose[..., 3:, None]], -1)
    bottom = torch.zeros(*pose.shape[:-1], 1, 4, dtype=pose.dtype, device=pose.device)
    bottom[..., 0, 3] = 1
    return torch.cat([top, bottom], -2)


def matrix_to_pose(m: torch.Tensor) -> torch.Tensor:
    """``(..., 4, 4)`` rigid matrix → ``(..., 6)`` pose ``(ω, t)``."""
    return torch.cat([so3_log(m[..., :3, :3]), m[..., :3, 3]], -1)


def compose(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pose of ``p ↦ a(b(p))`` (apply ``b`` first): ``(..., 6), (..., 6) → (..., 6)``."""
    return matrix_to_pose(pose_to_matrix(a) @ pose_to_matrix(b))


def invert(a: torch.Tensor) -> torch.Tensor:
    """Inverse pose: ``(ω, t) ↦ (−ω, −R(ω)ᵀ t)``."""
    r = so3_exp(a[..., :3])
    return torch.cat([-a[..., :3], -(r.transpose(-1, -2) @ a[..., 3:, None]).squeeze(-1)], -1)


def se3_exp(xi: torch.Tensor) -> torch.Tensor:
    """Twist ``ξ = (v, ω)`` ``(..., 6)`` → ``(..., 4, 4)`` with ``t = J_l(ω) v``."""
    v, w = xi[..., :3], xi[..., 3:]
    t = (so3_left_jacobian(w) @ v[..., None]).squeeze(-1)
    return pose_to_matrix(torch.cat([w, t], -1))


def se3_log(m: torch.Tensor) -> torch.Tensor:
    """``(..., 4, 4)`` rigid matrix → twist ``(v, ω)`` ``(..., 6)``; inverse of :func:`se3_exp`."""
    w = so3_log(m[..., :3, :3])
    v = torch.linalg.solve(so3_left_jacobian(w), m[..., :3, 3:]).squeeze(-1)
    return torch.cat([v, w], -1)


def rotation_angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle (rad) of the relative rotation ``R_aᵀ R_b`` of two poses ``(..., 6)``."""
    rel = so3_exp(a[..., :3]).transpose(-1, -2) @ so3_exp(b[..., :3])
    cos = ((rel[..., 0, 0] + rel[..., 1, 1] + rel[..., 2, 2] - 1) / 2).clamp(-1.0, 1.0)
    return torch.acos(cos)


def geodesic_distance(a: torch.Tensor, b: torch.Tensor, rot_scale_mm: float = 1.0) -> torch.Tensor:
    """Geodesic distance on ``SO(3) × R³``: ``sqrt(ρ² |log(R_aᵀR_b)|² + |t_a − t_b|²)``.

    Args:
        a, b: ``(..., 6)`` poses.
        rot_scale_mm: ``ρ``, mm per radian of rotation.

    Returns:
        ``(...)`` distance (mm). Symmetric: ``log(R_bᵀR_a) = −log(R_aᵀR_b)``.
    """
    phi = so3_log(so3_exp(a[..., :3]).transpose(-1, -2) @ so3_exp(b[..., :3]))
    dt = a[..., 3:] - b[..., 3:]
    return torch.sqrt(rot_scale_mm**2 * (phi * phi).sum(-1) + (dt * dt).sum(-1))


def geodesic_grad(theta: torch.Tensor, target: torch.Tensor, rot_scale_mm: float = 1.0) -> torch.Tensor:
    """Gradient of the squared geodesic distance ``d(θ, θ*)²`` w.r.t. ``θ``, closed form.

    With ``φ = log(R*ᵀ R(ω))``: ``∂/∂ω = 2 ρ² J_r(ω)ᵀ φ`` (because ``J_r⁻¹(φ)ᵀ φ = φ``),
    ``∂/∂t = 2 (t − t*)``.

    Args:
        theta, target: ``(..., 6)`` poses.

    Returns:
        ``(..., 6)``; the negative points along the geodesic toward ``target``.
    """
    w = theta[..., :3]
    phi = so3_log(so3_exp(target[..., :3]).transpose(-1, -2) @ so3_exp(w))
    g_rot = 2 * rot_scale_mm**2 * (so3_right_jacobian(w).transpose(-1, -2) @ phi[..., None]).squeeze(-1)
    g_tr = 2 * (theta[..., 3:] - target[..., 3:])
    return torch.cat([g_rot, g_tr], -1)


def recentre(pose: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """The pose ``(..., 6)`` ``(ω, t)`` (rotation about the origin) in the chart that rotates
    about ``centre (..., 3)`` mm: ``(ω, t − c + R(ω) c)``. ``centre = 0`` is the identity."""
    c = centre.to(pose.dtype)
    rc = (so3_exp(pose[..., :3]) @ c[..., None]).squeeze(-1)
    return torch.cat([pose[..., :3], pose[..., 3:] - c + rc], -1)


def uncentre(pose: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`recentre`: chart pose ``(ω, t')`` about ``centre`` → ``(ω, t' + c − R(ω) c)``."""
    c = centre.to(pose.dtype)
    rc = (so3_exp(pose[..., :3]) @ c[..., None]).squeeze(-1)
    return torch.cat([pose[..., :3], pose[..., 3:] + c - rc], -1)
