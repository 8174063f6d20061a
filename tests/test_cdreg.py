"""cdreg: shapes, invertible high-frequency blocks, the feature-map size at every shipped
detector, the ablation switches (decomposition loss, loss weighting, head), the toward-truth
diagnostic against the analytic geodesic, and that training improves the learned pose
gradient on CTs the network has never seen."""

from __future__ import annotations

import glob
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from benchmark.core.se3 import geodesic_grad
from datamodules.spine import SpineDRRDataModule, collate_pose
from systems.cdreg import (CDReg, CDRegNet, FFCBranch, InvertibleBranch, Residual3D, direction_loss, feature_size, fit_axis_scale,
                           toward_truth_cosines)

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = Path(__file__).resolve().parents[1] / "benchmark" / "configs"
TINY = dict(n_train_cts=3, n_val_cts=1, n_test_cts=1, synthetic_size=24, synthetic_spacing=6.0, height=32, width=32,
            pixel_mm=8.0, n_samples=16, poses_per_ct=2, rot_std_deg=8, trans_std_mm=10, depth_std_mm=20,
            domain_randomization=False, val_cases=2)


def test_modules_shapes() -> None:
    net = CDRegNet(widths=(4, 8, 8, 16, 16))
    s, f = net(torch.rand(2, 1, 32, 32), torch.rand(2, 3, 32, 32))
    assert s.shape == (2,)
    assert f["low_x"].shape == f["high_d"].shape == (2, 16, 2, 2)
    x = torch.rand(1, 1, 6, 7, 8) * 0.02
    r = Residual3D()(x)
    assert r.shape == (1, 3, 6, 7, 8)
    # starts close to the plain repeated volume (small last layer), but is not identical
    assert float((r - x.repeat(1, 3, 1, 1, 1)).detach().abs().max()) < 1e-3
    assert FFCBranch(8)(torch.rand(2, 8, 5, 6)).shape == (2, 8, 5, 6)
    for strides, hw in (((1, 2, 2, 2), (32, 32)), ((2, 2, 1, 1), (32, 32)), ((2, 2, 2, 2), (40, 24))):
        _, f1 = CDRegNet(widths=(4, 8, 8, 16, 16), strides=strides, head="flat")(torch.rand(2, 1, *hw), torch.rand(2, 3, *hw))
        assert tuple(f1["high_x"].shape[-2:]) == feature_size(*hw, strides)
    assert feature_size(32, 32, (2, 2, 2, 2)) == (2, 2) and feature_size(256, 256, (2, 2, 2, 2)) == (16, 16)
    with pytest.raises(ValueError):
        CDReg(widths=(4, 8, 8, 16, 16), train_radius=(2.0, 1.0))
    with pytest.raises(ValueError, match="head"):
        CDReg(widths=(4, 8, 8, 16, 16), head="mean")
    with pytest.raises(ValueError, match="loss_weighting"):
        CDReg(widths=(4, 8, 8, 16, 16), loss_weighting="auto")


def test_metric_head_is_zero_at_identical_images() -> None:
    torch.manual_seed(0)
    net = CDRegNet(widths=(4, 8, 8, 16, 16), strides=(1, 1, 2, 2), head="metric")
    x = torch.rand(2, 1, 32, 32)
    s_same, _ = net(x, x.repeat(1, 3, 1, 1))
    s_other, _ = net(x, torch.rand(2, 3, 32, 32))
    assert float(s_same.abs().max()) < 1e-8 and bool((s_other > 1e-4).all())


def test_invertible_branch_is_invertible() -> None:
    torch.manual_seed(1)
    br = InvertibleBranch(8, 3)
    x = torch.randn(2, 8, 5, 5)
    y = br(x)
    # invert the couplings by hand: z1 = (y1 - eta(z2)) * exp(-rho(z2)); z2 = y2 - phi(z1)
    z = y
    for blk in reversed(list(br.blocks)):
        z1, z2 = z[:, : blk.c1], z[:, blk.c1 :]
        z1 = (z1 - blk.eta(z2)) * torch.exp(-torch.tanh(blk.rho(z2)))
        z2 = z2 - blk.phi(z1)
        z = torch.cat([z1, z2], 1)
    np.testing.assert_allclose(z.detach().numpy(), x.numpy(), atol=1e-5)


