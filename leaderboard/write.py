"""Writing the leaderboard files: builds the report once (:mod:`leaderboard.table`) and hands
it to each writer asked for (Markdown, CSV, LaTeX, HTML)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from benchmark.core.io import atomic_write_text
from leaderboard.markdown import markdown
from leaderboard.table import ALL_FORMATS, DEFAULT_FORMATS, LEADERBOARD_METRICS, Report, build_report, flat_rows

__all__ = ["write_leaderboard", "csv_text"]


def csv_text(report: Report) -> str:
    """One row per (dataset, method); v1 columns first (``<metric>_mean/_std/_median``)."""
    rows = [r for ds in report.datasets for r in flat_rows(ds)]
    cols = ["dataset", "method", "n_cases", "n_seeds"] + [f"{m}_{s}" for m in LEADERBOARD_METRICS for s in ("mean", "std", "median")]
    extra = []
    for r in rows:
        for k in r:
            if k not in cols and k not in extra:
                extra.append(k)
    cols += extra
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append("" if isinstance(v, float) and not np.isfinite(v) else v)
        w.writerow(cells)
    return buf.getvalue()


def write_leaderboard(root: str | Path, formats: Sequence[str] | str = DEFAULT_FORMATS,
                      rank_metrics: Mapping[str, Sequence[str]] | None = None, view: int = 2) -> Path:
    """Write ``leaderboard.<fmt>`` under ``root`` for each format; returns the Markdown path.

    Args:
        formats: any of ``md``, ``csv``, ``tex``, ``html`` (list or comma-separated);
            Markdown is always written (its path is the return value).
        rank_metrics: see :func:`build_report`.
        view: the HTML panels show the mid-slice orthogonal to this array axis.
    """
    root = Path(root)
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",") if f.strip()]
    unknown = set(formats) - set(ALL_FORMATS)
    if unknown:
        raise ValueError(f"unknown leaderboard format(s) {sorted(unknown)} (allowed: {', '.join(ALL_FORMATS)})")
    report = build_report(root, rank_metrics)
    md = root / "leaderboard.md"
    atomic_write_text(md, markdown(report))
    if "csv" in formats:
        atomic_write_text(root / "leaderboard.csv", csv_text(report))
    if "tex" in formats:
        from leaderboard.latex import latex

        atomic_write_text(root / "leaderboard.tex", latex(report))
    if "html" in formats:
        from leaderboard.html import html_page

        atomic_write_text(root / "leaderboard.html", html_page(report, view=view))
    return md
