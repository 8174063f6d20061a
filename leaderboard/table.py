"""The leaderboard: per-dataset tables, Learn2Reg rank scores, significance against the best.

Reads every ``<root>/<dataset>/<method>/seed<k>/cases.csv`` (never imports ``systems``);
only experiments whose ``run.json`` says ``complete`` enter, the others are listed apart.
:func:`build_report` computes everything once into a :class:`Report` (this module is the
report model: data and table cells, no files); the writers (:mod:`leaderboard.markdown`,
:mod:`leaderboard.latex`, :mod:`leaderboard.html`) read it, and
:func:`leaderboard.write.write_leaderboard` writes the formats asked for (``md``, ``csv``,
``tex``, ``html``) as ``<root>/leaderboard.<ext>``.

Per dataset and method, for every metric (seeds pooled: statistics over all cases of all
seeds): mean, std, median, the robustness value (mean of the 30 % worst cases), and, with
more than one seed, the std of the per-seed means. The ``initial`` row (no registration,
or the starting pose for 2D/3D) sits first; the other methods follow by rank score.

Significance: for every metric, each method is compared with the best one (best mean among
the ranked methods, ``initial`` excluded) by a paired two-sided Wilcoxon signed-rank test
on the cases both have (paired by ``case_id``; a case's value is its mean over seeds);
the p-values of one metric are Holm-corrected together. In the tables the best value is
bold and ``*`` marks a method significantly different from the best (adjusted p < 0.05).

Diverged runs (deformable datasets, :func:`diverged_runs`): a run (method, seed) whose
registration blew up (a case with a non-finite Dice, EPE, TRE or SDlogJ that other rows of
the case have, or an EPE / TRE more than :data:`DIVERGE_FACTOR` times the initial's) is left
out of every statistic, rank and test, and listed under the tables
(:attr:`DatasetReport.diverged`): averaging a run that moved the anatomy out of the image
would make every mean meaningless, and dropping it silently would hide a failure.

A dataset's kind is the ``task`` its data module declares, recorded in each experiment's
``run.json`` (results saved before that fall back to
:func:`benchmark.core.registry.legacy_task`). A 2D/3D ("pose") dataset's table has mTRE
percentiles (50/75/95), success rates (< 10 mm, < 2 mm), projected TRE, rotation and
translation errors and runtime. Titles, orientation, digits and the columns of every table
come from the metric registry (:mod:`benchmark.core.registry`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from benchmark.core import registry
from benchmark.core.io import DataError
from benchmark.core.results import experiment_dir, read_cases_csv, read_run_json
from leaderboard import ranking, stats

__all__ = [
    "LEADERBOARD_METRICS",
    "DEFORMABLE_METRICS",
    "POSE_METRICS",
    "INITIAL",
    "MethodSummary",
    "DatasetReport",
    "Report",
    "collect",
    "build_report",
    "case_means",
    "flat_rows",
    "num",
    "Divergence",
    "diverged_runs",
    "diverged_notes",
    "DIVERGE_FACTOR",
    "DIVERGE_FLOOR_MM",
    "DEFAULT_FORMATS",
    "ALL_FORMATS",
]

INITIAL = "initial"
#: metric column -> (title, higher is better): the deformable table of the built-in metrics
#: (the leading columns of ``leaderboard.csv``; tables ask :func:`registry.table_metrics`).
LEADERBOARD_METRICS: dict[str, tuple[str, bool]] = {
    k: (registry.metric(k).title, registry.metric(k).higher_is_better) for k in registry.table_metrics("deformable")
}
DEFORMABLE_METRICS = list(LEADERBOARD_METRICS)
POSE_METRICS = registry.table_metrics("pose")
DEFAULT_FORMATS = ("md", "csv", "html")
ALL_FORMATS = ("md", "csv", "tex", "html")


# ----------------------------------------------------------------------------- reading
def collect(root: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """All case rows of complete experiments, and the list of experiments left out."""
    root = Path(root)
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for cases in sorted(root.glob("*/*/seed*/cases.csv")):
        exp = cases.parent
        status = _run_status(exp)
        if status != "complete":
            skipped.append({"experiment": str(exp.relative_to(root)), "status": status})
            continue
        # Ids from the folder layout where the file lacks them (e.g. written by `regbench test`).
        ids = {"dataset": exp.parent.parent.name, "method": exp.parent.name, "seed": _seed_from_dir(exp.name)}
        for r in read_cases_csv(cases):
            for k, v in ids.items():
                if r.get(k) is None or r.get(k) == "" or (isinstance(r.get(k), float) and math.isnan(r[k])):
                    r[k] = v
            rows.append(r)
    for run in sorted(root.glob("*/*/seed*/run.json")):
        if not (run.parent / "cases.csv").exists():
            skipped.append({"experiment": str(run.parent.relative_to(root)), "status": _run_status(run.parent)})
    return rows, skipped


def _run_status(exp: Path) -> Any:
    """The ``status`` an experiment's ``run.json`` records; ``"no run.json"`` when there is
    none, why it is unreadable or corrupt (:func:`read_run_json`) when it cannot be read or is
    not a JSON object."""
    try:
        run = read_run_json(exp)
    except DataError as exc:
        return exc.problem
    return "no run.json" if run is None else run.get("status")


def _seed_from_dir(name: str) -> int:
    try:
        return int(name[len("seed"):])
    except ValueError:
        return 0


def num(v: Any) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return math.nan
    return x


def _per_label(v: Any) -> dict[str, float]:
    """The ``dice_per_label`` cell (JSON object label -> Dice) as a dict; {} when absent."""
    if isinstance(v, dict):
        d = v
    elif isinstance(v, str) and v.strip().startswith("{"):
        try:
            d = json.loads(v)
        except json.JSONDecodeError:
            return {}
    else:
        return {}
    return {str(k): num(x) for k, x in d.items()}


# ----------------------------------------------------------------------------- divergence
#: Metrics whose non-finite value (where another row of the same case has a finite one) marks a
#: diverged run; :data:`DIVERGE_ERRORS` are also bounded relative to the initial's value.
DIVERGE_METRICS = ("dice", "epe_mm", "tre", "sdlogj")
DIVERGE_ERRORS = ("epe_mm", "tre")
#: An EPE / TRE (mm) above ``DIVERGE_FACTOR * max(initial's on that case, DIVERGE_FLOOR_MM)``
#: is a blown-up registration, not a poor one (10× the error of doing nothing, at least 50 mm).
DIVERGE_FACTOR = 10.0
DIVERGE_FLOOR_MM = 5.0


def diverged_runs(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, int], str]:
    """The runs of a deformable dataset whose registration diverged.

    ``rows``: every case row of the dataset (the ``initial`` rows included: they are the
    reference). A run ``(method, seed)`` diverged when one of its cases has

    * a non-finite value of a metric in :data:`DIVERGE_METRICS` that some other row of the
      same case has finite (so a case without labels, where every Dice is NaN, does not count), or
    * an EPE or TRE (mm) above ``DIVERGE_FACTOR * max(initial's value on the case,
      DIVERGE_FLOOR_MM)`` (only where ``initial`` has the case).

    Returns ``{(method, seed): reason}`` with the reason naming the first offending case;
    ``initial`` itself is never diverged.
    """
    finite: dict[str, dict[str, int]] = {}  # case -> metric -> rows with a finite value
    init: dict[str, dict[str, Any]] = {}
    for r in rows:
        c = str(r["case_id"])
        for k in DIVERGE_METRICS:
            if np.isfinite(num(r.get(k))):
                finite.setdefault(c, {}).setdefault(k, 0)
                finite[c][k] += 1
        if str(r["method"]) == INITIAL:
            init[c] = r
    out: dict[tuple[str, int], str] = {}
    for r in rows:
        key = (str(r["method"]), int(r["seed"]))
        if key[0] == INITIAL or key in out:
            continue
        c = str(r["case_id"])
        for k in DIVERGE_METRICS:
            v = num(r.get(k))
            if not np.isfinite(v):
                if finite.get(c, {}).get(k, 0) > 0:
                    out[key] = f"{registry.metric(k).title} not finite on case {c}"
                    break
                continue
            ref = num(init[c].get(k)) if c in init else math.nan
            if k in DIVERGE_ERRORS and np.isfinite(ref):
                limit = DIVERGE_FACTOR * max(ref, DIVERGE_FLOOR_MM)
                if v > limit:
                    out[key] = f"{registry.metric(k).title} {v:.3g} mm > {limit:.3g} mm on case {c}"
                    break
    return out


@dataclasses.dataclass
class Divergence:
    """The diverged seeds of one method: left out of every statistic, listed under the tables."""

    method: str
    seeds: list[int]  # the diverged seeds
    n_seeds: int  # the seeds the method ran (complete experiments)
    reason: str  # the first diverged seed's first offending case

    def text(self) -> str:
        which = "every seed" if len(self.seeds) == self.n_seeds else f"{len(self.seeds)} of {self.n_seeds} seeds"
        seeds = ", ".join(str(s) for s in self.seeds)
        return (f"{self.method}: {which} diverged (seed{'s' if len(self.seeds) > 1 else ''} {seeds}; "
                f"seed {self.seeds[0]}: {self.reason}); left out of every statistic")


def diverged_notes(ds: "DatasetReport") -> list[str]:
    """One line per method with diverged seeds (empty when none)."""
    return [d.text() for d in ds.diverged]


# ----------------------------------------------------------------------------- model
@dataclasses.dataclass
class MethodSummary:
    """One row of a dataset's table.

    ``stats[metric]`` holds ``mean``, ``std``, ``median``, ``robust30``, ``seed_std``,
    ``p50``, ``p75``, ``p95``, ``p_holm`` (vs the best; NaN for the best and ``initial``)
    and ``significant`` (1.0 / 0.0). ``ranks`` holds the per-metric rank scores and
    ``rank_score`` / ``rank_score_rt`` (empty for ``initial``).
    """

    method: str
    n_cases: int
    n_seeds: int
    seeds: list[int]
    stats: dict[str, dict[str, float]]
    ranks: dict[str, float]
    per_seed: dict[int, dict[str, float]]
    exp_dirs: list[Path]


@dataclasses.dataclass
class DatasetReport:
    """Everything the reports show for one dataset."""

    name: str
    kind: str  # "deformable" | "pose"
    metrics: list[str]  # table metrics the dataset has (any finite value)
    rank_metrics: list[str]  # resolved ranking metrics (runtime excluded)
    methods: list[MethodSummary]
    best: dict[str, str]  # metric -> best method
    rows: list[dict[str, Any]]
    case_values: dict[str, dict[str, dict[str, float]]]  # metric -> method -> case -> value
    per_label: dict[str, dict[str, float]]  # method -> label -> mean Dice
    diverged: list[Divergence] = dataclasses.field(default_factory=list)  # runs left out (see diverged_runs)

    def method(self, name: str) -> MethodSummary | None:
        return next((m for m in self.methods if m.method == name), None)


@dataclasses.dataclass
class Report:
    root: Path
    datasets: list[DatasetReport]
    skipped: list[dict[str, Any]]


def case_means(rows: Sequence[dict[str, Any]], key: str) -> dict[str, float]:
    """Per case id, the mean of ``key`` over the rows (seeds) of that case; NaN without a finite value."""
    acc: dict[str, list[float]] = {}
    for r in rows:
        acc.setdefault(str(r["case_id"]), []).append(num(r.get(key)))
    out = {}
    for c, vals in acc.items():
        v = np.asarray(vals, dtype=np.float64)
        v = v[np.isfinite(v)]
        out[c] = float(v.mean()) if v.size else math.nan
    return out


def _label_means(rows: Sequence[dict[str, Any]]) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """(case -> label -> Dice averaged over seeds, label -> Dice averaged over all rows)."""
    per_case: dict[str, dict[str, list[float]]] = {}
    per_lab: dict[str, list[float]] = {}
    for r in rows:
        for lab, v in _per_label(r.get("dice_per_label")).items():
            per_case.setdefault(str(r["case_id"]), {}).setdefault(lab, []).append(v)
            per_lab.setdefault(lab, []).append(v)

    def m(vals: list[float]) -> float:
        a = np.asarray(vals, dtype=np.float64)
        a = a[np.isfinite(a)]
        return float(a.mean()) if a.size else math.nan

    return ({c: {lab: m(v) for lab, v in d.items()} for c, d in per_case.items()}, {lab: m(v) for lab, v in per_lab.items()})


def _seed_case_table(rows: Sequence[dict[str, Any]], key: str, seeds: Sequence[int]) -> np.ndarray:
    """``(S, N)`` values of ``key`` per seed (rows) and case (columns), NaN where missing."""
    cases = sorted({str(r["case_id"]) for r in rows})
    col = {c: i for i, c in enumerate(cases)}
    row = {int(sd): i for i, sd in enumerate(seeds)}
    t = np.full((len(seeds), len(cases)), np.nan)
    for r in rows:
        t[row[int(r["seed"])], col[str(r["case_id"])]] = num(r.get(key))
    return t


def _has(rows: Iterable[dict[str, Any]], key: str) -> bool:
    return any(np.isfinite(num(r.get(key))) for r in rows)


def dataset_task(root: str | Path, name: str, rows: Sequence[dict[str, Any]]) -> str:
    """The task of a dataset: the ``task`` its experiments' ``run.json`` record (declared by
    the data module), else, for results saved before that, :func:`registry.legacy_task`."""
    for method, seed in sorted({(str(r["method"]), int(r["seed"])) for r in rows}):
        task = _run_json(experiment_dir(root, name, method, seed)).get("task")
        if task in registry.TASKS:
            return str(task)
    return registry.legacy_task(rows)


def build_dataset(root: Path, name: str, rows: list[dict[str, Any]], rank_metrics: Sequence[str] | None = None,
                  kind: str | None = None) -> DatasetReport:
    """Aggregate, rank and test one dataset's case rows (see the module docstring); ``kind``
    is the dataset's task (default: :func:`dataset_task`)."""
    kind = kind or dataset_task(root, name, rows)
    bad = diverged_runs(rows) if kind == "deformable" else {}
    diverged = []
    for m in sorted({k[0] for k in bad}):
        seeds_run = sorted({int(r["seed"]) for r in rows if str(r["method"]) == m})
        gone = [sd for sd in seeds_run if (m, sd) in bad]
        diverged.append(Divergence(m, gone, len(seeds_run), bad[(m, gone[0])]))
    rows = [r for r in rows if (str(r["method"]), int(r["seed"])) not in bad]
    candidates = registry.table_metrics(kind)
    metrics = [m for m in candidates if _has(rows, m)]
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_method.setdefault(str(r["method"]), []).append(r)
    ranked = sorted(m for m in by_method if m != INITIAL)

    case_values: dict[str, dict[str, dict[str, float]]] = {}
    for key in set(metrics) | {"dice"} | set(candidates if kind == "pose" else []):
        case_values[key] = {m: case_means(rs, key) for m, rs in by_method.items()}
    per_label_cases: dict[str, dict[str, dict[str, float]]] = {}
    per_label: dict[str, dict[str, float]] = {}
    for m, rs in by_method.items():
        per_label_cases[m], per_label[m] = _label_means(rs)

    spec = list(rank_metrics) if rank_metrics else ranking.RANK_METRICS[kind]
    available = set(metrics) | ({"dice_robust30"} if "dice" in metrics else set())
    resolved = ranking.resolve_metrics(spec, available)
    resolved = [k for k in resolved if k != ranking.RUNTIME_METRIC]
    ranks = ranking.rank_dataset(case_values, resolved, ranked, per_label=per_label_cases, initial=INITIAL) if ranked else {}

    summaries: dict[str, MethodSummary] = {}
    for m, rs in by_method.items():
        seeds = sorted({int(r["seed"]) for r in rs})
        st: dict[str, dict[str, float]] = {}
        per_seed: dict[int, dict[str, float]] = {s: {"n_cases": float(sum(1 for r in rs if int(r["seed"]) == s))} for s in seeds}
        for key in metrics:
            vals = [num(r.get(key)) for r in rs]
            hib = registry.metric(key).higher_is_better
            s = stats.pooled_stats(vals)
            by_seed = {sd: [num(r.get(key)) for r in rs if int(r["seed"]) == sd] for sd in seeds}
            p50, p75, p95 = stats.percentiles(vals)
            mean, lo, hi = stats.bootstrap_mean_ci(_seed_case_table(rs, key, seeds))
            st[key] = {**s, "robust30": stats.worst_fraction_mean(vals, hib), "seed_std": stats.seed_std(by_seed),
                       "p50": p50, "p75": p75, "p95": p95, "p_holm": math.nan, "p_raw": math.nan, "significant": 0.0,
                       "ci_lo": lo, "ci_hi": hi, "diff": math.nan, "diff_lo": math.nan, "diff_hi": math.nan}
            for sd in seeds:
                per_seed[sd][key] = stats.pooled_stats(by_seed[sd])["mean"]
        exp_dirs = [experiment_dir(root, name, m, sd) for sd in seeds]
        summaries[m] = MethodSummary(m, len(rs), len(seeds), seeds, st, dict(ranks.get(m, {})), per_seed, exp_dirs)

    # Significance against the best, per metric, Holm over the ranked methods.
    # A method some of whose seeds diverged is never the reference "best": its statistics are
    # those of the seeds that survived (unless no other method is left).
    partial = {d.method for d in diverged}
    eligible = [m for m in ranked if m not in partial] or ranked
    best: dict[str, str] = {}
    for key in metrics:
        hib = registry.metric(key).higher_is_better
        cands = [(summaries[m].stats[key]["mean"], m) for m in eligible if np.isfinite(summaries[m].stats[key]["mean"])]
        if not cands:
            continue
        b = sorted(cands, key=lambda t: (-t[0] if hib else t[0], t[1]))[0][1]
        best[key] = b
        others = [m for m in ranked if m != b]
        for m, st in _paired_against(case_values[key], b, others).items():
            summaries[m].stats[key].update(st)

    # Change from no registration, per metric, Holm over the ranked methods: "does this
    # method register at all on these pairs?", with the same paired test and intervals.
    if INITIAL in by_method:
        for key in metrics:
            cv = case_values[key]
            others = [m for m in ranked if set(cv[m]) & set(cv[INITIAL])]
            for m, st in _paired_against(cv, INITIAL, others).items():
                summaries[m].stats[key].update({"init_" + k: v for k, v in st.items() if k != "p_raw"})

    def order(m: str) -> tuple:
        rs = summaries[m].ranks.get("rank_score", math.nan)
        return (m != INITIAL, -(rs if np.isfinite(rs) else -1.0), m)

    methods = [summaries[m] for m in sorted(summaries, key=order)]
    return DatasetReport(name, kind, metrics, resolved, methods, best, rows, case_values, per_label, diverged)


