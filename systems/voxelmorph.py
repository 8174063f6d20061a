"""VoxelMorph baseline (Balakrishnan et al., TMI 2019; Dalca et al., MICCAI 2018).

Written for this suite from the papers' description; the defaults follow the published
configuration: U-Net encoder 16-32-32-32, decoder 32-32-32-32-32-16-16, a stationary
velocity predicted at half resolution and integrated by scaling and squaring in 7 steps,
loss ``-local NCC (9³) + lambda_ · diffusion(velocity)``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmark.losses import LocalNCC, diffusion
from benchmark.spatial import integrate_velocity, resize_field, warp
from systems.base import RegistrationSystem

__all__ = ["VxmUNet", "VoxelMorphNet", "VoxelMorph"]


class _ConvAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, ndim: int = 3) -> None:
        conv = nn.Conv3d if ndim == 3 else nn.Conv2d
        super().__init__(conv(cin, cout, 3, padding=1), nn.LeakyReLU(0.2, inplace=True))


class VxmUNet(nn.Module):
    """VoxelMorph's U-Net.

    Encoder: at each level a 3×3(×3) conv + LeakyReLU(0.2) whose output is kept as a skip,
    then 2× max-pooling (so the deepest features are at 1/2^L). Decoder: per level a conv,
    2× nearest upsampling and concatenation with the skip of that resolution; the remaining
    decoder widths are full-resolution convs. Input and output spatial sizes are equal;
    sizes need not be powers of two (the upsampled tensor is padded to the skip's size).

    Args:
        in_channels: 2 for ``cat(moving, fixed)``.
        enc: encoder widths (default 16, 32, 32, 32).
        dec: decoder widths (default 32, 32, 32, 32, 32, 16, 16): the first ``len(enc)``
            are the up-path levels, the rest full-resolution convs.

    Shapes: ``(B, in_channels, *S) → (B, dec[-1], *S)``.
    """

    def __init__(
        self,
        in_channels: int = 2,
        enc: Sequence[int] = (16, 32, 32, 32),
        dec: Sequence[int] = (32, 32, 32, 32, 32, 16, 16),
        ndim: int = 3,
    ) -> None:
        super().__init__()
        self.ndim = ndim
        self.enc = nn.ModuleList()
        c = in_channels
        for w in enc:
            self.enc.append(_ConvAct(c, w, ndim))
            c = w
        self.up = nn.ModuleList()
        skip_ch = list(enc)[::-1]
        n_up = len(enc)
        if len(dec) < n_up:
            raise ValueError(f"decoder needs at least {n_up} widths, got {list(dec)}")
        for i in range(n_up):
            self.up.append(_ConvAct(c, dec[i], ndim))
            c = dec[i] + skip_ch[i]
        self.extra = nn.ModuleList()
        for w in dec[n_up:]:
            self.extra.append(_ConvAct(c, w, ndim))
            c = w
        self.out_channels = c
        self.pool = nn.MaxPool3d(2) if ndim == 3 else nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.enc:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        # skips = [e1 (full res), e2 (1/2), ..., eL]; x is eL pooled once more.
        for block in self.up:
            x = block(x)
            skip = skips.pop()
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = _match(x, skip.shape[2:])
            x = torch.cat([x, skip], dim=1)
        for block in self.extra:
            x = block(x)
        return x


def _match(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Crop or zero-pad the spatial axes of ``x`` to ``size`` (odd sizes after pooling)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    pad = []
    for have, want in zip(reversed(x.shape[2:]), reversed(size)):
        pad += [0, max(want - have, 0)]
    x = F.pad(x, pad)
    sl = (slice(None), slice(None)) + tuple(slice(0, s) for s in size)
    return x[sl]


class VoxelMorphNet(nn.Module):
    """U-Net + flow head + optional integration.

    Args:
        int_steps: scaling-and-squaring steps (0 = non-diffeomorphic: the head's output is
            the displacement itself).
        int_downsize: the velocity lives at ``1/int_downsize`` resolution.

    Forward: ``moving, fixed (B, 1, *S) → dict(disp (B, ndim, *S) voxels, velocity)``.
    """

    def __init__(
        self,
        enc: Sequence[int] = (16, 32, 32, 32),
        dec: Sequence[int] = (32, 32, 32, 32, 32, 16, 16),
        int_steps: int = 7,
        int_downsize: int = 2,
        ndim: int = 3,
    ) -> None:
        super().__init__()
        self.unet = VxmUNet(2, enc, dec, ndim)
        conv = nn.Conv3d if ndim == 3 else nn.Conv2d
        self.flow = conv(self.unet.out_channels, ndim, 3, padding=1)
        nn.init.normal_(self.flow.weight, 0.0, 1e-5)
        nn.init.zeros_(self.flow.bias)
        self.int_steps = int(int_steps)
        self.int_downsize = int(int_downsize) if int_steps > 0 else 1

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> dict[str, torch.Tensor]:
        full = fixed.shape[2:]
        flow = self.flow(self.unet(torch.cat([moving, fixed], dim=1)))
        if self.int_steps == 0:
            return {"disp": flow, "velocity": flow}
        if self.int_downsize > 1:
            small = [max(s // self.int_downsize, 2) for s in full]
            vel = resize_field(flow, small)
        else:
            vel = flow
        disp = integrate_velocity(vel, self.int_steps)
        disp = resize_field(disp, full)
        return {"disp": disp, "velocity": vel}


class VoxelMorph(RegistrationSystem):
    """VoxelMorph as a suite system.

    Args:
        lambda_: weight of the diffusion regulariser on the (half-resolution) velocity.
        ncc_window: local NCC window (voxels).
        int_steps: 7 (diffeomorphic, default) or 0 (non-diffeomorphic option).
        int_downsize: resolution divisor of the velocity (2).
        enc, dec: U-Net widths.
    """

    learns: ClassVar[bool] = True
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "lambda_": {"type": "float", "low": 0.01, "high": 10.0, "log": True},
    }

    def __init__(
        self,
        lambda_: float = 1.0,
        lr: float = 1e-4,
        ncc_window: int = 9,
        int_steps: int = 7,
        int_downsize: int = 2,
        enc: Sequence[int] = (16, 32, 32, 32),
        dec: Sequence[int] = (32, 32, 32, 32, 32, 16, 16),
        warmup_calls: int | None = None,
        compute_hd95: bool = True,
        compute_ndv: bool = True,
    ) -> None:
        super().__init__(lambda_=lambda_, lr=lr, warmup_calls=warmup_calls, compute_hd95=compute_hd95, compute_ndv=compute_ndv)
        self.save_hyperparameters()
        self.net = VoxelMorphNet(tuple(enc), tuple(dec), int_steps, int_downsize)
        self.similarity = LocalNCC(ncc_window)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net(moving, fixed)

    def register(self, batch: dict[str, Any]) -> torch.Tensor:
        return self(batch["moving"], batch["fixed"])["disp"]

    def training_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self(batch["moving"], batch["fixed"])
        warped = warp(batch["moving"], out["disp"])
        sim = self.similarity(batch["fixed"], warped)
        reg = diffusion(out["velocity"])
        loss = sim + self.lambda_ * reg
        return loss, {"sim": sim.detach(), "reg": reg.detach()}
