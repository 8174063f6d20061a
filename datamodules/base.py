"""What every registration data module shares: exact evaluation splits under DDP, resume.

* Test and validation cases are split over ranks **without padding** (Lightning's default
  ``DistributedSampler`` repeats cases to even out the ranks, which would count them
  twice): rank ``r`` of ``N`` takes cases ``r, r+N, r+2N, …``.
* ``skip_cases`` (set by the runner from the records already written) removes finished
  cases from the test loader, so a resumed run computes only what is missing.
"""

from __future__ import annotations

from typing import Iterator

import lightning as L
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from datamodules.batch import collate_pairs

__all__ = ["UnpaddedDistributedSampler", "PairDataModule"]


class UnpaddedDistributedSampler(DistributedSampler):
    """Every index exactly once over all ranks, in order, no padding, no shuffling.

    Subclasses ``DistributedSampler`` so Lightning keeps it instead of injecting its own.
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.indices = list(range(self.rank, len(dataset), self.num_replicas))
        self.num_samples = len(self.indices)
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class PairDataModule(L.LightningDataModule):
    """Base for data modules of image pairs.

    Subclasses implement ``pair_dataset(stage)`` returning a map-style dataset of samples
    (see :mod:`datamodules.batch`) with a ``case_ids`` list, and ``label_ids``. They may
    override ``train_dataloader``; validation and test loaders come from here.
    """

    name: str = "pairs"
    batch_size: int = 1
    num_workers: int = 0

    def __init__(self) -> None:
        super().__init__()
        #: case ids already finished (set by the runner on resume); left out of the test loader.
        self.skip_cases: set[str] = set()

    # -- to implement
    def pair_dataset(self, stage: str) -> Dataset:
        raise NotImplementedError(f"{type(self).__name__} must define pair_dataset(stage) returning a dataset with case_ids")

    @property
    def label_ids(self) -> list[int]:
        raise NotImplementedError(f"{type(self).__name__} must define label_ids (the labels scored by Dice)")

    # -- shared
    def check_inputs(self) -> None:
        """Check that the inputs exist and are readable, without loading them (override)."""

    def case_ids(self, stage: str = "test") -> list[str]:
        """The fixed, ordered list of case ids of ``stage`` ("val" or "test")."""
        if not getattr(self, "_setup_done", False):
            self.setup(stage)
        return list(self.pair_dataset(stage).case_ids)

    def _eval_loader(self, stage: str, skip: set[str]) -> DataLoader:
        ds = self.pair_dataset(stage)
        keep = [i for i, c in enumerate(ds.case_ids) if c not in skip]
        sub = Subset(ds, keep) if len(keep) != len(ds) else ds
        sampler = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            sampler = UnpaddedDistributedSampler(sub)
        return DataLoader(
            sub,
            batch_size=self.batch_size,
            shuffle=False,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_pairs,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val", set())

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test", self.skip_cases)
