"""Conventional intensity-based 2D/3D registration: optimise the pose so that the DRR
matches the X-ray, coarse to fine.

Similarity (maximised): gradient correlation (``"gncc"``, :func:`benchmark.core.losses.gradient_ncc`)
or multiscale NCC (``"mncc"``: mean of the global NCC of the two images at full, half and
quarter resolution). Optimisers:

* :class:`CMAESPose` — CMA-ES (the ``cmaes`` package) over the 6 pose parameters, scaled
  by ``sigma_rot_deg`` / ``sigma_trans_mm``; each generation is one batched render of the
  whole population; the step size shrinks by ``sigma_decay`` per resolution level and the
  best pose seen so far seeds the next level;
* :class:`GradientPose` — Adam on the pose through the differentiable renderer, step sizes
  ``lr_rot_deg`` / ``lr_trans_mm`` (decayed per level).

Resolution levels are detector down-sampling factors (``levels``: e.g. ``[4, 2, 1]``): the
X-ray is average-pooled and the DRR rendered on the correspondingly coarser detector.

Both search in the pose chart chosen by ``rotation_centre`` (``"isocentre"`` or
``"centroid"``: rotation about the CT's attenuation centroid; :mod:`systems.pose_base`), so
CMA-ES's per-axis spread and Adam's per-group step sizes act on that chart's rotation and
translation; the estimate is returned in the suite's convention. ``drr_method`` picks the
renderer of their DRRs (``"trilinear"``, default, or ``"slices"``; :func:`benchmark.core.drr.render`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from benchmark.core.losses import gradient_ncc
from benchmark.core.se3 import recentre, uncentre
from systems.pose_base import PoseSystem

__all__ = ["IntensityPose", "CMAESPose", "GradientPose", "pose_similarity"]


def _global_ncc(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-image NCC of ``(B, C, H, W)`` → ``(B,)``."""
    a = a.flatten(1) - a.flatten(1).mean(1, keepdim=True)
    b = b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
    return (a * b).sum(1) / torch.sqrt((a * a).sum(1) * (b * b).sum(1) + eps)


def pose_similarity(xray: torch.Tensor, drr: torch.Tensor, kind: str = "gncc") -> torch.Tensor:
    """Per-image similarity ``(B,)`` (higher is better) of ``(B|1, 1, H, W)`` X-ray vs ``(B, C, H, W)`` DRRs."""
    if xray.shape[0] != drr.shape[0]:
        xray = xray.expand(drr.shape[0], *xray.shape[1:])
    if drr.shape[1] != xray.shape[1]:
        drr = drr.mean(1, keepdim=True)
    if kind == "gncc":
        return torch.stack([gradient_ncc(xray[i : i + 1], drr[i : i + 1]) for i in range(drr.shape[0])])
    if kind == "mncc":
        out = 0
        n = 0
        x, d = xray, drr
        while True:
            out = out + _global_ncc(x, d)
            n += 1
            if min(x.shape[-2:]) < 16 or n == 3:
                break
            x, d = F.avg_pool2d(x, 2), F.avg_pool2d(d, 2)
        return out / n
    raise ValueError(f"unknown similarity {kind!r} (allowed: gncc, mncc)")