def _cdreg_blocks() -> list[tuple[str, dict, dict]]:
    """``(config name, dataset init_args, cdreg init_args)`` for every CDReg in a shipped config."""
    out = []
    for path in sorted(glob.glob(str(CONFIGS / "*.yaml"))):
        cfg = yaml.safe_load(Path(path).read_text())
        for mname, m in (cfg.get("methods") or {}).items():
            if isinstance(m, dict) and m.get("class_path") == "systems.cdreg.CDReg":
                for dname, d in (cfg.get("datasets") or {}).items():
                    out.append((f"{Path(path).name}:{dname}:{mname}", d.get("init_args") or {}, m.get("init_args") or {}))
    return out


def test_feature_maps_at_least_4x4_at_every_shipped_detector() -> None:
    blocks = _cdreg_blocks()
    assert any("spine_quickstart" in b[0] for b in blocks) and any("spine_full" in b[0] for b in blocks)
    dm_defaults = {k: p.default for k, p in inspect.signature(SpineDRRDataModule).parameters.items()}
    cd_defaults = {k: p.default for k, p in inspect.signature(CDReg).parameters.items()}
    for name, data, method in blocks:
        h, w = data.get("height", dm_defaults["height"]), data.get("width", dm_defaults["width"])
        strides = method.get("strides", cd_defaults["strides"])
        widths = method.get("widths", cd_defaults["widths"])
        fs = feature_size(h, w, strides)
        assert min(fs) >= 4, f"{name}: {fs} feature map on a {h}x{w} detector"
        # the analytic size is what the encoder really gives (a forward pass on a small case)
        if h * w <= 64 * 64:
            _, f = CDRegNet(widths=widths, strides=strides)(torch.rand(1, 1, h, w), torch.rand(1, 3, h, w))
            assert tuple(f["low_d"].shape[-2:]) == fs, name
    # a 2x2 map is refused with a message naming the strides and the detector
    with pytest.raises(ValueError, match=r"2x2 feature map on the 32x32 detector"):
        CDReg(widths=(4, 8, 8, 16, 16), strides=(2, 2, 2, 2)).check_detector(32, 32)


def test_train_val_test_cts_are_disjoint() -> None:
    dm = SpineDRRDataModule(**{**TINY, "n_train_cts": 6, "n_val_cts": 2, "n_test_cts": 2})
    tr, va, te = dm.ct_ids("train"), dm.ct_ids("val"), dm.ct_ids("test")
    assert (len(tr), len(va), len(te)) == (6, 2, 2)
    assert not (set(tr) & set(va)) and not (set(tr) & set(te)) and not (set(va) & set(te))
    # distinct volumes too, not only distinct names (varied anatomy: no two CTs alike)
    cts = dm._load()
    vols = {ct.ct_id: ct.mu for s in ("train", "val", "test") for ct in cts[s]}
    ids = list(vols)
    for i in range(len(ids)):
        for j in range(i + 1, len(ids)):
            a, b = vols[ids[i]], vols[ids[j]]
            assert a.shape != b.shape or not torch.allclose(a, b), (ids[i], ids[j])
    # validation cases are drawn on the validation CTs, test cases on the test CTs, training on training CTs
    assert {dm.dataset("val")[i]["moving_id"] for i in range(len(dm.dataset("val")))} <= set(va)
    assert {dm.dataset("test")[i]["moving_id"] for i in range(len(dm.dataset("test")))} <= set(te)
    torch.manual_seed(0)
    assert {dm.dataset("train")[i]["moving_id"] for i in range(12)} <= set(tr)


