"""The interface of 2D/3D (X-ray → CT pose) registration systems.

A pose system is a :class:`lightning.LightningModule` with

* ``register(batch) -> (B, 6)`` estimated pose (rotation vector rad, translation mm; the
  convention of :mod:`benchmark.core.drr` / :mod:`benchmark.core.se3`), starting from
  ``batch["pose_init"]``;
* ``training_loss(batch)`` when it learns (``learns = True``); iterative methods set
  ``learns = False`` and optimise inside ``register`` (autograd enabled there even in the
  test loop);
* the test loop of :class:`systems.base.BenchmarkSystem`: ``test_step`` times ``register``
  alone with :func:`benchmark.core.timing.timed_call`, computes
  :func:`benchmark.core.metrics_pose.pose_metrics` and returns one record per case:
  ``case_id, fixed_id, moving_id, mtre_mm, ptre_mm, rot_err_deg, trans_err_mm,
  success_10mm, success_2mm`` (the registry's 2D/3D metrics), ``runtime_s, peak_mem_mb,
  mtre_initial_mm`` and the estimated pose; the results writer asks
  :meth:`PoseSystem.panel_arrays` for the panel case: ``kind="pose"``, ``xray``,
  ``drr_initial``, ``drr_final`` (H, W) and ``mtre_initial_mm``, ``mtre_final_mm``.

Batches follow :mod:`datamodules.spine`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from benchmark.core.drr import CArmGeometry, normalise_xray, render_pose
from benchmark.core.metrics_pose import pose_metrics
from benchmark.core.results import POSE_ESTIMATE_COLUMNS
from systems.base import BenchmarkSystem

__all__ = ["PoseSystem", "InitialPose"]


class PoseSystem(BenchmarkSystem):
    """Base class of 2D/3D pose registration systems.

    Args:
        lr: learning rate (learned methods).
        n_samples: samples per ray of the system's own DRRs.
        warmup_calls: untimed registration calls on the first test batch (default 1 for
            learned methods, 0 for iterative ones).
    """

    batch_key: ClassVar[str] = "xray"
    test_log_key: ClassVar[str] = "mtre_mm"

    def __init__(self, lr: float = 1e-4, n_samples: int = 64, warmup_calls: int | None = None) -> None:
        super().__init__(lr=lr, warmup_calls=warmup_calls)
        self.n_samples = int(n_samples)

    # ---- the method -------------------------------------------------------------------
    def register(self, batch: dict[str, Any]) -> torch.Tensor:
        """Estimate the pose: ``(B, 6)`` (rad, mm)."""
        raise NotImplementedError(f"{type(self).__name__} must define register(batch) -> (B, 6) pose")

    # ---- helpers ----------------------------------------------------------------------
    def drr(self, batch: dict[str, Any], pose: torch.Tensor, geometry: CArmGeometry | None = None,
            volume: torch.Tensor | None = None, n_samples: int | None = None) -> torch.Tensor:
        """DRRs ``(B, C, H, W)`` of the batch's CTs (or ``volume``) at ``pose (B, 6)``."""
        vol = batch["volume"] if volume is None else volume
        return render_pose(vol, batch["affine"][0] if vol.shape[0] == 1 else batch["affine"], pose,
                           batch["base"].to(pose.device), geometry or batch["geometry"], n_samples or self.n_samples)

    # ---- Lightning hooks ----------------------------------------------------------------
    def _register_grad_ok(self, batch: dict[str, Any]) -> torch.Tensor:
        """``register`` with autograd usable (pose optimisation needs it even in eval loops)."""
        with torch.inference_mode(False), torch.enable_grad():
            clean = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            return self.register(clean).detach()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        pose = self._register_grad_ok(batch)
        res = pose_metrics(pose, batch["pose_true"], batch["base"], batch["landmarks"], batch["geometry"])
        bs = pose.shape[0]
        self.log("val/mtre_mm", float(np.nanmean([r["mtre_mm"] for r in res])), sync_dist=True, prog_bar=True, batch_size=bs)

    def case_records(self, batch: dict[str, Any], pose: torch.Tensor, runtime_s: float, peak_mem_mb: float) -> list[dict[str, Any]]:
        """One record per case of the batch (metrics of :mod:`benchmark.core.metrics_pose`)."""
        final = pose_metrics(pose, batch["pose_true"], batch["base"], batch["landmarks"], batch["geometry"])
        init = pose_metrics(batch["pose_init"], batch["pose_true"], batch["base"], batch["landmarks"], batch["geometry"])
        out = []
        for b in range(pose.shape[0]):
            rec: dict[str, Any] = {
                "case_id": str(batch["case_id"][b]),
                "fixed_id": str(batch["fixed_id"][b]),
                "moving_id": str(batch["moving_id"][b]),
            }
            rec.update(final[b])
            rec["runtime_s"] = float(runtime_s)
            rec["peak_mem_mb"] = float(peak_mem_mb)
            rec["mtre_initial_mm"] = init[b]["mtre_mm"]
            est = pose[b].detach().double().cpu().tolist()
            rec.update({k: float(v) for k, v in zip(POSE_ESTIMATE_COLUMNS, est)})
            out.append(rec)
        return out

    def panel_arrays(self, batch: dict[str, Any], pose: torch.Tensor, b: int,
                     rec: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        """Figure arrays of case ``b``: X-ray, DRRs at the start and the estimate (float32);
        ``rec`` is the case's record (its initial and final mTRE; computed when not given)."""
        sub = {k: (v[b : b + 1] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        if rec is None:
            args = (sub["pose_true"], sub["base"], sub["landmarks"], sub["geometry"])
            rec = {"mtre_initial_mm": pose_metrics(sub["pose_init"], *args)[0]["mtre_mm"],
                   "mtre_mm": pose_metrics(pose[b : b + 1], *args)[0]["mtre_mm"]}
        with torch.no_grad():
            d0 = normalise_xray(self.drr(sub, sub["pose_init"].float()))[0, 0]
            d1 = normalise_xray(self.drr(sub, pose[b : b + 1].float().to(d0.device)))[0, 0]
        return {
            "kind": np.array("pose"),
            "xray": sub["xray"][0, 0].detach().cpu().numpy().astype(np.float32),
            "drr_initial": d0.cpu().numpy().astype(np.float32),
            "drr_final": d1.cpu().numpy().astype(np.float32),
            "mtre_initial_mm": np.array(rec["mtre_initial_mm"], dtype=np.float32),
            "mtre_final_mm": np.array(rec["mtre_mm"], dtype=np.float32),
        }


class InitialPose(PoseSystem):
    """The ``initial`` row: the starting pose, unchanged (same cases and metrics)."""

    learns: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__(warmup_calls=0)

    def register(self, batch: dict[str, Any]) -> torch.Tensor:
        return batch["pose_init"].clone()
