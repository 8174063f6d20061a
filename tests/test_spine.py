"""Spine DRR data module, synthetic spine CTs, 2D/3D metrics and the pose systems' test loop."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from benchmark.core.io import DataError
from benchmark.core.drr import CArmGeometry, pose_transform, project_points, reference_transform
from benchmark.core.metrics_pose import aggregate_pose, pose_metrics
from benchmark.core.se3 import so3_exp, so3_log
from benchmark.runner import initial_system
from datamodules.spine import SpineDRRDataModule
from datamodules.synthetic_spine import label_centroids, make_spine_ct
from systems.pose_base import InitialPose
from systems.pose_baseline import CMAESPose, GradientPose

pytestmark = pytest.mark.usefixtures("one_thread")

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "spine_ct"

SMALL = dict(n_train_cts=1, n_test_cts=1, synthetic_size=32, synthetic_spacing=5.0, height=32, width=32, pixel_mm=8.0, n_samples=32)


def test_synthetic_spine_ct_labels_and_centroids() -> None:
    ct = make_spine_ct(40, 4.0, seed=3)
    assert ct.hu.shape == ct.labels.shape == (40, 40, 40)
    ids = sorted(set(np.unique(ct.labels)) - {0})
    assert len(ids) >= 3 and ct.centroids.shape == (len(ids), 3)
    # bone is bright, air is dark, labelled voxels are bone
    assert ct.hu[ct.labels > 0].mean() > 300 and ct.hu[0, 0, 0] < -900
    com = np.array(ndi.center_of_mass(np.ones_like(ct.labels), ct.labels, ids))
    np.testing.assert_allclose(ct.centroids, com @ ct.affine[:3, :3].T + ct.affine[:3, 3], atol=1e-6)
    # vertebrae stacked along the superior (z) axis
    assert np.all(np.diff(ct.centroids[:, 2]) > 20)
    again = make_spine_ct(40, 4.0, seed=3)
    np.testing.assert_array_equal(again.hu, ct.hu)


def test_test_poses_fixed_seeded_and_distributed() -> None:
    dm = SpineDRRDataModule(**SMALL, poses_per_ct=500)
    dm2 = SpineDRRDataModule(**SMALL, poses_per_ct=500)
    assert dm.case_ids() == dm2.case_ids() and len(dm.case_ids()) == 500
    cases = dm.dataset("test").cases
    poses = np.stack([c[1] for c in cases])
    np.testing.assert_array_equal(poses, np.stack([c[1] for c in dm2.dataset("test").cases]))
    assert np.allclose(np.rad2deg(poses[:, :3]).std(0), 20, rtol=0.15)
    assert np.allclose(poses[:, 3:5].std(0), 30, rtol=0.15) and abs(poses[:, 5].std() - 60) < 9
    assert all(np.all(c[2] == 0) for c in cases)  # starting pose: the reference
    s = dm.dataset("test")[7]
    assert s["xray"].shape == (1, 32, 32) and 0 <= float(s["xray"].min()) and float(s["xray"].max()) <= 1
    np.testing.assert_allclose(s["pose_true"].numpy(), poses[7].astype(np.float32))
    # resume: finished cases leave the test loader
    dm.skip_cases = set(dm.case_ids()[:498])
    got = [c for b in dm.test_dataloader() for c in b["case_id"]]
    assert got == dm.case_ids()[498:]
    assert isinstance(initial_system(dm), InitialPose)


def test_perturbed_start_and_training_samples() -> None:
    dm = SpineDRRDataModule(**SMALL, poses_per_ct=4, init_std_scale=0.1, train_samples=3)
    c = dm.dataset("test").cases[0]
    assert 0 < np.abs(c[2] - c[1]).max() < 30
    batch = next(iter(dm.train_dataloader()))
    assert batch["xray"].shape == (3, 1, 32, 32) and batch["volume"].shape[:2] == (3, 1)
    assert isinstance(batch["geometry"], CArmGeometry)


@pytest.mark.skipif(not (REAL / "example_ct.nii.gz").exists(), reason="real spine CT sample absent from ../shared/data/spine_ct")
def test_real_spine_ct_loads_with_vertebra_centroids() -> None:
    dm = SpineDRRDataModule(root=str(REAL), poses_per_ct=2, height=32, width=32, pixel_mm=8.0, n_samples=48)
    dm.check_inputs()
    s = dm.dataset("test")[0]
    lab = nib.load(str(REAL / "example_ct_vertebrae.nii.gz"))
    arr = np.asarray(lab.dataobj).astype(int)
    ids = sorted(set(np.unique(arr)) - {0})
    com = np.array(ndi.center_of_mass(np.ones_like(arr), arr, ids)) @ lab.affine[:3, :3].T + lab.affine[:3, 3]
    np.testing.assert_allclose(s["landmarks"].numpy(), com, atol=1e-3)
    assert s["xray"].shape == (1, 32, 32) and float(s["xray"].std()) > 0.05
    np.testing.assert_allclose(s["base"][:3, 3].numpy(), -(s["base"][:3, :3].numpy() @ com.mean(0)), atol=1e-4)


def test_folder_labels_on_another_grid_and_verse_json(tmp_path: Path) -> None:
    ct = make_spine_ct(24, 6.0, seed=1)
    nib.save(nib.Nifti1Image(ct.hu, ct.affine), str(tmp_path / "a.nii.gz"))
    # labels written on a grid shifted by (2, 0, 1) voxels: centroids must follow its affine
    lab_aff = ct.affine.copy()
    lab_aff[:3, 3] += ct.affine[:3, :3] @ np.array([2.0, 0.0, 1.0])
    shifted = np.zeros_like(ct.labels)
    shifted[:-2, :, :-1] = ct.labels[2:, :, 1:]
    nib.save(nib.Nifti1Image(shifted, lab_aff), str(tmp_path / "a_seg.nii.gz"))
    nib.save(nib.Nifti1Image(ct.hu, ct.affine), str(tmp_path / "b.nii.gz"))
    vox = np.array([[3.0, 4.0, 5.0], [10.0, 11.0, 12.0]])
    ctd = [{"direction": ["L", "A", "S"]}] + [{"label": 20 + i, "X": v[0] * 6, "Y": v[1] * 6, "Z": v[2] * 6} for i, v in enumerate(vox)]
    # VerSe writes NaN for a vertebra it did not locate (its own reader skips them); kept, one
    # made the isocentre, the reference placement and every metric of the CT NaN
    ctd.append({"label": 24, "X": float("nan"), "Y": float("nan"), "Z": float("nan")})
    (tmp_path / "b_ctd.json").write_text(json.dumps(ctd))
    dm = SpineDRRDataModule(root=str(tmp_path), test_ids=["b"], poses_per_ct=1, height=16, width=16, pixel_mm=16.0, n_samples=16)
    dm.check_inputs()
    cts = dm._load()
    a = cts["train"][0]
    full_ids = sorted(set(np.unique(shifted)) - {0})
    _, expect = label_centroids(ct.labels, ct.affine, [i for i in full_ids])
    # the shifted map lost nothing inside (border rows are air) so centroids agree in world mm
    np.testing.assert_allclose(a.landmarks.numpy(), expect, atol=1e-3)
    b = cts["test"][0]
    np.testing.assert_allclose(b.landmarks.numpy(), vox @ ct.affine[:3, :3].T + ct.affine[:3, 3], atol=1e-4)
    assert bool(torch.isfinite(b.base).all())
    bad = SpineDRRDataModule(root=str(tmp_path / "missing"))
    with pytest.raises(Exception, match="not found"):
        bad.check_inputs()


def test_pose_metrics_analytic() -> None:
    geom = CArmGeometry(sdd=1000.0, sid=600.0, height=64, width=64, dely=1.0, delx=1.0)
    base = reference_transform(torch.tensor([5.0, -3.0, 2.0]))[None]
    pts = torch.tensor([[[0.0, 0, 0], [10, 20, 30], [-40, 5, 12]]], dtype=torch.float64)
    true = torch.tensor([[0.1, -0.2, 0.05, 3.0, 4.0, 10.0]], dtype=torch.float64)
    shift = true.clone()
    shift[0, 3:] += torch.tensor([3.0, 0.0, 4.0])
    r = pose_metrics(shift, true, base, pts, geom)[0]
    assert math.isclose(r["mtre_mm"], 5.0, rel_tol=1e-9) and math.isclose(r["trans_err_mm"], 5.0, rel_tol=1e-9)
    assert r["rot_err_deg"] < 1e-5 and r["success_10mm"] == 1.0 and r["success_2mm"] == 0.0
    # rotation about the isocentre: by hand
    rot = true.clone()
    rot[0, :3] = so3_log(so3_exp(true[0, :3]) @ so3_exp(torch.tensor([0.3, -0.5, 0.2], dtype=torch.float64) / math.sqrt(0.38) * math.radians(10)))
    r = pose_metrics(rot, true, base, pts, geom)[0]
    te, tt = pose_transform(rot, base)[0].numpy(), pose_transform(true, base)[0].numpy()
    p = pts[0].numpy()
    d = np.linalg.norm((p @ te[:3, :3].T + te[:3, 3]) - (p @ tt[:3, :3].T + tt[:3, 3]), axis=1)
    assert math.isclose(r["mtre_mm"], d.mean(), rel_tol=1e-9)
    assert math.isclose(r["rot_err_deg"], 10.0, rel_tol=1e-6) and r["trans_err_mm"] < 1e-9
    pe = project_points(pts, pose_transform(rot, base), geom)[0].numpy()
    pt = project_points(pts, pose_transform(true, base), geom)[0].numpy()
    assert math.isclose(r["ptre_mm"], np.linalg.norm(pe - pt, axis=1).mean(), rel_tol=1e-9)
    # NaN padding rows are ignored
    padded = torch.cat([pts, torch.full((1, 2, 3), float("nan"), dtype=torch.float64)], 1)
    assert math.isclose(pose_metrics(rot, true, base, padded, geom)[0]["mtre_mm"], r["mtre_mm"], rel_tol=1e-12)
    agg = aggregate_pose([{"mtre_mm": float(v), "success_10mm": float(v < 10)} for v in range(1, 21)], keys=["mtre_mm"])
    assert agg["mtre_mm"]["p95"] == np.percentile(np.arange(1, 21), 95) and agg["success_10mm"]["rate"] == 0.45
    assert np.allclose(so3_exp(torch.zeros(3)), np.eye(3))


class _Collect(L.Callback):
    """The records ``test_step`` returns (Lightning's ``outputs``) and the first case's panel."""

    def __init__(self, panel_case: str) -> None:
        self.panel_case, self.recs, self.panels = panel_case, [], []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        for b, rec in enumerate(outputs["records"]):
            self.recs.append(rec)
            if rec["case_id"] == self.panel_case:
                self.panels.append((rec["case_id"], pl_module.panel_arrays(batch, outputs["estimate"], b, rec)))


def _run_test(system, dm) -> tuple[list[dict], list]:
    got = _Collect(dm.case_ids()[0])
    tr = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   inference_mode=False, accelerator="cpu", devices=1, callbacks=[got])
    tr.test(system, datamodule=dm, verbose=False)
    return got.recs, got.panels


def test_initial_and_baselines_records_and_improvement() -> None:
    dm = SpineDRRDataModule(**SMALL, poses_per_ct=3, rot_std_deg=6, trans_std_mm=10, depth_std_mm=15)
    init, panels = _run_test(initial_system(dm), dm)
    keys = {"case_id", "fixed_id", "moving_id", "mtre_mm", "ptre_mm", "rot_err_deg", "trans_err_mm", "success_10mm",
            "success_2mm", "runtime_s", "peak_mem_mb", "mtre_initial_mm"}
    assert [r["case_id"] for r in init] == dm.case_ids() and all(keys <= set(r) for r in init)
    assert all(math.isclose(r["mtre_mm"], r["mtre_initial_mm"]) for r in init)
    cid, arr = panels[0]
    assert cid == dm.case_ids()[0] and str(arr["kind"]) == "pose"
    assert arr["xray"].shape == arr["drr_initial"].shape == arr["drr_final"].shape == (32, 32)
    cma, _ = _run_test(CMAESPose(levels=[2, 1], generations=[30, 20], popsize=12, n_samples=32, sigma_rot_deg=6,
                                 sigma_trans_mm=10, sigma_depth_mm=15), dm)
    gd, _ = _run_test(GradientPose(levels=[2, 1], iterations=[20, 10], n_samples=32), dm)
    m0 = np.mean([r["mtre_mm"] for r in init])
    assert np.mean([r["mtre_mm"] for r in cma]) < m0
    assert np.mean([r["mtre_mm"] for r in gd]) < m0
    # The estimated pose is stored with each case: the initial row's is the start (0), and the
    # stored estimate, scored again against the true pose, gives the case's own mTRE.
    from benchmark.core.results import POSE_ESTIMATE_COLUMNS

    assert all(r[k] == 0.0 for r in init for k in POSE_ESTIMATE_COLUMNS)
    ds = dm.dataset("test")
    for i, r in enumerate(cma):
        s = ds[i]
        assert s["case_id"] == r["case_id"]
        est = torch.tensor([[r[k] for k in POSE_ESTIMATE_COLUMNS]], dtype=torch.float64)
        again = pose_metrics(est, s["pose_true"][None], s["base"][None], s["landmarks"][None], s["geometry"])[0]
        assert again["mtre_mm"] == pytest.approx(r["mtre_mm"], abs=1e-3)


def _multi_structure_folder(root: Path, n_cts: int = 2, n_organs: int = 35) -> tuple[np.ndarray, list[int]]:
    """CTs whose label maps hold the vertebrae (ids 1…n) and ``n_organs`` more structures (ids
    100+, small blocks away from the spine), like a whole-body segmentation. Returns the last
    CT's affine and its vertebra ids."""
    root.mkdir(parents=True, exist_ok=True)
    for k in range(n_cts):
        ct = make_spine_ct(24, 6.0, seed=3 + k)
        lab = ct.labels.astype(np.int16)
        vert = sorted(int(v) for v in np.unique(lab) if v != 0)
        free = np.argwhere(lab == 0)
        rng = np.random.default_rng(k)
        for j, idx in enumerate(rng.choice(len(free), n_organs, replace=False)):
            lab[tuple(free[idx])] = 100 + j
        nib.save(nib.Nifti1Image(ct.hu, ct.affine), str(root / f"ct{k}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, ct.affine), str(root / f"ct{k}_seg.nii.gz"))
    return ct.affine, vert


def test_vertebra_labels_pick_landmarks_from_a_multi_structure_map(tmp_path: Path) -> None:
    aff, vert = _multi_structure_folder(tmp_path)
    assert len(vert) + 35 > 30
    kw = dict(test_ids=["ct1"], poses_per_ct=1, height=16, width=16, pixel_mm=16.0, n_samples=16)
    with pytest.warns(UserWarning, match=r"ct1_seg\.nii\.gz: all \d+ label ids become vertebra landmarks.*vertebra_labels"):
        every = SpineDRRDataModule(root=str(tmp_path), **kw)._load()["test"][0]
    assert every.landmarks.shape[0] == len(vert) + 35
    # Named as ids, or through a name map: only the vertebrae, at their centres of mass
    # (scipy's, through the affine), and the isocentre at their centroid.
    lab = np.asarray(nib.load(str(tmp_path / "ct1_seg.nii.gz")).dataobj)
    com = np.array(ndi.center_of_mass(np.ones_like(lab), lab, vert))
    expect = com @ aff[:3, :3].T + aff[:3, 3]
    for spec in (vert, {f"V{i}": i for i in vert}, ",".join(map(str, vert))):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no label-count warning now
            dm = SpineDRRDataModule(root=str(tmp_path), vertebra_labels=spec, **kw)
            ct = dm._load()["test"][0]
        np.testing.assert_allclose(ct.landmarks.numpy(), expect, atol=1e-3)
        np.testing.assert_allclose(ct.base[:3, :3].numpy() @ expect.mean(0) + ct.base[:3, 3].numpy(), 0.0, atol=1e-3)
    with pytest.raises(DataError, match=r"ct\d_seg\.nii\.gz: none of the vertebra_labels \[500\]"):
        SpineDRRDataModule(root=str(tmp_path), vertebra_labels=[500], **kw)._load()


def test_one_ct_folder_warns_and_spine_data_check(tmp_path: Path, capsys) -> None:
    from benchmark.cli import main

    _multi_structure_folder(tmp_path / "one", n_cts=1)
    dm = SpineDRRDataModule(root=str(tmp_path / "one"), vertebra_labels=list(range(1, 30)), poses_per_ct=1,
                            height=16, width=16, pixel_mm=16.0, n_samples=16)
    with pytest.warns(UserWarning, match=r"training and testing share CT\(s\) \['ct0'\]"):
        dm._load()
    # data check: the label count and the shared CT are notes; a CT without landmarks is a problem.
    _, vert = _multi_structure_folder(tmp_path / "two", n_cts=2)
    assert main(["data", "check", "--dataset", "spine", str(tmp_path / "two"), "--test-ids", "ct1"]) == 0
    out = capsys.readouterr().out
    assert "ct0_seg.nii.gz: all" in out and "ct1_seg.nii.gz: all" in out and "share" not in out
    assert main(["data", "check", "--dataset", "spine", str(tmp_path / "two"), "--test-ids", "ct1",
                 "--vertebra-labels", ",".join(map(str, vert))]) == 0
    out = capsys.readouterr().out
    assert "become vertebra landmarks" not in out and f"'ct1': {len(vert)}" in out
    assert main(["data", "check", "--dataset", "spine", str(tmp_path / "one")]) == 0
    assert "share CT(s) ['ct0']" in capsys.readouterr().out
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(tmp_path / "two" / "ct2.nii.gz"))
    assert main(["data", "check", "--dataset", "spine", str(tmp_path / "two")]) == 1
    assert "ct2.nii.gz: no landmarks" in capsys.readouterr().out
