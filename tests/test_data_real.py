"""Real-data modules on tiny fake layouts: preprocessing geometry, cache, splits, problems.

Independent truths: nibabel's own reorientation (``as_closest_canonical``, ``aff2axcodes``),
analytic world-space images / labels / points (tests/fake_layouts.py) and a known world
translation between two subjects warped with :func:`benchmark.core.spatial.warp`.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from benchmark.datacheck import check_dataset
from benchmark.core.io import DataError
from benchmark.core.spatial import warp
from datamodules import cache as cache_mod
from datamodules.base import RandomPairSampler
from datamodules.batch import collate_pairs, validate_batch
from datamodules.cache import ArrayCache
from datamodules.lumir import LUMIRDataModule
from datamodules.mindboggle import DKT31_CORTICAL, MindBoggle101DataModule
from datamodules.nifti_pairs import NiftiPairsDataModule
from benchmark.core.io import orientation_codes
from datamodules.preprocess import PreprocessConfig, preprocess_subject, reorient_to_ras
from fake_layouts import (
    WORLD_POINTS,
    build_lumir,
    build_mindboggle,
    build_nifti_folder,
    corrupt_gz,
    random_affine,
    sample_world,
    world_image,
    world_labels,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "oasis_pair"
pytestmark = pytest.mark.usefixtures("one_thread")


def _dm_kwargs(tmp_path: Path) -> dict:
    return {"cache_dir": str(tmp_path / "cache"), "num_workers": 0}


# ----------------------------------------------------------------------------- preprocessing
def test_reorientation_matches_nibabel(rng):
    for t in range(40):
        aff = random_affine(rng, (5, 6, 7), max_rot=0.3)
        data = rng.random((5, 6, 7)).astype(np.float32)
        ref = nib.as_closest_canonical(nib.Nifti1Image(data, aff))
        out, out_aff, vmap = reorient_to_ras(data, aff)
        assert np.array_equal(out, np.asarray(ref.dataobj)), t
        np.testing.assert_allclose(out_aff, ref.affine, atol=1e-9)
        np.testing.assert_allclose(aff @ vmap, out_aff, atol=1e-12)
        assert orientation_codes(aff) == "".join(nib.aff2axcodes(aff))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pipeline_keeps_world_correspondence(seed):
    """Image (linear in world), labels (world-defined) and points map through the voxel transform."""
    g = np.random.default_rng(seed)
    shape = (13, 11, 15)
    aff = random_affine(g, shape, spacing_range=(0.7, 1.7))
    w = sample_world(shape, aff)
    coef = np.array([0.03, -0.02, 0.05])
    image = (w @ coef + 1.0).astype(np.float32)
    labels = world_labels(w)
    inv = np.linalg.inv(aff)
    pts = WORLD_POINTS @ inv[:3, :3].T + inv[:3, 3]
    cfg = PreprocessConfig(normalize="none", canonical=True, spacing=(1.1, 0.9, 1.3), shape=(14, 12, 11), multiple_of=4)
    out = preprocess_subject(image, aff, cfg, seg=labels, landmarks=pts)
    assert all(n % 4 == 0 for n in out.image.shape)
    assert orientation_codes(out.affine) == "RAS"
    np.testing.assert_allclose(np.linalg.norm(out.affine[:3, :3], axis=0), (1.1, 0.9, 1.3), rtol=1e-9)
    # landmarks: the same world points
    back = out.landmarks @ out.affine[:3, :3].T + out.affine[:3, 3]
    np.testing.assert_allclose(back, WORLD_POINTS, atol=1e-9)
    # image: trilinear reproduces a linear function exactly where the source covers the voxel
    w_out = sample_world(out.image.shape, out.affine)
    src = w_out @ inv[:3, :3].T + inv[:3, 3]
    valid = preprocess_subject(np.ones(shape, np.float32), aff, cfg).image > 0.5  # not cropped away / padding
    inside = np.all((src >= 0) & (src <= np.asarray(shape) - 1), axis=-1) & valid
    assert inside.sum() > 200 and (~valid).sum() > 0
    np.testing.assert_allclose(out.image[inside], (w_out @ coef + 1.0)[inside], atol=1e-4)
    # labels: exactly the label of the nearest source voxel (brute force), and close to the
    # world-defined labels (they differ only within a voxel of a boundary)
    nn = np.clip(np.rint(src).astype(int), 0, np.asarray(shape) - 1)
    brute = labels[nn[..., 0], nn[..., 1], nn[..., 2]]
    assert (out.seg == brute)[inside].mean() > 0.995
    assert (out.seg == world_labels(w_out))[inside].mean() > 0.8
    # padding is background and zero intensity
    assert (out.seg[~valid] == 0).all() and (out.image[~valid] == 0).all()


def test_known_field_before_and_after_preprocessing():
    """A known world translation between two subjects on different grids registers them equally
    well warped on the raw grids and on the preprocessed grids (same correspondence)."""
    g = np.random.default_rng(5)
    shape_f, shape_m = (18, 16, 14), (15, 19, 16)
    t = np.array([1.3, -0.8, 0.6])  # moving content = fixed content shifted by t (mm)
    af = random_affine(g, shape_f, spacing_range=(0.8, 1.3))
    am = random_affine(g, shape_m, spacing_range=(0.8, 1.3))
    fixed_img = world_image(sample_world(shape_f, af)).astype(np.float32)
    fixed_seg = world_labels(sample_world(shape_f, af))
    moving_img = world_image(sample_world(shape_m, am) - t).astype(np.float32)
    moving_seg = world_labels(sample_world(shape_m, am) - t)

    def disp(a_f, a_m, shape):
        # fixed voxel x at world p corresponds to moving world p + t
        wf = sample_world(shape, a_f) + t
        inv = np.linalg.inv(a_m)
        vm = wf @ inv[:3, :3].T + inv[:3, 3]
        idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
        return torch.from_numpy(np.moveaxis(vm - idx, -1, 0)[None]).float()

    def score(fimg, fseg, mimg, mseg, a_f, a_m, fvalid, mvalid):
        u = disp(a_f, a_m, fimg.shape)
        wi = warp(torch.from_numpy(np.ascontiguousarray(mimg))[None, None].float(), u)[0, 0].numpy()
        wv = warp(torch.from_numpy(np.ascontiguousarray(mvalid, dtype=np.float32))[None, None], u)[0, 0].numpy()
        ws = warp(torch.from_numpy(np.ascontiguousarray(mseg).astype(np.int64))[None, None], u, mode="nearest")[0, 0].numpy()
        interior = fvalid & (wv > 0.999)  # both images have data there (no padding, no crop)
        assert interior.sum() > 300
        vals = np.unique(fseg[fseg > 0])
        fs, ws = np.where(interior, fseg, 0), np.where(interior, ws, 0)
        dice = np.mean([2 * ((ws == v) & (fs == v)).sum() / ((ws == v).sum() + (fs == v).sum()) for v in vals])
        return np.abs(wi - fimg)[interior].mean(), dice

    def valid(shape, aff):
        return preprocess_subject(np.ones(shape, np.float32), aff, cfg).image > 0.5

    cfg = PreprocessConfig(normalize="none", canonical=True, spacing=1.0, shape=(16, 16, 16))
    pf = preprocess_subject(fixed_img, af, cfg, seg=fixed_seg)
    pm = preprocess_subject(moving_img, am, cfg, seg=moving_seg)
    ones_f, ones_m = np.ones(shape_f, bool), np.ones(shape_m, bool)
    err_raw, dice_raw = score(fixed_img, fixed_seg, moving_img, moving_seg, af, am, ones_f, ones_m)
    err_pre, dice_pre = score(pf.image, pf.seg, pm.image, pm.seg, pf.affine, pm.affine, valid(shape_f, af), valid(shape_m, am))
    assert err_raw < 0.02 and err_pre < 0.02, (err_raw, err_pre)
    assert dice_raw > 0.85 and dice_pre > 0.85, (dice_raw, dice_pre)
    # a wrong convention (sign of the shift) would register badly
    wrong = preprocess_subject(world_image(sample_world(shape_m, am) + t).astype(np.float32), am, cfg)
    err_wrong, _ = score(pf.image, pf.seg, wrong.image, pm.seg, pf.affine, wrong.affine, valid(shape_f, af), valid(shape_m, am))
    assert err_wrong > 3 * err_pre, (err_wrong, err_pre)


def test_normalisation_modes():
    x = np.linspace(-5, 250, 1000, dtype=np.float32).reshape(10, 10, 10)
    from datamodules.preprocess import normalize_intensity

    mm = normalize_intensity(x, "minmax")
    assert mm.min() == 0 and mm.max() == pytest.approx(1.0)
    r = normalize_intensity(x, "range", intensity_range=(0, 255))
    assert r.min() == 0 and r.max() == pytest.approx(250 / 255) and r[5, 5, 5] == pytest.approx(x[5, 5, 5] / 255)
    p = normalize_intensity(x, "percentile", percentiles=(10, 90))
    lo, hi = np.percentile(x, [10, 90])
    assert p[5, 5, 5] == pytest.approx((x[5, 5, 5] - lo) / (hi - lo), rel=1e-5)
    assert (p == 0).sum() >= 99 and (p == 1).sum() >= 99
    with pytest.raises(DataError, match="constant"):
        normalize_intensity(np.ones((3, 3, 3)), "minmax", path="flat.nii.gz")


# ----------------------------------------------------------------------------- cache
def test_cache_hits_keys_and_races(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"x" * 1000)
    c = ArrayCache(tmp_path / "c")
    calls = []

    def compute():
        calls.append(1)
        return {"image": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "affine": np.eye(4)}

    a = c.get_or_compute([f, None], {"s": 1}, compute)
    b = c.get_or_compute([f, None], {"s": 1}, compute)
    assert len(calls) == 1 and np.array_equal(a["image"], b["image"])
    assert isinstance(b["image"], np.memmap)  # memory-mapped .npy
    c.get_or_compute([f, None], {"s": 2}, compute)  # other settings: other entry
    assert len(calls) == 2
    cache_mod._memo.clear()
    st = f.stat()
    f.write_bytes(b"y" * 1000)  # same size; content differs
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    c.get_or_compute([f, None], {"s": 1}, compute)
    assert len(calls) == 3
    # the hash of a file is remembered on disk for new processes, and "stat" mode never reads the file
    assert list((tmp_path / "c" / "hashes").glob("*.json"))
    stat_cache = ArrayCache(tmp_path / "c2", hash_mode="stat")
    k1 = stat_cache.key([f], {})
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 5000))
    assert stat_cache.key([f], {}) != k1
    # concurrent writers of one entry: one complete entry, no temporary folders left
    key = c.key([f], {"race": True})
    arrays = compute()
    threads = [threading.Thread(target=c.store, args=(key, arrays)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert np.array_equal(c.load(key)["image"], arrays["image"])
    assert not [p for p in c.entry_dir(key).parent.iterdir() if p.name.startswith(".tmp")]


# ----------------------------------------------------------------------------- NIfTI folder
def test_nifti_pairs_csv_splits_landmarks_and_offgrid_labels(tmp_path):
    rows = [("subj0", "subj1", "test"), ("subj1", "subj2", "test"), ("subj2", "subj0", "val"), ("subj1", "subj0", "train")]
    root = build_nifti_folder(tmp_path / "d", n=3, off_grid="subj1", pairs=rows)
    dm = NiftiPairsDataModule(str(root), pairs_csv="pairs.csv", spacing=1.0, shape=(16, 16, 16), **_dm_kwargs(tmp_path))
    dm.check_inputs()
    assert dm.case_ids("test") == ["subj0_subj1", "subj1_subj2"]
    assert dm.case_ids("val") == ["subj2_subj0"]
    assert [s.subject_id for s in dm.subjects["train"]] == ["subj0", "subj1"]
    with pytest.warns(UserWarning, match="subj1_seg.nii.gz.*another grid"):
        batch = collate_pairs([dm.pair_dataset("test")[0]])
    validate_batch(batch)
    # landmarks, labels and image still describe the same world after preprocessing
    for side in ("fixed", "moving"):
        a = batch[f"{side}_affine"][0].numpy()
        pts = batch[f"{side}_landmarks"][0].numpy().astype(np.float64)
        np.testing.assert_allclose(pts @ a[:3, :3].T + a[:3, 3], WORLD_POINTS, atol=1e-4)
        truth = world_labels(sample_world((16, 16, 16), a))
        seg = batch[f"{side}_seg"][0, 0].numpy()
        inside = batch[side][0, 0].numpy() > 0
        assert (seg == truth)[inside].mean() > 0.85
    # the same labels refused when asked to
    dm2 = NiftiPairsDataModule(str(root), pairs_csv="pairs.csv", on_label_grid_mismatch="error", use_cache=False,
                               num_workers=0, spacing=1.0, shape=(16, 16, 16))
    with pytest.raises(DataError, match="subj1_seg.nii.gz.*another grid"):
        dm2.pair_dataset("test")[0]


def test_nifti_all_pairs_and_problems(tmp_path):
    root = build_nifti_folder(tmp_path / "d", n=3, mixed=False, landmarks=False)
    dm = NiftiPairsDataModule(str(root), **_dm_kwargs(tmp_path))
    assert len(dm.case_ids("test")) == 6 and dm.label_ids == [1002, 1003, 1005, 2002, 2003]
    dm.setup("fit")
    sampler = RandomPairSampler(6, 10, seed=1, num_replicas=2, rank=0)
    other = RandomPairSampler(6, 10, seed=1, num_replicas=2, rank=1)
    full = np.random.default_rng(np.random.SeedSequence([1, 0x9A1, 0])).integers(0, 6, 10)
    assert sorted(sampler.indices(0) + other.indices(0)) == sorted(full.tolist())
    assert len(sampler) == len(other) == 5
    b = next(iter(dm.train_dataloader()))
    validate_batch(b)
    assert "fixed_seg" not in b
    # problems: a missing label file, a corrupt image; every one named by the data check
    (root / "subj2_seg.nii.gz").unlink()
    corrupt_gz(root / "subj1.nii.gz")
    with pytest.raises(DataError, match="label files missing.*subj2.nii.gz"):
        NiftiPairsDataModule(str(root), **_dm_kwargs(tmp_path)).check_inputs()
    rep = check_dataset("nifti", root)
    text = "\n".join(rep.problems)
    assert "subj2.nii.gz: no label file" in text and "subj1.nii.gz: cannot be read" in text
    from benchmark.cli import main

    if "data" in main.__globals__["build_parser"]().format_help():
        assert main(["data", "check", "--dataset", "nifti", str(root)]) == 1
    else:
        from benchmark.datacheck import main as dc_main

        assert dc_main(["check", "--dataset", "nifti", str(root)]) == 1


# ----------------------------------------------------------------------------- MindBoggle
def test_mindboggle_layout_splits_stray_labels(tmp_path):
    root = build_mindboggle(tmp_path / "mb", missing_label="NKI-RS-22-2")
    with pytest.warns(UserWarning, match="NKI-RS-22-2.*label file missing"):
        dm = MindBoggle101DataModule(str(root), **_dm_kwargs(tmp_path))
        dm.check_inputs()
    assert [s.subject_id for s in dm.subjects["train"]] == ["NKI-RS-22-1", "NKI-TRT-20-1"]
    assert [s.subject_id for s in dm.subjects["test"]] == [f"OASIS-TRT-20-{i}" for i in (1, 2, 3)]
    assert len(dm.case_ids("test")) == 6 and len(dm.case_ids("val")) == 2
    assert dm.label_ids == DKT31_CORTICAL and len(set(dm.label_ids)) == 62
    batch = collate_pairs([dm.pair_dataset("test")[0]])
    validate_batch(batch)
    ids = set(torch.unique(batch["fixed_seg"]).tolist())
    assert 1001 not in ids and 2032 not in ids and {1002, 2003} <= ids  # OASIS-TRT-20-1 carries the stray ids
    # +aseg label set adds the subcortical id found
    dm_aseg = MindBoggle101DataModule(str(root), label_set="dkt31+aseg", **_dm_kwargs(tmp_path))
    with pytest.warns(UserWarning):
        assert 17 in dm_aseg.label_ids and 1001 not in dm_aseg.label_ids
    rep = check_dataset("mindboggle", root)
    assert not rep.ok and any("NKI-RS-22-2" in p and "label file missing" in p for p in rep.problems)
    assert any("stray labels [1001, 2032]" in n for n in rep.notes)


def test_mindboggle_native_mixed_grids_and_corrupt_file(tmp_path):
    root = build_mindboggle(tmp_path / "mb", cohorts={"OASIS-TRT-20": 2, "NKI-RS-22": 2}, corrupt="OASIS-TRT-20-2")
    dm = MindBoggle101DataModule(str(root), space="native", shape=(16, 16, 16), val_cohorts=(), **_dm_kwargs(tmp_path))
    ds = dm.pair_dataset("train")
    b = collate_pairs([ds[0], ds[1]])
    validate_batch(b)
    for k in range(2):
        a = b["fixed_affine"][k].numpy()
        assert orientation_codes(a) == "RAS" and np.allclose(np.linalg.norm(a[:3, :3], axis=0), 1.0)
    rep = check_dataset("mindboggle", root, space="native")
    assert len(rep.summary["orientations"]) > 1
    with pytest.raises(DataError, match="OASIS-TRT-20-2/t1weighted_brain.MNI152.nii.gz: cannot be read"):
        MindBoggle101DataModule(str(root), val_cohorts=(), **_dm_kwargs(tmp_path)).pair_dataset("test")[0]
    assert any("OASIS-TRT-20-2/t1weighted_brain.MNI152.nii.gz" in p for p in check_dataset("mindboggle", root).problems)


# ----------------------------------------------------------------------------- LUMIR
def test_lumir_without_and_with_labels(tmp_path):
    root = build_lumir(tmp_path / "lu", n_train=3, n_val=3, labels=True, landmarks=True)
    dm = LUMIRDataModule(str(root), **_dm_kwargs(tmp_path))
    assert dm.export_fields is True and dm.label_ids == []
    assert dm.case_ids("test") == ["3456_3455", "3457_3456"]  # Learn2Reg field names: disp_3456_3455.nii.gz
    b = collate_pairs([dm.pair_dataset("test")[0]])
    validate_batch(b)
    assert "fixed_seg" not in b and "moving_seg" not in b
    raw = np.asarray(nib.load(str(root / "imagesVal" / "LUMIRMRI_3456_0000.nii.gz")).dataobj)
    np.testing.assert_allclose(b["fixed"][0, 0].numpy(), raw / 255.0, atol=1e-6)
    assert len(dm.pair_dataset("train")) == 6
    dm2 = LUMIRDataModule(str(root), labels_dir="labelsVal", landmarks_dir="landmarksVal", **_dm_kwargs(tmp_path))
    assert dm2.export_fields is False and dm2.label_ids == [1002, 1003, 1005, 2002, 2003]
    b2 = collate_pairs([dm2.pair_dataset("test")[0]])
    validate_batch(b2)
    a = b2["fixed_affine"][0].numpy()
    np.testing.assert_allclose(b2["fixed_landmarks"][0].numpy() @ a[:3, :3].T + a[:3, 3], WORLD_POINTS, atol=0.51)


def test_lumir_pair_across_orientations_is_refused_without_canonical(tmp_path):
    """LUMIR keeps the stored grid (``canonical: false``); a moving image stored x-flipped (the
    same anatomy, matching affine) was paired voxel for voxel with the fixed one and the data
    check called it "reoriented to RAS on load". Now: a clear error and a check problem;
    with ``canonical: true`` the pair is the unflipped content (nibabel's own reorientation)."""
    root = build_lumir(tmp_path / "lu", n_train=2, n_val=3)
    path = root / "imagesVal" / "LUMIRMRI_3455_0000.nii.gz"  # the moving image of the first test pair
    img = nib.load(str(path))
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = img.shape[0] - 1
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[::-1].copy(), img.affine @ flip), str(path))
    with pytest.raises(DataError, match=r"LUMIRMRI_3455_0000.nii.gz: is stored in orientation LAS, the fixed "
                                        r"LUMIRMRI_3456_0000.nii.gz in RAS.*canonical: true"):
        LUMIRDataModule(str(root), **_dm_kwargs(tmp_path)).pair_dataset("test")[0]
    assert any("mixed orientations" in p and "canonical: false" in p for p in check_dataset("lumir", root).problems)
    with pytest.warns(UserWarning, match="preprocessed grid"):
        dm = LUMIRDataModule(str(root), canonical=True, **_dm_kwargs(tmp_path))
    moving = dm.pair_dataset("test")[0]["moving"][0].numpy()
    want = np.asarray(nib.as_closest_canonical(nib.load(str(path))).dataobj) / 255.0
    np.testing.assert_allclose(moving, want, atol=1e-6)