def build_report(root: str | Path, rank_metrics: Mapping[str, Sequence[str]] | None = None) -> Report:
    """Read ``root`` and build every dataset's report.

    Args:
        rank_metrics: optional dataset name (or kind, ``deformable`` / ``pose``) → metric
            list overriding :data:`leaderboard.ranking.RANK_METRICS`.
    """
    root = Path(root)
    rows, skipped = collect(root)
    by_ds: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_ds.setdefault(str(r["dataset"]), []).append(r)
    out = []
    for ds in sorted(by_ds):
        kind = dataset_task(root, ds, by_ds[ds])
        spec = None
        if rank_metrics:
            spec = rank_metrics.get(ds) or rank_metrics.get(kind)
        out.append(build_dataset(root, ds, by_ds[ds], spec, kind))
    return Report(root, out, skipped)


# ----------------------------------------------------------------------------- formatting
def fmt(x: float | None, digits: int = 3) -> str:
    """A number with ``digits`` decimals; an em dash for a missing value."""
    return "—" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def digits(key: str) -> int:
    return registry.metric(key).digits


def column_best(ds: DatasetReport, values: Mapping[str, float], higher_is_better: bool) -> str | None:
    """The ranked method (not ``initial``) with the best finite value of a column."""
    cands = [(v, m) for m, v in values.items() if m != INITIAL and v is not None and np.isfinite(v)]
    if not cands:
        return None
    return sorted(cands, key=lambda t: (-t[0] if higher_is_better else t[0], t[1]))[0][1]