def test_toward_truth_cosines_against_the_geodesic() -> None:
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(5, 6, generator=g) * torch.tensor([0.2] * 3 + [10.0] * 3)
    true = torch.randn(5, 6, generator=g) * torch.tensor([0.2] * 3 + [10.0] * 3)
    r = geodesic_grad(theta.double(), true.double()).float()
    np.testing.assert_allclose(toward_truth_cosines(r, theta, true).numpy(), 1.0, atol=1e-5)
    np.testing.assert_allclose(toward_truth_cosines(-3.0 * r, theta, true).numpy(), -1.0, atol=1e-5)
    # translation part: descent direction theta - true (analytic)
    c = toward_truth_cosines(torch.cat([r[:, :3], torch.tensor([[1.0, 0.0, 0.0]]).repeat(5, 1)], 1), theta, true)
    d = theta[:, 3:] - true[:, 3:]
    np.testing.assert_allclose(c[:, 1].numpy(), (d[:, 0] / d.norm(dim=1)).numpy(), atol=1e-5)


def _one_step(model: CDReg, batch: dict, theta: torch.Tensor) -> tuple[float, float]:
    """One Adam step; ``(loss, largest parameter change)``."""
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss, _ = model.training_loss(batch, theta=theta)
    opt.zero_grad()
    loss.backward()
    # head_high enters L_appro only through the pose gradient g: a gradient here means the
    # second backward (through dS/dtheta) reaches the network
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.net.head_high.parameters())
    opt.step()
    change = max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before))
    return float(loss), change


@pytest.fixture(scope="module")
def tiny_batch() -> tuple[dict, torch.Tensor]:
    dm = SpineDRRDataModule(**TINY)
    torch.manual_seed(0)
    batch = collate_pose([dm.dataset("train")[i] for i in range(2)])
    g = torch.Generator().manual_seed(3)
    theta = batch["pose_true"] + torch.randn(batch["pose_true"].shape, generator=g) * torch.tensor([0.1] * 3 + [10.0] * 3)
    return batch, theta


def _model(**kw) -> CDReg:
    torch.manual_seed(0)
    return CDReg(widths=(4, 8, 8, 16, 16), n_samples=16, strides=(2, 2, 1, 1), **kw)


@pytest.mark.parametrize("switch, off, on", [
    ("decomp_loss", False, True),
    ("loss_weighting", "fixed", "learned"),
    ("head", "local", "flat"),
])
def test_ablation_switch_changes_the_module_and_trains_one_step(tiny_batch, switch, off, on) -> None:
    batch, theta = tiny_batch
    a, b = _model(**{switch: off}), _model(**{switch: on})
    n_a, n_b = (sum(p.numel() for p in m.parameters()) for m in (a, b))
    torch.manual_seed(1)
    la, _ = a.training_loss(batch, theta=theta)
    torch.manual_seed(1)
    lb, _ = b.training_loss(batch, theta=theta)
    # the switch changes the module: its parameter count or its output (the loss) differs
    assert n_a != n_b or abs(float(la.detach()) - float(lb.detach())) > 1e-6, (switch, n_a, n_b)
    if switch == "loss_weighting":
        assert n_b - n_a == 2  # the two log-variances
    for m in (a, b):
        loss, change = _one_step(m, batch, theta)
        assert np.isfinite(loss) and change > 0


def test_learned_weights_are_bounded_and_decomposition_off_drops_its_term(tiny_batch) -> None:
    batch, theta = tiny_batch
    m = _model(loss_weighting="learned", log_var_bound=1.0)
    with torch.no_grad():
        m.log_var_raw.fill_(50.0)
    s1, s2 = m.loss_weights()
    assert abs(float(s1) - 1.0) < 1e-6 and abs(float(s2) - 1.0) < 1e-6
    # fixed weighting: loss = L_appro + w * L_decomp exactly; without the decomposition loss, L_appro
    f = _model(loss_weighting="fixed", decomp_weight=0.25)
    loss, parts = f.training_loss(batch, theta=theta)
    np.testing.assert_allclose(float(loss), float(parts["appro"] + 0.25 * parts["decomp"]), rtol=1e-5)
    n = _model(decomp_loss=False)
    loss, parts = n.training_loss(batch, theta=theta)
    np.testing.assert_allclose(float(loss), float(parts["appro"]), rtol=1e-6)


