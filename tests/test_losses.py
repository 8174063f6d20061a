"""Losses and regularisers of benchmark.core.losses against brute force, scipy and analytic values."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from benchmark.core.losses import (
    BendingEnergy,
    Diffusion,
    GradientNCC,
    LocalNCC,
    MSE,
    MutualInformation,
    bending_energy,
    box_sum,
    diffusion,
    gradient_ncc,
    local_ncc,
    mse,
    mutual_information,
)
from benchmark.core.spatial import identity_grid

# --------------------------------------------------------------------------- local NCC


def _brute_local_ncc(f: np.ndarray, m: np.ndarray, window: tuple[int, ...], voxel: tuple[int, ...],
                     eps: float) -> float:
    """Windowed squared NCC at one voxel, zero padding, window sums (VoxelMorph form)."""
    r = [w // 2 for w in window]
    fp = np.pad(f, [(k, k) for k in r])
    mp = np.pad(m, [(k, k) for k in r])
    sl = tuple(slice(v, v + w) for v, w in zip(voxel, window))  # padded index v+k-r .. = v .. v+w
    a, b = fp[sl].ravel(), mp[sl].ravel()
    a0, b0 = a - a.mean(), b - b.mean()
    cross = (a0 * b0).sum()
    return float(cross**2 / ((a0 * a0).sum() * (b0 * b0).sum() + eps))


@pytest.mark.parametrize("shape,window", [((9, 10), (5, 5)), ((9, 10), (3, 7)), ((6, 7, 8), (3, 3, 3)),
                                          ((6, 7, 8), (5, 3, 3))])
def test_local_ncc_matches_brute_force(shape: tuple[int, ...], window: tuple[int, ...],
                                       rng: np.random.Generator) -> None:
    f = rng.random(shape)
    m = 0.5 * f + rng.random(shape)
    cc = local_ncc(torch.from_numpy(f)[None, None], torch.from_numpy(m)[None, None], window, reduction="none")
    assert cc.shape == (1, 1, *shape)
    corners = list(itertools.product(*[(0, n - 1) for n in shape]))
    centre = tuple(n // 2 for n in shape)
    near_edge = tuple(1 for _ in shape)
    for vox in corners + [centre, near_edge]:
        ref = _brute_local_ncc(f, m, window, vox, 1e-5)
        assert cc[(0, 0, *vox)].item() == pytest.approx(ref, rel=1e-9, abs=1e-12), vox
    brute_mean = np.mean([_brute_local_ncc(f, m, window, v, 1e-5) for v in np.ndindex(*shape)])
    assert local_ncc(torch.from_numpy(f)[None, None], torch.from_numpy(m)[None, None], window).item() == \
        pytest.approx(brute_mean, rel=1e-9)


def test_box_sum_matches_scipy(rng: np.random.Generator) -> None:
    x = rng.random((2, 1, 6, 7, 8))
    ours = box_sum(torch.from_numpy(x), (3, 5, 1)).numpy()
    ref = ndi.uniform_filter(x[1, 0], (3, 5, 1), mode="constant") * 15
    np.testing.assert_allclose(ours[1, 0], ref, atol=1e-12)


@pytest.mark.parametrize("nd", [2, 3])
def test_local_ncc_affine_intensity_is_one_in_the_interior(nd: int, smooth_field) -> None:
    shape = (24, 26) if nd == 2 else (12, 13, 14)
    # Textured enough that eps (1e-5 on window sums) is negligible against var_f·var_w.
    f = smooth_field(shape, 1, 1.0, 1.0, seed=3).float() + torch.rand(1, 1, *shape)
    inner = (slice(None), slice(None)) + (slice(2, -2),) * nd
    for m in (3.0 * f + 2.0, -0.5 * f + 1.0):
        cc = local_ncc(f, m, 5, reduction="none")
        assert cc[inner].min() > 0.999
        assert cc.max() <= 1.0
    other = torch.rand_like(f)
    assert local_ncc(f, other, 5, reduction="none")[inner].mean() < 0.2


@pytest.mark.parametrize("level", [0.7, 1000.0])
def test_local_ncc_constant_image_is_finite_zero_with_finite_gradients(level: float) -> None:
    """A constant patch has zero variance: its CC is 0, not NaN and not a float32 rounding
    residue divided by eps (the old failure mode at CT-like intensity levels). With zero
    padding, windows that reach past the border are not constant, so the exact 0 is checked
    where the window lies inside the image; everything must stay finite."""
    shape = (1, 1, 14, 15, 16)
    win = 7
    inner = (slice(None), slice(None)) + (slice(win // 2, -(win // 2)),) * 3
    fixed = torch.full(shape, level)
    warped = (level * torch.rand(shape)).requires_grad_(True)
    cc = local_ncc(fixed, warped, win, reduction="none")
    assert torch.isfinite(cc).all() and cc.max() <= 1.0
    assert cc[inner].abs().max() < 1e-4
    cc.mean().backward()
    assert torch.isfinite(warped.grad).all()
    both = torch.full(shape, level, requires_grad=True)
    cc2 = local_ncc(both, both, win, reduction="none")
    assert torch.isfinite(cc2).all() and cc2[inner].abs().max() < 1e-4
    cc2.mean().backward()
    assert torch.isfinite(both.grad).all()
    zero = torch.zeros(shape, requires_grad=True)
    v0 = local_ncc(zero, zero, win)
    v0.backward()
    assert v0.item() == 0.0 and torch.isfinite(zero.grad).all()


def test_local_ncc_module_sign_and_gradient() -> None:
    f = torch.rand(2, 1, 8, 9, 10)
    m = (f + 0.3 * torch.rand_like(f)).requires_grad_(True)
    loss = LocalNCC(window=5)(f, m)
    assert loss.item() == pytest.approx(-local_ncc(f, m, 5).item())
    loss.backward()
    assert torch.isfinite(m.grad).all() and m.grad.abs().sum() > 0


# --------------------------------------------------------------------------- MSE


def test_mse(rng: np.random.Generator) -> None:
    a, b = rng.random((2, 1, 5, 6)), rng.random((2, 1, 5, 6))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    assert mse(ta, tb).item() == pytest.approx(np.mean((a - b) ** 2))
    assert MSE()(ta, tb).item() == pytest.approx(np.mean((a - b) ** 2))
    with pytest.raises(ValueError):
        mse(ta, tb[..., :5])


# --------------------------------------------------------------------------- mutual information


def _dense_mi(f: np.ndarray, m: np.ndarray, bins: int, s: float, truncated: bool) -> float:
    """Reference MI with dense Parzen weights over every bin (no candidate-bin shortcut)."""
    centres = np.arange(bins)

    def weights(x: np.ndarray) -> np.ndarray:
        d = x.ravel()[:, None] * (bins - 1) - centres[None, :]
        w = np.exp(-0.5 * (d / s) ** 2)
        if truncated:
            t = max(3.0 * s, 1.0)
            w = np.clip(w - np.exp(-0.5 * (t / s) ** 2), 0, None)
        return w / w.sum(1, keepdims=True)

    joint = weights(f).T @ weights(m)
    p = joint / joint.sum()
    pf, pm = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / (pf @ pm)[nz])).sum())


@pytest.mark.parametrize("bins,sigma", [(32, 0.5), (16, 1.0), (8, 0.3)])
def test_mutual_information_matches_dense_reference(bins: int, sigma: float, rng: np.random.Generator) -> None:
    f = rng.random((1, 1, 20, 21))
    m = np.clip(0.6 * f + 0.4 * rng.random(f.shape), 0, 1)
    ours = mutual_information(torch.from_numpy(f), torch.from_numpy(m), bins, sigma).item()
    assert ours == pytest.approx(_dense_mi(f, m, bins, sigma, truncated=True), rel=1e-6)
    # The smooth truncation changes little against a plain Gaussian Parzen window.
    assert ours == pytest.approx(_dense_mi(f, m, bins, sigma, truncated=False), rel=0.05)


@pytest.mark.parametrize("nd", [2, 3])
def test_mutual_information_self_shuffle_and_monotone_remap(nd: int, rng: np.random.Generator) -> None:
    shape = (64, 64) if nd == 2 else (16, 16, 16)
    levels = np.array([0.15, 0.4, 0.65, 0.9])
    img = levels[rng.integers(0, 4, shape)] + 0.005 * rng.standard_normal(shape)
    t = torch.from_numpy(np.clip(img, 0, 1))[None, None]
    shuffled = t.flatten()[torch.randperm(t.numel())].view_as(t)
    mi_self = mutual_information(t, t).item()
    assert mi_self == pytest.approx(np.log(4), rel=0.03)  # four equiprobable classes
    assert mutual_information(t, shuffled).item() < 0.05 * mi_self
    for remap in (t**2, torch.sqrt(t), 1.0 - t):
        assert mutual_information(t, remap).item() == pytest.approx(mi_self, rel=0.02)
    assert MutualInformation()(t, t).item() == pytest.approx(-mi_self)


def test_mutual_information_mask_batch_and_clamp(rng: np.random.Generator) -> None:
    f = torch.from_numpy(rng.random((2, 1, 12, 14)))
    m = torch.from_numpy(rng.random((2, 1, 12, 14)))
    mask = torch.zeros(1, 1, 12, 14, dtype=torch.bool)
    mask[..., 3:9, 2:11] = True
    masked = mutual_information(f, m, mask=mask).item()
    sub = [mutual_information(f[b:b + 1, :, 3:9, 2:11], m[b:b + 1, :, 3:9, 2:11]).item() for b in range(2)]
    assert masked == pytest.approx(np.mean(sub), rel=1e-9)
    # Out-of-range intensities are clamped to [0, 1].
    assert mutual_information(f * 3 - 1, m).item() == pytest.approx(
        mutual_information((f * 3 - 1).clamp(0, 1), m).item(), rel=1e-12)
    with pytest.raises(ValueError):
        mutual_information(f, m, mask=torch.zeros_like(mask))


def test_mutual_information_is_differentiable_and_continuous(rng: np.random.Generator) -> None:
    f = torch.from_numpy(rng.uniform(0.05, 0.95, (1, 1, 5, 6)))
    m = torch.from_numpy(rng.uniform(0.05, 0.95, (1, 1, 5, 6))).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w: mutual_information(f, w, bins=8, sigma_ratio=0.5), (m,),
                                    eps=1e-7, atol=1e-6)
    # Sweeping an intensity offset across many bin boundaries gives no jumps: second
    # differences stay at the curvature level (~3e-6 here), where a hard-truncated kernel
    # shows ~2e-4 steps whenever a value crosses a bin boundary.
    x = torch.from_numpy(rng.random((1, 1, 20, 20)) * 0.5)
    y = torch.from_numpy(rng.random((1, 1, 20, 20)))
    vals = np.array([mutual_information(x + s, y).item() for s in np.linspace(0, 0.1, 801)])
    assert np.abs(np.diff(vals, 2)).max() < 3e-5


# --------------------------------------------------------------------------- gradient NCC


def _scipy_gradient_ncc(f: np.ndarray, m: np.ndarray) -> float:
    nd = f.ndim
    inner = (slice(1, -1),) * nd
    vals = []
    for a in range(nd):
        gf, gm = ndi.sobel(f, axis=a)[inner].ravel(), ndi.sobel(m, axis=a)[inner].ravel()
        vals.append(np.corrcoef(gf, gm)[0, 1])
    return float(np.mean(vals))


@pytest.mark.parametrize("nd", [2, 3])
def test_gradient_ncc(nd: int, smooth_field) -> None:
    shape = (40, 44) if nd == 2 else (14, 15, 16)
    f = smooth_field(shape, 1, 1.0, 1.5, seed=11)
    m = f + 0.3 * smooth_field(shape, 1, 1.0, 1.0, seed=12)
    assert gradient_ncc(f, f).item() == pytest.approx(1.0, abs=1e-9)
    assert gradient_ncc(f, 2.5 * f + 3.0).item() == pytest.approx(1.0, abs=1e-9)
    assert gradient_ncc(f, -f).item() == pytest.approx(-1.0, abs=1e-9)
    assert gradient_ncc(f, m).item() == pytest.approx(_scipy_gradient_ncc(f[0, 0].numpy(), m[0, 0].numpy()),
                                                      abs=1e-9)
    shifted = torch.roll(f, shifts=2, dims=2)
    assert gradient_ncc(f, shifted).item() < 0.9
    assert GradientNCC()(f, f).item() == pytest.approx(-1.0, abs=1e-9)
    const = torch.full_like(f, 0.3, requires_grad=True)
    value = gradient_ncc(f, const)
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(const.grad).all()


# --------------------------------------------------------------------------- regularisers


def _linear_field(a: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    nd = len(shape)
    x = identity_grid(shape, dtype=torch.float64)
    return (torch.einsum("de,e...->d...", torch.from_numpy(a), x) + 0.5).unsqueeze(0).expand(2, nd, *shape)


@pytest.mark.parametrize("nd", [2, 3])
def test_diffusion_of_a_linear_field(nd: int, rng: np.random.Generator) -> None:
    shape = (5, 6, 7)[:nd]
    a = rng.normal(size=(nd, nd))
    u = _linear_field(a, shape)
    assert diffusion(u).item() == pytest.approx((a**2).sum() / nd**2, rel=1e-12)
    spacing = np.array([0.5, 2.0, 1.5])[:nd]
    phys = a * spacing[:, None] / spacing[None, :]  # d(s_d u_d) / d(s_e x_e)
    assert Diffusion(spacing)(u).item() == pytest.approx((phys**2).sum() / nd**2, rel=1e-12)
    assert diffusion(torch.zeros_like(u)).item() == 0.0


@pytest.mark.parametrize("nd", [2, 3])
def test_bending_energy_affine_zero_and_quadratic_analytic(nd: int, rng: np.random.Generator) -> None:
    shape = (5, 6, 7)[:nd]
    assert bending_energy(_linear_field(rng.normal(size=(nd, nd)), shape)).abs().item() < 1e-20
    q = rng.normal(size=(nd, nd, nd))
    q = 0.5 * (q + q.transpose(0, 2, 1))  # u_d(x) = x^T Q_d x, Hessian 2 Q_d
    x = identity_grid(shape, dtype=torch.float64)
    u = torch.einsum("dij,i...,j...->d...", torch.from_numpy(q), x, x).unsqueeze(0)
    hess = 2 * q
    # Σ_i H_ii² + 2 Σ_{i<j} H_ij² = ||H||_F² per channel; the mean runs over channels.
    assert bending_energy(u).item() == pytest.approx((hess**2).sum() / nd, rel=1e-10)
    spacing = np.array([0.5, 2.0, 1.5])[:nd]
    phys = hess * spacing[:, None, None] / (spacing[None, :, None] * spacing[None, None, :])
    assert BendingEnergy(spacing)(u).item() == pytest.approx((phys**2).sum() / nd, rel=1e-10)
    with pytest.raises(ValueError):
        bending_energy(torch.zeros(1, nd, *([2] * nd)))


def test_regularisers_are_differentiable(smooth_field) -> None:
    u = smooth_field((8, 9, 10), 3, 1.0, 1.5).requires_grad_(True)
    (diffusion(u) + bending_energy(u)).backward()
    assert torch.isfinite(u.grad).all() and u.grad.abs().sum() > 0