def pose_columns() -> list[tuple[str, str, str, bool, int]]:
    """The 2D/3D table: (column id, title, (metric, statistic) source, higher is better,
    digits), one column per statistic in each registry entry's ``table``, sorted by
    ``table_order`` (mTRE percentiles, success rates, then the means)."""
    ms = sorted((m for m in registry.metrics_of("pose") if m.table), key=lambda m: m.table_order)
    return [(f"{m.key}:{st}", m.column_title(st), f"{m.key}:{st}", m.higher_is_better, m.digits) for m in ms for st in m.table]


def _src(ms: MethodSummary, src: str) -> float:
    key, stat = src.split(":")
    return ms.stats.get(key, {}).get(stat, math.nan)


def summary_cells(ds: DatasetReport, style: str = "md") -> tuple[list[str], list[list[str]]]:
    """Header and cells of a dataset's main table, with bold best and ``*`` markers.

    ``style`` is ``md`` (``**x**``), ``tex`` (``\\textbf{x}``, ``$^{*}$``) or ``html``.
    """
    def bold(s: str) -> str:
        return {"md": f"**{s}**", "tex": f"\\textbf{{{s}}}", "html": f"<b>{s}</b>"}[style]

    star = {"md": "*", "tex": "$^{*}$", "html": "<sup>*</sup>"}[style]
    gone = {d.method: len(d.seeds) for d in ds.diverged}

    def seeds(ms: MethodSummary) -> str:  # "1 (+2 diverged)": the statistics are the survivors'
        return f"{ms.n_seeds} (+{gone[ms.method]} diverged)" if ms.method in gone else str(ms.n_seeds)

    head = ["method", "cases", "seeds"]
    rows: list[list[str]] = []
    if ds.kind == "pose":
        cols = [c for c in pose_columns() if c[2].split(":")[0] in ds.metrics]
        head += [c[1] for c in cols]
        bests = {c[0]: column_best(ds, {m.method: _src(m, c[2]) for m in ds.methods}, c[3]) for c in cols}
        best_vals = {cid: (_src(ds.method(b), src) if b else math.nan) for (cid, _, src, _, _), b in zip(cols, bests.values())}
        for ms in ds.methods:
            cells = [ms.method, str(ms.n_cases), seeds(ms)]
            for cid, _, src, _, d in cols:
                s = fmt(_src(ms, src), d)
                key = src.split(":")[0]
                if ms.method != INITIAL and _src(ms, src) == best_vals[cid]:  # ties all bold
                    s = bold(s)
                if ms.stats.get(key, {}).get("significant"):
                    s += star
                cells.append(s)
            rows.append(cells)
    else:
        head += [f"{registry.metric(k).title} ({'↑' if registry.metric(k).higher_is_better else '↓'})" for k in ds.metrics]
        for ms in ds.methods:
            cells = [ms.method, str(ms.n_cases), seeds(ms)]
            for k in ds.metrics:
                st = ms.stats[k]
                d = digits(k)
                s = f"{fmt(st['mean'], d)} [{fmt(st.get('ci_lo'), d)}, {fmt(st.get('ci_hi'), d)}]"
                b = ds.method(ds.best[k]) if k in ds.best else None
                if b is not None and ms.method != INITIAL and st["mean"] == b.stats[k]["mean"]:  # ties all bold
                    s = bold(s)
                if st.get("significant"):
                    s += star
                cells.append(s)
            rows.append(cells)
    head += ["rank score", "rank score (with runtime)"]
    for ms, cells in zip(ds.methods, rows):
        cells += [fmt(ms.ranks.get("rank_score"), 3), fmt(ms.ranks.get("rank_score_rt"), 3)]
    partial = _surviving_seeds(ds)  # never marked best on a subset of its seeds, as in the metric columns
    for col, key in ((len(head) - 2, "rank_score"), (len(head) - 1, "rank_score_rt")):
        whole = {m.method: m.ranks.get(key, math.nan) for m in ds.methods if m.method not in partial}
        b = column_best(ds, whole or {m.method: m.ranks.get(key, math.nan) for m in ds.methods}, True)
        bv = ds.method(b).ranks.get(key) if b else None
        for ms, cells in zip(ds.methods, rows):
            if b and ms.method != INITIAL and ms.ranks.get(key) == bv:
                cells[col] = bold(cells[col])
    return head, rows


