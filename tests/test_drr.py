"""DRR renderer and point projection: analytic spot positions, exact rotations, finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from benchmark.core import se3
from benchmark.core.drr import CArmGeometry, hu_to_mu, pose_transform, project_points, reference_transform, render, render_pose

pytestmark = pytest.mark.usefixtures("one_thread")


def _centred_affine(n: int, spacing: float) -> torch.Tensor:
    aff = torch.eye(4, dtype=torch.float64) * spacing
    aff[3, 3] = 1
    aff[:3, 3] = -spacing * (n - 1) / 2
    return aff


def _smooth_volume(n: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = np.random.default_rng(seed)
    v = ndi.gaussian_filter(g.standard_normal((n, n, n)), 2.0)
    v = (v - v.min()) / (v.max() - v.min())
    # fade to zero at the border so nothing depends on the box edges
    ramp = np.minimum(np.arange(n), np.arange(n)[::-1]) / 4.0
    fade = np.clip(ramp, 0, 1)
    v = v * fade[:, None, None] * fade[None, :, None] * fade[None, None, :]
    return torch.from_numpy(v).to(dtype)[None, None]


@pytest.mark.parametrize("method", ["trilinear", "slices"])
@pytest.mark.parametrize("voxel", [(10, 20, 5), (16, 3, 27), (25, 25, 12)])
def test_single_bright_voxel_lands_at_projection(voxel: tuple[int, int, int], method: str) -> None:
    geom = CArmGeometry(sdd=1000.0, sid=700.0, height=48, width=40, dely=4.0, delx=3.5)
    n, sp = 32, 4.0
    vol = torch.zeros(1, 1, n, n, n)
    vol[0, 0, voxel[0], voxel[1], voxel[2]] = 1.0
    aff = _centred_affine(n, sp)
    base = reference_transform(torch.tensor([3.0, -5.0, 2.0]))
    pose = torch.tensor([[0.15, -0.2, 0.1, 6.0, -4.0, 25.0]], dtype=torch.float64)
    t = pose_transform(pose, base)
    img = render(vol, aff, t, geom, n_samples=400, method=method)[0, 0].double()
    world = (aff @ torch.tensor([*voxel, 1.0], dtype=torch.float64))[:3]
    expect = project_points(world[None, None], t, geom)[0, 0].numpy()
    # independent pinhole: intersect the source→point line with the detector plane by hand
    q = (t[0, :3, :3] @ world + t[0, :3, 3]).numpy()
    src = np.array([0, 0, -700.0])
    lam = (1000.0 - 700.0 - src[2]) / (q[2] - src[2])
    hit = src + lam * (q - src)
    np.testing.assert_allclose(expect, [hit[1] / 4.0 + 23.5, hit[0] / 3.5 + 19.5], atol=1e-9)
    ii, jj = np.meshgrid(np.arange(48), np.arange(40), indexing="ij")
    m = img.numpy()
    assert m.sum() > 0
    centroid = [(m * ii).sum() / m.sum(), (m * jj).sum() / m.sum()]
    np.testing.assert_allclose(centroid, expect, atol=0.15)
    assert np.unravel_index(m.argmax(), m.shape) == tuple(np.round(expect).astype(int))
    # the line integral of a unit voxel (trilinear blob) is about its volume / pixel area * magnification
    mag = 1000.0 / (q[2] + 700.0)
    # (the slice method's footprint is a 2D tent, coarsely sampled by these pixels: its sum is
    # only roughly the integral; amplitudes are checked exactly by the Gaussian test below)
    np.testing.assert_allclose(m.sum() * 4.0 * 3.5, sp**3 * mag**2, rtol=0.05 if method == "trilinear" else 0.1)


@pytest.mark.parametrize("axes,k", [((0, 1), 1), ((1, 2), 1), ((0, 2), 3)])
def test_rotated_volume_equals_inverse_pose(axes: tuple[int, int], k: int) -> None:
    n = 24
    geom = CArmGeometry(sdd=900.0, height=32, width=32, dely=4.0, delx=4.0)
    vol = _smooth_volume(n)
    aff = _centred_affine(n, 3.0)
    base = reference_transform(torch.zeros(3))
    rot = torch.from_numpy(np.ascontiguousarray(np.rot90(vol[0, 0].numpy(), k, axes)))[None, None]
    # rot90 of the array = the volume read through G: out(p) = V(G p) in centred world coords
    idx = np.indices((n, n, n)).reshape(3, -1).T.astype(float) - (n - 1) / 2
    # G from the definition of rot90 (maps out-index to in-index), built numerically
    ar = np.arange(n**3).reshape(n, n, n)
    ro = np.rot90(ar, k, axes)
    src_idx = np.stack(np.unravel_index(ro.reshape(-1), (n, n, n)), 1).astype(float) - (n - 1) / 2
    g, *_ = np.linalg.lstsq(idx, src_idx, rcond=None)
    g = g.T
    np.testing.assert_allclose(idx @ g.T, src_idx, atol=1e-9)
    r0 = base[:3, :3].numpy()
    pose_rot = se3.so3_log(torch.from_numpy(r0 @ g.T @ r0.T))
    pose = torch.cat([pose_rot, torch.tensor([4.0, -6.0, 10.0], dtype=torch.float64)])[None]
    shift = se3.pose_to_matrix(torch.tensor([[0, 0, 0, 4.0, -6.0, 10.0]], dtype=torch.float64))
    a = render(rot, aff, shift @ base[None], geom, n_samples=96)
    b = render_pose(vol, aff, pose, base[None], geom, n_samples=96)
    assert float(a.abs().max()) > 0.1
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-5 * float(a.abs().max()) + 1e-6)
    # and not equal to rendering the unrotated volume at the reference (the test can fail)
    c = render(vol, aff, shift @ base[None], geom, n_samples=96)
    assert float((a - c).abs().max()) > 0.05 * float(a.abs().max())


@pytest.mark.parametrize("method", ["trilinear", "slices"])
def test_pose_gradient_matches_finite_differences(method: str) -> None:
    n = 16
    geom = CArmGeometry(sdd=800.0, height=12, width=14, dely=6.0, delx=5.0)
    vol = _smooth_volume(n, seed=3, dtype=torch.float64)
    aff = _centred_affine(n, 4.0)
    base = reference_transform(torch.tensor([1.0, 2.0, -1.0]))[None]
    w = torch.from_numpy(np.random.default_rng(5).standard_normal((1, 1, 12, 14)))
    pose = torch.tensor([[0.1, -0.05, 0.2, 3.0, 2.0, -8.0]], dtype=torch.float64, requires_grad=True)

    def f(p: torch.Tensor) -> torch.Tensor:
        return (render_pose(vol, aff, p, base, geom, n_samples=40, method=method) * w).sum()

    (g,) = torch.autograd.grad(f(pose), pose)
    fd = np.zeros(6)
    for i in range(6):
        # small steps: the sum of trilinear samples has kinks where a sample crosses a grid
        # plane, and a 1e-3 mm step straddled one here (float64 keeps 1e-5 exact enough)
        h = 1e-5
        e = torch.zeros(1, 6, dtype=torch.float64)
        e[0, i] = h
        fd[i] = (float(f(pose.detach() + e)) - float(f(pose.detach() - e))) / (2 * h)
    np.testing.assert_allclose(g[0].numpy(), fd, rtol=2e-3, atol=1e-4 * np.abs(fd).max())
    # gradient w.r.t. the volume: the renderer is linear in it
    v = vol.clone().requires_grad_(True)
    out = (render_pose(v, aff, pose.detach(), base, geom, n_samples=40, method=method) * w).sum()
    (gv,) = torch.autograd.grad(out, v)
    np.testing.assert_allclose(float((gv * vol).sum()), float(out.detach()), rtol=1e-9)


@pytest.mark.parametrize("method", ["trilinear", "slices"])
def test_batched_chunked_and_per_pose_volumes_agree(method: str) -> None:
    n = 20
    geom = CArmGeometry(sdd=900.0, height=16, width=18, dely=5.0, delx=5.0)
    vol = _smooth_volume(n, seed=1)
    aff = _centred_affine(n, 3.0)
    base = reference_transform(torch.zeros(3))[None]
    poses = torch.tensor([[0.0, 0, 0, 0, 0, 0], [0.2, 0.1, -0.3, 5, -5, 30], [-0.4, 0.3, 0.1, -10, 4, -20]], dtype=torch.float64)
    full = render_pose(vol, aff, poses, base, geom, n_samples=50, method=method)
    chunked = render_pose(vol, aff, poses, base, geom, n_samples=50, chunk_points=777, method=method)
    per = torch.cat([render_pose(vol, aff, poses[i : i + 1], base, geom, n_samples=50, method=method) for i in range(3)])
    vols = render_pose(vol.expand(3, -1, -1, -1, -1), aff, poses, base, geom, n_samples=50, method=method)
    for other in (chunked, per, vols):
        np.testing.assert_allclose(other.numpy(), full.numpy(), rtol=1e-5, atol=1e-6)
    assert float((full[0] - full[1]).abs().max()) > 0.01
    # checkpointed chunks give the same gradient
    p = poses.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(render_pose(vol, aff, p, base, geom, 50, chunk_points=999, method=method).sum(), p)
    (g2,) = torch.autograd.grad(render_pose(vol, aff, p, base, geom, 50, chunk_points=999, checkpoint=True,
                                            method=method).sum(), p)
    np.testing.assert_allclose(g1.numpy(), g2.numpy(), rtol=1e-5)


@pytest.mark.parametrize("rotation", [(0.0, 0.0, 0.0), (0.0, 1.2, 0.0), (1.3, 0.0, 0.3), (0.3, -0.2, 0.7)])
def test_gaussian_line_integrals_match_the_analytic_value(rotation: tuple[float, float, float]) -> None:
    """A 3D Gaussian's line integral is ``√(2π) σ exp(−d² / 2σ²)`` (``d``: the ray's distance
    from the centre, mm). Both methods, at poses whose rays run along each volume axis (so
    the slice method's dominant axis changes), against that formula, pixel by pixel."""
    n, sp, sigma = 40, 3.0, 12.0  # sigma in mm (4 voxels)
    geom = CArmGeometry(sdd=1000.0, sid=600.0, height=30, width=34, dely=4.0, delx=4.0)
    aff = _centred_affine(n, sp)
    centre = np.array([6.0, -9.0, 4.5])  # CT world mm
    world = (np.indices((n, n, n)).reshape(3, -1).T * sp - sp * (n - 1) / 2)
    vol = np.exp(-((world - centre) ** 2).sum(1) / (2 * sigma**2)).reshape(n, n, n)
    vol_t = torch.from_numpy(vol).float()[None, None]
    base = reference_transform(torch.zeros(3))[None]
    pose = torch.tensor([[*rotation, 5.0, -3.0, 20.0]], dtype=torch.float64)
    t = pose_transform(pose, base)[0].numpy()
    # each pixel's ray in CT world: source and pixel of the C-arm frame mapped back through T
    rinv, tr = t[:3, :3].T, t[:3, 3]
    src = rinv @ (np.array([0.0, 0.0, -600.0]) - tr)
    ii, jj = np.meshgrid(np.arange(30), np.arange(34), indexing="ij")
    pix_c = np.stack([(jj - 16.5) * 4.0, (ii - 14.5) * 4.0, np.full(ii.shape, 400.0)], -1).reshape(-1, 3)
    pix = (pix_c - tr) @ rinv.T
    u = (pix - src) / np.linalg.norm(pix - src, axis=1, keepdims=True)
    w = centre - src
    dist2 = (w**2).sum() - (w @ u.T) ** 2
    truth = (np.sqrt(2 * np.pi) * sigma * np.exp(-dist2 / (2 * sigma**2))).reshape(30, 34)
    assert truth.max() > 15.0 and truth.min() < 0.05 * truth.max()  # the blob is in view, not everywhere
    for method in ("trilinear", "slices"):
        img = render_pose(vol_t, aff, pose, base, geom, n_samples=200, method=method)[0, 0].double().numpy()
        err = np.abs(img - truth)
        assert err.max() < 0.02 * truth.max(), (method, err.max() / truth.max())


@pytest.mark.parametrize("method", ["trilinear", "slices"])
@pytest.mark.parametrize("pose", [[0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.3, 0.2, -0.1, 3.0, -4.0, 10.0]])
def test_a_ray_through_a_ct_filled_to_its_edges_integrates_every_voxel(method: str, pose: list[float]) -> None:
    """A CT of constant attenuation filling its whole grid (real CTs are cut through tissue at
    the top and bottom): every pixel is the chord length of the ray through the voxel box
    (the faces half a voxel beyond the outer centres) times μ. The trilinear renderer clipped
    rays at the outer voxel centres and lost half a voxel at each end (3 % here)."""
    n, sp, mu = 32, 2.0, 0.02
    geom = CArmGeometry(sdd=1000.0, height=9, width=9, dely=4.0, delx=4.0)
    vol = torch.full((1, 1, n, n, n), mu, dtype=torch.float64)
    aff = _centred_affine(n, sp)
    base = reference_transform(torch.zeros(3))[None]
    p = torch.tensor([pose], dtype=torch.float64)
    img = render_pose(vol, aff, p, base, geom, n_samples=400, method=method)[0, 0]
    # each ray (source -> pixel centre, C-arm frame) in the CT's voxel frame through general
    # 4x4 inverses, cut by the voxel box's faces at -0.5 and n - 0.5
    to_vox = torch.linalg.inv(aff) @ torch.linalg.inv(pose_transform(p, base)[0])
    src_c, pix_c = geom.source(), geom.pixel_positions().reshape(-1, 3)
    src = to_vox[:3, :3] @ src_c + to_vox[:3, 3]
    d = pix_c @ to_vox[:3, :3].T + to_vox[:3, 3] - src
    t0, t1 = (-0.5 - src) / d, (n - 0.5 - src) / d
    near = torch.minimum(t0, t1).amax(-1).clamp_min(0)
    far = torch.maximum(t0, t1).amin(-1).clamp_max(1)
    chord_mm = ((far - near).clamp_min(0) * (pix_c - src_c).norm(dim=-1)).reshape(img.shape)
    inner = (slice(2, -2), slice(2, -2))  # away from rays grazing the box's edges
    np.testing.assert_allclose(img[inner].numpy(), (mu * chord_mm)[inner].numpy(), rtol=3e-3)


def test_slices_count_only_crossings_between_source_and_pixel() -> None:
    """A source inside the CT (the part behind it must not count): the slice method agrees
    with the trilinear one, which clips each ray at the source."""
    n, sp = 40, 3.0
    vol = _smooth_volume(n, seed=4)
    aff = _centred_affine(n, sp)
    base = reference_transform(torch.zeros(3))[None]
    pose = torch.tensor([[0.2, -0.1, 0.05, 2.0, -1.0, 0.0]], dtype=torch.float64)
    inside = CArmGeometry(sdd=300.0, sid=30.0, height=20, width=22, dely=8.0, delx=8.0)  # source 30 mm from the centre
    tri = render_pose(vol, aff, pose, base, inside, n_samples=600)
    sli = render_pose(vol, aff, pose, base, inside, method="slices")
    rel = float((sli - tri).abs().max() / tri.abs().max())
    assert rel < 0.03, rel  # (counting the crossings behind the source too: 0.28)


def test_hu_to_mu() -> None:
    hu = torch.tensor([-2000.0, -1000.0, 0.0, 1000.0])
    np.testing.assert_allclose(hu_to_mu(hu, mu_water=0.02).numpy(), [0, 0, 0.02, 0.04], atol=1e-9)


def test_attenuation_centroid_matches_scipy_and_is_the_fixed_point_of_a_rotation_about_it() -> None:
    """The centroid against scipy's centre of mass mapped through the affine and the reference
    placement; then the geometric meaning of the chart: a pose turning about the centroid leaves
    the rendered image's mass where it was, one turning about the isocentre moves it."""
    from benchmark.core.drr import attenuation_centroid

    n, sp = 32, 4.0
    vol = torch.zeros(1, 1, n, n, n)
    vol[0, 0, 18:24, 8:13, 20:25] = 1.0  # an off-centre block, 20–30 mm from the isocentre
    vol[0, 0, 10:12, 14:16, 6:8] = 0.5
    aff = _centred_affine(n, sp)
    aff[:3, :3] = aff[:3, :3] @ torch.tensor([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    b = reference_transform(torch.tensor([3.0, -5.0, 2.0]))  # (4, 4)
    base = b[None]
    c = attenuation_centroid(vol, aff[None], base)[0]
    com = np.array(ndi.center_of_mass(vol[0, 0].numpy()))
    expect = (b[:3, :3] @ (aff[:3, :3] @ torch.from_numpy(com) + aff[:3, 3]) + b[:3, 3]).numpy()
    np.testing.assert_allclose(c.numpy(), expect, atol=1e-9)
    assert torch.all(attenuation_centroid(torch.zeros(1, 1, 4, 4, 4), aff[None], base) == 0)

    geom = CArmGeometry(sdd=1000.0, sid=700.0, height=48, width=48, dely=4.0, delx=4.0)
    ii, jj = np.meshgrid(np.arange(48), np.arange(48), indexing="ij")

    def image_centre(pose: torch.Tensor) -> np.ndarray:
        m = render_pose(vol.double(), aff, pose, base, geom, n_samples=256)[0, 0].numpy()
        return np.array([(m * ii).sum() / m.sum(), (m * jj).sum() / m.sum()])

    at_rest = image_centre(torch.zeros(1, 6, dtype=torch.float64))
    turn = torch.tensor([[0.0, 0.15, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)  # out of plane, about the C-arm y axis
    about_centroid = image_centre(se3.uncentre(turn, c[None]))
    about_isocentre = image_centre(turn)
    assert np.abs(about_centroid - at_rest).max() < 0.3  # pixels: perspective only
    assert np.abs(about_isocentre - at_rest).max() > 1.0  # the same turn about the isocentre shifts the shadow
