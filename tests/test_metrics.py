"""Tests of benchmark.core.metrics against independent truth (analytic, brute force, SciPy, SimpleITK).

Each test is built so that a wrong convention (axis order, spacing, pull vs push, NDV
weighting, absent-label rule, robustness tail) changes the answer.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from scipy.spatial.distance import cdist

from benchmark.core import metrics as M

RNG = np.random.default_rng(1234)


def grid_mm(shape, spacing):
    """(ndim, *shape) physical coordinates idx * spacing."""
    return np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"))


def smooth_field(shape, scale, sigma=2.0, seed=0):
    r = np.random.default_rng(seed)
    return np.stack([ndi.gaussian_filter(r.standard_normal(shape), sigma) for _ in range(len(shape))]) * scale


# ----------------------------------------------------------------------------------------------
# Jacobian, folds, SDlogJ
# ----------------------------------------------------------------------------------------------
A3 = np.array([[1.15, 0.20, -0.10], [0.05, 0.85, 0.12], [-0.07, 0.10, 1.30]])


def test_jacobian_affine_voxels_equals_det_everywhere():
    shape = (9, 10, 11)
    x = grid_mm(shape, (1, 1, 1))
    u = np.einsum("ij,j...->i...", A3 - np.eye(3), x) + np.array([1.0, -2.0, 0.5])[:, None, None, None]
    j = M.jacobian_determinant(torch.from_numpy(u.astype(np.float32)))
    assert j.shape == shape
    np.testing.assert_allclose(j.numpy(), np.linalg.det(A3), rtol=1e-5)  # borders too (one-sided is exact)
    # (1, 3, *spatial) and numpy input are accepted
    j2 = M.jacobian_determinant(u[None])
    np.testing.assert_allclose(j2.numpy(), np.linalg.det(A3), rtol=1e-10)


def test_jacobian_affine_mm_anisotropic_spacing():
    shape, sp = (8, 9, 10), (0.7, 1.6, 2.5)
    u_mm = np.einsum("ij,j...->i...", A3 - np.eye(3), grid_mm(shape, sp))
    j = M.jacobian_determinant(u_mm, spacing=sp).numpy()
    np.testing.assert_allclose(j, np.linalg.det(A3), rtol=1e-10)
    # Ignoring the spacing (treating mm as voxels) must give a different answer.
    wrong = M.jacobian_determinant(u_mm).numpy()
    assert abs(wrong[4, 4, 4] - np.linalg.det(A3)) > 0.05
    # Reversed spacing (x, y, z order instead of array order) must be wrong as well.
    rev = M.jacobian_determinant(u_mm, spacing=sp[::-1]).numpy()
    assert abs(rev[4, 4, 4] - np.linalg.det(A3)) > 0.05


def test_jacobian_matches_numpy_gradient_on_random_field_any_slab():
    shape = (11, 7, 9)
    u = RNG.standard_normal((3, *shape))
    grads = np.stack([np.stack(np.gradient(u[i]), 0) for i in range(3)])  # [i, j] = du_i/dx_j, edge_order=1
    ref = np.linalg.det(np.moveaxis(grads + np.eye(3)[:, :, None, None, None], (0, 1), (-2, -1)))
    for slab in (1, 2, 4, 100):
        np.testing.assert_allclose(M.jacobian_determinant(u).numpy(), ref, rtol=1e-10, atol=1e-10)


def test_jacobian_2d_affine():
    A = np.array([[1.2, 0.3], [-0.1, 0.8]])
    sp = (0.5, 2.0)
    u = np.einsum("ij,j...->i...", A - np.eye(2), grid_mm((7, 6), sp))
    np.testing.assert_allclose(M.jacobian_determinant(u, spacing=sp).numpy(), np.linalg.det(A), rtol=1e-10)


def test_jacobian_matches_simpleitk_on_smooth_field():
    sitk = pytest.importorskip("SimpleITK")
    shape, sp = (12, 14, 16), (0.8, 1.3, 2.0)
    x = grid_mm(shape, sp)
    # A non-affine field with a different dependence per component and axis (mm).
    u = np.stack(
        [
            1.5 * np.sin(x[1] / 4.0) + 0.1 * x[2],
            0.8 * np.cos(x[0] / 3.0) * np.sin(x[2] / 7.0),
            0.05 * x[0] * x[1] / 5.0 - 0.2 * x[2],
        ]
    )
    ours = M.jacobian_determinant(u, spacing=sp).numpy()
    # SimpleITK's index order is (x, y, z) = reversed array axes; its vector components are
    # physical x, y, z, i.e. our channels reversed; its spacing is reversed too.
    img = sitk.GetImageFromArray(np.moveaxis(u[::-1], 0, -1).copy(), isVector=True)
    img.SetSpacing(sp[::-1])
    ref = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(img, True))
    inner = (slice(1, -1),) * 3  # SimpleITK's border handling differs (zero-flux Neumann)
    np.testing.assert_allclose(ours[inner], ref[inner], rtol=1e-6, atol=1e-6)
    # Forgetting to reverse the components gives a different map.
    bad = sitk.GetImageFromArray(np.moveaxis(u, 0, -1).copy(), isVector=True)
    bad.SetSpacing(sp[::-1])
    badj = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(bad, True))
    assert np.abs(badj[inner] - ours[inner]).max() > 0.1


def folding_field(shape):
    """phi_0 goes up, back down (slope -1) over rows 10..15, then up again; other axes identity.

    Central differences: rows 11..14 have det -1, rows 10 and 15 det 0 (both count as folded),
    every other row det 1. So exactly 6 folded rows.
    """
    i = np.arange(shape[0], dtype=np.float64)
    phi0 = np.where(i <= 10, i, np.where(i <= 15, 20 - i, i - 10))
    u = np.zeros((3, *shape))
    u[0] = (phi0 - i)[:, None, None]
    return u


def test_fold_pct_exact_by_construction():
    shape = (30, 8, 9)
    u = folding_field(shape)
    j = M.jacobian_determinant(u)
    assert M.fold_pct(j) == pytest.approx(100.0 * 6 / 30, abs=1e-12)
    # With a mask covering rows 0..12 and half of axis 1: folded rows 10, 11, 12 inside.
    mask = np.zeros(shape, bool)
    mask[:13, :4] = True
    assert M.fold_pct(j, mask) == pytest.approx(100.0 * 3 / 13, abs=1e-12)
    # identity: no folds; torch mask accepted
    j0 = M.jacobian_determinant(np.zeros((3, *shape)))
    assert M.fold_pct(j0, torch.from_numpy(mask)) == 0.0


def test_sdlogj_and_learn2reg_variant():
    shape = (14, 13, 12)
    u = smooth_field(shape, 12.0, sigma=1.5, seed=3)
    j = M.jacobian_determinant(u).numpy()
    assert (j <= 0).any(), "the test field should fold somewhere"
    plain = np.log(np.clip(j, 1e-9, 1e9)).std()
    inner = j[2:-2, 2:-2, 2:-2]
    l2r = np.log(np.clip(inner + 3, 1e-9, 1e9)).std()
    assert M.sdlogj(j) == pytest.approx(plain, rel=1e-9)
    assert M.sdlogj_l2r(j) == pytest.approx(l2r, rel=1e-9)
    # Folds hit log(1e-9) in the plain one but not in Learn2Reg's shifted one.
    assert M.sdlogj(j) > 5 * M.sdlogj_l2r(j)
    # Masked, as the official script does it (masked array over the cropped mask).
    mask = np.zeros(shape, bool)
    mask[3:11, 2:10, 4:12] = True
    ma = np.ma.MaskedArray(np.log(np.clip(inner + 3, 1e-9, 1e9)), ~mask[2:-2, 2:-2, 2:-2])
    assert M.sdlogj_l2r(j, mask) == pytest.approx(float(ma.std()), rel=1e-9)
    assert M.sdlogj(j, mask) == pytest.approx(np.log(np.clip(j[mask], 1e-9, 1e9)).std(), rel=1e-9)
    # A mild field: L2R's value is about a quarter of std(log J) (d log(J+3) = dJ/4 near J=1).
    m = M.jacobian_determinant(smooth_field(shape, 1.0, sigma=2.0, seed=4))
    assert M.sdlogj_l2r(m) == pytest.approx(M.sdlogj(m[2:-2, 2:-2, 2:-2]) / 4, rel=0.1)


# ----------------------------------------------------------------------------------------------
# NDV
# ----------------------------------------------------------------------------------------------
def ndv_reference(u: np.ndarray, mask: np.ndarray | None) -> float:
    """Straight from the paper's definition, one scheme at a time (float64).

    phi = x + u; each scheme's 3 edge vectors as correlations of phi with 3x3x3 kernels
    (scipy, mode='nearest'), |J| = det of the 3x3 edge matrix, border dropped; NDV =
    sum over schemes of -0.5 min(J, 0)/6 over the mask, % of the mask's interior voxels.
    """
    phi = u + np.stack(np.meshgrid(*[np.arange(n) for n in u.shape[1:]], indexing="ij"))

    def edge(offset):
        k = np.zeros((3, 3, 3))
        k[1, 1, 1] = -1
        k[tuple(1 + o for o in offset)] += 1
        return np.stack([ndi.correlate(phi[c], k, mode="nearest") for c in range(3)], -1)

    schemes = []
    for signs in itertools.product((1, -1), repeat=3):  # +1 forward, -1 backward per axis
        cols = []
        for ax, s in enumerate(signs):
            o = [0, 0, 0]
            o[ax] = s
            cols.append(edge(o) * s)  # backward difference = phi(x) - phi(x - e)
        schemes.append(cols)
    schemes.append([edge(o) for o in ((-1, -1, 0), (-1, 0, -1), (0, -1, -1))])
    schemes.append([edge(o) for o in ((1, 1, 0), (0, 1, 1), (1, 0, 1))])
    inner = (slice(1, -1),) * 3
    m = np.ones(u.shape[1:], bool) if mask is None else mask.astype(bool)
    total = 0.0
    for cols in schemes:
        jac = np.stack(cols, -1)  # (..., component, edge)
        det = np.linalg.det(jac)[inner]
        total += np.sum(-0.5 * np.minimum(det, 0) / 6 * m[inner])
    return total / m[inner].sum() * 100


def test_ndv_matches_reference_on_folding_field_with_and_without_mask():
    shape = (12, 11, 10)
    u = RNG.standard_normal((3, *shape)) * 0.7  # rough: folds in many schemes
    ref = ndv_reference(u, None)
    assert ref > 1.0
    assert M.ndv_pct(u) == pytest.approx(ref, rel=1e-10)
    assert M.ndv_pct(torch.from_numpy(u).float()) == pytest.approx(ref, rel=1e-4)
    mask = RNG.random(shape) > 0.4
    assert M.ndv_pct(u, mask) == pytest.approx(ndv_reference(u, mask), rel=1e-10)
    # the slab size is a memory knob only
    assert M.ndv_pct(u[None], mask) == pytest.approx(ndv_reference(u, mask), rel=1e-10)


def test_cpu_slabs_do_not_change_results(monkeypatch):
    shape = (9, 8, 7)
    u = RNG.standard_normal((3, *shape)) * 0.7
    mask = RNG.random(shape) > 0.3
    whole_j = M.jacobian_determinant(u).numpy()
    whole_n = M.ndv_pct(u, mask)
    for voxels in (1, 60, 150):  # one row per slab, and uneven slabs
        monkeypatch.setattr(M, "_SLAB_VOXELS", voxels)
        np.testing.assert_array_equal(M.jacobian_determinant(u).numpy(), whole_j)
        assert M.ndv_pct(u, mask) == pytest.approx(whole_n, rel=1e-12)
        assert M.ndv_pct(u, mask) == pytest.approx(ndv_reference(u, mask), rel=1e-10)


def test_single_slice_case_has_no_ndv_but_every_other_metric():
    """A 3D field one voxel thick (a slice stored as a volume) has no interior: NDV is NaN, not
    an error that loses the case's Dice and fold %."""
    u = np.zeros((3, 12, 10, 1))
    u[0] = 0.4  # a uniform shift: no folds
    f = np.zeros((12, 10, 1), np.int64)
    f[2:8, 3:9] = 1
    res = M.deformable_metrics(u, f, f, [1])
    assert math.isnan(res["ndv_pct"]) and res["dice"] == 1.0 and res["fold_pct"] == 0.0
    assert math.isnan(M.ndv_pct(np.zeros((2, 2, 9))))  # 2D, two pixels across


