"""LightningDataModule of the built-in synthetic brain data (the default dataset everywhere).

Subjects come from :class:`datamodules.synthetic.SyntheticBrainGenerator` (one template per
seed, subjects = template warped by random smooth diffeomorphisms, exact landmarks). The
subject indices are split into disjoint sets: ``0 .. n_train-1`` train, the next ``n_val``
validation, the next ``n_test`` test; ids are ``"s0003"``. Batches follow
:mod:`datamodules.batch` (``case_id = "{fixed_id}_{moving_id}"``).

* train: random ordered pairs of training subjects, ``train_pairs_per_epoch`` per epoch,
  drawn by :class:`EpochPairSampler` from ``(seed, epoch)`` (Lightning calls its
  ``set_epoch``), so they differ between epochs and are reproducible.
* val / test / predict: a fixed list of ordered pairs — all ordered pairs of the split's
  subjects (``val_pairs`` / ``test_pairs`` = ``None``), or that many distinct pairs drawn
  with the seed. The datasets are plain map-style datasets with deterministic ``len``,
  indexing and ``case_ids``; their loaders come from
  :class:`datamodules.base.PairDataModule` (no shuffling, no padding under DDP, finished
  cases skipped on resume).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.base import PairDataModule
from datamodules.batch import collate_pairs
from datamodules.synthetic import SyntheticBrainGenerator, as_size

__all__ = ["SyntheticBrainDataModule", "PairDataset", "EpochPairSampler", "all_ordered_pairs", "SubjectArrays"]


@dataclass
class SubjectArrays:
    """In-memory subject: ``image (1, X, Y, Z)`` float32, ``seg (1, X, Y, Z)`` int32,
    ``affine (4, 4)`` float64, ``landmarks (N, 3)`` float32 voxel indices, ``subject_id``."""

    subject_id: str
    image: torch.Tensor
    seg: torch.Tensor
    affine: torch.Tensor
    landmarks: torch.Tensor


def all_ordered_pairs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """All ordered pairs ``(fixed, moving)`` of distinct indices, in lexicographic order."""
    return [(a, b) for a in indices for b in indices if a != b]


class PairDataset(Dataset):
    """Map-style dataset of ``(fixed, moving)`` subject pairs; items are contract samples.

    Args:
        subjects: subject index → :class:`SubjectArrays`.
        pairs: list of ``(fixed_index, moving_index)``.
    """

    def __init__(self, subjects: dict[int, SubjectArrays], pairs: Sequence[tuple[int, int]]) -> None:
        missing = {i for p in pairs for i in p} - set(subjects)
        if missing:
            raise ValueError(f"pairs refer to subjects that were not generated: {sorted(missing)}")
        self.subjects = subjects
        self.pairs = [(int(a), int(b)) for a, b in pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def case_ids(self) -> list[str]:
        """``"{fixed_id}_{moving_id}"`` of every pair, in dataset order."""
        return [f"{self.subjects[a].subject_id}_{self.subjects[b].subject_id}" for a, b in self.pairs]

    def __getitem__(self, idx: int) -> dict[str, Any]:
        a, b = self.pairs[idx]
        f, m = self.subjects[a], self.subjects[b]
        return {
            "fixed": f.image,
            "moving": m.image,
            "fixed_seg": f.seg.long(),
            "moving_seg": m.seg.long(),
            "fixed_affine": f.affine,
            "moving_affine": m.affine,
            "fixed_landmarks": f.landmarks,
            "moving_landmarks": m.landmarks,
            "case_id": f"{f.subject_id}_{m.subject_id}",
            "fixed_id": f.subject_id,
            "moving_id": m.subject_id,
        }


class EpochPairSampler(Sampler[int]):
    """Draws ``num_samples`` dataset indices uniformly with replacement, seeded by ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` at the start of every epoch. When nobody does, every
    new iteration advances the epoch by one, so a plain loop over the dataloader also sees
    fresh pairs each pass.

    Args:
        num_items: size of the indexed dataset.
        num_samples: indices per epoch.
        seed: base seed.
    """

    def __init__(self, num_items: int, num_samples: int, seed: int = 0) -> None:
        if num_items < 1 or num_samples < 1:
            raise ValueError(f"need num_items >= 1 and num_samples >= 1; got {num_items}, {num_samples}")
        self.num_items = int(num_items)
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0
        self._explicit = False

    def set_epoch(self, epoch: int) -> None:
        """Fix the epoch whose indices the next iteration yields."""
        self.epoch = int(epoch)
        self._explicit = True

    def indices(self, epoch: int) -> list[int]:
        """The indices of ``epoch`` (deterministic)."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0x7A1, int(epoch)]))
        return rng.integers(0, self.num_items, size=self.num_samples).tolist()

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        if not self._explicit:
            self.epoch += 1
        return iter(self.indices(epoch))

    def __len__(self) -> int:
        return self.num_samples


class SyntheticBrainDataModule(PairDataModule):
    """Synthetic brain pairs with labels, exact landmarks and a known true deformation.

    Args:
        size: grid shape, one int or three ints (voxels).
        n_train, n_val, n_test: number of subjects per split (disjoint).
        seed: master seed (template, subjects, pair lists).
        spacing: voxel size in mm (diagonal RAS affine).
        deform_amplitude: RMS velocity length in voxels; ``None`` = ``2.25 · min(size) / 64``,
            initial Dice ≈ 0.6–0.75.
        n_labels: number of structures (≥ 4).
        batch_size: pairs per batch.
        num_workers: dataloader workers.
        train_pairs_per_epoch: random training pairs per epoch.
        val_pairs, test_pairs: ``None`` = all ordered pairs of the split's subjects, else
            that many distinct ordered pairs drawn with the seed.
        landmarks_per_label: landmarks per structure.
        label_values: optional sparse output id per structure (``n_labels`` distinct ints > 0).
    """

    name = "synthetic_brain"

    def __init__(
        self,
        size: int | tuple[int, int, int] = 64,
        n_train: int = 20,
        n_val: int = 4,
        n_test: int = 6,
        seed: int = 0,
        spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
        deform_amplitude: float | None = None,
        n_labels: int = 12,
        batch_size: int = 1,
        num_workers: int = 0,
        train_pairs_per_epoch: int = 100,
        test_pairs: int | None = None,
        val_pairs: int | None = None,
        landmarks_per_label: int = 2,
        label_values: list[int] | None = None,
    ) -> None:
        super().__init__()
        self._set_splits(n_train, n_val, n_test, seed, batch_size, num_workers, train_pairs_per_epoch,
                         test_pairs, val_pairs)
        self.size = as_size(size)
        self.generator = SyntheticBrainGenerator(
            size=self.size,
            n_labels=n_labels,
            seed=self.seed,
            spacing=spacing,
            deform_amplitude=deform_amplitude,
            landmarks_per_label=landmarks_per_label,
            label_values=label_values,
        )
        self.save_hyperparameters()
        self._subjects: dict[int, SubjectArrays] = {}
        self.train_dataset: PairDataset | None = None
        self.val_dataset: PairDataset | None = None
        self.test_dataset: PairDataset | None = None
        self._train_sampler: EpochPairSampler | None = None

    def _set_splits(self, n_train: int, n_val: int, n_test: int, seed: int, batch_size: int, num_workers: int,
                    train_pairs_per_epoch: int, test_pairs: int | None, val_pairs: int | None) -> None:
        """Check and keep the split sizes and loader settings (shared by the subclasses)."""
        for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            if int(n) < 2:
                raise ValueError(f"{name} must be >= 2 (pairs need two subjects); got {n}")
        if int(batch_size) < 1 or int(num_workers) < 0 or int(train_pairs_per_epoch) < 1:
            raise ValueError("batch_size >= 1, num_workers >= 0 and train_pairs_per_epoch >= 1 are required")
        self.n_train, self.n_val, self.n_test = int(n_train), int(n_val), int(n_test)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.train_pairs_per_epoch = int(train_pairs_per_epoch)
        self.test_pairs = test_pairs
        self.val_pairs = val_pairs

    # ------------------------------------------------------------------ subjects and splits
    @property
    def label_ids(self) -> list[int]:
        """Label ids scored by Dice (background 0 excluded)."""
        return list(self.generator.label_ids)

    @property
    def affine(self) -> np.ndarray:
        """The shared ``(4, 4)`` voxel→world affine (RAS, mm)."""
        return self.generator.affine.copy()

    def split_indices(self, split: str) -> list[int]:
        """Subject indices of ``"train"``, ``"val"`` or ``"test"``."""
        if split == "train":
            return list(range(0, self.n_train))
        if split == "val":
            return list(range(self.n_train, self.n_train + self.n_val))
        if split == "test":
            return list(range(self.n_train + self.n_val, self.n_train + self.n_val + self.n_test))
        raise ValueError(f"unknown split {split!r}; use 'train', 'val' or 'test'")

    @staticmethod
    def subject_id(index: int) -> str:
        """``"s{index:04d}"``."""
        return f"s{int(index):04d}"

    def _ensure_subjects(self, indices: Sequence[int]) -> None:
        for i in indices:
            if i in self._subjects:
                continue
            s = self.generator.subject(i)
            self._subjects[i] = SubjectArrays(
                subject_id=s.subject_id,
                image=torch.from_numpy(s.image).unsqueeze(0),
                seg=torch.from_numpy(s.seg.astype(np.int32)).unsqueeze(0),
                affine=torch.from_numpy(s.affine),
                landmarks=torch.from_numpy(s.landmarks.astype(np.float32)),
            )

    def eval_pairs(self, split: str) -> list[tuple[int, int]]:
        """The fixed, ordered ``(fixed, moving)`` pair list of ``"val"`` or ``"test"``."""
        if split not in ("val", "test"):
            raise ValueError(f"eval_pairs is for 'val' or 'test', got {split!r}")
        pairs = all_ordered_pairs(self.split_indices(split))
        count = self.val_pairs if split == "val" else self.test_pairs
        if count is None:
            return pairs
        count = int(count)
        if not 1 <= count <= len(pairs):
            raise ValueError(
                f"{split}_pairs={count} but the {split} split has {len(pairs)} ordered pairs; use 1..{len(pairs)} or None"
            )
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0xE7A, 1 if split == "val" else 2]))
        chosen = sorted(rng.choice(len(pairs), size=count, replace=False).tolist())
        return [pairs[i] for i in chosen]

    def setup(self, stage: str | None = None) -> None:
        """Generate (once, cached) the subjects the stage needs and build its datasets.

        ``fit`` → train + val, ``validate`` / ``val`` → val, ``test`` / ``predict`` → test,
        ``train`` → train, ``None`` → all.
        """
        if stage in ("fit", "train", None) and self.train_dataset is None:
            idx = self.split_indices("train")
            self._ensure_subjects(idx)
            self.train_dataset = PairDataset(self._subjects, all_ordered_pairs(idx))
        if stage in ("fit", "validate", "val", None) and self.val_dataset is None:
            self._ensure_subjects(self.split_indices("val"))
            self.val_dataset = self._eval_dataset(self.eval_pairs("val"))
        if stage in ("test", "predict", None) and self.test_dataset is None:
            self._ensure_subjects(self.split_indices("test"))
            self.test_dataset = self._eval_dataset(self.eval_pairs("test"))
        self._setup_done = True

    def _eval_dataset(self, pairs: list[tuple[int, int]]) -> PairDataset:
        """The validation / test dataset of ``pairs`` (subclasses add keys to its samples)."""
        return PairDataset(self._subjects, pairs)

    def pair_dataset(self, stage: str) -> PairDataset:
        """The pair dataset of ``stage`` (``"train"``/``"fit"``, ``"val"``/``"validate"``,
        ``"test"``/``"predict"``), generating its subjects on first use."""
        key = {"fit": "train", "train": "train", "val": "val", "validate": "val", "test": "test", "predict": "test"}
        if stage not in key:
            raise ValueError(f"unknown stage {stage!r}; use 'train', 'val' or 'test'")
        split = key[stage]
        ds = {"train": self.train_dataset, "val": self.val_dataset, "test": self.test_dataset}[split]
        if ds is None:
            self.setup(split)
            ds = {"train": self.train_dataset, "val": self.val_dataset, "test": self.test_dataset}[split]
        assert ds is not None
        return ds

    # ------------------------------------------------------------------ dataloaders
    def train_dataloader(self) -> DataLoader:
        """Random training pairs, ``train_pairs_per_epoch`` per epoch (seeded by seed + epoch)."""
        if self.train_dataset is None:
            raise RuntimeError("call setup('fit') before asking for the training dataloader")
        if self._train_sampler is None:
            self._train_sampler = EpochPairSampler(len(self.train_dataset), self.train_pairs_per_epoch, self.seed)
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=self._train_sampler,
            num_workers=self.num_workers,
            collate_fn=collate_pairs,
            persistent_workers=self.num_workers > 0,
        )

    def predict_dataloader(self) -> DataLoader:
        """Same pairs as the test dataloader (nothing skipped)."""
        return self._eval_loader("test", set())

    # ------------------------------------------------------------------ ground truth
    def true_displacement(self, fixed_id: str | int, moving_id: str | int) -> torch.Tensor:
        """Ground-truth displacement ``(1, 3, X, Y, Z)`` float32 (voxels of the fixed grid) of a pair.

        Args:
            fixed_id, moving_id: subject ids (``"s0003"``) or indices.
        """
        return self.generator.true_displacement(_index(fixed_id), _index(moving_id))


def _index(subject: str | int) -> int:
    if isinstance(subject, (int, np.integer)):
        return int(subject)
    s = str(subject)
    if len(s) < 2 or s[0] != "s" or not s[1:].isdigit():
        raise ValueError(f"not a synthetic subject id: {subject!r} (expected e.g. 's0003')")
    return int(s[1:])
