"""DiffOp-net: the operator against a real-space finite-difference Laplacian, the kernel, the
Sobolev gradient against a direct computation, CCA's structure, and the composed cascade."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmark.losses import local_ncc
from benchmark.spatial import warp
from systems.diffop import (
    CascadeUNet,
    CrossCoordinateAttention,
    DiffOperator,
    DiffOpNet,
    SobolevGradient,
    local_cc_force,
    operator_symbol,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _fd_L(v: np.ndarray, alpha: float, gamma: float) -> np.ndarray:
    """``γ v − α Δ v`` with the 7-point Laplacian on a periodic grid of spacing ``1/N_d``."""
    out = gamma * v.copy()
    for d in range(v.ndim - 2):
        ax = 2 + d
        n = v.shape[ax]
        lap = np.roll(v, 1, axis=ax) + np.roll(v, -1, axis=ax) - 2.0 * v
        out -= alpha * n * n * lap
    return out


def _np_K(f: np.ndarray, alpha: float, gamma: float) -> np.ndarray:
    """``(L†L)⁻¹ f`` by numpy's full complex FFT and the written-out symbol."""
    shape = f.shape[2:]
    ks = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    sym = gamma + sum(2 * alpha * n * n * (1 - np.cos(2 * np.pi * k / n)) for k, n in zip(ks, shape))
    axes = tuple(range(2, f.ndim))
    return np.real(np.fft.ifftn(np.fft.fftn(f, axes=axes) / sym**2, axes=axes))