def test_ndv_zero_for_smooth_field_and_one_voxel_per_inverted_voxel():
    shape = (10, 12, 9)
    smooth = smooth_field(shape, 1.0, sigma=3.0, seed=7)
    assert ndv_reference(smooth, None) == 0.0
    assert M.ndv_pct(smooth) == 0.0
    assert M.ndv_pct(smooth, np.ones(shape)) == 0.0
    # phi = -x: every scheme inverted; 8 corner tetrahedra (|J| = 1) + 2 central ones (|J| = 2)
    # make 0.5 * (8 + 4) / 6 = 1 voxel per voxel -> 100 %. Normalising the tetrahedral
    # determinants to 1 would give 83.3 %.
    x = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"))
    assert M.ndv_pct(-2 * x) == pytest.approx(100.0, rel=1e-12)
    assert ndv_reference(-2 * x, None) == pytest.approx(100.0, rel=1e-12)


def test_nda_2d():
    shape = (9, 8)
    x = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"))
    flip = np.zeros((2, *shape))
    flip[0] = -2 * x[0]  # phi_0 = -x_0: all four triangle schemes at -1 -> 0.5 * 4 / 2 = 1 pixel
    assert M.ndv_pct(flip) == pytest.approx(100.0)
    assert M.ndv_pct(np.zeros((2, *shape))) == 0.0
    both = -2 * x  # phi = -x is a rotation by 180 degrees: no fold
    assert M.ndv_pct(both) == 0.0


