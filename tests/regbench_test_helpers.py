"""Small systems and data modules used by the runner tests (importable by class_path).

They exercise the runner's contract (kill and resume, divergence, config checks) with
the real base classes and the real synthetic data, at a size that runs in seconds.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, ClassVar

import torch

from datamodules.synthetic_brain import SyntheticBrainDataModule
from systems.base import RegistrationSystem

_calls = {"n": 0}


class KillAfter(RegistrationSystem):
    """Zero-displacement 'method' that SIGKILLs its own process after ``$REGBENCH_KILL_AFTER`` cases.

    A hard kill (no cleanup, no exception handlers) in the middle of a grid.
    """

    learns: ClassVar[bool] = False

    def __init__(self, shift: float = 0.0) -> None:
        super().__init__(warmup_calls=0, compute_hd95=False)
        self.shift = float(shift)

    def register(self, batch: dict[str, Any]) -> torch.Tensor:
        limit = int(os.environ.get("REGBENCH_KILL_AFTER", "0"))
        if limit and _calls["n"] >= limit:
            os.kill(os.getpid(), signal.SIGKILL)
        _calls["n"] += 1
        f = batch["fixed"]
        return torch.full((f.shape[0], 3, *f.shape[2:]), self.shift, dtype=f.dtype, device=f.device)


class DivergingNet(RegistrationSystem):
    """A learned system whose loss turns NaN on its second step."""

    learns: ClassVar[bool] = True

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__(lr=lr, compute_hd95=False)
        self.w = torch.nn.Parameter(torch.zeros(1))

    def register(self, batch: dict[str, Any]) -> torch.Tensor:
        f = batch["fixed"]
        return torch.zeros(f.shape[0], 3, *f.shape[2:]) + self.w * 0

    def training_loss(self, batch):
        loss = (self.w - 1.0) ** 2
        if self.global_step >= 1:
            loss = loss * float("nan")
        return loss, {"sim": loss.detach()}


class FolderData(SyntheticBrainDataModule):
    """Synthetic data that insists on a folder existing, like the real-data modules do."""

    def __init__(self, root: str = "missing", size: int = 16) -> None:
        super().__init__(size=size, n_train=2, n_val=2, n_test=2)
        self.root = root

    def check_inputs(self) -> None:
        from benchmark.core.io import DataError

        if not Path(self.root).is_dir():
            raise DataError(self.root, "dataset folder not found", "set datasets.<name>.init_args.root")


class _NoLabels(torch.utils.data.Dataset):
    """A pair dataset with the label maps removed (as for data whose labels are hidden)."""

    def __init__(self, base) -> None:
        self.base = base
        self.case_ids = list(base.case_ids)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = dict(self.base[i])
        s.pop("fixed_seg", None)
        s.pop("moving_seg", None)
        return s


class UnlabelledData(SyntheticBrainDataModule):
    """Synthetic pairs without label maps, exporting Learn2Reg fields (like LUMIR's test set)."""

    export_fields = True

    def __init__(self, size: int = 16) -> None:
        super().__init__(size=size, n_train=2, n_val=2, n_test=2, seed=5)

    def pair_dataset(self, stage: str):
        return _NoLabels(super().pair_dataset(stage))