def test_case_records_carry_grad_toward_truth(tiny_batch) -> None:
    batch, _ = tiny_batch
    m = _model(iterations=1).eval()
    recs = m.case_records(batch, batch["pose_init"], 0.1, 1.0)
    cos = m.grad_toward_truth(batch)
    for b, rec in enumerate(recs):
        assert -1.0 <= rec["grad_toward_truth_rot"] <= 1.0 and -1.0 <= rec["grad_toward_truth_trans"] <= 1.0
        np.testing.assert_allclose([rec["grad_toward_truth_rot"], rec["grad_toward_truth_trans"]], cos[b].numpy(), atol=1e-6)


@pytest.mark.slow
def test_training_improves_the_pose_gradient_on_held_out_cts() -> None:
    """Generalisation, not memorisation: train on 8 synthetic CTs, measure on 2 CTs never seen
    in training (24 seeded poses): the share of cases whose learned descent direction points
    toward the true pose (rotation and translation parts, cosine with the geodesic > 0) rises
    above the untrained network's."""
    dm = SpineDRRDataModule(n_train_cts=8, n_val_cts=0, n_test_cts=2, synthetic_size=24, synthetic_spacing=6.0, height=32,
                            width=32, pixel_mm=8.0, n_samples=16, poses_per_ct=12, rot_std_deg=8, trans_std_mm=12,
                            depth_std_mm=24, domain_randomization=False, seed=0)
    assert not set(dm.ct_ids("train")) & set(dm.ct_ids("test"))
    held_out = collate_pose([dm.dataset("test")[i] for i in range(24)])
    assert set(held_out["moving_id"]) == set(dm.ct_ids("test"))
    torch.manual_seed(0)
    model = CDReg(widths=(4, 8, 8, 16, 16), n_samples=16, strides=(1, 1, 2, 2), train_rot_deg=8, train_trans_mm=12, train_depth_mm=24)

    def accuracy() -> float:
        return float((model.grad_toward_truth(held_out) > 0).float().mean())

    before = accuracy()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    train = dm.dataset("train")
    for _ in range(20):
        batch = collate_pose([train[i] for i in range(4)])
        assert not set(batch["moving_id"]) & set(dm.ct_ids("test"))
        loss, _ = model.training_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = accuracy()
    print(f"held-out toward-truth share (rotation and translation parts): untrained {before:.3f}, trained {after:.3f}")
    assert after > before, (before, after)


def test_validation_logs_direction_accuracy_on_validation_cts(tiny_batch) -> None:
    dm = SpineDRRDataModule(**TINY)
    val = dm.dataset("val")
    batch = collate_pose([val[i] for i in range(len(val))])
    assert set(batch["moving_id"]) <= set(dm.ct_ids("val"))
    m = _model().eval()
    logged: dict[str, float] = {}
    m.log = lambda name, value, **kw: logged.__setitem__(name, float(value))  # type: ignore[method-assign]
    m.validation_step(batch, 0)
    cos = m.grad_toward_truth(batch)
    assert logged["val/toward_rot"] == pytest.approx(float((cos[:, 0] > 0).float().mean()))
    assert logged["val/toward_trans"] == pytest.approx(float((cos[:, 1] > 0).float().mean()))
    assert logged["val/cos_trans"] == pytest.approx(float(cos[:, 1].mean()), abs=1e-6)


