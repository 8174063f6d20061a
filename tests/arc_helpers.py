"""A registration 'method' with a regularisation weight whose effect is known exactly (for the ARC tests)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from systems.base import RegistrationSystem


class SineWarp(RegistrationSystem):
    """Returns ``u_0(x) = (0.5 / smooth) · sin(2π x_0 / N_0)`` (other components 0): less
    smoothing, a larger and less regular field. Deterministic, no training."""

    learns: ClassVar[bool] = False
    regularisation: ClassVar[tuple[str, float, float]] = ("smooth", 0.1, 1.0)

    def __init__(self, smooth: float = 0.3) -> None:
        super().__init__(warmup_calls=0, compute_hd95=False)
        self.smooth = float(smooth)

    def register(self, batch: dict[str, Any]) -> torch.Tensor:
        f = batch["fixed"]
        n = f.shape[2]
        x = torch.arange(n, dtype=f.dtype, device=f.device)
        wave = (0.5 / self.smooth) * torch.sin(2 * math.pi * x / n)
        u = torch.zeros(f.shape[0], 3, *f.shape[2:], dtype=f.dtype, device=f.device)
        u[:, 0] = wave.view(1, n, 1, 1)
        return u


class NoWeight(RegistrationSystem):
    """A method without a declared regularisation weight."""

    learns: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__(warmup_calls=0, compute_hd95=False)

    def register(self, batch: dict[str, Any]) -> torch.Tensor:
        f = batch["fixed"]
        return torch.zeros(f.shape[0], 3, *f.shape[2:], dtype=f.dtype, device=f.device)
