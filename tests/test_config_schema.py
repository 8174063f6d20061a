"""Configs and the CLI on jsonargparse (issue 17, item 4): typed values checked at load naming
the key, class arguments checked against the class's signature, ``--print_config`` that loads
back to the same experiments and config hashes, one ``perf`` subcommand per target with its
own options and the targets' own defaults, help without torch."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmark.runner import (
    ConfigError,
    check_grid_config,
    config_hash,
    experiment_config,
    experiments,
    load_grid_config,
    print_config,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

DATA = {"class_path": "datamodules.SyntheticBrainDataModule",
        "init_args": {"size": 16, "n_train": 2, "n_val": 2, "n_test": 2, "seed": 3}}
VM = {"class_path": "systems.VoxelMorph", "init_args": {"lambda_": 1, "enc": [4, 8], "dec": [8, 8, 4]}}


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _cfg(**extra) -> dict:
    return {"suite": "t", "seeds": [0], "trainer": {"accelerator": "cpu", "devices": 1},
            "datasets": {"synth": dict(DATA)}, "methods": {"vm": dict(VM)}, **extra}


def _regbench(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "benchmark.cli", *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=cwd)


def _hashes(cfg) -> dict[tuple[str, str, int], str]:
    """Every experiment's config hash, as the runner computes it."""
    return {(e.dataset.name, e.method_name, e.seed): config_hash(experiment_config(cfg, e)[0]) for e in experiments(cfg)}


# ----------------------------------------------------------------------------- 1. typed values
@pytest.mark.parametrize("override,message", [
    ("trainer.max_steps=-5", "trainer.max_steps: expected an integer >= 1 (or -1: no limit), got -5"),
    ("trainer.max_steps='5'", "trainer.max_steps: expected an integer >= 1 (or -1: no limit), got '5'"),
    ("trainer.precision=99", "trainer.precision: expected one of"),
    ("budget.max_time_s=abc", "budget.max_time_s: expected a positive number of seconds or null, got 'abc'"),
    ("seeds=[a]", "seeds: expected a non-empty list of integers, got ['a']"),
    ("seeds=[]", "seeds: expected a non-empty list of integers, got []"),
    ("include_initial=maybe", "include_initial: expected true or false, got 'maybe'"),
    ("wandb=3", "wandb: expected a mapping, got 3"),
    ("methods.vm.init_args.lambda_=abc", "methods.vm.init_args.lambda_: expected a number, got 'abc'"),
    ("methods.vm.init_args.int_steps=1.5", "methods.vm.init_args.int_steps: expected an integer, got 1.5"),
    ("datasets.synth.init_args.size=big", "datasets.synth.init_args.size: expected an integer or a list of 3 integers, got 'big'"),
    ("datasets.synth.init_args.n_test=0", "datasets.synth.init_args.n_test: expected an integer >= 1 (or null), got 0"),
    ("methods.vm.variants.v.init_args.int_steps='7'", "methods.vm.variants.v.init_args.int_steps: expected an integer, got '7'"),
])
def test_bad_typed_value_names_the_file_and_the_key(tmp_path, override, message):
    path = _write(tmp_path / "g.yaml", _cfg())
    with pytest.raises(ConfigError) as exc:
        load_grid_config(path, overrides=[override])
    assert str(exc.value) == f"{path}: {message}" or str(exc.value).startswith(f"{path}: {message}"), str(exc.value)
    assert "\n" not in str(exc.value)


def test_cli_bad_value_is_one_line_before_any_work_and_debug_gives_the_traceback(tmp_path):
    path = _write(tmp_path / "config.yaml", _cfg(trainer={"max_steps": -5}))
    res = _regbench(["run", "config.yaml", "--output", "out"], tmp_path)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, res.stderr[-2000:]
    assert lines == ["regbench run: config error: config.yaml: trainer.max_steps: expected an integer >= 1 (or -1: no limit), "
                     "got -5"], res.stderr[-2000:]
    assert not (tmp_path / "out").exists()
    res = _regbench(["--debug", "run", str(path), "--output", "out"], tmp_path)
    assert res.returncode != 0 and "Traceback" in res.stderr and "ConfigError" in res.stderr