# ----------------------------------------------------------------------------------------------
# Dice
# ----------------------------------------------------------------------------------------------
def dice_loop(f, w, labels, m=None):
    """Learn2Reg's rule by hand: NaN where the fixed (or the un-warped moving) map lacks the label."""
    out = []
    for lab in labels:
        a, b = f == lab, w == lab
        if a.sum() == 0 or (m is not None and (m == lab).sum() == 0):
            out.append(np.nan)
        else:
            out.append(2 * (a & b).sum() / (a.sum() + b.sum()))
    return np.array(out)


def test_dice_sparse_ids_matches_loop_and_nan_for_absent():
    shape = (15, 16, 17)
    ids = np.array([0, 17, 1002, 1003, 2035, 2034])
    f = ids[RNG.integers(0, ids.size, shape)]
    w = f.copy()
    flip = RNG.random(shape) < 0.3
    w[flip] = ids[RNG.integers(0, ids.size, flip.sum())]
    w[w == 2034] = 0  # 2034 present in fixed only: erased by the warp -> 0, not left out
    labels = [2035, 1002, 5000, 17, 1003, 2034, 1002]  # unsorted, absent id, duplicate
    ref = dice_loop(f, w, labels)
    got = M.dice_per_label(f, w, labels)
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    assert np.isnan(got[2]) and got[5] == 0.0
    assert not np.isnan(got[[0, 1, 3, 4]]).any()
    # tensors (int16/uint8 dtypes), float maps from nibabel and torch long all agree
    ft, wt = torch.from_numpy(f.astype(np.int16)), torch.from_numpy(w)
    np.testing.assert_allclose(M.dice_per_label(ft, wt, labels), ref)
    np.testing.assert_allclose(M.dice_per_label(f.astype(np.float64), w.astype(np.float32), labels), ref)
    assert M.dice(f, w, labels) == pytest.approx(np.nanmean(ref))
    assert math.isnan(M.dice(f, w, [5000, 6000]))
    # a label the un-warped moving map lacks has nothing to match: NaN (Learn2Reg), whatever
    # grid the moving map is on
    m = np.where(f == 17, 0, f)[:, ::2]
    got_m = M.dice_per_label(f, w, labels, moving_seg=m)
    np.testing.assert_allclose(got_m, dice_loop(f, w, labels, m), rtol=1e-12)
    assert np.isnan(got_m[3]) and got_m[5] == 0.0
    # a float label tensor (resampled maps) is read as its rounded ids, as the maps themselves are
    mt = torch.from_numpy(m.astype(np.float32)) - 1e-3 * torch.from_numpy((m > 0).astype(np.float32))
    np.testing.assert_allclose(M.dice_per_label(f, w, labels, moving_seg=mt), got_m, rtol=1e-12)