class IntensityPose(PoseSystem):
    """Shared parts of the intensity-based baselines (see module doc)."""

    learns: ClassVar[bool] = False

    def __init__(self, similarity: str = "gncc", levels: Sequence[int] = (4, 2, 1), n_samples: int = 64,
                 sigma_rot_deg: float = 10.0, sigma_trans_mm: float = 20.0, sigma_depth_mm: float = 40.0, seed: int = 0,
                 rotation_centre: str = "isocentre", drr_method: str = "trilinear") -> None:
        super().__init__(n_samples=n_samples, warmup_calls=0, rotation_centre=rotation_centre, drr_method=drr_method)
        if similarity not in ("gncc", "mncc"):
            raise ValueError(f"similarity must be 'gncc' or 'mncc', got {similarity!r}")
        self.similarity = similarity
        self.levels = [int(v) for v in levels]
        if not self.levels or min(self.levels) < 1:
            raise ValueError(f"levels must be positive down-sampling factors, got {levels!r}")
        self.scale = torch.tensor([math.radians(sigma_rot_deg)] * 3 + [sigma_trans_mm, sigma_trans_mm, sigma_depth_mm])
        self.seed = int(seed)

    def _level_inputs(self, batch: dict[str, Any], b: int, factor: int) -> tuple[dict[str, Any], torch.Tensor, Any, int]:
        sub = {k: (v[b : b + 1] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        geom = batch["geometry"].scaled(factor)
        xray = F.avg_pool2d(sub["xray"], factor) if factor > 1 else sub["xray"]
        ns = max(16, self.n_samples // factor)
        return sub, xray, geom, ns

    def _score(self, sub: dict[str, Any], xray: torch.Tensor, geom, ns: int, poses: torch.Tensor) -> torch.Tensor:
        drr = self.drr(sub, poses, geometry=geom, n_samples=ns)
        return pose_similarity(xray, drr, self.similarity)


class CMAESPose(IntensityPose):
    """CMA-ES pose search (see module doc).

    Args:
        generations: per level (one int for all levels, or a list).
        popsize: population size (``None``: the ``cmaes`` default ``4 + 3 ln 6 ≈ 9``).
        sigma_decay: CMA step size factor from one level to the next (starts at 1 in scaled units).
    """

    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "sigma_rot_deg": {"type": "float", "low": 2.0, "high": 30.0, "log": True},
        "sigma_trans_mm": {"type": "float", "low": 5.0, "high": 60.0, "log": True},
        "popsize": {"type": "int", "low": 8, "high": 32},
    }

    def __init__(self, similarity: str = "gncc", levels: Sequence[int] = (4, 2, 1), n_samples: int = 64,
                 generations: int | Sequence[int] = 30, popsize: int | None = 16, sigma_decay: float = 0.5,
                 sigma_rot_deg: float = 10.0, sigma_trans_mm: float = 20.0, sigma_depth_mm: float = 40.0, seed: int = 0,
                 rotation_centre: str = "isocentre", drr_method: str = "trilinear") -> None:
        super().__init__(similarity, levels, n_samples, sigma_rot_deg, sigma_trans_mm, sigma_depth_mm, seed, rotation_centre,
                         drr_method)
        gens = [int(generations)] * len(self.levels) if isinstance(generations, (int, float)) else [int(g) for g in generations]
        if len(gens) != len(self.levels):
            raise ValueError(f"generations has {len(gens)} entries for {len(self.levels)} levels")
        self.generations = gens
        self.popsize = None if popsize is None else int(popsize)
        self.sigma_decay = float(sigma_decay)

    def register(self, batch: dict[str, Any]) -> torch.Tensor:
        from cmaes import CMA

        out = []
        centre = self.chart_centre(batch).double().cpu()
        for b in range(batch["xray"].shape[0]):
            c = centre[b]
            # the search runs in the chart that turns about chart_centre (module pose_base)
            start = recentre(batch["pose_init"][b].detach().double().cpu(), c)
            scale = self.scale.double()
            best_x, best_f = np.zeros(6), -math.inf
            sigma = 1.0
            for li, factor in enumerate(self.levels):
                sub, xray, geom, ns = self._level_inputs(batch, b, factor)
                with torch.no_grad():
                    # re-score the incumbent at this level so the levels compare fairly
                    best_f = float(self._score(sub, xray, geom, ns, uncentre(start + torch.from_numpy(best_x) * scale, c).float()[None])[0])
                    opt = CMA(mean=best_x.copy(), sigma=sigma, bounds=np.tile([-6.0, 6.0], (6, 1)),
                              population_size=self.popsize, seed=self.seed + 7919 * li)
                    for _ in range(self.generations[li]):
                        xs = np.stack([opt.ask() for _ in range(opt.population_size)])
                        poses = uncentre(start[None] + torch.from_numpy(xs) * scale, c).float()
                        f = self._score(sub, xray, geom, ns, poses).double().cpu().numpy()
                        f = np.where(np.isfinite(f), f, -1.0)
                        opt.tell([(xs[i], -float(f[i])) for i in range(len(xs))])
                        i = int(f.argmax())
                        if f[i] > best_f:
                            best_f, best_x = float(f[i]), xs[i].copy()
                sigma *= self.sigma_decay
            out.append(uncentre(start + torch.from_numpy(best_x) * scale, c).float())
        return torch.stack(out).to(batch["pose_init"].device)


class GradientPose(IntensityPose):
    """Gradient-based pose optimisation through the differentiable renderer (Adam).

    Args:
        iterations: per level (one int, or a list).
        lr_rot_deg, lr_trans_mm: Adam step sizes at the first level (degrees, mm).
        lr_decay: step size factor from one level to the next.
    """

    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "lr_rot_deg": {"type": "float", "low": 0.2, "high": 5.0, "log": True},
        "lr_trans_mm": {"type": "float", "low": 0.5, "high": 10.0, "log": True},
    }

    def __init__(self, similarity: str = "gncc", levels: Sequence[int] = (4, 2, 1), n_samples: int = 64,
                 iterations: int | Sequence[int] = 60, lr_rot_deg: float = 2.0, lr_trans_mm: float = 4.0,
                 lr_decay: float = 0.5, seed: int = 0, rotation_centre: str = "isocentre",
                 drr_method: str = "trilinear") -> None:
        super().__init__(similarity, levels, n_samples, seed=seed, rotation_centre=rotation_centre, drr_method=drr_method)
        its = [int(iterations)] * len(self.levels) if isinstance(iterations, (int, float)) else [int(i) for i in iterations]
        if len(its) != len(self.levels):
            raise ValueError(f"iterations has {len(its)} entries for {len(self.levels)} levels")
        self.iterations = its
        self.lr_rot = math.radians(float(lr_rot_deg))
        self.lr_trans = float(lr_trans_mm)
        self.lr_decay = float(lr_decay)

    def optimise(self, batch: dict[str, Any], b: int, start: torch.Tensor, levels: Sequence[int], iterations: Sequence[int],
                 lr_rot: float, lr_trans: float) -> torch.Tensor:
        """Adam on ``-similarity`` from ``start (6,)`` over the given levels; returns ``(6,)``.

        The variables are the pose in the chart about :meth:`chart_centre` (``rotation_centre``);
        ``start`` and the result are in the suite's convention."""
        c = self.chart_centre({k: (v[b : b + 1] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()})[0]
        pose = recentre(start.detach().float(), c)
        for li, factor in enumerate(levels):
            sub, xray, geom, ns = self._level_inputs(batch, b, factor)
            rot = pose[:3].clone().requires_grad_(True)
            tr = pose[3:].clone().requires_grad_(True)
            d = self.lr_decay**li
            opt = torch.optim.Adam([{"params": [rot], "lr": lr_rot * d}, {"params": [tr], "lr": lr_trans * d}])
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, iterations[li]), eta_min=0.0)
            for _ in range(iterations[li]):
                opt.zero_grad(set_to_none=True)
                loss = -self._score(sub, xray, geom, ns, uncentre(torch.cat([rot, tr]), c)[None]).sum()
                loss.backward()
                opt.step()
                sched.step()
            pose = torch.cat([rot, tr]).detach()
        return uncentre(pose, c)

    def register(self, batch: dict[str, Any]) -> torch.Tensor:
        out = [self.optimise(batch, b, batch["pose_init"][b], self.levels, self.iterations, self.lr_rot, self.lr_trans)
               for b in range(batch["xray"].shape[0])]
        return torch.stack(out).to(batch["pose_init"].device)
