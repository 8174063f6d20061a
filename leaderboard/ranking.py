"""Learn2Reg rank scores: pairwise rank-sum tests → rank score in [0.1, 1] → geometric mean.

The scheme, as the Learn2Reg challenge ranks methods (Hering et al., IEEE TMI 2022, and the
challenge's ranking script), for one dataset:

1. **Per metric**, each method has one sample of per-case values (a case's value is the
   mean over the method's seeds). Let ``N`` be the number of ranked methods and ``A`` those
   with at least one finite value. For ``i != j`` in ``A``, *i beats j* when the two-sided
   Wilcoxon rank-sum test of ``s·x_i`` against ``s·x_j`` gives a statistic > 0 and
   ``p < 0.05`` (``s = +1`` when higher is better, ``-1`` otherwise). ``w_i`` = number of
   methods that ``i`` beats.
2. **Rank score**: order the methods by ``w`` ascending, the methods outside ``A`` (no
   value for this metric) first. Position ``k = 0 .. N-1`` in that order is worth
   ``0.1 + 0.9 · k / (N - 1)`` (``numpy.linspace(0.1, 1, N)``); methods with the same ``w``
   share the mean of the values of the positions they occupy (ties averaged, so the result
   does not depend on how ties are ordered). A method outside ``A`` gets the lowest score,
   0.1, as Learn2Reg gives to a method that did not submit a metric. With ``N = 1`` the
   lone method scores 1.0 (Learn2Reg's ``linspace`` would give 0.1; nothing beats it).
3. **Rank score of the dataset**: the geometric mean ``exp(mean(log score_m))`` over the
   metrics that at least one method has (a metric absent for every method, e.g. TRE on
   data without landmarks, is left out). Computed twice: over the accuracy/plausibility
   metrics, and with runtime added (``rank_score_rt``).

Test choice: ``scipy.stats.ranksums`` (normal approximation of the rank-sum statistic, no
tie or continuity correction), which is what Learn2Reg's ranking code calls, so the scores
reproduce theirs. ``mannwhitneyu`` would add a tie correction and exact small-sample
p-values; it tests the same hypothesis and is more powerful with many ties (e.g. binary
success), but would not give Learn2Reg's numbers.

Orientation (higher or lower is better) comes from the metric registry
(:mod:`benchmark.core.registry`). Metrics by dataset kind (:data:`RANK_METRICS`; ``a|b`` =
the first of ``a``, ``b`` that the dataset has): deformable — Dice, robust Dice
(``dice_robust30``), HD95, SDlogJ (else NDV), TRE; 2D/3D ("pose") — mTRE and success
(< 10 mm); both add ``runtime_s`` for the ``_rt`` score.

Robust Dice (``dice_robust30``, Learn2Reg's "DSC30"): the (case, label) pairs whose Dice
*before* registration (the ``initial`` row) is among the lowest 30 % are fixed once per
dataset; each method's sample is its Dice on exactly those pairs. When a method lacks
per-label Dice, all work on cases (the 30 % of cases with the lowest initial Dice); without
an ``initial`` row each method's own worst 30 % of cases enter.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from scipy import stats as _st

from benchmark.core import registry
from benchmark.core.metrics import worst_count

__all__ = [
    "RANK_METRICS",
    "RUNTIME_METRIC",
    "resolve_metrics",
    "pairwise_wins",
    "rank_scores_from_wins",
    "rank_scores",
    "geometric_mean",
    "robust_dice_samples",
    "rank_dataset",
]

ALPHA = 0.05


#: Metrics of the rank score per dataset kind; ``a|b`` takes the first the dataset has.
RANK_METRICS: dict[str, list[str]] = {
    "deformable": ["dice", "dice_robust30", "hd95", "sdlogj|ndv_pct", "tre"],
    "pose": ["mtre_mm", "success_10mm"],
}
RUNTIME_METRIC = "runtime_s"


def resolve_metrics(spec: Sequence[str], available: set[str]) -> list[str]:
    """Pick the metrics of ``spec`` the dataset has (``a|b`` → the first available)."""
    out = []
    for item in spec:
        for key in item.split("|"):
            key = key.strip()
            if key in available and key not in out:
                out.append(key)
                break
    return out


def _clean(x: Sequence[float] | None) -> np.ndarray:
    a = np.asarray([] if x is None else x, dtype=np.float64).reshape(-1)
    return a[np.isfinite(a)]


def pairwise_wins(samples: Mapping[str, Sequence[float] | None], higher_is_better: bool, alpha: float = ALPHA) -> tuple[dict[str, int | None], np.ndarray]:
    """Count, for each method, the methods it beats (rank-sum test, p < alpha).

    Args:
        samples: method → per-case values (NaN ignored); None or no finite value = missing.
        higher_is_better: orientation of the metric.

    Returns:
        ``(wins, better)``: ``wins[m]`` is the number of methods ``m`` beats, None when
        ``m`` has no value; ``better[i, j] = 1`` when method i (in ``samples`` order) beats j.
    """
    names = list(samples)
    clean = {m: _clean(samples[m]) for m in names}
    sign = 1.0 if higher_is_better else -1.0
    n = len(names)
    better = np.zeros((n, n), dtype=np.int64)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i == j or clean[a].size == 0 or clean[b].size == 0:
                continue
            stat, p = _st.ranksums(sign * clean[a], sign * clean[b])
            if np.isfinite(stat) and np.isfinite(p) and stat > 0 and p < alpha:
                better[i, j] = 1
    wins: dict[str, int | None] = {}
    for i, m in enumerate(names):
        wins[m] = int(better[i].sum()) if clean[m].size else None
    return wins, better


def rank_scores_from_wins(wins: Mapping[str, int | None]) -> dict[str, float]:
    """Map win counts to rank scores in [0.1, 1] (see the module docstring, step 2).

    ``None`` (no value for the metric) → 0.1, placed below every method with a value.
    """
    names = list(wins)
    n = len(names)
    if n == 0:
        return {}
    if n == 1:
        return {names[0]: 1.0 if wins[names[0]] is not None else 0.1}
    scale = np.linspace(0.1, 1.0, n)
    key = {m: (-1 if wins[m] is None else int(wins[m])) for m in names}
    order = sorted(names, key=lambda m: key[m])
    pos = {m: k for k, m in enumerate(order)}
    out: dict[str, float] = {}
    for m in names:
        if wins[m] is None:
            out[m] = 0.1
            continue
        tied = [pos[o] for o in names if key[o] == key[m]]
        out[m] = float(np.mean(scale[tied]))
    return out


def rank_scores(samples: Mapping[str, Sequence[float] | None], higher_is_better: bool, alpha: float = ALPHA) -> dict[str, float]:
    """Rank score of each method on one metric: :func:`pairwise_wins` then :func:`rank_scores_from_wins`."""
    wins, _ = pairwise_wins(samples, higher_is_better, alpha)
    return rank_scores_from_wins(wins)


def geometric_mean(values: Sequence[float]) -> float:
    """``exp(mean(log v))`` over the finite positive values; NaN when there is none."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v) & (v > 0)]
    return float(np.exp(np.log(v).mean())) if v.size else math.nan


