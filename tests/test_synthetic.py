"""Tests of the synthetic brain generator, the batch contract and the synthetic DataModule.

Truth is independent of the code under test where it matters: the correspondence and the
ground-truth displacement are checked with ``scipy.ndimage.map_coordinates`` (trilinear =
the definition of ``phi`` between voxels), Dice is a small numpy loop, and the pull
convention is checked through label agreement and Dice gains that a sign or convention
error would destroy.
"""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

from benchmark.core.spatial import warp
from datamodules.batch import collate_pairs, validate_batch
from datamodules.synthetic import SyntheticBrainGenerator, synthetic_affine
from datamodules.synthetic_brain import EpochPairSampler, SyntheticBrainDataModule

SIZE = 32


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gen() -> SyntheticBrainGenerator:
    return SyntheticBrainGenerator(size=SIZE, seed=3)


@pytest.fixture(scope="module")
def pair(gen):
    return gen.subject(0, keep_phi=True), gen.subject(1, keep_phi=True)


def dice(a: np.ndarray, b: np.ndarray, labels) -> float:
    vals = []
    for lab in labels:
        x, y = a == lab, b == lab
        den = x.sum() + y.sum()
        if den:
            vals.append(2.0 * np.logical_and(x, y).sum() / den)
    return float(np.mean(vals))


def trilinear(field: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """(3, X, Y, Z) field at (N, 3) voxel points → (N, 3), scipy, edge-extended."""
    return np.stack([map_coordinates(field[d], pts.T, order=1, mode="nearest") for d in range(3)], axis=1)


# ---------------------------------------------------------------------------------- generator
def test_deterministic_from_seed(gen):
    other = SyntheticBrainGenerator(size=SIZE, seed=3)
    a, b = gen.subject(2), other.subject(2)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.seg, b.seg)
    np.testing.assert_array_equal(a.landmarks, b.landmarks)
    np.testing.assert_array_equal(gen.template.seg, other.template.seg)
    c = SyntheticBrainGenerator(size=SIZE, seed=4).subject(2)
    assert not np.array_equal(a.seg, c.seg)
    assert np.abs(a.image - c.image).mean() > 0.01
    # different subjects of one seed differ too
    assert not np.array_equal(a.seg, gen.subject(3).seg)


def test_labels_and_intensities(gen, pair):
    tpl = gen.template
    counts = np.bincount(tpl.seg.ravel(), minlength=gen.n_labels + 1)
    assert gen.n_labels >= 10 and len(gen.label_ids) == gen.n_labels
    assert counts[1:].min() >= gen.min_structure_voxels >= 1
    assert counts[1:].min() >= 50 * SIZE**3 / 64**3
    for s in pair:
        assert s.image.dtype == np.float32 and s.image.shape == (SIZE,) * 3
        assert s.image.min() >= 0.0 and s.image.max() <= 1.0 and s.image.max() - s.image.min() > 0.99
        assert s.seg.dtype == np.int64
        present = np.unique(s.seg)
        assert set(present.tolist()) == {0, *gen.label_ids}
        sub_counts = np.bincount(s.seg.ravel())
        assert sub_counts[1:].min() >= 0.4 * gen.min_structure_voxels
        # labels have distinct mean intensities in the image: image explains label
        means = np.array([s.image[s.seg == k].mean() for k in range(gen.n_labels + 1)])
        assert means[0] < 0.15 and means[1:].min() > means[0] + 0.05
    # the whole template fits: every landmark is inside its structure in template space
    q = tpl.landmarks.astype(int)
    assert np.array_equal(tpl.seg[q[:, 0], q[:, 1], q[:, 2]], tpl.landmark_labels)
    assert gen.n_landmarks == len(q) == 2 * gen.n_labels


def test_landmarks_satisfy_pull_correspondence_independently(gen, pair):
    """y + phi(y) = q with phi interpolated by scipy (not by the generator's own warp)."""
    q = gen.template.landmarks
    for s in pair:
        assert s.landmark_residual < 1e-3
        mapped = s.landmarks + trilinear(s.phi[0].numpy().astype(np.float64), s.landmarks)
        assert np.abs(mapped - q).max() < 1e-3
        # a push convention y = q + phi(q) would be wrong by about the deformation size
        push = q + trilinear(s.phi[0].numpy().astype(np.float64), q)
        assert np.linalg.norm(push - s.landmarks, axis=1).mean() > 0.2


