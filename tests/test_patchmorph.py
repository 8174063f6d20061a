"""PatchMorph: world-space patch sampling, patch assembly, cross-grid registration end to end.

Independent truths: ``scipy.ndimage.affine_transform`` (resampling the image onto the
patch's grid), exact reproduction of affine world functions by trilinear interpolation, and
the analytic world identity ``A_m⁻¹ A_f x − x`` of an untrained network.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torch.nn as nn

from benchmark.core.spatial import affine_to_disp, warp
from systems.patchmorph import (
    PatchFrame,
    PatchMorph,
    PatchTransform,
    assemble_field,
    random_rotations,
    sample_at_world,
    sample_patches,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _affine(spacing, angle_deg, axis, origin) -> torch.Tensor:
    """Voxel→world: rotation about ``axis`` by ``angle_deg`` times diag(spacing), plus origin."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    th = math.radians(angle_deg)
    r = np.eye(3) + math.sin(th) * k + (1 - math.cos(th)) * (k @ k)
    out = np.eye(4)
    out[:3, :3] = r @ np.diag(spacing)
    out[:3, 3] = origin
    return torch.from_numpy(out)


def _centre_world(shape, affine: torch.Tensor) -> torch.Tensor:
    c = (torch.tensor(shape, dtype=torch.float64) - 1) / 2
    return affine[:3, :3] @ c + affine[:3, 3]


def _frame(centre, extent, rot, n) -> PatchFrame:
    k = rot.shape[0]
    return PatchFrame(centre.reshape(-1, 3).expand(k, 3).clone(), torch.tensor(extent, dtype=torch.float64).expand(k, 3).clone(), rot, n)


# ------------------------------------------------------------------------ patch sampling
def test_patch_through_rotated_anisotropic_affine_matches_resampled_copy(rng):
    shape = (24, 20, 28)
    img = ndi.gaussian_filter(rng.standard_normal(shape), 1.5).astype(np.float32)
    seg = (rng.integers(0, 5, size=shape)).astype(np.int64)
    aff = _affine((1.3, 0.8, 1.1), 25.0, (1.0, 2.0, 0.5), (-14.0, 7.0, -9.0))
    n = 10
    rot = random_rotations(2, 40.0, torch.Generator().manual_seed(3))
    centre = _centre_world(shape, aff)
    frame = _frame(centre, (10.0, 8.0, 12.0), rot, n)
    pts = frame.world_points()
    got = sample_patches(torch.from_numpy(img)[None, None], aff[None], pts)
    got_seg = sample_patches(torch.from_numpy(seg)[None, None], aff[None], pts)
    assert got.shape == (2, 1, n, n, n) and got_seg.dtype == torch.int64
    # the same world region: resample the image onto the patch grid (patch index -> image voxel)
    m = (torch.linalg.inv(aff) @ frame.index_to_world()).numpy()
    for k in range(2):
        ref = ndi.affine_transform(img.astype(np.float64), m[k, :3, :3], m[k, :3, 3], output_shape=(n, n, n), order=1)
        np.testing.assert_allclose(got[k, 0].numpy(), ref, atol=2e-5)
        ref_seg = ndi.affine_transform(seg, m[k, :3, :3], m[k, :3, 3], output_shape=(n, n, n), order=0)
        assert (got_seg[k, 0].numpy() == ref_seg).mean() > 0.995
    # the patch really lies inside the image (no border semantics involved above)
    corners = np.stack(np.meshgrid(*[[0.0, n - 1.0]] * 3, indexing="ij")).reshape(3, 8)
    vox = m[:, :3, :3] @ corners + m[:, :3, 3:]
    assert vox.min() > 0 and (vox.max(axis=(0, 2)) < np.array(shape) - 1).all()


