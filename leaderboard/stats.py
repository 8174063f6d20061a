"""Statistics of the leaderboard: Holm correction, paired tests against the best, robustness.

Everything here works on plain per-case arrays (NumPy, float64); which values enter is
decided by :mod:`leaderboard.ranking` and :mod:`leaderboard.table`.
"""

from __future__ import annotations

import math
import warnings
from typing import Mapping, Sequence

import numpy as np
from scipy import stats as _st

__all__ = ["holm", "paired_wilcoxon", "worst_fraction_mean", "pooled_stats", "seed_std", "percentiles"]


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm–Bonferroni step-down adjusted p-values (family-wise error control).

    With the ``m`` finite p-values sorted ascending, ``p_(1) <= ... <= p_(m)``, the adjusted
    value of the k-th smallest (1-based) is

        ``p~_(k) = min(1, max_{j <= k} (m - j + 1) * p_(j))``

    (the running maximum keeps the adjusted values in the order of the raw ones), returned
    in the input order. NaN entries (a test that could not be run) stay NaN and do not count
    in ``m``. A hypothesis is rejected at level alpha when its adjusted p-value < alpha.

    Args:
        pvalues: raw p-values, any length.

    Returns:
        adjusted p-values, float64 array of the same length.
    """
    p = np.asarray(pvalues, dtype=np.float64).reshape(-1)
    out = np.full(p.shape, math.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    factors = m - np.arange(m)  # m, m-1, ..., 1
    adj = np.minimum(1.0, np.maximum.accumulate(factors * p[order]))
    out[order] = adj
    return out


def paired_wilcoxon(a: Sequence[float], b: Sequence[float]) -> tuple[float, int]:
    """Two-sided Wilcoxon signed-rank test of paired samples ``a`` and ``b``.

    Pairs where either value is NaN are dropped. Zero differences are dropped (Wilcoxon's
    original rule, scipy's ``zero_method="wilcox"``); when every difference is zero the
    samples are identical and p = 1. ``scipy.stats.wilcoxon`` chooses the exact null
    distribution for small samples without ties and the normal approximation otherwise.

    Returns:
        ``(p_value, n_pairs)``; p is NaN when fewer than 2 pairs remain (nothing to test).
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = int(x.size)
    if n < 2:
        return math.nan, n
    d = x - y
    if np.all(d == 0):
        return 1.0, n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = _st.wilcoxon(x, y, zero_method="wilcox", alternative="two-sided")
    p = float(res.pvalue)
    return (p if math.isfinite(p) else math.nan), n


def worst_fraction_mean(values: Sequence[float], higher_is_better: bool, fraction: float = 0.3) -> float:
    """Mean of the worst ``fraction`` of the finite values (Learn2Reg's robustness value):
    :func:`benchmark.core.metrics.worst_fraction_mean`, the suite's one definition (``ceil``)."""
    from benchmark.core.metrics import worst_fraction_mean as _wfm

    return _wfm(values, higher_is_better, fraction)


def pooled_stats(values: Sequence[float]) -> dict[str, float]:
    """``mean``, ``std`` (population, ddof=0), ``median`` and ``n`` of the finite values."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": math.nan, "std": math.nan, "median": math.nan, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=0)), "median": float(np.median(v)), "n": int(v.size)}


def seed_std(values_by_seed: Mapping[int, Sequence[float]]) -> float:
    """Standard deviation (ddof=0) of the per-seed means; NaN with fewer than 2 seeds with data."""
    means = []
    for vals in values_by_seed.values():
        v = np.asarray(vals, dtype=np.float64)
        v = v[np.isfinite(v)]
        if v.size:
            means.append(float(v.mean()))
    if len(means) < 2:
        return math.nan
    return float(np.std(means, ddof=0))


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 75, 95)) -> list[float]:
    """Percentiles (NumPy's linear interpolation) of the finite values; NaN when none."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return [math.nan] * len(qs)
    return [float(x) for x in np.percentile(v, list(qs))]


#: Bootstrap resamples behind every confidence interval of the reports.
N_BOOT = 4000


def bootstrap_mean_ci(table: np.ndarray | Sequence[Sequence[float]], level: float = 0.95, n_boot: int = N_BOOT,
                      seed: int = 0) -> tuple[float, float, float]:
    """Mean over seeds and cases with a two-level bootstrap confidence interval.

    ``table[s, c]`` is the value of seed ``s`` on case ``c`` (NaN where missing). Each
    resample draws cases with replacement (the same cases for every seed, so a hard case
    stays hard in all seeds) and, independently, seeds with replacement (the seed is kept
    as a level of its own: the spread between training runs widens the interval), and takes
    the mean of the drawn sub-table. The interval is the percentile interval of those means.
    With one seed this is the ordinary bootstrap over cases.

    Args:
        table: ``(S, N)`` values, or ``(N,)`` for one seed.
        level: coverage, e.g. 0.95.
        n_boot: resamples.
        seed: seed of the resampling (the reports are reproducible).

    Returns:
        ``(mean, low, high)``; the mean is over all finite cells; NaN triple without data;
        ``low == high == mean`` with a single finite cell.
    """
    t = np.atleast_2d(np.asarray(table, dtype=np.float64))
    finite = np.isfinite(t)
    if not finite.any():
        return math.nan, math.nan, math.nan
    keep_rows = finite.any(1)
    keep_cols = finite.any(0)
    t = t[keep_rows][:, keep_cols]
    s, n = t.shape
    mean = float(np.nanmean(t))
    if s * n == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    ci = rng.integers(0, n, size=(n_boot, n))
    si = rng.integers(0, s, size=(n_boot, s))
    sub = t[si[:, :, None], ci[:, None, :]]  # (B, S, N)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(sub.reshape(n_boot, -1), axis=1)
    means = means[np.isfinite(means)]
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return mean, float(lo), float(hi)


def paired_difference_ci(a: Sequence[float], b: Sequence[float], level: float = 0.95, n_boot: int = N_BOOT,
                         seed: int = 0) -> tuple[float, float, float]:
    """Mean of the paired differences ``a - b`` with a bootstrap interval over the pairs.

    ``a[i]`` and ``b[i]`` are the same case (each already averaged over its seeds); pairs with
    a NaN are dropped. Returns ``(mean, low, high)``, NaN without pairs.
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    return bootstrap_mean_ci((x - y)[keep], level=level, n_boot=n_boot, seed=seed)


def ci_on_one_side(diff: float, lo: float, hi: float) -> bool:
    """The interval ``[lo, hi]`` of a mean difference lies wholly on the side of ``diff``.

    The suite's rule for a claim ("better", "worse", ``*``): the Holm-corrected paired test
    *and* this. The signed-rank test ranks differences, so one large case can pull the mean
    the other way; neither alone makes the claim."""
    return bool((diff > 0 and lo > 0) or (diff < 0 and hi < 0))

