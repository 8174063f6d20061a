"""One self-contained HTML page: the tables and the figures, PNGs embedded as base64.

No script, stylesheet, font or image is fetched from anywhere: the page opens offline and
the only links are in-page anchors. Every section is present for every dataset; where a
part has no data the section says so.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html as _html
import struct
from typing import Callable

from leaderboard import plots
from leaderboard.table import (
    FOOTNOTE,
    POSE_FOOTNOTE,
    DatasetReport,
    Report,
    fmt,
    ranking_cells,
    robust_cells,
    seed_cells,
    summary_cells,
)

__all__ = ["SECTIONS", "html_page", "img_tag", "png_size"]

#: (id, title) of the page's sections, in order.
SECTIONS: list[tuple[str, str]] = [
    ("tables", "Tables"),
    ("dice-boxplots", "Dice per method"),
    ("dice-vs-fold", "Dice vs fold %"),
    ("runtime", "Runtime"),
    ("per-label-dice", "Dice per label"),
    ("qualitative", "Qualitative panels"),
    ("mtre-percentiles", "2D/3D: mTRE percentiles"),
    ("left-out", "Experiments left out"),
]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:1.6em}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:2em}h3{margin-bottom:.3em}
.scroll{overflow-x:auto;max-width:100%}table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}
th,td{padding:3px 8px;text-align:right;border-bottom:1px solid #e5e5e5;white-space:nowrap}
th{border-bottom:2px solid #999;background:#fafafa}td:first-child,th:first-child{text-align:left}
tr.initial td{color:#666;font-style:italic}
.nodata{color:#8a6d3b;background:#fcf8e3;padding:6px 10px;border-radius:4px;display:inline-block}
.note{color:#555;font-size:12px}nav a{margin-right:12px}
img{max-width:100%;height:auto;display:block;margin:6px 0 14px}
"""


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) in pixels from a PNG's IHDR chunk."""
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    w, h = struct.unpack(">II", png[16:24])
    return int(w), int(h)


def img_tag(png: bytes, alt: str) -> str:
    """``<img>`` with the PNG inline (data URI) and its pixel size as width/height."""
    w, h = png_size(png)
    b64 = base64.b64encode(png).decode("ascii")
    return f'<img alt="{_html.escape(alt)}" width="{w}" height="{h}" src="data:image/png;base64,{b64}">'


def _nodata(text: str) -> str:
    return f'<p class="nodata">{_html.escape(text)}</p>'


