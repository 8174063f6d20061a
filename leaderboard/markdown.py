"""The Markdown writer: the leaderboard report (:mod:`leaderboard.table`) and its ablation and
accuracy–regularity sections (:mod:`leaderboard.ablation`) as one Markdown page."""

from __future__ import annotations

from typing import Sequence

from leaderboard import ranking
from leaderboard.ablation import (
    ABLATION_NOTE,
    ARC_NOTE,
    AblationTable,
    ablation_cells,
    ablation_tables,
    arc_cells,
    arc_point_cells,
    arc_summary,
    read_arc,
    verdict,
)
from leaderboard.table import (
    FOOTNOTE,
    POSE_FOOTNOTE,
    Report,
    budget_cells,
    diverged_notes,
    initial_cells,
    paired_cells,
    ranking_cells,
    robust_cells,
    seed_cells,
    summary_cells,
)

__all__ = ["markdown", "markdown_sections", "ablation_markdown", "md_table"]


def md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * len(head)) + " |"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def markdown(report: Report) -> str:
    """The whole leaderboard as Markdown."""
    lines = ["# Leaderboard", ""]
    if not report.datasets:
        lines += ["No complete experiment in this results folder.", ""]
    for ds in report.datasets:
        lines += [f"## {ds.name}" + (" (2D/3D)" if ds.kind == "pose" else ""), ""]
        lines += md_table(*summary_cells(ds, "md")) + [""]
        notes = diverged_notes(ds)
        if notes:
            lines += ["Diverged runs (left out of every statistic in this report):", ""] + [f"- {n}" for n in notes] + [""]
        if ds.kind == "deformable":
            lines += ["Median / worst 30 % (mean of the 30 % worst cases):", ""] + md_table(*robust_cells(ds)) + [""]
        h, r = paired_cells(ds)
        if r:
            lines += ["Differences from the best method (paired over cases; Δ = method − best, mean over seeds per case):",
                      ""] + md_table(h, r) + [""]
        h, r = initial_cells(ds)
        if r:
            lines += ["Change from no registration (paired over cases; Δ = method − initial, mean over seeds per case):",
                      ""] + md_table(h, r) + [""]
        h, r = budget_cells(ds)
        if r:
            lines += ["Training budget and cost (means over seeds):", ""] + md_table(h, r) + [""]
        h, r = ranking_cells(ds)
        if r:
            lines += [f"Rank scores per metric ({', '.join(ds.rank_metrics + [ranking.RUNTIME_METRIC])}):", ""] + md_table(h, r) + [""]
        h, r = seed_cells(ds)
        if r:
            lines += ["Per seed:", ""] + md_table(h, r) + [""]
    lines += markdown_sections(report)  # ablation tables, ARC summary (when present)
    lines.append(FOOTNOTE)
    if any(ds.kind == "pose" for ds in report.datasets):
        lines += ["", POSE_FOOTNOTE]
    if report.skipped:
        lines += ["", "Left out (not complete):", ""]
        lines += [f"- {s['experiment']}: {s['status']}" for s in report.skipped]
    return "\n".join(lines) + "\n"


def ablation_markdown(tables: Sequence[AblationTable]) -> list[str]:
    """Markdown lines of every ablation table (empty when there is none)."""
    if not tables:
        return []
    lines = ["## Ablations", ""]
    for t in tables:
        head, body = ablation_cells(t, "*")
        lines += [f"### {t.dataset}: {t.method}", ""]
        lines += ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * len(head)) + " |"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        lines += ["", f"{t.method}: {verdict(t)}.", ""]
    lines += [ABLATION_NOTE, ""]
    return lines


# ----------------------------------------------------------------------------- ARC


def markdown_sections(report: Report) -> list[str]:
    """Markdown lines for the leaderboard: ablation tables and the ARC summary (when present)."""
    lines = ablation_markdown(ablation_tables(report))
    arc = read_arc(report.root)
    if arc:
        lines += ["## Accuracy–regularity curves", ""]
        for head, body in (arc_cells(arc_summary(arc)), arc_point_cells(arc)):
            lines += ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * len(head)) + " |"]
            lines += ["| " + " | ".join(r) + " |" for r in body] + [""]
        lines += [ARC_NOTE, ""]
    return lines
