"""2D/3D registration metrics (docs/design.md §2): mTRE, projected error, rotation and translation
error, success flags, and their aggregates.

All per-case metrics compare the estimated and the true placement of the CT in the C-arm
frame (:mod:`benchmark.core.drr`): ``T(θ) = P(θ) · B``.

* ``mtre_mm``: mean over landmarks ``p`` (CT world mm, e.g. vertebra centroids) of
  ``|T(θ_est) p − T(θ_true) p|``.
* ``ptre_mm``: mean distance on the detector plane (mm) between the projections of the
  landmarks under the two poses.
* ``rot_err_deg``: angle of ``R_estᵀ R_true``; ``trans_err_mm``: ``|t_est − t_true|`` (the
  isocentre's displacement).
* ``success_10mm`` / ``success_2mm``: 1.0 when ``mtre_mm`` is below 10 / 2 mm, else 0.0
  (their ``compute`` in the metric registry, :mod:`benchmark.core.registry`, which also
  computes any other registered 2D/3D metric from a :class:`PoseCase`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from benchmark.core import registry
from benchmark.core.drr import CArmGeometry, pose_transform, project_points
from benchmark.core.se3 import rotation_angle

__all__ = ["POSE_METRIC_KEYS", "PoseCase", "pose_metrics", "aggregate_pose"]

#: The 2D/3D metrics of the registry (built-in ones, at import).
POSE_METRIC_KEYS = [m.key for m in registry.metrics_of("pose") if m.family == "pose" and m.column]


@dataclasses.dataclass
class PoseCase:
    """The per-case inputs a registered 2D/3D metric's ``compute`` receives: poses ``(6,)``
    (float64, rad / mm), the reference placement ``(4, 4)``, the finite landmarks ``(N, 3)``
    (CT world mm), the C-arm, and the metrics computed so far in ``values``."""

    pose_est: torch.Tensor
    pose_true: torch.Tensor
    base: torch.Tensor
    landmarks: torch.Tensor
    geometry: CArmGeometry
    values: dict[str, Any] = dataclasses.field(default_factory=dict)


def pose_metrics(
    pose_est: torch.Tensor,
    pose_true: torch.Tensor,
    base: torch.Tensor,
    landmarks: torch.Tensor,
    geometry: CArmGeometry,
) -> list[dict[str, float]]:
    """Per-case 2D/3D metrics.

    Args:
        pose_est, pose_true: ``(B, 6)`` poses (rad, mm).
        base: ``(B|1, 4, 4)`` reference placements (CT world → C-arm at ``θ = 0``).
        landmarks: ``(B, N, 3)`` CT world mm; all-NaN rows are padding and ignored.
        geometry: the C-arm (for the projected error).

    Returns:
        One dict per case with :data:`POSE_METRIC_KEYS` and every other registered 2D/3D
        metric that has a ``compute`` (NaN mTRE/pTRE if no landmark).
    """
    est = pose_est.detach().to(torch.float64).cpu()
    tru = pose_true.detach().to(torch.float64).cpu()
    b = base.detach().to(torch.float64).cpu()
    pts = landmarks.detach().to(torch.float64).cpu()
    t_est = pose_transform(est, b)
    t_tru = pose_transform(tru, b)
    valid = torch.isfinite(pts).all(-1)  # (B, N)
    safe = torch.where(valid[..., None], pts, torch.zeros_like(pts))
    q_est = safe @ t_est[:, :3, :3].transpose(1, 2) + t_est[:, None, :3, 3]
    q_tru = safe @ t_tru[:, :3, :3].transpose(1, 2) + t_tru[:, None, :3, 3]
    d3 = (q_est - q_tru).norm(dim=-1)
    spacing = torch.tensor([geometry.dely, geometry.delx], dtype=torch.float64)
    d2 = ((project_points(safe, t_est, geometry) - project_points(safe, t_tru, geometry)) * spacing).norm(dim=-1)
    rot = torch.rad2deg(rotation_angle(est, tru))
    tr = (est[:, 3:] - tru[:, 3:]).norm(dim=-1)
    own = [m for m in registry.metrics_of("pose", computed=True) if m.family == "pose"]
    keys, computed = [m.key for m in own], [m.compute_fn() for m in own]
    out = []
    for k in range(est.shape[0]):
        n = int(valid[k].sum())
        values: dict[str, Any] = {
            "mtre_mm": float(d3[k][valid[k]].mean()) if n else math.nan,
            "ptre_mm": float(d2[k][valid[k]].mean()) if n else math.nan,
            "rot_err_deg": float(rot[k]),
            "trans_err_mm": float(tr[k]),
        }
        case = PoseCase(est[k], tru[k], b[k if b.shape[0] > 1 else 0], pts[k][valid[k]], geometry, values)
        for m, fn in zip(keys, computed):
            values[m] = fn(case)
        out.append(values)
    return out


def aggregate_pose(records: Iterable[dict[str, Any]], keys: Sequence[str] = ("mtre_mm", "ptre_mm", "rot_err_deg", "trans_err_mm", "runtime_s")) -> dict[str, dict[str, float]]:
    """Mean, median, 50/75/95th percentiles per metric, and success rates (NaN-aware).

    Returns:
        ``{metric: {mean, median, p50, p75, p95, n}, "success_10mm": {rate}, "success_2mm": {rate}}``.
    """
    recs = list(records)
    out: dict[str, dict[str, float]] = {}
    for k in keys:
        v = np.array([float(r.get(k, math.nan)) for r in recs], dtype=float)
        v = v[np.isfinite(v)]
        if v.size == 0:
            out[k] = {"mean": math.nan, "median": math.nan, "p50": math.nan, "p75": math.nan, "p95": math.nan, "n": 0}
            continue
        out[k] = {"mean": float(v.mean()), "median": float(np.median(v)), "p50": float(np.percentile(v, 50)),
                  "p75": float(np.percentile(v, 75)), "p95": float(np.percentile(v, 95)), "n": int(v.size)}
    for k in ("success_10mm", "success_2mm"):
        v = np.array([float(r.get(k, math.nan)) for r in recs], dtype=float)
        v = v[np.isfinite(v)]
        out[k] = {"rate": float(v.mean()) if v.size else math.nan, "n": int(v.size)}
    return out