# ----------------------------------------------------------------------------- class arguments
def test_unknown_init_arg_of_a_class_that_takes_kwargs_names_the_key(tmp_path):
    """NiftiPairsDataModule takes ``**kwargs`` (its base's arguments): the check follows them
    (jsonargparse), so a misspelt base argument is refused at load, naming the key."""
    from fake_layouts import build_nifti_folder

    root = build_nifti_folder(tmp_path / "pair", n=2, landmarks=False)
    data = {"class_path": "datamodules.nifti_pairs.NiftiPairsDataModule", "init_args": {"root": str(root), "batch_sise": 2}}
    path = _write(tmp_path / "g.yaml", _cfg(datasets={"pair": data}))
    with pytest.raises(ConfigError, match=r"g\.yaml: datasets\.pair\.init_args\.batch_sise: unknown argument of "
                                          r"NiftiPairsDataModule \(allowed: .*batch_size"):
        check_grid_config(path)
    data["init_args"] = {"root": str(root), "batch_size": "two"}
    with pytest.raises(ConfigError, match=r"datasets\.pair\.init_args\.batch_size: expected an integer, got 'two'"):
        check_grid_config(_write(tmp_path / "g.yaml", _cfg(datasets={"pair": data})))


def test_unknown_init_arg_and_wrong_trainer_type_name_the_key(tmp_path):
    cfg = _cfg()
    cfg["methods"]["vm"] = {**VM, "init_args": {**VM["init_args"], "lamda": 1.0}}
    with pytest.raises(ConfigError, match=r"methods\.vm\.init_args\.lamda: unknown argument of VoxelMorph \(allowed: "):
        check_grid_config(_write(tmp_path / "g.yaml", cfg))
    cfg["methods"]["vm"] = {**VM, "trainer": {"enable_progress_bar": "no"}}
    with pytest.raises(ConfigError, match=r"methods\.vm\.trainer\.enable_progress_bar: expected true or false or null, got 'no'"):
        check_grid_config(_write(tmp_path / "g.yaml", cfg))


def test_values_are_not_converted(tmp_path):
    """An int where a float is expected is accepted and kept as written (the hash is the file's)."""
    cfg = load_grid_config(_write(tmp_path / "g.yaml", _cfg()))
    assert cfg.methods["vm"].init_args["lambda_"] == 1 and isinstance(cfg.methods["vm"].init_args["lambda_"], int)
    assert cfg.methods["vm"].raw is not None and cfg.methods["vm"].raw["init_args"]["lambda_"] == 1


# ----------------------------------------------------------------------------- 2. --print_config
def test_print_config_loads_back_to_the_same_experiments_and_hashes(tmp_path, monkeypatch):
    monkeypatch.setenv("REGBENCH_TEST_PRESET", "fast")
    cfg = _cfg(budget={"max_steps": 4, "max_time_s": 60}, checkpoint_every_n_steps=2)
    cfg.pop("suite")  # the suite defaults to the file's name: printed, so a renamed copy keeps it
    cfg["methods"]["vm"] = {**VM, "trainer": {"check_val_every_n_epoch": 1},
                            "variants": {"wide": {"init_args": {"enc": [8, 8]}}, "long": {"trainer": {"max_epochs": 3}}}}
    cfg["methods"]["syn"] = {"class_path": "systems.SyN", "init_args": {"preset": "${REGBENCH_TEST_PRESET}"}}
    path = _write(tmp_path / "grid.yaml", cfg)
    text = print_config(path, overrides=["methods.syn.init_args.iterations=[4, 2, 1]"])
    printed = yaml.safe_load(text)
    assert printed["suite"] == "grid" and printed["include_initial"] is True and printed["loggers"] == ["csv"]
    assert printed["budget"] == {"max_steps": 4, "max_time_s": 60.0} and printed["seeds"] == [0]
    assert printed["output"] == str(Path("results") / "grid")
    assert "${" not in text and printed["methods"]["syn"]["init_args"] == {"preset": "fast", "iterations": [4, 2, 1]}
    # the classes' defaults that the blocks do not set follow as comments (not part of the hash)
    assert "\n# Class defaults not set above" in text
    assert "#   methods.vm (systems.VoxelMorph): lr: 0.0001" in text and "int_steps: 7" in text
    first = load_grid_config(path, overrides=["methods.syn.init_args.iterations=[4, 2, 1]"])
    monkeypatch.delenv("REGBENCH_TEST_PRESET")  # printed expanded: the copy does not need it
    again = _write(tmp_path / "elsewhere.yaml", printed)
    second = load_grid_config(again)
    assert [e.method_name for e in experiments(first)] == [e.method_name for e in experiments(second)]
    assert _hashes(first) == _hashes(second) and len(_hashes(first)) == 5
    assert print_config(again) == text  # a fixed point


