"""``regbench leaderboard DIR --format md,csv,tex,html``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_cli_commands", "parse_rank_metrics"]


def parse_rank_metrics(items: list[str] | None) -> dict[str, list[str]] | None:
    """``["dice,hd95", "pose=mtre_mm,success_10mm"]`` → ``{"deformable": [...], "pose": [...]}``.

    An item ``NAME=m1,m2`` sets the metrics of dataset (or kind) NAME; an item without
    ``NAME=`` sets both kinds. ``a|b`` inside a list means "a, else b".
    """
    if not items:
        return None
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, rest = item.partition("=")
        metrics = [m.strip() for m in (rest if sep else name).split(",") if m.strip()]
        for key in ([name.strip()] if sep else ["deformable", "pose"]):
            out[key] = metrics
    return out


def check_results_folder(root: Path) -> list[str]:
    """Problems of every ``<dataset>/<method>/seed<k>/cases.csv`` under ``root`` (truncated
    rows, non-numeric metric cells, fewer rows than the experiment's ``run.json`` records).
    An experiment whose ``run.json`` is unreadable is not checked: it is left out of the
    ranking (:func:`unreadable_runs`)."""
    from benchmark.core.io import DataError
    from benchmark.core.results import check_cases_csv, read_run_json

    problems: list[str] = []
    for cases in sorted(Path(root).glob("*/*/seed*/cases.csv")):
        try:
            run = read_run_json(cases.parent) or {}
        except DataError:
            continue
        total = run.get("cases_total") if run.get("status") == "complete" else None
        problems += check_cases_csv(cases, expected_rows=total if isinstance(total, int) else None)
    return problems


def unreadable_runs(root: Path) -> list[str]:
    """One line per experiment under ``root`` whose ``run.json`` exists but cannot be read
    (truncated, not UTF-8, not a JSON object): which experiment is left out, and why."""
    from benchmark.core.io import DataError
    from benchmark.core.results import read_run_json

    out: list[str] = []
    for run in sorted(Path(root).glob("*/*/seed*/run.json")):
        try:
            read_run_json(run.parent)
        except DataError as exc:
            out.append(f"left out {run.parent.relative_to(root)}: {exc} (`regbench run` moves it aside and recomputes it)")
    return out


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    from leaderboard.table import ALL_FORMATS
    from leaderboard.write import write_leaderboard

    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    bad = sorted(set(formats) - set(ALL_FORMATS))
    if bad:
        print(f"regbench leaderboard: unknown format(s) {bad} (allowed: {', '.join(ALL_FORMATS)})", file=sys.stderr)
        return 2
    root = Path(args.results_dir)
    if not root.is_dir():
        print(f"regbench leaderboard: {root}: not a folder (give the results folder of `regbench run`)", file=sys.stderr)
        return 2
    if not any(root.glob("*/*/seed*/run.json")) and not any(root.glob("*/*/seed*/cases.csv")):
        # e.g. a dataset folder inside the results folder: an empty leaderboard written there
        # would look like a result
        print(f"regbench leaderboard: {root}: no experiments (<dataset>/<method>/seed<k>/) in this folder; give the "
              "results folder of `regbench run`", file=sys.stderr)
        return 2
    problems = check_results_folder(root)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        print(f"regbench leaderboard: {problems[0]}{more}; fix or re-run that experiment (`regbench run` recomputes "
              "missing cases) before ranking", file=sys.stderr)
        return 2
    for line in unreadable_runs(root):
        print(f"regbench leaderboard: {line}", file=sys.stderr)
    md = write_leaderboard(root, formats, rank_metrics=parse_rank_metrics(args.rank_metrics), view=args.view)
    if not args.quiet:
        print(md.read_text())
    written = [str(root / f"leaderboard.{f}") for f in dict.fromkeys(["md", *formats])]
    print("wrote " + ", ".join(written), file=sys.stderr)
    return 0


def add_cli_commands(sub) -> None:
    """Register ``leaderboard`` on the ``regbench`` sub-parser set."""
    lb = sub.add_parser("leaderboard", help="tables, rank scores, significance and the HTML report of a results folder")
    lb.add_argument("results_dir", help="folder written by `regbench run` (<dataset>/<method>/seed<k>/cases.csv)")
    lb.add_argument("--format", default="md,csv,tex,html", help="comma-separated: md, csv, tex, html (default: all)")
    lb.add_argument("--rank-metrics", action="append", metavar="[NAME=]M1,M2",
                    help="metrics of the rank score (default deformable: dice,dice_robust30,hd95,sdlogj|ndv_pct,tre; "
                         "pose: mtre_mm,success_10mm; runtime is always added for the second score); NAME is a "
                         "dataset or kind (deformable, pose); repeatable")
    lb.add_argument("--view", type=int, default=2, choices=[0, 1, 2], help="qualitative panels: slice orthogonal to this array axis")
    lb.add_argument("--quiet", action="store_true", help="do not print the Markdown table")
    lb.set_defaults(func=_cmd_leaderboard)
