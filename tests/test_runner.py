"""The grid runner: config checks, kill and resume, divergence, leaderboard, exact DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmark.core.results import read_cases_csv, read_partial_records
from benchmark.runner import ConfigError, load_grid_config, run_grid

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT), env.get("PYTHONPATH", "")])
    env["WANDB_MODE"] = "offline"
    env["OMP_NUM_THREADS"] = "1"
    env.pop("REGBENCH_KILL_AFTER", None)
    return env


def _regbench(args: list[str], env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    # `-m` (not `-c`): Lightning re-launches the same command line for the other DDP ranks.
    cmd = [sys.executable, "-m", "benchmark.cli", *args]
    return subprocess.run(cmd, env=env or _env(), capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))


SMALL_DATA = {
    "class_path": "datamodules.SyntheticBrainDataModule",
    "init_args": {"size": 16, "n_train": 2, "n_val": 2, "n_test": 3, "seed": 3},
}
TRAINER = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "num_sanity_val_steps": 0}


def _write(tmp_path: Path, cfg: dict, name: str = "grid.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def _base_cfg(methods: dict, **extra) -> dict:
    return {"suite": "t", "seeds": [0], "trainer": dict(TRAINER), "datasets": {"synth": SMALL_DATA}, "methods": methods, **extra}


# ------------------------------------------------------------------------- bad configs
BAD = [
    ({"m": {"class_path": "systems.NoSuchNet"}}, {}, "methods.m.class_path"),
    ({"m": {"class_path": "nosuchpkg.Net"}}, {}, "methods.m.class_path"),
    ({"m": {"class_path": "systems.VoxelMorph", "init_args": {"lamda": 1.0}}}, {}, "methods.m.init_args.lamda"),
    ({"m": {"class_path": "systems.VoxelMorph", "trainer": {"max_stepz": 3}}}, {}, "methods.m.trainer.max_stepz"),
    ({"m": {"class_path": "systems.VoxelMorph", "initargs": {}}}, {}, "methods.m.initargs"),
    ({"m": {"class_path": "systems.VoxelMorph"}}, {"sedes": [0]}, "'sedes'"),
    ({"m": {"class_path": "systems.VoxelMorph"}}, {"loggers": ["mlflow"]}, "loggers"),
]


@pytest.mark.parametrize("methods,extra,key", BAD)
def test_bad_config_fails_before_any_work_naming_the_key(tmp_path, methods, extra, key):
    out = tmp_path / "out"
    cfg = _write(tmp_path, _base_cfg(methods, **extra))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("'", "'")):
        run_grid(cfg, output=str(out))
    assert not out.exists(), "work started before the config was checked"


def test_missing_dataset_path_fails_before_any_work(tmp_path):
    out = tmp_path / "out"
    cfg = _base_cfg({"m": {"class_path": "systems.VoxelMorph"}})
    cfg["datasets"] = {"real": {"class_path": "regbench_test_helpers.FolderData", "init_args": {"root": str(tmp_path / "nope")}}}
    sys.path.insert(0, str(HERE))
    with pytest.raises(ConfigError, match=r"datasets\.real.*nope.*not found"):
        run_grid(_write(tmp_path, cfg), output=str(out))
    assert not out.exists()


def test_cli_reports_config_error(tmp_path):
    cfg = _write(tmp_path, _base_cfg({"m": {"class_path": "systems.VoxelMorph", "init_args": {"lamda": 1}}}))
    res = _regbench(["run", str(cfg), "--output", str(tmp_path / "o")])
    assert res.returncode == 2
    assert "methods.m.init_args.lamda" in res.stderr


# ------------------------------------------------------------------------- kill and resume
def test_resume_after_kill_loses_nothing_and_recomputes_only_missing(tmp_path):
    out = tmp_path / "out"
    cfg = _write(tmp_path, _base_cfg({"killer": {"class_path": "regbench_test_helpers.KillAfter", "init_args": {"shift": 0.25}}}))
    env = _env()
    env["REGBENCH_KILL_AFTER"] = "3"
    first = _regbench(["run", str(cfg), "--output", str(out)], env=env)
    assert first.returncode == -9, first.stderr[-2000:]  # SIGKILL, mid-grid
    exp = out / "synth" / "killer" / "seed0"
    done = read_partial_records(exp)
    assert len(done) == 3
    assert not (exp / "cases.csv").exists()
    assert json.loads((exp / "run.json").read_text())["status"] == "running"
    # The experiment before it is complete and will be skipped.
    assert json.loads((out / "synth" / "initial" / "seed0" / "run.json").read_text())["status"] == "complete"

    second = _regbench(["run", str(cfg), "--output", str(out)])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "[skip]" in second.stdout and "initial" in second.stdout
    run = json.loads((exp / "run.json").read_text())
    assert run["status"] == "complete"
    assert run["attempts"][-1]["cases_resumed"] == 3
    assert run["attempts"][-1]["cases_computed"] == 3
    rows = read_cases_csv(exp / "cases.csv")
    assert len(rows) == 6 and len({r["case_id"] for r in rows}) == 6
    by_id = {r["case_id"]: r for r in rows}
    for rec in done:  # what the killed run had finished is kept as it was
        assert by_id[rec["case_id"]]["dice"] == pytest.approx(rec["dice"])
        assert by_id[rec["case_id"]]["runtime_s"] == pytest.approx(rec["runtime_s"])
    assert not (exp / "partial").exists()
    # A third run does nothing.
    third = _regbench(["run", str(cfg), "--output", str(out)])
    assert third.returncode == 0 and third.stdout.count("[skip]") == 2


# ------------------------------------------------------------------------- divergence
def test_diverging_experiment_is_recorded_failed_and_grid_goes_on(tmp_path):
    out = tmp_path / "out"
    cfg = _base_cfg(
        {
            "nan": {"class_path": "regbench_test_helpers.DivergingNet", "trainer": {"max_steps": 5}},
            "zero": {"class_path": "regbench_test_helpers.KillAfter"},
        }
    )
    sys.path.insert(0, str(HERE))
    statuses = run_grid(_write(tmp_path, cfg), output=str(out), log=lambda *_: None)
    assert statuses[str(out / "synth" / "nan" / "seed0")] == "failed"
    assert statuses[str(out / "synth" / "zero" / "seed0")] == "complete"
    run = json.loads((out / "synth" / "nan" / "seed0" / "run.json").read_text())
    assert run["status"] == "failed" and "non-finite" in run["error"]
    md = (out / "leaderboard.md").read_text()
    assert "| zero |" in md and "| initial |" in md and "synth/nan/seed0: failed" in md


# ------------------------------------------------------------------------- leaderboard
def test_leaderboard_columns_and_initial_row(tmp_path):
    out = tmp_path / "out"
    # a learned method runs every seed (one that does not learn would run only the first)
    cfg = _base_cfg({"shift": {"class_path": "reliability_helpers.LearnedShift", "init_args": {"shift": 0.5},
                               "trainer": {"max_steps": 2}}}, seeds=[0, 1])
    sys.path.insert(0, str(HERE))
    run_grid(_write(tmp_path, cfg), output=str(out), log=lambda *_: None)
    import csv

    rows = list(csv.DictReader(open(out / "leaderboard.csv")))
    assert [r["method"] for r in rows][0] == "initial"
    cols = rows[0].keys()
    for m in ("dice", "hd95", "tre", "fold_pct", "sdlogj", "ndv_pct", "runtime_s"):
        for s in ("mean", "std", "median"):
            assert f"{m}_{s}" in cols
    shift = next(r for r in rows if r["method"] == "shift")
    assert int(shift["n_cases"]) == 12 and int(shift["n_seeds"]) == 2
    # The per-case file holds every metric under evaluate's names.
    cases = read_cases_csv(out / "synth" / "shift" / "seed0" / "cases.csv")
    for key in ("dataset", "method", "seed", "case_id", "fixed_id", "moving_id", "dice", "hd95", "tre",
                "fold_pct", "sdlogj", "sdlogj_l2r", "ndv_pct", "runtime_s", "peak_mem_mb"):
        assert key in cases[0]
    # A constant shift of 0.5 voxel moves every landmark: TRE differs from the initial row.
    init = read_cases_csv(out / "synth" / "initial" / "seed0" / "cases.csv")
    assert {r["case_id"] for r in init} == {r["case_id"] for r in cases}
    assert any(abs(a["tre"] - b["tre"]) > 1e-3 for a, b in zip(sorted(init, key=lambda r: r["case_id"]), sorted(cases, key=lambda r: r["case_id"])))


def test_config_loads_quickstart():
    cfg = load_grid_config(ROOT / "benchmark" / "configs" / "quickstart.yaml")
    assert "voxelmorph" in cfg.methods and "syn" in cfg.methods
    assert cfg.datasets["anatomy_brain"].cls.__name__ == "AnatomyBrainDataModule"
    assert cfg.budget == {"max_steps": 500, "max_time_s": None}


# ------------------------------------------------------------------------- exact DDP
def test_ddp_two_processes_give_the_same_rows_as_one(tmp_path):
    """2 CPU processes (gloo): every test case exactly once, metrics equal to the 1-process run."""
    syn = {"class_path": "systems.SyN", "init_args": {"preset": "fast", "scales": [4, 2], "iterations": [15, 5],
                                                  "progress": False}}
    rows = {}
    for n in (1, 2):
        trainer = dict(TRAINER, devices=n)
        if n > 1:
            trainer["strategy"] = "ddp"
        cfg = _write(tmp_path, {"suite": "ddp", "seeds": [0], "trainer": trainer, "datasets": {"synth": SMALL_DATA},
                                "methods": {"syn": syn}}, name=f"ddp{n}.yaml")
        res = _regbench(["run", str(cfg), "--output", str(tmp_path / f"out{n}")], timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        exp = tmp_path / f"out{n}" / "synth" / "syn" / "seed0"
        run = json.loads((exp / "run.json").read_text())
        assert run["status"] == "complete" and run["world_size"] == n
        rows[n] = read_cases_csv(exp / "cases.csv")
    ids1 = [r["case_id"] for r in rows[1]]
    ids2 = [r["case_id"] for r in rows[2]]
    assert len(ids2) == len(set(ids2)) == 6, "a case is missing or counted twice under DDP"
    assert sorted(ids1) == sorted(ids2)
    by1 = {r["case_id"]: r for r in rows[1]}
    for r in rows[2]:
        for key in ("dice", "tre", "fold_pct", "sdlogj", "ndv_pct"):
            assert r[key] == pytest.approx(by1[r["case_id"]][key], rel=1e-4, abs=1e-5), (r["case_id"], key)


def test_lightning_cli_fit_takes_the_same_blocks(tmp_path):
    """`regbench fit` runs one experiment through LightningCLI with the grid's class paths."""
    res = _regbench(["fit", "--model", "systems.VoxelMorph", "--data", "datamodules.SyntheticBrainDataModule",
                     "--data.init_args.size", "16", "--data.init_args.n_train", "2", "--data.init_args.n_val", "2",
                     "--data.init_args.n_test", "2", "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
                     "--trainer.default_root_dir", str(tmp_path)])
    assert res.returncode == 0, res.stderr[-2000:]
    assert list(tmp_path.rglob("*.ckpt")), "no checkpoint written by the fit"


