"""The built-in anatomy data and the truth it carries: endpoint error, landmarks, labels, errors.

Independent truth: world points through ``nibabel.affines.apply_affine`` (EPE), the exact
landmark correspondence of the generator (true field sampled at the landmarks), MNI world
coordinates (hemisphere labels), and a constructed table for the bootstrap interval.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from nibabel.affines import apply_affine

from benchmark.core import metrics
from benchmark.core.spatial import identity_grid
from leaderboard import stats


def _epe_reference(u: np.ndarray, t: np.ndarray, affine: np.ndarray, mask: np.ndarray | None) -> tuple[float, float]:
    """World distance between the two end points of every voxel, via apply_affine."""
    grid = np.indices(u.shape[1:]).reshape(3, -1).T.astype(np.float64)
    pu = apply_affine(affine, grid + u.reshape(3, -1).T)
    pt = apply_affine(affine, grid + t.reshape(3, -1).T)
    err = np.linalg.norm(pu - pt, axis=1)
    if mask is not None:
        err = err[mask.reshape(-1)]
    return float(err.mean()), float(np.quantile(err, 0.9))


# Anisotropic grid whose array axes are permuted relative to world axes (catches axis order
# and voxel-vs-mm mistakes: a wrong convention changes the distance).
_AFFINE = np.array([[0.0, 0.0, 2.5, -10.0], [1.2, 0.0, 0.0, 4.0], [0.0, 0.8, 0.0, 7.0], [0, 0, 0, 1.0]])


def test_epe_known_translation_anisotropic():
    shape = (9, 11, 7)
    t = np.zeros((3, *shape))
    t[0], t[1], t[2] = 1.0, -2.0, 0.5  # voxels along array axes 0, 1, 2
    u = np.zeros_like(t)
    mean, p90 = metrics.endpoint_error(torch.from_numpy(u), torch.from_numpy(t), _AFFINE)
    # |A (0 - t)| with A's columns: axis0 -> 1.2 mm along y, axis1 -> 0.8 mm along z, axis2 -> 2.5 mm along x
    expected = math.sqrt((1.0 * 1.2) ** 2 + (2.0 * 0.8) ** 2 + (0.5 * 2.5) ** 2)
    assert mean == pytest.approx(expected, abs=1e-9)
    assert p90 == pytest.approx(expected, abs=1e-9)
    # in voxels (no affine) the answer differs: the spacing matters
    assert metrics.endpoint_error(u, t)[0] == pytest.approx(math.sqrt(1 + 4 + 0.25))


def test_epe_smooth_map_against_apply_affine_with_mask():
    shape = (12, 10, 8)
    x = identity_grid(shape, dtype=torch.float64).numpy()
    t = np.stack([np.sin(x[1] / 3.0), 0.5 * np.cos(x[0] / 4.0) * x[2] / 8.0, 0.3 * x[0] / 12.0])
    u = t + np.stack([0.2 * np.cos(x[2] / 2.0), 0.1 * x[1] / 10.0, -0.4 * np.sin(x[0] / 5.0)])
    mask = (x[0] > 3) & (x[2] < 6)
    got = metrics.endpoint_error(u, t, _AFFINE, mask)
    want = _epe_reference(u, t, _AFFINE, mask)
    assert got[0] == pytest.approx(want[0], rel=1e-9)
    assert got[1] == pytest.approx(want[1], rel=1e-6)
    # the mask matters
    assert metrics.endpoint_error(u, t, _AFFINE)[0] != pytest.approx(want[0], rel=1e-3)


def test_deformable_metrics_epe_over_fixed_foreground():
    shape = (10, 10, 10)
    t = np.zeros((3, *shape))
    t[0, :5] = 2.0  # error of 2 voxels in the first half only
    seg = np.zeros(shape, dtype=np.int64)
    seg[5:] = 1  # foreground is the second half: EPE over it is 0
    res = metrics.deformable_metrics(np.zeros((3, *shape)), seg, seg, [1], spacing=(1.5, 1.5, 1.5), true_disp=t,
                                     compute_hd95=False, compute_ndv=False)
    assert res["epe_mm"] == pytest.approx(0.0)
    res = metrics.deformable_metrics(np.zeros((3, *shape)), 1 - seg, 1 - seg, [1], spacing=(1.5, 1.5, 1.5),
                                     true_disp=t, compute_hd95=False, compute_ndv=False)
    assert res["epe_mm"] == pytest.approx(3.0)
    res = metrics.deformable_metrics(np.zeros((3, *shape)), seg, seg, [1], compute_hd95=False, compute_ndv=False)
    assert res["epe_mm"] is None


def test_bootstrap_ci_constructed_example():
    # one seed: the mean of 0..9 with a percentile interval that covers it and matches a
    # direct resampling loop with the same generator
    v = np.arange(10, dtype=float)
    mean, lo, hi = stats.bootstrap_mean_ci(v, n_boot=2000, seed=3)
    assert mean == pytest.approx(4.5)
    rng = np.random.default_rng(3)
    ci = rng.integers(0, 10, size=(2000, 10))
    rng.integers(0, 1, size=(2000, 1))
    ref = np.quantile(v[ci].mean(1), [0.025, 0.975])
    assert (lo, hi) == pytest.approx(tuple(ref))
    # the interval is about 2 standard errors each side (sd 2.87 / sqrt(10))
    assert 1.2 < mean - lo < 2.4 and 1.2 < hi - mean < 2.4
    # seeds as a level: the same cases with a seed offset widen the interval
    table1 = np.stack([v, v, v])
    table2 = np.stack([v - 3, v, v + 3])
    w1 = np.diff(stats.bootstrap_mean_ci(table1, seed=0)[1:])[0]
    w2 = np.diff(stats.bootstrap_mean_ci(table2, seed=0)[1:])[0]
    assert w2 > 1.3 * w1
    # constant data: a zero-width interval; NaN cells are ignored
    assert stats.bootstrap_mean_ci([[2.0, 2.0, np.nan]]) == (2.0, 2.0, 2.0)
    assert all(math.isnan(x) for x in stats.bootstrap_mean_ci([np.nan, np.nan]))


def test_paired_difference_ci_sign_and_coverage():
    rng = np.random.default_rng(0)
    base = rng.normal(0.7, 0.05, size=40)
    a = base + 0.02 + rng.normal(0, 0.005, size=40)
    d, lo, hi = stats.paired_difference_ci(a, base)
    assert lo < 0.02 < hi and d == pytest.approx(np.mean(a - base))
    assert lo > 0  # a clear, consistent gain: the interval excludes zero


# ------------------------------------------------------------------------ anatomy data
@pytest.fixture(scope="module")
def anatomy_dm():
    pytest.importorskip("nilearn")
    from datamodules import AnatomyBrainDataModule

    dm = AnatomyBrainDataModule(spacing=4.0, n_train=2, n_val=2, n_test=3, test_pairs=2, seed=1)
    dm.setup("test")
    return dm


def test_anatomy_labels_follow_world_geometry(anatomy_dm):
    from datamodules.anatomy import MNI_LABELS, mni_template

    tpl = mni_template(4.0)
    assert tpl.shape == anatomy_dm.generator.shape and all(n % 8 == 0 for n in tpl.shape)
    counts = np.bincount(tpl.seg.ravel(), minlength=len(MNI_LABELS) + 1)
    assert (counts[1:] > 20).all(), counts  # every structure survives the 4 mm grid
    cent = metrics.label_centroids(tpl.seg, list(MNI_LABELS))
    world = apply_affine(tpl.affine, cent)
    # RAS: x < 0 is left; the symmetric template gives mirrored left/right volumes
    for left, right in ((1, 2), (3, 4), (5, 6), (7, 8)):
        assert world[left - 1, 0] < -5 and world[right - 1, 0] > 5
        assert abs(counts[left] - counts[right]) <= 0.05 * counts[left]
    assert world[9, 2] < world[2, 2] - 20  # the posterior fossa lies below the white matter


def test_anatomy_truth_maps_landmarks_and_labels(anatomy_dm):
    from benchmark.core.spatial import warp

    for i in range(len(anatomy_dm.test_dataset)):
        s = anatomy_dm.test_dataset[i]
        u = s["true_disp"]
        assert u.shape == (3, *s["fixed"].shape[1:])
        tre0 = metrics.tre_points(torch.zeros_like(u), s["fixed_landmarks"].numpy(), s["moving_landmarks"].numpy(),
                                  s["moving_affine"].numpy())
        tre = metrics.tre_points(u, s["fixed_landmarks"].numpy(), s["moving_landmarks"].numpy(), s["moving_affine"].numpy())
        assert np.nanmean(tre0) > 2.0  # the pair really is deformed (mm)
        assert np.nanmax(tre) < 0.2  # the true field carries every landmark onto its partner (mm)
        w = warp(s["moving_seg"][None].long(), u[None], mode="nearest")[0, 0]
        d_true = metrics.dice(s["fixed_seg"][0], w, anatomy_dm.label_ids)
        d_init = metrics.dice(s["fixed_seg"][0], s["moving_seg"][0], anatomy_dm.label_ids)
        assert d_true > d_init + 0.1


def test_anatomy_subjects_are_distinct_and_deterministic(anatomy_dm):
    from datamodules.anatomy_brain import AnatomyBrainGenerator

    g = AnatomyBrainGenerator(spacing=4.0, seed=1)
    a = g._subject(0, False)  # bypass the memo: recompute
    b = anatomy_dm.generator.subject(0)
    np.testing.assert_array_equal(a.image, b.image)
    c = g._subject(1, False)
    assert np.abs(a.image - c.image).mean() > 0.01
    assert 0.0 <= a.image.min() and a.image.max() <= 1.0


def test_anatomy_loader_names_unreadable_template(tmp_path, monkeypatch):
    from datamodules import anatomy

    bad = tmp_path / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    bad.write_bytes(b"not a nifti at all")
    files = {"t1": bad, "gm": tmp_path / "gm.nii.gz", "wm": tmp_path / "wm.nii.gz"}
    monkeypatch.setattr(anatomy, "mni_template_files", lambda: files)
    anatomy.mni_template.cache_clear()
    try:
        with pytest.raises(anatomy.TemplateError, match="mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"):
            anatomy.mni_template(5.0)
        bad.unlink()
        with pytest.raises(anatomy.TemplateError, match="not found"):
            anatomy.mni_template(5.0)
    finally:
        anatomy.mni_template.cache_clear()


def test_anatomy_loader_without_nilearn(monkeypatch):
    import importlib.util

    from datamodules import anatomy

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nilearn" else real(name, *a))
    with pytest.raises(anatomy.TemplateError, match="pip install nilearn"):
        anatomy.mni_template_files()


@pytest.mark.parametrize("n,k", [(4, 2), (7, 3), (8, 3), (10, 3), (11, 4)])
def test_worst_30_percent_is_one_definition(n, k):
    v = np.arange(n, dtype=float)
    want_low = v[:k].mean()  # Dice: the k lowest
    want_high = v[-k:].mean()  # HD95: the k highest
    assert metrics.worst_fraction_mean(v, True) == pytest.approx(want_low)
    assert metrics.worst_fraction_mean(v, False) == pytest.approx(want_high)
    assert stats.worst_fraction_mean(v, True) == pytest.approx(want_low)
    assert metrics.aggregate(list(v), True)["robust30"] == pytest.approx(want_low)
