"""Figures of the HTML report, drawn with matplotlib's Agg canvas (no display, no pyplot state).

Each function takes a :class:`leaderboard.table.DatasetReport` (or panel arrays) and returns
PNG bytes, or None when there is nothing to draw (the report then says so).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from leaderboard.table import DatasetReport, num

__all__ = [
    "png_bytes",
    "BOX_METRICS",
    "metric_boxplot",
    "dice_boxplot",
    "dice_vs_fold",
    "runtime_plot",
    "label_heatmap",
    "mtre_curves",
    "load_panel",
    "deformable_panel",
    "pose_panel",
    "method_panels",
]

DPI = 90


def new_figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig) -> bytes:
    """Render a Figure to PNG bytes at the module's DPI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _method_values(ds: DatasetReport, key: str) -> dict[str, np.ndarray]:
    out = {}
    for ms in ds.methods:
        v = np.asarray([num(r.get(key)) for r in ds.rows if r["method"] == ms.method], dtype=np.float64)
        out[ms.method] = v[np.isfinite(v)]
    return out


def method_colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


#: Per-case metrics drawn as box + strip plots when a dataset has finite values:
#: (column of cases.csv, axis label, title).
BOX_METRICS: list[tuple[str, str, str]] = [
    ("dice", "Dice per case (↑)", "Dice"),
    ("hd95", "HD95 per case, mm (↓)", "HD95"),
    ("tre", "TRE per case, mm (↓)", "TRE"),
    ("epe_mm", "EPE per case, mm (↓)", "EPE"),
]