def test_lightning_cli_takes_pose_systems_and_the_spine_data(capsys):
    """`regbench fit/test` accept every system (pose ones included: their base is
    BenchmarkSystem, not RegistrationSystem) and every data module (RegistrationDataModule)."""
    from benchmark.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["test", "--model", "systems.InitialPose", "--data", "datamodules.SpineDRRDataModule", "--print_config"])
    out = capsys.readouterr()
    assert exc.value.code in (0, None), out.err[-2000:]
    printed = yaml.safe_load(out.out)
    assert printed["model"]["class_path"] in ("systems.InitialPose", "systems.pose_base.InitialPose")
    assert printed["data"]["class_path"] in ("datamodules.SpineDRRDataModule", "datamodules.spine.SpineDRRDataModule")


# ------------------------------------------------------------------------- config conveniences
def test_env_variables_and_set_overrides_name_the_key(tmp_path, monkeypatch):
    sys.path.insert(0, str(HERE))
    cfg = _base_cfg({"m": {"class_path": "systems.VoxelMorph"}})
    cfg["datasets"] = {"real": {"class_path": "regbench_test_helpers.FolderData", "init_args": {"root": "${REGBENCH_TEST_ROOT}"}}}
    path = _write(tmp_path, cfg)
    monkeypatch.delenv("REGBENCH_TEST_ROOT", raising=False)
    with pytest.raises(ConfigError, match=r"datasets\.real\.init_args\.root.*REGBENCH_TEST_ROOT is not set"):
        load_grid_config(path)
    monkeypatch.setenv("REGBENCH_TEST_ROOT", str(tmp_path))
    got = load_grid_config(path)
    assert got.datasets["real"].init_args["root"] == str(tmp_path)
    # --set wins over the file (and over the variable it named), values are YAML-typed.
    monkeypatch.delenv("REGBENCH_TEST_ROOT")
    got = load_grid_config(path, overrides=[f"datasets.real.init_args.root={tmp_path}", "methods.m.trainer.max_steps=7",
                                            "methods.m.init_args.lambda_=0.5"])
    assert got.datasets["real"].init_args["root"] == str(tmp_path)
    assert got.methods["m"].trainer["max_steps"] == 7 and got.methods["m"].init_args["lambda_"] == 0.5
    # a default inside the reference applies when the variable is unset
    cfg["datasets"]["real"]["init_args"]["root"] = "${REGBENCH_TEST_ROOT:-" + str(tmp_path) + "}"
    assert load_grid_config(_write(tmp_path, cfg, "g2.yaml")).datasets["real"].init_args["root"] == str(tmp_path)
    with pytest.raises(ConfigError, match=r"--set methods\.m\.class_path\.x: methods\.m\.class_path is not a mapping"):
        load_grid_config(path, overrides=["methods.m.class_path.x=1", f"datasets.real.init_args.root={tmp_path}"])


