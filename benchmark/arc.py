"""``regbench arc``: accuracy–regularity curves, one grid run per regularisation value.

``regbench arc CONFIG [--k K] [--sdlogj-bound B] [--output DIR] [--methods a,b] [--set KEY=VALUE ...] [--print_config]``
takes an ordinary grid config (:mod:`benchmark.runner`) and runs every method at ``K``
(default 5) log-spaced values of its regularisation weight. Where the weight comes from, in
order:

1. the config's ``arc.methods.<method>: {param: NAME, low: LO, high: HIGH}``;
2. the system class's ``regularisation = (NAME, LO, HIGH)`` class attribute
   (``systems.msff.MSFF``, ``systems.patchmorph.PatchMorph``, ...);
3. :data:`DEFAULT_REGULARISATION`, for classes that declare none (VoxelMorph's ``lambda_``,
   SyN's field smoothing ``smooth_warp_sigma`` in mm, DiffOp-net's ``lambda_``).

A method with none of the three is refused, naming it. The values are
``logspace(LO, HIGH, K)``; the method's own setting (its ``init_args`` value, else the
class default, else, for an argument whose default is ``None`` such as SyN's preset-set
sigmas, the value the built object uses) is always a point too, added when no log-spaced value equals it (relative
difference 1e-6), so a curve has ``K`` or ``K + 1`` points.

**Each point is an experiment of the same runner.** ``arc`` writes
``<output>/arc_config.yaml``, a plain grid config in which the point at the method's own
setting is the method itself (named as in the config) and every other point is a method
block named ``<method>-<param><value>`` (e.g. ``voxelmorph-lambda_0.3162``) that differs from
it only in the weight; then it runs that config with :func:`benchmark.runner.run_grid`. So
every point has its own folder, config hash, checkpoints and resume (a killed curve
continues where it stopped: finished points are skipped, a half-tested point computes only
its missing cases), and ``regbench run <output>/arc_config.yaml`` gives the same numbers.
A method's ``variants`` are not part of its curve (the curve is the full method's).

Afterwards it writes ``<output>/arc.csv`` (columns :data:`leaderboard.ablation.ARC_COLUMNS`:
per dataset, method and value the means over all cases of all seeds of Dice, EPE
(``epe_mm``, when the data module knows the true displacement), SDlogJ, NDV %, fold % and
TRE, the point's status, and the SDlogJ bound) and the leaderboard, whose Markdown and HTML
carry the curves (Dice and EPE against SDlogJ and against NDV %, default ringed) and the
summary per method: the best Dice among the points with mean SDlogJ ≤ ``sdlogj_bound``
(``--sdlogj-bound``, else the config's ``arc.sdlogj_bound``, else
:data:`DEFAULT_SDLOGJ_BOUND`).
"""

from __future__ import annotations

import copy
import csv
import io
import math
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import yaml

__all__ = ["DEFAULT_K", "DEFAULT_SDLOGJ_BOUND", "DEFAULT_REGULARISATION", "ArcPoint", "arc_points", "build_arc_config",
           "write_arc_csv", "ArcPlan", "plan_arc", "print_arc_config", "run_arc", "add_cli_commands"]

DEFAULT_K = 5
#: SDlogJ bound of the summary ("best Dice at SDlogJ ≤ bound") unless the config or the
#: command line says otherwise.
DEFAULT_SDLOGJ_BOUND = 0.1
#: Regularisation (argument, low, high) of system classes (by class name) that declare no
#: ``regularisation`` attribute themselves. SyN: the Gaussian sigma (mm) smoothing the field
#: after every update (ratio 2 between points at K = 5: 0.15, 0.3, 0.6 = the fast preset, 1.2, 2.4).
DEFAULT_REGULARISATION: dict[str, tuple[str, float, float]] = {
    "VoxelMorph": ("lambda_", 0.1, 10.0),
    "SyN": ("smooth_warp_sigma", 0.15, 2.4),
    "DiffOpNet": ("lambda_", 1.0, 100.0),
}
ARC_KEYS = {"k", "sdlogj_bound", "methods"}
RANGE_KEYS = {"param", "low", "high"}


