"""Tests of the ANTs-style greedy SyN (``systems.syn``) on small synthetic volumes.

Truth is independent of the code under test where it can be: label warping and the
Jacobian determinant are done with scipy / numpy here; the true deformation is the
analytic flow of a known smooth velocity field (whose inverse is the flow of ``-v``).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from benchmark.core.losses import local_ncc
from benchmark.core.spatial import compose, integrate_velocity, warp
from benchmark.core.metrics import displacement_jacobian
from systems.syn import SYN_PRESETS, GreedySyN, SyN, invert_displacement, local_ncc_and_grad, log_jacobian_penalty

TEST_SYN = dict(scales=(2, 1), iterations=(80, 40), lr=0.25, smooth_grad_sigma=1.0, smooth_warp_sigma=0.5)


def _phantom(shape: tuple[int, ...], spacing: tuple[float, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Label map (0..3) and image of nested, offset ellipsoids defined in mm (field of view
    fixed by ``shape * spacing``), plus a smooth texture so CC has something inside."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    r1 = np.sqrt((x / 15) ** 2 + (y / 13) ** 2 + (z / 14) ** 2)
    r2 = np.sqrt(((x - 3) / 7) ** 2 + ((y + 2) / 8) ** 2 + ((z - 1) / 6) ** 2)
    r3 = np.sqrt(((x + 5) / 4) ** 2 + ((y - 5) / 4) ** 2 + ((z + 4) / 5) ** 2)
    lab = np.zeros(shape, np.int64)
    lab[r1 < 1] = 1
    lab[r2 < 1] = 2
    lab[r3 < 1] = 3
    tex = 0.15 * np.sin(x / 2.5) * np.cos(y / 3.0) * np.sin(z / 2.0 + 1.0)
    img = np.array([0.0, 0.5, 1.0, 0.25])[lab] + tex * (lab > 0)
    sig = [1.0 / s for s in spacing]
    return lab, ndi.gaussian_filter(img, sig).astype(np.float32)


def _velocity_mm(shape: tuple[int, ...], spacing: tuple[float, ...], amp: float = 2.5) -> np.ndarray:
    """A smooth analytic velocity field in mm, ``(3, *shape)``, vanishing at the borders."""
    axes = [np.linspace(0, np.pi, n) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    env = np.sin(x) * np.sin(y) * np.sin(z)
    v = np.stack([np.sin(2 * y + 0.3) * env, np.cos(2 * z) * env, np.sin(2 * x + 1.0) * env])
    return (amp * v).astype(np.float32)


def _to_vox(v_mm: np.ndarray, spacing: tuple[float, ...]) -> torch.Tensor:
    return torch.from_numpy(v_mm / np.asarray(spacing, np.float32).reshape(3, 1, 1, 1)).unsqueeze(0)


def _scipy_warp_labels(lab: np.ndarray, disp: torch.Tensor) -> np.ndarray:
    """Nearest-neighbour pull warp with scipy: ``out(x) = lab(x + u(x))``."""
    u = disp[0].detach().cpu().double().numpy()
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in lab.shape], indexing="ij")).astype(np.float64)
    return ndi.map_coordinates(lab, grid + u, order=0, mode="nearest")


def _dice(a: np.ndarray, b: np.ndarray, labels=(1, 2, 3)) -> float:
    return float(np.mean([2 * np.sum((a == k) & (b == k)) / (np.sum(a == k) + np.sum(b == k)) for k in labels]))


def _jacdet(disp: torch.Tensor, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    u = disp[0].detach().cpu().double().numpy()
    jac = np.empty((3, 3) + u.shape[1:])
    for i in range(3):
        g = np.gradient(u[i])
        for j in range(3):
            jac[i, j] = g[j] + (i == j)
    return np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def iso_case(one_thread):
    """Fixed phantom at 1 mm, moving = fixed warped by exp(-v), truth disp = exp(v)."""
    torch.manual_seed(0)
    shape, spacing = (40, 40, 40), (1.0, 1.0, 1.0)
    lab, img = _phantom(shape, spacing)
    v = _to_vox(_velocity_mm(shape, spacing), spacing)
    true = integrate_velocity(v)
    back = integrate_velocity(-v)
    fixed = torch.from_numpy(img)[None, None]
    moving = warp(fixed, back)
    moving_lab = _scipy_warp_labels(lab, back)
    out = GreedySyN(**TEST_SYN).register(moving, fixed, spacing=spacing, progress=False)
    return dict(lab=lab, moving_lab=moving_lab, fixed=fixed, moving=moving, true=true, out=out)


def test_exact_cc_gradient_matches_autograd() -> None:
    torch.manual_seed(1)
    f = torch.rand(2, 1, 11, 9, 8, dtype=torch.float64)
    m = (0.7 * f + 0.3 * torch.rand_like(f)).requires_grad_()
    fr = f.clone().requires_grad_()
    cc = local_ncc(fr, m, [5, 3, 7])
    cc.backward()
    cc2, gf, gm = local_ncc_and_grad(f, m.detach(), [5, 3, 7])
    assert torch.allclose(cc2, cc.detach())
    assert torch.allclose(gf, fr.grad, atol=1e-12, rtol=1e-7)
    assert torch.allclose(gm, m.grad, atol=1e-12, rtol=1e-7)
    # ANTs' local approximation points the same way overall.
    _, _, gl = local_ncc_and_grad(f, m.detach(), [5, 3, 7], exact=False)
    assert torch.nn.functional.cosine_similarity(gl.flatten(), m.grad.flatten(), dim=0) > 0.8


@pytest.mark.parametrize("window", [(7, 7, 7), (5, 1, 3), (17, 3, 5)])
def test_direct_box_sum_equals_scipy_window_sum(window: tuple[int, int, int]) -> None:
    """Direct (small windows) and running-sum (window 17) box sums against scipy's
    zero-padded uniform filter times the window volume."""
    from systems.syn import _box_sum_direct

    x = np.random.default_rng(1).random((2, 11, 9, 20))
    want = np.stack([ndi.uniform_filter(v, window, mode="constant") for v in x]) * np.prod(window)
    got = _box_sum_direct(torch.from_numpy(x)[:, None], list(window))[:, 0].numpy()
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-11)
    got32 = _box_sum_direct(torch.from_numpy(x).float()[:, None], list(window))[:, 0].numpy()
    assert got32.dtype == np.float32
    np.testing.assert_allclose(got32, want, rtol=2e-6, atol=1e-5)


def test_cc_gradient_float32_keeps_float64_accuracy() -> None:
    """Flat regions with faint noise along a long axis: box sums by running sums lose the
    small variances in float32; the gradient must still match float64."""
    g = np.random.default_rng(0)
    x = np.zeros((16, 16, 192))
    x[:, :, 40:150] = 0.8
    x[4:12, 4:12, 60:120] = 0.3
    x = ndi.gaussian_filter(x, 1.0) + 0.002 * g.standard_normal(x.shape)
    f = torch.from_numpy(x).float()[None, None]
    m = torch.roll(f, 2, dims=4)
    for exact in (True, False):
        _, gf, gm = local_ncc_and_grad(f, m, 7, exact=exact)
        _, gf64, gm64 = local_ncc_and_grad(f.double(), m.double(), 7, exact=exact)
        assert gm.dtype == torch.float32
        for a, b in ((gf, gf64), (gm, gm64)):
            assert (a.double() - b).norm() / b.norm() < 2e-3


def test_invert_displacement_matches_analytic_inverse() -> None:
    shape, spacing = (32, 32, 32), (1.0, 1.0, 1.0)
    v = _to_vox(_velocity_mm(shape, spacing, amp=4.0), spacing)
    u, u_inv_true = integrate_velocity(v), integrate_velocity(-v)
    inv = invert_displacement(u, iterations=5)
    inner = (slice(None), slice(None)) + (slice(4, -4),) * 3
    assert (inv - u_inv_true)[inner].norm(dim=1).max() < 0.1  # exp(-v) itself is only O(h²)-exact
    assert compose(u, inv)[inner].norm(dim=1).max() < 0.01


def test_recovers_known_deformation(iso_case) -> None:
    out, true = iso_case["out"], iso_case["true"]
    disp = out["disp"]
    assert disp.shape == (1, 3, 40, 40, 40) and disp.dtype == torch.float32
    d0 = _dice(iso_case["moving_lab"], iso_case["lab"])
    d1 = _dice(_scipy_warp_labels(iso_case["moving_lab"], disp), iso_case["lab"])
    assert d1 > d0 + 0.05 and d1 > 0.9, (d0, d1)
    inner = (slice(None), slice(None)) + (slice(8, -8),) * 3
    err = (disp - true)[inner].norm(dim=1).mean()
    mag = true[inner].norm(dim=1).mean()
    assert mag > 1.0 and err < 0.35 * mag, (float(err), float(mag))
    # warping the image with the result brings it close to the fixed image
    cc0 = local_ncc(iso_case["fixed"], iso_case["moving"], 7)
    cc1 = local_ncc(iso_case["fixed"], warp(iso_case["moving"], disp), 7)
    assert cc1 > cc0


def test_no_folds_and_halves_meet(iso_case) -> None:
    out = iso_case["out"]
    for key in ("disp", "inverse", "mid_moving", "mid_fixed"):
        det = _jacdet(out[key])
        assert (det <= 0).mean() == 0.0, key
    # The two halves share the work: each is far smaller than the whole.
    inner = (slice(None), slice(None)) + (slice(8, -8),) * 3
    total = out["disp"][inner].norm(dim=1).mean()
    assert out["mid_moving"][inner].norm(dim=1).mean() < 0.8 * total
    assert out["mid_fixed"][inner].norm(dim=1).mean() < 0.8 * total


def test_forward_and_inverse_compose_to_identity(iso_case) -> None:
    out = iso_case["out"]
    inner = (slice(None), slice(None)) + (slice(6, -6),) * 3
    # fixed -> moving -> fixed and moving -> fixed -> moving; what is left is the
    # interpolation error of composing sampled fields (largest at sharp edges).
    for resid in (compose(out["inverse"], out["disp"]), compose(out["disp"], out["inverse"])):
        r = resid[inner].norm(dim=1).flatten()
        assert r.mean() < 0.03 and torch.quantile(r, 0.99) < 0.15, (float(r.mean()), float(r.max()))
    # and the inverse warps the fixed labels onto the moving ones
    back = _scipy_warp_labels(iso_case["lab"], out["inverse"])
    assert _dice(back, iso_case["moving_lab"]) > 0.9


def test_without_inverse_the_displacement_is_unchanged(iso_case) -> None:
    """Inverting only the fixed half (what ``disp`` needs) changes nothing in ``disp``."""
    out = GreedySyN(**TEST_SYN).register(iso_case["moving"], iso_case["fixed"], progress=False, with_inverse=False)
    assert "inverse" not in out
    assert torch.allclose(out["disp"], iso_case["out"]["disp"], atol=1e-5)
    assert torch.equal(out["mid_fixed"], iso_case["out"]["mid_fixed"])


def test_anisotropic_spacing_gives_the_same_physical_answer() -> None:
    """One physical problem sampled at 1 mm and at (1, 1, 2) mm: the recovered physical
    displacements agree, and ignoring the spacing makes them agree less."""
    fov_shape, sp_iso, sp_ani = (40, 40, 40), (1.0, 1.0, 1.0), (1.0, 1.0, 2.0)
    ani_shape = (40, 40, 20)
    results = {}
    for name, shape, sp in (("iso", fov_shape, sp_iso), ("ani", ani_shape, sp_ani)):
        lab, img = _phantom(shape, sp)
        v = _to_vox(_velocity_mm(shape, sp), sp)
        fixed = torch.from_numpy(img)[None, None]
        moving = warp(fixed, integrate_velocity(-v))
        results[name] = (moving, fixed, integrate_velocity(v))
    # Wider smoothing than the default makes the answer depend on the regularisation, so
    # the mm-vs-voxel handling of the sigmas shows.
    syn = GreedySyN(**{**TEST_SYN, "iterations": (50, 25), "smooth_grad_sigma": 2.0, "smooth_warp_sigma": 1.0})
    d_iso = syn.register(*results["iso"][:2], spacing=sp_iso)["disp"]
    d_ani = syn.register(*results["ani"][:2], spacing=sp_ani)["disp"]
    d_wrong = syn.register(*results["ani"][:2], spacing=(1.0, 1.0, 1.0))["disp"]

    # Sample the isotropic answer at the anisotropic grid's points (same FOV, corners
    # shared: iso voxel index = ani index * (40 - 1) / (20 - 1) along the last axis).
    def on_ani_grid(d: torch.Tensor) -> np.ndarray:
        mm = d[0].double().numpy() * np.reshape(sp_iso, (3, 1, 1, 1))
        zi = np.arange(ani_shape[2]) * (fov_shape[2] - 1) / (ani_shape[2] - 1)
        gx, gy, gz = np.meshgrid(np.arange(40), np.arange(40), zi, indexing="ij")
        return np.stack([ndi.map_coordinates(c, [gx, gy, gz], order=1) for c in mm])

    ref = on_ani_grid(d_iso)
    truth = results["ani"][2][0].double().numpy() * np.reshape(sp_ani, (3, 1, 1, 1))
    inner = (slice(None), slice(8, -8), slice(8, -8), slice(4, -4))

    def err(d: torch.Tensor, target: np.ndarray) -> float:
        mm = d[0].double().numpy() * np.reshape(sp_ani, (3, 1, 1, 1))
        return float(np.linalg.norm((mm - target)[inner], axis=0).mean())

    mag = float(np.linalg.norm(truth[inner], axis=0).mean())
    assert err(d_ani, ref) < 0.2 * mag, (err(d_ani, ref), mag)
    assert err(d_ani, truth) < 0.3 * mag, (err(d_ani, truth), mag)
    # Treating the 2-mm axis as 1 mm (smoothing and steps in voxels) drifts further away.
    assert err(d_ani, ref) < 0.8 * err(d_wrong, ref), (err(d_ani, ref), err(d_wrong, ref))


def test_regular_preset_is_smoother_than_accurate(iso_case) -> None:
    """The ``regular`` preset's claim (nearer volume-preserving) in small: a smaller spread of log
    Jacobians than ``accurate`` on the same pair (numpy Jacobians), both without folds."""
    sd = {}
    for name in ("accurate", "regular"):
        out = GreedySyN.preset(name).register(iso_case["moving"], iso_case["fixed"], progress=False, with_inverse=False)
        det = _jacdet(out["disp"])
        assert (det <= 0).mean() == 0.0, name
        sd[name] = float(np.log(det).std())
    assert sd["regular"] < 0.9 * sd["accurate"], sd


@pytest.mark.parametrize("shape", [(2, 3, 7, 6, 5), (2, 2, 9, 8)])
def test_log_jacobian_penalty_matches_autograd_of_lapack_determinant(shape) -> None:
    """Value and gradient against autograd through ``torch.linalg.det`` (LU) of the same
    finite-difference Jacobians, in 3D and 2D, batch of 2."""
    torch.manual_seed(3)
    nd = shape[1]
    u = (0.08 * torch.randn(*shape, dtype=torch.float64)).requires_grad_()
    mats = displacement_jacobian(u).reshape(shape[0], nd, nd, *shape[2:]).movedim((1, 2), (-2, -1))
    ref = torch.linalg.det(mats).log().square().mean()
    ref.backward()
    pen, grad = log_jacobian_penalty(u.detach())
    assert grad.shape == u.shape
    assert abs(float(pen) - float(ref)) < 1e-12
    assert torch.allclose(grad, u.grad, atol=1e-14, rtol=1e-9), float((grad - u.grad).abs().max())


def test_log_jacobian_penalty_clamps_folded_voxels() -> None:
    """Folded voxels (det <= min_det) add log(min_det)² each and no gradient: the result equals
    autograd of that clamped definition, is finite, and folds are present."""
    torch.manual_seed(4)
    u = 0.05 * torch.randn(1, 3, 8, 7, 6, dtype=torch.float64)
    u[0, 0, 4, 3, 3] += 3.0  # a spike: its neighbours along axis 0 fold
    mats = displacement_jacobian(u).reshape(1, 3, 3, 8, 7, 6).movedim((1, 2), (-2, -1))
    det0 = torch.linalg.det(mats)
    assert (det0 <= 0).sum() >= 1
    ur = u.clone().requires_grad_()
    det = torch.linalg.det(displacement_jacobian(ur).reshape(1, 3, 3, 8, 7, 6).movedim((1, 2), (-2, -1)))
    ok = det.detach() > 1e-3
    ref = torch.where(ok, det.clamp_min(1e-3).log().square(), torch.full_like(det, np.log(1e-3) ** 2)).mean()
    ref.backward()
    pen, grad = log_jacobian_penalty(u)
    assert torch.isfinite(grad).all() and abs(float(pen) - float(ref)) < 1e-12
    assert torch.allclose(grad, ur.grad, atol=1e-13, rtol=1e-9)


def test_log_jacobian_penalty_on_known_linear_maps() -> None:
    """Linear maps (finite differences exact): a uniform scaling by s costs (3 log s)² and pulls
    only at the borders; a shear (det 1) costs nothing and has no gradient anywhere."""
    n = 9
    x = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64)] * 3, indexing="ij"))[None]
    s = 1.2
    pen, grad = log_jacobian_penalty((s - 1.0) * x)
    assert abs(float(pen) - (3 * np.log(s)) ** 2) < 1e-12
    assert grad[..., 2:-2, 2:-2, 2:-2].abs().max() < 1e-15 and grad.abs().max() > 1e-4
    shear = torch.zeros_like(x)
    shear[:, 0] = 0.4 * x[:, 1] - 0.3 * x[:, 2]  # u_x = 0.4 y - 0.3 z: I + ∇u unit upper triangular
    pen, grad = log_jacobian_penalty(shear)
    assert float(pen) < 1e-24 and grad.abs().max() < 1e-15


def test_volume_penalty_lowers_log_jacobian_spread(iso_case) -> None:
    """``jacobian_weight`` in small: on the phantom pair, a clearly smaller spread of log
    Jacobians (numpy) than without it, no folds, and still most of the label overlap."""
    out = GreedySyN(**TEST_SYN, jacobian_weight=2.0).register(
        iso_case["moving"], iso_case["fixed"], progress=False, with_inverse=False)
    det_pen, det_free = _jacdet(out["disp"]), _jacdet(iso_case["out"]["disp"])
    assert (det_pen <= 0).mean() == 0.0
    sd_pen, sd_free = float(np.log(det_pen).std()), float(np.log(det_free).std())
    assert sd_pen < 0.8 * sd_free, (sd_pen, sd_free)
    d0 = _dice(iso_case["moving_lab"], iso_case["lab"])
    d1 = _dice(_scipy_warp_labels(iso_case["moving_lab"], out["disp"]), iso_case["lab"])
    assert d1 > d0 + 0.05 and d1 > 0.85, (d0, d1)


def test_presets_options_and_inference_mode() -> None:
    assert set(SYN_PRESETS) >= {"accurate", "fast", "regular"}
    assert GreedySyN.preset("fast").hparams()["scales"] == tuple(SYN_PRESETS["fast"]["scales"])
    with pytest.raises(ValueError):
        GreedySyN.preset("nope")
    with pytest.raises(ValueError, match="preset 'fast' has 3 levels"):
        GreedySyN.preset("fast", iterations=[40, 20])
    assert GreedySyN.preset("fast", scales=[4, 2], iterations=[40, 20]).scales == (4, 2)
    with pytest.raises(ValueError):
        GreedySyN(scales=(2, 1), iterations=(10,))
    with pytest.raises(ValueError):
        GreedySyN(cc_window=4)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="jacobian_weight"):
            GreedySyN(jacobian_weight=bad)
    assert SYN_PRESETS["accurate"]["jacobian_weight"] > 0 and SYN_PRESETS["fast"]["jacobian_weight"] == 0
    with pytest.raises(ValueError, match="2D or 3D field"):
        log_jacobian_penalty(torch.zeros(1, 3, 4, 4))
    assert SyN(preset="fast", jacobian_weight=0.5, progress=False).engine.jacobian_weight == 0.5
    assert SyN(preset="accurate", progress=False).engine.jacobian_weight == SYN_PRESETS["accurate"]["jacobian_weight"]
    syn = GreedySyN(scales=(2,), iterations=(5,), optimizer="gd", cc_gradient="local")
    with pytest.raises(ValueError):
        syn.register(torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 12))
    with pytest.raises(ValueError):
        syn.register(torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16), spacing=(1.0, 1.0))
    # Lightning runs test steps under inference_mode; the optimiser must still run there,
    # in 2D too, and with the last level above full resolution (upsampled at the end).
    with torch.inference_mode():
        out = syn.register(torch.rand(2, 1, 24, 20), torch.rand(2, 1, 24, 20), spacing=(1.0, 1.5))
    assert out["disp"].shape == (2, 2, 24, 20) and torch.isfinite(out["disp"]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(iso_case) -> None:
    syn = GreedySyN(**TEST_SYN)
    out = syn.register(iso_case["moving"].cuda(), iso_case["fixed"].cuda())
    assert out["disp"].is_cuda
    assert (out["disp"].cpu() - iso_case["out"]["disp"]).abs().mean() < 0.05


# ---------------------------------------------------------------------------------------
# The performance harness (benchmark.perf.systems) on a tiny synthetic pair
# ---------------------------------------------------------------------------------------
def _write_pair(folder, shift_seg_grid: bool = True) -> np.ndarray:
    """image_A (moving) / image_B (fixed) at 1 mm; image_A_seg stored on a grid shifted by
    (2, 3, 0) voxels (origin moved accordingly), as the real pair's quirk."""
    import nibabel as nib

    shape, spacing = (40, 40, 40), (1.0, 1.0, 1.0)
    lab, img = _phantom(shape, spacing)
    v = _to_vox(_velocity_mm(shape, spacing), spacing)
    back = integrate_velocity(-v)
    mov = warp(torch.from_numpy(img)[None, None], back)[0, 0].numpy()
    mov_lab = _scipy_warp_labels(lab, back)
    eye = np.eye(4)
    nib.save(nib.Nifti1Image(mov, eye), str(folder / "image_A.nii.gz"))
    nib.save(nib.Nifti1Image(img, eye), str(folder / "image_B.nii.gz"))
    nib.save(nib.Nifti1Image(lab.astype(np.int16), eye), str(folder / "image_B_seg.nii.gz"))
    seg_aff = eye.copy()
    on_image = mov_lab.copy()
    if shift_seg_grid:
        seg_aff[:3, 3] = (2.0, 3.0, 0.0)  # seg voxel (i, j, k) sits at image voxel (i+2, j+3, k)
        shifted = np.zeros_like(mov_lab)
        shifted[:-2, :-3, :] = mov_lab[2:, 3:, :]
        mov_lab = shifted
    nib.save(nib.Nifti1Image(mov_lab.astype(np.int16), seg_aff), str(folder / "image_A_seg.nii.gz"))
    return on_image


