"""Paired A/B statistics equal SciPy's on known inputs; win rates and rankings by hand."""

import numpy as np
import pytest
from scipy import stats as sps

from workbench.grid import stats

# 4 prompts x 3 seeds; B is A plus a prompt-dependent shift and some noise
A = [30.1, 29.5, 31.0, 25.2, 26.0, 24.8, 28.8, 28.1, 29.9, 33.0, 32.2, 31.7]
B = [30.9, 30.1, 31.0, 25.1, 27.3, 25.5, 29.9, 28.0, 30.8, 33.5, 33.6, 32.0]
UNITS = ["p1"] * 3 + ["p2"] * 3 + ["p3"] * 3 + ["p4"] * 3


def _unit_diffs():
    d = np.array(B) - np.array(A)
    return d.reshape(4, 3).mean(axis=1)


def test_mean_ci_and_wilcoxon_equal_scipy_on_prompt_means():
    res = stats.compare_pairs(A, B, UNITS, metric="clip", a_name="v1", b_name="v2", n_resamples=2000,
                              seed=7)
    d_p = _unit_diffs()
    ref = sps.bootstrap((d_p,), np.mean, n_resamples=2000, method="BCa",
                        rng=np.random.default_rng(7)).confidence_interval
    assert res.n_pairs == 12 and res.n_units == 4 and res.unit == "prompt"
    assert res.mean_diff == pytest.approx(d_p.mean(), abs=1e-12)
    assert res.mean_diff == pytest.approx(np.mean(B) - np.mean(A), abs=1e-12)  # balanced design
    assert (res.ci_low, res.ci_high) == pytest.approx((ref.low, ref.high), abs=1e-12)
    assert res.ci_method == "BCa" and res.ci_low < res.mean_diff < res.ci_high
    assert res.wilcoxon_p == pytest.approx(sps.wilcoxon(d_p, zero_method="pratt").pvalue, abs=1e-12)
    assert (res.a, res.b, res.metric) == ("v1", "v2", "clip")


def test_win_rate_counts_ties_as_half():
    res = stats.compare_pairs(A, B, UNITS, n_resamples=200)
    # by hand: B - A = .8 .6 0 -.1 1.3 .7 1.1 -.1 .9 .5 1.4 .3 -> 9 wins, 1 tie, 2 losses
    assert (res.wins, res.ties, res.losses) == (9, 1, 2)
    assert res.win_rate == pytest.approx((9 + 0.5) / 12)
    loose = stats.compare_pairs(A, B, UNITS, n_resamples=200, tie_eps=0.15)
    assert (loose.wins, loose.ties, loose.losses) == (9, 3, 0)


def test_single_prompt_uses_seeds_as_units():
    a, b = [1.0, 2.0, 3.0, 4.0, 5.0], [1.5, 2.1, 3.9, 4.2, 5.8]
    res = stats.compare_pairs(a, b, ["same"] * 5, n_resamples=500, seed=1)
    d = np.array(b) - np.array(a)
    assert res.unit == "seed" and res.n_units == 5
    assert res.wilcoxon_p == pytest.approx(sps.wilcoxon(d, zero_method="pratt").pvalue)
    ref = sps.bootstrap((d,), np.mean, n_resamples=500, method="BCa",
                        rng=np.random.default_rng(1)).confidence_interval
    assert (res.ci_low, res.ci_high) == pytest.approx((ref.low, ref.high))


def test_degenerate_inputs():
    same = stats.compare_pairs([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], ["a", "b", "c"])
    assert same.mean_diff == 0 and (same.ci_low, same.ci_high) == (0, 0)
    assert same.wilcoxon_p == 1.0 and same.win_rate == 0.5 and same.ties == 3
    shifted = stats.compare_pairs([1.0, 2.0], [3.0, 4.0], ["a", "b"])
    assert (shifted.ci_low, shifted.ci_high) == (2.0, 2.0)  # constant difference
    one = stats.compare_pairs([1.0], [2.0], ["a"])
    assert one.ci_low is None and one.wilcoxon_p is None and one.win_rate == 1.0
    with pytest.raises(ValueError):
        stats.compare_pairs([1.0], [1.0, 2.0], ["a"])