class ArcPoint(dict):
    """One point of a curve: ``method``, ``experiment`` (method name in the grid), ``param``,
    ``value`` and ``is_default``."""


def _fmt_value(v: float) -> str:
    """A weight as it appears in a folder name: 4 significant digits, no '+'."""
    return f"{v:.4g}".replace("+", "")


def _regularisation(cls: type, name: str, spec: dict[str, Any] | None) -> tuple[str, float, float]:
    from benchmark.runner import ConfigError

    where = f"arc.methods.{name}"
    if spec is not None:
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected a mapping with param, low, high")
        for key in spec:
            if key not in RANGE_KEYS:
                raise ConfigError(f"{where}.{key}: unknown key (allowed: {', '.join(sorted(RANGE_KEYS))})")
        base = getattr(cls, "regularisation", None) or DEFAULT_REGULARISATION.get(cls.__name__)
        param = spec.get("param", base[0] if base else None)
        if param is None:
            raise ConfigError(f"{where}.param: missing ({cls.__name__} declares no regularisation argument)")
        low, high = spec.get("low", base[1] if base else None), spec.get("high", base[2] if base else None)
    else:
        reg = getattr(cls, "regularisation", None) or DEFAULT_REGULARISATION.get(cls.__name__)
        if reg is None:
            raise ConfigError(f"methods.{name}: {cls.__name__} declares no regularisation weight for an "
                              f"accuracy-regularity curve; give arc.methods.{name}: {{param: ..., low: ..., high: ...}} "
                              f"or leave it out with --methods")
        param, low, high = reg
    try:
        low, high = float(low), float(high)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: low and high must be numbers, got {low!r} and {high!r}") from exc
    if not 0 < low < high:
        raise ConfigError(f"{where}: need 0 < low < high for log-spaced values, got low={low}, high={high}")
    return str(param), low, high


def _default_value(cls: type, param: str, init_args: dict[str, Any], name: str) -> float:
    import inspect

    from benchmark.runner import ConfigError

    if param in init_args:
        v = init_args[param]
    else:
        p = inspect.signature(cls.__init__).parameters.get(param)
        if p is None:
            raise ConfigError(f"methods.{name}: {cls.__name__} has no argument {param!r} (the curve's weight)")
        v = p.default
        if v is None:  # set from elsewhere (e.g. SyN's preset): the built object's value
            try:
                obj = cls(**init_args)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"methods.{name}: {exc}") from exc
            for holder in (obj, getattr(obj, "engine", None)):
                if holder is not None and getattr(holder, param, None) is not None:
                    v = getattr(holder, param)
                    break
    try:
        v = float(v)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"methods.{name}.init_args.{param}: the curve's weight must be a number, got {v!r}") from exc
    if not v > 0:
        raise ConfigError(f"methods.{name}.init_args.{param}: the curve's weight must be > 0 for log spacing, got {v}")
    return v


