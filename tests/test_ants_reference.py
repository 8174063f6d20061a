"""ANTsPyReference: the real ANTs inside the suite (skipped without the `peers` extra)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmark.core.spatial import warp

ants = pytest.importorskip("ants", reason="antspyx not installed (pip install 'regbench[peers]')")


def test_ants_transforms_convert_to_our_pull_displacement():
    from datamodules import SyntheticBrainDataModule
    from systems.ants_reference import ants_forward_to_disp

    dm = SyntheticBrainDataModule(size=24, n_train=2, n_val=2, n_test=2, spacing=(1.0, 1.5, 1.2))
    dm.setup("test")
    b = next(iter(dm.test_dataloader()))
    sp = (1.0, 1.5, 1.2)
    f = ants.from_numpy(b["fixed"][0, 0].numpy(), spacing=sp)
    m = ants.from_numpy(b["moving"][0, 0].numpy(), spacing=sp)
    reg = ants.registration(fixed=f, moving=m, type_of_transform="SyNOnly", reg_iterations=(20, 10, 0))
    u = ants_forward_to_disp(f, reg["fwdtransforms"])
    assert np.abs(u).max() > 0.1  # ANTs moved something
    # Our warp with the converted field reproduces the image ANTs warped itself
    # (axis order, mm -> voxels and pull direction all have to be right for this).
    ours = warp(b["moving"], torch.from_numpy(u)[None])[0, 0].numpy()
    theirs = reg["warpedmovout"].numpy()
    np.testing.assert_allclose(ours[1:-1, 1:-1, 1:-1], theirs[1:-1, 1:-1, 1:-1], atol=1e-4)
