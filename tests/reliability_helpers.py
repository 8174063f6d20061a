"""Systems used by tests/test_reliability.py (importable by class_path from a `regbench run` subprocess)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any, ClassVar

import torch

from systems.base import RegistrationSystem
from systems.voxelmorph import VoxelMorph


class KillAtStep(VoxelMorph):
    """VoxelMorph that SIGKILLs its own process when training step ``$REGBENCH_KILL_AT_STEP`` starts.

    Without the variable it is plain VoxelMorph, so a killed-and-resumed run and an
    uninterrupted one share one config (and config hash).
    """

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        at = int(os.environ.get("REGBENCH_KILL_AT_STEP", "0") or 0)
        if at and int(self.global_step) == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().training_step(batch, batch_idx)


class SlowZero(RegistrationSystem):
    """A zero field that takes ``seconds`` per case (and, with ``gate``, waits until that file
    exists) and announces each case on stderr (``case-start``), so a test can act while a
    case is in flight."""

    learns: ClassVar[bool] = False

    def __init__(self, seconds: float = 0.5, gate: str | None = None) -> None:
        super().__init__(warmup_calls=0, compute_hd95=False)
        self.seconds = float(seconds)
        self.gate = gate

    def register(self, batch: dict[str, Any]) -> torch.Tensor:
        import sys

        print("case-start", file=sys.stderr, flush=True)
        time.sleep(self.seconds)
        while self.gate and not os.path.exists(self.gate):  # hold the case until the test opens the gate
            time.sleep(0.05)
        f = batch["fixed"]
        return torch.zeros(f.shape[0], 3, *f.shape[2:], dtype=f.dtype, device=f.device)


class SlowLearner(VoxelMorph):
    """VoxelMorph whose steps take at least ``step_seconds`` (for signals during a fit)."""

    def __init__(self, step_seconds: float = 0.2, **kw: Any) -> None:
        super().__init__(**kw)
        self.step_seconds = float(step_seconds)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        time.sleep(self.step_seconds)
        return super().training_step(batch, batch_idx)


class LearnedShift(RegistrationSystem):
    """A learned system reduced to one parameter: a constant shift (voxels) along every axis,
    trained towards ``shift`` (a quadratic loss). Fast enough to run several seeds in a test."""

    learns: ClassVar[bool] = True

    def __init__(self, shift: float = 0.5, lr: float = 0.1) -> None:
        super().__init__(lr=lr, compute_hd95=False, warmup_calls=0)
        self.target = float(shift)
        self.w = torch.nn.Parameter(torch.full((1,), float(shift)))

    def register(self, batch: dict[str, Any]) -> torch.Tensor:
        f = batch["fixed"]
        return self.w.detach().to(f.dtype) * torch.ones(f.shape[0], 3, *f.shape[2:], dtype=f.dtype, device=f.device)

    def training_loss(self, batch: dict[str, Any]):
        loss = (self.w - self.target).pow(2).sum()
        return loss, {"sim": loss.detach()}