def test_erasing_a_label_never_raises_dice_or_lowers_hd95():
    """Label 2 erased by the warp must score worse than label 2 kept with partial overlap
    (before, the erased label left the mean and so raised it)."""
    f = np.zeros((10, 12, 8), np.int64)
    f[1:5, 1:6, 1:7], f[6:9, 6:11, 1:7] = 1, 2
    kept = f.copy()
    kept[6:9, 6:11, 1:7] = 0
    kept[6:9, 8:11, 1:7] = 2  # partial overlap
    erased = np.where(f == 2, 0, f)
    assert M.dice(f, erased, [1, 2], moving_seg=f) == pytest.approx(0.5)  # label 1 perfect, label 2 zero
    assert M.dice(f, erased, [1, 2], moving_seg=f) < M.dice(f, kept, [1, 2], moving_seg=f)
    sp = (1.5, 1.0, 2.5)
    h = M.hd95_per_label(f, erased, [1, 2], spacing=sp)
    diagonal = np.sqrt((9 * 1.5) ** 2 + 11**2 + (7 * 2.5) ** 2)  # corner voxel to corner voxel, mm
    assert h[0] == 0.0 and h[1] == pytest.approx(diagonal)
    assert h[1] > M.hd95_per_label(f, kept, [2], spacing=sp)[0]
    assert M.hd95_per_label(f, erased, [2], voxel=True)[0] == pytest.approx(np.sqrt(9**2 + 11**2 + 7**2))
    assert np.isnan(M.hd95_per_label(f, erased, [2], moving_seg=erased)[0])  # moving never had it
    res = M.deformable_metrics(np.zeros((3, *f.shape)), f, erased, [1, 2], spacing=sp, moving_seg=f)
    assert res["dice_per_label"] == {1: 1.0, 2: 0.0} and res["hd95"] == pytest.approx(diagonal / 2)