def metric_boxplot(ds: DatasetReport, key: str, ylabel: str | None = None, title: str | None = None) -> bytes | None:
    """Per-case values of ``key`` for every method (seeds pooled): a box (quartiles,
    whiskers at 1.5 IQR) with every case as a dot over it. None when no method has a
    finite value."""
    vals = _method_values(ds, key)
    names = [m for m, v in vals.items() if v.size]
    if not names:
        return None
    fig = new_figure(max(3.6, 0.75 * len(names) + 1.4), 3.2)
    ax = fig.add_subplot(1, 1, 1)
    ax.boxplot([vals[m] for m in names], tick_labels=names, showfliers=False, widths=0.6)
    rng = np.random.default_rng(0)
    for i, (m, c) in enumerate(zip(names, method_colors(len(names))), start=1):
        ax.scatter(i + rng.uniform(-0.15, 0.15, vals[m].size), vals[m], s=10, alpha=0.7, color=c, zorder=3)
    ax.set_ylabel(ylabel or key, fontsize=9)
    ax.set_title(f"{ds.name}: {title or key}", fontsize=10)
    ax.tick_params(axis="x", labelrotation=30 if len(names) > 4 else 0, labelsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return png_bytes(fig)


def dice_boxplot(ds: DatasetReport) -> bytes | None:
    """Per-case Dice of every method (seeds pooled) as box plots with the cases as dots."""
    return metric_boxplot(ds, "dice", BOX_METRICS[0][1], "Dice")


def dice_vs_fold(ds: DatasetReport) -> bytes | None:
    """Per-case Dice against fold % (share of voxels with det J <= 0), one colour per method."""
    pts = {}
    for ms in ds.methods:
        rs = [r for r in ds.rows if r["method"] == ms.method]
        d = np.asarray([num(r.get("dice")) for r in rs])
        f = np.asarray([num(r.get("fold_pct")) for r in rs])
        ok = np.isfinite(d) & np.isfinite(f)
        if ok.any():
            pts[ms.method] = (f[ok], d[ok])
    if not pts:
        return None
    fig = new_figure(5.6, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for (m, (f, d)), c in zip(pts.items(), method_colors(len(pts))):
        ax.scatter(f, d, s=18, color=c, label=m, alpha=0.8)
    allf = np.concatenate([f for f, _ in pts.values()])
    pos = allf[allf > 0]
    if pos.size:
        ax.set_xscale("symlog", linthresh=float(pos.min()))
        ax.set_xlabel("fold % (det J ≤ 0), symlog")
    else:
        ax.set_xlim(-0.05, 1.0)
        ax.set_xlabel("fold % (det J ≤ 0): no folding in any case")
    ax.set_ylabel("Dice")
    ax.set_title(f"{ds.name}: Dice vs folding")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return png_bytes(fig)


def runtime_plot(ds: DatasetReport) -> bytes | None:
    """Registration time per case (log scale), one box per method; ``initial`` (no
    registration, nothing timed) is left out."""
    vals = {m: v[v > 0] for m, v in _method_values(ds, "runtime_s").items() if m != "initial"}
    names = [m for m, v in vals.items() if v.size]
    if not names:
        return None
    fig = new_figure(max(4.0, 1.1 * len(names) + 1.5), 3.4)
    ax = fig.add_subplot(1, 1, 1)
    ax.boxplot([vals[m] for m in names], tick_labels=names, showfliers=True)
    ax.set_yscale("log")
    ax.set_ylabel("runtime per case, s (log)")
    ax.set_title(f"{ds.name}: runtime")
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    return png_bytes(fig)


def _label_sort_key(lab: str) -> tuple:
    try:
        return (0, float(lab))
    except ValueError:
        return (1, lab)


#: Cell values are written in the heat map up to this many cells (beyond, the colour bar alone).
HEATMAP_MAX_ANNOTATED = 600


def label_heatmap(ds: DatasetReport) -> bytes | None:
    """Mean Dice per label (columns) and method (rows), with the values in the cells.

    The colour scale runs from the lowest to the highest mean Dice present (data-driven,
    not a fixed 0–1, so differences between methods are visible); the colour bar states it.
    Labels absent for a method are grey. Values are written in the cells when there are
    at most :data:`HEATMAP_MAX_ANNOTATED` of them.
    """
    methods = [ms.method for ms in ds.methods if ds.per_label.get(ms.method)]
    labels = sorted({lab for m in methods for lab in ds.per_label[m]}, key=_label_sort_key)
    if not methods or not labels:
        return None
    mat = np.asarray([[ds.per_label[m].get(lab, math.nan) for lab in labels] for m in methods], dtype=np.float64)
    lo, hi = _finite_range(mat)
    if hi - lo < 1e-6:
        lo, hi = lo - 0.005, hi + 0.005
    annotate = mat.size <= HEATMAP_MAX_ANNOTATED
    cell_w = 0.42 if annotate else 0.22
    w = min(16.0, max(5.0, cell_w * len(labels) + 2.8))
    fig = new_figure(w, max(2.2, 0.42 * len(methods) + 1.5))
    ax = fig.add_subplot(1, 1, 1)
    from matplotlib import colormaps

    cmap = colormaps["viridis"].with_extremes(bad="lightgrey")
    im = ax.imshow(np.ma.masked_invalid(mat), aspect="auto", cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
    ax.set_yticks(range(len(methods)), methods, fontsize=8)
    step = 1 if annotate else max(1, len(labels) // 40)
    ax.set_xticks(range(0, len(labels), step), labels[::step], rotation=90, fontsize=7)
    if annotate:
        fs = 7 if len(labels) <= 20 else 5
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                v = mat[i, j]
                if np.isfinite(v):
                    r, g, b, _ = cmap((v - lo) / (hi - lo))
                    dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                    text = f"{v:.2f}"  # 0.997 rounds to "1.00": drop a leading zero only where there is one
                    ax.text(j, i, text[1:] if text.startswith("0.") else text, ha="center", va="center",
                            fontsize=fs, color="white" if dark else "black")
    ax.set_xlabel("label")
    ax.set_title(f"{ds.name}: Dice per label (mean over cases; scale {lo:.2f}–{hi:.2f})", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    return png_bytes(fig)


def mtre_curves(ds: DatasetReport) -> bytes | None:
    """2D/3D: share of cases with mTRE below a threshold (log x), percentiles 50/75/95 marked."""
    vals = {m: v for m, v in _method_values(ds, "mtre_mm").items() if v.size}
    if not vals:
        return None
    fig = new_figure(5.8, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for (m, v), c in zip(vals.items(), method_colors(len(vals))):
        s = np.sort(np.maximum(v, 1e-3))
        ax.step(s, np.arange(1, s.size + 1) / s.size, where="post", color=c, label=m)
        for q in (50, 75, 95):
            ax.plot([np.percentile(s, q)], [q / 100], marker="o", color=c, ms=4)
    for t in (2.0, 10.0):
        ax.axvline(t, color="grey", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("mTRE mm (log)")
    ax.set_ylabel("share of cases ≤ mTRE")
    ax.set_title(f"{ds.name}: cumulative mTRE")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return png_bytes(fig)


# ----------------------------------------------------------------------------- panels
def load_panel(exp_dir: str | Path) -> dict[str, Any] | None:
    """``<exp_dir>/panel.npz`` as a dict of arrays (``kind`` as str), or None when absent/unreadable."""
    p = Path(exp_dir) / "panel.npz"
    if not p.exists():
        return None
    try:
        with np.load(p, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except (OSError, ValueError):
        return None
    for k in ("kind", "case_id"):
        if k in out:
            out[k] = str(out[k])
    return out


def _show(ax, img: np.ndarray, title: str, **kw) -> Any:
    """Image with array axis 0 horizontal and axis 1 vertical (origin lower left)."""
    im = ax.imshow(np.asarray(img, dtype=np.float32).T, origin="lower", interpolation="nearest", **kw)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def _finite_range(a: np.ndarray) -> tuple[float, float]:
    """(min, max) of the finite values; (0, 1) when there is none."""
    v = np.asarray(a, dtype=np.float64)
    v = v[np.isfinite(v)]
    return (float(v.min()), float(v.max())) if v.size else (0.0, 1.0)


def _view(panel: Mapping[str, Any], view: int) -> int | None:
    views = [a for a in (view, 2, 0, 1) if f"fixed_ax{a}" in panel]
    return views[0] if views else None


def _label_contours(ax, seg: np.ndarray | None) -> None:
    """Outline every label of a (H, W) label slice (colour by label id, tab20), drawn in the
    same orientation as :func:`_show`."""
    if seg is None:
        return
    from matplotlib import colormaps

    seg = np.asarray(seg)
    cmap = colormaps["tab20"]
    for lab in np.unique(seg):
        if lab == 0:
            continue
        mask = (seg == lab).astype(np.float32).T
        if mask.sum() < 2:
            continue
        ax.contour(mask, levels=[0.5], colors=[cmap(int(lab) % 20)], linewidths=0.7, origin="lower")


def _robust_abs_max(arrays: list[np.ndarray], q: float = 99.5) -> float:
    v = np.concatenate([np.abs(np.asarray(a, dtype=np.float64)).ravel() for a in arrays])
    v = v[np.isfinite(v)]
    return float(np.percentile(v, q)) if v.size else 1.0


def panel_scales(rows: list[tuple[str, Mapping[str, Any], int]]) -> dict[str, Any]:
    """The colour scales :func:`deformable_panel` shares down each column, from all rows
    ``(method, panel, view)``: ``intensity`` (min, max) of the fixed slices; ``diff`` the
    99.5th percentile of |fixed − warped| (scale ±diff); ``jacdet_max`` max(2, the 99.5th
    percentile of det J) (diverging scale 0 – 1 – jacdet_max)."""
    vmin, vmax = _finite_range(np.concatenate([np.asarray(p[f"fixed_ax{a}"], np.float32).ravel() for _, p, a in rows]))
    diffs = [np.asarray(p[f"fixed_ax{a}"], np.float32) - np.asarray(p[f"warped_ax{a}"], np.float32) for _, p, a in rows]
    jacs = np.concatenate([np.asarray(p[f"jacdet_ax{a}"], np.float32).ravel() for _, p, a in rows])
    jacs = jacs[np.isfinite(jacs)]
    return {"intensity": (vmin, vmax), "diff": _robust_abs_max(diffs) or 1.0,
            "jacdet_max": max(2.0, float(np.percentile(jacs, 99.5)) if jacs.size else 2.0)}


def deformable_panel(panels: Mapping[str, Mapping[str, Any]], view: int = 2, grid_step: int | None = None) -> bytes | None:
    """One row per method: fixed, warped moving, difference, deformed grid, Jacobian determinant.

    ``panels``: method → arrays of ``panel.npz`` (keys ``fixed_ax{a}``, ``warped_ax{a}``,
    ``disp_ax{a}`` (2, H, W) in voxels along the two in-plane array axes, ``jacdet_ax{a}``,
    and when the data has labels ``fixed_seg_ax{a}`` / ``warped_seg_ax{a}``, outlined on the
    fixed and warped images). The slice shown is the mid-slice orthogonal to array axis
    ``view`` (another when absent). The grid is the image of a regular grid under
    ``x -> x + u(x)`` (the pull map).

    Every column has one colour scale shared by all rows, stated by a colour bar under it:
    intensities (fixed and warped) from the fixed slice's range; fixed − warped symmetric
    about 0 up to the 99.5th percentile of |difference| over all rows; det J diverging
    about 1 up to max(2, the 99.5th percentile over all rows), folds (det J ≤ 0) black.
    """
    rows = [(m, p, _view(p, view)) for m, p in panels.items()]
    rows = [(m, p, a) for m, p, a in rows if a is not None]
    if not rows:
        return None
    from matplotlib.colors import Normalize, TwoSlopeNorm

    fixed0 = np.asarray(rows[0][1][f"fixed_ax{rows[0][2]}"], dtype=np.float32)
    sc = panel_scales(rows)
    vmin, vmax, lim, jmax = sc["intensity"][0], sc["intensity"][1], sc["diff"], sc["jacdet_max"]
    diffs = [np.asarray(p[f"fixed_ax{a}"], np.float32) - np.asarray(p[f"warped_ax{a}"], np.float32) for _, p, a in rows]
    jacs = [np.asarray(p[f"jacdet_ax{a}"], np.float32) for _, p, a in rows]
    gray = Normalize(vmin=vmin, vmax=vmax)
    dnorm = Normalize(vmin=-lim, vmax=lim)
    jnorm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=jmax)
    from matplotlib.colors import ListedColormap

    black = ListedColormap(["black"])

    H0, W0 = fixed0.shape
    cell = 2.3
    fig = new_figure(5 * cell * max(0.6, min(1.6, H0 / max(W0, 1))) + 0.6, cell * len(rows) + 1.4)
    fig.set_layout_engine("constrained")
    axs = fig.subplots(len(rows), 5, squeeze=False)
    ims: dict[int, Any] = {}
    for r, (m, p, a) in enumerate(rows):
        fixed, warped = np.asarray(p[f"fixed_ax{a}"]), np.asarray(p[f"warped_ax{a}"])
        disp, jac = np.asarray(p[f"disp_ax{a}"]), jacs[r]
        fseg, wseg = p.get(f"fixed_seg_ax{a}"), p.get(f"warped_seg_ax{a}")
        ims[0] = _show(axs[r, 0], fixed, f"{m}: fixed" + (" + labels" if fseg is not None else ""), cmap="gray", norm=gray)
        _label_contours(axs[r, 0], fseg)
        _show(axs[r, 1], warped, "warped moving" + (" + labels" if wseg is not None else ""), cmap="gray", norm=gray)
        _label_contours(axs[r, 1], wseg)
        ims[2] = _show(axs[r, 2], diffs[r], "fixed − warped", cmap="RdBu_r", norm=dnorm)
        H, W = fixed.shape
        step = grid_step or max(2, min(H, W) // 16)
        ii, jj = np.meshgrid(np.arange(H, dtype=np.float32), np.arange(W, dtype=np.float32), indexing="ij")
        x, y = ii + disp[0], jj + disp[1]
        ax = axs[r, 3]
        for i in range(0, H, step):
            ax.plot(x[i, :], y[i, :], color="k", lw=0.6)
        for j in range(0, W, step):
            ax.plot(x[:, j], y[:, j], color="k", lw=0.6)
        ax.set_xlim(-0.5, H - 0.5)
        ax.set_ylim(-0.5, W - 0.5)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title("deformed grid", fontsize=9)
        ims[4] = _show(axs[r, 4], jac, f"det J (folds black: {float(np.mean(jac <= 0)) * 100:.2f} %)", cmap="RdBu_r", norm=jnorm)
        if (jac <= 0).any():  # folds drawn black over the scale
            axs[r, 4].imshow(np.ma.masked_where(~(jac <= 0), np.ones_like(jac)).T, origin="lower", cmap=black,
                             interpolation="nearest", vmin=0, vmax=1)
    kw = {"location": "bottom", "shrink": 0.85, "aspect": 25, "pad": 0.02}
    fig.colorbar(ims[0], ax=list(axs[:, 0]) + list(axs[:, 1]), label="intensity (fixed and warped)", **kw)
    fig.colorbar(ims[2], ax=list(axs[:, 2]), label="fixed − warped", **kw)
    axs[-1, 3].set_xlabel("(no colour scale)", fontsize=8, color="#666")
    cb = fig.colorbar(ims[4], ax=list(axs[:, 4]), label="det J (black ≤ 0)", **kw)
    cb.set_ticks([0.0, 1.0, jmax], labels=["0", "1", f"{jmax:.1f}"])
    case = next((str(p.get("case_id")) for _, p, _ in rows if p.get("case_id") is not None), "")
    fig.suptitle(f"case {case}, mid-slice orthogonal to array axis {rows[0][2]}; one colour scale per column", fontsize=10)
    return png_bytes(fig)


def pose_panel(panels: Mapping[str, Mapping[str, Any]]) -> bytes | None:
    """One row per method: the X-ray, the DRR at the initial pose and at the final pose."""
    rows = [(m, p) for m, p in panels.items() if all(k in p for k in ("xray", "drr_initial", "drr_final"))]
    if not rows:
        return None
    fig = new_figure(8.4, 2.8 * len(rows) + 0.3)
    for r, (m, p) in enumerate(rows):
        mi, mf = num(p.get("mtre_initial_mm")), num(p.get("mtre_final_mm"))
        for c, (key, title) in enumerate([("xray", f"{m}: X-ray"), ("drr_initial", f"DRR initial (mTRE {mi:.1f} mm)"),
                                          ("drr_final", f"DRR final (mTRE {mf:.1f} mm)")]):
            ax = fig.add_subplot(len(rows), 3, 3 * r + c + 1)
            ax.imshow(np.asarray(p[key], dtype=np.float32), cmap="gray", interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return png_bytes(fig)


def method_panels(ds: DatasetReport) -> dict[str, dict[str, Any]]:
    """method → the panel arrays of its first seed that has a ``panel.npz``."""
    out = {}
    for ms in ds.methods:
        for d in ms.exp_dirs:
            p = load_panel(d)
            if p is not None:
                out[ms.method] = p
                break
    return out