@pytest.mark.parametrize("shape", [(6, 8, 10), (7, 5, 9)])
def test_symbol_is_the_fourier_transform_of_the_fd_operator(shape):
    rng = np.random.default_rng(0)
    alpha, gamma = 0.003, 1.7
    v = rng.standard_normal((2, 3, *shape))
    lv = _fd_L(v, alpha, gamma)
    axes = (2, 3, 4)
    ratio = np.fft.fftn(lv, axes=axes) / np.fft.fftn(v, axes=axes)
    sym = operator_symbol(shape, alpha, gamma, half=False).numpy()
    np.testing.assert_allclose(ratio.real, np.broadcast_to(sym, ratio.shape), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ratio.imag, 0.0, atol=1e-9)
    # the rfft layout is the first half of the last axis
    np.testing.assert_allclose(operator_symbol(shape, alpha, gamma).numpy(), sym[..., : shape[-1] // 2 + 1])
    # and the operator applied by FFT equals the FD operator in real space
    op = DiffOperator(shape, alpha, gamma)
    np.testing.assert_allclose(op.L(torch.from_numpy(v)).numpy(), lv, rtol=1e-9, atol=1e-9)


def test_K_after_LtL_is_identity_on_band_limited_fields():
    shape = (12, 10, 8)
    alpha, gamma = 0.005, 1.0
    x = np.meshgrid(*[np.arange(n) / n for n in shape], indexing="ij")
    rng = np.random.default_rng(1)
    v = np.zeros((1, 3, *shape))
    for c in range(3):
        for _ in range(4):  # a few low-frequency modes per component
            k = rng.integers(0, 3, size=3)
            ph = rng.uniform(0, 2 * np.pi)
            v[0, c] += rng.uniform(0.5, 2.0) * np.cos(2 * np.pi * sum(ki * xi for ki, xi in zip(k, x)) + ph)
    ltl = _fd_L(_fd_L(v, alpha, gamma), alpha, gamma)  # L†L = L L in real space (L is symmetric)
    op = DiffOperator(shape, alpha, gamma)
    back = op.K(torch.from_numpy(ltl)).numpy()
    np.testing.assert_allclose(back, v, atol=1e-9)
    np.testing.assert_allclose(op.LtL(torch.from_numpy(v)).numpy(), ltl, rtol=1e-9, atol=1e-8)
    # K itself against numpy's complex FFT
    np.testing.assert_allclose(op.K(torch.from_numpy(ltl)).numpy(), _np_K(ltl, alpha, gamma), atol=1e-10)


@pytest.mark.parametrize("shape", [(6, 8, 10), (5, 7, 9)])
def test_norm2_is_the_real_space_sum_of_squares(shape):
    rng = np.random.default_rng(2)
    v = rng.standard_normal((2, 3, *shape))
    op = DiffOperator(shape, 0.004, 1.3)
    want = float((_fd_L(v, 0.004, 1.3) ** 2).sum())
    assert float(op.norm2(torch.from_numpy(v))) == pytest.approx(want, rel=1e-10)
    # its autograd gradient is 2 L†L v (what the autograd variant back-propagates)
    t = torch.from_numpy(v).requires_grad_(True)
    op.norm2(t).backward()
    np.testing.assert_allclose(t.grad.numpy(), 2 * _fd_L(_fd_L(v, 0.004, 1.3), 0.004, 1.3), rtol=1e-8, atol=1e-8)


def _blob(shape: tuple[int, ...], seed: int, sigma: float = 1.5) -> torch.Tensor:
    """A smooth random image in ``[0, 1]``, ``(1, 1, *shape)`` float64."""
    from conftest import make_smooth_field

    f = make_smooth_field(shape, 1, 1.0, sigma, seed=seed)
    return (f - f.min()) / (f.max() - f.min())


def test_local_cc_force_is_dD_dW_times_image_gradient():
    shape = (10, 9, 8)
    w = _blob(shape, 3)
    f = _blob(shape, 4)
    force, d = local_cc_force(w, f, 5)
    assert float(d) == pytest.approx(-float(local_ncc(f, w, 5, reduction="none").sum()), rel=1e-12)
    grads = np.gradient(w[0, 0].numpy())  # central differences, one-sided at the border
    rng = np.random.default_rng(0)
    for _ in range(4):
        idx = tuple(int(rng.integers(1, n - 1)) for n in shape)
        h = 1e-5
        wp, wm = w.clone(), w.clone()
        wp[(0, 0) + idx] += h
        wm[(0, 0) + idx] -= h
        dp = -float(local_ncc(f, wp, 5, reduction="none").sum())
        dm = -float(local_ncc(f, wm, 5, reduction="none").sum())
        dd = (dp - dm) / (2 * h)
        for c in range(3):
            assert float(force[(0, c) + idx]) == pytest.approx(dd * grads[c][idx], rel=1e-4, abs=1e-8)


def test_sobolev_backward_equals_v_plus_K_lambda_F():
    shape = (8, 10, 6)
    alpha, gamma, lam, scale = 0.005, 1.5, 7.0, 1.0 / 480
    rng = np.random.default_rng(5)
    v_np = 0.3 * rng.standard_normal((1, 3, *shape))
    v = torch.from_numpy(v_np).requires_grad_(True)
    w, f = _blob(shape, 6), _blob(shape, 7)
    force, d = local_cc_force(w, f, 5)
    op = DiffOperator(shape, alpha, gamma)
    e = SobolevGradient.apply(v, force, d, op, lam, scale)
    e.backward()
    want = scale * (v_np + _np_K(lam * force.numpy(), alpha, gamma))
    np.testing.assert_allclose(v.grad.numpy(), want, rtol=1e-9, atol=1e-12)
    # the value is the energy ½‖Lv‖² + λ D, scaled
    want_e = scale * (0.5 * (_fd_L(v_np, alpha, gamma) ** 2).sum() + lam * float(d))
    assert float(e.detach()) == pytest.approx(want_e, rel=1e-9)


def test_cca_shape_and_outer_product_structure():
    torch.manual_seed(0)
    b, c, dd, hh, ww = 2, 3, 4, 5, 6
    copy = torch.randn(b, c, dd, hh, ww, dtype=torch.float64)
    up = torch.randn(b, c, dd, hh, ww, dtype=torch.float64)
    cca = CrossCoordinateAttention(c).double()
    out = cca(copy, up)
    assert out.shape == copy.shape
    cn, un = copy.numpy(), up.numpy()
    # pools keeping one axis, by numpy
    pd_c, ph_c, pw_c = cn.mean((3, 4)), cn.mean((2, 4)), cn.mean((2, 3))
    pd_u, ph_u, pw_u = un.mean((3, 4)), un.mean((2, 4)), un.mean((2, 3))
    outer = lambda a, h, w: np.einsum("bci,bcj,bck->bcijk", a, h, w)  # noqa: E731
    prods = [outer(pd_c, ph_u, pw_u), outer(pd_u, ph_c, pw_u), outer(pd_u, ph_u, pw_c)]
    got = [p.detach().numpy() for p in cca.products(copy, up)]
    for g, p in zip(got, prods):
        np.testing.assert_allclose(g, p, rtol=1e-12, atol=1e-14)
        # rank one per (b, c): every D×(H·W) unfolding has rank 1
        for bi in range(b):
            for ci in range(c):
                s = np.linalg.svd(g[bi, ci].reshape(dd, -1), compute_uv=False)
                assert s[1] <= 1e-10 * s[0]
    # output = copy · σ(conv1 P_D) · σ(conv2 P_H) · σ(conv3 P_W), convs 1×1×1 over channels
    def conv(m, p):
        wt = m.weight.detach().numpy()[:, :, 0, 0, 0]
        return np.einsum("oc,bcijk->boijk", wt, p) + m.bias.detach().numpy()[None, :, None, None, None]
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    want = cn * sig(conv(cca.conv1, prods[0])) * sig(conv(cca.conv2, prods[1])) * sig(conv(cca.conv3, prods[2]))
    np.testing.assert_allclose(out.detach().numpy(), want, rtol=1e-10, atol=1e-12)


def test_unet_levels_output_at_quarter_half_full():
    x = torch.randn(1, 2, 32, 16, 16)
    for s in (4, 2, 1):
        net = CascadeUNet(4, s)
        assert net(x).shape == (1, 3, 32 // s, 16 // s, 16 // s)
    with pytest.raises(ValueError, match="divisible by 16"):
        CascadeUNet(4, 1)(torch.randn(1, 2, 20, 16, 16))


def test_composed_cascade_field_equals_sequential_warps(monkeypatch):
    from conftest import make_smooth_field

    shape = (20, 18, 16)  # not multiples of 16: the networks run on a resampled grid
    model = DiffOpNet(width=4, ncc_window=3).double()
    real = model.level_velocity
    seen = []

    def smooth_velocity(level, moving, fixed):
        # the real network's output grid, filled with a smooth random velocity of 1 voxel
        grid = real(level, moving, fixed).shape[2:]
        seen.append((level, tuple(grid)))
        return make_smooth_field(grid, 3, 2.0, 1.5, seed=10 + level)

    monkeypatch.setattr(model, "level_velocity", smooth_velocity)
    # A linear image: trilinear interpolation reproduces it, so the sequential warps
    # are exactly the image read through the chained maps, and any difference is the field's.
    from benchmark.spatial import identity_grid

    grid = identity_grid(shape, dtype=torch.float64)
    moving = (0.01 * (grid[0] + 2 * grid[1] + 3 * grid[2]))[None, None]
    fixed = _blob(shape, 9, sigma=3.0)
    with torch.no_grad():
        disps, _, _ = model.cascade(moving, fixed)
        total = model.register({"moving": moving, "fixed": fixed})
    assert [g for _, g in seen[:3]] == [(8, 8, 4), (16, 16, 8), (32, 32, 16)]  # ¼, ½, full of the 32x32x16 grid
    assert total.shape == (1, 3, *shape)
    assert all(float(u.std(dim=(2, 3, 4)).min()) > 0.05 for u in disps)  # not mere translations
    seq = moving
    for u in disps:
        seq = warp(seq, u)
    once = warp(moving, total)
    inner = (slice(None), slice(None)) + tuple(slice(6, n - 6) for n in shape)
    err = (once - seq)[inner].abs().max().item()
    # composing in the other order, or summing the fields, is measurably worse
    wrong = DiffOpNet.compose_levels([disps[2], disps[1], disps[0]])
    err_wrong = (warp(moving, wrong) - seq)[inner].abs().max().item()
    plain_sum = (warp(moving, disps[0] + disps[1] + disps[2]) - seq)[inner].abs().max().item()
    assert err < 1e-9, (err, err_wrong, plain_sum)
    assert min(err_wrong, plain_sum) > 1e-3, (err, err_wrong, plain_sum)


@pytest.mark.parametrize("mode", ["sobolev", "autograd"])
def test_training_step_reaches_every_level(mode):
    model = DiffOpNet(width=4, training=mode, ncc_window=(3, 3, 5), lambda_=10.0)
    shape = (16, 16, 16)
    batch = {"moving": _blob(shape, 1).float(), "fixed": _blob(shape, 2).float()}
    loss, parts = model.training_loss(batch)
    assert torch.isfinite(loss) and set(parts) == {"dissim0", "dissim1", "dissim2"}
    loss.backward()
    for net in model.nets:
        g = net.out.weight.grad
        assert g is not None and float(g.abs().sum()) > 0


def test_sobolev_training_moves_towards_the_fixed_image():
    """A few Adam steps on one pair: the local CC of the registered pair goes up."""
    torch.manual_seed(0)
    shape = (16, 16, 16)
    fixed = _blob(shape, 11).float()
    shift = torch.zeros(1, 3, *shape)
    shift[:, 0] = 1.5  # moving = fixed shifted by 1.5 voxels along axis 0
    moving = warp(fixed, -shift, padding_mode="border")
    model = DiffOpNet(width=4, ncc_window=(3, 5, 5), lambda_=10.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = {"moving": moving, "fixed": fixed}
    before = float(local_ncc(fixed, moving, 5))
    for _ in range(25):
        loss, _ = model.training_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        disp = model.register(batch)
    after = float(local_ncc(fixed, warp(moving, disp), 5))
    assert after > before + 0.02, (before, after)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="training"):
        DiffOpNet(training="adam")
    with pytest.raises(ValueError, match="alpha"):
        DiffOpNet(alpha=(0.1, 0.1))
    with pytest.raises(ValueError, match="gamma"):
        DiffOpNet(gamma=0.0)
    assert set(DiffOpNet.search_space) == {"gamma", "lambda_"}
    assert DiffOpNet.search_space["gamma"]["log"] is True
    assert math.isclose(DiffOpNet().gamma, 1.0)