def test_torch_kernels_agree_with_numpy_path():
    """The CUDA path runs the same kernels on torch tensors; check them on CPU tensors."""
    shape = (10, 9, 8)
    u = RNG.standard_normal((3, *shape)) * 0.6
    sp = (0.9, 1.1, 1.7)
    ut = torch.from_numpy(u)
    jt = M._det_from_gradients([M._gradient(ut, 1 + j, sp[j]) for j in range(3)])
    assert isinstance(jt, torch.Tensor)
    np.testing.assert_allclose(jt.numpy(), M.jacobian_determinant(u, spacing=sp).numpy(), rtol=1e-12)
    acc_t = M._ndv_block(ut)
    assert isinstance(acc_t, torch.Tensor) and acc_t.shape == (8, 7, 6)
    assert -0.5 * acc_t.sum().item() / 6 / acc_t.numel() * 100 == pytest.approx(ndv_reference(u, None), rel=1e-10)
    nda_t = M._nda_neg(ut[:2, :, :, 3])
    np.testing.assert_allclose(nda_t.numpy(), M._nda_neg(u[:2, :, :, 3]), rtol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_inputs():
    f = torch.randint(0, 5, (12, 11, 10))
    w = torch.randint(0, 5, (12, 11, 10))
    ref = dice_loop(f.numpy(), w.numpy(), [1, 2, 3])
    np.testing.assert_allclose(M.dice_per_label(f.cuda(), w.cuda(), [1, 2, 3]), ref)
    u = torch.from_numpy(RNG.standard_normal((3, 12, 11, 10)) * 0.6)
    mask = torch.rand(12, 11, 10) > 0.3
    jc = M.jacobian_determinant(u.cuda())
    assert jc.is_cuda
    np.testing.assert_allclose(jc.cpu().numpy(), M.jacobian_determinant(u).numpy(), rtol=1e-10)
    assert M.ndv_pct(u.cuda(), mask.cuda()) == pytest.approx(M.ndv_pct(u, mask), rel=1e-10)
    assert M.fold_pct(jc, mask.cuda()) == M.fold_pct(M.jacobian_determinant(u), mask)
    res = M.deformable_metrics(u.cuda().float(), f.cuda(), w.cuda(), [1, 2, 3])
    assert res["dice"] == pytest.approx(np.nanmean(dice_loop(f.numpy(), w.numpy(), [1, 2, 3])))


# ----------------------------------------------------------------------------------------------
# HD95
# ----------------------------------------------------------------------------------------------
def surface_points(mask):
    """Voxels of ``mask`` with at least one of the 2*ndim face neighbours outside (or off the grid)."""
    p = np.pad(mask, 1, constant_values=False)
    inner = np.ones_like(mask)
    for ax in range(mask.ndim):
        for s in (-1, 1):
            inner &= np.roll(p, s, axis=ax)[(slice(1, -1),) * mask.ndim]
    return np.argwhere(mask & ~inner)


def hd95_brute(a, b, spacing):
    pa = surface_points(a) * np.asarray(spacing)
    pb = surface_points(b) * np.asarray(spacing)
    d = cdist(pa, pb)
    return max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))


