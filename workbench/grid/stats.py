"""Paired A/B statistics between values of a grid axis.

Why paired: cells that differ only in the compared axis share prompt, seed (hence initial noise) and
every other setting, so `d = score_B - score_A` cancels most of the seed and prompt noise.

Why the prompt is the unit: seeds of one prompt are correlated (same content), so counting every
image as independent overstates n. Differences are averaged over the seeds of each prompt first
(`d_p`), and the bootstrap and the Wilcoxon test run on the `d_p`. When a grid has a single prompt,
its seeds are the only independent samples and become the unit (reported as `unit="seed"`).

Numbers follow SciPy: BCa bootstrap (`scipy.stats.bootstrap`), Wilcoxon signed-rank
(`scipy.stats.wilcoxon`, zero_method="pratt": zero differences count for ranking but not for the
sign), Friedman test for rankings of more than two values.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Hashable, Sequence

import numpy as np

DEFAULT_RESAMPLES = 9999
DEFAULT_CONFIDENCE = 0.95
SIGNIFICANCE = 0.05  # the level the report's "can this test say anything" rule is taken at


def wilcoxon_min_p(n: int) -> float:
    """The smallest two-sided p the exact Wilcoxon signed-rank test can give with `n` non-zero
    paired differences: every difference of one sign has probability 1/2^n under "no difference",
    doubled for two sides, so p >= 2/2^n (0.25 with 3 units; below 0.05 only from 6 units)."""
    return min(1.0, 2.0 / 2.0 ** n) if n > 0 else 1.0


def friedman_min_p(k: int, n: int) -> float:
    """The smallest p an exact Friedman test of `k` values over `n` units can give: all units
    ranking the values the same way, one of k! orders, has probability (1/k!)^(n-1)."""
    return (1.0 / math.factorial(k)) ** (n - 1) if k > 1 and n > 0 else 1.0


def can_be_significant(min_p: float, level: float = SIGNIFICANCE) -> bool:
    """Whether a test whose smallest possible p is `min_p` can reach `level` at all."""
    return min_p <= level


def evidence(n_units: int, ci_low: float | None, ci_high: float | None,
             level: float = SIGNIFICANCE) -> str:
    """How much a paired comparison says, in one word for the report's verdict:
    "none" (fewer than 2 units: no interval), "unclear" (the interval holds zero), "weak" (the
    interval leaves out zero, but with so few units that the signed-rank test could not reach
    `level` whatever the data), "clear" (the interval leaves out zero with enough units)."""
    if n_units < 2 or ci_low is None or ci_high is None:
        return "none"
    if ci_low <= 0.0 <= ci_high:
        return "unclear"
    return "clear" if can_be_significant(wilcoxon_min_p(n_units), level) else "weak"


def shown_better(pair: dict) -> bool:
    """Whether a paired comparison (PairedStats.to_dict) shows B better than A: a positive mean
    difference whose interval leaves out zero. What a choice must pass on its held-out check, or
    pick and merge_search warn that it is within noise (grid/pick_report.py,
    kinds/merge_search.py)."""
    level = evidence(pair["n_units"], pair["ci_low"], pair["ci_high"])
    return level in ("weak", "clear") and pair["mean_diff"] > 0


@dataclass(frozen=True)
class PairedStats:
    """B against A on one metric; positive `mean_diff` means B scored higher."""

    metric: str
    a: str
    b: str
    n_pairs: int
    n_units: int
    unit: str                 # what was resampled: "prompt" or "seed"
    mean_a: float
    mean_b: float
    mean_diff: float          # mean over units of the per-unit mean difference (B - A)
    ci_low: float | None      # bootstrap CI of mean_diff (None with fewer than 2 units)
    ci_high: float | None
    ci_method: str            # "BCa", "percentile" (BCa undefined) or "none"
    confidence: float
    win_rate: float           # share of pairs where B > A; ties count 1/2
    wins: int
    ties: int
    losses: int
    wilcoxon_p: float | None  # two-sided; None with fewer than 2 units; 1.0 when all d_p are 0
    wilcoxon_min_p: float = 1.0  # the smallest p the exact test can give with n_units (2/2^n)

    def to_dict(self) -> dict:
        return asdict(self)


def unit_means(diffs: Sequence[float], units: Sequence[Hashable]) -> tuple[list[Hashable], np.ndarray]:
    """Per-unit mean of the differences, units in first-seen order."""
    order: list[Hashable] = []
    sums: dict[Hashable, list[float]] = {}
    for d, u in zip(diffs, units):
        if u not in sums:
            order.append(u)
            sums[u] = []
        sums[u].append(float(d))
    return order, np.array([np.mean(sums[u]) for u in order], dtype=np.float64)


def bootstrap_ci(values: np.ndarray, confidence: float = DEFAULT_CONFIDENCE,
                 n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0
                 ) -> tuple[float | None, float | None, str]:
    """(low, high, method) of the mean of `values` by SciPy's BCa bootstrap.

    Constant data has a zero-width interval (BCa is undefined there); when BCa still comes out
    undefined (very few units) the percentile interval from the same resamples is used.
    """
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return None, None, "none"
    if np.ptp(values) == 0:
        v = float(values[0])
        return v, v, "constant"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.bootstrap((values,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                              method="BCa", rng=np.random.default_rng(seed))
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if math.isfinite(low) and math.isfinite(high):
            return low, high, "BCa"
        res = stats.bootstrap((values,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                              method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high), "percentile"


def wilcoxon_p(values: np.ndarray) -> float | None:
    """Two-sided Wilcoxon signed-rank p-value of `values` (paired differences) against 0."""
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return None
    if not np.any(values):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(stats.wilcoxon(values, zero_method="pratt").pvalue)


def win_counts(a: Sequence[float], b: Sequence[float], tie_eps: float = 0.0) -> tuple[int, int, int]:
    """(wins of B, ties, losses of B); |B - A| <= tie_eps is a tie."""
    wins = ties = losses = 0
    for x, y in zip(a, b):
        d = float(y) - float(x)
        if abs(d) <= tie_eps:
            ties += 1
        elif d > 0:
            wins += 1
        else:
            losses += 1
    return wins, ties, losses


def compare_pairs(a: Sequence[float], b: Sequence[float], units: Sequence[Hashable], *,
                  metric: str = "score", a_name: str = "A", b_name: str = "B",
                  unit: str = "prompt", confidence: float = DEFAULT_CONFIDENCE,
                  n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                  tie_eps: float = 0.0) -> PairedStats:
    """Paired statistics of B against A; `a[i]`, `b[i]` are one pair, `units[i]` its prompt.

    With a single unit the pairs themselves become the units (`unit` is then "seed").
    """
    if not (len(a) == len(b) == len(units)) or not a:
        raise ValueError("compare_pairs needs equally long, non-empty a, b and units")
    diffs = [float(y) - float(x) for x, y in zip(a, b)]
    if len(set(units)) < 2 and len(diffs) > 1:
        units, unit = list(range(len(diffs))), "seed"
    _, d_u = unit_means(diffs, units)
    low, high, how = bootstrap_ci(d_u, confidence, n_resamples, seed)
    wins, ties, losses = win_counts(a, b, tie_eps)
    return PairedStats(
        metric=metric, a=a_name, b=b_name, n_pairs=len(diffs), n_units=int(d_u.size), unit=unit,
        mean_a=float(np.mean(a)), mean_b=float(np.mean(b)), mean_diff=float(np.mean(d_u)),
        ci_low=low, ci_high=high, ci_method=how, confidence=confidence,
        win_rate=(wins + 0.5 * ties) / len(diffs), wins=wins, ties=ties, losses=losses,
        wilcoxon_p=wilcoxon_p(d_u), wilcoxon_min_p=wilcoxon_min_p(int(d_u.size)))


@dataclass(frozen=True)
class RankRow:
    value: str
    mean: float
    mean_rank: float   # 1 = best, averaged over units (ties share the average rank)
    rank: int          # position in the ranking


@dataclass(frozen=True)
class Ranking:
    metric: str
    rows: list[RankRow]
    n_units: int
    unit: str
    friedman_p: float | None  # None with fewer than 3 values or 2 units
    friedman_min_p: float = 1.0  # the smallest p the exact test can give (friedman_min_p)

    def to_dict(self) -> dict:
        return {"metric": self.metric, "n_units": self.n_units, "unit": self.unit,
                "friedman_p": self.friedman_p, "friedman_min_p": self.friedman_min_p,
                "rows": [asdict(r) for r in self.rows]}


def rank_values(table: dict[str, Sequence[float]], *, metric: str = "score",
                unit: str = "prompt") -> Ranking:
    """Rank k values by score; `table[value][j]` is the score of unit j (aligned across values).

    Within each unit the values are ranked (highest score = rank 1); the ranking orders values by
    their mean rank, then mean score. The Friedman test asks whether any value differs.
    """
    from scipy import stats

    names = list(table)
    matrix = np.array([np.asarray(table[n], dtype=np.float64) for n in names])  # k x units
    if matrix.ndim != 2 or matrix.shape[1] == 0:
        raise ValueError("rank_values needs the same, non-zero number of units for every value")
    ranks = np.apply_along_axis(lambda col: stats.rankdata(-col), 0, matrix)
    mean_rank, mean = ranks.mean(axis=1), matrix.mean(axis=1)
    order = sorted(range(len(names)), key=lambda i: (mean_rank[i], -mean[i]))
    rows = [RankRow(names[i], float(mean[i]), float(mean_rank[i]), pos + 1)
            for pos, i in enumerate(order)]
    p = None
    if len(names) >= 3 and matrix.shape[1] >= 2:
        if np.ptp(matrix, axis=0).any():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p = float(stats.friedmanchisquare(*matrix).pvalue)
        else:
            p = 1.0
    return Ranking(metric, rows, int(matrix.shape[1]), unit, p,
                   friedman_min_p(len(names), int(matrix.shape[1])))
