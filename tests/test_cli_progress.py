"""The first hour: ``regbench --help`` without torch, every subcommand listed, quiet runs
that name what they wrote, progress as experiment k of N / step k of total / case k of N,
and the README's first command (a virtual environment) working where pip refuses to
install outside one (PEP 668)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark.cli import COMMANDS, LIGHTNING_COMMANDS, build_parser
from benchmark.progress import GridProgress, format_seconds

ROOT = Path(__file__).resolve().parents[1]


def _py(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _regbench(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "benchmark.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


# ----------------------------------------------------------------------------- help
@pytest.mark.parametrize("args", [["--help"], ["evaluate", "--help"], ["leaderboard", "--help"], ["data", "--help"],
                                  ["sweep", "--help"], ["perf", "--help"]])
def test_help_does_not_import_torch(args):
    code = ("import sys\nfrom benchmark.cli import main\n"
            f"try:\n    main({args!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    res = _py(code)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("NO-TORCH"), f"{args} imported torch"
    assert "usage: regbench" in res.stdout


def test_top_level_help_lists_every_subcommand_and_each_is_real():
    res = _py("from benchmark.cli import main\nmain(['--help'])")
    listed = re.findall(r"^    (\w+)\s", res.stdout, flags=re.M)
    assert listed == list(COMMANDS), res.stdout
    assert {"fit", "test"} <= set(listed)
    # The placeholders' names are exactly what the modules register (no drift between the
    # cheap listing and the real parsers).
    full = build_parser(only="*")
    sub = next(a for a in full._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in COMMANDS:
        if name not in LIGHTNING_COMMANDS:
            # placeholders have no -h of their own; a real (module-registered) parser has
            real = any("-h" in a.option_strings for a in sub.choices[name]._actions)
            assert real, f"{name}: its module did not register it"


def test_bad_input_is_one_line_and_debug_gives_the_traceback(tmp_path):
    missing = tmp_path / "nope.nii.gz"
    res = _regbench(["evaluate", "--disp", str(missing)], tmp_path, timeout=120)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(missing) in lines[0] and "Traceback" not in res.stderr, res.stderr
    res = _regbench(["--debug", "evaluate", "--disp", str(missing)], tmp_path, timeout=120)
    assert res.returncode != 0 and "Traceback" in res.stderr


# ----------------------------------------------------------------------------- grid progress
def test_grid_progress_counts_and_estimates_from_experiments_that_ran():
    t = [100.0]
    lines: list[str] = []
    g = GridProgress(5, lines.append, clock=lambda: t[0])
    g.start("initial", "brain", 0)
    assert "experiment 1 of 5" in lines[-1] and "left ~?" in lines[-1]
    t[0] += 5.0
    g.finish("complete")  # the initial row (no registration) does not count in the estimate
    g.start("vxm", "brain", 0)
    assert "left ~?" in lines[-1]
    t[0] += 0.01
    g.finish("skipped")  # nor does a skipped one (no time)
    g.start("vxm", "brain", 1)
    t[0] += 60.0
    g.finish("complete")
    g.start("syn", "brain", 0)
    # 60 s per experiment that ran, 2 left counting the current one -> 120 s
    assert math.isclose(g.eta(), 120.0)
    assert "experiment 4 of 5: syn on brain, seed 0" in lines[-1] and "elapsed 1m05s" in lines[-1] and "left ~2m00s" in lines[-1]
    t[0] += 30.0
    g.finish("failed")
    g.start("msff", "brain", 1)
    assert math.isclose(g.eta(), 45.0)  # mean of 60 and 30, one left
    assert format_seconds(3720) == "1h02m" and format_seconds(float("nan")) == "?"


# ----------------------------------------------------------------------------- step bar
def test_training_bar_counts_steps_over_epochs_and_test_bar_counts_cases(tmp_path):
    import lightning as L

    from benchmark.progress_bar import StepProgressBar
    from datamodules import SyntheticBrainDataModule
    from systems import VoxelMorph

    seen: dict[str, list] = {"epoch_start_n": [], "test": []}

    class Spy(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen["epoch_start_n"].append(trainer.progress_bar_callback.train_progress_bar.n)

        def on_train_end(self, trainer, pl_module):
            bar = trainer.progress_bar_callback.train_progress_bar
            seen["train"] = (bar.n, bar.total, type(trainer.progress_bar_callback))

        def on_test_end(self, trainer, pl_module):
            bar = trainer.progress_bar_callback.test_progress_bar
            seen["test"] = (bar.n, bar.total, dict(bar.postfix and [kv.split("=") for kv in bar.postfix.split(", ")] or []))

    L.seed_everything(0, verbose=False)
    dm = SyntheticBrainDataModule(size=16, n_train=2, n_val=2, n_test=3, test_pairs=3, train_pairs_per_epoch=2)
    model = VoxelMorph()
    trainer = L.Trainer(max_steps=5, max_epochs=10, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[Spy()], default_root_dir=tmp_path,
                        inference_mode=False)
    trainer.fit(model, datamodule=dm)
    n, total, cls = seen["train"]
    assert cls is StepProgressBar
    assert (n, total) == (5, 5) == (trainer.global_step, 5)
    # several epochs, one bar: each epoch starts where the last one stopped
    assert len(seen["epoch_start_n"]) >= 2 and seen["epoch_start_n"] == sorted(seen["epoch_start_n"])
    assert seen["epoch_start_n"][1] > 0
    trainer.test(model, datamodule=dm, verbose=False)
    n, total, post = seen["test"]
    assert n == total == len(dm.case_ids("test"))
    assert post.get("case") == model.test_records[-1]["case_id"]


def test_a_chosen_bar_or_no_bar_is_left_alone(tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import TQDMProgressBar

    from systems import VoxelMorph

    class Mine(TQDMProgressBar):
        pass

    model = VoxelMorph()
    for kw, expected in (({"callbacks": [Mine()]}, Mine), ({"enable_progress_bar": False}, type(None))):
        trainer = L.Trainer(logger=False, default_root_dir=tmp_path, **kw)
        model.trainer = trainer
        assert model.configure_callbacks() == []
        assert type(trainer.progress_bar_callback) is expected


# ----------------------------------------------------------------------------- quiet runs
GRID = """suite: tiny
seeds: [0]
trainer: {max_epochs: 1, accelerator: cpu, devices: 1, enable_progress_bar: false}
datasets:
  synthetic_brain:
    class_path: datamodules.SyntheticBrainDataModule
    init_args: {size: 16, n_train: 2, n_val: 2, n_test: 2, test_pairs: 2}
