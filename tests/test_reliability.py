"""Nothing lost, nothing repeated, nothing silent (issue 18), budgets (issue 13), signals and
--threads (issue 21). Each test was written against the behaviour before the fix and fails
there: two runs in one folder, exact resume of a killed fit, bad values that deleted a
finished result, postgresql:// URLs, resumed sweeps repeating trials, torn partial lines,
tracebacks and silently accepted inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from benchmark.core.results import PartialCaseLog, read_cases_csv, read_partial_records
from benchmark.runner import ConfigError, experiments, load_grid_config, run_grid

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

DATA = {"class_path": "datamodules.SyntheticBrainDataModule",
        "init_args": {"size": 16, "n_train": 3, "n_val": 2, "n_test": 3, "seed": 3, "train_pairs_per_epoch": 4,
                      "val_pairs": 1}}
TRAINER = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "num_sanity_val_steps": 0}
TINY_VM = {"enc": [4, 8, 8, 8], "dec": [8, 8, 8, 8, 8, 4, 4], "lr": 0.01, "compute_hd95": False, "compute_ndv": False,
           "ncc_window": 5}
ZERO = {"class_path": "regbench_test_helpers.KillAfter", "init_args": {"shift": 0.25}}


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT), env.get("PYTHONPATH", "")])
    env["WANDB_MODE"] = "offline"
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    for k in ("REGBENCH_KILL_AFTER", "REGBENCH_KILL_AT_STEP"):
        env.pop(k, None)
    env.update(extra)
    return env


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "benchmark.cli", *args]


def _regbench(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(*args), env=env or _env(), capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _cfg(methods: dict, **extra) -> dict:
    return {"suite": "rel", "seeds": [0], "trainer": dict(TRAINER), "datasets": {"synth": DATA}, "methods": methods, **extra}


def _run_json(exp: Path) -> dict:
    return json.loads((exp / "run.json").read_text())


def _one_line_no_traceback(res: subprocess.CompletedProcess, *needles: str) -> None:
    err = res.stderr.strip()
    assert "Traceback" not in res.stderr + res.stdout, res.stderr[-2000:]
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


# ------------------------------------------------------------------------- 1. locks
def test_lock_names_its_holder_and_dies_with_it(tmp_path):
    from benchmark.reliability import ExperimentLock

    path = tmp_path / "locks" / "x.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, %r); from benchmark.reliability import ExperimentLock;"
        "l = ExperimentLock(%r); assert l.acquire(); print('held', flush=True); time.sleep(60)") % (str(ROOT), str(path))],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        mine = ExperimentLock(path)
        assert not mine.acquire()
        assert mine.holder()["pid"] == holder.pid
        holder.kill()  # a holder killed with -9 leaves no stale lock behind
        holder.wait(timeout=10)
        assert mine.acquire()
        assert mine.holder()["pid"] == os.getpid()
        mine.release()
    finally:
        if holder.poll() is None:
            holder.kill()


@pytest.mark.slow
def test_two_runs_into_one_folder_end_complete_without_duplicates(tmp_path):
    gate = tmp_path / "gate"
    slow = {"class_path": "reliability_helpers.SlowZero", "init_args": {"seconds": 0.05, "gate": str(gate)}}
    cfg = _write(tmp_path / "g.yaml", _cfg({"slow": slow, "zero": ZERO}))
    out = tmp_path / "out"
    popen = {"env": _env(), "cwd": str(ROOT), "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    first = subprocess.Popen(_cmd("run", str(cfg), "--output", str(out)), **popen)
    second = None
    try:
        run_json = out / "synth" / "slow" / "seed0" / "run.json"
        t0 = time.time()
        while not (run_json.exists() and '"running"' in run_json.read_text()):  # first is inside the slow one
            assert time.time() - t0 < 120 and first.poll() is None, "the first run never started its slow experiment"
            time.sleep(0.05)
        second = subprocess.Popen(_cmd("run", str(cfg), "--output", str(out)), **popen)
        import threading

        threading.Timer(120, lambda: gate.write_text("open")).start()  # never hang when no "[wait]" comes
        lines = []
        for line in second.stdout:  # the second run goes past the held experiment, then waits for it
            lines.append(line)
            if line.startswith("[wait]"):
                break
        gate.write_text("open")
        b_out, b_err = second.communicate(timeout=300)
        a_out, a_err = first.communicate(timeout=300)
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
    b_out = "".join(lines) + b_out
    assert first.returncode == 0, a_err[-2000:]
    assert second.returncode == 0, b_err[-2000:]
    assert "[held]" in b_out and f"pid {first.pid}" in b_out, b_out
    assert b_out.index("[held]") < b_out.index("/zero/seed0") < b_out.index("[wait]"), b_out
    for method in ("initial", "slow", "zero"):
        exp = out / "synth" / method / "seed0"
        assert _run_json(exp)["status"] == "complete", method
        ids = [r["case_id"] for r in read_cases_csv(exp / "cases.csv")]
        assert len(ids) == len(set(ids)) == 6, (method, ids)
    md = (out / "leaderboard.md").read_text()
    assert "| slow |" in md and "| zero |" in md and "No complete experiment" not in md


# ------------------------------------------------------------------------- 2. exact resume
@pytest.mark.slow
def test_fit_killed_mid_epoch_resumes_to_the_uninterrupted_metrics(tmp_path):
    vm = {"class_path": "reliability_helpers.KillAtStep", "init_args": dict(TINY_VM)}
    cfg = _write(tmp_path / "g.yaml", _cfg({"vm": vm}, include_initial=False, checkpoint_every_n_steps=5,
                                           budget={"max_steps": 22}))
    straight = _regbench("run", str(cfg), "--output", str(tmp_path / "a"))
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = _regbench("run", str(cfg), "--output", str(tmp_path / "b"), env=_env(REGBENCH_KILL_AT_STEP="13"))
    assert killed.returncode == -9  # killed at step 13; the last checkpoint is step 10, mid-epoch (4 steps/epoch)
    resumed = _regbench("run", str(cfg), "--output", str(tmp_path / "b"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = (tmp_path / d / "synth" / "vm" / "seed0" for d in "ab")
    rows_a = {r["case_id"]: r for r in read_cases_csv(a / "cases.csv")}
    rows_b = {r["case_id"]: r for r in read_cases_csv(b / "cases.csv")}
    assert rows_a.keys() == rows_b.keys() and len(rows_a) == 6
    for cid, ra in rows_a.items():
        for key in ("dice", "tre", "fold_pct", "sdlogj", "sdlogj_l2r"):
            assert ra[key] == rows_b[cid][key] or (np.isnan(ra[key]) and np.isnan(rows_b[cid][key])), (cid, key)
    fit = _run_json(b)["fit"]
    assert fit["steps"] == 22 and [r["from_step"] for r in fit["resumes"]] == [10]
    assert _run_json(a)["fit"]["resumes"] == []


# ------------------------------------------------------------------------- 3. bad values
@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A complete one-experiment result folder (``out/``) and its config (``g.yaml``)."""
    root = tmp_path_factory.mktemp("finished")
    cfg = _write(root / "g.yaml", _cfg({"zero": ZERO}, include_initial=False))
    run_grid(cfg, output=str(root / "out"), log=lambda *_: None, leaderboard=False)
    return root


