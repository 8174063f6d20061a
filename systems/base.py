"""The interface every registration method implements, and the one test loop.

:class:`BenchmarkSystem` is the base of every system, deformable and 2D/3D
(:class:`systems.pose_base.PoseSystem`): it owns the test loop. ``test_step`` makes the
untimed warm-up calls, times ``register`` alone under :func:`benchmark.core.timing.timed_call`,
builds one record per case with ``case_records`` (every metric of the registry's family,
:mod:`benchmark.core.registry`, plus runtime and memory) and **returns**
:class:`TestOutput` ``{"records": [...], "estimate": <register's output>}``. The results
writer (:class:`benchmark.runner.ResultsWriter`) receives it through Lightning's
``on_test_batch_end`` (its ``outputs`` argument) and writes the records, the qualitative
panel (:meth:`BenchmarkSystem.panel_arrays`) and the exported fields: nothing is set on the
system from outside.

A deformable system is a :class:`RegistrationSystem` with

* ``register(batch) -> disp``: the registration call, ``(B, 3, *S)`` displacement in voxels
  of the fixed grid, pull convention (``warped = warp(moving, disp)``);
* ``training_step`` when it learns (``learns = True``); iterative methods set
  ``learns = False`` and optimise inside ``register`` (gradients are enabled there even in
  the test loop);
* a shared ``validation_step`` (Dice, fold %; logged, synced over ranks) and the shared
  test loop above, its records computed with :func:`benchmark.core.metrics.deformable_metrics`
  on the labels the data module declares (``label_ids``, datamodules/base.py
  ``RegistrationData``).

Batches follow :mod:`datamodules.batch`.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, TypedDict

import lightning as L
import numpy as np
import torch

from benchmark.core import metrics, registry
from benchmark.core.spatial import spacing_from_affine, warp
from benchmark.core.timing import timed_call
from systems.speed import CompileSpec, check_compile, compile_modules

__all__ = ["BenchmarkSystem", "TestOutput", "RegistrationSystem", "DivergenceError", "NoRegistration", "checked_loss"]


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss; the runner records the experiment as failed."""


def checked_loss(module: L.LightningModule, loss: torch.Tensor, parts: dict[str, torch.Tensor], batch_size: int) -> torch.Tensor:
    """Log a training loss and its parts, or raise :class:`DivergenceError` when it is not
    finite on any rank (all ranks leave together, or DDP would hang on the next all-reduce).
    Shared by every system's ``training_step``."""
    bad = not bool(torch.isfinite(loss.detach()).item())
    if module._trainer is not None and module.trainer.world_size > 1:
        bad = module.trainer.strategy.reduce_boolean_decision(bad, all=False)
    if bad:
        raise DivergenceError(f"non-finite training loss at step {module.global_step} ({ {k: float(v) for k, v in parts.items()} })")
    module.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
    for k, v in parts.items():
        module.log(f"train/{k}", v, batch_size=batch_size)
    return loss


class TestOutput(TypedDict):
    """What ``test_step`` returns for one batch (Lightning hands it to the callbacks'
    ``on_test_batch_end`` as ``outputs``)."""

    #: one record per case of the batch (ids, the family's metrics, runtime_s, peak_mem_mb).
    records: list[dict[str, Any]]
    #: ``register``'s output for the batch: ``(B, ndim, *S)`` displacement or ``(B, 6)`` pose.
    estimate: torch.Tensor