def test_ranking_matches_rank_means_and_friedman():
    table = {"e4": [20.0, 22.0, 25.0, 21.0], "e8": [23.0, 24.0, 26.0, 25.0],
             "e12": [22.0, 24.5, 24.0, 26.0]}
    r = stats.rank_values(table, metric="clip")
    # per unit ranks (1 = best): e4: 3,3,2,3  e8: 1,2,1,2  e12: 2,1,3,1
    assert [row.value for row in r.rows] == ["e8", "e12", "e4"]
    assert [row.mean_rank for row in r.rows] == pytest.approx([1.5, 1.75, 2.75])
    assert r.rows[0].mean == pytest.approx(24.5) and r.rows[0].rank == 1
    assert r.friedman_p == pytest.approx(sps.friedmanchisquare(*table.values()).pvalue)
    two = stats.rank_values({"a": [1.0, 2.0], "b": [2.0, 3.0]})
    assert two.friedman_p is None and two.rows[0].value == "b"


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6, 8])
def test_smallest_wilcoxon_p_equals_scipys_exact_test(n):
    """All differences of one sign is the most extreme case: SciPy's exact p is 2/2^n."""
    d = np.arange(1, n + 1) * 0.37
    assert stats.wilcoxon_min_p(n) == pytest.approx(sps.wilcoxon(d, method="exact").pvalue)
    assert stats.can_be_significant(stats.wilcoxon_min_p(n)) == (n >= 6)


@pytest.mark.parametrize("k,n", [(3, 2), (3, 3), (4, 2)])
def test_smallest_friedman_p_by_enumerating_every_ranking(k, n):
    """Exact permutation p of the most extreme table (every unit ranks the values alike), by
    enumerating all (k!)^n tables with SciPy's Friedman statistic."""
    import itertools

    orders = list(itertools.permutations(range(k)))
    extreme = sps.friedmanchisquare(*np.array([orders[0]] * n, dtype=float).T).statistic
    count = total = 0
    for table in itertools.product(orders, repeat=n):
        stat = sps.friedmanchisquare(*np.array(table, dtype=float).T).statistic
        count += stat >= extreme - 1e-9
        total += 1
    assert stats.friedman_min_p(k, n) == pytest.approx(count / total)


def test_evidence_in_words():
    assert stats.evidence(1, None, None) == "none"
    assert stats.evidence(3, -0.5, 1.0) == "unclear"
    assert stats.evidence(3, 0.2, 1.0) == "weak"  # 2/2^3 = 0.25: the test cannot reach 0.05
    assert stats.evidence(6, 0.2, 1.0) == "clear"
    assert stats.evidence(8, -2.0, -0.1) == "clear"
    res = stats.compare_pairs(A, B, UNITS, n_resamples=200)
    assert res.wilcoxon_min_p == 2 / 2**4


def test_shown_better_is_one_rule_for_both_choosing_kinds():
    """A choice passes its held-out check only with a positive difference whose interval leaves
    out zero (grid/stats.py shown_better, used by pick and merge_search)."""
    up = stats.compare_pairs([0.1, 0.2, 0.3, 0.4], [0.3, 0.5, 0.6, 0.8], ["a", "b", "c", "d"]).to_dict()
    assert up["ci_low"] > 0 and stats.shown_better(up)
    mixed = stats.compare_pairs([0.1, 0.2, 0.3, 0.4], [0.3, 0.1, 0.5, 0.2], ["a", "b", "c", "d"]).to_dict()
    assert mixed["ci_low"] <= 0 <= mixed["ci_high"] and not stats.shown_better(mixed)
    down = stats.compare_pairs([0.3, 0.5, 0.6, 0.8], [0.1, 0.2, 0.3, 0.4], ["a", "b", "c", "d"]).to_dict()
    assert not stats.shown_better(down)
    single = stats.compare_pairs([0.1], [0.9], ["a"]).to_dict()  # one pair: no interval
    assert single["ci_low"] is None and not stats.shown_better(single)