@pytest.mark.parametrize("override,key", [
    ("methods.zero.trainer.max_steps=-5", "methods.zero.trainer.max_steps"),
    ("trainer.max_steps=0", "trainer.max_steps"),
    ("trainer.devices=-3", "trainer.devices"),
    ("datasets.synth.init_args.test_pairs=0", "datasets.synth.init_args.test_pairs"),
    ("budget.max_steps=0", "budget.max_steps"),
    ("budget.max_steps=-5", "budget.max_steps"),
    ("budget.max_time_s=fast", "budget.max_time_s"),
    ("budget.epochs=3", "budget.epochs"),
    ("checkpoint_every_n_steps=0", "checkpoint_every_n_steps"),
])
def test_bad_value_is_refused_at_load_and_the_finished_result_stays(finished, tmp_path, override, key):
    import shutil

    cfg = shutil.copy(finished / "g.yaml", tmp_path / "g.yaml")
    out = shutil.copytree(finished / "out", tmp_path / "out")
    cases = out / "synth" / "zero" / "seed0" / "cases.csv"
    before = cases.read_bytes()
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run_grid(cfg, output=str(out), log=lambda *_: None, leaderboard=False, overrides=[override])
    assert cases.read_bytes() == before


def test_redo_that_fails_keeps_the_previous_result_in_place(tmp_path):
    out = tmp_path / "out"
    cfg = _cfg({"m": ZERO}, include_initial=False)
    run_grid(_write(tmp_path / "a.yaml", cfg), output=str(out), log=lambda *_: None, leaderboard=False)
    exp = out / "synth" / "m" / "seed0"
    before, old_hash = (exp / "cases.csv").read_bytes(), _run_json(exp)["config_hash"]
    cfg["methods"]["m"] = {"class_path": "regbench_test_helpers.DivergingNet", "trainer": {"max_steps": 5}}
    logs: list[str] = []
    st = run_grid(_write(tmp_path / "b.yaml", cfg), output=str(out), log=logs.append, leaderboard=False)
    assert st[str(exp)] == "failed"
    assert (exp / "cases.csv").read_bytes() == before  # the complete result was not deleted
    assert _run_json(exp)["status"] == "complete" and _run_json(exp)["config_hash"] == old_hash
    assert any("stays in" in m for m in logs), logs
    # a redo that completes replaces it
    cfg["methods"]["m"] = {"class_path": "regbench_test_helpers.KillAfter", "init_args": {"shift": 0.5}}
    st = run_grid(_write(tmp_path / "c.yaml", cfg), output=str(out), log=lambda *_: None, leaderboard=False)
    assert st[str(exp)] == "complete" and _run_json(exp)["replaces_config_hash"] == old_hash
    assert (exp / "cases.csv").read_bytes() != before
    assert not [p for p in exp.parent.iterdir() if p.name.startswith(".")], list(exp.parent.iterdir())


