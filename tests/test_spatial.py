"""Core spatial conventions of benchmark.core.spatial, checked against independent references
(scipy.ndimage, nibabel, SimpleITK, torch's own affine_grid, analytic maps).

Each test is built so that a wrong axis order, a push instead of a pull, a wrong
align_corners geometry or a wrong composition order would fail it. Grids are non-cubic
(7x9x11, 7x9) so that any swap of axes changes shapes or values.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

from benchmark.core.spatial import (
    affine_to_disp,
    compose,
    disp_to_grid,
    disp_to_mm,
    gaussian_smooth,
    grid_to_disp,
    identity_grid,
    integrate_velocity,
    mm_to_disp,
    resize_field,
    spacing_from_affine,
    voxel_to_world,
    warp,
    world_to_voxel,
)

SHAPES = {2: (7, 9), 3: (7, 9, 11)}


def _interior(nd: int, crop: int) -> tuple[slice, ...]:
    return (slice(None), slice(None)) + (slice(crop, -crop),) * nd


def _scipy_warp(image: np.ndarray, disp: np.ndarray, order: int, mode: str) -> np.ndarray:
    """Reference pull warp: ``out[b, c](x) = image[b, c](x + disp[b](x))`` by map_coordinates."""
    nd = disp.shape[1]
    ident = np.stack(np.meshgrid(*[np.arange(n) for n in disp.shape[2:]], indexing="ij"))
    out = np.empty(image.shape[:2] + disp.shape[2:], dtype=image.dtype)
    for b in range(image.shape[0]):
        coords = ident + disp[b]
        for c in range(image.shape[1]):
            out[b, c] = ndi.map_coordinates(image[b, c], coords.reshape(nd, -1), order=order, mode=mode,
                                            cval=0).reshape(disp.shape[2:])
    return out


def _jacobian_det(disp: np.ndarray) -> np.ndarray:
    """det of the Jacobian of ``x + u(x)`` by central differences (np.gradient), ``(ndim, *s)`` in."""
    nd = disp.shape[0]
    grads = np.stack([np.stack(np.gradient(disp[i]), 0) for i in range(nd)])  # [i, j] = du_i/dx_j
    jac = grads + np.eye(nd).reshape(nd, nd, *([1] * nd))
    return np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))


# --------------------------------------------------------------------------- warp


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("padding,scipy_mode", [("zeros", "grid-constant"), ("border", "nearest"),
                                                ("reflection", "mirror")])
def test_warp_matches_map_coordinates(nd: int, padding: str, scipy_mode: str, rng: np.random.Generator) -> None:
    shape = SHAPES[nd]
    image = rng.random((2, 2, *shape))
    disp = rng.uniform(-3.0, 3.0, (2, nd, *shape))  # reaches outside the grid: padding matters
    ours = warp(torch.from_numpy(image), torch.from_numpy(disp), padding_mode=padding).numpy()
    ref = _scipy_warp(image, disp, order=1, mode=scipy_mode)
    np.testing.assert_allclose(ours, ref, atol=1e-10)


@pytest.mark.parametrize("nd", [2, 3])
# Labels with zero padding follow Learn2Reg's scipy order-0 'constant' (outside [0, N-1] -> 0).
@pytest.mark.parametrize("padding,scipy_mode", [("zeros", "constant"), ("border", "nearest")])
def test_warp_nearest_labels_match_map_coordinates(nd: int, padding: str, scipy_mode: str,
                                                   rng: np.random.Generator) -> None:
    shape = SHAPES[nd]
    labels = rng.choice(np.array([0, 4, 1002, 2035]), size=(1, 1, *shape)).astype(np.int64)
    disp = rng.uniform(-2.0, 2.0, (1, nd, *shape))
    # Keep sample positions away from x.5 ties, where rounding conventions may differ.
    frac = np.mod(disp, 1.0)
    disp = np.where(np.abs(frac - 0.5) < 0.05, disp + 0.1, disp)
    lab_t = torch.from_numpy(labels)
    out = warp(lab_t, torch.from_numpy(disp), mode="nearest", padding_mode=padding)
    assert out.dtype == torch.int64
    ref = _scipy_warp(labels.astype(np.float64), disp, order=0, mode=scipy_mode)
    np.testing.assert_array_equal(out.numpy(), ref.astype(np.int64))
    # Integer labels are never blended, even with the default (bilinear) mode.
    default = warp(lab_t, torch.from_numpy(disp).float(), padding_mode=padding)
    np.testing.assert_array_equal(default.numpy(), out.numpy())
    assert set(np.unique(default.numpy())) <= {0, 4, 1002, 2035}
    for dt in (torch.int32, torch.uint8):
        small = warp(lab_t.clamp_max(200).to(dt), torch.from_numpy(disp), padding_mode=padding)
        assert small.dtype == dt


def test_warp_constant_shift_is_a_pull_along_the_channel_axis(rng: np.random.Generator) -> None:
    shape = SHAPES[3]
    image = torch.from_numpy(rng.random((1, 1, *shape)))
    # +1 voxel along array axis 0 (channel 0): out[i] = image[i + 1]; the last slice leaves the grid.
    disp = torch.zeros(1, 3, *shape, dtype=torch.float64)
    disp[:, 0] = 1.0
    out = warp(image, disp)
    torch.testing.assert_close(out[:, :, :-1], image[:, :, 1:])
    assert out[:, :, -1].abs().max() < 1e-12  # sampled at index N: zero padding
    # -1 voxel along array axis 2 (channel 2): out[..., k] = image[..., k - 1].
    disp = torch.zeros(1, 3, *shape, dtype=torch.float64)
    disp[:, 2] = -1.0
    out = warp(image, disp)
    torch.testing.assert_close(out[..., 1:], image[..., :-1])
    assert out[..., 0].abs().max() < 1e-12
    # 2D, channel 1 = last axis.
    img2 = torch.from_numpy(rng.random((1, 1, *SHAPES[2])))
    d2 = torch.zeros(1, 2, *SHAPES[2], dtype=torch.float64)
    d2[:, 1] = 2.0
    torch.testing.assert_close(warp(img2, d2)[..., :-2], img2[..., 2:])


def test_warp_batch_broadcast(rng: np.random.Generator) -> None:
    image = torch.from_numpy(rng.random((1, 1, *SHAPES[3])))
    disp = torch.from_numpy(rng.uniform(-1, 1, (3, 3, *SHAPES[3])))
    out = warp(image, disp)
    assert out.shape == (3, 1, *SHAPES[3])
    torch.testing.assert_close(out[2:3], warp(image, disp[2:3]))


# --------------------------------------------------------------------------- composition and integration


def test_compose_matches_sequential_warps_exactly_for_a_linear_image(smooth_field) -> None:
    """Linear interpolation commutes with affine maps, so for an image that is affine in the
    coordinates ``warp(warp(L, u), v) == warp(L, compose(u, v))`` holds to rounding error
    wherever no padding is involved; the opposite order is visibly different."""
    shape = (16, 18, 20)
    a = torch.tensor([[0.3, -0.2, 0.5], [0.1, 0.4, -0.3]], dtype=torch.float64)
    lin = torch.einsum("cd,d...->c...", a, identity_grid(shape, dtype=torch.float64)).unsqueeze(0) + 0.7
    u = smooth_field(shape, 3, 2.0, 2.0, seed=2)
    v = smooth_field(shape, 3, 2.0, 2.0, seed=3)
    inner = _interior(3, 4)  # |u|, |v| <= 2: every sample stays inside the grid
    seq = warp(warp(lin, u), v)[inner]
    torch.testing.assert_close(warp(lin, compose(u, v))[inner], seq, atol=1e-9, rtol=0)
    assert (warp(lin, compose(v, u))[inner] - seq).abs().max() > 0.02


def test_compose_smooth_image_and_identity(smooth_field) -> None:
    shape = (16, 18, 20)
    image = smooth_field(shape, 1, 1.0, 2.0, seed=1)
    u = smooth_field(shape, 3, 2.0, 3.0, seed=2)
    v = smooth_field(shape, 3, 2.0, 3.0, seed=3)
    inner = _interior(3, 4)
    err = (warp(warp(image, u), v) - warp(image, compose(u, v)))[inner].abs().max()
    assert err < 0.01
    zero = torch.zeros_like(u)
    torch.testing.assert_close(compose(u, zero), u)
    torch.testing.assert_close(compose(zero, u), u)


def test_compose_is_associative_for_smooth_fields(smooth_field) -> None:
    shape = (16, 18, 20)
    a, b, c = (smooth_field(shape, 3, 2.0, 2.0, seed=s) for s in (2, 3, 4))
    inner = _interior(3, 4)
    diff = (compose(compose(a, b), c) - compose(a, compose(b, c)))[inner].abs()
    assert diff.max() < 0.03 and diff.mean() < 0.003


def test_integrate_velocity_is_diffeomorphic_and_invertible(smooth_field) -> None:
    shape = (16, 18, 20)
    vel = smooth_field(shape, 3, 6.0, 2.0, seed=5)
    inside = (slice(1, -1),) * 3
    # The velocity used directly as a displacement folds; its exponential must not.
    assert _jacobian_det(vel[0].numpy())[inside].min() < 0
    phi = integrate_velocity(vel, steps=7)
    assert _jacobian_det(phi[0].numpy())[inside].min() > 0.1
    inv = integrate_velocity(-vel, steps=7)
    inner = _interior(3, 4)
    for residual in (compose(phi, inv)[inner], compose(inv, phi)[inner]):
        assert residual.abs().max() < 0.15 and residual.abs().mean() < 0.02
    torch.testing.assert_close(integrate_velocity(vel, steps=0), vel)


# --------------------------------------------------------------------------- resizing and affines


@pytest.mark.parametrize("new_shape", [(9, 13, 21), (4, 5, 6)])
def test_resize_field_keeps_a_linear_map(new_shape: tuple[int, ...], rng: np.random.Generator) -> None:
    old_shape = (5, 7, 11)
    a = rng.uniform(-0.3, 0.3, (3, 3))
    t = rng.uniform(-1, 1, 3)
    x = identity_grid(old_shape, dtype=torch.float64).numpy()
    u_old = np.einsum("de,e...->d...", a, x) + t.reshape(3, 1, 1, 1)
    u_new = resize_field(torch.from_numpy(u_old)[None], new_shape)[0].numpy()
    # New voxel y sits at old position y / f with f_e = (new_e - 1) / (old_e - 1); one old voxel
    # along axis d is f_d new voxels.
    f = np.array([(n - 1) / (o - 1) for n, o in zip(new_shape, old_shape)])
    y = identity_grid(new_shape, dtype=torch.float64).numpy()
    expect = (np.einsum("de,e...->d...", a, y / f.reshape(3, 1, 1, 1)) + t.reshape(3, 1, 1, 1)) * f.reshape(3, 1, 1, 1)
    np.testing.assert_allclose(u_new, expect, atol=1e-10)


def test_affine_to_disp_matches_scipy_affine_transform(rng: np.random.Generator) -> None:
    shape = SHAPES[3]
    image = rng.random(shape)
    ang = 0.2
    rot = np.array([[1, 0, 0], [0, np.cos(ang), -np.sin(ang)], [0, np.sin(ang), np.cos(ang)]])
    m = np.eye(4)
    m[:3, :3] = rot @ np.diag([1.1, 0.9, 1.05])
    m[:3, 3] = [0.7, -1.3, 0.4]
    disp = affine_to_disp(m, shape)
    assert disp.shape == (1, 3, *shape)
    ours = warp(torch.from_numpy(image)[None, None].float(), disp)[0, 0].numpy()
    # scipy: out[o] = in[M o + t]; 'grid-constant' = zero padding with interpolation at the edge,
    # like grid_sample's zeros padding.
    ref = ndi.affine_transform(image, m[:3, :3], m[:3, 3], order=1, mode="grid-constant")
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    # 2D with a 3x3 matrix.
    img2 = rng.random(SHAPES[2])
    m2 = np.array([[0.95, 0.2, 0.5], [-0.1, 1.1, -0.8], [0, 0, 1.0]])
    ours2 = warp(torch.from_numpy(img2)[None, None].float(), affine_to_disp(m2, SHAPES[2]))[0, 0].numpy()
    ref2 = ndi.affine_transform(img2, m2[:2, :2], m2[:2, 2], order=1, mode="grid-constant")
    np.testing.assert_allclose(ours2, ref2, atol=2e-5)


def _rotated_anisotropic_affine() -> tuple[np.ndarray, np.ndarray]:
    spacing = np.array([0.7, 1.2, 2.5])
    ax = np.array([1.0, 2.0, 0.5])
    ax /= np.linalg.norm(ax)
    k = np.array([[0, -ax[2], ax[1]], [ax[2], 0, -ax[0]], [-ax[1], ax[0], 0]])
    rot = np.eye(3) + np.sin(0.6) * k + (1 - np.cos(0.6)) * k @ k  # Rodrigues
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(spacing)
    aff[:3, 3] = [-90.0, 12.5, 40.0]
    return aff, spacing


def test_voxel_world_round_trip_matches_nibabel(rng: np.random.Generator) -> None:
    from nibabel.affines import apply_affine, voxel_sizes

    aff, spacing = _rotated_anisotropic_affine()
    pts = rng.uniform(0, 50, (20, 3))
    world = voxel_to_world(pts, aff)
    np.testing.assert_allclose(world.numpy(), apply_affine(aff, pts), atol=1e-10)
    np.testing.assert_allclose(world_to_voxel(world, aff).numpy(), pts, atol=1e-10)
    np.testing.assert_allclose(spacing_from_affine(aff), spacing, atol=1e-12)
    np.testing.assert_allclose(spacing_from_affine(torch.from_numpy(aff)), voxel_sizes(aff), atol=1e-12)
    aff2 = np.array([[0, -0.5, 10.0], [2.0, 0, -3.0], [0, 0, 1]])
    p2 = rng.uniform(0, 9, (5, 2))
    np.testing.assert_allclose(voxel_to_world(p2, aff2).numpy(), apply_affine(aff2, p2), atol=1e-10)
    assert spacing_from_affine(aff2) == pytest.approx((2.0, 0.5))


# --------------------------------------------------------------------------- grid_sample and mm converters


@pytest.mark.parametrize("nd", [2, 3])
def test_disp_to_grid_geometry_and_round_trip(nd: int, rng: np.random.Generator) -> None:
    shape = SHAPES[nd]
    zero = torch.zeros(1, nd, *shape, dtype=torch.float64)
    theta = torch.eye(nd, nd + 1, dtype=torch.float64)[None]
    ident = F.affine_grid(theta, [1, 1, *shape], align_corners=True)
    torch.testing.assert_close(disp_to_grid(zero), ident)
    # Voxel (1, 2[, 3]) in xyz-normalised coordinates, by hand: reversed axes, 2 i / (N - 1) - 1.
    idx = (1, 2, 3)[:nd]
    expect = torch.tensor([2 * i / (n - 1) - 1 for i, n in zip(idx, shape)][::-1], dtype=torch.float64)
    torch.testing.assert_close(disp_to_grid(zero)[(0, *idx)], expect)
    u = torch.from_numpy(rng.uniform(-2, 2, (2, nd, *shape)))
    torch.testing.assert_close(grid_to_disp(disp_to_grid(u)), u)
    image = torch.from_numpy(rng.random((2, 3, *shape)))
    torch.testing.assert_close(F.grid_sample(image, disp_to_grid(u), align_corners=True), warp(image, u))


def test_disp_mm_hand_case_and_round_trip(rng: np.random.Generator) -> None:
    # Array axis 0 runs along world y (0.8 mm), axis 1 along world z (1.5 mm), axis 2 along -x (2 mm).
    aff = np.array([[0, 0, -2.0, 10], [0.8, 0, 0, -5], [0, 1.5, 0, 3], [0, 0, 0, 1]])
    u = torch.zeros(1, 3, 2, 3, 4, dtype=torch.float64)
    u[:, 0], u[:, 1], u[:, 2] = 1.0, 2.0, 3.0
    mm = disp_to_mm(u, aff)
    expect = torch.tensor([-6.0, 0.8, 3.0], dtype=torch.float64).view(1, 3, 1, 1, 1).expand_as(u)
    torch.testing.assert_close(mm, expect)
    torch.testing.assert_close(mm_to_disp(mm, aff), u)
    aff2, _ = _rotated_anisotropic_affine()
    v = torch.from_numpy(rng.normal(size=(2, 3, 4, 5, 6)))
    torch.testing.assert_close(mm_to_disp(disp_to_mm(v, aff2), aff2), v)
    # The mm vector is the world difference between a voxel and its displaced position.
    p = np.array([[1.0, 2.0, 3.0]])
    d = v[0, :, 1, 2, 3].numpy()
    diff = voxel_to_world(p + d, aff2).numpy() - voxel_to_world(p, aff2).numpy()
    np.testing.assert_allclose(disp_to_mm(v, aff2)[0, :, 1, 2, 3].numpy(), diff[0], atol=1e-10)


# --------------------------------------------------------------------------- smoothing


@pytest.mark.parametrize("nd", [2, 3])
def test_gaussian_smooth_matches_scipy(nd: int, rng: np.random.Generator) -> None:
    shape = (9, 11, 13)[:nd]
    sigma = (1.0, 1.5, 2.0)[:nd]  # radii ceil(3 s) and scipy's int(3 s + 0.5) agree for these
    x = rng.random((2, 2, *shape))
    ours = gaussian_smooth(torch.from_numpy(x), sigma, truncate=3.0).numpy()
    ref = np.stack([[ndi.gaussian_filter(x[b, c], sigma, mode="nearest", truncate=3.0) for c in range(2)]
                    for b in range(2)])
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    # One axis skipped with sigma 0.
    ours0 = gaussian_smooth(torch.from_numpy(x), (0.0,) + sigma[1:], truncate=3.0).numpy()
    ref0 = ndi.gaussian_filter(x[0, 0], (0.0,) + sigma[1:], mode="nearest", truncate=3.0)
    np.testing.assert_allclose(ours0[0, 0], ref0, atol=1e-6)


# --------------------------------------------------------------------------- SimpleITK


@pytest.mark.parametrize("nd", [2, 3])
def test_warp_matches_simpleitk_displacement_field(nd: int, smooth_field) -> None:
    sitk = pytest.importorskip("SimpleITK")
    shape = SHAPES[nd]
    image = smooth_field(shape, 1, 1.0, 1.0, seed=7)[0, 0].numpy() + 1.0
    u = smooth_field(shape, nd, 1.5, 1.5, seed=8)[0].numpy()  # (nd, *shape) voxels
    spacing_arr = np.array([0.8, 1.3, 2.1][:nd])  # per array axis
    origin_xyz = (12.0, -4.0, 7.5)[:nd]

    img = sitk.GetImageFromArray(image)  # sitk x = last array axis
    img.SetSpacing(tuple(float(s) for s in spacing_arr[::-1]))
    img.SetOrigin(origin_xyz)
    # Physical displacement in sitk (x, y[, z]) order: reversed array channels, times spacing.
    phys = (u * spacing_arr.reshape(nd, *([1] * nd)))[::-1]
    field = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(phys, 0, -1)), isVector=True)
    field = sitk.Cast(field, sitk.sitkVectorFloat64)
    field.CopyInformation(img)
    tx = sitk.DisplacementFieldTransform(field)
    ref = sitk.GetArrayFromImage(sitk.Resample(img, img, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat64))

    ours = warp(torch.from_numpy(image)[None, None], torch.from_numpy(u)[None])[0, 0].numpy()
    # ITK and grid_sample treat the half-voxel rim outside the grid differently: compare where
    # every sample position x + u(x) lies inside [0, N - 1].
    pos = identity_grid(shape, dtype=torch.float64).numpy() + u
    inside = np.all([(pos[d] >= 0) & (pos[d] <= shape[d] - 1) for d in range(nd)], axis=0)
    assert inside.mean() > 0.6
    np.testing.assert_allclose(ours[inside], ref[inside], atol=1e-8)


def test_voxel_to_grid_coords_reads_the_indexed_voxel():
    """grid_sample at the converted coordinates of voxel (i, j, k) returns vol[i, j, k]
    (catches a missing axis reversal or an align_corners slip); vectors get no offset."""
    import torch.nn.functional as F

    from benchmark.core.spatial import voxel_to_grid_coords

    shape = (5, 7, 4)
    vol = torch.arange(5 * 7 * 4, dtype=torch.float64).reshape(1, 1, *shape)
    idx = torch.tensor([[0, 0, 0], [4, 6, 3], [1, 5, 2], [3, 2, 1]], dtype=torch.float64)
    g = voxel_to_grid_coords(idx, shape).view(1, -1, 1, 1, 3)
    got = F.grid_sample(vol, g, mode="nearest", align_corners=True).flatten()
    assert torch.equal(got, vol[0, 0, idx[:, 0].long(), idx[:, 1].long(), idx[:, 2].long()])
    a, b = idx[1], idx[2]
    diff = voxel_to_grid_coords(b, shape) - voxel_to_grid_coords(a, shape)
    assert torch.allclose(voxel_to_grid_coords(b - a, shape, vector=True), diff)


def test_sampling_grid_is_the_textbook_construction_bit_for_bit() -> None:
    """``warp``'s grid (per-channel ramps, fewer temporaries) equals ``(identity + u) · 2/(N-1) - 1``
    with the axes reversed, exactly, 2D and 3D, also when the sampled volume's shape differs:
    results computed before the rewrite stay reproducible."""
    from benchmark.core.spatial import _sampling_grid, identity_grid

    g = torch.Generator().manual_seed(0)
    for out_shape, in_shape in [((17, 23, 9), (17, 23, 9)), ((31, 12), (31, 12)), ((8, 6, 5), (16, 12, 10)),
                                ((1, 9, 6), (1, 9, 6))]:
        nd = len(out_shape)
        u = torch.randn(2, nd, *out_shape, generator=g) * 5
        pos = identity_grid(out_shape).unsqueeze(0) + u
        scale = torch.tensor([2.0 / max(n - 1, 1) for n in in_shape]).view(1, nd, *([1] * nd))
        want = (pos * scale - 1.0).movedim(1, -1).flip(-1)
        assert torch.equal(_sampling_grid(u, in_shape), want)