def robust_cells(ds: DatasetReport) -> tuple[list[str], list[list[str]]]:
    """Median and robustness value (mean of the 30 % worst cases) per metric."""
    head = ["method"] + [f"{registry.metric(k).title}: median / worst 30 %" for k in ds.metrics]
    rows = []
    for ms in ds.methods:
        rows.append([ms.method] + [f"{fmt(ms.stats[k]['median'], digits(k))} / {fmt(ms.stats[k]['robust30'], digits(k))}" for k in ds.metrics])
    return head, rows


def ranking_cells(ds: DatasetReport) -> tuple[list[str], list[list[str]]]:
    """Per-metric rank scores and their geometric means."""
    keys = ds.rank_metrics + [ranking.RUNTIME_METRIC]
    head = ["method"] + [registry.metric(k).title for k in keys] + ["rank score", "with runtime"]
    rows = []
    for ms in ds.methods:
        if ms.method == INITIAL:
            continue
        rows.append([ms.method] + [fmt(ms.ranks.get(k), 3) for k in keys] + [fmt(ms.ranks.get("rank_score"), 3), fmt(ms.ranks.get("rank_score_rt"), 3)])
    return head, rows


def seed_cells(ds: DatasetReport) -> tuple[list[str], list[list[str]]]:
    """Per-seed means (one row per method and seed) and the std of the seed means."""
    head = ["method", "seed", "cases"] + [registry.metric(k).title for k in ds.metrics]
    rows = []
    for ms in ds.methods:
        if ms.n_seeds < 2:
            continue
        for sd in ms.seeds:
            ps = ms.per_seed[sd]
            rows.append([ms.method, str(sd), str(int(ps["n_cases"]))] + [fmt(ps.get(k), digits(k)) for k in ds.metrics])
        rows.append([ms.method, "std of seed means", ""] + [fmt(ms.stats[k]["seed_std"], digits(k)) for k in ds.metrics])
    return head, rows


