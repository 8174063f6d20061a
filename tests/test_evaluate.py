"""`regbench evaluate` and the Learn2Reg file round trip, against independent truth."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter, map_coordinates

from benchmark.cli import main
from benchmark.evaluate import evaluate_files
from benchmark.core.io import DataError, read_displacement, write_displacement

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "oasis_pair"


def _labels(shape, rng) -> np.ndarray:
    """Blocky label map with a few sparse ids."""
    seg = np.zeros(shape, np.int16)
    seg[3:12, 4:15, 2:10] = 1002
    seg[8:18, 10:20, 8:16] = 2035
    seg[2:7, 2:8, 12:18] = 7
    return seg


def _smooth_field(shape, rng, amp=2.0) -> np.ndarray:
    u = rng.standard_normal((3, *shape)).astype(np.float32)
    u = np.stack([gaussian_filter(c, 2.0) for c in u])
    return (amp * u / np.abs(u).max()).astype(np.float32)


def _save(path: Path, arr: np.ndarray, affine=None) -> Path:
    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), str(path))
    return path


def _l2r_dice(disp_file: Path, fixed: np.ndarray, moving: np.ndarray, labels) -> float:
    """Learn2Reg-style evaluation written independently: nibabel read, map_coordinates warp."""
    d = np.asarray(nib.load(str(disp_file)).dataobj).astype(np.float64)  # [X, Y, Z, 3]
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in fixed.shape], indexing="ij"), axis=-1)
    coords = np.moveaxis(grid + d, -1, 0)
    warped = map_coordinates(moving, coords, order=0, mode="constant", cval=0)
    ds = []
    for lab in labels:
        a, b = fixed == lab, warped == lab
        if a.sum() == 0 or (moving == lab).sum() == 0:  # Learn2Reg: absent from fixed or moving
            continue
        ds.append(2 * (a & b).sum() / (a.sum() + b.sum()))
    return float(np.mean(ds))


def test_export_then_learn2reg_reading_gives_same_dice(tmp_path):
    rng = np.random.default_rng(0)
    shape = (20, 22, 18)
    fixed = _labels(shape, rng)
    moving = np.roll(fixed, 2, axis=0)
    u = _smooth_field(shape, rng, amp=0.6)
    # moving[x] = fixed[x - 2]: in the pull convention moving(x + 2) = fixed(x), so u0 ≈ +2.
    u[0] += 2.0
    aff = np.diag([1.2, 0.9, 2.0, 1.0])
    f_path = _save(tmp_path / "f.nii.gz", fixed, aff)
    m_path = _save(tmp_path / "m.nii.gz", moving, aff)
    disp_path = write_displacement(tmp_path / "disp_0001_0002.nii.gz", u, aff)
    # The file is [X, Y, Z, 3], float32, with the fixed affine.
    img = nib.load(str(disp_path))
    assert img.shape == (*shape, 3) and img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.affine, aff)
    labels = [7, 1002, 2035]
    res = evaluate_files(disp_path, f_path, m_path, labels=labels)
    assert res["dice"] == pytest.approx(_l2r_dice(disp_path, fixed, moving, labels), abs=1e-9)
    # And the zero field gives the initial overlap, lower than the registered one.
    zero = write_displacement(tmp_path / "zero.nii.gz", np.zeros_like(u), aff)
    assert evaluate_files(zero, f_path, m_path, labels=labels)["dice"] < res["dice"]


def test_read_lumir_layout_and_npz(tmp_path):
    rng = np.random.default_rng(1)
    u = _smooth_field((6, 7, 8), rng)
    np.savez(tmp_path / "a.npz", u)  # LUMIR-style [3, X, Y, Z] under the default key
    np.testing.assert_array_equal(read_displacement(tmp_path / "a.npz", shape=(6, 7, 8)), u)
    write_displacement(tmp_path / "b.npz", u)
    np.testing.assert_array_equal(read_displacement(tmp_path / "b.npz"), u)
    with pytest.raises(DataError, match="does not match the fixed grid"):
        read_displacement(tmp_path / "b.npz", shape=(6, 7, 9))


def test_evaluate_json_keys_and_landmarks(tmp_path):
    rng = np.random.default_rng(2)
    shape = (16, 16, 16)
    fixed = _labels(shape, rng)[:16, :16, :16]
    f_path = _save(tmp_path / "f.nii.gz", fixed)
    m_path = _save(tmp_path / "m.nii.gz", fixed)
    u = np.zeros((3, *shape), np.float32)
    u[1] = 1.5  # constant shift along axis 1
    disp = write_displacement(tmp_path / "d.nii.gz", u)
    fl = tmp_path / "f.csv"
    ml = tmp_path / "m.csv"
    fl.write_text("x,y,z\n4,5,6\n10,3,2\n")
    ml.write_text("4,6.5,6\n10,4.5,2\n")  # exactly the displaced points -> TRE 0
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--disp", str(disp), "--fixed-seg", str(f_path), "--moving-seg", str(m_path),
                 "--fixed-landmarks", str(fl), "--moving-landmarks", str(ml), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    for key in ("dice", "dice_per_label", "hd95", "tre", "fold_pct", "sdlogj", "sdlogj_l2r", "ndv_pct"):
        assert key in res
    assert res["tre"] == pytest.approx(0.0, abs=1e-5)
    assert res["fold_pct"] == 0.0
    # Swapping pull for push (moving = fixed - u) would give 3 voxels of error.
    ml.write_text("4,3.5,6\n10,1.5,2\n")
    res2 = evaluate_files(disp, f_path, m_path, fixed_landmarks=fl, moving_landmarks=ml)
    assert res2["tre"] == pytest.approx(3.0, abs=1e-5)
    assert res2["tre"] is not None


def test_evaluate_refuses_bad_inputs(tmp_path, capsys):
    shape = (12, 13, 14)
    seg = np.zeros(shape, np.int16)
    seg[2:8, 3:9, 4:10] = 1
    f_path = _save(tmp_path / "f.nii.gz", seg)
    m_path = _save(tmp_path / "m.nii.gz", seg)
    # wrong shape
    bad = write_displacement(tmp_path / "wrong.nii.gz", np.zeros((3, 12, 13, 15), np.float32))
    assert main(["evaluate", "--disp", str(bad), "--fixed-seg", str(f_path), "--moving-seg", str(m_path)]) == 2
    err = capsys.readouterr().err
    assert "wrong.nii.gz" in err and "does not match" in err
    # NaN
    u = np.zeros((3, *shape), np.float32)
    u[0, 1, 1, 1] = np.nan
    nan_path = tmp_path / "nan.nii.gz"
    _save(nan_path, np.moveaxis(u, 0, -1))
    with pytest.raises(DataError, match="nan.nii.gz.*NaN"):
        evaluate_files(nan_path, f_path, m_path)
    # missing file
    with pytest.raises(DataError, match="missing.nii.gz.*not found"):
        evaluate_files(tmp_path / "missing.nii.gz", f_path, m_path)
    # labels on another grid: refused by default, resampled through the affines on request
    other = _save(tmp_path / "other_grid.nii.gz", seg, np.diag([0.5, 1.0, 1.0, 1.0]))
    ok = write_displacement(tmp_path / "ok.nii.gz", np.zeros((3, *shape), np.float32))
    with pytest.raises(DataError, match="other_grid.nii.gz.*another grid"):
        evaluate_files(ok, f_path, other)
    with pytest.warns(UserWarning, match="resampled"):
        res = evaluate_files(ok, f_path, other, resample_labels=True)
    # Resampled through the affines, the 0.5 mm labels cover half the extent along axis 0.
    assert 0.0 < res["dice"] < 1.0


@pytest.mark.realdata
def test_real_pair_initial_dice(tmp_path, capsys):
    if not SHARED.exists():
        pytest.skip(f"real sample data absent: {SHARED} not found")
    b = nib.load(str(SHARED / "image_B.nii.gz"))
    zero = write_displacement(tmp_path / "zero.nii.gz", np.zeros((3, *b.shape), np.float32), b.affine)
    args = ["evaluate", "--disp", str(zero), "--fixed-seg", str(SHARED / "image_B_seg.nii.gz"),
            "--moving-seg", str(SHARED / "image_A_seg.nii.gz"), "--labels", "1,2"]
    # image_A_seg.nii.gz lies on another grid than its image: refused, with the fix named.
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "image_A_seg.nii.gz" in err and "another grid" in err and "--resample-labels" in err
    out = tmp_path / "m.json"
    with pytest.warns(UserWarning):
        assert main(args + ["--moving-image", str(SHARED / "image_A.nii.gz"), "--resample-labels", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["dice"] == pytest.approx(0.640, abs=0.01)
    assert res["fold_pct"] == 0.0 and res["ndv_pct"] == 0.0


def test_truncated_nifti_is_a_data_error_naming_the_file(tmp_path):
    """The header of a truncated .nii.gz reads; its voxels do not: still a DataError."""
    import nibabel as nib
    import numpy as np

    from benchmark.core.io import DataError, load_segmentation, load_volume

    good = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((24, 24, 24)).astype(np.float32), np.eye(4)), good)
    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for loader in (load_volume, load_segmentation):
        with pytest.raises(DataError, match=r"cut\.nii\.gz.*truncated or corrupt"):
            loader(bad)


def test_evaluate_unwritable_out_is_one_line(tmp_path):
    """An --out under a plain file (a folder that cannot exist) is one line naming the path, exit 2."""
    import subprocess
    import sys

    seg = np.zeros((8, 8, 8), np.int16)
    seg[2:6, 2:6, 2:6] = 1
    s = _save(tmp_path / "s.nii.gz", seg)
    d = tmp_path / "d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.float32), np.eye(4)), str(d))
    blocker = tmp_path / "plain_file"
    blocker.write_text("x")
    out = blocker / "metrics.json"
    r = subprocess.run([sys.executable, "-m", "benchmark.cli", "evaluate", "--disp", str(d), "--fixed-seg", str(s),
                        "--moving-seg", str(s), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "plain_file" in lines[0] and "Traceback" not in r.stderr


def test_hd95_in_voxels_is_labelled_so(tmp_path):
    """With --hd95-voxel the value is in voxels (2 here, 4 mm at 2 mm voxels) and both the JSON
    and the table say so."""
    from benchmark.evaluate import format_table

    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    f = np.zeros((20, 20, 20), np.int16)
    f[5:12, 5:12, 5:12] = 1
    m = np.zeros_like(f)
    m[7:14, 5:12, 5:12] = 1  # two voxels along axis 0
    fs, ms = _save(tmp_path / "f.nii.gz", f, aff), _save(tmp_path / "m.nii.gz", m, aff)
    d = tmp_path / "d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20, 3), np.float32), aff), str(d))
    vox = evaluate_files(str(d), fixed_seg=str(fs), moving_seg=str(ms), hd95_voxel=True)
    mm = evaluate_files(str(d), fixed_seg=str(fs), moving_seg=str(ms))
    assert vox["hd95"] == pytest.approx(2.0) and mm["hd95"] == pytest.approx(4.0)
    assert vox["hd95_voxel"] is True and mm["hd95_voxel"] is False
    assert any("HD95 (vox)" in ln and "2.0000" in ln for ln in format_table(vox).splitlines())
    assert any("HD95 (mm)" in ln and "4.0000" in ln for ln in format_table(mm).splitlines())


def test_landmarks_with_a_byte_order_mark_keep_their_first_point(tmp_path):
    """A spreadsheet's UTF-8 BOM made the first point look like a header and dropped it
    silently; a file that is not UTF-8 text is one clear error naming it."""
    from benchmark.core.io import read_landmarks_csv

    rows = "8,9,10\n1,2,3\n4,5,6\n"
    plain, bom, head = tmp_path / "p.csv", tmp_path / "b.csv", tmp_path / "h.csv"
    plain.write_text(rows, encoding="utf-8")
    bom.write_text(rows, encoding="utf-8-sig")
    head.write_text("x,y,z\n" + rows, encoding="utf-8-sig")
    want = np.array([[8, 9, 10], [1, 2, 3], [4, 5, 6]], dtype=np.float64)
    for p in (plain, bom, head):
        np.testing.assert_array_equal(read_landmarks_csv(p), want)
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\x8a\xff\x00\x01,2,3\n")
    with pytest.raises(DataError, match=r"bin.csv: is not UTF-8 text"):
        read_landmarks_csv(binary)


def test_scalar_voxels_and_a_valid_affine_are_required_of_images_and_label_maps(tmp_path):
    """RGB and complex NIfTIs crashed or lost their imaginary part silently; a label map's
    singular or NaN affine crashed in the resampling or gave all-NaN Dice."""
    from benchmark.core.io import load_segmentation, load_volume

    seg = np.zeros((6, 6, 6), np.int16)
    seg[1:4, 1:4, 1:4] = 1
    rgb_t = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb = tmp_path / "rgb.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 6), rgb_t), np.eye(4)), str(rgb))
    cplx = _save(tmp_path / "c.nii.gz", np.ones((6, 6, 6), np.complex64))
    for path, loader in ((rgb, load_volume), (rgb, load_segmentation), (cplx, load_volume)):
        with pytest.raises(DataError, match=r"has voxel type .*expected one real number per voxel"):
            loader(path)
    for name, offset, row in (("s.nii", 312, [0.0, 0.0, 0.0, 0.0]), ("n.nii", 280, [np.nan, 0.0, 0.0, 0.0])):
        # nibabel will not write such an affine, but a file's header can hold one: patch the
        # sform row (srow_z at byte 312, srow_x at 280 of the NIfTI-1 header) after writing
        img = nib.Nifti1Image(seg, np.eye(4))
        img.header.set_qform(None, code=0)
        nib.save(img, str(tmp_path / name))
        raw = bytearray((tmp_path / name).read_bytes())
        raw[offset:offset + 16] = np.asarray(row, "<f4").tobytes()
        (tmp_path / name).write_bytes(bytes(raw))
    for p in (tmp_path / "s.nii", tmp_path / "n.nii"):
        with pytest.raises(DataError, match=rf"{p.name}: has a singular or non-finite affine"):
            load_segmentation(p)
    assert load_segmentation(_save(tmp_path / "ok.nii.gz", seg)).data.sum() == 27


def test_identity_onto_a_moving_grid_of_opposite_handedness_does_not_fold(tmp_path):
    """The moving image stored x-flipped (LAS; same anatomy) and the exact physical identity
    written as voxel displacements i ↦ flip(i): Dice 1, and no folds (fold % and NDV read the
    voxel-frame map, whose determinant is -1 everywhere, as 100 % before)."""
    shape = (12, 10, 8)
    fixed = np.zeros(shape, np.int16)
    fixed[2:7, 3:8, 2:6], fixed[7:11, 1:5, 1:7] = 1, 2
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = shape[0] - 1  # moving voxel -> fixed voxel (and back)
    aff_f = np.diag([1.5, 1.0, 2.0, 1.0])
    aff_m = aff_f @ flip
    fs = _save(tmp_path / "f.nii.gz", fixed, aff_f)
    ms = _save(tmp_path / "m.nii.gz", fixed[::-1].copy(), aff_m)
    fi = _save(tmp_path / "fi.nii.gz", fixed.astype(np.float32), aff_f)
    mi = _save(tmp_path / "mi.nii.gz", fixed[::-1].astype(np.float32).copy(), aff_m)
    i0 = np.arange(shape[0], dtype=np.float32)[:, None, None]
    u = np.zeros((*shape, 3), np.float32)
    u[..., 0] = (shape[0] - 1 - 2 * i0) * np.ones(shape, np.float32)  # moving voxel x = n-1-i
    d = tmp_path / "d.nii.gz"
    nib.save(nib.Nifti1Image(u, aff_f), str(d))
    res = evaluate_files(str(d), fixed_image=str(fi), moving_image=str(mi), fixed_seg=str(fs), moving_seg=str(ms))
    assert res["dice"] == 1.0 and res["hd95"] == 0.0
    assert res["fold_pct"] == 0.0 and res["ndv_pct"] == 0.0 and res["sdlogj"] == pytest.approx(0.0, abs=1e-6)
