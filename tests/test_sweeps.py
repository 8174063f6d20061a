"""`regbench sweep`: search spaces, a pruned 6-trial study with its reports, kill and resume,
two workers on one PostgreSQL study, DDP inside a trial."""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from sweeps.space import SpaceError, check_space, suggest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

DATA = {
    "class_path": "datamodules.SyntheticBrainDataModule",
    "init_args": {"size": 16, "n_train": 3, "n_val": 2, "n_test": 2, "seed": 3, "train_pairs_per_epoch": 2},
}
DIFFOP = {
    "class_path": "systems.diffop.DiffOpNet",
    "init_args": {"width": 2, "ncc_window": [3, 3, 5], "lr": 0.01, "compute_hd95": False, "compute_ndv": False},
    "trainer": {"max_steps": 6, "max_epochs": 10},
}
TRAINER = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "num_sanity_val_steps": 0,
           "log_every_n_steps": 1}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _config(tmp_path: Path, trainer: dict | None = None, name: str = "grid.yaml") -> Path:
    cfg = {"suite": "tiny", "seeds": [0], "trainer": dict(trainer or TRAINER), "datasets": {"synth": DATA},
           "methods": {"diffop": DIFFOP}}
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def _sweep_cmd(cfg: Path, out: Path, *extra: str) -> list[str]:
    # `-m` like `regbench`: the module is what the local workers re-run.
    return [sys.executable, "-m", "sweeps.cli", str(cfg), "--method", "diffop", "--output", str(out), *extra]


