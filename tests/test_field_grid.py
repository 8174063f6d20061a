"""Fields carry their grid: exported fields, `evaluate`'s grid check and `--resample-field`.

Truth is analytic: a known world-space affine map between a fixed and a moving image, each on
its own oblique grid, written as a field on a preprocessed (reoriented, resampled) grid; and an
end-to-end `regbench run` on fake NIfTI folders whose exported fields must score, through
`regbench evaluate` on the *original* files, the numbers of the run's own `cases.csv`.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from scipy.spatial.transform import Rotation

from benchmark.core import metrics
from benchmark.cli import main
from benchmark.evaluate import evaluate_files, map_field_to_grid
from benchmark.core.io import DataError, field_sidecar_path, write_displacement
from datamodules.preprocess import PreprocessConfig, preprocess_subject
from fake_layouts import WORLD_POINTS, build_nifti_folder, random_affine


def _world_map():
    """Fixed world → moving world: ``T(y) = R y + t`` (a small rotation and a shift, mm)."""
    rot = Rotation.from_rotvec([0.05, -0.08, 0.1]).as_matrix()
    t = np.array([0.8, -0.6, 0.4])
    return rot, t


def _to_vox(points_world: np.ndarray, affine: np.ndarray) -> np.ndarray:
    inv = np.linalg.inv(affine)
    return points_world @ inv[:3, :3].T + inv[:3, 3]


def _write_csv(path: Path, pts: np.ndarray) -> Path:
    path.write_text("x,y,z\n" + "".join(",".join(f"{v:.10f}" for v in p) + "\n" for p in pts))
    return path


@pytest.mark.parametrize("spacing", [None, 1.3], ids=["reorient", "reorient+resample"])
def test_resample_field_against_analytic_map(tmp_path, spacing):
    rng = np.random.default_rng(11)
    shape = (14, 16, 12)
    a_f = random_affine(rng, shape)  # original fixed grid: permuted, flipped, oblique
    b_m = random_affine(rng, shape)  # original moving grid: another one
    cfg = PreprocessConfig(normalize="none", canonical=True, spacing=spacing)
    pf = preprocess_subject(np.zeros(shape, np.float32), a_f, cfg)
    pm = preprocess_subject(np.zeros(shape, np.float32), b_m, cfg)
    a_p, b_p = pf.affine, pm.affine
    assert not np.allclose(a_p, a_f)  # the run's grid is not the original one
    rot, t = _world_map()

    # The run's field on its preprocessed grids: p -> B_p^-1 T(A_p p), minus p.
    p = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in pf.image.shape], indexing="ij"), -1)
    world = p @ a_p[:3, :3].T + a_p[:3, 3]
    q = _to_vox(world @ rot.T + t, b_p)
    u_p = np.moveaxis(q - p, -1, 0).astype(np.float32)

    # Landmarks: fixed world points; moving ones displaced from T(y) by known offsets (mm).
    fw = WORLD_POINTS * 0.6
    offsets = np.array([[0.5, 0.0, 0.0], [0.0, -1.0, 0.0], [0.3, 0.4, 0.0], [0.0, 0.0, 2.0]])
    mw = fw @ rot.T + t + offsets
    truth = float(np.linalg.norm(offsets, axis=1).mean())
    run_tre = float(np.mean(metrics.tre_points(u_p, _to_vox(fw, a_p), _to_vox(mw, b_p), b_p)))
    assert run_tre == pytest.approx(truth, abs=1e-3)

    # Original files; the field as the runner writes it (NIfTI with A_p, JSON record with B_p).
    fimg = tmp_path / "fixed.nii.gz"
    mimg = tmp_path / "moving.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), a_f), str(fimg))
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), b_m), str(mimg))
    disp = write_displacement(tmp_path / "disp_f_m.nii.gz", u_p, a_p)
    field_sidecar_path(disp).write_text(json.dumps({"field_affine": a_p.tolist(), "moving_affine": b_p.tolist()}))
    fl = _write_csv(tmp_path / "f.csv", _to_vox(fw, a_f))
    ml = _write_csv(tmp_path / "m.csv", _to_vox(mw, b_m))

    kw = dict(fixed_image=fimg, moving_image=mimg, fixed_landmarks=fl, moving_landmarks=ml)
    with pytest.raises(DataError, match=r"disp_f_m\.nii\.gz.*another grid.*fixed\.nii\.gz.*--resample-field"):
        evaluate_files(disp, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = evaluate_files(disp, resample_field=True, **kw)
    # A reorientation maps grid onto grid; resampling leaves a rim of original voxels outside.
    assert (res["field_outside_pct"] > 0) == (spacing is not None)
    assert any("outside the field's grid" in str(w.message) for w in caught) == (spacing is not None)
    assert res["field_resampled"] is True
    assert res["tre"] == pytest.approx(run_tre, abs=1e-3)

    # Inside the field's grid the resampled field is the analytic map on the original grids.
    u_o, outside = map_field_to_grid(u_p, a_p, b_p, a_f, shape, b_m)
    v = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)
    expect = np.moveaxis(_to_vox((v @ a_f[:3, :3].T + a_f[:3, 3]) @ rot.T + t, b_m) - v, -1, 0)
    pin = _to_vox(v @ a_f[:3, :3].T + a_f[:3, 3], a_p)
    inside = ((pin >= -1e-6) & (pin <= np.asarray(pf.image.shape) - 1 + 1e-6)).all(-1)
    assert inside.mean() > 0.5 and outside == pytest.approx(res["field_outside_pct"])
    if spacing is None:
        assert outside == 0 and inside.all()
    assert np.abs(u_o - expect)[:, inside].max() < 1e-3


def test_field_npz_without_grid_and_landmark_units(tmp_path):
    """A field without a grid of its own is taken on the fixed grid; landmark CSVs in mm are
    refused as voxels with the shared message, and read correctly when declared."""
    shape = (10, 11, 12)
    aff = np.diag([2.0, 1.5, 1.0, 1.0])
    aff[:3, 3] = [-10.0, 5.0, 3.0]
    f = tmp_path / "f.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), aff), str(f))
    u = np.zeros((3, *shape), np.float32)
    u[0] = 1.0  # one voxel along axis 0 = 2 mm
    disp = tmp_path / "d.npz"
    write_displacement(disp, u)
    vox = np.array([[2.0, 3.0, 4.0], [7.0, 1.0, 9.0]])
    world = vox @ aff[:3, :3].T + aff[:3, 3]
    fl_mm = _write_csv(tmp_path / "f_mm.csv", world)
    ml_mm = _write_csv(tmp_path / "m_mm.csv", world + [2.0, 0.0, 0.0])
    with pytest.raises(DataError, match=r"f_mm\.csv: 2 of 2 landmarks fall outside .*landmark_units: voxel.*landmark-units mm"):
        evaluate_files(disp, fixed_image=f, fixed_landmarks=fl_mm, moving_landmarks=ml_mm)
    res = evaluate_files(disp, fixed_image=f, fixed_landmarks=fl_mm, moving_landmarks=ml_mm, landmark_units="mm")
    assert res["tre"] == pytest.approx(0.0, abs=1e-6)
    assert res["field_resampled"] is False


def _run_config(tmp_path: Path, datasets: dict) -> Path:
    cfg = {
        "suite": "fields",
        "seeds": [0],
        "include_initial": True,
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "num_sanity_val_steps": 0},
        "loggers": ["csv"],
        "datasets": datasets,
        "methods": {"syn": {"class_path": "systems.SyN",
                            "init_args": {"preset": "fast", "progress": False, "scales": [2, 1], "iterations": [8, 4]}}},
    }
    p = tmp_path / "grid.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _nifti_block(root: Path, **extra) -> dict:
    return {"class_path": "datamodules.nifti_pairs.NiftiPairsDataModule",
            "init_args": {"root": str(root), "export_fields": True, "num_workers": 0, "val_pairs": 1,
                          "test_pairs": 2, "cache_dir": str(root.parent / "cache"), "normalize": "minmax", **extra}}


def test_nifti_pairs_run_exports_fields_that_evaluate_scores_the_same(tmp_path, monkeypatch, capsys):
    from benchmark.core.results import read_cases_csv
    from benchmark.runner import run_grid

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # "shared": every image on one RAS 1 mm grid (the field's grid is the images').
    # "mixed": each image on its own oblique, flipped grid, cubic so that reorientation to RAS
    # keeps the shape: the fields lie on the reoriented grids, not the files'.
    shared = build_nifti_folder(tmp_path / "shared", n=3, shape=(14, 16, 12), mixed=False)
    mixed = build_nifti_folder(tmp_path / "mixed", n=3, shape=(18, 18, 18), seed=4)
    out = tmp_path / "out"
    statuses = run_grid(_run_config(tmp_path, {"shared": _nifti_block(shared), "mixed": _nifti_block(mixed)}),
                        output=str(out), log=lambda *_: None, leaderboard=False)
    assert set(statuses.values()) == {"complete"}, statuses

    checked = 0
    for ds, root in (("shared", shared), ("mixed", mixed)):
        for method in ("initial", "syn"):
            exp = out / ds / method / "seed0"
            rows = read_cases_csv(exp / "cases.csv")
            assert len(rows) == 2
            for row in rows:
                f, m = row["fixed_id"], row["moving_id"]
                disp = exp / "fields" / f"disp_{f}_{m}.nii.gz"
                rec = json.loads(field_sidecar_path(disp).read_text())
                assert Path(rec["fixed_image"]) == (root / f"{f}.nii.gz").resolve()
                assert np.allclose(nib.load(str(disp)).affine, rec["field_affine"])
                moved = np.abs(np.asarray(nib.load(str(disp)).dataobj)).max()
                if method == "initial":
                    assert moved == 0
                elif ds == "mixed":  # ("shared" images are identical copies: nothing to register)
                    assert moved > 0.1, moved
                kw = dict(fixed_seg=root / f"{f}_seg.nii.gz", moving_seg=root / f"{m}_seg.nii.gz",
                          fixed_image=root / f"{f}.nii.gz", moving_image=root / f"{m}.nii.gz",
                          fixed_landmarks=root / f"{f}_landmarks.csv", moving_landmarks=root / f"{m}_landmarks.csv")
                argv = ["evaluate", "--disp", str(disp)] + [a for k, v in kw.items() for a in (f"--{k.replace('_', '-')}", str(v))]
                if ds == "mixed":
                    # Scored on the original files as they are, the field would be on the wrong grid.
                    assert main(argv) != 0
                    err = capsys.readouterr().err.strip()
                    assert "another grid" in err and f"{f}.nii.gz" in err and len(err.splitlines()) == 1
                    argv.append("--resample-field")
                js = tmp_path / f"{ds}_{method}_{f}_{m}.json"
                assert main(argv + ["--out", str(js)]) == 0
                res = json.loads(js.read_text())
                assert res["field_resampled"] == (ds == "mixed")
                for key, tol in (("tre", 1e-4), ("dice", 1e-6), ("hd95", 1e-4), ("fold_pct", 1e-6),
                                 ("sdlogj", 1e-4), ("sdlogj_l2r", 1e-4), ("ndv_pct", 1e-6)):
                    want = float(row[key])
                    got = res[key]
                    assert not math.isnan(want), (ds, method, key)
                    assert got == pytest.approx(want, abs=tol), (ds, method, key, got, want)
                checked += 1
    assert checked == 8
