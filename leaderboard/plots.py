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

from leaderboard.table import DatasetReport, _num

__all__ = [
    "png_bytes",
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


def _figure(w: float, h: float):
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
        v = np.asarray([_num(r.get(key)) for r in ds.rows if r["method"] == ms.method], dtype=np.float64)
        out[ms.method] = v[np.isfinite(v)]
    return out


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def dice_boxplot(ds: DatasetReport) -> bytes | None:
    """Per-case Dice of every method (seeds pooled) as box plots with the cases as dots."""
    vals = _method_values(ds, "dice")
    names = [m for m, v in vals.items() if v.size]
    if not names:
        return None
    fig = _figure(max(4.0, 1.1 * len(names) + 1.5), 3.4)
    ax = fig.add_subplot(1, 1, 1)
    ax.boxplot([vals[m] for m in names], tick_labels=names, showfliers=False)
    rng = np.random.default_rng(0)
    for i, m in enumerate(names, start=1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, vals[m].size), vals[m], s=10, alpha=0.6, color="tab:blue", zorder=3)
    ax.set_ylabel("Dice per case")
    ax.set_title(f"{ds.name}: Dice")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return png_bytes(fig)


def dice_vs_fold(ds: DatasetReport) -> bytes | None:
    """Per-case Dice against fold % (share of voxels with det J <= 0), one colour per method."""
    pts = {}
    for ms in ds.methods:
        rs = [r for r in ds.rows if r["method"] == ms.method]
        d = np.asarray([_num(r.get("dice")) for r in rs])
        f = np.asarray([_num(r.get("fold_pct")) for r in rs])
        ok = np.isfinite(d) & np.isfinite(f)
        if ok.any():
            pts[ms.method] = (f[ok], d[ok])
    if not pts:
        return None
    fig = _figure(5.6, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for (m, (f, d)), c in zip(pts.items(), _colors(len(pts))):
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
    """Registration time per case (log scale), one box per method."""
    vals = {m: v[v > 0] for m, v in _method_values(ds, "runtime_s").items()}
    names = [m for m, v in vals.items() if v.size]
    if not names:
        return None
    fig = _figure(max(4.0, 1.1 * len(names) + 1.5), 3.4)
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


def label_heatmap(ds: DatasetReport) -> bytes | None:
    """Mean Dice per label (columns) and method (rows)."""
    methods = [ms.method for ms in ds.methods if ds.per_label.get(ms.method)]
    labels = sorted({lab for m in methods for lab in ds.per_label[m]}, key=_label_sort_key)
    if not methods or not labels:
        return None
    mat = np.asarray([[ds.per_label[m].get(lab, math.nan) for lab in labels] for m in methods], dtype=np.float64)
    w = min(16.0, max(5.0, 0.22 * len(labels) + 2.5))
    fig = _figure(w, max(2.2, 0.45 * len(methods) + 1.4))
    ax = fig.add_subplot(1, 1, 1)
    from matplotlib import colormaps

    cmap = colormaps["viridis"].with_extremes(bad="lightgrey")
    im = ax.imshow(np.ma.masked_invalid(mat), aspect="auto", cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_yticks(range(len(methods)), methods)
    step = max(1, len(labels) // 40)
    ax.set_xticks(range(0, len(labels), step), labels[::step], rotation=90, fontsize=7)
    ax.set_xlabel("label")
    ax.set_title(f"{ds.name}: Dice per label (mean over cases)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    return png_bytes(fig)


def mtre_curves(ds: DatasetReport) -> bytes | None:
    """2D/3D: share of cases with mTRE below a threshold (log x), percentiles 50/75/95 marked."""
    vals = {m: v for m, v in _method_values(ds, "mtre_mm").items() if v.size}
    if not vals:
        return None
    fig = _figure(5.8, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for (m, v), c in zip(vals.items(), _colors(len(vals))):
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


def deformable_panel(panels: Mapping[str, Mapping[str, Any]], view: int = 2, grid_step: int | None = None) -> bytes | None:
    """One row per method: fixed, warped moving, difference, deformed grid, Jacobian determinant.

    ``panels``: method → arrays of ``panel.npz`` (keys ``fixed_ax{a}``, ``warped_ax{a}``,
    ``disp_ax{a}`` (2, H, W) in voxels along the two in-plane array axes, ``jacdet_ax{a}``).
    The slice shown is the mid-slice orthogonal to array axis ``view`` (another when absent).
    The grid is the image of a regular grid under ``x -> x + u(x)`` (the pull map).
    """
    rows = [(m, p, _view(p, view)) for m, p in panels.items()]
    rows = [(m, p, a) for m, p, a in rows if a is not None]
    if not rows:
        return None
    from matplotlib import colormaps
    from matplotlib.colors import TwoSlopeNorm

    fig = _figure(12.0, 2.5 * len(rows) + 0.3)
    for r, (m, p, a) in enumerate(rows):
        fixed, warped = p[f"fixed_ax{a}"], p[f"warped_ax{a}"]
        disp, jac = p[f"disp_ax{a}"], p[f"jacdet_ax{a}"]
        vmin, vmax = _finite_range(fixed)
        axs = [fig.add_subplot(len(rows), 5, 5 * r + c + 1) for c in range(5)]
        _show(axs[0], fixed, f"{m}: fixed", cmap="gray", vmin=vmin, vmax=vmax)
        _show(axs[1], warped, "warped moving", cmap="gray", vmin=vmin, vmax=vmax)
        diff = fixed - warped
        lim = max(np.abs(_finite_range(diff))) or 1.0
        _show(axs[2], diff, "fixed − warped", cmap="RdBu_r", vmin=-lim, vmax=lim)
        H, W = fixed.shape
        step = grid_step or max(2, min(H, W) // 16)
        ii, jj = np.meshgrid(np.arange(H, dtype=np.float32), np.arange(W, dtype=np.float32), indexing="ij")
        x, y = ii + disp[0], jj + disp[1]
        ax = axs[3]
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
        jmax = max(2.0, _finite_range(jac)[1])
        cmap = colormaps["RdBu_r"].with_extremes(under="black")
        im = _show(axs[4], jac, f"det J (folds black: {float(np.mean(jac <= 0)) * 100:.2f} %)", cmap=cmap,
                   norm=TwoSlopeNorm(vmin=1e-6, vcenter=1.0, vmax=jmax))
        fig.colorbar(im, ax=axs[4], fraction=0.046)
    case = next((str(p.get("case_id")) for _, p, _ in rows if p.get("case_id") is not None), "")
    fig.suptitle(f"case {case}, mid-slice orthogonal to array axis {rows[0][2]}", fontsize=10)
    fig.tight_layout()
    return png_bytes(fig)


def pose_panel(panels: Mapping[str, Mapping[str, Any]]) -> bytes | None:
    """One row per method: the X-ray, the DRR at the initial pose and at the final pose."""
    rows = [(m, p) for m, p in panels.items() if all(k in p for k in ("xray", "drr_initial", "drr_final"))]
    if not rows:
        return None
    fig = _figure(8.4, 2.8 * len(rows) + 0.3)
    for r, (m, p) in enumerate(rows):
        mi, mf = _num(p.get("mtre_initial_mm")), _num(p.get("mtre_final_mm"))
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

