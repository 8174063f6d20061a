"""Tests of the MSFF pyramid (``systems.msff``).

Independent truths: the pyramid's composition is checked against a brute-force trilinear
resampling and composition written with ``scipy.ndimage.map_coordinates``, and against
warping an image step by step; the fast convolution path against ``F.conv3d``; weight sharing
against separate passes of each image.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

from benchmark.core.spatial import compose, identity_grid, integrate_velocity, warp
from systems.msff import MSFF, AuxiliaryDecoder, FusionBlock, MSFFNet, SharedEncoder, UpCatConv, _conv

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTHS = (2, 4, 4, 4, 4)


def _net(diffeomorphic: bool = False) -> MSFFNet:
    return MSFFNet(WIDTHS, WIDTHS, WIDTHS, diffeomorphic=diffeomorphic, int_steps=4)


def _smooth(shape: tuple[int, ...], channels: int, amplitude: float, sigma: float, seed: int) -> torch.Tensor:
    g = np.random.default_rng(seed)
    x = np.stack([ndi.gaussian_filter(g.standard_normal(shape), sigma, mode="nearest") for _ in range(channels)])
    x *= amplitude / np.abs(x).max()
    return torch.from_numpy(x[None]).float()


def _loud_heads(net: MSFFNet, std: float = 0.05) -> None:
    """Give every flow head visible output (their init is ~1e-5)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for head in net.heads:
            flow = head[1]
            flow.weight.copy_(torch.randn(flow.weight.shape, generator=g) * std)
            flow.bias.copy_(torch.randn(flow.bias.shape, generator=g) * 0.3)


# --------------------------------------------------------------------------- fusion blocks


def test_fusion_block_shape_and_attention_range() -> None:
    parts_ch = [3, 3, 5, 5, 3]
    block = FusionBlock(parts_ch, 6, reduction=2, spatial_kernel=3)
    parts = [torch.randn(2, c, 6, 5, 4) for c in parts_ch]
    out, att = block(parts)
    assert out.shape == (2, 6, 6, 5, 4)
    assert att["channel"].shape == (2, sum(parts_ch), 1, 1, 1)
    assert att["spatial"].shape == (2, 1, 6, 5, 4)
    for a in att.values():
        assert float(a.detach().min()) > 0.0 and float(a.detach().max()) < 1.0
    with pytest.raises(ValueError, match="channels"):
        block(parts[:-1])


@pytest.mark.parametrize("channel_pool", ["avg", "avgmax"])
def test_every_fusion_block_of_the_pyramid(channel_pool: str) -> None:
    net = MSFFNet(WIDTHS, WIDTHS, (3, 5, 6, 7, 8), channel_pool=channel_pool)
    seen: dict[int, tuple[int, ...]] = {}
    for k, block in enumerate(net.fusion):
        block.register_forward_hook(lambda mod, inp, out, k=k: seen.__setitem__(k, tuple(out[0].shape)))
    shape = (32, 16, 48)
    out = net(torch.rand(1, 1, *shape), torch.rand(1, 1, *shape))
    L = len(WIDTHS)
    for k in range(L):
        size = tuple(s // 2**k for s in shape)
        assert seen[k] == (1, (3, 5, 6, 7, 8)[k], *size)
        att = out["attention"][L - 1 - k]  # coarsest first
        n_parts = 4 * WIDTHS[k] + (3 if k < L - 1 else 0)  # enc, aux of both images (+ the field)
        assert att["channel"].shape == (1, n_parts, 1, 1, 1)
        assert att["spatial"].shape == (1, 1, *size)
        for a in att.values():
            assert float(a.detach().min()) > 0.0 and float(a.detach().max()) < 1.0


# --------------------------------------------------------------------------- composition


def _scipy_refine(coarse: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """Brute force: trilinear upsampling in the layout of 2× max-pooling (coarse voxel ``j``
    at fine position ``2j + 0.5``, so fine ``x`` reads coarse ``(x − 0.5)/2``, edge values
    beyond; magnitudes doubled), then ``residual(x) + up(x + residual(x))`` with the field
    extended by its border values."""
    fs = residual.shape[1:]
    x = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in fs], indexing="ij"))
    at = (x - 0.5) / 2
    up = np.stack([2.0 * ndi.map_coordinates(coarse[d], at, order=1, mode="nearest") for d in range(3)])
    pos = x + residual
    return residual + np.stack([ndi.map_coordinates(up[d], pos, order=1, mode="nearest") for d in range(3)])