def _table(head: list[str], rows: list[list[str]]) -> str:
    # Cells come from summary_cells(style="html") etc.: plain text plus <b>/<sup> markup that
    # we produce ourselves; method names are escaped.
    out = ['<div class="scroll"><table>', "<tr>" + "".join(f"<th>{_html.escape(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        cls = ' class="initial"' if r and r[0] == "initial" else ""
        cells = [_html.escape(r[0])] + [c for c in r[1:]]
        out.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</table></div>")
    return "\n".join(out)


def _esc_rows(rows: list[list[str]]) -> list[list[str]]:
    return [[r[0]] + [_html.escape(c) for c in r[1:]] for r in rows]


def _tables(ds: DatasetReport) -> str:
    parts = [_table(*summary_cells(ds, "html"))]
    if ds.kind == "deformable":
        h, r = robust_cells(ds)
        parts += ["<p>Median / worst 30 % (mean of the 30 % worst cases):</p>", _table(h, _esc_rows(r))]
    h, r = ranking_cells(ds)
    if r:
        parts += [f"<p>Learn2Reg rank scores per metric ({_html.escape(', '.join(ds.rank_metrics))}, runtime):</p>",
                  _table(h, _esc_rows(r))]
    else:
        parts.append(_nodata("No ranked method (only the initial row)."))
    h, r = seed_cells(ds)
    if r:
        parts += ["<p>Per seed (means) and the std of the seed means:</p>", _table(h, _esc_rows(r))]
    else:
        parts.append('<p class="note">One seed per method: no per-seed variation to show.</p>')
    return "\n".join(parts)


def _safe(fn: Callable[..., bytes | None], *args, **kw) -> tuple[bytes | None, str | None]:
    """Draw one figure; a figure that fails (odd data) becomes a note, never a failed report."""
    try:
        return fn(*args, **kw), None
    except Exception as exc:  # noqa: BLE001 - reported in the page
        return None, f"This figure could not be drawn ({type(exc).__name__}: {exc})."


def _figure(fn: Callable[[DatasetReport], bytes | None], ds: DatasetReport, alt: str, missing: str) -> str:
    png, err = _safe(fn, ds)
    return img_tag(png, alt) if png else _nodata(err or missing)


def _qualitative(ds: DatasetReport, view: int) -> str:
    panels = plots.method_panels(ds)
    missing = [ms.method for ms in ds.methods if ms.method not in panels]
    note = f'<p class="note">No panel.npz for: {_html.escape(", ".join(missing))}.</p>' if missing and panels else ""
    if not panels:
        return _nodata("No qualitative panel saved (panel.npz) for any method of this dataset.")
    if ds.kind == "pose":
        png, err = _safe(plots.pose_panel, panels)
        return (img_tag(png, f"{ds.name}: X-ray and DRRs") if png else _nodata(err or "Panels lack the X-ray / DRR arrays.")) + note
    png, err = _safe(plots.deformable_panel, panels, view=view)
    return (img_tag(png, f"{ds.name}: qualitative panel") if png else _nodata(err or "Panels lack the slice arrays.")) + note


def _mtre(ds: DatasetReport) -> str:
    if ds.kind != "pose":
        return _nodata("Not a 2D/3D dataset (no mTRE).")
    rows = []
    for ms in ds.methods:
        st = ms.stats.get("mtre_mm")
        if st:
            rows.append([ms.method] + [fmt(st[q], 2) for q in ("p50", "p75", "p95", "mean")]
                        + [fmt(ms.stats.get(k, {}).get("mean"), 3) for k in ("success_10mm", "success_2mm")])
    table = _table(["method", "mTRE p50 mm", "p75", "p95", "mean", "success <10 mm", "success <2 mm"], _esc_rows(rows)) if rows else ""
    note = ('<p class="note">Share of cases with mTRE at most x (log scale); dots: the 50th, 75th and 95th '
            "percentiles; dashed lines: the 2 mm and 10 mm success thresholds.</p>")
    return table + _figure(plots.mtre_curves, ds, f"{ds.name}: mTRE", "No finite mTRE values.") + note


def html_page(report: Report, view: int = 2) -> str:
    """The report page (see the module docstring); ``view``: array axis the panels' slices are orthogonal to."""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>regbench leaderboard: {_html.escape(report.root.name)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>regbench leaderboard — {_html.escape(report.root.name)}</h1>",
        f'<p class="note">Results folder {_html.escape(str(report.root))}; generated {now}; '
        f"datasets: {_html.escape(', '.join(d.name for d in report.datasets) or 'none')}.</p>",
        "<nav>" + "".join(f'<a href="#{sid}">{_html.escape(t)}</a>' for sid, t in SECTIONS) + "</nav>",
    ]
    for sid, title in SECTIONS:
        out.append(f'<section id="{sid}"><h2>{_html.escape(title)}</h2>')
        if sid == "left-out":
            if report.skipped:
                out.append("<ul>" + "".join(f"<li>{_html.escape(s['experiment'])}: {_html.escape(str(s['status']))}</li>"
                                            for s in report.skipped) + "</ul>")
            else:
                out.append('<p class="note">None: every experiment found is complete.</p>')
            out.append("</section>")
            continue
        if not report.datasets:
            out.append(_nodata("No complete experiment in this results folder."))
        for ds in report.datasets:
            kind = "2D/3D" if ds.kind == "pose" else "deformable"
            out.append(f'<div class="dataset" data-dataset="{_html.escape(ds.name)}"><h3>{_html.escape(ds.name)} ({kind})</h3>')
            if sid == "tables":
                out.append(_tables(ds))
                notes = ([POSE_FOOTNOTE] if ds.kind == "pose" else []) + [FOOTNOTE]
                for n in notes:
                    out.append(f'<p class="note">{_html.escape(n.replace("`", "")).replace("**Bold**", "<b>Bold</b>")}</p>')
            elif sid == "dice-boxplots":
                out.append(_figure(plots.dice_boxplot, ds, f"{ds.name}: Dice box plots", "No Dice values (no labels in this dataset)."))
            elif sid == "dice-vs-fold":
                out.append(_figure(plots.dice_vs_fold, ds, f"{ds.name}: Dice vs fold %", "No cases with both Dice and fold %."))
            elif sid == "runtime":
                out.append(_figure(plots.runtime_plot, ds, f"{ds.name}: runtime", "No runtime values."))
            elif sid == "per-label-dice":
                out.append(_figure(plots.label_heatmap, ds, f"{ds.name}: Dice per label", "No per-label Dice (dice_per_label) in the cases."))
            elif sid == "qualitative":
                out.append(_qualitative(ds, view))
            elif sid == "mtre-percentiles":
                out.append(_mtre(ds))
            out.append("</div>")
        out.append("</section>")
    from leaderboard.ablation import html_sections  # ablation tables and ARC curves (when present)

    out.append(html_sections(report))
    out.append("</body></html>")
    return "\n".join(out) + "\n"
