"""How sure a number over seeds is: 95 % t-intervals of a mean and of a difference, and the
seeds a paired test would need to decide.

Every ± in the tables is ``half_width``: t(0.975, n − 1) · s / √n over the n seeds, the
Student-t interval of the mean (the seeds are few, so the normal's 1.96 would be too narrow:
t is 12.7 at n = 2, 3.2 at n = 4). A difference between two sets of runs is ``paired`` where
they share seeds (the same data order and initial weights, ``decoupled.model``): the interval of
the mean of the per-seed differences, which leaves out what the seed moves on both sides; else
Welch's interval of the difference of two means (unequal variances).

scipy gives the t and noncentral t distributions: a well-kept library, where a hand-written
quantile function would be code to test of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from decoupled.claims import FAILS, HOLDS, UNDECIDED

LEVEL = 0.95  # of every interval in the report
POWER = 0.8  # of the seeds-needed count: the chance that that many seeds decide
MAX_SEEDS = 10_000  # beyond it, the seeds needed are reported as more than this


def half_width(values) -> float:
    """The 95 % t-interval's half-width of the mean of ``values`` (NaN skipped; NaN for fewer
    than two)."""
    x = _finite(values)
    if len(x) < 2:
        return math.nan
    return float(stats.t.ppf(0.5 + LEVEL / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


@dataclass(frozen=True)
class Difference:
    """a − b with its 95 % interval (NaN bounds where there is none: one run on a side)."""

    estimate: float
    low: float
    high: float
    paired: bool
    n: int  # pairs (paired), else the runs of both sides
    spread: float  # the standard deviation of one seed's difference (paired: of the differences)


def difference(a: dict[int, float], b: dict[int, float]) -> Difference:
    """a − b from the runs of two sides, each by seed: paired over the seeds both have when they
    share at least two, else Welch's interval over all of them."""
    shared = sorted(set(a) & set(b))
    if len(shared) >= 2:
        d = np.array([a[s] - b[s] for s in shared], dtype=float)
        mean, half = float(d.mean()), half_width(d)
        if half == 0:  # every seed the same difference (a coarse test set): no spread measured, no interval
            return Difference(mean, math.nan, math.nan, True, len(d), 0.0)
        return Difference(mean, mean - half, mean + half, True, len(d), float(d.std(ddof=1)))
    x, y = _finite(list(a.values())), _finite(list(b.values()))
    mean = float(x.mean() - y.mean()) if len(x) and len(y) else math.nan
    if len(x) < 2 or len(y) < 2:
        return Difference(mean, math.nan, math.nan, False, len(x) + len(y), math.nan)
    va, vb = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    if va + vb == 0:  # as above: identical runs on each side measure no spread
        return Difference(mean, math.nan, math.nan, False, len(x) + len(y), 0.0)
    df = (va + vb) ** 2 / (va**2 / (len(x) - 1) + vb**2 / (len(y) - 1))  # Welch-Satterthwaite
    half = float(stats.t.ppf(0.5 + LEVEL / 2, df) * math.sqrt(va + vb))
    # one seed's difference, were the two runs independent: what a paired test would see at worst
    spread = float(math.sqrt(x.var(ddof=1) + y.var(ddof=1)))
    return Difference(mean, mean - half, mean + half, False, len(x) + len(y), spread)




def verdict(diff: Difference, threshold: float) -> str:
    """holds: the interval of a − b lies above ``threshold``; fails: below it; undecided: it
    contains it, or there is no interval (NaN bounds compare false both ways)."""
    if diff.low > threshold:
        return HOLDS
    if diff.high < threshold:
        return FAILS
    return UNDECIDED


def seeds_needed(gap: float, spread: float) -> int | None:
    """The fewest seeds (≥ 2) with which a paired t-test, its 95 % interval of the mean
    difference excluding the threshold, decides with probability ``POWER`` when the true
    difference lies ``gap`` from the threshold and one seed's difference has standard deviation
    ``spread``: the power is 1 − F(t(0.975, n − 1); n − 1, gap · √n / spread), F the noncentral
    t's distribution function. None: no number does (a gap of 0, or more than ``MAX_SEEDS``);
    no spread measured (one seed, or seeds that all gave the same difference): None too."""
    gap = abs(gap)
    if not (gap > 0 and spread > 0):  # NaN fails both comparisons
        return None

    def decides(n: int) -> bool:
        critical = stats.t.ppf(0.5 + LEVEL / 2, n - 1)
        return stats.nct.sf(critical, n - 1, gap * math.sqrt(n) / spread) >= POWER

    if not decides(MAX_SEEDS):
        return None
    low, high = 1, MAX_SEEDS  # the power grows with n: bisect for the first n that decides
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if decides(middle) else (middle, high)
    return high


def _finite(values) -> np.ndarray:
    x = np.asarray(list(values), dtype=float)
    return x[~np.isnan(x)]