# ------------------------------------------------------------------------- report inputs
def test_panel_of_the_first_case_and_learn2reg_fields_for_unlabelled_data(tmp_path):
    import nibabel as nib
    import numpy as np

    sys.path.insert(0, str(HERE))
    out = tmp_path / "out"
    cfg = _base_cfg({"shift": {"class_path": "regbench_test_helpers.KillAfter", "init_args": {"shift": 0.5}}})
    cfg["datasets"] = {"nolab": {"class_path": "regbench_test_helpers.UnlabelledData"}}
    statuses = run_grid(_write(tmp_path, cfg), output=str(out), log=lambda *_: None, leaderboard=False)
    assert set(statuses.values()) == {"complete"}
    exp = out / "nolab" / "shift" / "seed0"
    rows = read_cases_csv(exp / "cases.csv")
    assert all(np.isnan(r["dice"]) for r in rows)  # no labels: no Dice, and no crash
    assert all(r["fold_pct"] == 0.0 for r in rows)
    # Learn2Reg fields: [X, Y, Z, 3] voxels, one per case, the constant shift we predicted.
    for r in rows:
        f = exp / "fields" / f"disp_{r['fixed_id']}_{r['moving_id']}.nii.gz"
        arr = np.asarray(nib.load(f).dataobj)
        assert arr.shape == (16, 16, 16, 3) and np.allclose(arr, 0.5)
    # The panel is the first test case, same case for every method of the dataset.
    first = sorted(r["case_id"] for r in rows)[0]
    for method in ("shift", "initial"):
        with np.load(out / "nolab" / method / "seed0" / "panel.npz") as z:
            assert str(z["case_id"]) == first and str(z["kind"]) == "deformable"
            for a in range(3):
                assert z[f"fixed_ax{a}"].shape == (16, 16) and z[f"disp_ax{a}"].shape == (2, 16, 16)
                assert np.allclose(z[f"jacdet_ax{a}"], 1.0)
            expected = 0.5 if method == "shift" else 0.0
            assert np.allclose(z["disp_ax0"], expected)
            # zero field: warped is the moving slice; a half-voxel shift changes it
            assert np.allclose(z["warped_ax2"], z["moving_ax2"]) == (method == "initial")