def test_refine_matches_brute_force_composition() -> None:
    coarse = _smooth((6, 7, 5), 3, 1.5, 1.5, seed=1).double()
    residual = _smooth((12, 14, 10), 3, 2.0, 2.0, seed=2).double()
    got, up = MSFFNet.refine(coarse, residual)
    want = _scipy_refine(coarse[0].numpy(), residual[0].numpy())
    np.testing.assert_allclose(got[0].numpy(), want, atol=1e-9)
    wrong = compose(residual, up)  # the other order must not pass
    assert np.abs(wrong[0].numpy() - want).max() > 0.05


def test_upsampled_field_realigns_the_pooled_features() -> None:
    """The geometry of MSFF's pyramid (its scales are 2× max-poolings): a smooth image shifted
    by exactly 8 voxels is aligned at 1/8 resolution by a field of -1 voxel; carried up one
    scale it must be -2 voxels and align the 1/4-resolution images. The corner-aligned resize used
    before gave 2.14 here (3.0 from 2 to 4 voxels) and left them misaligned."""
    import torch.nn.functional as F

    from systems.msff import upsample_pooled_field

    x = torch.arange(96, dtype=torch.float64)
    profile = torch.sin(x / 9.0) + 0.5 * torch.cos(x / 5.0)
    fixed = profile[:64].reshape(1, 1, 64, 1, 1).expand(1, 1, 64, 16, 16).contiguous()
    # moving(x) = profile(x + 8): fixed(x) = moving(x + u) for the pull field u = -8 voxels
    moving = profile[8:72].reshape(1, 1, 64, 1, 1).expand(1, 1, 64, 16, 16).contiguous()
    pf = [fixed, F.max_pool3d(fixed, 2), F.max_pool3d(fixed, 4), F.max_pool3d(fixed, 8)]
    pm = [moving, F.max_pool3d(moving, 2), F.max_pool3d(moving, 4), F.max_pool3d(moving, 8)]
    u3 = torch.zeros(1, 3, *pf[3].shape[2:], dtype=torch.float64)
    u3[:, 0] = -1.0
    inner3 = (slice(None), slice(None), slice(1, -2))
    assert float((warp(pm[3], u3) - pf[3])[inner3].abs().max()) < 1e-12  # the coarse field is exact
    u2 = upsample_pooled_field(u3)
    torch.testing.assert_close(u2[:, 0], torch.full_like(u2[:, 0], -2.0))
    inner2 = (slice(None), slice(None), slice(2, -4))
    assert float((warp(pm[2], u2) - pf[2])[inner2].abs().max()) < 1e-12
    u0 = upsample_pooled_field(upsample_pooled_field(u2))
    torch.testing.assert_close(u0[:, 0], torch.full_like(u0[:, 0], -8.0))
    # where the samples sit, not only the factor (a constant field cannot tell): a coarse ramp
    # u(j) = a·j is, at fine voxel x (coarse position (x − 0.5)/2), the fine displacement
    # 2·a·(x − 0.5)/2 = a·(x − 0.5) away from the edge voxels; corner-aligned sampling differs
    a = 0.3
    ramp = torch.zeros(1, 3, 8, 6, 5, dtype=torch.float64)
    ramp[:, 0] = a * torch.arange(8, dtype=torch.float64)[:, None, None]
    fine = upsample_pooled_field(ramp)[0, 0, 1:-1, 0, 0]
    x = torch.arange(1, 15, dtype=torch.float64)
    torch.testing.assert_close(fine, a * (x - 0.5))


