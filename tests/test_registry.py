"""The metric registry, the declared data-module protocol and the system-owned test loop.

* one registry entry + its function is all a new metric needs: it reaches the case records,
  ``cases.csv``, ``regbench evaluate`` and the leaderboard's columns;
* the dataset kind is declared by the data module (``task``) and recorded in ``run.json``;
  older results without it still load (inferred from their columns);
* every data module implements :class:`datamodules.base.RegistrationData`, and
  ``regbench data check`` works for any module through its ``check()``;
* ``test_step`` returns its records, and the results writer takes them from Lightning's
  ``on_test_batch_end``.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch

from benchmark.core import metrics, registry
from benchmark.core.registry import Metric
from benchmark.core.results import experiment_dir, write_cases_csv
from datamodules.base import CheckLine, RegistrationData, RegistrationDataModule, protocol_problems


def max_disp(case: metrics.DeformableCase) -> float:
    """The new metric of the tests: the largest displacement component (voxels)."""
    return float(case.disp.abs().max())


#: the entry, its function by dotted path as docs/design.md ("Adding a metric") shows
NEW = Metric("max_disp_vox", "max |u| vox", False, 3, unit="vox", label="max |u| (vox)", compute=f"{__name__}.max_disp")


def _batch(shift: float = 0.0) -> tuple[dict[str, Any], torch.Tensor]:
    seg = torch.zeros(1, 1, 8, 8, 8, dtype=torch.int64)
    seg[..., 2:6, 2:6, 2:6] = 1
    img = seg.float()
    batch = {"fixed": img, "moving": img, "fixed_seg": seg, "moving_seg": seg, "fixed_affine": torch.eye(4)[None],
             "moving_affine": torch.eye(4)[None], "case_id": ["a_b"], "fixed_id": ["a"], "moving_id": ["b"]}
    return batch, torch.full((1, 3, 8, 8, 8), shift)


def _write_experiment(root: Path, dataset: str, method: str, records: list[dict], task: str | None) -> None:
    exp = experiment_dir(root, dataset, method, 0)
    exp.mkdir(parents=True)
    write_cases_csv(exp / "cases.csv", [{"dataset": dataset, "method": method, "seed": 0, **r} for r in records], task=task)
    run = {"status": "complete"} | ({"task": task} if task else {})
    (exp / "run.json").write_text(json.dumps(run))


# ----------------------------------------------------------------------------- registry
def test_registry_gives_the_saved_formats() -> None:
    """The registry reproduces the columns and titles the result files and tables had."""
    from benchmark.core.results import case_columns
    from leaderboard.table import DEFORMABLE_METRICS, POSE_METRICS, pose_columns

    ids = ["dataset", "method", "seed", "case_id", "fixed_id", "moving_id"]
    assert case_columns("deformable") == ids + ["dice", "hd95", "tre", "epe_mm", "epe_p90_mm", "fold_pct", "sdlogj",
                                                "sdlogj_l2r", "ndv_pct", "runtime_s", "peak_mem_mb"]
    assert case_columns("pose") == ids + ["mtre_mm", "ptre_mm", "rot_err_deg", "trans_err_mm", "success_10mm",
                                          "success_2mm", "runtime_s", "peak_mem_mb", "est_rx_rad", "est_ry_rad",
                                          "est_rz_rad", "est_tx_mm", "est_ty_mm", "est_tz_mm"]
    assert DEFORMABLE_METRICS == ["dice", "hd95", "tre", "epe_mm", "fold_pct", "sdlogj", "ndv_pct", "runtime_s"]
    assert POSE_METRICS == ["mtre_mm", "ptre_mm", "rot_err_deg", "trans_err_mm", "success_10mm", "success_2mm", "runtime_s"]
    assert [(c[1], c[3], c[4]) for c in pose_columns()] == [
        ("mTRE p50 mm", False, 2), ("mTRE p75 mm", False, 2), ("mTRE p95 mm", False, 2), ("success <10 mm", True, 3),
        ("success <2 mm", True, 3), ("pTRE mm", False, 2), ("rot. err deg", False, 2), ("trans. err mm", False, 2),
        ("runtime s", False, 3)]
    assert registry.paired_metrics() == ["dice", "epe_mm", "tre", "hd95", "mtre_mm"]
    assert registry.metric("dice_robust30").higher_is_better and not registry.metric("hd95").higher_is_better
    with pytest.raises(ValueError, match="unknown task"):
        registry.metrics_of("affine")


def test_success_flags_are_computed_from_the_registry(monkeypatch) -> None:
    """2D/3D metrics with a ``compute`` run inside ``pose_metrics``: a new threshold is one entry."""
    from benchmark.core.drr import CArmGeometry
    from benchmark.core.metrics_pose import pose_metrics

    monkeypatch.setitem(registry.METRICS, "success_5mm",
                        Metric("success_5mm", "success <5 mm", True, 3, family="pose", compute=registry.below("mtre_mm", 5.0)))
    est = torch.tensor([[0.0, 0, 0, 3.0, 0, 0], [0.0, 0, 0, 7.0, 0, 0]], dtype=torch.float64)
    res = pose_metrics(est, torch.zeros(2, 6, dtype=torch.float64), torch.eye(4, dtype=torch.float64)[None],
                       torch.zeros(2, 1, 3, dtype=torch.float64), CArmGeometry(sdd=1000.0, height=8, width=8))
    assert [r["mtre_mm"] for r in res] == pytest.approx([3.0, 7.0])
    assert [r["success_5mm"] for r in res] == [1.0, 0.0] and [r["success_10mm"] for r in res] == [1.0, 1.0]
    assert [r["success_2mm"] for r in res] == [0.0, 0.0]


def test_a_new_metric_flows_to_records_cases_csv_evaluate_and_leaderboard(tmp_path, monkeypatch) -> None:
    """Registering a metric (entry + function) is all it takes: no other file changes."""
    from benchmark.core.results import check_cases_csv
    from benchmark.evaluate import format_table
    from leaderboard.table import build_report, flat_rows
    from leaderboard.write import write_leaderboard
    from systems.base import NoRegistration

    monkeypatch.setitem(registry.METRICS, NEW.key, NEW)
    batch, disp = _batch(0.5)
    assert metrics.deformable_metrics(disp[0])["max_disp_vox"] == pytest.approx(0.5)
    sys_ = NoRegistration()
    sys_.label_ids = [1]
    rec = sys_.case_records(batch, disp, 0.1, 1.0)[0]
    assert rec["max_disp_vox"] == pytest.approx(0.5)
    # cases.csv: a column of its own, before runtime and memory
    path = write_cases_csv(tmp_path / "cases.csv", [rec], task="deformable")
    header = path.read_text().splitlines()[0].split(",")
    assert header.index("ndv_pct") < header.index("max_disp_vox") < header.index("runtime_s")
    bad = path.read_text().replace(repr(rec["max_disp_vox"]), "oops")
    (tmp_path / "bad.csv").write_text(bad)
    assert any("column max_disp_vox: 'oops' is not a number" in p for p in check_cases_csv(tmp_path / "bad.csv"))
    # regbench evaluate's table
    assert "max |u| (vox)" in format_table({"max_disp_vox": 0.5})
    # the leaderboard: a column, its title, its orientation (lower is better: the smaller field is best)
    root = tmp_path / "res"
    recs = {"initial": 0.0, "small": 0.5, "large": 2.0}
    for method, shift in recs.items():
        rows = []
        for k in range(6):
            b, d = _batch(shift + 0.01 * k)
            b["case_id"], b["fixed_id"] = [f"c{k}"], [f"f{k}"]
            rows += sys_.case_records(b, d, 0.1, 1.0)
        _write_experiment(root, "toy", method, rows, "deformable")
    ds = build_report(root).datasets[0]
    assert "max_disp_vox" in ds.metrics and ds.best["max_disp_vox"] == "small"
    assert "max_disp_vox_mean" in flat_rows(ds)[0]
    md = write_leaderboard(root, formats="md,csv").read_text()
    assert "max |u| vox (↓)" in md
    assert "max_disp_vox_mean" in (root / "leaderboard.csv").read_text().splitlines()[0]


# ----------------------------------------------------------------------------- the declared task
def test_task_is_declared_not_guessed(tmp_path) -> None:
    """``run.json``'s ``task`` (from the data module) decides the kind; old results without
    it fall back to the columns."""
    from leaderboard.table import build_report

    pose_rows = [{"case_id": f"c{k}", "fixed_id": "f", "moving_id": "m", "ptre_mm": 1.0 + k, "runtime_s": 0.1}
                 for k in range(4)]
    # a pose data set whose records lack mTRE (no landmarks): still a 2D/3D result
    path = write_cases_csv(tmp_path / "cases.csv", pose_rows, task="pose")
    assert "est_rx_rad" in path.read_text().splitlines()[0]
    assert "dice" not in path.read_text().splitlines()[0]
    _write_experiment(tmp_path / "new", "spine", "initial", pose_rows, "pose")
    _write_experiment(tmp_path / "new", "spine", "gd", pose_rows, "pose")
    assert build_report(tmp_path / "new").datasets[0].kind == "pose"
    # an old result (no task in run.json) keeps the old inference from its columns
    legacy = [dict(r, mtre_mm=2.0) for r in pose_rows]
    _write_experiment(tmp_path / "old", "spine", "initial", legacy, None)
    _write_experiment(tmp_path / "old", "brain", "initial", [{"case_id": "c", "dice": 0.5}], None)
    kinds = {d.name: d.kind for d in build_report(tmp_path / "old").datasets}
    assert kinds == {"spine": "pose", "brain": "deformable"}
    assert registry.legacy_task([{"mtre_mm": 1.0}]) == "pose" and registry.legacy_task([{"dice": 1.0}]) == "deformable"


# ----------------------------------------------------------------------------- the data-module protocol
def test_every_data_module_implements_the_protocol() -> None:
    import datamodules
    from datamodules.spine import SpineDRRDataModule
    from datamodules.synthetic_brain import SyntheticBrainDataModule

    bases = ("PairDataModule", "RegistrationDataModule")
    classes = [getattr(datamodules, n) for n in datamodules.__all__ if n.endswith("DataModule") and n not in bases]
    assert SpineDRRDataModule in classes and len(classes) >= 6
    for cls in classes:
        assert issubclass(cls, RegistrationDataModule), cls
        assert cls.task in registry.TASKS
    assert SpineDRRDataModule.task == "pose" and SyntheticBrainDataModule.task == "deformable"
    spine = SpineDRRDataModule(n_train_cts=1, n_test_cts=1, n_val_cts=0, poses_per_ct=1)
    assert isinstance(spine, RegistrationData) and protocol_problems(spine) == []
    assert spine.label_ids == [] and spine.field_record({}, 0) is None and not spine.export_fields
    assert [ln.text for ln in spine.check() if ln.kind == "problem"] == []


class _Bare(L.LightningDataModule):
    name = "bare"


class ToyData(RegistrationDataModule):
    """A data module outside the suite: ``regbench data check`` runs its ``check()``."""

    name = "toy"
    task = "pose"

    def __init__(self, root: str, size: int = 3) -> None:
        super().__init__()
        self.root, self.size = Path(root), int(size)

    def check(self, resample_labels: bool = False, headers_only: bool = False) -> list[CheckLine]:
        files = sorted(self.root.glob("*.txt"))
        out = [CheckLine.summary("files", len(files)), CheckLine.summary("size", self.size)]
        out += [CheckLine.problem(f"{f}: empty") for f in files if not f.read_text()]
        return out + [CheckLine.note(f"{self.root}: resample_labels={resample_labels}")]


def test_runner_refuses_a_module_without_the_protocol() -> None:
    from benchmark.runner import ConfigError, require_data_protocol

    problems = protocol_problems(_Bare())
    assert problems and "task" in problems[0] and "case_ids" in problems[0] and "check" in problems[0]
    with pytest.raises(ConfigError, match=r"datasets\.bare: _Bare lacks .*task"):
        require_data_protocol(_Bare(), "datasets.bare")
    bad_task = ToyData(".")
    bad_task.task = "affine"
    assert any("declare one of deformable, pose" in p for p in protocol_problems(bad_task))


def test_config_load_refuses_a_module_without_the_protocol(tmp_path) -> None:
    """``load_grid_config`` checks the protocol when it builds each data module (before any
    work), not only the runner when the experiment starts."""
    import yaml

    from benchmark.runner import ConfigError, load_grid_config

    cfg = {"suite": "t", "seeds": [0], "datasets": {"bare": {"class_path": f"{__name__}._Bare"}},
           "methods": {"m": {"class_path": "systems.VoxelMorph"}}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"datasets\.bare: _Bare lacks .*check_inputs"):
        load_grid_config(path, output=str(tmp_path / "out"))


def test_data_check_runs_any_data_module(tmp_path, capsys) -> None:
    from benchmark.cli import main
    from benchmark.datacheck import check_dataset

    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.txt").write_text("")
    path = f"{__name__}.ToyData"
    rep = check_dataset(path, tmp_path, resample_labels=True, size=5, space="ignored: ToyData has no such option")
    assert rep.summary == {"files": 2, "size": 5}
    assert rep.problems == [f"{tmp_path / 'b.txt'}: empty"] and rep.notes == [f"{tmp_path}: resample_labels=True"]
    assert main(["data", "check", "--dataset", path, str(tmp_path)]) == 1
    assert "b.txt: empty" in capsys.readouterr().out
    (tmp_path / "b.txt").write_text("y")
    assert main(["data", "check", "--dataset", path, str(tmp_path)]) == 0
    with pytest.raises(ValueError, match="--dataset 'nope': unknown dataset kind"):
        check_dataset("nope", tmp_path)


# ----------------------------------------------------------------------------- the test loop
def test_test_step_returns_records_and_the_writer_takes_them_from_outputs(tmp_path) -> None:
    """Records, panel and ``cases.csv`` arrive through ``on_test_batch_end``; nothing is set on the system."""
    from benchmark.core.results import read_cases_csv
    from benchmark.runner import ResultsWriter
    from datamodules.synthetic_brain import SyntheticBrainDataModule
    from systems.base import NoRegistration

    class Outputs(L.Callback):
        def __init__(self) -> None:
            self.outputs: list[Any] = []

        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            self.outputs.append(outputs)

    dm = SyntheticBrainDataModule(size=16, n_train=2, n_val=2, n_test=3, test_pairs=2)
    system = NoRegistration()
    before = set(vars(system))
    seen, writer = Outputs(), ResultsWriter(tmp_path, {"dataset": "synth", "method": "initial", "seed": 0})
    L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              inference_mode=False, accelerator="cpu", devices=1, callbacks=[seen, writer]).test(system, datamodule=dm,
                                                                                               verbose=False)
    assert not any(k.endswith("_sink") for k in set(vars(system)) - before)
    recs = [r for o in seen.outputs for r in o["records"]]
    assert [r["case_id"] for r in recs] == dm.case_ids("test") and all(o["estimate"].shape[1] == 3 for o in seen.outputs)
    rows = read_cases_csv(tmp_path / "cases.csv")
    assert [r["case_id"] for r in rows] == sorted(dm.case_ids("test")) and writer.computed == len(recs)
    assert all(math.isclose(r["dice"], s["dice"]) for r, s in zip(rows, sorted(recs, key=lambda r: r["case_id"])))
    with np.load(tmp_path / "panel.npz") as z:
        assert str(z["case_id"]) == dm.case_ids("test")[0] and str(z["kind"]) == "deformable"
    with open(tmp_path / "cases.csv") as fh:
        assert next(csv.reader(fh))[:8] == ["dataset", "method", "seed", "case_id", "fixed_id", "moving_id", "dice", "hd95"]