def _confounded_gradients(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Geodesic gradients ``r (n, 6)`` and pose gradients ``g`` that follow ``r`` on every axis but the
    second (ry), which follows an unrelated offset instead and is large (a rotation whose image
    moves like a translation): the situation the per-axis calibration is for."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(n, 6, generator=gen)
    g = r + 0.3 * torch.randn(n, 6, generator=gen)
    g[:, 1] = 3.0 * torch.randn(n, generator=gen)
    return g, r


def test_fit_axis_scale_weighs_an_uninformative_axis_down_on_held_out_pairs() -> None:
    """The per-axis scale fitted on one set of (pose gradient, geodesic gradient) pairs raises the
    share of *other* pairs whose rotation descent direction points toward the truth."""
    g_fit, r_fit = _confounded_gradients(256, 0)
    g_new, r_new = _confounded_gradients(512, 1)
    s = fit_axis_scale(g_fit, r_fit)
    assert s.shape == (6,)
    scale = torch.exp(s)
    assert float(scale[1]) < 0.5 * min(float(scale[0]), float(scale[2]))

    def share(g: torch.Tensor) -> float:  # cosine of the rotation parts > 0
        return float((torch.nn.functional.cosine_similarity(g[:, :3], r_new[:, :3], dim=1) > 0).float().mean())

    before, after = share(g_new), share(g_new * scale)
    assert after > before + 0.1, (before, after)
    assert float(direction_loss(g_new * scale, r_new).mean()) < float(direction_loss(g_new, r_new).mean())
    # translation part untouched in expectation: its three axes keep comparable scales
    assert float(scale[3:].max() / scale[3:].min()) < 2.0


def test_calibration_scales_the_descent_direction_and_records_both(tiny_batch) -> None:
    batch, _ = tiny_batch
    m = _model(calibrate_axes=8, iterations=1)
    assert torch.equal(m.log_axis_scale, torch.zeros(6))  # no scaling before calibration
    torch.manual_seed(2)
    scale = m.calibrate([batch, batch])
    assert scale.shape == (6,) and torch.allclose(torch.exp(m.log_axis_scale), scale)
    assert not torch.allclose(scale, torch.ones(6))
    # the descent direction registration follows is the calibrated one
    x3d = m.residual(batch["volume"]).detach()
    g_raw, _, _ = m.pose_gradient(batch, x3d, batch["pose_init"].float(), scaled=False)
    g, _, _ = m.pose_gradient(batch, x3d, batch["pose_init"].float())
    np.testing.assert_allclose(g.detach().numpy(), (g_raw * scale).detach().numpy(), rtol=1e-5, atol=1e-9)
    m.eval()
    recs = m.case_records(batch, batch["pose_init"], 0.1, 1.0)
    cos, raw = m.grad_toward_truth(batch), m.grad_toward_truth(batch, scaled=False)
    for b, rec in enumerate(recs):
        np.testing.assert_allclose([rec["grad_toward_truth_rot"], rec["grad_toward_truth_rot_raw"]], [cos[b, 0], raw[b, 0]], atol=1e-6)
        np.testing.assert_allclose([rec["grad_toward_truth_trans"], rec["grad_toward_truth_trans_raw"]], [cos[b, 1], raw[b, 1]], atol=1e-6)
    # the scale is part of the saved state (a fitted quantity, restored with the weights)
    assert "log_axis_scale" in m.state_dict()
    assert "log_axis_scale" not in _model().state_dict()


def test_rotation_centre_chart_chain_rule_and_registration(tiny_batch) -> None:
    """With ``rotation_centre="centroid"`` the gradient is taken in the chart about the CT's
    attenuation centroid: its translation part equals the isocentre chart's (∂S/∂t' = ∂S/∂t),
    its rotation part is the chain rule ``g_ω + ∂t/∂ω ᵀ g_t`` of the isocentre gradient
    (checked against a finite-difference Jacobian of ``uncentre``), and registration returns
    poses in the suite's convention (one step from the start moves the pose by the chart step)."""
    from benchmark.core.drr import attenuation_centroid
    from benchmark.core.se3 import recentre, uncentre
    from systems.pose_base import PoseSystem

    with pytest.raises(ValueError, match="rotation_centre"):
        PoseSystem(rotation_centre="middle")
    batch, _ = tiny_batch
    iso, cen = _model(), _model(rotation_centre="centroid")
    cen.load_state_dict(iso.state_dict())
    c = cen.chart_centre(batch)
    torch.testing.assert_close(c.double(), attenuation_centroid(batch["volume"], batch["affine"], batch["base"]))
    assert float(c.norm(dim=1).min()) > 1.0  # the synthetic body's mass is not at the spine's isocentre
    x3d = iso.residual(batch["volume"]).detach()
    th = batch["pose_init"].double()
    g_iso, s_iso, _ = iso.pose_gradient(batch, x3d, th.float())
    g_cen, s_cen, _ = cen.pose_gradient(batch, x3d, recentre(th, c.double()).float())
    torch.testing.assert_close(s_cen, s_iso, rtol=1e-4, atol=1e-6)  # the same pose, the same similarity
    torch.testing.assert_close(g_cen[:, 3:], g_iso[:, 3:], rtol=1e-3, atol=1e-6)
    eps = 1e-6
    chart = recentre(th, c.double())
    for b in range(th.shape[0]):
        jac = torch.zeros(3, 3, dtype=torch.float64)  # ∂t/∂ω' of uncentre at fixed t'
        for k in range(3):
            d = torch.zeros(6, dtype=torch.float64)
            d[k] = eps
            jac[:, k] = (uncentre(chart[b] + d, c[b].double())[3:] - uncentre(chart[b] - d, c[b].double())[3:]) / (2 * eps)
        expect = g_iso[b, :3].double() + jac.T @ g_iso[b, 3:].double()
        torch.testing.assert_close(g_cen[b, :3].double(), expect, rtol=2e-3, atol=1e-6)
    cen.iterations = 1
    cen.eval()
    out = cen._register_grad_ok(batch)
    step = recentre(out.double(), c.double()) - chart
    np.testing.assert_allclose(step[:, :3].norm(dim=1).numpy(), cen.step_rot, rtol=1e-4)
    np.testing.assert_allclose(step[:, 3:].norm(dim=1).numpy(), cen.step_trans, rtol=1e-4)
    assert torch.isfinite(cen.grad_toward_truth(batch)).all()


def test_drr_method_reaches_every_pose_renderer(tiny_batch, monkeypatch) -> None:
    """``drr_method="slices"``: cdreg trains through the slice renderer (its second backward
    included), the baselines render with it, and its DRRs agree with the trilinear ones."""
    import systems.cdreg as cdreg_module
    from benchmark.core.drr import render_pose
    from systems.pose_baseline import CMAESPose, GradientPose

    batch, theta = tiny_batch
    methods: list[str] = []

    def recording_render_pose(*args, method: str = "trilinear", **kw):
        methods.append(method)
        return render_pose(*args, method=method, **kw)

    monkeypatch.setattr(cdreg_module, "render_pose", recording_render_pose)
    model = _model(drr_method="slices")
    loss, change = _one_step(model, batch, theta)
    assert np.isfinite(loss) and change > 0
    assert methods and set(methods) == {"slices"}  # every DRR cdreg compared was the slice method's
    for cls in (CMAESPose, GradientPose):
        sys_ = cls(n_samples=48, drr_method="slices")
        img = sys_.drr(batch, batch["pose_true"].float())
        want = render_pose(batch["volume"], batch["affine"][0] if batch["volume"].shape[0] == 1 else batch["affine"],
                           batch["pose_true"].float(), batch["base"], batch["geometry"], method="slices")
        assert torch.equal(img, want)
        tri = cls(n_samples=48).drr(batch, batch["pose_true"].float())
        assert torch.nn.functional.cosine_similarity(img.flatten(1).double(), tri.flatten(1).double()).min() > 0.99
    with pytest.raises(ValueError, match="drr_method"):
        GradientPose(drr_method="siddon")
