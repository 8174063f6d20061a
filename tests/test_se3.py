"""SE(3) helpers against scipy (Rotation, expm) and autograd."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.spatial.transform import Rotation

from benchmark.core import se3


def _rotvecs(rng: np.random.Generator, n: int, max_angle: float = np.pi) -> np.ndarray:
    axis = rng.standard_normal((n, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    return axis * rng.uniform(0, max_angle, (n, 1))


def test_so3_exp_log_match_scipy(rng: np.random.Generator) -> None:
    w = _rotvecs(rng, 50, 3.1)
    w = np.concatenate([w, [[0, 0, 0], [1e-7, 0, 0], [0, 0, np.pi - 1e-5], [np.pi, 0, 0]]])
    r = se3.so3_exp(torch.from_numpy(w))
    np.testing.assert_allclose(r.numpy(), Rotation.from_rotvec(w).as_matrix(), atol=1e-10)
    back = se3.so3_log(r).numpy()
    # angle pi: w and -w are the same rotation
    np.testing.assert_allclose(Rotation.from_rotvec(back).as_matrix(), Rotation.from_rotvec(w).as_matrix(), atol=1e-7)
    np.testing.assert_allclose(back[:-2], w[:-2], atol=1e-7)
    # just inside the near-pi branch (1e-3 from pi) the axis was off by ~sin(theta)/2: 1e-3 rad
    n = np.array([0.3, 0.5, -0.8]) / np.linalg.norm([0.3, 0.5, -0.8])
    near = np.stack([n * (np.pi - e) for e in (2e-3, 1.1e-3, 9e-4, 5e-4, 1e-4)])
    got = se3.so3_log(se3.so3_exp(torch.from_numpy(near))).numpy()
    np.testing.assert_allclose(got, Rotation.from_rotvec(near).as_rotvec(), atol=1e-9)


def test_compose_invert_and_matrix(rng: np.random.Generator) -> None:
    a = torch.from_numpy(np.concatenate([_rotvecs(rng, 10, 2.0), rng.normal(0, 30, (10, 3))], 1))
    b = torch.from_numpy(np.concatenate([_rotvecs(rng, 10, 2.0), rng.normal(0, 30, (10, 3))], 1))
    p = torch.from_numpy(rng.normal(0, 50, (10, 3)))
    ma, mb = se3.pose_to_matrix(a), se3.pose_to_matrix(b)

    def apply(m, x):
        return (m[:, :3, :3] @ x[..., None]).squeeze(-1) + m[:, :3, 3]

    ab = se3.pose_to_matrix(se3.compose(a, b))
    np.testing.assert_allclose(apply(ab, p).numpy(), apply(ma, apply(mb, p)).numpy(), atol=1e-8)
    ident = se3.compose(a, se3.invert(a))
    np.testing.assert_allclose(ident.numpy(), np.zeros((10, 6)), atol=1e-8)
    np.testing.assert_allclose(se3.matrix_to_pose(ma).numpy(), a.numpy(), atol=1e-8)


def test_se3_exp_log_match_expm(rng: np.random.Generator) -> None:
    xi = np.concatenate([rng.normal(0, 20, (8, 3)), _rotvecs(rng, 8, 2.5)], 1)
    m = se3.se3_exp(torch.from_numpy(xi)).numpy()
    for k in range(8):
        tw = np.zeros((4, 4))
        tw[:3, :3] = se3.hat(torch.from_numpy(xi[k, 3:])).numpy()
        tw[:3, 3] = xi[k, :3]
        np.testing.assert_allclose(m[k], scipy.linalg.expm(tw), atol=1e-9)
    np.testing.assert_allclose(se3.se3_log(torch.from_numpy(m)).numpy(), xi, atol=1e-8)


def test_geodesic_distance_symmetric_and_matches_scipy(rng: np.random.Generator) -> None:
    a = torch.from_numpy(np.concatenate([_rotvecs(rng, 20, 3.0), rng.normal(0, 30, (20, 3))], 1))
    b = torch.from_numpy(np.concatenate([_rotvecs(rng, 20, 3.0), rng.normal(0, 30, (20, 3))], 1))
    dab = se3.geodesic_distance(a, b, rot_scale_mm=50.0)
    dba = se3.geodesic_distance(b, a, rot_scale_mm=50.0)
    np.testing.assert_allclose(dab.numpy(), dba.numpy(), rtol=1e-9)
    ang = (Rotation.from_rotvec(a[:, :3].numpy()).inv() * Rotation.from_rotvec(b[:, :3].numpy())).magnitude()
    expect = np.sqrt((50 * ang) ** 2 + ((a[:, 3:] - b[:, 3:]).numpy() ** 2).sum(1))
    np.testing.assert_allclose(dab.numpy(), expect, rtol=1e-8)
    np.testing.assert_allclose(se3.rotation_angle(a, b).numpy(), ang, atol=1e-8)
    assert float(se3.geodesic_distance(a, a).max()) < 1e-6


@pytest.mark.parametrize("rho", [1.0, 30.0])
def test_geodesic_grad_matches_autograd(rng: np.random.Generator, rho: float) -> None:
    theta = torch.from_numpy(np.concatenate([_rotvecs(rng, 16, 2.0), rng.normal(0, 30, (16, 3))], 1)).requires_grad_(True)
    target = torch.from_numpy(np.concatenate([_rotvecs(rng, 16, 2.0), rng.normal(0, 30, (16, 3))], 1))
    # keep relative rotations away from pi, where the distance is not differentiable
    rel = se3.rotation_angle(theta.detach(), target)
    keep = rel < 2.8
    d2 = (se3.geodesic_distance(theta, target, rho) ** 2)[keep].sum()
    (g_auto,) = torch.autograd.grad(d2, theta)
    g = se3.geodesic_grad(theta.detach(), target, rho)
    np.testing.assert_allclose(g[keep].numpy(), g_auto[keep].numpy(), rtol=1e-6, atol=1e-7)
    # a small step against the gradient shortens the distance
    step = theta.detach() - 1e-3 * g / g.norm(dim=-1, keepdim=True)
    assert bool((se3.geodesic_distance(step, target, rho) < se3.geodesic_distance(theta.detach(), target, rho))[keep].all())


def test_recentre_is_a_chart_about_the_centre(rng: np.random.Generator) -> None:
    """``uncentre`` inverts ``recentre``; the chart's rotation leaves its centre fixed (up to the
    chart translation); a zero centre is the identity; the rotation part never changes."""
    pose = torch.from_numpy(np.concatenate([rng.normal(0, 0.4, (5, 3)), rng.normal(0, 20, (5, 3))], 1))
    c = torch.from_numpy(rng.normal(0, 30, (5, 3)))
    chart = se3.recentre(pose, c)
    torch.testing.assert_close(se3.uncentre(chart, c), pose, rtol=0, atol=1e-12)
    torch.testing.assert_close(chart[:, :3], pose[:, :3], rtol=0, atol=0)
    assert torch.equal(se3.recentre(pose, torch.zeros(5, 3, dtype=torch.float64)), pose)
    # the point c moves by the chart translation alone: R c + t = c + t'
    m = se3.pose_to_matrix(pose)
    moved = (m[:, :3, :3] @ c[..., None]).squeeze(-1) + m[:, :3, 3]
    torch.testing.assert_close(moved, c + chart[:, 3:], rtol=0, atol=1e-9)