def arc_points(raw: dict[str, Any], k: int | None = None, methods: list[str] | None = None) -> dict[str, list[ArcPoint]]:
    """The points of every method's curve from a raw (overrides applied) config mapping.

    Returns ``method -> points`` in order of the weight. Raises
    :class:`benchmark.runner.ConfigError` naming the key on a bad ``arc`` block or method.
    """
    from benchmark.runner import ConfigError, expand_env, import_class

    arc = raw.get("arc") or {}
    if not isinstance(arc, dict):
        raise ConfigError("arc: expected a mapping (k, sdlogj_bound, methods)")
    for key in arc:
        if key not in ARC_KEYS:
            raise ConfigError(f"arc.{key}: unknown key (allowed: {', '.join(sorted(ARC_KEYS))})")
    k = int(k if k is not None else arc.get("k", DEFAULT_K))
    if k < 2:
        raise ConfigError(f"arc.k: need at least 2 values per curve, got {k}")
    specs = arc.get("methods") or {}
    all_methods = raw.get("methods") or {}
    if not isinstance(all_methods, dict) or not all_methods:
        raise ConfigError("methods: must be a non-empty mapping of name -> block")
    for name in specs:
        if name not in all_methods:
            raise ConfigError(f"arc.methods.{name}: no such method in the config (has {sorted(all_methods)})")
    if methods:
        unknown = set(methods) - set(all_methods)
        if unknown:
            raise ConfigError(f"--methods: unknown method(s) {sorted(unknown)} (config has {sorted(all_methods)})")
    out: dict[str, list[ArcPoint]] = {}
    for name, blk in all_methods.items():
        if methods and name not in methods:
            continue
        blk = expand_env(blk, f"methods.{name}")
        if not isinstance(blk, dict) or "class_path" not in blk:
            raise ConfigError(f"methods.{name}.class_path: missing")
        cls = import_class(blk["class_path"], f"methods.{name}")
        param, low, high = _regularisation(cls, name, specs.get(name))
        default = _default_value(cls, param, blk.get("init_args") or {}, name)
        values = [float(v) for v in np.logspace(math.log10(low), math.log10(high), k)]
        pts = []
        has_default = False
        for v in values:
            if abs(v - default) <= 1e-6 * default:
                has_default = True
                pts.append(ArcPoint(method=name, experiment=name, param=param, value=default, is_default=True))
            else:
                pts.append(ArcPoint(method=name, experiment=f"{name}-{param}{_fmt_value(v)}", param=param, value=v, is_default=False))
        if not has_default:
            pts.append(ArcPoint(method=name, experiment=name, param=param, value=default, is_default=True))
        pts.sort(key=lambda p: p["value"])
        names = [p["experiment"] for p in pts]
        if len(set(names)) != len(names):
            raise ConfigError(f"arc.methods.{name}: two values give the same point name ({names}); widen the range or lower k")
        clash = set(names) & (set(all_methods) - {name})
        if clash:
            raise ConfigError(f"methods.{name}: curve point name(s) {sorted(clash)} are already methods of the config")
        out[name] = pts
    return out


def build_arc_config(raw: dict[str, Any], points: dict[str, list[ArcPoint]], suite: str, output: Path) -> dict[str, Any]:
    """The grid config that runs every point: the config's datasets, trainer and seeds; per
    method its block (without ``variants``) at its own setting and one block per other value."""
    cfg = {k: copy.deepcopy(v) for k, v in raw.items() if k not in ("arc", "methods")}
    cfg["suite"] = suite
    cfg["output"] = str(output)
    methods: dict[str, Any] = {}
    for name, pts in points.items():
        base = {k: copy.deepcopy(v) for k, v in raw["methods"][name].items() if k != "variants"}
        for p in pts:
            blk = copy.deepcopy(base)
            if not p["is_default"]:
                blk["init_args"] = {**(blk.get("init_args") or {}), p["param"]: p["value"]}
            methods[p["experiment"]] = blk
    cfg["methods"] = methods
    return cfg


def _read(exp_dir: Path) -> tuple[str, list[dict[str, Any]]]:
    """(status from ``run.json``, case rows) of one experiment folder."""
    import json

    from benchmark.core.results import read_cases_csv

    try:
        status = json.loads((exp_dir / "run.json").read_text()).get("status", "unknown")
    except (OSError, ValueError):
        status = "missing"
    rows = read_cases_csv(exp_dir / "cases.csv") if (exp_dir / "cases.csv").exists() else []
    return str(status), rows


def _means(rows: list[dict[str, Any]], keys: list[str]) -> dict[str, float]:
    out = {}
    for key in keys:
        v = np.asarray([float(r.get(key, math.nan)) if isinstance(r.get(key), (int, float)) else math.nan for r in rows], dtype=np.float64)
        v = v[np.isfinite(v)]
        out[key] = float(v.mean()) if v.size else math.nan
    return out


