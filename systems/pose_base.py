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

Pose charts (``rotation_centre``): an optimiser's pose variables can rotate about the CT's
isocentre (the origin of the pose convention; the landmark centroid on real data) or about
the CT's attenuation-weighted centroid (:func:`benchmark.core.drr.attenuation_centroid`),
computed from the CT alone. The second decouples rotation from translation in what the image
shows: turned about the isocentre, an out-of-plane rotation shifts the body's shadow as a
translation does, so at a start with translation error the rotation part of a similarity
gradient follows that error. Measured (plain NCC gradient at the start pose, 128 poses on 4
unseen synthetic spine CTs at the quickstart's settings): the rotation part points toward the
truth in 75.0 % of cases about the isocentre and 86.7 % about the centroid (translation 95.3
→ 98.4 %); the centroid sits ~20 mm in front of the spine. Only the chart changes: estimates
and metrics stay in the suite's convention.

Batches follow :mod:`datamodules.spine`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from benchmark.core.drr import DRR_METHODS, CArmGeometry, attenuation_centroid, normalise_xray, render_pose
from benchmark.core.metrics_pose import pose_metrics
from benchmark.core.results import POSE_ESTIMATE_COLUMNS
from systems.base import BenchmarkSystem

__all__ = ["PoseSystem", "InitialPose", "ROTATION_CENTRES"]

#: choices of ``rotation_centre`` (see the module doc)
ROTATION_CENTRES = ("isocentre", "centroid")


class PoseSystem(BenchmarkSystem):
    """Base class of 2D/3D pose registration systems.

    Args:
        lr: learning rate (learned methods).
        n_samples: samples per ray of the system's own DRRs.
        warmup_calls: untimed registration calls on the first test batch (default 1 for
            learned methods, 0 for iterative ones).
        rotation_centre: ``"isocentre"`` (default) or ``"centroid"``: the point the
            optimiser's rotation turns about (module doc, :meth:`chart_centre`).
        drr_method: the renderer of the system's own DRRs (:data:`benchmark.core.drr.DRR_METHODS`):
            ``"trilinear"`` (default; ``n_samples`` per ray) or ``"slices"`` (one bilinear
            sample per CT slice; several times faster on CPU, ``n_samples`` unused).
    """

    batch_key: ClassVar[str] = "xray"
    test_log_key: ClassVar[str] = "mtre_mm"

    def __init__(self, lr: float = 1e-4, n_samples: int = 64, warmup_calls: int | None = None,
                 rotation_centre: str = "isocentre", drr_method: str = "trilinear") -> None:
        super().__init__(lr=lr, warmup_calls=warmup_calls)
        self.n_samples = int(n_samples)
        if drr_method not in DRR_METHODS:
            raise ValueError(f"drr_method must be one of {', '.join(DRR_METHODS)}, got {drr_method!r}")
        self.drr_method = drr_method
        if rotation_centre not in ROTATION_CENTRES:
            raise ValueError(f"rotation_centre must be one of {', '.join(ROTATION_CENTRES)}, got {rotation_centre!r}")
        self.rotation_centre = rotation_centre

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
                           batch["base"].to(pose.device), geometry or batch["geometry"], n_samples or self.n_samples,
                           method=self.drr_method)

    def chart_centre(self, batch: dict[str, Any]) -> torch.Tensor:
        """``(B, 3)`` float32 mm: the point the optimiser's rotation turns about, in the frame the
        pose acts in: zeros (the isocentre) or the CT's attenuation centroid (``rotation_centre``).
        Use with :func:`benchmark.core.se3.recentre` / :func:`~benchmark.core.se3.uncentre`."""
        n = batch["pose_init"].shape[0]
        dev = batch["pose_init"].device
        if self.rotation_centre == "isocentre":
            return torch.zeros(n, 3, device=dev)
        vol = batch["volume"]
        aff = batch["affine"][:1] if vol.shape[0] == 1 else batch["affine"]
        c = attenuation_centroid(vol, aff, batch["base"]).float().to(dev)
        return c.expand(n, 3) if c.shape[0] == 1 else c

    # ---- Lightning hooks ----------------------------------------------------------------
    def _needs_autograd(self) -> bool:
        """Pose registration follows a pose gradient in every method (learned ones included)."""
        return True

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
