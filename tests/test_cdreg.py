"""cdreg: shapes, invertible high-frequency blocks, and that the double-backward loss teaches
the similarity's pose gradient to point toward the true pose."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmark.se3 import geodesic_grad
from datamodules.spine import SpineDRRDataModule, collate_pose
from systems.cdreg import CDReg, CDRegNet, FFCBranch, InvertibleBranch, Residual3D

pytestmark = pytest.mark.usefixtures("one_thread")


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
    # a stride of 1 in the first stage keeps a 4x4 map on a 32 px detector
    _, f1 = CDRegNet(widths=(4, 8, 8, 16, 16), strides=(1, 2, 2, 2))(torch.rand(2, 1, 32, 32), torch.rand(2, 3, 32, 32))
    assert f1["high_x"].shape == (2, 16, 4, 4)
    with pytest.raises(ValueError):
        CDReg(widths=(4, 8, 8, 16, 16), train_radius=(2.0, 1.0))


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


def _toward_fraction(model: CDReg, batch: dict, thetas: torch.Tensor) -> float:
    x3d = model.residual(batch["volume"]).detach()
    g, _, _ = model.pose_gradient(batch, x3d, thetas)
    r = geodesic_grad(thetas.double(), batch["pose_true"].double(), model.rot_scale_mm).float()
    ok = torch.cat([((g[:, :3] * r[:, :3]).sum(-1) > 0), ((g[:, 3:] * r[:, 3:]).sum(-1) > 0)])
    return float(ok.float().mean())


def test_double_backward_training_turns_pose_gradient_toward_truth() -> None:
    torch.manual_seed(0)
    dm = SpineDRRDataModule(n_train_cts=1, n_test_cts=1, synthetic_size=24, synthetic_spacing=6.0, height=32, width=32,
                            pixel_mm=8.0, n_samples=24, poses_per_ct=1, rot_std_deg=8, trans_std_mm=10, depth_std_mm=20,
                            domain_randomization=False)
    ds = dm.dataset("train")
    train = collate_pose([ds[i] for i in range(12)])
    model = CDReg(widths=(4, 8, 8, 16, 16), n_samples=24, lr=3e-3, train_rot_deg=6, train_trans_mm=8, train_depth_mm=16)
    g = torch.Generator().manual_seed(3)
    thetas = train["pose_true"] + torch.randn(train["pose_true"].shape, generator=g) * model.train_std
    before = _toward_fraction(model, train, thetas)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    grads_changed = False
    torch.manual_seed(0)
    for step in range(30):
        idx = torch.randperm(12)[:6]
        sub = {k: (v[idx] if isinstance(v, torch.Tensor) else ([v[i] for i in idx] if isinstance(v, list) else v)) for k, v in train.items()}
        loss, parts = model.training_loss(sub, theta=thetas[idx])
        opt.zero_grad()
        loss.backward()
        # head_high only enters L_appro through the pose gradient g: a non-zero gradient here
        # means the second backward (through ∂S/∂θ) reaches the network
        w = model.net.head_high.mlp[0].weight.grad
        grads_changed |= bool(w is not None and w.abs().sum() > 0)
        opt.step()
    after = _toward_fraction(model, train, thetas)
    assert grads_changed
    print("toward-truth fraction before/after:", before, after)
    assert after > before, (before, after)
    assert after >= 0.7, (before, after)