def test_patch_of_world_function_is_the_same_from_two_different_grids():
    """A world-affine intensity ``f(p) = a·p + c`` sampled on two grids of different shape,
    spacing and orientation gives the same patch: f at the patch's world points."""
    a, c0 = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64), 2.0
    grids = []
    for shape, spacing, angle, axis in (((22, 18, 26), (1.0, 1.4, 0.9), 0.0, (0, 0, 1)),
                                        ((30, 26, 20), (0.8, 0.9, 1.3), -35.0, (0.3, 1.0, -0.4))):
        aff = _affine(spacing, angle, axis, (0.0, 0.0, 0.0))
        aff[:3, 3] = torch.tensor([1.5, -1.0, 0.0], dtype=torch.float64) - _centre_world(shape, aff)
        grids.append((shape, aff))
    frame = _frame(torch.tensor([1.0, -0.5, 0.5], dtype=torch.float64), (8.0, 9.0, 7.0),
                   random_rotations(1, 60.0, torch.Generator().manual_seed(0)), 8)
    pts = frame.world_points(torch.float64)
    truth = torch.einsum("i,ni...->n...", a, pts) + c0
    outs = []
    for shape, aff in grids:
        vox = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"))
        world = torch.einsum("ij,j...->i...", aff[:3, :3], vox) + aff[:3, 3].view(3, 1, 1, 1)
        img = (torch.einsum("i,i...->...", a, world) + c0).float()[None, None]
        outs.append(sample_patches(img, aff[None], pts.float())[:, 0].double())
        # centred small patch: inside both grids
        assert torch.allclose(outs[-1], truth, atol=2e-4)
    assert torch.allclose(outs[0], outs[1], atol=3e-4)
    # a wrong convention (e.g. axes reversed) would not reproduce f
    aff_t = grids[1][1].clone()
    aff_t[:3, :3] = aff_t[:3, :3].flip(1)
    shape, _ = grids[1]
    vox = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"))
    world = torch.einsum("ij,j...->i...", grids[1][1][:3, :3], vox) + grids[1][1][:3, 3].view(3, 1, 1, 1)
    img = (torch.einsum("i,i...->...", a, world) + c0).float()[None, None]
    wrong = sample_patches(img, aff_t[None], pts.float())[:, 0].double()
    assert (wrong - truth).abs().max() > 0.5


# ------------------------------------------------------------------------ assembly
def _restriction(frame: PatchFrame, field) -> PatchTransform:
    """Patches that predict exactly ``field`` (world mm displacement) at their points, as a
    dense residual in patch voxels along the patch axes."""
    pts = frame.world_points(torch.float64)
    g = field(pts)
    local = torch.einsum("nji,nj...->ni...", frame.rot, g) / frame.step.view(-1, 3, 1, 1, 1)
    k = frame.count
    return PatchTransform(frame, torch.zeros(k, 3, 3), torch.zeros(k, 3), local.float())


def _assemble(tr: PatchTransform, aff: torch.Tensor, shape):
    num, den = assemble_field(tr, aff, shape)
    field = (num / den.clamp_min(1e-12)).reshape(3, *shape)
    return field, den.reshape(shape)


def _fixed_world(shape, aff) -> torch.Tensor:
    vox = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"))
    return (torch.einsum("ij,j...->i...", aff[:3, :3], vox) + aff[:3, 3].view(3, 1, 1, 1))[None]


def test_assembled_field_from_overlapping_patches_equals_known_field():
    shape = (18, 22, 16)
    aff = _affine((1.2, 0.9, 1.4), 30.0, (1.0, -1.0, 2.0), (-9.0, 4.0, -10.0))
    pm = PatchMorph(patch_size=8, extents_mm=(12.0,), backbone_args={"enc": [4], "dec": [4, 4]}, infer_passes=2)
    frames = pm.inference_frames(shape, aff, 0, torch.Generator().manual_seed(1))
    # random orientations per patch too: each patch's own frame must be honoured
    frames.rot = random_rotations(frames.count, 30.0, torch.Generator().manual_seed(2))
    assert frames.count > 30
    gmat = torch.tensor([[0.02, -0.01, 0.03], [0.01, 0.015, -0.02], [-0.03, 0.02, 0.01]], dtype=torch.float64)
    g0 = torch.tensor([0.7, -0.4, 1.1], dtype=torch.float64)

    def affine_field(p):
        return torch.einsum("ij,nj...->ni...", gmat, p) + g0.view(1, 3, *([1] * (p.dim() - 2)))

    def smooth_field(p):
        return torch.stack([1.5 * torch.sin(p[:, 1] / 9.0), 1.0 * torch.cos(p[:, 2] / 8.0 + p[:, 0] / 11.0),
                            0.8 * torch.sin(p[:, 0] / 10.0) * torch.cos(p[:, 1] / 12.0)], dim=1)

    world = _fixed_world(shape, aff)
    got, den = _assemble(_restriction(frames, affine_field), aff, shape)
    assert bool((den > 0).all()), "every fixed voxel is covered"
    # trilinear interpolation reproduces an affine field exactly
    torch.testing.assert_close(got.double(), affine_field(world)[0], atol=2e-4, rtol=0)
    got, _ = _assemble(_restriction(frames, smooth_field), aff, shape)
    truth = smooth_field(world)[0]
    err = (got.double() - truth).abs()
    assert err.max() < 0.03 and err.mean() < 0.005  # interpolation error of patch grids (step ~1.7 mm)
    # a field assembled with the wrong patch orientation would be visibly off
    wrong = PatchTransform(frames, torch.zeros(frames.count, 3, 3), torch.zeros(frames.count, 3),
                           _restriction(frames, smooth_field).residual.flip(1))
    bad, _ = _assemble(wrong, aff, shape)
    assert (bad.double() - truth).abs().max() > 0.3

    # the affine head's parameters give the same field: e ⊙ (A t + b) = R^T g(c + R (e ⊙ t))
    e = frames.extent
    r = frames.rot
    mat = torch.einsum("ni,nji,jk,nkl,nl->nil", 1 / e, r, gmat, r, e)
    shift = torch.einsum("nji,nj->ni", r, affine_field(frames.centre.view(-1, 3, 1))[..., 0]) / e
    n = frames.size
    via_affine = PatchTransform(frames, mat.float(), shift.float(), torch.zeros(frames.count, 3, n, n, n))
    got, _ = _assemble(via_affine, aff, shape)
    torch.testing.assert_close(got.double(), affine_field(world)[0], atol=2e-4, rtol=0)