def blobs(shape, ids, seed):
    """Random smooth partition: argmax of smoothed noise, with background where weak."""
    r = np.random.default_rng(seed)
    fields = np.stack([ndi.gaussian_filter(r.standard_normal(shape), 2.0) for _ in ids])
    lab = np.asarray(ids)[fields.argmax(0)]
    lab[fields.max(0) < 0.05] = 0
    return lab


def test_hd95_matches_brute_force_on_anisotropic_voxels():
    shape, sp = (22, 20, 18), (0.7, 1.3, 2.1)
    ids = [3, 1002, 2035]
    f = blobs(shape, ids, seed=1)
    w = blobs(shape, ids, seed=2)
    w[w == 3] = 0
    w[:5, :5, :5] = 3  # label 3 in the warped map only in a corner (touches the grid border)
    labels = [2035, 3, 1002, 77]
    got = M.hd95_per_label(f, w, labels, spacing=sp)
    ref = [hd95_brute(f == lab, w == lab, sp) for lab in labels[:3]]
    np.testing.assert_allclose(got[:3], ref, rtol=1e-12)
    assert np.isnan(got[3])
    vox = M.hd95_per_label(f, w, labels, spacing=sp, voxel=True)
    np.testing.assert_allclose(vox[:3], [hd95_brute(f == lab, w == lab, (1, 1, 1)) for lab in labels[:3]], rtol=1e-12)
    assert np.all(np.abs(vox[:3] - got[:3]) > 1e-3)
    assert M.hd95(f, w, labels, sp) == pytest.approx(np.mean(ref))
    # torch input, absent label in fixed only
    assert np.isnan(M.hd95_per_label(torch.from_numpy(np.where(f == 1002, 0, f)), torch.from_numpy(w), [1002])[0])


def test_hd95_identical_is_zero_and_shift_is_spacing():
    f = np.zeros((12, 12, 12), np.int32)
    f[3:9, 3:9, 3:9] = 5
    w = np.roll(f, 2, axis=2)
    assert M.hd95_per_label(f, f, [5], (1.0, 2.0, 3.0))[0] == 0.0
    # shift by 2 voxels along axis 2 (3 mm each): side faces coincide except the shifted part
    assert M.hd95_per_label(f, w, [5], (1.0, 2.0, 3.0))[0] == pytest.approx(6.0)