def write_arc_csv(output: Path, datasets: list[str], seeds: list[int], points: dict[str, list[ArcPoint]], bound: float) -> Path:
    """``<output>/arc.csv`` from the points' results (all seeds pooled); returns its path.

    A point counts as complete when every seed's experiment is; its means are over the cases
    of the complete seeds. A complete point with a diverged seed
    (:func:`leaderboard.table.diverged_runs`, against the grid's ``initial`` rows when it has
    them) gets the status ``diverged``: it is listed, but neither drawn nor eligible as best. Rows of an existing ``arc.csv`` for other (dataset, method)
    pairs are kept, so ``--methods a`` after ``--methods b`` leaves both curves.
    """
    from benchmark.core.io import atomic_write_text
    from benchmark.core.results import experiment_dir
    from leaderboard.ablation import ARC_COLUMNS
    from leaderboard.table import INITIAL, diverged_runs

    keys = ["dice", "epe_mm", "sdlogj", "ndv_pct", "fold_pct", "tre"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(ARC_COLUMNS)
    mine = {(ds, name) for ds in datasets for name in points}
    old = output / "arc.csv"
    if old.exists():
        with open(old, newline="") as fh:
            for r in csv.DictReader(fh):
                if (r.get("dataset"), r.get("method")) not in mine:
                    w.writerow([r.get(c, "") for c in ARC_COLUMNS])
    for ds in datasets:
        # the reference of the divergence check (leaderboard.table.diverged_runs), when the grid has it
        initial_rows = [r for s in seeds for r in _read(experiment_dir(output, ds, INITIAL, s))[1]]
        for name, pts in points.items():
            for p in pts:
                runs = [_read(experiment_dir(output, ds, p["experiment"], s)) for s in seeds]
                done = [rs for st, rs in runs if st == "complete"]
                status = "complete" if len(done) == len(runs) else next(st for st, _ in runs if st != "complete")
                if status == "complete" and diverged_runs(initial_rows + [r for rs in done for r in rs]):
                    status = "diverged"  # a blown-up seed: the point is neither drawn nor eligible as best
                ok = [(len(rs), _means(rs, keys)) for rs in done]
                n = sum(m[0] for m in ok)
                vals = {k: (float(np.average([m[1][k] for m in ok if np.isfinite(m[1][k])],
                                             weights=[m[0] for m in ok if np.isfinite(m[1][k])]))
                            if any(np.isfinite(m[1][k]) for m in ok) else math.nan) for k in keys}
                row = {"dataset": ds, "method": name, "experiment": p["experiment"], "param": p["param"], "value": repr(p["value"]),
                       "is_default": int(p["is_default"]), "status": status, "n_cases": n, "sdlogj_bound": bound, **vals}
                w.writerow(["" if isinstance(row[c], float) and not np.isfinite(row[c]) else row[c] for c in ARC_COLUMNS])
    return atomic_write_text(output / "arc.csv", buf.getvalue())


class ArcPlan(NamedTuple):
    """What ``regbench arc`` will run: the config file, its raw mapping (overrides applied),
    the suite, the results folder, the SDlogJ bound, the seeds, every curve's points and the grid config
    that runs them (:func:`build_arc_config`)."""

    path: Path
    raw: dict[str, Any]
    suite: str
    output: Path
    sdlogj_bound: float
    seeds: list[int]
    points: dict[str, list[ArcPoint]]
    grid: dict[str, Any]

    def header(self) -> str:
        """The comment lines above the written (or printed) ``arc_config.yaml``."""
        gen = self.output / "arc_config.yaml"
        return (f"# Written by `regbench arc {self.path}`: every point of the accuracy-regularity curves as a plain grid.\n"
                f"# `regbench run {gen}` runs (or resumes) the same experiments.\n")

    def point_lines(self) -> list[str]:
        """One line per curve: the method, its weight and the values (the default marked)."""
        return [f"{name}: {pts[0]['param']} = " + ", ".join(_fmt_value(q["value"]) + (" (default)" if q["is_default"] else "")
                                                       for q in pts) for name, pts in self.points.items()]


def plan_arc(config: str | Path, output: str | None = None, methods: list[str] | None = None, k: int | None = None,
             sdlogj_bound: float | None = None, overrides: list[str] | None = None) -> ArcPlan:
    """Read an arc config and resolve what it will run (nothing is written or run); raises
    :class:`benchmark.runner.ConfigError` naming the key on a bad config."""
    from benchmark.runner import ConfigError, apply_overrides, expand_env

    p = Path(config)
    if not p.exists():
        raise ConfigError(f"{p}: config file not found")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    raw = apply_overrides(raw, overrides)
    top = expand_env({k_: v for k_, v in raw.items() if k_ in ("suite", "output", "arc", "seeds")})
    suite = str(top.get("suite") or p.stem)
    out = Path(output or top.get("output") or Path("results") / suite)
    arc = top.get("arc") or {}
    if sdlogj_bound is None:
        sdlogj_bound = arc.get("sdlogj_bound", DEFAULT_SDLOGJ_BOUND) if isinstance(arc, dict) else DEFAULT_SDLOGJ_BOUND
    try:
        bound = float(sdlogj_bound)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"arc.sdlogj_bound: expected a number, got {sdlogj_bound!r}") from exc
    points = arc_points(raw, k, methods)
    return ArcPlan(p, raw, suite, out, bound, top.get("seeds", [0]), points, build_arc_config(raw, points, suite, out))


