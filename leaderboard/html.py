"""One self-contained HTML page: the tables and the figures, PNGs embedded as base64.

No script, stylesheet, font or image is fetched from anywhere: the page opens offline and
the only links are in-page anchors. A section appears only when at least one dataset has
data for it, and within it only those datasets (a one-line note names the others and why).

Layout: tables fit a 1,280-px window without horizontal scrolling (headers wrap, a
``mean ± std`` or ``median / worst 30 %`` cell puts its second value on a second line;
a scroll box is the last resort on narrower windows); per-case distributions are box +
strip plots side by side; each experiment's provenance (run.json) is a table.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html as _html
import json
import re
import struct
from pathlib import Path
from typing import Any, Callable

from leaderboard import ablation, plots
from leaderboard.table import (
    FOOTNOTE,
    POSE_FOOTNOTE,
    DatasetReport,
    Report,
    fmt,
    budget_cells,
    diverged_notes,
    initial_cells,
    paired_cells,
    ranking_cells,
    robust_cells,
    seed_cells,
    summary_cells,
)

__all__ = ["SECTIONS", "html_page", "img_tag", "png_size"]

#: (id, title) of the page's sections, in order.
SECTIONS: list[tuple[str, str]] = [
    ("tables", "Tables"),
    ("distributions", "Per-case distributions"),
    ("dice-vs-fold", "Dice vs fold %"),
    ("runtime", "Runtime"),
    ("per-label-dice", "Dice per label"),
    ("qualitative", "Qualitative panels"),
    ("mtre-percentiles", "2D/3D: mTRE percentiles"),
    ("provenance", "Provenance"),
    ("left-out", "Experiments left out"),
]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:16px 24px;color:#222;max-width:1600px}
h1{font-size:1.6em}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:2em}h3{margin-bottom:.3em}
.scroll{overflow-x:auto;max-width:100%}table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}
th,td{padding:3px 7px;text-align:right;border-bottom:1px solid #e5e5e5;vertical-align:top}
td{white-space:nowrap}th{white-space:normal;min-width:3.5em;max-width:9em;border-bottom:2px solid #999;background:#fafafa;font-weight:600}
td:first-child,th:first-child{text-align:left}td .second{color:#666;font-size:11px;white-space:normal}
tr.initial td{color:#666;font-style:italic}
table.prov td{white-space:normal;max-width:16em;overflow-wrap:anywhere}table.prov code{font-size:12px}
.nodata{color:#8a6d3b;background:#fcf8e3;padding:6px 10px;border-radius:4px;display:inline-block}
.note{color:#555;font-size:12px}nav a{margin-right:12px;white-space:nowrap}
img{max-width:100%;height:auto;display:block;margin:6px 0 14px}
.figrow{display:flex;flex-wrap:wrap;gap:8px 16px;align-items:flex-start}.figrow img{margin:4px 0}
@media (max-width:1100px){table{font-size:12px}th,td{padding:2px 4px}}
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


#: "0.720 ± 0.013", "0.716 / 0.708", "0.557 [0.514, 0.604]" (possibly inside <b>…</b>,
#: followed by <sup>*</sup>).
_TWO_VALUES = re.compile(r"^(<b>)?([^<>±/\[\]]*?\S) (± |/ |\[)([^<>]*?)(</b>)?(<sup>.*</sup>)?$")


def _stack(cell: str) -> str:
    """Put the second value (std, worst 30 %, confidence interval) of a two-value cell on
    its own line, so columns stay narrow."""
    m = _TWO_VALUES.match(cell)
    if not m:
        return cell
    b0, first, sep, second, b1, sup = (g or "" for g in m.groups())
    return f'{b0}{first}{sup}{b1}<br><span class="second">{b0}{sep}{second}{b1}</span>'


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    # Cells come from summary_cells(style="html") etc.: plain text plus <b>/<sup> markup that
    # we produce ourselves; method names are escaped.
    attr = f' class="{cls}"' if cls else ""
    out = [f'<div class="scroll"><table{attr}>', "<tr>" + "".join(f"<th>{_html.escape(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        rcls = ' class="initial"' if r and r[0] == "initial" else ""
        cells = [_html.escape(r[0])] + [_stack(c) for c in r[1:]]
        out.append(f"<tr{rcls}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</table></div>")
    return "\n".join(out)


def _esc_rows(rows: list[list[str]]) -> list[list[str]]:
    return [[r[0]] + [_html.escape(c) for c in r[1:]] for r in rows]


def _tables(ds: DatasetReport) -> str:
    parts = [_table(*summary_cells(ds, "html"))]
    notes = diverged_notes(ds)
    if notes:
        parts.append('<p class="note">Diverged runs (left out of every statistic on this page):</p><ul class="diverged">'
                     + "".join(f"<li>{_html.escape(n)}</li>" for n in notes) + "</ul>")
    if ds.kind == "deformable":
        h, r = robust_cells(ds)
        parts += ["<p>Median / worst 30 % (mean of the 30 % worst cases):</p>", _table(h, _esc_rows(r))]
    h, r = paired_cells(ds)
    if r:
        parts += ["<p>Differences from the best method (paired over cases; Δ = method − best, mean over seeds per "
                  "case; 95 % bootstrap CI, Holm-corrected Wilcoxon p):</p>", _table(h, _esc_rows(r))]
    h, r = initial_cells(ds)
    if r:
        parts += ["<p>Change from no registration (paired over cases; Δ = method − initial, mean over seeds per "
                  "case; 95 % bootstrap CI, Holm-corrected Wilcoxon p):</p>", _table(h, _esc_rows(r))]
    h, r = budget_cells(ds)
    if r:
        parts += ["<p>Training budget and cost (means over seeds):</p>", _table(h, _esc_rows(r))]
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


#: A block of a section for one dataset: (HTML, None), or (None, why there is nothing).
Block = tuple["str | None", "str | None"]


def _figure(fn: Callable[[DatasetReport], bytes | None], ds: DatasetReport, alt: str, missing: str) -> Block:
    png, err = _safe(fn, ds)
    if png:
        return img_tag(png, alt), None
    return (_nodata(err), None) if err else (None, missing)


def _distributions(ds: DatasetReport) -> Block:
    """Box + strip plots of every per-case metric with values (Dice, HD95, TRE, EPE)."""
    imgs, errs = [], []
    for key, ylabel, title in plots.BOX_METRICS:
        png, err = _safe(plots.metric_boxplot, ds, key, ylabel, title)
        if png:
            imgs.append(img_tag(png, f"{ds.name}: {title} box plots"))
        elif err:
            errs.append(_nodata(f"{title}: {err}"))
    if not imgs and not errs:
        return None, "no per-case Dice, HD95, TRE or EPE values"
    note = ('<p class="note">Boxes: quartiles, whiskers at 1.5 IQR; dots: every case (seeds pooled). '
            "↑ higher is better, ↓ lower is better.</p>")
    return '<div class="figrow">' + "".join(imgs) + "</div>" + "".join(errs) + note, None


def _qualitative(ds: DatasetReport, view: int) -> Block:
    panels = plots.method_panels(ds)
    missing = [ms.method for ms in ds.methods if ms.method not in panels]
    note = f'<p class="note">No panel.npz for: {_html.escape(", ".join(missing))}.</p>' if missing and panels else ""
    if not panels:
        return None, "no qualitative panel saved (panel.npz)"
    if ds.kind == "pose":
        png, err = _safe(plots.pose_panel, panels)
        return (img_tag(png, f"{ds.name}: X-ray and DRRs") if png else _nodata(err or "Panels lack the X-ray / DRR arrays.")) + note, None
    png, err = _safe(plots.deformable_panel, panels, view=view)
    return (img_tag(png, f"{ds.name}: qualitative panel") if png else _nodata(err or "Panels lack the slice arrays.")) + note, None


def _mtre(ds: DatasetReport) -> Block:
    if ds.kind != "pose":
        return None, "not a 2D/3D dataset"
    rows = []
    for ms in ds.methods:
        st = ms.stats.get("mtre_mm")
        if st:
            rows.append([ms.method] + [fmt(st[q], 2) for q in ("p50", "p75", "p95", "mean")]
                        + [fmt(ms.stats.get(k, {}).get("mean"), 3) for k in ("success_10mm", "success_2mm")])
    table = _table(["method", "mTRE p50 mm", "p75", "p95", "mean", "success <10 mm", "success <2 mm"], _esc_rows(rows)) if rows else ""
    note = ('<p class="note">Share of cases with mTRE at most x (log scale); dots: the 50th, 75th and 95th '
            "percentiles; dashed lines: the 2 mm and 10 mm success thresholds.</p>")
    fig, why = _figure(plots.mtre_curves, ds, f"{ds.name}: mTRE", "no finite mTRE values")
    if not table and fig is None:
        return None, why
    return table + (fig or "") + note, None


def _read_run(exp_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(exp_dir) / "run.json").read_text())
    except (OSError, ValueError):
        return None


def _budget_text(run: dict[str, Any]) -> str:
    """The training budget an experiment ran under: the runner's budget block when there is
    one, else the trainer's step / epoch / time limits; ``—`` for methods that do not learn."""
    fit = run.get("fit") or {}
    b = fit.get("budget") or (run.get("config") or {}).get("budget")
    parts = []
    if isinstance(b, dict):
        if b.get("max_steps") is not None:
            parts.append(f"{b['max_steps']} steps")
        if b.get("max_time_s") is not None:
            parts.append(f"{b['max_time_s']} s")
        if b.get("source"):
            parts.append(f"({b['source']})")
    if not parts:
        tr = (run.get("config") or {}).get("trainer") or {}
        for k, unit in (("max_steps", "steps"), ("max_epochs", "epochs"), ("max_time", "")):
            if tr.get(k) not in (None, -1) and (k != "max_epochs" or "max_steps" not in tr):
                parts.append(f"{tr[k]} {unit}".strip())
    if not fit:
        return "—" if not parts else " ".join(parts) + " (not trained)"
    done = f"; ran {fit.get('steps')} steps in {fmt(fit.get('seconds'), 0)} s" if fit.get("steps") is not None else ""
    return (" ".join(parts) or "trainer defaults") + done