# ------------------------------------------------------------------------ end to end
def _blob_world(p: torch.Tensor) -> torch.Tensor:
    """A smooth analytic 'head' in world mm: a few Gaussian blobs. ``p (3, *S)`` → ``(*S)``."""
    centres = torch.tensor([[0.0, 0.0, 0.0], [5.0, -4.0, 3.0], [-6.0, 3.0, -2.0], [2.0, 6.0, -5.0], [-3.0, -6.0, 5.0]],
                           dtype=p.dtype)
    widths = [7.0, 3.0, 3.5, 2.5, 3.0]
    amps = [0.5, 0.6, 0.5, 0.7, 0.4]
    out = torch.zeros(p.shape[1:], dtype=p.dtype)
    for c, w, a in zip(centres, widths, amps):
        d2 = ((p - c.view(3, 1, 1, 1)) ** 2).sum(0)
        out = out + a * torch.exp(-d2 / (2 * w * w))
    return out


def _grid_image(shape, aff, shift=(0.0, 0.0, 0.0)) -> torch.Tensor:
    vox = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"))
    world = torch.einsum("ij,j...->i...", aff[:3, :3], vox) + aff[:3, 3].view(3, 1, 1, 1)
    world = world + torch.tensor(shift, dtype=torch.float64).view(3, 1, 1, 1)
    return _blob_world(world).float()[None, None]


def test_cross_grid_pair_registers_end_to_end():
    sf, sm = (20, 18, 22), (24, 26, 17)
    af = _affine((1.1, 1.3, 1.0), 15.0, (0.0, 0.3, 1.0), (0.0, 0.0, 0.0))
    am = _affine((0.9, 0.85, 1.35), -25.0, (1.0, 0.2, -0.3), (0.0, 0.0, 0.0))
    af[:3, 3] = -_centre_world(sf, af)  # both grids centred near the world origin
    am[:3, 3] = torch.tensor([0.5, -0.5, 0.3], dtype=torch.float64) - _centre_world(sm, am)
    # the moving subject's content sits 2.5 mm further along world x
    fixed = _grid_image(sf, af)
    moving = _grid_image(sm, am, shift=(-2.5, 0.0, 0.0))
    batch = {"fixed": fixed, "moving": moving, "fixed_affine": af[None], "moving_affine": am[None]}
    torch.manual_seed(0)
    pm = PatchMorph(lambda_=0.1, lr=3e-3, patch_size=8, extents_mm=(20.0, 10.0), train_patches=4, ncc_window=5,
                    foreground_threshold=0.2, backbone_args={"enc": [8, 8], "dec": [8, 8, 8]})
    u0 = pm.register(batch)
    assert u0.shape == (1, 3, *sf) and bool(torch.isfinite(u0).all())
    # an untrained network is the world identity: x + u(x) = A_m^-1 A_f x (moving voxel index)
    world_id = affine_to_disp((torch.linalg.inv(am) @ af).float(), sf)
    assert (u0 - world_id).abs().max() < 2e-3
    # ... which already resamples the moving grid onto the fixed one (not so a zero field)
    w_id = warp(moving, u0)
    expected = _grid_image(sf, af, shift=(-2.5, 0.0, 0.0))
    pos = u0 + torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in sf], indexing="ij"))[None]
    inside = ((pos >= 0) & (pos <= torch.tensor(sm).view(1, 3, 1, 1, 1) - 1)).all(dim=1, keepdim=True)
    assert inside.float().mean() > 0.6
    err = (w_id - expected)[inside].abs()
    assert err.max() < 0.06 and err.mean() < 0.005  # trilinear interpolation of blobs 2.5-7 mm wide
    assert (warp(moving, torch.zeros_like(u0)) - expected)[inside].abs().max() > 0.1
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3), slice(3, -3))

    def eval_sim() -> float:
        state = torch.get_rng_state()
        torch.manual_seed(123)
        with torch.no_grad():
            vals = [pm.training_loss(batch)[1]["sim"].item() for _ in range(4)]
        torch.set_rng_state(state)
        return float(np.mean(vals))

    before = eval_sim()
    opt = torch.optim.Adam(pm.parameters(), lr=3e-3)
    for _ in range(25):
        loss, _ = pm.training_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_sim()
    assert after < before - 0.01, (before, after)
    u = pm.register(batch)
    assert u.shape == (1, 3, *sf) and bool(torch.isfinite(u).all())
    # the registered image is closer to the fixed one than the world identity was (inside the head)
    mse_id = ((w_id - fixed)[inner] ** 2).mean()
    mse = ((warp(moving, u) - fixed)[inner] ** 2).mean()
    assert mse < mse_id, (float(mse), float(mse_id))