def test_landmark_content_matches_template(gen, pair):
    """The subject label at its landmark equals the template label at q (deep points)."""
    tpl = gen.template
    deep = tpl.landmark_depth >= 3.0
    assert deep.sum() >= 3
    for s in pair:
        lab = map_coordinates(s.seg, s.landmarks.T, order=0)
        np.testing.assert_array_equal(lab[deep], tpl.landmark_labels[deep])
        assert (lab == tpl.landmark_labels).mean() >= 0.9
    # intensities at corresponding landmarks agree across the pair (label means dominate)
    a, b = pair
    ia = map_coordinates(a.image, a.landmarks.T, order=1)
    ib = map_coordinates(b.image, b.landmarks.T, order=1)
    assert np.corrcoef(ia, ib)[0, 1] > 0.8


def test_ground_truth_mapping_and_displacement(gen, pair):
    a, b = pair
    # exact point mapping fixed -> moving sends fixed landmarks onto moving landmarks
    mapped = gen.map_points(0, 1, a.landmarks)
    assert np.abs(mapped - b.landmarks).max() < 1e-2
    u = gen.true_displacement(0, 1)
    assert u.shape == (1, 3, SIZE, SIZE, SIZE) and u.dtype == torch.float32
    un = u[0].numpy().astype(np.float64)
    # at grid points: T_b(x + u(x)) == T_a(x), with scipy trilinear phi_b
    x = np.indices((SIZE,) * 3).reshape(3, -1).T.astype(np.float64)
    w = x + un.reshape(3, -1).T
    lhs = w + trilinear(b.phi[0].numpy().astype(np.float64), w)
    rhs = x + a.phi[0].numpy().astype(np.float64).reshape(3, -1).T
    assert np.abs(lhs - rhs).max() < 1e-3
    # between voxels the dense field adds trilinear interpolation error only (documented)
    err = np.linalg.norm(a.landmarks + trilinear(un, a.landmarks) - b.landmarks, axis=1)
    assert err.max() < 0.15 and err.mean() < 0.05


def test_dice_before_and_after_true_warp(gen, pair):
    a, b = pair
    before = dice(a.seg, b.seg, gen.label_ids)
    assert 0.4 < before < 0.9
    u = gen.true_displacement(0, 1)
    warped = warp(torch.from_numpy(b.seg).view(1, 1, *b.seg.shape), u, mode="nearest")[0, 0].numpy()
    after = dice(a.seg, warped, gen.label_ids)
    assert after > before + 0.12
    # the opposite sign must not help: the convention is tested, not assumed
    wrong = warp(torch.from_numpy(b.seg).view(1, 1, *b.seg.shape), -u, mode="nearest")[0, 0].numpy()
    assert dice(a.seg, wrong, gen.label_ids) < before


