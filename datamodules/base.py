"""What every registration data module shares: the declared protocol, exact evaluation
splits under DDP, resume.

* :class:`RegistrationData` (a ``typing.Protocol``) lists exactly what the runner, the
  systems' test loop, the results writer and ``regbench data check`` use of a data module:
  ``name``, ``task`` (``"deformable"`` or ``"pose"``: which metric family scores it, see
  :mod:`benchmark.core.registry`), ``initial_system``, ``export_fields``, ``skip_cases``,
  ``label_ids``, ``case_ids(stage)``, ``field_record(batch, b)``, ``check_inputs()`` and
  ``check()`` (the data check: a list of :class:`CheckLine`). :class:`RegistrationDataModule` implements it with
  defaults; every data module of the suite derives from it (the pair modules through
  :class:`PairDataModule`, the 2D/3D spine module directly).

* Test and validation cases are split over ranks **without padding** (Lightning's default
  ``DistributedSampler`` repeats cases to even out the ranks, which would count them
  twice): rank ``r`` of ``N`` takes cases ``r, r+N, r+2N, …``.
* ``skip_cases`` (set by the runner from the records already written) removes finished
  cases from the test loader, so a resumed run computes only what is missing.
* Training pairs are drawn by :class:`RandomPairSampler`: ``num_samples`` indices per epoch
  from ``(seed, epoch)``; under DDP every rank takes its own disjoint share of that draw.
* Loader options shared by all modules: ``num_workers``, ``pin_memory`` (used only when CUDA
  is available), ``persistent_workers`` (only with workers); see :meth:`PairDataModule.loader_kwargs`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Iterator, Mapping, Protocol, runtime_checkable

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from benchmark.core.io import DataError
from datamodules.batch import collate_pairs

__all__ = [
    "CheckLine",
    "RegistrationData",
    "RegistrationDataModule",
    "protocol_problems",
    "UnpaddedDistributedSampler",
    "RandomPairSampler",
    "PairDataModule",
    "dist_rank_world",
]


@dataclasses.dataclass(frozen=True)
class CheckLine:
    """One line of a data check: a ``summary`` entry (``text`` is the key, ``value`` a
    JSON-able value), a ``note`` (reported, not a problem) or a ``problem`` (the check fails);
    notes and problems name their file first."""

    kind: str
    text: str
    value: Any = None

    @classmethod
    def summary(cls, key: str, value: Any) -> "CheckLine":
        return cls("summary", key, value)

    @classmethod
    def note(cls, text: str) -> "CheckLine":
        return cls("note", text)

    @classmethod
    def problem(cls, text: str) -> "CheckLine":
        return cls("problem", text)


@runtime_checkable
class RegistrationData(Protocol):
    """What the runner, the test loop and ``regbench data check`` need of a data module
    (besides Lightning's loaders); :class:`RegistrationDataModule` gives the defaults."""

    #: dataset name (folder of its results).
    name: str
    #: metric family that scores it: ``"deformable"`` or ``"pose"`` (written to ``run.json``).
    task: str
    #: class path of the ``initial`` row's system; ``None``: no registration (zero field).
    initial_system: str | None
    #: the results writer exports every test displacement field (Learn2Reg layout).
    export_fields: bool
    #: case ids already finished (set by the runner on resume), left out of the test loader.
    skip_cases: set[str]

    @property
    def label_ids(self) -> list[int]:
        """The label ids scored by Dice / HD95 (``[]`` when the data has none to score)."""
        ...

    def case_ids(self, stage: str = "test") -> list[str]:
        """The fixed, ordered case ids of ``stage`` (``"val"`` or ``"test"``)."""
        ...

    def field_record(self, batch: Mapping[str, Any], b: int) -> dict[str, Any] | None:
        """The JSON record written beside exported field ``b`` of a batch (``None``: none)."""
        ...

    def check_inputs(self) -> None:
        """Raise :class:`benchmark.core.io.DataError` when the inputs are missing or unreadable
        (cheap: reads no volume; the runner calls it when it loads a config)."""
        ...

    def check(self, resample_labels: bool = False, headers_only: bool = False) -> list[CheckLine]:
        """Read the data the way the module will and report on it (``regbench data check``)."""
        ...


#: The members of :class:`RegistrationData` (for :func:`protocol_problems`).
PROTOCOL_MEMBERS = ("name", "task", "initial_system", "export_fields", "skip_cases", "label_ids", "case_ids",
                    "field_record", "check_inputs", "check")


def protocol_problems(dm: Any) -> list[str]:
    """What keeps ``dm`` from implementing :class:`RegistrationData` (empty: nothing)."""
    from benchmark.core.registry import TASKS

    cls = type(dm)
    missing = [m for m in PROTOCOL_MEMBERS if not any(m in vars(k) for k in cls.__mro__) and m not in vars(dm)]
    out = [f"{cls.__name__} lacks {', '.join(missing)} (see datamodules.base.RegistrationData; "
           "derive from datamodules.base.RegistrationDataModule for the defaults)"] if missing else []
    task = getattr(dm, "task", None) if "task" not in missing else None
    if "task" not in missing and task not in TASKS:
        out.append(f"{cls.__name__}.task is {task!r}; declare one of {', '.join(TASKS)}")
    return out


class RegistrationDataModule(L.LightningDataModule):
    """Base of every data module: :class:`RegistrationData` with its defaults (a deformable
    dataset, no-registration ``initial`` row, no field export, no field record, the data
    check of :meth:`check_inputs`)."""

    name: str = "data"
    task: ClassVar[str] = "deformable"
    initial_system: str | None = None
    export_fields: bool = False

    def __init__(self) -> None:
        super().__init__()
        #: case ids already finished (set by the runner on resume); left out of the test loader.
        self.skip_cases: set[str] = set()

    @property
    def label_ids(self) -> list[int]:
        return []

    def case_ids(self, stage: str = "test") -> list[str]:
        raise NotImplementedError(f"{type(self).__name__} must define case_ids(stage)")

    def check_inputs(self) -> None:
        """Check that the inputs exist and are readable, without loading them (override)."""

    def field_record(self, batch: Mapping[str, Any], b: int) -> dict[str, Any] | None:
        return None

    def check(self, resample_labels: bool = False, headers_only: bool = False) -> list[CheckLine]:
        """The default data check: :meth:`check_inputs` (a :class:`DataError` is the problem)
        and the task; data modules that read files override it with a full report."""
        lines = [CheckLine.summary("task", self.task)]
        try:
            self.check_inputs()
        except DataError as exc:
            lines.append(CheckLine.problem(str(exc)))
        return lines


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


def dist_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class RandomPairSampler(DistributedSampler):
    """Random training indices, ``num_samples`` per epoch over all ranks, seeded by ``(seed, epoch)``.

    Every rank draws the same ``ceil(num_samples / world) * world`` indices (uniform, with
    replacement) and keeps ``indices[rank::world]``, so ranks see disjoint shares of one draw
    and all have the same length. Lightning calls :meth:`set_epoch`; without it, each new
    iteration advances the epoch by one. A ``DistributedSampler`` subclass, so Lightning keeps
    it under DDP instead of wrapping it.

    Args:
        num_items: size of the indexed dataset (e.g. the number of ordered pairs).
        num_samples: indices per epoch over all ranks.
        seed: base seed.
        num_replicas, rank: DDP world size and rank (default: from the process group, else 1, 0).
    """

    def __init__(self, num_items: int, num_samples: int, seed: int = 0,
                 num_replicas: int | None = None, rank: int | None = None) -> None:
        if int(num_items) < 1 or int(num_samples) < 1:
            raise ValueError(f"need num_items >= 1 and num_samples >= 1; got {num_items}, {num_samples}")
        r, w = dist_rank_world()
        world = int(num_replicas) if num_replicas is not None else w
        rk = int(rank) if rank is not None else r
        self.dataset = None  # DistributedSampler attribute; indices come from num_items
        self.num_items = int(num_items)
        self.total = int(num_samples)
        self.num_replicas, self.rank = world, rk
        self.seed = int(seed)
        self.epoch = 0
        self._explicit = False
        self.num_samples = -(-self.total // world)
        self.total_size = self.num_samples * world
        self.shuffle = True
        self.drop_last = False

    def set_epoch(self, epoch: int) -> None:
        """Fix the epoch whose indices the next iteration yields."""
        self.epoch = int(epoch)
        self._explicit = True

    def indices(self, epoch: int) -> list[int]:
        """This rank's indices of ``epoch`` (deterministic)."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0x9A1, int(epoch)]))
        full = rng.integers(0, self.num_items, size=self.total_size)
        return full[self.rank :: self.num_replicas].tolist()

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        if not self._explicit:
            self.epoch += 1
        return iter(self.indices(epoch))

    def __len__(self) -> int:
        return self.num_samples


class PairDataModule(RegistrationDataModule):
    """Base for data modules of image pairs.

    Subclasses implement ``pair_dataset(stage)`` returning a map-style dataset of samples
    (see :mod:`datamodules.batch`) with a ``case_ids`` list, and ``label_ids``. They may
    override ``train_dataloader``; validation and test loaders come from here.
    """

    name: str = "pairs"
    batch_size: int = 1
    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = True
    #: collate function of every loader (the real-data modules use a copy-free one).
    collate_fn: Any = staticmethod(collate_pairs)

    # -- to implement
    def pair_dataset(self, stage: str) -> Dataset:
        raise NotImplementedError(f"{type(self).__name__} must define pair_dataset(stage) returning a dataset with case_ids")

    @property
    def label_ids(self) -> list[int]:
        raise NotImplementedError(f"{type(self).__name__} must define label_ids (the labels scored by Dice)")

    # -- shared
    def case_ids(self, stage: str = "test") -> list[str]:
        """The fixed, ordered list of case ids of ``stage`` ("val" or "test")."""
        if not getattr(self, "_setup_done", False):
            self.setup(stage)
        return list(self.pair_dataset(stage).case_ids)

    def loader_kwargs(self) -> dict[str, Any]:
        """DataLoader options shared by every loader of the module: workers, pinned memory
        (only when CUDA is available), persistent workers (only with workers), collate."""
        workers = int(self.num_workers)
        kw: dict[str, Any] = {
            "batch_size": self.batch_size,
            "num_workers": workers,
            "collate_fn": self.collate_fn,
            "pin_memory": bool(self.pin_memory) and torch.cuda.is_available(),
            "persistent_workers": workers > 0 and bool(self.persistent_workers),
        }
        if workers > 0:
            kw["prefetch_factor"] = 2
        return kw

    def _eval_loader(self, stage: str, skip: set[str]) -> DataLoader:
        ds = self.pair_dataset(stage)
        keep = [i for i, c in enumerate(ds.case_ids) if c not in skip]
        sub = Subset(ds, keep) if len(keep) != len(ds) else ds
        sampler = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            sampler = UnpaddedDistributedSampler(sub)
        return DataLoader(sub, shuffle=False, sampler=sampler, **self.loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val", set())

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test", self.skip_cases)