# ------------------------------------------------------------------------- 4. PostgreSQL URLs
def test_bare_postgresql_url_gets_the_installed_driver():
    import importlib.util

    from sweeps.study import StorageError, resolve_storage_driver

    driver = "psycopg" if importlib.util.find_spec("psycopg") else "psycopg2" if importlib.util.find_spec("psycopg2") else None
    if driver is None:
        with pytest.raises(StorageError, match="no PostgreSQL driver"):
            resolve_storage_driver("postgresql://u@h/db")
    else:
        assert resolve_storage_driver("postgresql://u:pw@h:5/db") == f"postgresql+{driver}://u:pw@h:5/db"
        assert resolve_storage_driver("postgres://u@h/db") == f"postgresql+{driver}://u@h/db"
    assert resolve_storage_driver("sqlite:///x.db") == "sqlite:///x.db"
    with pytest.raises(StorageError, match="nosuchdriver"):
        resolve_storage_driver("postgresql+nosuchdriver://u@h/db")


from test_sweeps import postgres_url  # noqa: E402,F401  (the throwaway-cluster fixture, shared)


def test_postgresql_url_as_the_readme_writes_it_reaches_the_database(postgres_url):  # noqa: F811 (fixture)
    import uuid

    import optuna

    from sweeps.study import make_storage

    bare = "postgresql://" + postgres_url.split("://", 1)[1]
    name = f"regbench-rel-{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(storage=make_storage(bare, 10.0), study_name=name)
    try:
        study.enqueue_trial({"x": 1.0})
        study.optimize(lambda t: t.suggest_float("x", 0, 2), n_trials=1)
        assert optuna.load_study(study_name=name, storage=postgres_url).best_value == 1.0
    finally:
        optuna.delete_study(study_name=name, storage=postgres_url)


def test_unreachable_database_and_bad_n_trials_are_one_line(tmp_path):
    sw = {"class_path": "systems.diffop.DiffOpNet", "init_args": {"width": 2, "ncc_window": [3, 3, 5]},
          "trainer": {"max_steps": 2}}
    cfg = _write(tmp_path / "g.yaml", _cfg({"diffop": sw}))
    res = _regbench("sweep", str(cfg), "--method", "diffop", "--n-trials", "1", "--output", str(tmp_path / "s"),
                    "--storage", "postgresql://me:secret@127.0.0.1:1/optuna")
    assert res.returncode == 2
    _one_line_no_traceback(res, "postgresql://me:***@127.0.0.1:1/optuna")
    assert "secret" not in res.stderr
    for n in ("0", "-3"):
        res = _regbench("sweep", str(cfg), "--method", "diffop", "--n-trials", n, "--output", str(tmp_path / "s"))
        assert res.returncode == 2
        _one_line_no_traceback(res, "--n-trials")
        assert "best.yaml" not in res.stdout + res.stderr