def test_pose_records_get_the_2d3d_columns(tmp_path):
    from benchmark.core.results import POSE_CASE_COLUMNS, write_cases_csv

    recs = [{"case_id": "c1", "mtre_mm": 1.5, "ptre_mm": 1.0, "rot_err_deg": 0.5, "trans_err_mm": 2.0,
             "success_10mm": 1.0, "success_2mm": 1.0, "runtime_s": 0.1, "peak_mem_mb": 3.0, "mtre_initial_mm": 30.0}]
    path = write_cases_csv(tmp_path / "cases.csv", recs)
    header = path.read_text().splitlines()[0].split(",")
    assert header == POSE_CASE_COLUMNS + ["mtre_initial_mm"]
    assert "dice" not in header
    assert read_cases_csv(path)[0]["mtre_mm"] == 1.5


def test_iterative_methods_get_the_batch_as_learned_ones_do_and_no_copy_is_timed(monkeypatch):
    """Same timing rule for every method: ``register`` alone is timed. An iterative method
    got a copy of the whole batch made inside the timer (0.13 s and ~250 MB at 160×192×224,
    charged to SyN and the ``initial`` row, not to learned methods). Now a batch of normal
    tensors (the runner's ``inference_mode=False``) reaches ``register`` as is, and tensors made
    under inference mode are copied once, before the timer."""
    import torch

    from benchmark.core import timing
    from systems.base import NoRegistration

    seen: list[dict] = []

    class Probe(NoRegistration):
        def register(self, batch):
            seen.append({k: v for k, v in batch.items()})
            x = batch["fixed"].clone().requires_grad_(True)  # autograd must work, as SyN's does
            (x * batch["moving"]).sum().backward()
            return super().register(batch)

    timed: list[bool] = []
    real = timing.timed_call
    monkeypatch.setattr("systems.base.timed_call", lambda fn, dev: (timed.append(True), real(fn, dev))[1])
    copies_in_timer: list[int] = []
    clone = torch.Tensor.clone

    def counting_clone(t, *a, **k):
        copies_in_timer.append(len(timed))
        return clone(t, *a, **k)

    g = torch.Generator().manual_seed(0)
    batch = {"fixed": torch.rand(1, 1, 6, 7, 5, generator=g), "moving": torch.rand(1, 1, 6, 7, 5, generator=g)}
    sys_ = Probe()
    sys_.on_test_start()
    monkeypatch.setattr(sys_, "case_records", lambda b, d, s, m: [])
    sys_.test_step(batch, 0)
    assert all(seen[-1][k] is batch[k] for k in batch)  # the very tensors: nothing copied
    with torch.inference_mode():
        inf = {k: v.clone() for k, v in batch.items()}
    monkeypatch.setattr(torch.Tensor, "clone", counting_clone)
    timed.clear()
    sys_.test_step(inf, 1)
    monkeypatch.setattr(torch.Tensor, "clone", clone)
    assert not any(v.is_inference() for v in seen[-1].values())
    assert copies_in_timer[:2] == [0, 0]  # both inputs copied before the (only) timed call began