# ----------------------------------------------------------------------------------------------
# TRE
# ----------------------------------------------------------------------------------------------
def rotation(axis, angle):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K


def test_tre_points_through_affine_and_pull_convention():
    shape = (20, 22, 24)
    # Affine displacement in voxels: u(x) = (B - I) x + c, exact under trilinear sampling.
    B = np.array([[1.05, 0.03, 0.0], [-0.02, 0.97, 0.04], [0.01, 0.0, 1.02]])
    c = np.array([1.5, -2.0, 0.7])
    u = np.einsum("ij,j...->i...", B - np.eye(3), grid_mm(shape, (1, 1, 1))) + c[:, None, None, None]
    A = np.eye(4)
    A[:3, :3] = rotation((1, 2, 0.5), 0.4) @ np.diag([0.8, 1.2, 2.5])
    A[:3, 3] = [-90.0, 12.0, 40.0]
    p = np.array([[3.2, 4.7, 5.1], [10.0, 11.5, 12.25], [15.9, 2.2, 20.0], [np.nan, 1, 1]])
    q = np.array([[6.0, 1.0, 8.0], [9.0, 12.0, 11.0], [18.0, 0.5, 22.0], [1, 1, 1]])
    got = M.tre_points(torch.from_numpy(u).float(), p, q, A)
    hand = np.array([np.linalg.norm(A[:3, :3] @ (B @ pi + c - qi)) for pi, qi in zip(p[:3], q[:3])])
    np.testing.assert_allclose(got[:3], hand, rtol=1e-5)
    assert np.isnan(got[3])
    # Push instead of pull (q + u(q) compared with p) would be far off.
    push = np.array([np.linalg.norm(A[:3, :3] @ (B @ qi + c - pi)) for pi, qi in zip(p[:3], q[:3])])
    assert np.all(np.abs(push - got[:3]) > 0.5)
    # Spacing only (no rotation) differs as well: the affine is really used.
    naive = np.linalg.norm((B @ p[:3].T).T + c - q[:3], axis=1) * np.array([0.8, 1.2, 2.5]).mean()
    assert np.all(np.abs(naive - got[:3]) > 1e-3)


def test_tre_trilinear_and_border_extension():
    shape = (6, 6, 6)
    u = np.zeros((3, *shape))
    u[0] = np.arange(6.0)[:, None, None] ** 2  # nonlinear along axis 0
    p = np.array([[2.5, 1.0, 1.0], [7.0, 2.0, 2.0]])  # second point beyond the grid: border value 25
    q = np.zeros((2, 3))
    got = M.tre_points(u, p, q, np.eye(4))
    assert got[0] == pytest.approx(np.linalg.norm([2.5 + 6.5, 1, 1]))  # (4 + 9)/2 = 6.5
    assert got[1] == pytest.approx(np.linalg.norm([7.0 + 25.0, 2, 2]))


def test_label_centroids_and_tre_centroids():
    shape = (16, 17, 18)
    fl = np.zeros(shape, np.int16)
    ml = np.zeros(shape, np.int16)
    fl[2:4, 3:6, 4:5] = 1  # centroid (2.5, 4, 4)
    fl[10:13, 10:12, 10:14] = 7  # (11, 10.5, 11.5)
    ml[3:5, 3:6, 6:7] = 1  # (3.5, 4, 6)
    ml[9:12, 12:14, 10:14] = 7  # (10, 12.5, 11.5)
    fl[0, 0, 0] = 9  # only in fixed -> NaN TRE
    cen = M.label_centroids(fl, [7, 1, 9, 4])
    np.testing.assert_allclose(cen[:3], [[11, 10.5, 11.5], [2.5, 4, 4], [0, 0, 0]])
    assert np.isnan(cen[3]).all()
    u = np.zeros((3, *shape))
    u[0] += 1.0
    u[2] += 2.0
    A = np.diag([1.0, 2.0, 0.5, 1.0])
    t = M.tre_centroids(u, fl, ml, A)
    # labels 1, 7, 9: p + (1, 0, 2) - q
    e1 = np.linalg.norm(np.diag(A)[:3] * (np.array([3.5, 4, 6]) - [3.5, 4, 6]))
    e7 = np.linalg.norm(np.diag(A)[:3] * (np.array([12, 10.5, 13.5]) - [10, 12.5, 11.5]))
    np.testing.assert_allclose(t[:2], [e1, e7])
    assert np.isnan(t[2])
    # LUMIR's official protocol (warp the moving landmarks): a pure shift moves label 1 exactly.
    tw = M.tre_centroids_warped(u, fl, ml, A, labels=[1])
    assert tw[0] == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# aggregate and the engine