# ------------------------------------------------------------------------- 5. resumed sweeps
@pytest.mark.slow
def test_resumed_sweep_never_repeats_a_parameter_set(tmp_path):
    from sweeps.study import SweepSpec, open_study, run_sweep, resolve_spec

    sw = {"class_path": "systems.diffop.DiffOpNet",
          "init_args": {"width": 2, "ncc_window": [3, 3, 5], "lr": 0.01, "compute_hd95": False, "compute_ndv": False},
          "trainer": {"max_steps": 1, "max_epochs": 10, "limit_val_batches": 1}}
    data = {**DATA, "init_args": {**DATA["init_args"], "n_val": 2, "val_pairs": 1}}
    cfg = _write(tmp_path / "g.yaml", {**_cfg({"diffop": sw}), "datasets": {"synth": data}})
    out = tmp_path / "sweep"
    for n in (2, 4):  # the second invocation resumes the same study
        run_sweep(SweepSpec(config=str(cfg), method="diffop", n_trials=n, prune=False, output=str(out)), log=lambda *_: None)
    trials = open_study(resolve_spec(SweepSpec(config=str(cfg), method="diffop", n_trials=4, output=str(out)))).trials
    params = [tuple(sorted(t.params.items())) for t in trials if t.state.name == "COMPLETE"]
    assert len(params) == 4 and len(set(params)) == 4, params


# ------------------------------------------------------------------------- 6. torn lines
def test_record_after_a_torn_line_is_not_lost(tmp_path):
    log = PartialCaseLog(tmp_path, 0)
    log.append({"case_id": "a", "dice": 0.5})
    with open(log.path, "a") as fh:  # a kill inside the next write
        fh.write('{"case_id": "b", "di')
    PartialCaseLog(tmp_path, 0).append({"case_id": "c", "dice": 0.7})
    got = {r["case_id"]: r["dice"] for r in read_partial_records(tmp_path)}
    assert got == {"a": 0.5, "c": 0.7}


# ------------------------------------------------------------------------- 7-9. bad input, one line
def test_run_config_that_is_a_folder_or_binary_and_unwritable_output(tmp_path):
    res = _regbench("run", str(tmp_path))
    assert res.returncode == 2
    _one_line_no_traceback(res, str(tmp_path), "folder")
    binary = tmp_path / "g.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    res = _regbench("run", str(binary))
    assert res.returncode == 2
    _one_line_no_traceback(res, str(binary), "not a text file")
    cfg = _write(tmp_path / "ok.yaml", _cfg({"zero": ZERO}))
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    res = _regbench("run", str(cfg), "--output", str(blocker / "out"))
    assert res.returncode == 2
    _one_line_no_traceback(res, str(blocker / "out"), "cannot write")


def test_corrupt_image_in_a_worker_fails_the_experiment_with_one_line(tmp_path):
    import gzip

    import nibabel as nib

    root = tmp_path / "data"
    root.mkdir()
    aff = np.eye(4)
    g = np.random.default_rng(0)
    for sid in ("a", "b", "c"):
        nib.save(nib.Nifti1Image(g.random((12, 12, 12)).astype(np.float32), aff), root / f"{sid}.nii.gz")
        nib.save(nib.Nifti1Image((g.random((12, 12, 12)) * 3).astype(np.int16), aff), root / f"{sid}_seg.nii.gz")
    raw = gzip.decompress((root / "c.nii.gz").read_bytes())
    (root / "c.nii.gz").write_bytes(gzip.compress(raw[: 352 + 100]))  # header intact, voxels cut short
    data = {"class_path": "datamodules.NiftiPairsDataModule", "init_args": {"root": str(root), "num_workers": 1}}
    cfg = _write(tmp_path / "g.yaml", {**_cfg({"zero": ZERO}, include_initial=False), "datasets": {"nifti": data}})
    res = _regbench("run", str(cfg), "--output", str(tmp_path / "out"))
    if res.returncode == 2 and "c.nii.gz" in res.stderr:
        pytest.skip("the config check already reads the voxels and names the file (nothing reaches a worker)")
    assert res.returncode == 1, res.stderr[-2000:]
    assert "Traceback" not in res.stdout + res.stderr, (res.stdout + res.stderr)[-3000:]
    failed = [ln for ln in res.stdout.splitlines() if ln.startswith("[failed]")]
    assert len(failed) == 1 and "c.nii.gz" in failed[0], res.stdout
    run = _run_json(tmp_path / "out" / "nifti" / "zero" / "seed0")
    assert run["status"] == "failed" and "\n" not in run["error"] and "c.nii.gz" in run["error"]