def test_composed_field_equals_sequential_warping() -> None:
    """Warp step by step (by the upsampled field, then by the residual) and at once (by the
    composed field). The "image" is the coordinate map ``I(y) = y`` (three linear ramps),
    which trilinear interpolation reproduces exactly, so away from the border the two must
    agree to rounding; the other composition order must not."""
    shape = (24, 28, 20)
    coords = identity_grid(shape, dtype=torch.float64)[None]
    coarse = _smooth((12, 14, 10), 3, 1.0, 2.0, seed=5).double()
    residual = _smooth(shape, 3, 1.5, 3.0, seed=6).double()
    field, up = MSFFNet.refine(coarse, residual)
    inner = (slice(None), slice(None), slice(5, -5), slice(5, -5), slice(5, -5))
    step_by_step = warp(warp(coords, up), residual)
    once = warp(coords, field)
    torch.testing.assert_close(once[inner], step_by_step[inner], rtol=0, atol=1e-9)
    torch.testing.assert_close(once[inner], (coords + field)[inner], rtol=0, atol=1e-9)
    wrong = (warp(coords, compose(residual, up)) - step_by_step)[inner].abs().max().item()
    assert wrong > 0.02


@pytest.mark.parametrize("diffeomorphic", [False, True])
def test_pyramid_fields_are_the_chain_of_refinements(diffeomorphic: bool) -> None:
    net = _net(diffeomorphic)
    _loud_heads(net)
    shape = (16, 32, 16)
    with torch.no_grad():
        out = net(torch.rand(1, 1, *shape), torch.rand(1, 1, *shape))
    fields, residuals, vels = out["fields"], out["residuals"], out["velocities"]
    assert len(fields) == 5
    torch.testing.assert_close(fields[0], residuals[0])
    for k in range(1, 5):
        assert fields[k].shape[2:] == tuple(s // 2 ** (4 - k) for s in shape)
        torch.testing.assert_close(fields[k], MSFFNet.refine(fields[k - 1], residuals[k])[0])
        assert residuals[k].abs().max() > 1e-2  # the check above is not vacuous
    for r, v in zip(residuals, vels):
        if diffeomorphic:
            torch.testing.assert_close(r, integrate_velocity(v, 4))
        else:
            assert r is v
    assert out["disp"] is fields[-1]


# --------------------------------------------------------------------------- forward / backward


@pytest.mark.parametrize("shape", [(16, 16, 16), (20, 33, 17)])
def test_forward_backward_two_sizes(shape: tuple[int, ...]) -> None:
    model = MSFF(width=2, width_mults=(1, 2, 2, 2, 2), lambda_=0.5, ncc_window=5)
    g = torch.Generator().manual_seed(0)
    batch = {"moving": torch.rand(1, 1, *shape, generator=g), "fixed": torch.rand(1, 1, *shape, generator=g)}
    loss, parts = model.training_loss(batch)
    assert torch.isfinite(loss) and set(parts) == {"sim", "reg"}
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads.values())
    assert sum(int(gr.abs().sum() > 0) for gr in grads.values()) == len(grads)
    disp = model.register(batch)
    assert disp.shape == (1, 3, *shape)


def test_sizes_not_divisible_by_16_are_padded_or_refused() -> None:
    shape = (20, 18, 17)
    moving, fixed = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)
    model = MSFF(width=2, width_mults=(1, 1, 1, 1, 1))
    _loud_heads(model.net)
    with torch.no_grad():
        disp = model(moving, fixed)["disp"]
        pm = F.pad(moving, [0, 15, 0, 14, 0, 12])
        pf = F.pad(fixed, [0, 15, 0, 14, 0, 12])
        full = model.net(pm, pf)["disp"]
    torch.testing.assert_close(disp, full[:, :, :20, :18, :17])
    with pytest.raises(ValueError, match="divisible by 16"):
        MSFF(width=2, pad=False)(moving, fixed)
    with pytest.raises(ValueError, match="one grid"):
        model(moving, torch.rand(1, 1, 16, 16, 16))


