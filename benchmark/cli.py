"""The ``regbench`` command.

Subcommands (``regbench --help`` lists them all):
  run          a grid of methods × datasets × seeds from a YAML config (resumable)
  fit / test / validate   one experiment through LightningCLI
  evaluate     metrics of a displacement field produced by any tool
  leaderboard  aggregate a results folder into tables and the HTML report
  data         dataset tools (``data check``)
  sweep        Optuna studies over a method's search space
  perf         the performance harness, one subcommand per target (``regbench perf systems --help``)

Start-up: a subcommand's module is imported only when that subcommand runs, so
``regbench --help`` and ``regbench <cmd> --help`` never import torch (tested). Global
options: ``-v`` / ``-vv`` (more of Lightning's and the libraries' messages; default
quiet, see :mod:`benchmark.progress`) and ``--debug`` (a traceback instead of the one-line
error on bad input). Every command that writes files ends by naming them.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

# OpenMP threads that spin while waiting make 2-thread runs many times slower on a shared
# machine (measured: up to 40x on small tensors); they sleep instead unless the user chose.
# Set before torch (imported lazily) starts its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

#: name → (module whose ``add_cli_commands(sub)`` registers it, or None for this module;
#: the one-line help shown by ``regbench --help`` without importing the module).
COMMANDS: dict[str, tuple[str | None, str]] = {
    "run": (None, "run a grid of methods x datasets x seeds (resumable)"),
    "fit": (None, "train one experiment through LightningCLI (--model, --data, --trainer.*; see `regbench fit --help`)"),
    "test": (None, "test one experiment through LightningCLI (--ckpt_path, --model, --data)"),
    "validate": (None, "validate one experiment through LightningCLI"),
    "evaluate": (None, "metrics of a Learn2Reg-format displacement field"),
    "leaderboard": ("leaderboard.cli", "tables, rank scores, significance and the HTML report of a results folder"),
    "data": ("benchmark.datacheck", "dataset tools (check a dataset folder)"),
    "sweep": ("sweeps.cli", "Optuna study over a method's search space (TPE / NSGA-II, pruning, many workers)"),
    "arc": ("benchmark.arc", "accuracy-regularity curves: each method at K log-spaced regularisation weights (resumable)"),
    "perf": ("benchmark.perf.cli", "performance harness, one subcommand per target (JSON out; `regbench perf TARGET --help`)"),
}
#: Subcommands handed to LightningCLI with the rest of the line untouched.
LIGHTNING_COMMANDS = ("fit", "test", "validate")
#: Subcommands that train or test with Lightning (its warning filters are installed for them).
_USES_LIGHTNING = {"run", "sweep", "arc", *LIGHTNING_COMMANDS}

_GLOBAL_FLAGS = {"-v": 1, "--verbose": 1, "-vv": 2, "-vvv": 2, "--debug": 0}


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from benchmark.evaluate import evaluate_files, format_table
    from benchmark.core.io import atomic_write_json

    res = evaluate_files(
        args.disp,
        fixed_seg=args.fixed_seg,
        moving_seg=args.moving_seg,
        labels=args.labels,
        fixed_landmarks=args.fixed_landmarks,
        moving_landmarks=args.moving_landmarks,
        mask=args.mask,
        moving_image=args.moving_image,
        fixed_image=args.fixed_image,
        resample_labels=args.resample_labels,
        hd95_voxel=args.hd95_voxel,
        resample_field=args.resample_field,
        landmark_units=args.landmark_units,
    )
    if args.out:
        atomic_write_json(args.out, res)
        print(f"wrote {args.out}")
    else:
        print(format_table(res))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from benchmark.runner import cmd_run

    return cmd_run(args)


def _add_run(sub: Any) -> None:
    """``regbench run``'s options, declared here so that ``regbench run --help`` does not import
    the runner (which imports Lightning and torch)."""
    r = sub.add_parser("run", help=COMMANDS["run"][1])
    r.add_argument("config", help="grid YAML (see benchmark/configs/quickstart.yaml)")
    r.add_argument("--output", help="results folder (default: the config's `output`, else results/<suite>)")
    r.add_argument("--methods", help="comma-separated subset of the config's methods (and/or 'initial')")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. datasets.lumir.init_args.root=/data/LUMIR (repeatable; value read as YAML)")
    r.add_argument("--threads", type=int, default=None,
                   help="torch intra-op and inter-op threads (default: torch's); recorded in run.json")
    r.add_argument("--print_config", action="store_true",
                   help="check the config, print it resolved (--set, ${VAR} and the defaults of its own keys applied) "
                   "as YAML and exit; nothing runs")
    r.set_defaults(func=_cmd_run)


def _add_evaluate(sub: Any) -> None:
    e = sub.add_parser("evaluate", help=COMMANDS["evaluate"][1])
    e.add_argument("--disp", required=True, help="displacement .nii.gz/.npz/.npy, [X,Y,Z,3] or [3,X,Y,Z], voxels, pull")
    e.add_argument("--fixed-seg", help="fixed label map (defines the fixed grid)")
    e.add_argument("--moving-seg", help="moving label map (on the moving image's grid)")
    e.add_argument("--labels", help="comma-separated label ids (default: all non-zero in the fixed map)")
    e.add_argument("--fixed-landmarks", help="CSV, one x,y,z voxel index per row")
    e.add_argument("--moving-landmarks", help="CSV, one x,y,z voxel index per row")
    e.add_argument("--mask", help="mask on the fixed grid for fold %%, SDlogJ and NDV")
    e.add_argument("--fixed-image", help="fixed image (optional; defines the grid when given)")
    e.add_argument("--moving-image", help="moving image (optional; its grid is where the moving labels must lie)")
    e.add_argument(
        "--resample-labels",
        action="store_true",
        help="resample label maps that lie on another grid through the affines (nearest) instead of refusing",
    )
    e.add_argument("--resample-field", action="store_true",
                   help="a field on another grid than the fixed image (e.g. a run's preprocessed grid) is mapped "
                   "through the affines onto the fixed and moving images' grids instead of refused")
    e.add_argument("--landmark-units", choices=["voxel", "mm"], default="voxel",
                   help="landmark CSV rows are voxel indices of their image (default) or world mm (RAS)")
    e.add_argument("--hd95-voxel", action="store_true", help="HD95 in voxels (Learn2Reg's voxel variant) instead of mm")
    e.add_argument("--out", help="write JSON here instead of printing a table")
    e.set_defaults(func=_cmd_evaluate)


#: Subcommands whose options this module declares itself.
_OWN = {"run": _add_run, "evaluate": _add_evaluate}


def _add_global_options(p: argparse.ArgumentParser) -> None:
    """Show ``-v`` / ``--debug`` in a parser's help (``main`` takes them off the line before
    parsing and puts them on the namespace); a subcommand that declares them already keeps its own."""
    taken = {o for a in p._actions for o in a.option_strings}
    if not {"-v", "--verbose"} & taken:
        p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                       help="more output: -v Lightning's info lines, -vv every warning too")
    if "--debug" not in taken:
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show a traceback instead of a one-line error")


def _available(name: str) -> bool:
    module = COMMANDS[name][0]
    return module is None or importlib.util.find_spec(module) is not None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``regbench`` parser. Every subcommand is listed; only ``only`` (when given) is
    registered with its real arguments, which imports its module (the others are
    placeholders whose help line comes from :data:`COMMANDS`, so listing them is cheap).
    ``only="*"`` registers every subcommand for real."""
    p = argparse.ArgumentParser(
        prog="regbench",
        description="Medical image registration benchmark suite. `regbench COMMAND --help` for a command's options.",
        epilog="quickstart: regbench run benchmark/configs/quickstart.yaml",
    )
    _add_global_options(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    registered: set[str] = set()
    for name, (module, help_) in COMMANDS.items():
        if not _available(name):
            continue
        if only in (name, "*") and name not in LIGHTNING_COMMANDS:
            if name in _OWN:
                _OWN[name](sub)
            else:
                importlib.import_module(module).add_cli_commands(sub)
            registered.add(name)
        else:
            sub.add_parser(name, help=help_, add_help=False)
    for name in registered:
        _add_global_options(sub.choices[name])
    return p


def _split_global(argv: list[str]) -> tuple[list[str], int, bool]:
    """Take ``-v``/``-vv``/``--verbose``/``--debug`` out of the line (before ``--``)."""
    level, debug, rest = 0, False, []
    for i, tok in enumerate(argv):
        if tok == "--":
            rest += argv[i:]
            break
        if tok in _GLOBAL_FLAGS:
            if tok == "--debug":
                debug = True
            else:
                level = max(level, _GLOBAL_FLAGS[tok]) if tok != "--verbose" else level + 1
            continue
        rest.append(tok)
    return rest, min(level, 2), debug


def _command_of(argv: list[str]) -> str | None:
    for tok in argv:
        if not tok.startswith("-"):
            return tok if tok in COMMANDS else None
    return None


def _lightning_cli(argv: list[str]) -> int:
    """``regbench fit|test|validate ...``: one experiment through LightningCLI.

    Takes the same ``model`` / ``data`` ``class_path`` blocks as a grid config: any
    :class:`systems.base.BenchmarkSystem` (deformable and pose systems alike) and any
    :class:`datamodules.base.RegistrationDataModule`. The line is
    given to LightningCLI as the program's own argv (so it does not warn that both ``args``
    and a command line were given); the seed defaults to 0 (``--seed_everything`` changes
    it) rather than a random one. At the end it names what it wrote: the log folder (with
    the resolved ``config.yaml``) and the checkpoints.
    """
    from lightning.pytorch.cli import LightningCLI

    import datamodules  # noqa: F401  (registers the subclasses for class_path lookup)
    import systems  # noqa: F401
    from datamodules.base import RegistrationDataModule
    from systems.base import BenchmarkSystem

    saved = sys.argv
    sys.argv = ["regbench", *argv]
    try:
        cli = LightningCLI(
            BenchmarkSystem,
            RegistrationDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults={"inference_mode": False},
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
        )
    finally:
        sys.argv = saved
    trainer = getattr(cli, "trainer", None)
    if trainer is not None and trainer.is_global_zero:
        written = []
        if trainer.log_dir and Path(trainer.log_dir).exists():
            written.append(f"{trainer.log_dir}/ (config.yaml, logs)")
        ck = trainer.checkpoint_callback
        if argv[0] == "fit" and ck is not None:
            paths = [p for p in (getattr(ck, "last_model_path", ""), getattr(ck, "best_model_path", "")) if p]
            written += list(dict.fromkeys(paths))
        if written:
            print("wrote " + ", ".join(written), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, level, debug = _split_global(argv)
    cmd = _command_of(argv)
    from benchmark.progress import set_verbosity

    set_verbosity(level, lightning=cmd in _USES_LIGHTNING and not ("-h" in argv or "--help" in argv))
    if cmd in LIGHTNING_COMMANDS and argv and argv[0] == cmd:
        try:
            return _lightning_cli(argv)
        except Exception as exc:
            rc = _one_line_error(cmd, exc, debug)
            if rc is None:
                raise
            return rc
    parser = build_parser(only=cmd)
    args = parser.parse_args(argv)
    args.debug, args.verbose = debug, level
    if not hasattr(args, "func"):  # a placeholder: its module could not register it
        parser.error(f"{args.command}: not available in this installation")
    try:
        rc = int(args.func(args) or 0)
        if args.command == "data" and getattr(args, "json", None) and Path(args.json).is_file():
            print(f"wrote {args.json}", file=sys.stderr)  # data check writes its JSON without saying so
        return rc
    except Exception as exc:
        rc = _one_line_error(args.command, exc, debug)
        if rc is None:
            raise
        return rc


def _one_line_error(command: str, exc: Exception, debug: bool) -> int | None:
    """Print a bad input (:class:`DataError`) or an unwritable output path as one line and
    return exit code 2; None (the caller re-raises: a traceback) for anything else, or for
    everything under ``--debug``."""
    from benchmark.core.io import DataError

    if debug:
        return None
    if isinstance(exc, DataError):
        print(f"regbench {command}: error: {exc}", file=sys.stderr)
        return 2
    if "Original Traceback" in str(exc) and "DataError: " in str(exc):
        # a DataError raised in a DataLoader worker reaches here re-wrapped (torch cannot
        # rebuild it); its original line is kept
        from benchmark.reliability import one_line_error

        print(f"regbench {command}: error: {one_line_error(exc).removeprefix('DataError: ')}", file=sys.stderr)
        return 2
    if isinstance(exc, OSError) and getattr(exc, "filename", None):
        # an output path that cannot be written (read-only folder, a folder given as a file…)
        print(f"regbench {command}: error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return None


if __name__ == "__main__":
    sys.exit(main())