def paired_cells(ds: DatasetReport) -> tuple[list[str], list[list[str]]]:
    """Each ranked method against the best one, per metric: the mean paired difference over
    cases with its 95 % bootstrap CI, the Holm-corrected Wilcoxon p, the number of paired cases
    and the verdict ("better" / "worse" when the test and the CI agree, "test and CI disagree",
    "not distinguishable"), so a gap inside the noise says so."""
    keys = [k for k in registry.paired_metrics(ds.kind) if k in ds.metrics and k in ds.best]
    head = ["method"] + [f"{registry.metric(k).title}: Δ vs {ds.best[k]} [95 % CI], p (Holm)" for k in keys]
    rows = []
    partial = _surviving_seeds(ds)
    for ms in ds.methods:
        if ms.method == INITIAL or all(ms.method == ds.best[k] for k in keys):
            continue
        cells = [ms.method]
        for k in keys:
            st = ms.stats[k]
            if ms.method == ds.best[k]:
                cells.append("best")
                continue
            cells.append(_diff_cell(st, k, "", ("better", "worse", "not distinguishable")) + partial.get(ms.method, ""))
        rows.append(cells)
    return head, rows


def _surviving_seeds(ds: DatasetReport) -> dict[str, str]:
    """``method -> " (on k of n seeds)"`` for the methods some of whose seeds diverged: their
    comparisons use the seeds that survived, and a cell must say so."""
    gone = {d.method: len(d.seeds) for d in ds.diverged}
    return {ms.method: f" (on {ms.n_seeds} of {ms.n_seeds + gone[ms.method]} seeds)" for ms in ds.methods if ms.method in gone}