def _segs(tmp_path: Path):
    import nibabel as nib

    seg = np.zeros((10, 10, 10), np.int16)
    seg[2:6, 2:6, 2:6] = 1
    seg[5:9, 5:9, 5:9] = 2
    for name in ("f", "m"):
        nib.save(nib.Nifti1Image(seg, np.eye(4)), tmp_path / f"{name}.nii.gz")
    return tmp_path / "f.nii.gz", tmp_path / "m.nii.gz"


def test_evaluate_refuses_labels_in_neither_map_npz_without_disp_and_mask_on_another_grid(tmp_path):
    import nibabel as nib

    f, m = _segs(tmp_path)
    np.savez(tmp_path / "ok.npz", disp=np.zeros((10, 10, 10, 3), np.float32))
    res = _regbench("evaluate", "--disp", str(tmp_path / "ok.npz"), "--fixed-seg", str(f), "--moving-seg", str(m),
                    "--labels", "1,7,9")
    assert res.returncode == 2
    _one_line_no_traceback(res, "7,9", "f.nii.gz", "m.nii.gz")
    ok = _regbench("evaluate", "--disp", str(tmp_path / "ok.npz"), "--fixed-seg", str(f), "--moving-seg", str(m),
                   "--labels", "1,2")
    assert ok.returncode == 0, ok.stderr
    np.savez(tmp_path / "other.npz", field=np.zeros((10, 10, 10, 3), np.float32))
    res = _regbench("evaluate", "--disp", str(tmp_path / "other.npz"), "--fixed-seg", str(f), "--moving-seg", str(m))
    assert res.returncode == 2
    _one_line_no_traceback(res, "other.npz", "'disp'", "field")
    shifted = np.eye(4)
    shifted[:3, 3] = 2.0
    nib.save(nib.Nifti1Image(np.ones((10, 10, 10), np.uint8), shifted), tmp_path / "mask.nii.gz")
    res = _regbench("evaluate", "--disp", str(tmp_path / "ok.npz"), "--fixed-seg", str(f), "--moving-seg", str(m),
                    "--mask", str(tmp_path / "mask.nii.gz"))
    assert res.returncode == 2
    _one_line_no_traceback(res, "mask.nii.gz", "a mask must lie on the fixed grid", "label maps only")