def test_lumir_json_problems(tmp_path):
    root = build_lumir(tmp_path / "lu", n_train=2, n_val=2, with_validation=False)
    with pytest.raises(DataError, match="LUMIR_dataset.json.*validation"):
        LUMIRDataModule(str(root), **_dm_kwargs(tmp_path)).check_inputs()
    rep = check_dataset("lumir", root)
    assert any("LUMIR_dataset.json: has no 'validation'" in p for p in rep.problems)
    (root / "LUMIR_dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="LUMIR_dataset.json: is not valid JSON"):
        LUMIRDataModule(str(root), **_dm_kwargs(tmp_path)).check_inputs()
    (root / "LUMIR_dataset.json").write_text(json.dumps({"training": [{"image": "./imagesTr/nope.nii.gz"}] * 2,
                                                          "validation": []}))
    assert any("nope.nii.gz: listed in LUMIR_dataset.json but missing" in p for p in check_dataset("lumir", root).problems)


# ----------------------------------------------------------------------------- real pair
@pytest.mark.realdata
def test_real_oasis_pair_loads(tmp_path):
    if not SHARED.exists():
        pytest.skip(f"real sample data absent: {SHARED} not found")
    dm = NiftiPairsDataModule(str(SHARED), multiple_of=16, **_dm_kwargs(tmp_path))
    assert dm.case_ids("test") == ["image_A_image_B", "image_B_image_A"]
    with pytest.warns(UserWarning, match="image_A_seg.nii.gz.*another grid"):
        assert dm.label_ids == [1, 2]
    batch = collate_pairs([dm.pair_dataset("test")[0]])
    # warm cache, new module: the resampling is still reported
    with pytest.warns(UserWarning, match="image_A_seg.nii.gz.*another grid"):
        NiftiPairsDataModule(str(SHARED), multiple_of=16, **_dm_kwargs(tmp_path)).pair_dataset("test")[0]
    validate_batch(batch)
    assert tuple(batch["fixed"].shape[2:]) == (160, 192, 144)
    # resampled through the affines, A's labels fit its image better than voxel for voxel
    seg = batch["fixed_seg"][0, 0].numpy()
    brain = batch["fixed"][0, 0].numpy() > 0.05
    raw = np.asarray(nib.load(str(SHARED / "image_A_seg.nii.gz")).dataobj)
    overlap = lambda s: ((s > 0) & brain).sum() / (s > 0).sum()  # noqa: E731
    assert overlap(seg) > overlap(raw) + 0.02
    rep = check_dataset("nifti", SHARED)
    assert any("image_A_seg.nii.gz" in p and "another grid" in p for p in rep.problems)
    assert check_dataset("nifti", SHARED, resample_labels=True).ok


def test_perf_data_harness_smoke(tmp_path):
    from benchmark.perf.data import perf_data

    res = perf_data(repeats=1, threads=1, shape=(16, 20, 12), workdir=str(tmp_path))
    assert res["shape"] == [16, 20, 12] and res["cold_s"] > 0 and res["warm_s"] > 0
    assert res["cache_entry_mb"] > 0 and not list(tmp_path.iterdir())  # temporary files removed


def test_example_configs_check_against_fake_layouts(tmp_path, monkeypatch):
    from benchmark.runner import load_grid_config

    configs = Path(__file__).resolve().parents[1] / "benchmark" / "configs"
    monkeypatch.setenv("MINDBOGGLE_ROOT", str(build_mindboggle(tmp_path / "mb")))
    monkeypatch.setenv("LUMIR_ROOT", str(build_lumir(tmp_path / "lu", n_train=2, n_val=2)))
    monkeypatch.setenv("OASIS_PAIR_ROOT", str(build_nifti_folder(tmp_path / "nf", n=2, mixed=False)))
    for name, cls in (("mindboggle", "MindBoggle101DataModule"), ("lumir", "LUMIRDataModule"),
                      ("oasis_pair", "NiftiPairsDataModule")):
        cfg = load_grid_config(configs / f"{name}.yaml", output=str(tmp_path / "out"))
        (blk,) = cfg.datasets.values()
        assert blk.cls.__name__ == cls and set(cfg.methods) == {"voxelmorph", "syn"}


def test_mm_landmarks_flagged_by_data_check_and_run_and_read_when_declared(tmp_path, capsys):
    """Landmark CSVs of world mm read as voxel indices are a problem for `data check` and stop
    `run` before any work (the rule and message of `evaluate`); declared as mm they are read
    through the affine onto the same voxel indices as the voxel CSVs."""
    import yaml

    from benchmark.cli import main
    from benchmark.runner import ConfigError, load_grid_config

    root = build_nifti_folder(tmp_path / "nf", n=2, mixed=True, seed=3)
    vox = {s: np.loadtxt(root / f"{s}_landmarks.csv", delimiter=",", skiprows=1) for s in ("subj0", "subj1")}
    for s in vox:  # the same points written in world mm (RAS)
        np.savetxt(root / f"{s}_landmarks.csv", WORLD_POINTS, delimiter=",", header="x,y,z", comments="")
    assert main(["data", "check", "--dataset", "nifti", str(root)]) == 1
    out = capsys.readouterr().out
    assert "subj0_landmarks.csv: " in out and "fall outside the voxel grid" in out and "landmark_units: mm" in out
    assert main(["data", "check", "--dataset", "nifti", str(root), "--landmark-units", "mm"]) == 0
    capsys.readouterr()

    cfg = {"suite": "lm", "datasets": {"nf": {"class_path": "datamodules.nifti_pairs.NiftiPairsDataModule",
                                              "init_args": {"root": str(root), "num_workers": 0, "shape": 16,
                                                            "cache_dir": str(tmp_path / "cache")}}},
           "methods": {"syn": {"class_path": "systems.SyN", "init_args": {"preset": "fast"}}}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"datasets\.nf: .*subj0_landmarks\.csv: .*fall outside the voxel grid"):
        load_grid_config(path)
    assert main(["run", str(path), "--output", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "subj0_landmarks.csv" in err[0]
    cfg["datasets"]["nf"]["init_args"]["landmark_units"] = "mm"
    path.write_text(yaml.safe_dump(cfg))
    load_grid_config(path)
    dm = NiftiPairsDataModule(str(root), landmark_units="mm", use_cache=False, num_workers=0, canonical=False)
    dm.setup("test")
    for s in dm.subjects["test"]:
        pts = dm.loader.load(s, with_seg=False)["landmarks"]
        np.testing.assert_allclose(pts, vox[s.subject_id], atol=1e-6)