def _paired_against(cv: Mapping[str, Mapping[str, float]], ref: str, methods: list[str]) -> dict[str, dict[str, float]]:
    """Each of ``methods`` against ``ref`` on the cases both have (``cv``: method → case →
    value): the mean paired difference ``method − ref`` with its bootstrap CI (``diff``,
    ``diff_lo``, ``diff_hi``), the Wilcoxon p (``p_raw``), Holm-corrected over ``methods``
    (``p_holm``, ``significant``), and the smallest Holm p those cases allow (``p_min``)."""
    commons = {m: sorted(set(cv[ref]) & set(cv[m])) for m in methods}
    pairs = {m: ([cv[m][c] for c in commons[m]], [cv[ref][c] for c in commons[m]]) for m in methods}
    tests = [stats.paired_wilcoxon(*pairs[m]) for m in methods]  # (p, finite pairs)
    raw = [p for p, _ in tests]
    out = {}
    for m, p, pa, (_, n_finite) in zip(methods, raw, stats.holm(raw), tests):
        d, dlo, dhi = stats.paired_difference_ci(*pairs[m])
        test = bool(np.isfinite(pa) and pa < ranking.ALPHA)
        # a claim needs both: the corrected test and an interval wholly on the side of the mean
        # (the Wilcoxon test ranks differences, so one large case can flip the mean's sign)
        ci_side = stats.ci_on_one_side(d, dlo, dhi)
        out[m] = {"diff": d, "diff_lo": dlo, "diff_hi": dhi, "p_raw": p, "p_holm": float(pa),
                  "p_min": _smallest_holm_p(_tested_pairs(*pairs[m]), len(methods)),
                  "n_pairs": float(n_finite),
                  "significant": float(test and ci_side), "disagree": float(test and not ci_side)}
    return out