def _provenance(ds: DatasetReport) -> Block:
    """Each experiment's run.json: revision, package versions, device, threads, seed,
    budget, config hash; versions common to all experiments are said once."""
    runs = []
    for ms in ds.methods:
        for d in ms.exp_dirs:
            run = _read_run(d)
            if run is not None:
                runs.append((ms.method, run))
    if not runs:
        return None, "no run.json"
    pkgs = [run.get("packages") or {} for _, run in runs]
    common = {k: v for k, v in pkgs[0].items() if all(p.get(k) == v for p in pkgs)}
    rows = []
    for m, run in runs:
        own = {k: v for k, v in (run.get("packages") or {}).items() if k not in common}
        dev = str(run.get("device") or "?") + (f" ({run['device_name']})" if run.get("device_name") else "")
        if (run.get("world_size") or 1) > 1:
            dev += f" × {run['world_size']} processes"
        thr = run.get("torch_threads")
        threads = f"{thr}" + (f" of {run['cpu_count']} cores" if run.get("cpu_count") else "") if thr is not None else "?"
        rev = str(run.get("git_revision") or "unknown")
        cells = [m, str(run.get("seed", "?")), f"<code>{_html.escape(str(run.get('config_hash') or '?'))}</code>",
                 f"<code>{_html.escape(rev[:10] + ('+dirty' if rev.endswith('+dirty') else ''))}</code>",
                 _html.escape(dev), _html.escape(threads), _html.escape(_budget_text(run)),
                 _html.escape(", ".join(f"{k} {v}" for k, v in own.items()) or "as below"),
                 _html.escape(str(run.get("ended") or run.get("started") or "?"))]
        rows.append(cells)
    head = ["method", "seed", "config hash", "git revision", "device", "torch threads", "training budget",
            "other versions", "finished (UTC)"]
    common_txt = ", ".join(f"{k} {v}" for k, v in common.items())
    return ('<div class="provenance">'
            + _table(head, rows, cls="prov")
            + f'<p class="note">Package versions of every experiment: {_html.escape(common_txt or "not recorded")}. '
            "From each experiment's run.json (the config hash identifies the resolved config).</p></div>"), None