def robust_dice_samples(
    dice_by_method: Mapping[str, Mapping[str, float]],
    per_label_by_method: Mapping[str, Mapping[str, Mapping[str, float]]],
    initial: str | None = "initial",
    fraction: float = 0.3,
) -> dict[str, np.ndarray]:
    """Per-method samples of Learn2Reg's robust Dice (the 30 % hardest pairs before registration).

    Args:
        dice_by_method: method → case_id → case Dice (mean over seeds).
        per_label_by_method: method → case_id → label → Dice (may be empty).
        initial: the name of the no-registration row; its Dice picks the hardest pairs.

    Returns:
        method → values on the selected (case, label) pairs (or cases), NaN where the method
        lacks the pair; ``initial`` itself is included when present.
    """
    methods = list(dice_by_method)
    init_pl = per_label_by_method.get(initial or "", {}) if initial else {}
    with_dice = [m for m in methods if any(np.isfinite(v) for v in dice_by_method[m].values())]
    every_has_labels = all(any(per_label_by_method.get(m, {}).values()) for m in with_dice)
    if initial in dice_by_method and init_pl and every_has_labels:
        keys = [(c, lab) for c, labs in init_pl.items() for lab, v in labs.items() if v is not None and np.isfinite(v)]
        vals = np.asarray([init_pl[c][lab] for c, lab in keys], dtype=np.float64)
        k = worst_count(len(keys), fraction)
        sel = [keys[i] for i in np.argsort(vals, kind="stable")[:k]]
        out = {}
        for m in methods:
            pl = per_label_by_method.get(m, {})
            out[m] = np.asarray([pl.get(c, {}).get(lab, math.nan) for c, lab in sel], dtype=np.float64)
        return out
    if initial in dice_by_method:
        init = {c: v for c, v in dice_by_method[initial].items() if np.isfinite(v)}
        cases = sorted(init, key=lambda c: (init[c], c))
        sel = cases[: worst_count(len(cases), fraction)]
        return {m: np.asarray([dice_by_method[m].get(c, math.nan) for c in sel], dtype=np.float64) for m in methods}
    out = {}
    for m in methods:
        v = np.sort(_clean(list(dice_by_method[m].values())))
        out[m] = v[: worst_count(v.size, fraction)]
    return out


