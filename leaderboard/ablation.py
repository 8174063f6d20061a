"""Ablation tables and accuracy–regularity curves (ARC) of a results folder.

**Ablation tables.** A grid config's method may list ``variants``
(:mod:`benchmark.variants`); each variant is an experiment of its own whose ``run.json``
records ``config.method.variant_of`` (the full method) and ``config.method.variant``. Per
dataset and full method, the table compares every variant with the full method on the cases
both have (a case's value is its mean over the seeds both ran to the end without diverging,
:func:`leaderboard.table.diverged_runs`; the same seeds on both sides):

* effect size: mean paired difference ``variant − full`` over the cases, with a percentile
  bootstrap 95 % CI (cases resampled with replacement, ``n_boot`` resamples, seeded: the same
  folder gives the same CI);
* paired two-sided Wilcoxon signed-rank test (:func:`leaderboard.stats.paired_wilcoxon`),
  Holm-corrected across the variants of that method (:func:`leaderboard.stats.holm`),
  separately per metric; ``*`` marks adjusted p < 0.05 with the CI excluding 0.

Metrics: Dice (higher is better) and ``epe_mm`` (end-point error against the known true
displacement, lower is better) when the cases carry them.

**ARC.** ``regbench arc`` (:mod:`benchmark.arc`) writes ``<root>/arc.csv``: one row per
(dataset, method, regularisation value) with the means of Dice, EPE, SDlogJ, NDV % and
fold %. The report draws Dice and EPE against SDlogJ and against NDV %, one curve per method
(points in the order of the weight, the config's default setting ringed) and a summary per
method: the best mean Dice among the points whose mean SDlogJ is at most the stated bound
(``sdlogj_bound`` column of ``arc.csv``), and the weight that gives it.

Never imports ``systems``; works on the files alone.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmark.core import registry
from leaderboard import stats
from leaderboard.table import case_means, num

__all__ = [
    "ABLATION_METRICS",
    "AblationRow",
    "AblationTable",
    "variant_origins",
    "paired_effect",
    "bootstrap_mean_ci",
    "ablation_tables",
    "ablation_cells",
    "verdict",
    "ABLATION_NOTE",
    "ARC_FILE",
    "ARC_COLUMNS",
    "read_arc",
    "arc_summary",
    "arc_figure",
    "arc_cells",
    "arc_point_cells",
    "ARC_NOTE",
]

#: metric -> (title, higher is better)
ABLATION_METRICS: dict[str, tuple[str, bool]] = {
    k: (registry.metric(k).title, registry.metric(k).higher_is_better) for k in ("dice", "epe_mm")}
ALPHA = 0.05
N_BOOT = 2000
BOOT_SEED = 0


@dataclasses.dataclass
class AblationRow:
    """One variant against the full method on one metric.

    ``diff`` = mean over paired cases of ``variant − full`` (metric units); ``ci`` its
    bootstrap 95 % interval; ``p_raw`` the Wilcoxon p-value, ``p_holm`` Holm-adjusted across
    the variants of the method (NaN when not testable).
    """

    variant: str  # expanded method name, e.g. msff-no_aux
    label: str  # variant name, e.g. no_aux
    metric: str
    n: int
    full_mean: float
    variant_mean: float
    diff: float
    ci: tuple[float, float]
    p_raw: float
    p_holm: float

    @property
    def significant(self) -> bool:
        """Holm-adjusted p < 0.05 and the CI wholly on the side of ``diff`` (the leaderboard's
        rule: the signed-rank test alone can disagree with the mean's sign)."""
        return bool(np.isfinite(self.p_holm) and self.p_holm < ALPHA and stats.ci_on_one_side(self.diff, *self.ci))


@dataclasses.dataclass
class AblationTable:
    dataset: str
    method: str  # the full method
    metrics: list[str]
    rows: dict[str, list[AblationRow]]  # metric -> one row per variant (config order)
    variants: list[str]  # expanded names
    #: method (full or variant) -> its :meth:`leaderboard.table.Divergence.text`, for those with
    #: diverged seeds (left out of the paired statistics; every seed diverged: no cases)
    diverged: dict[str, str] = dataclasses.field(default_factory=dict)
    #: variant -> the seeds it was compared on (run by both, diverged by neither)
    seeds: dict[str, list[int]] = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------- statistics
def bootstrap_mean_ci(d: Sequence[float], n_boot: int = N_BOOT, seed: int = BOOT_SEED, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``d`` (finite values; cases resampled with replacement).

    Returns ``(lo, hi)``; NaN for fewer than 2 values.
    """
    x = np.asarray(d, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size < 2:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(int(n_boot), x.size))
    means = x[idx].mean(axis=1)
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [a, 1.0 - a])
    return float(lo), float(hi)


def paired_effect(variant: dict[str, float], full: dict[str, float], n_boot: int = N_BOOT) -> dict[str, Any]:
    """Paired comparison of case → value maps on their common cases with finite values.

    Returns ``n``, ``full_mean``, ``variant_mean``, ``diff`` (mean of ``variant − full``),
    ``ci`` (bootstrap 95 %) and ``p`` (two-sided Wilcoxon signed-rank).
    """
    common = sorted(c for c in set(variant) & set(full) if np.isfinite(variant[c]) and np.isfinite(full[c]))
    v = np.asarray([variant[c] for c in common], dtype=np.float64)
    f = np.asarray([full[c] for c in common], dtype=np.float64)
    if not common:
        return {"n": 0, "full_mean": math.nan, "variant_mean": math.nan, "diff": math.nan, "ci": (math.nan, math.nan), "p": math.nan}
    p, n = stats.paired_wilcoxon(v, f)
    return {"n": n, "full_mean": float(f.mean()), "variant_mean": float(v.mean()), "diff": float((v - f).mean()),
            "ci": bootstrap_mean_ci(v - f, n_boot), "p": p}


# ----------------------------------------------------------------------------- reading
def variant_origins(root: str | Path) -> dict[tuple[str, str], tuple[str, str]]:
    """``(dataset, method folder) -> (full method, variant name)`` from every ``run.json``."""
    out: dict[tuple[str, str], tuple[str, str]] = {}
    from benchmark.core.io import DataError
    from benchmark.core.results import read_run_json

    for run in sorted(Path(root).glob("*/*/seed*/run.json")):
        try:
            rec = read_run_json(run.parent) or {}
        except (OSError, DataError):
            continue  # the leaderboard names it (leaderboard.cli.unreadable_runs)
        config = rec.get("config")
        m = (config.get("method") if isinstance(config, dict) else None) or {}
        if not isinstance(m, dict):
            continue
        if m.get("variant_of"):
            out[(run.parent.parent.parent.name, run.parent.parent.name)] = (str(m["variant_of"]), str(m.get("variant") or ""))
    return out


def _case_means(rows: Sequence[dict[str, Any]], method: str, key: str, seeds: set[int]) -> dict[str, float]:
    return case_means([r for r in rows if str(r["method"]) == method and int(r["seed"]) in seeds], key)


def ablation_tables(report: Any, n_boot: int = N_BOOT) -> list[AblationTable]:
    """Every (dataset, full method) with variants in a :class:`leaderboard.table.Report`.

    A variant whose full method has no complete experiment is left out (nothing to pair with).
    """
    origins = variant_origins(report.root)
    out: list[AblationTable] = []
    for ds in report.datasets:
        gone = {d.method: d for d in ds.diverged}
        present = {str(r["method"]) for r in ds.rows} | set(gone)
        groups: dict[str, list[tuple[str, str]]] = {}
        for (dname, mname), (base, label) in origins.items():
            if dname == ds.name and mname in present and base in present:
                groups.setdefault(base, []).append((mname, label))
        for base in sorted(groups):
            variants = sorted(groups[base])
            metrics = [k for k in ABLATION_METRICS if any(np.isfinite(num(r.get(k))) for r in ds.rows
                                                          if str(r["method"]) in {base, *[v for v, _ in variants]})]
            rows: dict[str, list[AblationRow]] = {}
            seeds = {m: {int(r["seed"]) for r in ds.rows if str(r["method"]) == m} for m in [base, *[v for v, _ in variants]]}
            for key in metrics:
                # Each variant against the full method on the seeds both have (all of them unless
                # some diverged): a case's value is its mean over those seeds on both sides.
                effs = [paired_effect(_case_means(ds.rows, v, key, seeds[v] & seeds[base]),
                                      _case_means(ds.rows, base, key, seeds[v] & seeds[base]), n_boot) for v, _ in variants]
                adj = stats.holm([e["p"] for e in effs])
                rows[key] = [AblationRow(v, label, key, e["n"], e["full_mean"], e["variant_mean"], e["diff"], e["ci"], e["p"], float(pa))
                             for (v, label), e, pa in zip(variants, effs, adj)]
            names = [v for v, _ in variants]
            out.append(AblationTable(ds.name, base, metrics, rows, names,
                                     {m: gone[m].text() for m in [base, *names] if m in gone},
                                     {v: sorted(seeds[v] & seeds[base]) for v in names}))
    return out


# ----------------------------------------------------------------------------- formatting
def _f(x: float, d: int = 3) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{x:.{d}f}"


def _p(x: float) -> str:
    if not np.isfinite(x):
        return "—"
    return f"{x:.2g}" if x < 0.001 else f"{x:.3f}"


def ablation_cells(t: AblationTable, star: str) -> tuple[list[str], list[list[str]]]:
    head = ["variant", "cases", "seeds"]
    for k in t.metrics:
        title = ABLATION_METRICS[k][0]
        head += [f"{title} full", f"{title} variant", f"Δ {title} [95 % CI]", f"p (Holm) {title}"]
    body = []
    for i, v in enumerate(t.variants):
        rowcells = [v, str(max((t.rows[k][i].n for k in t.metrics), default=0)), str(len(t.seeds.get(v, [])))]
        for k in t.metrics:
            r = t.rows[k][i]
            rowcells += [_f(r.full_mean), _f(r.variant_mean), f"{_f(r.diff)} [{_f(r.ci[0])}, {_f(r.ci[1])}]",
                         _p(r.p_holm) + (star if r.significant else "")]
        body.append(rowcells)
    return head, body


ABLATION_NOTE = ("Ablations: each variant against the full method on the same cases and seeds (a case's value is "
                 "its mean over the seeds both ran without diverging; seeds: how many). Δ = mean paired difference variant − full with a percentile bootstrap 95 % CI over "
                 "cases; p: paired two-sided Wilcoxon signed-rank, Holm-corrected across the variants of the method "
                 "(per metric); * = adjusted p < 0.05 with the CI excluding 0. Dice: higher is better; EPE (mm): lower is better.")


def verdict(t: AblationTable) -> str:
    sig = [f"{r.label} ({ABLATION_METRICS[r.metric][0]} Δ {_f(r.diff)})" for k in t.metrics for r in t.rows[k] if r.significant]
    tested = [i for i, _ in enumerate(t.variants) if any(t.rows[k][i].n > 0 for k in t.metrics)]
    none = [t.variants[i] for i in tested if not any(t.rows[k][i].significant for k in t.metrics)]
    parts = []
    if sig:
        parts.append("significant: " + ", ".join(sig))
    if none:
        parts.append("no significant effect: " + ", ".join(none))
    parts += [t.diverged[m] for m in [t.method, *t.variants] if m in t.diverged]
    return "; ".join(parts)


ARC_FILE = "arc.csv"
#: columns of ``arc.csv`` (means over all cases of all seeds of the point's experiments)
ARC_COLUMNS = ["dataset", "method", "experiment", "param", "value", "is_default", "status", "n_cases", "dice", "epe_mm",
               "sdlogj", "ndv_pct", "fold_pct", "tre", "sdlogj_bound"]
ARC_METRICS = {"dice": "Dice", "epe_mm": "EPE (mm)", "sdlogj": "SDlogJ", "ndv_pct": "NDV %", "fold_pct": "fold %"}


def read_arc(root: str | Path) -> list[dict[str, Any]]:
    """Rows of ``<root>/arc.csv`` with numbers as floats (``[]`` when there is no file)."""
    p = Path(root) / ARC_FILE
    if not p.exists():
        return []
    out = []
    with open(p, newline="") as fh:
        for r in csv.DictReader(fh):
            row: dict[str, Any] = dict(r)
            for k in ("value", "n_cases", "dice", "epe_mm", "sdlogj", "ndv_pct", "fold_pct", "tre", "sdlogj_bound"):
                row[k] = num(r.get(k)) if r.get(k) not in (None, "") else math.nan
            row["is_default"] = str(r.get("is_default")).lower() in ("1", "true")
            out.append(row)
    return out


def arc_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (dataset, method): best mean Dice among complete points with mean SDlogJ ≤ the bound.

    Also the default point's Dice and SDlogJ and the number of points. ``best_value`` is the
    regularisation value that gives the best admissible Dice (NaN when no point qualifies).
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["method"]), []).append(r)
    out = []
    for (ds, m), pts in sorted(groups.items()):
        done = [p for p in pts if p.get("status") == "complete"]
        bound = next((p["sdlogj_bound"] for p in pts if np.isfinite(p["sdlogj_bound"])), math.nan)
        ok = [p for p in done if np.isfinite(p["dice"]) and np.isfinite(p["sdlogj"]) and p["sdlogj"] <= bound]
        best = max(ok, key=lambda p: p["dice"]) if ok else None
        dflt = next((p for p in done if p["is_default"]), None)
        out.append({"dataset": ds, "method": m, "param": pts[0]["param"], "points": len(done), "points_total": len(pts),
                    "bound": bound, "best_dice": best["dice"] if best else math.nan,
                    "best_value": best["value"] if best else math.nan, "best_sdlogj": best["sdlogj"] if best else math.nan,
                    "default_value": dflt["value"] if dflt else math.nan, "default_dice": dflt["dice"] if dflt else math.nan,
                    "default_sdlogj": dflt["sdlogj"] if dflt else math.nan})
    return out


def arc_figure(rows: Sequence[dict[str, Any]], dataset: str) -> bytes | None:
    """Dice and EPE (rows) against SDlogJ and NDV % (columns) for one dataset; PNG bytes.

    One line per method through its complete points in order of the weight; the default
    setting ringed; EPE row only when some point has EPE. None when nothing to draw.
    """
    from leaderboard.plots import method_colors, new_figure, png_bytes

    pts = [r for r in rows if r["dataset"] == dataset and r.get("status") == "complete"]
    if not pts:
        return None
    ys = [k for k in ("dice", "epe_mm") if any(np.isfinite(r[k]) for r in pts)]
    xs = ["sdlogj", "ndv_pct"]
    if not ys:
        return None
    methods = sorted({r["method"] for r in pts})
    colors = dict(zip(methods, method_colors(len(methods))))
    fig = new_figure(4.2 * len(xs), 3.4 * len(ys))
    for i, yk in enumerate(ys):
        for j, xk in enumerate(xs):
            ax = fig.add_subplot(len(ys), len(xs), i * len(xs) + j + 1)
            for m in methods:
                mp = sorted((r for r in pts if r["method"] == m and np.isfinite(r[xk]) and np.isfinite(r[yk])), key=lambda r: r["value"])
                if not mp:
                    continue
                ax.plot([r[xk] for r in mp], [r[yk] for r in mp], "o-", color=colors[m], ms=4, lw=1.2,
                        label=f"{m} ({mp[0]['param']})")
                for r in mp:
                    if r["is_default"]:
                        ax.plot([r[xk]], [r[yk]], "o", ms=11, mfc="none", mec=colors[m], mew=1.8)
            if xk == "sdlogj":
                bound = next((r["sdlogj_bound"] for r in pts if np.isfinite(r["sdlogj_bound"])), math.nan)
                if np.isfinite(bound):
                    ax.axvline(bound, color="0.5", ls=":", lw=1)
            if xk == "ndv_pct":  # NDV spans orders of magnitude (0 for a diffeomorphic field)
                ax.set_xscale("symlog", linthresh=1e-3)
                hi = max((r[xk] for r in pts if np.isfinite(r[xk])), default=0.0)
                decs = list(range(-3, max(-2, math.ceil(math.log10(hi))) + 1)) if hi > 0 else [-3, -2]
                step = max(1, math.ceil(len(decs) / 5))  # at most ~6 labelled ticks
                ax.set_xticks([0.0] + [10.0 ** d for d in decs[::step]])
                ax.set_xticklabels(["0"] + [f"1e{d}" for d in decs[::step]], fontsize=8)
            ax.set_xlabel(ARC_METRICS[xk])
            ax.set_ylabel(ARC_METRICS[yk])
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"{dataset}: accuracy–regularity (ringed: default setting; dotted: SDlogJ bound)", fontsize=9)
    fig.tight_layout()
    return png_bytes(fig)


ARC_NOTE = ("Accuracy–regularity curves (regbench arc): each method at log-spaced values of its regularisation weight; "
            "means over all test cases. Best Dice at SDlogJ ≤ bound: the highest mean Dice among the points whose mean "
            "SDlogJ is at most the bound, and the weight that gives it.")


def arc_cells(summary: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = ["dataset", "method", "weight", "points", "SDlogJ bound", "best Dice at SDlogJ ≤ bound", "at weight",
            "default weight", "Dice at default", "SDlogJ at default"]
    body = [[s["dataset"], s["method"], s["param"], f"{s['points']}/{s['points_total']}", _f(s["bound"], 2), _f(s["best_dice"]),
             f"{s['best_value']:.4g}" if np.isfinite(s["best_value"]) else "—", f"{s['default_value']:.4g}" if np.isfinite(s["default_value"]) else "—",
             _f(s["default_dice"]), _f(s["default_sdlogj"])] for s in summary]
    return head, body


def arc_point_cells(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = ["dataset", "method", "weight", "value", "default", "status", "Dice", "EPE mm", "SDlogJ", "NDV %", "fold %"]
    body = [[r["dataset"], r["method"], r["param"], f"{r['value']:.4g}", "yes" if r["is_default"] else "", str(r["status"]),
             _f(r["dice"]), _f(r["epe_mm"]), _f(r["sdlogj"]), _f(r["ndv_pct"]), _f(r["fold_pct"])]
            for r in sorted(rows, key=lambda r: (r["dataset"], r["method"], r["value"]))]
    return head, body