def print_arc_config(config: str | Path, output: str | None = None, methods: list[str] | None = None,
                     k: int | None = None, sdlogj_bound: float | None = None, overrides: list[str] | None = None) -> str:
    """``regbench arc CONFIG --print_config``: the grid that ``arc`` would run, as
    ``regbench run --print_config`` prints it (after every check of
    :func:`benchmark.runner.check_grid_config`, with the class defaults as comments), under
    comment lines naming each curve's points. Nothing is written or run."""
    import tempfile

    from benchmark.runner import ConfigError, print_config

    plan = plan_arc(config, output, methods, k, sdlogj_bound, overrides)
    with tempfile.TemporaryDirectory(prefix="regbench-arc-") as tmp:
        gen = Path(tmp) / "arc_config.yaml"
        gen.write_text(yaml.safe_dump(plan.grid, sort_keys=False))
        try:
            text = print_config(gen, output=str(plan.output))
        except ConfigError as exc:  # name the user's file, not the temporary one
            raise ConfigError(str(exc).replace(str(gen), f"{plan.path} (arc grid)")) from exc
    curves = "".join(f"# curve {line}\n" for line in plan.point_lines())
    head = (f"# `regbench arc {plan.path} --print_config`: the grid of its curves, which `regbench arc` writes to "
            f"{plan.output / 'arc_config.yaml'} and runs.\n")
    return head + f"# SDlogJ bound of the summary: {_fmt_value(plan.sdlogj_bound)}\n" + curves + text


def run_arc(config: str | Path, output: str | None = None, methods: list[str] | None = None, k: int | None = None,
            sdlogj_bound: float | None = None, overrides: list[str] | None = None, log=print) -> dict[str, str]:
    """Run every point of every curve (resumable), write ``arc.csv`` and the leaderboard.

    Returns ``{experiment_dir: status}`` of the grid run. Raises
    :class:`benchmark.runner.ConfigError` naming the key before any work on a bad config.
    When the grid stops (a signal: :class:`benchmark.reliability.RunInterrupted`, or an
    error), ``arc.csv`` and the report are still written from the points finished so far
    (the unfinished ones with their status) before the exception goes on.
    """
    from benchmark.core.io import atomic_write_text
    from benchmark.runner import expand_env, is_rank_zero, run_grid

    plan = plan_arc(config, output, methods, k, sdlogj_bound, overrides)
    raw, out, points, bound = plan.raw, plan.output, plan.points, plan.sdlogj_bound
    gen = out / "arc_config.yaml"
    if is_rank_zero():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(gen, plan.header() + yaml.safe_dump(plan.grid, sort_keys=False))
    datasets = list(expand_env(raw.get("datasets") or {}))
    for line in plan.point_lines():
        log(f"[arc] {line}")
    started = False
    try:
        statuses = run_grid(gen, output=str(out), leaderboard=False, log=log)
        started = True
    finally:
        # also after a signal or an error: the finished points are reported, nothing is lost
        if is_rank_zero() and (started or any(out.glob("*/*/seed*/run.json"))):
            try:
                csv_path = write_arc_csv(out, datasets, plan.seeds, points, bound)
                from leaderboard.write import write_leaderboard

                md = write_leaderboard(out)
                log(f"[arc] {csv_path}; [leaderboard] {md} (and .csv, .html)")
            except Exception as exc:  # noqa: BLE001 - never hide the grid's own outcome
                if started:
                    raise
                log(f"[arc] could not write arc.csv / the report: {type(exc).__name__}: {exc}")
    return statuses