def _block(sid: str, ds: DatasetReport, view: int) -> Block:
    if sid == "tables":
        notes = ([POSE_FOOTNOTE] if ds.kind == "pose" else []) + [FOOTNOTE]
        return _tables(ds) + "".join(
            f'<p class="note">{_html.escape(n.replace("`", "")).replace("**Bold**", "<b>Bold</b>")}</p>' for n in notes), None
    if sid == "distributions":
        return _distributions(ds)
    if sid == "dice-vs-fold":
        return _figure(plots.dice_vs_fold, ds, f"{ds.name}: Dice vs fold %", "no cases with both Dice and fold %")
    if sid == "runtime":
        return _figure(plots.runtime_plot, ds, f"{ds.name}: runtime", "no runtime values (initial is not timed)")
    if sid == "per-label-dice":
        return _figure(plots.label_heatmap, ds, f"{ds.name}: Dice per label", "no per-label Dice (dice_per_label)")
    if sid == "qualitative":
        return _qualitative(ds, view)
    if sid == "mtre-percentiles":
        return _mtre(ds)
    if sid == "provenance":
        return _provenance(ds)
    raise KeyError(sid)


def html_page(report: Report, view: int = 2) -> str:
    """The report page (see the module docstring); ``view``: array axis the panels' slices are orthogonal to."""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections: list[tuple[str, str, str]] = []  # (id, title, body)
    for sid, title in SECTIONS:
        if sid == "left-out":
            if report.skipped:
                sections.append((sid, title, "<ul>" + "".join(
                    f"<li>{_html.escape(s['experiment'])}: {_html.escape(str(s['status']))}</li>" for s in report.skipped) + "</ul>"))
            continue
        if not report.datasets:
            if sid == "tables":
                sections.append((sid, title, _nodata("No complete experiment in this results folder.")))
            continue
        parts, absent = [], []
        for ds in report.datasets:
            body, why = _block(sid, ds, view)
            if body is None:
                absent.append(f"{ds.name} ({why})")
                continue
            kind = "2D/3D" if ds.kind == "pose" else "deformable"
            parts.append(f'<div class="dataset" data-dataset="{_html.escape(ds.name)}"><h3>{_html.escape(ds.name)} ({kind})</h3>'
                         + body + "</div>")
        if parts:
            if absent:
                parts.append(f'<p class="note">Not shown for: {_html.escape("; ".join(absent))}.</p>')
            sections.append((sid, title, "\n".join(parts)))
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>regbench leaderboard: {_html.escape(report.root.name)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>regbench leaderboard — {_html.escape(report.root.name)}</h1>",
        f'<p class="note">Results folder {_html.escape(str(report.root))}; generated {now}; '
        f"datasets: {_html.escape(', '.join(d.name for d in report.datasets) or 'none')}.</p>",
        "<nav>" + "".join(f'<a href="#{sid}">{_html.escape(t)}</a>' for sid, t, _ in sections) + "</nav>",
    ]
    for sid, title, body in sections:
        out.append(f'<section id="{sid}"><h2>{_html.escape(title)}</h2>\n{body}\n</section>')

    out.append(ablation_sections(report))  # ablation tables and ARC curves (when present)
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _html_table(head: list[str], body: list[list[str]]) -> str:
    out = ['<div class="scroll"><table>', "<tr>" + "".join(f"<th>{_html.escape(h)}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in body]
    return "\n".join(out + ["</table></div>"])


def ablation_sections(report: Report) -> str:
    """HTML for the report page: an "Ablations" section and an "Accuracy–regularity curves"
    section (each only when the folder has ablation variants / an ``arc.csv``)."""
    out: list[str] = []
    tables = ablation.ablation_tables(report)
    if tables:
        out.append('<section id="ablations"><h2>Ablations</h2>')
        for t in tables:
            head, body = ablation.ablation_cells(t, "\x00")  # a marker that survives escaping
            body = [[_html.escape(c).replace("\x00", "<sup>*</sup>") for c in r] for r in body]
            out += [f'<div class="ablation" data-dataset="{_html.escape(t.dataset)}" data-method="{_html.escape(t.method)}">',
                    f"<h3>{_html.escape(t.dataset)}: {_html.escape(t.method)}</h3>", _html_table(head, body),
                    f'<p class="note">{_html.escape(t.method)}: {_html.escape(ablation.verdict(t))}.</p></div>']
        out += [f'<p class="note">{_html.escape(ablation.ABLATION_NOTE)}</p>', "</section>"]
    arc = ablation.read_arc(report.root)
    if arc:
        out.append('<section id="arc"><h2>Accuracy–regularity curves</h2>')
        head, body = ablation.arc_cells(ablation.arc_summary(arc))
        out.append(_html_table(head, [[_html.escape(c) for c in r] for r in body]))
        for ds in sorted({r["dataset"] for r in arc}):
            try:
                png = ablation.arc_figure(arc, ds)
            except Exception as exc:  # noqa: BLE001 - a figure that fails is a note, never a failed report
                png, err = None, f"This figure could not be drawn ({type(exc).__name__}: {exc})."
            else:
                err = "No complete ARC point with Dice or EPE."
            out.append(f'<div class="arc" data-dataset="{_html.escape(ds)}"><h3>{_html.escape(ds)}</h3>')
            out.append(img_tag(png, f"{ds}: accuracy-regularity curves") if png else f'<p class="nodata">{_html.escape(err)}</p>')
            out.append("</div>")
        head, body = ablation.arc_point_cells(arc)
        out.append(_html_table(head, [[_html.escape(c) for c in r] for r in body]))
        out += [f'<p class="note">{_html.escape(ablation.ARC_NOTE)}</p>', "</section>"]
    return "\n".join(out)