def test_pluggable_backbone_and_declared_search_space():
    class Tiny(nn.Module):  # no out_channels attribute: found by a dry run
        def __init__(self, width: int = 4) -> None:
            super().__init__()
            self.conv = nn.Conv3d(2, width, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.conv(x))

    pm = PatchMorph(patch_size=6, extents_mm=(12.0, 6.0), backbone=Tiny, backbone_args={"width": 5})
    assert all(isinstance(n.backbone, Tiny) and n.flow.in_channels == 5 for n in pm.nets)
    assert pm.nets[0].backbone is not pm.nets[1].backbone
    params = set(inspect.signature(PatchMorph.__init__).parameters)
    assert set(PatchMorph.search_space) <= params and "lambda_" in PatchMorph.search_space
    with pytest.raises(ValueError, match="shrink"):
        PatchMorph(extents_mm=(10.0, 20.0))
    shape = (10, 9, 8)
    aff = torch.eye(4, dtype=torch.float64)
    out = sample_at_world(torch.arange(720, dtype=torch.int64).view(1, 1, *shape), aff,
                          torch.tensor([[2.0, 3.0, 4.0]]).view(1, 3, 1, 1, 1))
    assert int(out) == (2 * 9 + 3) * 8 + 4


# ------------------------------------------------------------------------ ablation switches
def _tiny_pm(**kw) -> PatchMorph:
    torch.manual_seed(0)
    return PatchMorph(lambda_=0.1, lr=3e-3, patch_size=8, extents_mm=(24.0, 16.0, 8.0), train_patches=2, ncc_window=5,
                      backbone_args={"enc": [4, 4], "dec": [4, 4, 4]}, **kw)


def _pm_batch():
    shape = (16, 16, 16)
    aff = torch.eye(4, dtype=torch.float64)[None]
    g = np.random.default_rng(5)
    img = [torch.from_numpy(ndi.gaussian_filter(g.random(shape), 2.0)).float()[None, None] for _ in range(2)]
    return {"fixed": img[0], "moving": img[1], "fixed_affine": aff, "moving_affine": aff}


def _train_one_step(pm: PatchMorph, batch) -> float:
    before = [p.detach().clone() for p in pm.parameters()]
    opt = torch.optim.Adam(pm.parameters(), lr=1e-3)
    loss, _ = pm.training_loss(batch)
    assert bool(torch.isfinite(loss))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return max(float((p.detach() - b).abs().max()) for p, b in zip(pm.parameters(), before))


def test_single_scale_switch_keeps_the_finest_scale_and_trains():
    full, one = _tiny_pm(), _tiny_pm(n_scales=1)
    assert len(full.nets) == 3 and len(one.nets) == 1
    assert one.extents == [full.extents[-1]]  # the finest patch, without the coarse context
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(one) * 3 == n(full)
    batch = _pm_batch()
    with torch.no_grad():
        for pm in (full, one):
            for net in pm.nets:
                net.flow.bias.fill_(0.3)  # visible residuals at every scale
        u_full, u_one = full.register(batch), one.register(batch)
    assert float((u_full - u_one).abs().max()) > 0.1
    assert _train_one_step(one, batch) > 0
    with pytest.raises(ValueError, match="n_scales"):
        _tiny_pm(n_scales=4)


def test_affine_switch_removes_the_affine_part_and_trains():
    full, dense = _tiny_pm(), _tiny_pm(affine=False)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    heads = sum(net.affine_head.weight.numel() + net.affine_head.bias.numel() for net in full.nets)
    assert n(full) - n(dense) == heads and all(net.affine_head is None for net in dense.nets)
    batch = _pm_batch()
    full.load_state_dict(dense.state_dict(), strict=False)  # same backbones and residual heads
    with torch.no_grad():
        same = (full.register(batch) - dense.register(batch)).abs().max()
        for net in full.nets:  # an affine head that outputs a shift: only the full method moves
            net.affine_head.bias[9:].fill_(1.0)
        differ = (full.register(batch) - dense.register(batch)).abs().max()
    assert float(same) < 1e-5 and float(differ) > 0.1
    assert _train_one_step(dense, batch) > 0
