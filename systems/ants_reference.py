"""The real ANTs, through ANTsPy, as a suite system — to validate the torch SyN inside the suite.

Needs the optional extra ``regbench[peers]`` (``antspyx``); importing this module works
without it, and building the system without it raises an ImportError that says what to
install.

Conversion of ANTs' transforms to the suite's displacement: images go to ANTs with
identity direction, zero origin and the fixed image's spacing, so an ANTs physical point is
``index · spacing`` along each array axis. ANTs' forward transforms map a fixed point to the
moving point it samples; applying them (linear interpolation) to three *coordinate images*
— whose values are the physical coordinate along each axis — therefore gives, at each fixed
voxel, the moving position itself, exactly (interpolating a linear function is exact). The
coordinate images are padded by ``pad`` voxels on every side so points mapped slightly
outside the field of view are still read correctly. ``u_d = y_d / spacing_d - x_d``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from benchmark.core.spatial import spacing_from_affine
from systems.base import RegistrationSystem

__all__ = ["ANTsPyReference", "ants_forward_to_disp"]


def _ants():
    try:
        import ants  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the optional extra
        raise ImportError("ANTsPyReference needs ANTsPy: pip install 'regbench[peers]' (or pip install antspyx)") from exc
    return ants


def ants_forward_to_disp(fixed_img, transformlist: Sequence[str], pad: int = 32) -> np.ndarray:
    """ANTs forward transforms → ``(ndim, *spatial)`` voxel displacement on the fixed grid (pull).

    Args:
        fixed_img: the ``ants.ANTsImage`` the transforms were estimated for (identity
            direction, zero origin).
        transformlist: ``registration(...)["fwdtransforms"]``.
        pad: voxels of padding of the coordinate images.
    """
    ants = _ants()
    shape = fixed_img.shape
    spacing = np.asarray(fixed_img.spacing, dtype=np.float64)
    nd = len(shape)
    padded = [n + 2 * pad for n in shape]
    origin = tuple(float(-pad * s) for s in spacing)
    out = np.empty((nd, *shape), dtype=np.float32)
    grid = np.indices(shape, dtype=np.float64)
    for d in range(nd):
        idx = np.arange(padded[d], dtype=np.float64) - pad
        coord = np.broadcast_to((idx * spacing[d]).reshape([-1 if a == d else 1 for a in range(nd)]), padded)
        cimg = ants.from_numpy(np.ascontiguousarray(coord, dtype=np.float32), origin=origin, spacing=tuple(spacing))
        mapped = ants.apply_transforms(fixed=fixed_img, moving=cimg, transformlist=list(transformlist), interpolator="linear")
        out[d] = (mapped.numpy() / spacing[d] - grid[d]).astype(np.float32)
    return out


class ANTsPyReference(RegistrationSystem):
    """``ants.registration`` as an iterative suite system (CPU; ANTs' own threads).

    Args:
        type_of_transform: ANTsPy's transform type (``"SyNOnly"``, ``"antsRegistrationSyNQuick[so]"``, …).
        syn_metric, syn_sampling, reg_iterations: passed to ``ants.registration``.
        threads: ITK threads (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``); None keeps ANTs' default.
        extra: further keyword arguments for ``ants.registration``.
    """

    learns: ClassVar[bool] = False

    def __init__(
        self,
        type_of_transform: str = "SyNOnly",
        syn_metric: str = "CC",
        syn_sampling: int = 4,
        reg_iterations: Sequence[int] = (100, 70, 50),
        threads: int | None = None,
        extra: dict[str, Any] | None = None,
        compute_hd95: bool = True,
        compute_ndv: bool = True,
    ) -> None:
        super().__init__(warmup_calls=0, compute_hd95=compute_hd95, compute_ndv=compute_ndv)
        _ants()
        self.save_hyperparameters()
        self.type_of_transform = type_of_transform
        self.kwargs = dict(syn_metric=syn_metric, syn_sampling=int(syn_sampling), reg_iterations=tuple(int(i) for i in reg_iterations))
        self.kwargs.update(extra or {})
        self.threads = threads

    def configure_optimizers(self):
        return None

    def register(self, batch: dict[str, Any]) -> torch.Tensor:
        import os

        ants = _ants()
        if self.threads is not None:
            os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(int(self.threads))
        out = []
        for b in range(batch["fixed"].shape[0]):
            sp = tuple(spacing_from_affine(batch["fixed_affine"][b].cpu().numpy()))
            f = ants.from_numpy(batch["fixed"][b, 0].detach().cpu().numpy().astype(np.float32), spacing=sp)
            m = ants.from_numpy(batch["moving"][b, 0].detach().cpu().numpy().astype(np.float32), spacing=sp)
            reg = ants.registration(fixed=f, moving=m, type_of_transform=self.type_of_transform, **self.kwargs)
            out.append(torch.from_numpy(ants_forward_to_disp(f, reg["fwdtransforms"])))
        return torch.stack(out).to(batch["fixed"].device)