def test_perf_syn_on_a_tiny_pair(tmp_path) -> None:
    from benchmark.perf.systems import format_perf_systems, load_brain_pair, perf_syn

    truth = _write_pair(tmp_path)
    pair = load_brain_pair(tmp_path)
    assert pair.notes and "resampled" in pair.notes[0]
    # Resampled through the affines, the labels sit on the moving image's voxels again
    # (the last 2 / 3 rows were outside the stored grid).
    assert np.array_equal(pair.moving_seg[2:-2, 3:-3], truth[2:-2, 3:-3])
    res = perf_syn(tmp_path, threads=1, presets=("fast",), with_peers=False, labels=(1, 2, 3), out=tmp_path / "r.json")
    rec, rev = res["results"]  # A->B (the tuning direction) and B->A (not tuned on)
    assert rec["tool"] == "regbench-syn" and rec["preset"] == "fast" and rec["status"] == "measured"
    assert (rec["pair"], rec["tuned_on"], rev["pair"], rev["tuned_on"]) == ("A->B", True, "B->A", False)
    assert rec["dice_mean"] > res["initial"]["dice_mean"] + 0.05
    assert rev["dice_mean"] > res["initial_reverse"] + 0.05 and rev["fold_pct"] == 0.0
    assert res["ratios"] == []  # no peer ran
    assert rec["fold_pct"] == 0.0 and rec["wall_s"] > 0 and rec["cpu_s"] > 0
    assert set(rec["dice"]) == {"1", "2", "3"}
    assert all(c["status"] == "cached" for c in res["cached"])
    assert (tmp_path / "r.json").exists()
    table = format_perf_systems(res)
    assert "regbench-syn" in table and "B->A" in table and "not tuned on" in table
    # what was measured is on disk after every tool (here: both directions)
    import json

    assert len(json.loads((tmp_path / "r.json").read_text())["results"]) == 2


