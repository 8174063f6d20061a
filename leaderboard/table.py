"""Leaderboard v1: per-dataset tables of mean / std / median per metric.

Reads every ``<root>/<dataset>/<method>/seed<k>/cases.csv`` (never imports ``systems``) and
writes ``<root>/leaderboard.md`` and ``<root>/leaderboard.csv``. Seeds are pooled: each
method's statistics are over all its cases of all seeds. The ``initial`` row (no
registration) sits first in each dataset. Only experiments whose ``run.json`` says
``complete`` enter; others are listed under the table with their status.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from benchmark.io import atomic_write_text
from benchmark.results import read_cases_csv

__all__ = ["LEADERBOARD_METRICS", "collect", "aggregate_rows", "write_leaderboard"]

#: metric column -> (title, higher is better)
LEADERBOARD_METRICS: dict[str, tuple[str, bool]] = {
    "dice": ("Dice", True),
    "hd95": ("HD95 mm", False),
    "tre": ("TRE mm", False),
    "fold_pct": ("fold %", False),
    "sdlogj": ("SDlogJ", False),
    "ndv_pct": ("NDV %", False),
    "runtime_s": ("runtime s", False),
}


def collect(root: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """All case rows of complete experiments, and the list of experiments left out."""
    root = Path(root)
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for cases in sorted(root.glob("*/*/seed*/cases.csv")):
        exp = cases.parent
        status = None
        try:
            status = json.loads((exp / "run.json").read_text()).get("status")
        except (OSError, json.JSONDecodeError):
            status = "no run.json"
        if status != "complete":
            skipped.append({"experiment": str(exp.relative_to(root)), "status": status})
            continue
        rows.extend(read_cases_csv(cases))
    for run in sorted(root.glob("*/*/seed*/run.json")):
        if not (run.parent / "cases.csv").exists():
            try:
                status = json.loads(run.read_text()).get("status")
            except (OSError, json.JSONDecodeError):
                status = "unreadable run.json"
            skipped.append({"experiment": str(run.parent.relative_to(root)), "status": status})
    return rows, skipped


def _stats(values: list[float]) -> tuple[float, float, float]:
    a = np.asarray(values, dtype=np.float64)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return math.nan, math.nan, math.nan
    return float(a.mean()), float(a.std(ddof=0)), float(np.median(a))


def aggregate_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, method): ``<metric>_mean``, ``_std``, ``_median``, ``n_cases``, ``n_seeds``."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["method"]), []).append(r)
    out = []
    for (ds, method), rs in groups.items():
        row: dict[str, Any] = {"dataset": ds, "method": method, "n_cases": len(rs), "n_seeds": len({r["seed"] for r in rs})}
        for m in LEADERBOARD_METRICS:
            mean, std, med = _stats([r.get(m, math.nan) for r in rs])
            row[f"{m}_mean"], row[f"{m}_std"], row[f"{m}_median"] = mean, std, med
        out.append(row)
    out.sort(key=lambda r: (r["dataset"], r["method"] != "initial", -(r["dice_mean"] if np.isfinite(r["dice_mean"]) else -1)))
    return out


def _fmt(x: float, digits: int = 3) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _markdown(table: list[dict[str, Any]], skipped: list[dict[str, Any]]) -> str:
    lines = ["# Leaderboard", ""]
    for ds in sorted({r["dataset"] for r in table}):
        rows = [r for r in table if r["dataset"] == ds]
        lines += [f"## {ds}", ""]
        head = ["method", "cases"] + [f"{t} ({'↑' if hib else '↓'})" for t, hib in LEADERBOARD_METRICS.values()]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("| " + " | ".join(["---"] * len(head)) + " |")
        for r in rows:
            cells = [r["method"], str(r["n_cases"])]
            for m in LEADERBOARD_METRICS:
                d = 2 if m == "runtime_s" else (4 if m in ("fold_pct", "ndv_pct") else 3)
                cells.append(f"{_fmt(r[f'{m}_mean'], d)} ± {_fmt(r[f'{m}_std'], d)} (med {_fmt(r[f'{m}_median'], d)})")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("Mean ± std (median) over all cases of all seeds. TRE and HD95 in mm; runtime is the registration call alone.")
    if skipped:
        lines += ["", "Left out (not complete):", ""]
        lines += [f"- {s['experiment']}: {s['status']}" for s in skipped]
    return "\n".join(lines) + "\n"


def write_leaderboard(root: str | Path) -> Path:
    """Write ``leaderboard.md`` and ``leaderboard.csv`` under ``root``; returns the Markdown path."""
    root = Path(root)
    rows, skipped = collect(root)
    table = aggregate_rows(rows)
    cols = ["dataset", "method", "n_cases", "n_seeds"] + [f"{m}_{s}" for m in LEADERBOARD_METRICS for s in ("mean", "std", "median")]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in table:
        w.writerow(["" if isinstance(r[c], float) and not np.isfinite(r[c]) else r[c] for c in cols])
    atomic_write_text(root / "leaderboard.csv", buf.getvalue())
    md = root / "leaderboard.md"
    atomic_write_text(md, _markdown(table, skipped))
    return md