def test_leaderboard_refuses_truncated_or_non_numeric_cases(tmp_path):
    out = tmp_path / "out"
    run_grid(_write(tmp_path / "g.yaml", _cfg({"zero": ZERO})), output=str(out), log=lambda *_: None, leaderboard=False)
    assert _regbench("leaderboard", str(out), "--format", "md", "--quiet").returncode == 0
    cases = out / "synth" / "zero" / "seed0" / "cases.csv"
    good = cases.read_text()
    lines = good.splitlines()
    cases.write_text("\n".join(lines[:-2]) + "\n" + lines[-2][: len(lines[-2]) // 2])  # cut inside a row
    res = _regbench("leaderboard", str(out), "--format", "md", "--quiet")
    assert res.returncode == 2
    _one_line_no_traceback(res, str(cases))
    header = lines[0].split(",")
    row = lines[1].split(",")
    row[header.index("dice")] = "oops"
    cases.write_text("\n".join([lines[0], ",".join(row), *lines[2:]]) + "\n")
    res = _regbench("leaderboard", str(out), "--format", "md", "--quiet")
    assert res.returncode == 2
    _one_line_no_traceback(res, "column dice", "'oops' is not a number")


# ------------------------------------------------------------------------- budgets and seeds
@pytest.mark.slow
def test_budget_gives_every_learned_method_exactly_its_steps(tmp_path):
    vm = {"class_path": "systems.VoxelMorph", "init_args": dict(TINY_VM)}
    cfg = _cfg({"vm": vm, "vm_short": {**vm, "budget": {"max_steps": 3}}, "zero": ZERO}, include_initial=False,
               budget={"max_steps": 7})
    cfg["trainer"]["max_epochs"] = 1  # one epoch is 4 steps: the budget, not the epoch count, ends training
    out = tmp_path / "out"
    st = run_grid(_write(tmp_path / "g.yaml", cfg), output=str(out), log=lambda *_: None, leaderboard=False)
    assert set(st.values()) == {"complete"}
    fit = _run_json(out / "synth" / "vm" / "seed0")["fit"]
    assert fit["steps"] == 7 and fit["budget"]["max_steps"] == 7 and fit["budget"]["overridden"] is False
    short = _run_json(out / "synth" / "vm_short" / "seed0")["fit"]
    assert short["steps"] == 3 and short["budget"]["overridden"] is True
    import systems

    assert fit["params"] == sum(p.numel() for p in systems.VoxelMorph(**TINY_VM).parameters())
    assert fit["seconds"] > 0 and fit["cpu_seconds"] > 0 and fit["peak_train_mem_mb"] > 0
    rt = [r["runtime_s"] for r in read_cases_csv(out / "synth" / "vm" / "seed0" / "cases.csv")]
    assert fit["registration_s_median"] == pytest.approx(float(np.median(rt)))
    assert _run_json(out / "synth" / "zero" / "seed0")["fit"] is None  # nothing learns: no budget applied
    # the budget is part of the config hash: another budget recomputes, the same one skips
    logs: list[str] = []
    cfg["budget"] = {"max_steps": 8}
    run_grid(_write(tmp_path / "g2.yaml", cfg), output=str(out), log=logs.append, leaderboard=False, methods=["vm", "zero"])
    assert any(m.startswith("[redo]") and "/vm/" in m for m in logs) and any(m.startswith("[skip]") and "/zero/" in m for m in logs)
    assert _run_json(out / "synth" / "vm" / "seed0")["fit"]["steps"] == 8


def test_budget_conflicting_with_a_trainer_limit_names_both(tmp_path):
    cfg = _cfg({"vm": {"class_path": "systems.VoxelMorph", "trainer": {"max_steps": 5}}}, budget={"max_steps": 7})
    with pytest.raises(ConfigError, match=r"methods\.vm\.trainer\.max_steps: conflicts with budget\.max_steps"):
        load_grid_config(_write(tmp_path / "g.yaml", cfg))


def test_methods_that_do_not_learn_run_only_the_first_seed(tmp_path):
    cfg = _cfg({"zero": ZERO, "vm": {"class_path": "systems.VoxelMorph", "init_args": dict(TINY_VM)},
                "syn": {"class_path": "systems.SyN", "init_args": {"preset": "fast"}}}, seeds=[3, 1, 2])
    got = [(e.method_name, e.seed) for e in experiments(load_grid_config(_write(tmp_path / "g.yaml", cfg)))]
    assert got == [("initial", 3), ("zero", 3), ("vm", 3), ("vm", 1), ("vm", 2), ("syn", 3)]


# ------------------------------------------------------------------------- signals, --threads
@pytest.mark.parametrize("sig,code,method", [
    (signal.SIGTERM, 143, {"class_path": "reliability_helpers.SlowZero", "init_args": {"seconds": 0.4}}),
    (signal.SIGINT, 130, {"class_path": "reliability_helpers.SlowLearner",
                          "init_args": {"step_seconds": 0.3, **TINY_VM}, "budget": {"max_steps": 400}}),
])
def test_signal_marks_interrupted_writes_the_leaderboard_and_exits_non_zero(tmp_path, sig, code, method):
    cfg = _write(tmp_path / "g.yaml", _cfg({"slow": method}))
    out = tmp_path / "out"
    exp = out / "synth" / "slow" / "seed0"
    proc = subprocess.Popen(_cmd("run", str(cfg), "--output", str(out)), env=_env(), cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while time.time() - t0 < 120:
            learned = (exp / "ckpt").exists() or (exp / "logs").exists()
            if (exp / "run.json").exists() and (read_partial_records(exp) if "SlowZero" in method["class_path"] else learned):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the run never reached the slow experiment")
        time.sleep(0.5)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert _run_json(exp)["status"] == "interrupted"
    assert _run_json(out / "synth" / "initial" / "seed0")["status"] == "complete"
    md = (out / "leaderboard.md").read_text()
    assert "| initial |" in md and "| slow |" not in md
    if "SlowZero" in method["class_path"]:
        kept = read_partial_records(exp)
        assert kept  # finished cases are kept; the same command resumes, here with --threads
        res = _regbench("run", str(cfg), "--output", str(out), "--threads", "1")
        assert res.returncode == 0, res.stderr[-2000:]
        run = _run_json(exp)
        assert run["status"] == "complete" and run["threads"] == {"intra_op": 1, "inter_op": 1}
        assert run["attempts"][-1]["cases_resumed"] == len(kept)
        ids = [r["case_id"] for r in read_cases_csv(exp / "cases.csv")]
        assert len(ids) == len(set(ids)) == 6
