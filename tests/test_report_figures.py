"""Report figures: what the qualitative panel stores and shares, which methods the
runtime plot shows, and the per-case box plots of every metric present."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from leaderboard import plots
from systems.base import NoRegistration


def _batch(shape=(9, 8, 7), seed=0):
    rng = np.random.default_rng(seed)
    moving = rng.uniform(0.5, 1.0, shape).astype(np.float32)  # no zeros: a zero-padded sample would show
    seg = rng.integers(1, 4, shape).astype(np.int64)
    t = lambda a: torch.from_numpy(a)[None, None]  # noqa: E731
    return {"fixed": t(moving[::-1].copy()), "moving": t(moving), "fixed_seg": t(seg[::-1].copy()), "moving_seg": t(seg),
            "case_id": ["c0"]}, moving, seg


def test_panel_warped_image_pads_with_border_values_and_keeps_label_slices():
    batch, moving, seg = _batch()
    N = moving.shape[0]
    disp = torch.zeros(1, 3, *moving.shape)
    disp[:, 0] = 2.0  # pull from 2 voxels further along axis 0: the last 2 rows sample outside
    arrays = NoRegistration().panel_arrays(batch, disp, 0)
    z = moving.shape[2] // 2
    # independent truth: out(i) = moving(min(i + 2, N - 1)) (border replicate)
    idx = np.minimum(np.arange(N) + 2, N - 1)
    np.testing.assert_allclose(arrays["warped_ax2"], moving[idx, :, z], atol=1e-5)
    assert arrays["warped_ax2"].min() > 0.4  # no black band at the far edge
    # labels: nearest, background outside (as the metrics warp them); the fixed slice as is
    want = np.where((np.arange(N) + 2 <= N - 1)[:, None], seg[np.minimum(np.arange(N) + 2, N - 1), :, z], 0)
    np.testing.assert_array_equal(arrays["warped_seg_ax2"], want)
    np.testing.assert_array_equal(arrays["fixed_seg_ax2"], batch["fixed_seg"][0, 0, :, :, z].numpy())


def _panel(jac_lo, jac_hi, shift, seed):
    rng = np.random.default_rng(seed)
    fixed = rng.uniform(0, 1, (12, 10)).astype(np.float32)
    return {"fixed_ax2": fixed, "warped_ax2": fixed + shift, "disp_ax2": np.zeros((2, 12, 10), np.float32),
            "jacdet_ax2": np.linspace(jac_lo, jac_hi, 120, dtype=np.float32).reshape(12, 10), "case_id": "c"}


def test_panel_columns_share_one_scale_over_all_methods():
    a, b = _panel(0.5, 1.5, 0.1, 0), _panel(-0.2, 4.0, -0.3, 1)
    rows = [("a", a, 2), ("b", b, 2)]
    sc = plots.panel_scales(rows)
    both_fixed = np.concatenate([a["fixed_ax2"].ravel(), b["fixed_ax2"].ravel()])
    assert sc["intensity"] == pytest.approx((both_fixed.min(), both_fixed.max()))
    assert sc["diff"] == pytest.approx(0.3, rel=1e-4)  # the larger |fixed - warped| of the two rows
    allj = np.concatenate([a["jacdet_ax2"].ravel(), b["jacdet_ax2"].ravel()])
    assert sc["jacdet_max"] == pytest.approx(np.percentile(allj, 99.5), rel=1e-5) and sc["jacdet_max"] > 3.5
    png = plots.deformable_panel({"a": a, "b": b}, view=2)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def _ds(rows, methods):
    return SimpleNamespace(name="d", rows=rows, methods=[SimpleNamespace(method=m) for m in methods], per_label={})


def test_runtime_plot_leaves_out_initial():
    rows = [{"method": "initial", "runtime_s": 1e-4}] * 3
    assert plots.runtime_plot(_ds(rows, ["initial"])) is None  # nothing but the untimed row
    rows += [{"method": "vxm", "runtime_s": 0.5}, {"method": "vxm", "runtime_s": 0.7}]
    assert plots.runtime_plot(_ds(rows, ["initial", "vxm"]))[:4] == b"\x89PNG"


@pytest.mark.parametrize("key", [k for k, _, _ in plots.BOX_METRICS])
def test_a_box_plot_for_every_per_case_metric_present(key):
    rows = [{"method": m, key: v} for m in ("initial", "a") for v in (1.0, 2.0, 3.0)]
    assert plots.metric_boxplot(_ds(rows, ["initial", "a"]), key)[:4] == b"\x89PNG"
    nan_rows = [{"method": "a", key: math.nan}]
    assert plots.metric_boxplot(_ds(nan_rows, ["a"]), key) is None