def rank_dataset(
    case_values: Mapping[str, Mapping[str, Mapping[str, float]]],
    metrics: Sequence[str],
    methods: Sequence[str],
    per_label: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
    initial: str | None = "initial",
    alpha: float = ALPHA,
) -> dict[str, dict[str, float]]:
    """Rank scores of ``methods`` on one dataset.

    Args:
        case_values: metric → method → case_id → value (mean over seeds). Must hold
            ``dice`` (and the ``initial`` row's, when present) for ``dice_robust30``.
        metrics: resolved metric keys (see :func:`resolve_metrics`), runtime excluded.
        methods: the methods ranked (usually all but ``initial``).
        per_label: method → case_id → label → Dice, for ``dice_robust30``.

    Returns:
        method → ``{"<metric>": score, ..., "runtime_s": score, "rank_score": geo-mean
        without runtime, "rank_score_rt": with runtime}``.
    """
    out: dict[str, dict[str, float]] = {m: {} for m in methods}
    used: list[str] = []
    for key in list(metrics) + [RUNTIME_METRIC]:
        if key == "dice_robust30":
            dice = case_values.get("dice", {})
            pool = {m: dice.get(m, {}) for m in list(methods) + ([initial] if initial in dice else [])}
            rob = robust_dice_samples(pool, per_label or {}, initial=initial)
            samples = {m: rob.get(m) for m in methods}
            hib = True
        else:
            vals = case_values.get(key, {})
            samples = {m: list(vals.get(m, {}).values()) for m in methods}
            hib = registry.metric(key).higher_is_better
        if not any(_clean(s).size for s in samples.values()):
            continue
        scores = rank_scores(samples, hib, alpha)
        for m in methods:
            out[m][key] = scores[m]
        if key != RUNTIME_METRIC:
            used.append(key)
    for m in methods:
        out[m]["rank_score"] = geometric_mean([out[m][k] for k in used]) if used else math.nan
        with_rt = used + ([RUNTIME_METRIC] if RUNTIME_METRIC in out[m] else [])
        out[m]["rank_score_rt"] = geometric_mean([out[m][k] for k in with_rt]) if with_rt else math.nan
    return out