def _cmd_arc(args) -> int:
    from benchmark.reliability import RunInterrupted, install_signal_handlers, one_line_error
    from benchmark.runner import ConfigError, is_rank_zero, set_threads

    debug = bool(getattr(args, "debug", False)) or "--debug" in sys.argv[1:]
    if args.threads is not None and args.threads < 1:
        print(f"regbench arc: --threads: expected a positive integer, got {args.threads}", file=sys.stderr)
        return 2
    set_threads(args.threads)
    restore = install_signal_handlers()
    try:
        if getattr(args, "print_config", False):  # check and print; nothing is written or run
            sys.stdout.write(print_arc_config(args.config, output=args.output,
                                              methods=args.methods.split(",") if args.methods else None,
                                              k=args.k, sdlogj_bound=args.sdlogj_bound, overrides=args.set))
            return 0
        statuses = run_arc(args.config, output=args.output, methods=args.methods.split(",") if args.methods else None,
                           k=args.k, sdlogj_bound=args.sdlogj_bound, overrides=args.set)
    except ConfigError as exc:
        print(f"regbench arc: config error: {exc}", file=sys.stderr)
        return 2
    except RunInterrupted as stop:
        if is_rank_zero():
            print(f"regbench arc: {stop}; the point in flight is marked interrupted (run the same command to resume)",
                  file=sys.stderr)
        return stop.exit_code
    except Exception as exc:
        if debug:
            raise
        print(f"regbench arc: error: {one_line_error(exc)} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        restore()
    bad = {d: s_ for d, s_ in statuses.items() if s_ != "complete"}
    if bad and is_rank_zero():
        print(f"regbench arc: {len(bad)} point(s) did not complete: {bad}", file=sys.stderr)
    return 1 if bad else 0


def add_cli_commands(sub) -> None:
    a = sub.add_parser("arc", help="accuracy-regularity curves: each method at K log-spaced regularisation weights (resumable)")
    a.add_argument("config", help="grid YAML (see benchmark/configs/arc_brain.yaml); optional `arc:` block")
    a.add_argument("--k", type=int, default=None, help=f"values per curve (default: the config's arc.k, else {DEFAULT_K})")
    a.add_argument("--sdlogj-bound", type=float, default=None,
                   help=f"summary: best Dice at mean SDlogJ <= this (default: arc.sdlogj_bound, else {DEFAULT_SDLOGJ_BOUND})")
    a.add_argument("--output", help="results folder (default: the config's `output`, else results/<suite>)")
    a.add_argument("--methods", help="comma-separated subset of the config's methods")
    a.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value before the curves are built (repeatable; value read as YAML)")
    a.add_argument("--threads", type=int, default=None, help="torch intra-op and inter-op threads (default: torch's)")
    a.add_argument("--print_config", action="store_true",
                   help="check the config and print the grid the curves run (arc_config.yaml, with each block's "
                        "class defaults as comments), then exit without writing or running anything")
    a.set_defaults(func=_cmd_arc)