# ----------------------------------------------------------------------------------------------
def test_aggregate_robust30():
    vals = [0.9, 0.1, 0.5, float("nan"), 0.7, 0.3, 0.8, None, 0.2, 0.6, 0.4, 1.0]
    hi = M.aggregate(vals, higher_is_better=True)
    lo = M.aggregate(vals, higher_is_better=False)
    finite = np.array([0.9, 0.1, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4, 1.0])
    assert hi["n"] == 10
    assert hi["robust30"] == pytest.approx(0.2)  # mean of 0.1, 0.2, 0.3
    assert lo["robust30"] == pytest.approx(0.9)  # mean of 0.8, 0.9, 1.0
    assert hi["mean"] == pytest.approx(finite.mean())
    assert hi["std"] == pytest.approx(finite.std(ddof=0))
    assert hi["median"] == pytest.approx(0.55)
    assert M.aggregate([3.0, 1.0], True)["robust30"] == 1.0  # at least one case
    assert M.aggregate([3.0, 1.0, 2.0, 5.0], False)["robust30"] == pytest.approx(4.0)  # ceil(1.2) = 2 worst
    empty = M.aggregate([float("nan")], True)
    assert empty["n"] == 0 and math.isnan(empty["mean"])


def test_deformable_metrics_keys_and_serialisable():
    shape = (16, 15, 14)
    ids = [2, 41, 1002]
    f = blobs(shape, ids, seed=5)
    w = blobs(shape, ids, seed=6)
    u = torch.from_numpy(smooth_field(shape, 1.5, seed=8)).float()[None]
    mask = np.zeros(shape, bool)
    mask[2:-2, 2:-2, 2:-2] = True
    res = M.deformable_metrics(
        u,
        fixed_seg=f,
        warped_seg=w,
        labels=ids,
        spacing=(1.0, 1.2, 0.9),
        fixed_points=np.array([[3.0, 4.0, 5.0]]),
        moving_points=np.array([[4.0, 4.0, 5.0]]),
        moving_affine=np.diag([1.0, 1.2, 0.9, 1.0]),
        mask=mask,
    )
    keys = {"dice", "dice_per_label", "hd95", "hd95_per_label", "tre", "fold_pct", "sdlogj", "sdlogj_l2r", "ndv_pct",
            "epe_mm", "epe_p90_mm"}
    assert set(res) == keys
    assert res["epe_mm"] is None and res["epe_p90_mm"] is None  # no true field given
    json.dumps(res)
    assert res["dice"] == pytest.approx(np.nanmean(dice_loop(f, w, ids)))
    assert list(res["dice_per_label"]) == ids
    assert all(type(v) is float for k, v in res.items() if not k.endswith("per_label") and not k.startswith("epe"))
    j = M.jacobian_determinant(u)
    assert res["fold_pct"] == M.fold_pct(j, mask)
    assert res["ndv_pct"] == M.ndv_pct(u, mask)
    with pytest.raises(ValueError, match="segmentation"):
        M.deformable_metrics(u, fixed_seg=f[:-1], warped_seg=w[:-1], labels=ids)
    none = M.deformable_metrics(u[0])
    assert none["dice"] is None and none["tre"] is None and none["dice_per_label"] == {}
    json.dumps(none)