def test_training_steps_decrease_the_loss() -> None:
    shape = (16, 16, 16)
    fixed = _smooth(shape, 1, 1.0, 2.0, seed=7).abs()
    shift = torch.zeros(1, 3, *shape)
    shift[:, 0] = 1.5
    moving = warp(fixed, -shift)
    model = MSFF(width=2, width_mults=(1, 2, 2, 2, 2), lr=1e-2, lambda_=0.1, ncc_window=5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = {"moving": moving, "fixed": fixed}
    first = None
    for _ in range(15):
        loss, _ = model.training_loss(batch)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(model.training_loss(batch)[0].detach()) < first - 0.02


# --------------------------------------------------------------------------- shared weights


def test_shared_encoder_and_auxiliary_decoder_share_weights() -> None:
    net = _net()
    assert sum(isinstance(m, SharedEncoder) for m in net.modules()) == 1
    assert sum(isinstance(m, AuxiliaryDecoder) for m in net.modules()) == 1
    shape = (16, 16, 16)
    g = torch.Generator().manual_seed(1)
    moving, fixed = torch.rand(1, 1, *shape, generator=g), torch.rand(1, 1, *shape, generator=g)
    weights = [torch.randn(1, w, *(s // 2**k for s in shape), generator=g) for k, w in enumerate(WIDTHS)]

    def branch_loss(feats: list[torch.Tensor], sign: float) -> torch.Tensor:
        return sum((sign * f * wk).sum() for f, wk in zip(feats, weights))  # type: ignore[return-value]

    params = list(net.encoder.parameters()) + list(net.aux.parameters())

    def grads_of(loss: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.autograd.grad(loss, params))

    # each branch alone, through its own pass
    gm = grads_of(branch_loss(net.aux(net.encoder(moving)), 1.0))
    gf = grads_of(branch_loss(net.aux(net.encoder(fixed)), -0.5))
    # both at once, through the network's batched pass (moving first, then fixed)
    feats = net.aux(net.encoder(torch.cat([moving, fixed], dim=0)))
    both = grads_of(branch_loss([f[:1] for f in feats], 1.0) + branch_loss([f[1:] for f in feats], -0.5))
    for a, b, c in zip(both, gm, gf):
        torch.testing.assert_close(a, b + c, rtol=1e-4, atol=1e-5)
    assert any((b - c).abs().max() > 1e-3 for b, c in zip(gm, gf))  # the branches differ
    # and the features of one image do not depend on the other image
    alone = net.encoder(fixed)
    for k in range(len(WIDTHS)):
        torch.testing.assert_close(feats[k][1:], net.aux(alone)[k])


def test_whole_model_has_one_encoder_parameter_set() -> None:
    model = MSFF(width=2)
    enc = [n for n, _ in model.named_parameters() if ".encoder." in n]
    one = SharedEncoder([2 * m for m in (1, 2, 4, 4, 4)])
    assert len(enc) == len(list(one.parameters()))


# --------------------------------------------------------------------------- speed paths


@pytest.mark.parametrize("shape", [(1, 1, 12, 10, 8), (1, 8, 48, 20, 6), (2, 5, 9, 9, 9)])
def test_fast_conv_path_equals_plain_convolution(shape: tuple[int, ...]) -> None:
    conv = torch.nn.Conv3d(shape[1], 4, 3, padding=1)
    x = torch.randn(*shape, requires_grad=True)
    y = _conv(x, conv)
    ref = F.conv3d(x, conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    gy = torch.randn_like(ref)
    g1 = torch.autograd.grad(y, [x, conv.weight, conv.bias], gy)
    g2 = torch.autograd.grad(ref, [x, conv.weight, conv.bias], gy)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_fused_up_convolution_equals_upsample_concat_conv() -> None:
    block = UpCatConv(3, 2, 4)
    low, skip = torch.randn(1, 3, 4, 5, 3), torch.randn(1, 2, 8, 10, 6)
    torch.testing.assert_close(block(low, skip, fused=True), block(low, skip, fused=False), rtol=1e-4, atol=1e-5)


def test_search_space_declares_lambda_and_width() -> None:
    assert set(MSFF.search_space) == {"lambda_", "width"}
    assert MSFF.search_space["width"]["type"] == "categorical"


# --------------------------------------------------------------------------- perf harness


def test_perf_learned_child_records_steps_and_inference(tmp_path) -> None:
    import json

    from benchmark.perf.systems import _learned_child, format_perf_learned

    out = tmp_path / "rec.json"
    _learned_child("msff", (16, 16, 16), threads=1, repeats=1, device="cpu", out=str(out))
    rec = json.loads(out.read_text())
    assert rec["system"] == "msff" and rec["disp_shape"] == [1, 3, 16, 16, 16]
    for key in ("train", "infer"):
        assert len(rec[key]) == 1 and rec[key][0]["wall_s"] > 0 and rec[key][0]["peak_mem_mb"] > 0
    res = {"size": [16, 16, 16], "threads": 1, "repeats": 1, "device": {"device": "cpu"},
           "results": [{"system": "msff", "status": "measured", "parameters": rec["parameters"], "train_s": 1.0,
                        "train_cpu_s": 1.0, "train_peak_mb": 10.0, "train_base_mb": 5.0, "infer_s": 0.5,
                        "infer_peak_mb": 9.0},
                       {"system": "voxelmorph", "status": "failed", "error": "boom"}]}
    table = format_perf_learned(res)
    assert "msff" in table and "FAILED: boom" in table


def test_perf_systems_refuses_unknown_benchmarks() -> None:
    from types import SimpleNamespace

    from benchmark.perf.systems import main_perf_systems, perf_learned

    with pytest.raises(SystemExit, match="unknown"):
        main_perf_systems(SimpleNamespace(only="msff,nope"))
    with pytest.raises(ValueError, match="unknown learned"):
        perf_learned(systems=("nope",))


# --------------------------------------------------------------------------- ablation switches


def _one_step(model: MSFF, batch: dict) -> float:
    """One Adam step; returns the largest parameter change (0 if nothing trained)."""
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss, _ = model.training_loss(batch)
    assert bool(torch.isfinite(loss))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("switch", [{"aux_decoder": False}, {"fusion": "concat"}, {"aux_decoder": False, "fusion": "concat"}])
def test_ablation_switches_change_the_module_and_train(switch: dict) -> None:
    shape = (16, 16, 16)
    fixed = _smooth(shape, 1, 1.0, 2.0, seed=7).abs()
    moving = _smooth(shape, 1, 1.0, 2.0, seed=8).abs()
    batch = {"moving": moving, "fixed": fixed}
    kw = {"width": 2, "width_mults": (1, 2, 2, 2, 2), "ncc_window": 5}
    torch.manual_seed(0)
    full = MSFF(**kw)
    torch.manual_seed(0)
    abl = MSFF(**kw, **switch)
    n_full = sum(p.numel() for p in full.parameters())
    n_abl = sum(p.numel() for p in abl.parameters())
    assert n_abl < n_full  # the component's parameters are gone
    if switch.get("aux_decoder") is False:
        assert abl.net.aux is None and full.net.aux is not None
        assert all(len(b.part_channels) == len(f.part_channels) - 2 for b, f in zip(abl.net.fusion, full.net.fusion))
    if switch.get("fusion") == "concat":
        assert all(not hasattr(b, "mlp") and not hasattr(b, "spatial") for b in abl.net.fusion)
    for net in (full.net, abl.net):
        _loud_heads(net)
    with torch.no_grad():
        d_full = full(moving, fixed)["disp"]
        d_abl = abl(moving, fixed)["disp"]
    assert d_abl.shape == d_full.shape and float((d_abl - d_full).abs().max()) > 1e-4
    assert _one_step(abl, batch) > 0.0


def test_concat_fusion_is_plain_concatenation_and_conv() -> None:
    parts_ch = [3, 3, 2]
    block = FusionBlock(parts_ch, 5, spatial_kernel=3, attention=False)
    parts = [torch.randn(2, c, 6, 5, 4) for c in parts_ch]
    out, att = block(parts)
    expected = F.leaky_relu(F.conv3d(torch.cat(parts, 1), block.fuse.weight, block.fuse.bias, padding=1), 0.2)
    assert att == {} and torch.allclose(out, expected, atol=1e-5)
    with pytest.raises(ValueError, match="fusion"):
        MSFF(fusion="sum")


def test_regularisation_declared_for_arc() -> None:
    import inspect

    name, lo, hi = MSFF.regularisation
    assert name in inspect.signature(MSFF.__init__).parameters and 0 < lo < hi