def test_time_ratios_pair_presets_with_each_fireants_run_on_the_same_pair() -> None:
    from benchmark.perf.systems import time_ratios

    res = [
        {"tool": "regbench-syn", "preset": "fast", "pair": "A->B", "status": "measured", "wall_s": 10.0, "cpu_s": 20.0},
        {"tool": "regbench-syn", "preset": "fast", "pair": "B->A", "status": "measured", "wall_s": 11.0, "cpu_s": 21.0},
        {"tool": "fireants", "preset": "brief", "pair": "A->B", "status": "measured", "wall_s": 200.0, "cpu_s": 400.0},
        {"tool": "fireants", "preset": "published", "pair": "A->B", "status": "measured", "wall_s": 400.0, "cpu_s": 800.0},
        {"tool": "fireants", "preset": "x", "pair": "A->B", "status": "failed"},
    ]
    q = time_ratios(res)
    assert [(r["preset"], r["fireants"], r["pair"]) for r in q] == [("fast", "brief", "A->B"), ("fast", "published", "A->B")]
    assert q[0]["wall_ratio"] == pytest.approx(0.05) and q[1]["cpu_ratio"] == pytest.approx(0.025)


def test_fireants_conversion_matches_its_own_warp(tmp_path) -> None:
    """FireANTs (peer venv) on the tiny pair: the displacement converted to our convention
    and warped with our warp gives the Dice FireANTs' own coordinates give."""
    from benchmark.perf.systems import _run_fireants, find_peer_python, load_brain_pair

    py = find_peer_python()
    if py is None:
        pytest.skip("no peer python with fireants (set REGBENCH_PEER_PYTHON or create ../peers_venv)")
    _write_pair(tmp_path, shift_seg_grid=False)
    pair = load_brain_pair(tmp_path)
    rec = _run_fireants(pair, py, 1, "cpu", (1, 2, 3), 300, settings=dict(iterations=(10, 5, 2)))
    if rec["status"] != "measured" and "No module named" in rec.get("error", ""):
        pytest.skip(f"fireants not importable with {py}")
    assert rec["status"] == "measured", rec.get("error")
    assert rec["conversion_ok"], (rec["dice_mean"], rec["native_dice_mean"])
    init = _dice(pair.moving_seg, pair.fixed_seg)
    assert rec["dice_mean"] > init  # the converted field registers, it is not e.g. transposed
    # FireANTs' published OASIS setting reaches its optimiser (Adam beta1 = 0.1)
    from benchmark.perf.systems import FIREANTS_PUBLISHED_OASIS

    hold = np.ones(1200 * 2**20 // 8)  # this process's peak >= 1.2 GB, which ru_maxrss would pass on
    hold += 1.0
    pub = _run_fireants(pair, py, 1, "cpu", (1, 2, 3), 300,
                        settings={**FIREANTS_PUBLISHED_OASIS, "iterations": (10, 5, 2)})
    del hold
    assert pub["status"] == "measured", pub.get("error")
    assert pub["settings"]["optimizer_params"] == {"beta1": 0.1} and pub["conversion_ok"]
    # its peak memory is its own (VmHWM): a 40^3 registration, far below the parent's 1.2 GB
    assert 50 < pub["peak_mem_mb"] < 1000, pub["peak_mem_mb"]