methods:
  voxelmorph:
    class_path: systems.VoxelMorph
    trainer: {max_steps: 3}
"""


@pytest.mark.slow
def test_grid_run_is_quiet_names_its_files_and_says_more_with_v(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(GRID)
    res = _regbench(["run", str(cfg), "--output", str(tmp_path / "out")], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    text = res.stdout + res.stderr
    for noise in ("Tip:", "weights_only", "Warning", "GPU available", "No seed found", "LeafSpec"):
        assert noise not in text, (noise, text[-3000:])
    assert "experiment 1 of 2: initial on synthetic_brain" in res.stdout
    assert "experiment 2 of 2: voxelmorph on synthetic_brain" in res.stdout
    last = [ln for ln in res.stdout.splitlines() if ln.strip()][-1]
    written = re.findall(r"(/\S+?)(?:,|$)", last.split("wrote", 1)[1])
    assert {Path(w).name for w in written} == {"leaderboard.md", "leaderboard.csv", "leaderboard.html"}
    assert all(Path(w).is_file() for w in written)
    # -v: Lightning's informational lines come back (a fresh folder so the fit runs again)
    res = _regbench(["run", "-v", str(cfg), "--output", str(tmp_path / "out_v"), "--methods", "initial"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "GPU available" in res.stdout + res.stderr


@pytest.mark.slow
def test_fit_through_lightning_cli_is_quiet_and_names_its_files(tmp_path):
    res = _regbench(["fit", "--model", "systems.VoxelMorph", "--data", "datamodules.SyntheticBrainDataModule",
                     "--data.init_args.size", "16", "--data.init_args.n_train", "2", "--data.init_args.n_val", "2",
                     "--data.init_args.n_test", "2", "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
                     "--trainer.accelerator", "cpu"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    text = res.stdout + res.stderr
    for noise in ("Tip:", "No seed found", "LightningCLI's args", "Warning", "GPU available"):
        assert noise not in text, (noise, text[-3000:])
    wrote = [ln for ln in res.stderr.splitlines() if ln.startswith("wrote ")]
    assert wrote, res.stderr[-2000:]
    ckpts = list(tmp_path.rglob("*.ckpt"))
    assert ckpts and all(str(c.relative_to(tmp_path)) in wrote[-1] or str(c) in wrote[-1] for c in ckpts)
    assert (tmp_path / "lightning_logs" / "version_0" / "config.yaml").is_file()
    assert "lightning_logs/version_0" in wrote[-1]


# ----------------------------------------------------------------------------- first command
def _venv_python() -> str | None:
    """A python whose ``venv`` module works (Debian splits it into python3-venv)."""
    res = subprocess.run([sys.executable, "-c", "import venv, ensurepip"], capture_output=True)
    return sys.executable if res.returncode == 0 else None


@pytest.mark.slow
@pytest.mark.skipif(_venv_python() is None, reason="this python has no working venv/ensurepip")
def test_quickstart_script_installs_into_a_fresh_virtual_environment(tmp_path):
    """``scripts/quickstart.sh`` (the README's first command as a script) in a clean venv.
    Offline form: ``--system-site-packages --no-deps`` so the dependencies already installed
    are seen and nothing is downloaded; the full form is ``.ci/first_command.sh``."""
    venv = tmp_path / "venv"
    res = subprocess.run(["bash", str(ROOT / "scripts" / "quickstart.sh"), "--venv", str(venv), "--offline", "--no-run"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-2000:])
    exe = venv / "bin" / "regbench"
    assert exe.is_file()
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0 and "fit" in out.stdout and "leaderboard" in out.stdout
    # the venv's python, not the system one, imports the project
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import sys, benchmark; print(sys.prefix)"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert where.stdout.strip() == str(venv)