def test_cli_print_config_exits_zero_and_runs_nothing(tmp_path):
    _write(tmp_path / "g.yaml", _cfg(output="out"))
    res = _regbench(["run", "g.yaml", "--print_config", "--set", "trainer.max_epochs=2"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    printed = yaml.safe_load(res.stdout)
    assert printed["trainer"]["max_epochs"] == 2 and printed["output"] == "out"
    assert not (tmp_path / "out").exists()
    res = _regbench(["sweep", "g.yaml", "--print_config"], tmp_path)
    assert res.returncode == 0 and yaml.safe_load(res.stdout)["suite"] == "t", res.stderr[-2000:]
    res = _regbench(["run", "g.yaml", "--print_config", "--set", "seeds=[x]"], tmp_path)
    assert res.returncode == 2 and "g.yaml: seeds: expected a non-empty list of integers" in res.stderr


def test_pinned_hash_of_a_config_is_unchanged(tmp_path):
    """The hash of an experiment is the file's values (not the class defaults): pinned, so a
    change of the loader that would recompute every finished experiment is seen here."""
    cfg = _cfg(budget={"max_steps": 300})
    cfg["methods"]["vm"] = {**VM, "trainer": {"check_val_every_n_epoch": 1}}
    got = _hashes(load_grid_config(_write(tmp_path / "g.yaml", cfg)))
    assert got == {("synth", "initial", 0): "a6cf08896b6f9e97", ("synth", "vm", 0): "7c207ee8199fd904"}, got


# ----------------------------------------------------------------------------- 3. perf
def _help(args: list[str]) -> str:
    code = ("import sys\nfrom benchmark.cli import main\n"
            f"try:\n    main({args!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("NO-TORCH"), f"{args} imported torch"
    return res.stdout


def test_each_perf_target_has_its_own_help_with_only_its_options():
    systems = _help(["perf", "systems", "--help"])
    assert "usage: regbench perf systems" in systems
    for opt in ("--pair-dir", "--peer-python", "--only", "--size", "--device", "--repeats", "--threads", "--out"):
        assert opt in systems, opt
    for opt in ("--loss", "--n-samples", "--sizes"):
        assert opt not in systems, opt
    training = _help(["perf", "training", "--help"])
    assert "--loss" in training and "--pair-dir" not in training and "--device" not in training
    assert "--n-samples" in _help(["perf", "drr", "--help"])
    listing = _help(["perf", "--help"])
    from benchmark.perf.cli import TARGETS

    for name in TARGETS:
        assert f"    {name}" in listing, name
    assert "--pair-dir" not in listing


def test_perf_defaults_are_the_targets_own():
    from benchmark.cli import build_parser
    from benchmark.perf import drr, gpu, patchmorph, systems, training

    def parsed(*line: str):
        return build_parser(only="perf").parse_args(["perf", *line])

    a = parsed("systems")
    assert (a.repeats, a.threads, a.only, a.device) == (3, 2, ",".join(systems.DEFAULT_BENCHMARKS), "cpu")
    assert tuple(int(v) for v in a.size.split(",")) == systems.LUMIR_SIZE
    a = parsed("training")
    sig = inspect.signature(training.main_perf_training).parameters
    assert (a.repeats, a.threads, a.loss) == (sig["repeats"].default, sig["threads"].default, sig["loss"].default)
    assert tuple(a.sizes) == tuple(training.DEFAULT_SIZES)
    a = parsed("patchmorph")
    assert (a.repeats, a.threads, tuple(a.sizes)) == (3, 2, patchmorph.SIZES)
    a = parsed("drr")
    sig = inspect.signature(drr.perf_drr).parameters
    assert (a.repeats, a.threads, a.n_samples, a.device) == (sig["repeats"].default, sig["threads"].default, drr.N_SAMPLES, "cpu")
    a = parsed("gpu")
    assert (a.repeats, a.device, a.only) == (5, "cuda", None) and tuple(int(v) for v in a.size.split(",")) == gpu.LUMIR_SHAPE
    a = parsed("metrics")
    assert (a.repeats, a.threads) == (5, None)
    # the README's and docs' command lines parse as written
    for line in (["systems", "--peer-python", "X"], ["systems", "--only", "msff", "--threads", "2", "--repeats", "3"],
                 ["patchmorph", "--threads", "1", "--repeats", "1"], ["drr", "--threads", "2", "--peer-python", "X"],
                 ["data", "--threads", "1", "--out", "p.json"], ["gpu", "--only", "voxelmorph,msff", "--repeats", "10"],
                 ["gpu", "--device", "cpu", "--size", "32,32,32"], ["training", "--threads", "2", "--out", "t.json"]):
        assert parsed(*line).func is not None
    with pytest.raises(SystemExit):
        parsed("systems", "--loss", "ncc")  # another target's option


# ----------------------------------------------------------------------------- 4. help
def test_top_level_and_run_help_without_torch():
    # what keeps the help fast is that it imports no torch (checked by _help); its time is
    # not asserted here (shared machines: timings belong to the perf harness)
    top = _help(["--help"])
    for name in ("run", "fit", "test", "validate", "perf", "sweep", "evaluate"):
        assert f"    {name}" in top, name
    assert "--print_config" in _help(["run", "--help"])
    assert "--print_config" in _help(["sweep", "--help"])


def test_a_max_count_of_a_data_module_is_checked_like_the_other_counts():
    """MindBoggle's ``max_subjects: -1`` sliced every split with [: -1] and silently dropped a
    subject from each; ``max_*`` counts are now checked as ``n_*`` ones (config and class)."""
    from benchmark.config import check_init_args
    from datamodules.mindboggle import MindBoggle101DataModule

    for bad in (-1, 0):
        with pytest.raises(ConfigError, match=rf"datasets.mb.init_args.max_subjects: expected an integer >= 1 \(or null\), got {bad}"):
            check_init_args(MindBoggle101DataModule, {"root": "x", "max_subjects": bad}, "datasets.mb", counts=True)
        with pytest.raises(ValueError, match="max_subjects must be an integer >= 1"):
            MindBoggle101DataModule(root="x", max_subjects=bad)
    check_init_args(MindBoggle101DataModule, {"root": "x", "max_subjects": 3}, "datasets.mb", counts=True)


def test_lightning_commands_and_data_check_report_bad_input_in_one_line(tmp_path):
    """``regbench fit`` on a missing dataset folder and ``data check`` with an unknown dataset
    kind: one line naming the problem, exit code 2, no traceback (they printed tracebacks)."""
    res = _regbench(["fit", "--model", "systems.VoxelMorph", "--data", "datamodules.nifti_pairs.NiftiPairsDataModule",
                     "--data.root", str(tmp_path / "absent"), "--data.num_workers", "0", "--trainer.max_steps", "1",
                     "--trainer.logger", "false", "--trainer.enable_checkpointing", "false"], tmp_path)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and "warn" not in ln.lower()]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert lines[-1] == f"regbench fit: error: {tmp_path / 'absent'}: dataset folder not found " \
                        "(check the path (the suite never downloads data))", res.stderr[-2000:]
    res = _regbench(["data", "check", "--dataset", "foo", str(tmp_path)], tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert [ln for ln in res.stderr.splitlines() if ln.strip()] == [
        "regbench data: error: --dataset 'foo': unknown dataset kind (use mindboggle, lumir, nifti, spine or a data "
        "module's class path)"]


def test_a_fixed_length_list_says_its_length():
    """``shape: [16, 16]`` got "expected ... a list of integers, got [16, 16]", which reads as
    valid; a fixed-length tuple now says how many."""
    from typing import Optional, Sequence, Union

    from benchmark.config import describe

    assert describe(tuple[int, int, int]) == "a list of 3 integers"
    assert describe(tuple[int, ...]) == "a list of integers" and describe(Sequence[float]) == "a list of numbers"
    assert describe(Optional[Union[int, tuple[int, int, int]]]) == "an integer or a list of 3 integers or null"


def test_a_data_error_from_a_dataloader_worker_is_one_line_too(capsys):
    """torch re-raises a worker's exception as a RuntimeError carrying the worker's traceback
    (it cannot rebuild a DataError); fit/test/validate printed that traceback."""
    from benchmark.cli import _one_line_error

    worker = RuntimeError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    raise DataError(p, "y")\n'
        "benchmark.core.io.DataError: /data/b.nii.gz: is stored in orientation LAS, the fixed a.nii.gz in RAS\n")
    assert _one_line_error("fit", worker, debug=False) == 2
    assert capsys.readouterr().err == ("regbench fit: error: /data/b.nii.gz: is stored in orientation LAS, the fixed "
                                       "a.nii.gz in RAS\n")
    assert _one_line_error("fit", RuntimeError("a plain bug"), debug=False) is None  # bugs keep their traceback
    assert _one_line_error("fit", worker, debug=True) is None
