"""Resuming a sweep: a study keeps the fingerprint of its trial setup; another setup (budget,
dataset, seed, non-searched arguments) is refused in one line naming what changed, placement
settings and searched arguments are not part of it, and a study from before fingerprints is
adopted with a notice."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

BASE = {
    "suite": "tiny",
    "seeds": [0],
    "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "num_sanity_val_steps": 0,
                "log_every_n_steps": 1},
    "budget": {"max_steps": 2},
    "datasets": {"synth": {"class_path": "datamodules.SyntheticBrainDataModule",
                           "init_args": {"size": 16, "n_train": 3, "n_val": 2, "n_test": 2, "seed": 3,
                                         "train_pairs_per_epoch": 2, "num_workers": 0}}},
    "methods": {"voxelmorph": {"class_path": "systems.VoxelMorph", "init_args": {"lambda_": 1.0, "lr": 1.0e-3}}},
}


def _config(tmp_path: Path, name: str, **changes) -> Path:
    """The base config with ``changes`` (``"a.b.c": value``) applied, written to ``name``."""
    cfg = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *path, last = dotted.split(".")
        node = cfg
        for k in path:
            node = node[k]
        node[last] = value
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def _res(cfg: Path, out: Path):
    from sweeps.study import SweepSpec, resolve_spec

    return resolve_spec(SweepSpec(config=str(cfg), method="voxelmorph", n_trials=2, prune=False, output=str(out)))


def test_another_setup_is_refused_naming_what_changed(tmp_path):
    from sweeps.study import open_study

    out = tmp_path / "sw"
    study = open_study(_res(_config(tmp_path, "a.yaml"), out))
    assert study.user_attrs["setup_fingerprint"]
    b = _config(tmp_path, "b.yaml", **{"budget.max_steps": 4, "datasets.synth.init_args.seed": 7})
    with pytest.raises(ValueError) as err:
        open_study(_res(b, out))
    msg = str(err.value)
    assert "\n" not in msg and "a.yaml" in msg and "--study-name" in msg
    assert "budget.max_steps 2 -> 4" in msg and "dataset.init_args.seed 3 -> 7" in msg
    c = _config(tmp_path, "c.yaml", **{"methods.voxelmorph.init_args.lr": 0.01})  # a non-searched argument
    with pytest.raises(ValueError, match=r"method\.init_args\.lr 0\.001 -> 0\.01"):
        open_study(_res(c, out))


def test_searched_and_placement_settings_do_not_block_a_resume(tmp_path):
    from sweeps.study import open_study

    out = tmp_path / "sw"
    first = open_study(_res(_config(tmp_path, "a.yaml"), out)).user_attrs["setup_fingerprint"]
    other = _config(tmp_path, "other.yaml", **{
        "methods.voxelmorph.init_args.lambda_": 5.0,  # searched: each trial sets its own
        "trainer.enable_progress_bar": True, "trainer.log_every_n_steps": 5,
        "datasets.synth.init_args.num_workers": 1,
    })
    notes: list[str] = []
    assert open_study(_res(other, out), log=notes.append).user_attrs["setup_fingerprint"] == first
    assert not notes


def test_a_study_from_before_fingerprints_is_adopted_with_a_notice(tmp_path):
    import optuna

    from sweeps.study import make_storage, open_study

    out = tmp_path / "sw"
    a = _config(tmp_path, "a.yaml")
    res = _res(a, out)
    old = optuna.create_study(storage=make_storage(res.storage, 10.0), study_name=res.study_name, directions=["maximize"])
    for key, value in {"method": "voxelmorph", "dataset": "synth", "config": str(a), "objectives": "dice"}.items():
        old.set_user_attr(key, value)  # what the study held before fingerprints
    old.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.5))
    notes: list[str] = []
    study = open_study(res, log=notes.append)
    assert len(notes) == 1 and "predates" in notes[0] and "1 trial(s)" in notes[0] and "\n" not in notes[0]
    assert study.user_attrs["setup_fingerprint"] and len(study.trials) == 1
    notes.clear()
    open_study(res, log=notes.append)  # recorded now: no second notice
    assert not notes
    with pytest.raises(ValueError, match="budget.max_steps 2 -> 3"):
        open_study(_res(_config(tmp_path, "b.yaml", **{"budget.max_steps": 3}), out))


def test_cli_refuses_a_changed_config_and_keeps_the_trials(tmp_path):
    """The reported case: a resume with another budget and dataset seed ran and mixed the trials."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out = tmp_path / "sw"

    def sweep(cfg: Path, n: int) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "sweeps.cli", str(cfg), "--method", "voxelmorph", "--n-trials", str(n),
               "--no-prune", "--output", str(out)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(ROOT))

    first = sweep(_config(tmp_path, "a.yaml"), 1)
    assert first.returncode == 0, first.stderr[-3000:]
    trials = (out / "trials.csv").read_text()
    best = (out / "best.yaml").read_text()
    b = _config(tmp_path, "b.yaml", **{"budget.max_steps": 4, "datasets.synth.init_args.seed": 7})
    second = sweep(b, 2)
    assert second.returncode == 2, second.stderr[-3000:]
    err = [ln for ln in second.stderr.splitlines() if ln.startswith("regbench sweep: error:")]
    assert len(err) == 1 and "budget.max_steps 2 -> 4" in err[0] and "dataset.init_args.seed 3 -> 7" in err[0]
    assert (out / "trials.csv").read_text() == trials and (out / "best.yaml").read_text() == best
    assert not (out / "trials" / "0001").exists()