class BenchmarkSystem(L.LightningModule):
    """The base of every system: learning flag, search space, optimiser, training step and
    the test loop (see the module docstring).

    Subclasses define ``register(batch)``, ``training_loss(batch)`` when they learn,
    ``case_records`` (the records of one batch) and ``panel_arrays`` (the report's panel).

    Class attributes:
        learns: whether ``fit`` trains it.
        search_space: hyperparameter → Optuna distribution spec, for ``regbench sweep``.
        batch_key: the batch entry whose first dimension is the batch size.
        test_log_key: the record key whose batch mean is logged as ``test/<key>``.
    """

    learns: ClassVar[bool] = True
    search_space: ClassVar[dict[str, dict[str, Any]]] = {}
    batch_key: ClassVar[str] = "fixed"
    test_log_key: ClassVar[str] = "dice"

    def __init__(self, lr: float = 1e-4, warmup_calls: int | None = None) -> None:
        super().__init__()
        self.lr = float(lr)
        self.warmup_calls = (1 if self.learns else 0) if warmup_calls is None else int(warmup_calls)
        #: Every record of the current test run (the progress bar shows the last one).
        self.test_records: list[dict[str, Any]] = []
        self.warmup_seconds: list[float] = []
        self._warmed = False

    # ---- the method -------------------------------------------------------------------
    def register(self, batch: dict[str, Any]) -> torch.Tensor:
        """The registration call (deformable: displacement; 2D/3D: pose)."""
        raise NotImplementedError(f"{type(self).__name__} must define register(batch)")

    def training_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, parts)`` for one training batch (learned methods)."""
        raise NotImplementedError(f"{type(self).__name__} learns, so it must define training_loss(batch)")

    def case_records(self, batch: dict[str, Any], estimate: torch.Tensor, runtime_s: float, peak_mem_mb: float) -> list[dict[str, Any]]:
        """One record per case of a batch."""
        raise NotImplementedError(f"{type(self).__name__} must define case_records")

    def panel_arrays(self, batch: dict[str, Any], estimate: torch.Tensor, b: int,
                     record: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        """The report's qualitative panel of case ``b`` (``kind`` says which panel)."""
        raise NotImplementedError(f"{type(self).__name__} must define panel_arrays")

    # ---- Lightning hooks ----------------------------------------------------------------
    def configure_optimizers(self):
        if not any(p.requires_grad for p in self.parameters()):
            return None
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, parts = self.training_loss(batch)
        return checked_loss(self, loss, parts, batch_size=batch[self.batch_key].shape[0])

    def _needs_autograd(self) -> bool:
        """Whether ``register`` optimises with autograd (iterative methods), even in eval loops."""
        return not self.learns

    def _registration_input(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch as ``register`` gets it. Tensors made under inference mode (a Trainer with
        ``inference_mode=True``; the suite's runner, CLI and sweeps set it False) cannot enter
        an autograd graph, so a method that needs autograd gets normal copies of those. Made
        outside the timed region: a copy of the batch is not the method's work, and learned
        methods, which take the batch as it is, were not charged for one (it cost 0.13 s and
        ~250 MB at 160×192×224 when it was timed)."""
        if not self._needs_autograd() or not any(isinstance(v, torch.Tensor) and v.is_inference() for v in batch.values()):
            return batch
        with torch.inference_mode(False):
            return {k: (v.clone() if isinstance(v, torch.Tensor) and v.is_inference() else v) for k, v in batch.items()}

    def _register_prepared(self, batch: dict[str, Any]) -> torch.Tensor:
        """``register`` on a batch from :meth:`_registration_input`: under ``no_grad`` for learned
        methods, with autograd on (and the result detached) for iterative ones."""
        if not self._needs_autograd():
            with torch.no_grad():
                return self.register(batch)
        with torch.inference_mode(False), torch.enable_grad():
            return self.register(batch).detach()

    def _register_grad_ok(self, batch: dict[str, Any]) -> torch.Tensor:
        """``register`` with autograd usable by iterative methods, even inside eval loops."""
        return self._register_prepared(self._registration_input(batch))

    def on_test_start(self) -> None:
        self.test_records = []
        self._warmed = False

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> TestOutput:
        """Warm up (first batch), time ``register`` alone, score every case; returns the
        records and the estimate (:class:`TestOutput`)."""
        clean = self._registration_input(batch)  # outside the timer: see _registration_input
        if not self._warmed:
            for _ in range(self.warmup_calls):
                _, st = timed_call(lambda: self._register_prepared(clean), self.device)
                self.warmup_seconds.append(st.seconds)
            self._warmed = True
        estimate, stats = timed_call(lambda: self._register_prepared(clean), self.device)
        bsz = estimate.shape[0]
        records = self.case_records(batch, estimate, stats.seconds / bsz, stats.peak_mem_mb)
        self.test_records.extend(records)
        vals = [float(r.get(self.test_log_key, math.nan)) for r in records]
        if not all(math.isnan(v) for v in vals):
            self.log(f"test/{self.test_log_key}", float(np.nanmean(vals)), sync_dist=True, batch_size=bsz)
        return TestOutput(records=records, estimate=estimate)


class RegistrationSystem(BenchmarkSystem):
    """Base class of deformable registration systems.

    Args:
        lambda_: weight of the regulariser against the similarity (uniform name in the suite).
        lr: learning rate for learned methods.
        warmup_calls: untimed registration calls on the first test batch of each rank
            (default 1 for learned methods, 0 for iterative ones, whose first call is timed
            like every other: one-off start-up costs are small against their runtime).
        compute_hd95: HD95 per case (costly for many labels on big volumes).
        compute_ndv: NDV % per case.
        compile: ``torch.compile`` the network(s) (:meth:`networks`) when Lightning configures
            the model; ``True`` (inductor) or a backend name (:mod:`systems.speed`, which also
            says what stays float32 under ``precision: bf16-mixed`` / ``16-mixed``).

    Class attributes: those of :class:`BenchmarkSystem`.
    """

    def __init__(
        self,
        lambda_: float = 1.0,
        lr: float = 1e-4,
        warmup_calls: int | None = None,
        compute_hd95: bool = True,
        compute_ndv: bool = True,
        compile: CompileSpec = False,
    ) -> None:
        super().__init__(lr=lr, warmup_calls=warmup_calls)
        self.compile_network: CompileSpec = check_compile(compile)
        self.lambda_ = float(lambda_)
        self.compute_hd95 = compute_hd95
        self.compute_ndv = compute_ndv
        #: Label ids for Dice/HD95: the data module's declared ``label_ids``, read at test start.
        self.label_ids: list[int] | None = None

    # ---- the method -------------------------------------------------------------------
    def register(self, batch: dict[str, Any]) -> torch.Tensor:
        """Register moving to fixed: ``(B, 3, *S)`` displacement, voxels, pull."""
        raise NotImplementedError(f"{type(self).__name__} must define register(batch) -> (B, ndim, *S) displacement")

    # ---- Lightning hooks ----------------------------------------------------------------
    def networks(self) -> list[torch.nn.Module]:
        """The learned network(s) that ``compile`` compiles: ``self.net``, or each of ``self.nets``."""
        for name in ("net", "nets"):
            m = getattr(self, name, None)
            if isinstance(m, torch.nn.ModuleList):
                return list(m)
            if isinstance(m, torch.nn.Module):
                return [m]
        return []

    def configure_model(self) -> None:
        """Lightning hook (before fit / test): compile the networks when ``compile`` asks."""
        compile_modules(self.networks(), self.compile_network)

    def configure_callbacks(self) -> list:
        """Lightning hook: progress as ``train step k/total`` over the whole fit and
        ``test case k/N`` (case id, Dice) in test, in place of Lightning's default bar (a
        bar the user chose, or none, is left alone). See :mod:`benchmark.progress_bar`."""
        from benchmark.progress_bar import StepProgressBar, wants_step_bar

        return [StepProgressBar()] if self._trainer is not None and wants_step_bar(self.trainer) else []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        disp = self._register_grad_ok(batch)
        bs = disp.shape[0]
        folds = [metrics.fold_pct(metrics.jacobian_determinant(disp[b])) for b in range(bs)]
        self.log("val/fold_pct", float(np.mean(folds)), sync_dist=True, batch_size=bs)
        if _has_labels(batch):
            labels = self._labels()
            warped = warp(batch["moving_seg"], disp, mode="nearest")
            dices = [metrics.dice(batch["fixed_seg"][b, 0], warped[b, 0], labels, batch["moving_seg"][b, 0])
                     for b in range(bs)]
            self.log("val/dice", float(np.nanmean(dices)), sync_dist=True, prog_bar=True, batch_size=bs)

    def _labels(self) -> list[int]:
        """The Dice/HD95 labels: ``label_ids`` when given, else the data module's declared
        ``label_ids`` (its protocol member, datamodules/base.py ``RegistrationData``)."""
        if self.label_ids is None:
            dm = self.trainer.datamodule if self._trainer is not None else None
            if dm is None:
                raise RuntimeError("label ids unknown: test with a data module (it declares `label_ids`) or set label_ids")
            self.label_ids = [int(v) for v in dm.label_ids]
        return self.label_ids

    def panel_arrays(self, batch: dict[str, Any], disp: torch.Tensor, b: int,
                     record: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        """What the report's qualitative panel shows for case ``b`` of a batch.

        For each view ``a`` in 0, 1, 2, the mid-slice orthogonal to array axis ``a``:
        ``fixed_ax{a}``, ``moving_ax{a}``, ``warped_ax{a}`` (H, W) intensities,
        ``disp_ax{a}`` (2, H, W) the two in-plane displacement components in voxels (array
        axis order), ``jacdet_ax{a}`` (H, W); with labels, ``fixed_seg_ax{a}`` and
        ``warped_seg_ax{a}`` (H, W) label ids for the contours; plus ``kind = "deformable"``.
        Slices keep the report small (a 160×224×192 case is about 1 MB instead of 60 MB of
        volumes). The warped image pads with border values (display only; the metrics warp
        as the conventions say), so samples from outside the moving grid show no black band.
        """
        d = disp[b : b + 1].detach().float()
        warped = warp(batch["moving"][b : b + 1].float(), d, padding_mode="border")[0, 0].cpu().numpy()
        segs = {}
        if _has_labels(batch):
            segs["fixed_seg"] = batch["fixed_seg"][b, 0].detach().cpu().numpy()
            segs["warped_seg"] = warp(batch["moving_seg"][b : b + 1], d.to(batch["moving_seg"].device),
                                      mode="nearest")[0, 0].detach().cpu().numpy()
        fixed = batch["fixed"][b, 0].detach().float().cpu().numpy()
        moving = batch["moving"][b, 0].detach().float().cpu().numpy()
        jac = metrics.jacobian_determinant(d[0].cpu())
        jac = jac.numpy() if isinstance(jac, torch.Tensor) else np.asarray(jac)
        dn = d[0].cpu().numpy()
        out: dict[str, np.ndarray] = {"kind": np.array("deformable")}
        for a in range(dn.shape[0]):
            idx = [slice(None)] * dn.shape[0]
            idx[a] = fixed.shape[a] // 2
            sl = tuple(idx)
            inplane = [c for c in range(dn.shape[0]) if c != a]
            out[f"fixed_ax{a}"] = fixed[sl].astype(np.float32)
            out[f"moving_ax{a}"] = moving[sl].astype(np.float32)
            out[f"warped_ax{a}"] = warped[sl].astype(np.float32)
            out[f"disp_ax{a}"] = np.stack([dn[c][sl] for c in inplane]).astype(np.float32)
            out[f"jacdet_ax{a}"] = jac[sl].astype(np.float32)
            for name, vol in segs.items():
                out[f"{name}_ax{a}"] = np.asarray(vol[sl]).astype(np.int32)
        return out

    def case_records(self, batch: dict[str, Any], disp: torch.Tensor, runtime_s: float, peak_mem_mb: float) -> list[dict[str, Any]]:
        """Every deformable metric of the registry (:mod:`benchmark.core.registry`) for each
        case of a batch, with runtime and memory.

        Unlabelled batches (no ``fixed_seg`` / ``moving_seg``) get NaN Dice and HD95; the
        metrics that need no labels (fold %, SDlogJ, NDV, TRE from landmarks) are computed.
        """
        labelled = _has_labels(batch)
        labels = self._labels() if labelled else []
        warped = warp(batch["moving_seg"], disp, mode="nearest") if labelled else None
        out = []
        for b in range(disp.shape[0]):
            affine = batch["fixed_affine"][b].detach().cpu().numpy()
            fpts = batch.get("fixed_landmarks")
            mpts = batch.get("moving_landmarks")
            res = metrics.deformable_metrics(
                disp[b].detach().float().cpu(),
                fixed_seg=batch["fixed_seg"][b, 0].cpu() if labelled else None,
                warped_seg=warped[b, 0].cpu() if labelled else None,
                labels=labels,
                spacing=spacing_from_affine(affine),
                fixed_points=None if fpts is None else fpts[b].cpu().numpy(),
                moving_points=None if mpts is None else mpts[b].cpu().numpy(),
                moving_affine=batch["moving_affine"][b].cpu().numpy(),
                compute_hd95=self.compute_hd95,
                compute_ndv=self.compute_ndv,
                true_disp=None if batch.get("true_disp") is None else batch["true_disp"][b].detach().cpu(),
                moving_seg=batch["moving_seg"][b, 0].cpu() if labelled else None,
            )
            rec: dict[str, Any] = {
                "case_id": str(batch["case_id"][b]),
                "fixed_id": str(batch["fixed_id"][b]),
                "moving_id": str(batch["moving_id"][b]),
            }
            for m in registry.metrics_of("deformable"):
                if m.column and m.family == "deformable":
                    v = res.get(m.key)
                    rec[m.key] = math.nan if v is None else float(v)
            rec["runtime_s"] = float(runtime_s)
            rec["peak_mem_mb"] = float(peak_mem_mb)
            rec["dice_per_label"] = {str(k): v for k, v in res.get("dice_per_label", {}).items()}
            out.append(rec)
        return out


def _has_labels(batch: dict[str, Any]) -> bool:
    return batch.get("fixed_seg") is not None and batch.get("moving_seg") is not None


class NoRegistration(RegistrationSystem):
    """The ``initial`` row: zero displacement (no registration), same cases and metrics."""

    learns: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__(warmup_calls=0)

    def register(self, batch: dict[str, Any]) -> torch.Tensor:
        f = batch["fixed"]
        return torch.zeros(f.shape[0], f.dim() - 2, *f.shape[2:], device=f.device, dtype=f.dtype)