def _sweep(cfg: Path, out: Path, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(_sweep_cmd(cfg, out, *extra), env=_env(), capture_output=True, text=True, timeout=timeout,
                          cwd=str(ROOT))


def _load(storage: str, name: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=storage)


# ------------------------------------------------------------------------- spaces
def test_every_declared_space_is_valid_and_suggests_in_range():
    import optuna

    from systems.diffop import DiffOpNet
    from systems.syn import SyN
    from systems.voxelmorph import VoxelMorph

    for cls in (DiffOpNet, VoxelMorph, SyN):
        check_space(cls.search_space, cls)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        for _ in range(5):
            trial = study.ask()
            suggest(trial, cls.search_space)
            for k, v in trial.params.items():  # raw names (indexed ones like smoothing_mm.0 too)
                spec = cls.search_space[k]
                if spec["type"] != "categorical":
                    assert spec["low"] <= v <= spec["high"], (cls.__name__, k, v)
    assert set(DiffOpNet.search_space) == {"gamma", "lambda_", "smoothing_mm.0", "smoothing_mm.1", "smoothing_mm.2"}


@pytest.mark.parametrize("space,msg", [
    ({}, "empty"),
    ({"lambda_": {"type": "float", "low": 1.0, "high": 0.5}}, "low < high"),
    ({"lambda_": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}, "log"),
    ({"lambda_": {"type": "gaussian"}}, "type"),
    ({"lambda_": {"type": "float", "low": 0.1, "high": 1.0, "lg": True}}, "unknown key"),
    ({"nope": {"type": "float", "low": 0.1, "high": 1.0}}, "not an argument"),
])
def test_bad_spaces_are_refused_naming_the_parameter(space, msg):
    from systems.voxelmorph import VoxelMorph

    with pytest.raises(SpaceError, match=msg):
        check_space(space, VoxelMorph)


# ------------------------------------------------------------------------- a study
def test_six_trial_sweep_prunes_and_writes_best_block_and_plots(tmp_path):
    from benchmark.runner import load_grid_config

    cfg = _config(tmp_path)
    out = tmp_path / "sweep"
    res = _sweep(cfg, out, "--n-trials", "6", "--prune-startup", "2", "--seed", "0")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials"]["complete"] + summary["trials"]["pruned"] == 6
    assert summary["trials"]["pruned"] >= 1, summary
    study = _load(f"sqlite:///{out / 'study.db'}", summary["study"])
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert all(t.last_step is not None and t.last_step < 6 for t in pruned)  # stopped before max_steps
    best = study.best_trial
    assert summary["best"]["params"] == best.params and summary["best"]["dice"] == pytest.approx(best.value)
    # the best block is a run config that `regbench run` accepts, with the best parameters
    grid = load_grid_config(out / "best.yaml")
    args = grid.methods["diffop"].init_args
    assert args["gamma"] == pytest.approx(best.params["gamma"]) and args["lambda_"] == pytest.approx(best.params["lambda_"])
    assert args["width"] == 2 and grid.methods["diffop"].trainer["max_steps"] == 6
    for name in ("history", "importances", "contour", "intermediate"):
        png = out / "plots" / f"{name}.png"
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    rows = (out / "trials.csv").read_text().splitlines()
    assert len(rows) == 7 and rows[0].startswith("number,state,dice,fold_pct,param_gamma,param_lambda_")


def test_two_objectives_give_a_pareto_front(tmp_path):
    cfg = _config(tmp_path)
    out = tmp_path / "nsga"
    res = _sweep(cfg, out, "--n-trials", "3", "--objectives", "dice+folds")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["directions"] == ["maximize", "minimize"] and summary["trials"]["pruned"] == 0
    front = summary["pareto"]
    assert front and all({"dice", "fold_pct", "params"} <= set(p) for p in front)
    # no trial on the front is dominated by another finished trial
    study = _load(f"sqlite:///{out / 'study.db'}", summary["study"])
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    for p in front:
        assert not any(t.values[0] >= p["dice"] and t.values[1] <= p["fold_pct"]
                       and (t.values[0] > p["dice"] or t.values[1] < p["fold_pct"]) for t in done)
    assert (out / "pareto.yaml").exists() and (out / "plots" / "pareto_front.png").exists()


def _states(db: Path) -> list[str]:
    try:
        with sqlite3.connect(str(db), timeout=1) as con:
            return [r[0] for r in con.execute("select state from trials order by number")]
    except sqlite3.Error:
        return []


def _running_with_heartbeat(db: Path, n_params: int = 2) -> bool:
    """A running trial has beaten at least once (a trial that never beat cannot go stale) and
    has all its parameters (killed before that, its retry would draw the missing ones anew)."""
    try:
        with sqlite3.connect(str(db), timeout=1) as con:
            q = "select count(*) from trials t join trial_heartbeats h on h.trial_id = t.trial_id where t.state = 'RUNNING'"
            if con.execute(q).fetchone()[0] == 0:
                return False
            q = "select count(*) from trial_params p join trials t on p.trial_id = t.trial_id where t.state = 'RUNNING'"
            return con.execute(q).fetchone()[0] >= n_params
    except sqlite3.Error:
        return False


@pytest.mark.slow
def test_kill_and_resume_keeps_finished_trials_and_retries_the_killed_one(tmp_path):
    from systems.diffop import DiffOpNet

    n_params = len(DiffOpNet.search_space)  # a trial killed before suggesting them all would retry with fresh draws
    cfg = _config(tmp_path)
    out = tmp_path / "resume"
    args = ("--n-trials", "4", "--heartbeat", "1", "--no-prune")
    proc = subprocess.Popen(_sweep_cmd(cfg, out, *args), env=_env(), cwd=str(ROOT),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = out / "study.db"
    t0 = time.time()
    try:
        while time.time() - t0 < 240:
            st = _states(db)
            if st.count("COMPLETE") >= 1 and st and st[-1] == "RUNNING" and _running_with_heartbeat(db, n_params):
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"the sweep never reached its second trial: {_states(db)}")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    before = _states(db)
    assert before[-1] == "RUNNING" and "COMPLETE" in before
    time.sleep(3.5)  # the killed trial's heartbeat goes stale (2 x 1 s + 1 s)
    res = _sweep(cfg, out, *args)
    assert res.returncode == 0, res.stderr[-3000:]
    study = _load(f"sqlite:///{db}", "tiny.synth.diffop")
    trials = study.trials
    finished = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(finished) == 4
    killed = trials[len(before) - 1]
    assert killed.state.name == "FAIL"
    # the trials finished before the kill are kept as they were
    for t in trials[: len(before) - 1]:
        assert t.state.name == "COMPLETE"
    # and the killed trial's parameters were tried again
    assert len(killed.params) == n_params
    assert any(t.params == killed.params for t in finished)


# ------------------------------------------------------------------------- PostgreSQL
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    cands = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return cands[-1] if cands else None


@pytest.fixture(scope="module")
def postgres_url():
    """``REGBENCH_TEST_POSTGRES_URL`` (CI: .ci/postgres.sh), else a throwaway local cluster."""
    url = os.environ.get("REGBENCH_TEST_POSTGRES_URL")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pytest.skip("psycopg2 is not installed (pip install psycopg2-binary)")
    if url:
        yield url
        return
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("no PostgreSQL: set REGBENCH_TEST_POSTGRES_URL or install the server (initdb, pg_ctl)")
    prefix: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run a throwaway server")
        prefix = ["runuser", "-u", "postgres", "--"]
    root = tempfile.mkdtemp(prefix="regbench-pg-", dir="/tmp")
    os.chmod(root, 0o755)
    data = os.path.join(root, "data")
    if prefix:
        shutil.chown(root, "postgres", "postgres")
    port = _free_port()
    try:
        subprocess.run([*prefix, initdb, "-D", data, "-A", "trust", "-U", "postgres"], check=True, capture_output=True,
                       timeout=120)
        subprocess.run([*prefix, pg_ctl, "-D", data, "-w", "-l", os.path.join(root, "log"), "-o",
                        f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True,
                       timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"could not start a throwaway PostgreSQL server: {exc}")
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", data, "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_on_one_postgres_study(tmp_path, postgres_url):
    import optuna

    cfg = _config(tmp_path)
    out = tmp_path / "pg"
    name = f"regbench-test-{uuid.uuid4().hex[:8]}"
    res = _sweep(cfg, out, "--n-trials", "4", "--workers", "2", "--storage", postgres_url, "--study-name", name,
                 "--no-prune")
    try:
        assert res.returncode == 0, res.stderr[-3000:]
        study = _load(postgres_url, name)
        trials = study.trials
        assert sorted(t.number for t in trials) == list(range(4)), "a trial is missing or recorded twice"
        assert all(t.state.name == "COMPLETE" for t in trials)
        assert len({t.user_attrs["pid"] for t in trials}) == 2, "both workers ran trials"
        summary = json.loads((out / "summary.json").read_text())
        assert summary["best"]["params"] == study.best_params
        assert "***" in summary["storage"] or "@" not in summary["storage"]
        best = yaml.safe_load((out / "best.yaml").read_text())["methods"]["diffop"]["init_args"]
        assert best["gamma"] == pytest.approx(study.best_params["gamma"])
    finally:
        try:
            optuna.delete_study(study_name=name, storage=postgres_url)
        except KeyError:
            pass


# ------------------------------------------------------------------------- DDP in a trial
@pytest.mark.slow
def test_ddp_inside_a_trial_with_pruning_on_a_database(tmp_path):
    trainer = dict(TRAINER, devices=2, strategy="ddp")
    cfg = _config(tmp_path, trainer)
    out = tmp_path / "ddp"
    res = _sweep(cfg, out, "--n-trials", "2", "--prune-startup", "0", timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials"]["fail"] == 0 and summary["trials"]["complete"] + summary["trials"]["pruned"] == 2
    study = _load(f"sqlite:///{out / 'study.db'}", summary["study"])
    for t in study.trials:
        # rank 0 of the spawned ranks reported to the shared storage at every validation
        assert t.intermediate_values and min(t.intermediate_values) >= 1, t
    assert summary["best"] is not None or summary["trials"]["pruned"] == 2
