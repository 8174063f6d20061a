"""``regbench sweep``: an Optuna study over a system's search space.

Also runnable on its own (``python -m sweeps.cli CONFIG --method M …``), which is how the
local workers of ``--workers N`` are started.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__all__ = ["add_cli_commands", "add_arguments", "main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``regbench sweep`` on a parser."""
    p.add_argument("config", help="grid YAML whose dataset and method blocks the trials use")
    p.add_argument("--method", default=None, help="method name in the config (its class declares `search_space`); "
                   "required unless --print_config")
    p.add_argument("--dataset", default=None, help="dataset name in the config (default: the only one)")
    p.add_argument("--n-trials", type=int, default=20, help="finished trials wanted in the study, all workers together (20)")
    p.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds (per worker)")
    p.add_argument("--workers", type=int, default=1, help="local worker processes on the study (1)")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL: sqlite:///PATH (default: OUTPUT/study.db), postgresql://user:pw@host/db, journal:PATH")
    p.add_argument("--study-name", default=None, help="default: <suite>.<dataset>.<method>")
    p.add_argument("--objectives", choices=["dice", "dice+folds"], default="dice",
                   help="dice: maximise val Dice (TPE); dice+folds: also minimise fold %% (NSGA-II, Pareto front)")
    p.add_argument("--prune", dest="prune", action="store_true", default=True, help="median pruning from val Dice (default)")
    p.add_argument("--no-prune", dest="prune", action="store_false", help="no pruning")
    p.add_argument("--prune-startup", type=int, default=3, help="finished trials before pruning starts (3)")
    p.add_argument("--output", default=None, help="report folder (default results/sweeps/<study-name>)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (worker i: seed + i)")
    p.add_argument("--heartbeat", type=float, default=10.0,
                   help="seconds between trial heartbeats; a trial silent for twice that is failed and retried")
    p.add_argument("--print_config", action="store_true",
                   help="check the config, print it resolved (${VAR} and the defaults of its own keys applied) as YAML and exit")
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-trials", type=int, default=None, help=argparse.SUPPRESS)


def _spec(args: argparse.Namespace):
    from sweeps.study import SweepSpec

    return SweepSpec(config=args.config, method=args.method, dataset=args.dataset, n_trials=args.n_trials,
                     timeout=args.timeout, workers=args.workers, storage=args.storage, study_name=args.study_name,
                     objectives=args.objectives, prune=args.prune, prune_startup=args.prune_startup, output=args.output,
                     seed=args.seed, heartbeat=args.heartbeat)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from benchmark.runner import ConfigError
    from sweeps.study import resolve_spec, run_sweep, run_worker

    # `regbench --debug` is taken off the line by benchmark.cli before parsing
    debug = bool(getattr(args, "debug", False)) or "--debug" in sys.argv[1:]
    try:
        if args.print_config:
            from benchmark.runner import print_config

            sys.stdout.write(print_config(args.config))
            return 0
        if args.method is None:
            raise ConfigError("--method: required (a method of the config whose class declares `search_space`)")
        spec = _spec(args)
        if args.worker_index is not None:  # a local worker started by run_sweep
            run_worker(resolve_spec(spec), args.worker_index, args.worker_trials)
            return 0
        run_sweep(spec)
    except (ConfigError, ValueError) as exc:
        if debug:
            raise
        print(f"regbench sweep: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if debug:
            raise
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"regbench sweep: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("regbench sweep: interrupted (run the same command to resume)", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        from benchmark.reliability import one_line_error

        print(f"regbench sweep: error: {one_line_error(exc)} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


def add_cli_commands(sub) -> None:
    """Register ``sweep`` on the ``regbench`` sub-parsers."""
    p = sub.add_parser("sweep", help="Optuna study over a method's search space (TPE / NSGA-II, pruning, many workers)")
    add_arguments(p)
    p.set_defaults(func=_cmd_sweep)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="regbench sweep", description=__doc__)
    add_arguments(p)
    return _cmd_sweep(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
