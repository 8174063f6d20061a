"""The metric registry: every per-case metric of the suite, declared once.

One :class:`Metric` per key says what the rest of the suite needs to know: its table title
and unit, whether higher is better, the digits a table shows, the task family it belongs to
(``"deformable"``, ``"pose"`` or ``"both"``, e.g. runtime), whether it is a ``cases.csv``
column, which statistics the leaderboard's main table shows, and, where the computation is
generic, how it is computed per case (``compute``).

Who reads it: the metric engines (:func:`benchmark.core.metrics.deformable_metrics`,
:func:`benchmark.core.metrics_pose.pose_metrics`) call ``compute`` of every registered
metric of their family that has one; the systems' test step copies every column of the
family into the case record; :mod:`benchmark.core.results` takes the ``cases.csv`` columns
from here; :mod:`leaderboard.ranking` and :mod:`leaderboard.table` the orientation, titles,
digits and table columns; ``regbench evaluate`` the rows of its text table. So adding a
metric is one entry here, its function, and a test (docs/design.md, "Adding a metric").

This module imports nothing but the standard library (the leaderboard and the CLI read it
without torch).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping

__all__ = [
    "TASKS",
    "Metric",
    "METRICS",
    "register",
    "metric",
    "metrics_of",
    "metric_columns",
    "table_metrics",
    "paired_metrics",
    "evaluate_rows",
    "legacy_task",
    "below",
]

#: The task families a data module declares (``task`` class attribute).
TASKS = ("deformable", "pose")


@dataclasses.dataclass(frozen=True)
class Metric:
    """One per-case metric.

    Attributes:
        key: the name in case records, ``cases.csv`` and ``regbench evaluate``'s JSON.
        title: table title, unit included (``"HD95 mm"``).
        higher_is_better: orientation (rank scores, best value, worst 30 %).
        digits: decimals in tables.
        family: ``"deformable"``, ``"pose"`` or ``"both"`` (every task: runtime, memory).
        unit: the unit at the end of ``title`` (``""`` when none); percentile columns put
            the statistic before it (``"mTRE p50 mm"``).
        column: a ``cases.csv`` column (``False``: derived at ranking time, e.g. robust Dice).
        table: statistics of the leaderboard's main table (``()``: not in it). The deformable
            table shows the mean with its confidence interval; the 2D/3D table shows each
            statistic named here (``"mean"``, ``"p50"``, ``"p75"``, ``"p95"``).
        table_order: the main table sorts its columns by this (stable: registry order among
            equals, the family's own metrics before the ``"both"`` ones).
        paired: position in the leaderboard's paired-difference table (``None``: not in it).
        label: the row title in ``regbench evaluate``'s text table (``None``: not shown).
        compute: ``compute(case) -> float | None``, where the computation is generic: the
            function, or its dotted path (``"benchmark.core.metrics.max_disp_vox"``, imported
            when first used, so this module stays light); the engine of the family calls it
            with its per-case inputs (deformable:
            :class:`benchmark.core.metrics.DeformableCase`; 2D/3D:
            :class:`benchmark.core.metrics_pose.PoseCase`), whose ``values`` hold the metrics
            computed so far. ``None``: the engine computes it itself (shared intermediate
            results, per-label values) or the test loop does (runtime, memory).
    """

    key: str
    title: str
    higher_is_better: bool
    digits: int = 3
    family: str = "deformable"
    unit: str = ""
    column: bool = True
    table: tuple[str, ...] = ("mean",)
    table_order: int = 100
    paired: int | None = None
    label: str | None = None
    compute: Callable[[Any], float | None] | str | None = None

    def compute_fn(self) -> Callable[[Any], float | None]:
        """``compute`` as a function (a dotted path is imported here)."""
        if isinstance(self.compute, str):
            from benchmark.core.classpath import import_object

            return import_object(self.compute)
        if self.compute is None:
            raise ValueError(f"metric {self.key!r} has no compute function (its engine computes it)")
        return self.compute

    def column_title(self, stat: str = "mean") -> str:
        """Title of a table column showing ``stat`` of this metric (``"mTRE p50 mm"``)."""
        if stat == "mean":
            return self.title
        base = self.title[: -len(self.unit)].rstrip() if self.unit and self.title.endswith(self.unit) else self.title
        return f"{base} {stat}" + (f" {self.unit}" if self.unit else "")


def below(key: str, limit: float) -> Callable[[Any], float]:
    """``compute`` of a success flag: 1.0 when ``case.values[key] < limit``, NaN without a value."""

    def flag(case: Any) -> float:
        v = case.values.get(key)
        return math.nan if v is None or not math.isfinite(v) else float(v < limit)

    flag.__name__ = f"{key}_below_{limit:g}"
    return flag


def _registry(*items: Metric) -> dict[str, Metric]:
    return {m.key: m for m in items}


#: Every metric, in ``cases.csv`` column order within a family.
METRICS: dict[str, Metric] = _registry(
    # ---- deformable (benchmark.core.metrics.deformable_metrics)
    Metric("dice", "Dice", True, 3, paired=0, label="Dice (mean)"),
    Metric("dice_robust30", "Dice30 (robust)", True, 3, column=False, table=()),
    Metric("hd95", "HD95 mm", False, 2, unit="mm", paired=3, label="HD95 (mm)"),
    Metric("tre", "TRE mm", False, 2, unit="mm", paired=2, label="TRE (mm)"),
    Metric("epe_mm", "EPE mm", False, 2, unit="mm", paired=1),
    Metric("epe_p90_mm", "EPE p90 mm", False, 2, unit="mm", table=()),
    Metric("fold_pct", "fold %", False, 4, unit="%", label="fold %"),
    Metric("sdlogj", "SDlogJ", False, 4, label="SDlogJ"),
    Metric("sdlogj_l2r", "SDlogJ (Learn2Reg)", False, 4, table=(), label="SDlogJ (Learn2Reg)"),
    Metric("ndv_pct", "NDV %", False, 4, unit="%", label="NDV %"),
    # ---- 2D/3D (benchmark.core.metrics_pose.pose_metrics)
    Metric("mtre_mm", "mTRE mm", False, 2, family="pose", unit="mm", table=("p50", "p75", "p95"), table_order=0,
           paired=4),
    Metric("ptre_mm", "pTRE mm", False, 2, family="pose", unit="mm"),
    Metric("rot_err_deg", "rot. err deg", False, 2, family="pose", unit="deg"),
    Metric("trans_err_mm", "trans. err mm", False, 2, family="pose", unit="mm"),
    Metric("success_10mm", "success <10 mm", True, 3, family="pose", table_order=1, compute=below("mtre_mm", 10.0)),
    Metric("success_2mm", "success <2 mm", True, 3, family="pose", table_order=1, compute=below("mtre_mm", 2.0)),
    # ---- every task (the test loop: benchmark.core.timing.timed_call)
    Metric("runtime_s", "runtime s", False, 3, family="both", unit="s"),
    Metric("peak_mem_mb", "peak memory MB", False, 0, family="both", unit="MB", table=()),
)


def register(m: Metric, registry: dict[str, Metric] | None = None) -> Metric:
    """Add (or replace) a metric; it joins the end of its family's columns."""
    (METRICS if registry is None else registry)[m.key] = m
    return m


def metric(key: str) -> Metric:
    """The registered metric ``key``; an unknown key gets a neutral entry (higher is better,
    3 digits, its key as title), so a table can still show an extra column."""
    m = METRICS.get(key)
    return m if m is not None else Metric(key, key, True, 3, family="both", column=False, table=())


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; a data module declares one of {', '.join(TASKS)}")


def metrics_of(task: str, *, computed: bool | None = None) -> list[Metric]:
    """The metrics of a task: its own family in registry order, then the ``"both"`` ones.
    ``computed=True`` keeps those with a ``compute`` function only."""
    _check_task(task)
    own = [m for m in METRICS.values() if m.family == task]
    both = [m for m in METRICS.values() if m.family == "both"]
    out = own + both
    if computed is not None:
        out = [m for m in out if (m.compute is not None) == computed]
    return out


def metric_columns(task: str) -> list[str]:
    """The metric columns of ``cases.csv`` for a task (runtime and memory last)."""
    return [m.key for m in metrics_of(task) if m.column]


def table_metrics(task: str) -> list[str]:
    """Metrics of the leaderboard's tables (and its per-method statistics), in column order
    of ``cases.csv``."""
    return [m.key for m in metrics_of(task) if m.table]


def paired_metrics(task: str | None = None) -> list[str]:
    """Metrics of the paired-difference table, in its order (every task when ``None``)."""
    pool = METRICS.values() if task is None else metrics_of(task)
    return [m.key for m in sorted((m for m in pool if m.paired is not None), key=lambda m: m.paired)]


def evaluate_rows(task: str = "deformable") -> list[Metric]:
    """The metrics of ``regbench evaluate``'s text table, in registry order."""
    return [m for m in metrics_of(task) if m.label is not None]


def legacy_task(records: Iterable[Mapping[str, Any]]) -> str:
    """The task of results saved before data modules declared it (a ``run.json`` without
    ``task``): ``"pose"`` when a record carries a metric column of the 2D/3D family only,
    else ``"deformable"``. New results take the data module's declared ``task``."""
    pose_only = set(metric_columns("pose")) - set(metric_columns("deformable"))
    return "pose" if any(pose_only & set(r) for r in records) else "deformable"