def test_options_sparse_ids_spacing_and_bad_args():
    ids = [1002, 1003, 1005, 2002, 2003, 2005, 17, 53, 10, 49, 4, 43]
    g = SyntheticBrainGenerator(size=(24, 28, 32), seed=1, spacing=(1.0, 1.2, 2.0), label_values=ids)
    s = g.subject(0)
    assert s.seg.shape == (24, 28, 32)
    assert set(np.unique(s.seg).tolist()) <= {0, *ids}
    assert g.label_ids == ids
    np.testing.assert_allclose(np.diag(s.affine), [1.0, 1.2, 2.0, 1.0])
    # the grid centre is the world origin
    centre = s.affine @ np.array([11.5, 13.5, 15.5, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-12)
    np.testing.assert_allclose(synthetic_affine((24, 28, 32), (1.0, 1.2, 2.0)), s.affine)
    with pytest.raises(ValueError, match="label_values"):
        SyntheticBrainGenerator(size=24, label_values=[1, 2, 3])
    with pytest.raises(ValueError, match="n_labels"):
        SyntheticBrainGenerator(size=24, n_labels=2)
    with pytest.raises(ValueError, match="size"):
        SyntheticBrainGenerator(size=(32, 32))


# ---------------------------------------------------------------------------------- contract
def _sample(n_landmarks: int = 4, fid: str = "s0000", mid: str = "s0001") -> dict:
    s = (6, 7, 8)
    return {
        "fixed": torch.rand(1, *s),
        "moving": torch.rand(1, *s),
        "fixed_seg": torch.randint(0, 3, (1, *s)),
        "moving_seg": torch.randint(0, 3, (1, *s)),
        "fixed_affine": torch.eye(4, dtype=torch.float64),
        "moving_affine": torch.eye(4, dtype=torch.float64),
        "fixed_landmarks": torch.rand(n_landmarks, 3),
        "moving_landmarks": torch.rand(n_landmarks, 3),
        "case_id": f"{fid}_{mid}",
        "fixed_id": fid,
        "moving_id": mid,
    }


def test_collate_pads_landmarks_and_validates():
    batch = collate_pairs([_sample(4), _sample(2, "s0002", "s0003")])
    validate_batch(batch)
    assert batch["fixed"].shape == (2, 1, 6, 7, 8) and batch["fixed_seg"].dtype == torch.int64
    assert batch["fixed_affine"].shape == (2, 4, 4) and batch["fixed_affine"].dtype == torch.float64
    assert batch["moving_landmarks"].shape == (2, 4, 3)
    assert torch.isnan(batch["moving_landmarks"][1, 2:]).all() and not torch.isnan(batch["moving_landmarks"][1, :2]).any()
    assert batch["case_id"] == ["s0000_s0001", "s0002_s0003"]
    # labels and landmarks are optional as pairs
    s = _sample()
    for k in ("fixed_seg", "moving_seg", "fixed_landmarks", "moving_landmarks"):
        del s[k]
    validate_batch(collate_pairs([s]))


@pytest.mark.parametrize(
    "key,mutate,message",
    [
        ("moving", lambda b: b.pop("moving"), "missing"),
        ("fixed", lambda b: b.__setitem__("fixed", b["fixed"].double()), "dtype"),
        ("fixed_seg", lambda b: b.__setitem__("fixed_seg", b["fixed_seg"].float()), "dtype"),
        ("moving_seg", lambda b: b.__setitem__("moving_seg", b["moving_seg"][..., :-1]), "shape"),
        ("moving_seg", lambda b: b.pop("moving_seg"), "missing"),
        ("fixed_affine", lambda b: b.__setitem__("fixed_affine", b["fixed_affine"][:, :3]), "shape"),
        ("moving_affine", lambda b: b["moving_affine"].__setitem__((0, 0, 0), math.nan), "NaN"),
        ("moving", lambda b: b.__setitem__("moving", b["moving"][:1]), "batch size"),
        ("fixed", lambda b: b["fixed"].__setitem__((0, 0, 1, 1, 1), math.inf), "NaN or Inf"),
        ("fixed_landmarks", lambda b: b["fixed_landmarks"].__setitem__((0, 0, 1), math.nan), "mixes NaN"),
        ("moving_landmarks", lambda b: b.__setitem__("moving_landmarks", b["moving_landmarks"][:, :3]), "shape"),
        ("case_id", lambda b: b.__setitem__("case_id", ["x"]), "entries"),
        ("fixed_id", lambda b: b.__setitem__("fixed_id", "s0000"), "list of str"),
    ],
)
def test_validate_batch_names_the_key(key, mutate, message):
    batch = collate_pairs([_sample(), _sample(4, "s0002", "s0003")])
    mutate(batch)
    with pytest.raises(ValueError, match=message) as info:
        validate_batch(batch)
    assert repr(key) in str(info.value)


# ---------------------------------------------------------------------------------- datamodule
@pytest.fixture(scope="module")
def dm() -> SyntheticBrainDataModule:
    m = SyntheticBrainDataModule(size=SIZE, n_train=4, n_val=2, n_test=3, seed=5, train_pairs_per_epoch=6, batch_size=2)
    m.setup("fit")
    m.setup("test")
    return m


def test_datamodule_batches_follow_contract(dm):
    assert dm.name == "synthetic_brain"
    assert dm.label_ids == list(range(1, 13))
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
        batch = next(iter(loader))
        validate_batch(batch)
        assert batch["fixed"].shape == (2, 1, SIZE, SIZE, SIZE)
        assert batch["fixed_landmarks"].shape == (2, 24, 3)
        assert not torch.isnan(batch["fixed_landmarks"]).any()
        for c, f, m in zip(batch["case_id"], batch["fixed_id"], batch["moving_id"]):
            assert c == f"{f}_{m}" and f != m
        np.testing.assert_allclose(batch["fixed_affine"][0].numpy(), dm.affine)


def test_datamodule_splits_and_pairs(dm):
    train, val, test = (set(dm.split_indices(s)) for s in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    assert len(dm.test_dataset) == 3 * 2 and len(dm.val_dataset) == 2
    ids = [dm.test_dataset[i]["case_id"] for i in range(len(dm.test_dataset))]
    assert ids[0] == "s0006_s0007" and len(set(ids)) == 6
    assert ids == [dm.test_dataset[i]["case_id"] for i in range(len(dm.test_dataset))]
    test_subjects = {f"s{i:04d}" for i in test}
    assert all(c.split("_")[0] in test_subjects and c.split("_")[1] in test_subjects for c in ids)
    assert dm.case_ids("test") == ids and dm.test_dataset.case_ids == ids
    # cases finished in an earlier run are left out of the test loader (resume)
    dm.skip_cases = {ids[0]}
    try:
        seen = [c for b in dm.test_dataloader() for c in b["case_id"]]
    finally:
        dm.skip_cases = set()
    assert seen == ids[1:]
    # a seeded subset: distinct, reproducible
    sub = SyntheticBrainDataModule(size=SIZE, n_train=2, n_val=2, n_test=3, seed=5, test_pairs=4)
    assert len(sub.eval_pairs("test")) == 4 == len(set(sub.eval_pairs("test")))
    assert sub.eval_pairs("test") == SyntheticBrainDataModule(size=SIZE, n_train=2, n_val=2, n_test=3, seed=5, test_pairs=4).eval_pairs("test")
    with pytest.raises(ValueError, match="test_pairs"):
        SyntheticBrainDataModule(size=SIZE, n_test=3, test_pairs=7).eval_pairs("test")
    # the true displacement is reachable by ids
    u = dm.true_displacement("s0006", "s0007")
    assert u.shape == (1, 3, SIZE, SIZE, SIZE)


def test_train_pairs_change_per_epoch_and_are_reproducible(dm):
    def epoch_ids(sampler: EpochPairSampler, epoch: int) -> list[int]:
        sampler.set_epoch(epoch)
        return list(iter(sampler))

    s1 = EpochPairSampler(len(dm.train_dataset), 50, seed=5)
    s2 = EpochPairSampler(len(dm.train_dataset), 50, seed=5)
    assert epoch_ids(s1, 0) == epoch_ids(s2, 0)
    assert epoch_ids(s1, 0) != epoch_ids(s1, 1)
    assert epoch_ids(s1, 0) != epoch_ids(EpochPairSampler(len(dm.train_dataset), 50, seed=6), 0)
    # without set_epoch, successive passes differ
    plain = EpochPairSampler(len(dm.train_dataset), 50, seed=5)
    assert list(iter(plain)) != list(iter(plain))
    train_ids = {f"s{i:04d}" for i in dm.split_indices("train")}
    batch = next(iter(dm.train_dataloader()))
    assert set(batch["fixed_id"]) | set(batch["moving_id"]) <= train_ids


class _Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: dict[int, list[str]] = {}

    def training_step(self, batch, batch_idx):
        validate_batch(batch)
        self.seen.setdefault(self.current_epoch, []).extend(batch["case_id"])
        return (self.w - batch["fixed"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_sees_new_pairs_each_epoch():
    dm = SyntheticBrainDataModule(size=16, n_train=5, n_val=2, n_test=2, seed=1, train_pairs_per_epoch=8, n_labels=4)
    model = _Recorder()
    trainer = L.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(model, datamodule=dm)
    assert len(model.seen[0]) == len(model.seen[1]) == 8
    assert model.seen[0] != model.seen[1]