def _tested_pairs(a: list[float], b: list[float]) -> int:
    """How many pairs the Wilcoxon test ranks: both values finite and a non-zero difference
    (:func:`leaderboard.stats.paired_wilcoxon` drops the rest); the finite pairs when every
    difference is zero (identical samples: there is nothing too few about them)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    nonzero = int(np.count_nonzero(x[finite] != y[finite]))
    return nonzero if nonzero else int(finite.sum())


def _smallest_holm_p(n: int, m: int) -> float:
    """The smallest Holm-corrected p that ``m`` exact two-sided Wilcoxon signed-rank tests
    on ``n`` pairs can give (every difference the same sign: ``2 / 2^n``, times ``m``). At or
    above the significance level the test cannot support any difference, so the tables say
    "too few cases to test" rather than "no change"."""
    return min(1.0, m * 2.0 ** (1 - n)) if n > 0 else 1.0


def _diff_cell(st: Mapping[str, float], key: str, prefix: str, words: tuple[str, str, str]) -> str:
    """``Δ [lo, hi], p=…, n=…: verdict`` from the stats ``{prefix}diff``, ``…_lo``, ``…_hi``,
    ``{prefix}p_holm``, ``{prefix}n_pairs``, ``{prefix}significant`` (test and CI agree),
    ``{prefix}disagree`` (the test alone); ``words`` = (in the metric's good direction, in the
    bad one, not significant). "no data" when no case has both values."""
    d = digits(key)
    diff = st.get(prefix + "diff", math.nan)
    n = st.get(prefix + "n_pairs")
    if n is not None and n == 0:
        return "no data"
    if st.get(prefix + "significant"):
        verdict = words[0] if (diff > 0) == registry.metric(key).higher_is_better else words[1]
    elif st.get(prefix + "disagree"):
        verdict = "test and CI disagree"
    elif st.get(prefix + "p_min", 0.0) >= ranking.ALPHA:
        verdict = "too few cases to test"
    else:
        verdict = words[2]
    cases = "" if n is None else f", n={int(n)}"
    return (f"{fmt(diff, d)} [{fmt(st.get(prefix + 'diff_lo'), d)}, {fmt(st.get(prefix + 'diff_hi'), d)}], "
            f"p={fmt(st.get(prefix + 'p_holm'), 3)}{cases}: {verdict}")


def initial_cells(ds: DatasetReport) -> tuple[list[str], list[list[str]]]:
    """Each ranked method against ``initial`` (no registration), per metric: the mean paired
    difference over cases with its 95 % bootstrap CI, the Holm-corrected Wilcoxon p (over the
    ranked methods), and the verdict the test supports ("improves" / "worsens" / "no
    change shown"). Empty when the results have no ``initial`` row."""
    keys = [k for k in registry.paired_metrics(ds.kind) if k in ds.metrics]
    head = ["method"] + [f"{registry.metric(k).title}: Δ vs initial [95 % CI], p (Holm)" for k in keys]
    rows = []
    partial = _surviving_seeds(ds)
    for ms in ds.methods:
        if ms.method == INITIAL or not any("init_diff" in ms.stats[k] for k in keys):
            continue
        cells = [ms.method]
        for k in keys:
            st = ms.stats[k]
            if "init_diff" not in st:
                cells.append("")
                continue
            cells.append(_diff_cell(st, k, "init_", ("improves", "worsens", "no change shown")) + partial.get(ms.method, ""))
        rows.append(cells)
    return head, rows


def _run_json(exp: Path) -> dict[str, Any]:
    try:
        return read_run_json(exp) or {}
    except DataError:
        return {}


def budget_cells(ds: DatasetReport) -> tuple[list[str], list[list[str]]]:
    """Training budget and cost per method (from each experiment's ``run.json``): seeds, the
    budget asked for, training steps actually taken, training wall and CPU seconds, trainable
    parameters, peak training memory and the median registration time per case. Means over
    seeds; empty cells where a method does not train."""
    head = ["method", "seeds", "budget", "steps taken", "train s (wall)", "train s (CPU)", "parameters",
            "peak train MB", "registration s (median)"]
    rows = []
    any_fit = False
    for ms in ds.methods:
        if ms.method == INITIAL:
            continue
        fits = [(_run_json(e).get("fit") or {}) for e in ms.exp_dirs]
        fits = [f for f in fits if f.get("done") or f.get("steps") is not None]

        def mean_of(key: str, digits_: int = 0) -> str:
            v = [float(f[key]) for f in fits if isinstance(f.get(key), (int, float))]
            if not v:
                return ""
            m = float(np.mean(v))
            return f"{m:,.0f}" if digits_ == 0 else f"{m:.{digits_}f}"

        budget = ""
        if fits:
            any_fit = True
            b = fits[0].get("budget") or {}
            eff = b.get("effective", b) if isinstance(b, dict) else {}
            parts = [f"{k}={v}" for k, v in (eff or {}).items() if v is not None and k in ("max_steps", "max_time_s")]
            budget = ", ".join(parts) + (" (method override)" if isinstance(b, dict) and b.get("overridden") else "")
        reg = ms.stats.get("runtime_s", {}).get("median", math.nan)
        rows.append([ms.method, str(ms.n_seeds), budget, mean_of("steps"), mean_of("seconds", 1), mean_of("cpu_seconds", 1),
                     mean_of("params"), mean_of("peak_train_mem_mb"), fmt(reg, 3)])
    return (head, rows) if any_fit else (head, [])


FOOTNOTE = ("Mean [95 % confidence interval] over all cases of all seeds (bootstrap over cases, seeds resampled as a "
            "level of their own; std, median and per-seed values in the CSV and the tables below). **Bold**: best (ranked methods; `initial` = no registration / "
            "starting pose, not ranked). `*`: differs from the best (paired Wilcoxon signed-rank on cases paired by "
            "case_id, Holm-corrected p < 0.05, and the 95 % CI of the paired difference excludes 0). Rank score: Learn2Reg scheme (pairwise Wilcoxon rank-sum, p < 0.05, "
            "scores in [0.1, 1], geometric mean over metrics). TRE, HD95 in mm; runtime is the registration call alone.")


POSE_FOOTNOTE = ("2D/3D tables: mTRE percentiles over all cases; success = share of cases with mTRE < 10 mm "
                 "(< 2 mm); pTRE (projected error on the detector), rotation and translation errors and runtime are "
                 "means over cases; `initial` is the starting pose. `*` on the mTRE columns: the paired test on mTRE.")


STAT_NAMES = ("mean", "ci_lo", "ci_hi", "std", "median", "robust30", "seed_std", "p_holm", "diff", "diff_lo", "diff_hi")


def flat_rows(ds: DatasetReport) -> list[dict[str, Any]]:
    out = []
    for ms in ds.methods:
        row: dict[str, Any] = {"dataset": ds.name, "kind": ds.kind, "method": ms.method, "n_cases": ms.n_cases, "n_seeds": ms.n_seeds}
        for k, st in ms.stats.items():
            for s in STAT_NAMES:
                row[f"{k}_{s}"] = st.get(s, math.nan)
            for s in registry.metric(k).table:  # the percentiles a table shows (2D/3D mTRE)
                if s not in STAT_NAMES:
                    row[f"{k}_{s}"] = st[s]
        row["rank_score"] = ms.ranks.get("rank_score", math.nan)
        row["rank_score_rt"] = ms.ranks.get("rank_score_rt", math.nan)
        for k in ds.rank_metrics + [ranking.RUNTIME_METRIC]:
            row[f"rank_{k}"] = ms.ranks.get(k, math.nan)
        out.append(row)
    return out
