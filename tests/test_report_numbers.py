"""Fast checks of how the reports write numbers (grid/numbers.py) and of the style-against-
adherence scatter that pick and merge_search share (grid/pareto.py scatter_svg, drawn for a merge
search by grid/search_report.py from optuna's own trials and Pareto front)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import optuna
import pytest

from workbench.grid import pareto, report, search_report, stats
from workbench.grid.numbers import fmt, signed, ticks
from workbench.grid.report import svg_plot


# ------------------------------------------------------------------------------ the formatter


def test_small_nonzero_values_never_read_as_zero():
    for v in (0.0004, -0.0004, 0.00049, -0.0021, 0.04, -0.009, 3e-7, -5e-5):
        for text in (fmt(v), fmt(v, 1), signed(v, 1), signed(v, 3), report._fmt(v),
                     search_report._fmt(v)):
            assert re.search(r"[1-9]", text), (v, text)  # some digit other than 0 shows
            assert float(text) == pytest.approx(v, rel=0.06)
            assert text.startswith("-") == (v < 0)
    assert fmt(0.0) == fmt(-0.0) == signed(0.0, 3) == signed(-0.0, 1) == report._fmt(0.0) == "0"
    assert fmt(None) == fmt(float("nan")) == report._fmt(float("inf")) == "–"


def test_formatter_keeps_the_usual_decimals_and_significance():
    assert fmt(31.23456) == "31.235" and fmt(0.98613) == "0.986" and fmt(0.5) == "0.500"
    assert search_report._fmt(0.98613) == "0.9861"  # trials differ in the fourth decimal
    assert signed(10.34, 1) == "+10.3" and signed(0.63, 1) == "+0.63" and signed(-0.04, 1) == "-0.040"
    assert signed(0.0123, 3) == "+0.012" and signed(0.00123, 3) == "+0.0012"
    assert fmt(7) == "7" and report._fmt(12) == "12" and report._fmt("a<b") == "a&lt;b"
    # the grid verdict: an interval end of -0.04 CLIP points reads as such, not "-0.0"
    pair = stats.compare_pairs([20.0, 21.0, 22.0, 23.0], [20.2, 20.96, 25.0, 27.0],
                               ["p0", "p1", "p2", "p3"], metric="clip", n_resamples=300).to_dict()
    pair.update(ci_low=-0.04, ci_high=10.3)
    sentence = report.pair_verdict(pair, "model", "model")
    assert "interval -0.040 to +10.3" in sentence and "-0.0 " not in sentence


# ------------------------------------------------------------------------------ ticks


def test_ticks_of_a_narrow_range_are_distinct():
    values = ticks(0.98605, 0.98672)
    labels = [label for _, label in values]
    assert len(labels) >= 3 and len(set(labels)) == len(labels)
    assert all(0.98605 <= v <= 0.98672 for v, _ in values)
    assert labels == ["0.9862", "0.9864", "0.9866"]  # a step of 0.0001 would give 7 ticks
    assert all(float(lb) == pytest.approx(v) for v, lb in values)
    assert [lb for _, lb in ticks(0.0, 100.0)] == ["0", "20", "40", "60", "80", "100"]
    assert "0" in [lb for _, lb in ticks(-0.1, 0.1)]  # never "-0.00"


def _tick_labels(svg: str, axis: str) -> list[str]:
    return re.findall(rf'<text class="tick {axis}"[^>]*>([^<]*)</text>', svg)


def test_plots_label_a_narrow_axis_with_distinct_ticks():
    pts = [pareto.Candidate(f"c{i}", 0.9861 + 0.0001 * i, 30.0 + 0.001 * i) for i in range(6)]
    svg = pareto.scatter_svg(pts, pareto.pareto_front(pts), baseline=0, chosen=5, title="t")
    for axis in ("x", "y"):
        labels = _tick_labels(svg, axis)
        assert len(labels) >= 3 and len(set(labels)) == len(labels), (axis, labels)
    trace = svg_plot([("s", [str(i) for i in range(6)], [p.style for p in pts], [None] * 6)], "trace")
    labels = _tick_labels(trace, "y")
    assert len(labels) >= 3 and len(set(labels)) == len(labels), labels


# ------------------------------------------------------------------------------ the scatter


def _study(points: list[tuple[float, float]], pareto_mode: bool):
    """An optuna study holding finished trials with these (style, clip) selection means."""
    study = optuna.create_study(directions=["maximize", "maximize"] if pareto_mode else ["maximize"])
    dist = {"alpha": optuna.distributions.FloatDistribution(0.0, 1.0)}
    for i, (style, clip) in enumerate(points):
        study.add_trial(optuna.trial.create_trial(
            params={"alpha": i / len(points)}, distributions=dist,
            values=[style, clip] if pareto_mode else [style],
            user_attrs={"style": style, "clip": clip, "seconds": 1.0}))
    return study


# style in the fourth decimal, as on the tiny models; trials 1, 3, 5 and 6 form the front
POINTS = [(0.9861, 29.85), (0.9866, 29.20), (0.9862, 29.90), (0.9864, 29.95), (0.9863, 29.80),
          (0.9859, 30.40), (0.9867, 28.90), (0.9858, 30.00)]
BASELINE = {"A": {"style": 0.9858, "clip": 30.30}, "B": {"style": 0.9865, "clip": 29.00}}


def _info(study, pareto_mode: bool, margin: float) -> dict:
    trials = study.get_trials()
    threshold = max(b["clip"] for b in BASELINE.values()) - margin
    pool = study.best_trials if pareto_mode else trials
    feasible = [t for t in pool if t.user_attrs["clip"] >= threshold]
    best = max(feasible or pool, key=lambda t: t.user_attrs["style"])
    return {"best": {"trial": best.number, "params": best.params, "style": best.user_attrs["style"],
                     "clip": best.user_attrs["clip"], "meets_adherence": bool(feasible)},
            "baseline_selection": BASELINE, "adherence_threshold": threshold,
            "pareto_front": [t.number for t in study.best_trials] if pareto_mode else None}


def _dots(svg: str) -> list[str]:
    return re.findall(r'<circle class="dot[^"]*"[^>]*><title>([^<]*)</title>', svg)


@pytest.mark.parametrize("pareto_mode", [True, False])
def test_merge_search_scatter_marks_every_trial_the_front_inputs_and_best(pareto_mode):
    study = _study(POINTS, pareto_mode)
    trials = study.get_trials()
    info = _info(study, pareto_mode, margin=0.5)  # bar at 29.8: trials 1, 6 fall left of it
    svg = search_report.scatter(trials, info)
    dots = _dots(svg)
    assert len(dots) == len(POINTS) + 2  # one per trial, plus inputs A and B
    assert sorted(d.split(":")[0] for d in dots) == sorted(
        [f"trial {t.number}" for t in trials] + ["input A", "input B"])
    front_dots = re.findall(r'<circle class="dot front"[^>]*><title>(trial \d+):', svg)
    # the front drawn is optuna's own (pareto mode) or grid/pareto.py's, and they agree
    points = [pareto.Candidate(str(i), s, c) for i, (s, c) in enumerate(POINTS)]
    expected = {f"trial {i}" for i in pareto.pareto_front(points)}
    assert set(front_dots) == expected == {"trial 1", "trial 3", "trial 5", "trial 6"}
    if pareto_mode:
        assert expected == {f"trial {t.number}" for t in study.best_trials}
    # the front's line passes through its points in order of adherence
    line = re.search(r'<polyline class="front" points="([^"]+)"', svg).group(1).split()
    assert len(line) == len(expected) and [float(p.split(",")[0]) for p in line] == sorted(
        float(p.split(",")[0]) for p in line)
    # inputs as reference squares, the best ringed, the bar dashed, every front point labelled
    assert re.findall(r'<rect class="reference"[^>]*><title>(input [AB]) input', svg) == ["input A", "input B"]
    assert re.findall(r'<circle class="chosen"[^>]*><title>best (trial \d+):', svg) == [
        f"trial {info['best']['trial']}"]
    assert info["best"]["trial"] == 3  # the most stylish trial at or right of the bar (29.8)
    assert 'class="floor"' in svg and "adherence bar 29.80" in svg
    for name in expected | {"input A", "input B"}:
        assert f">{name}</text>" in svg
    assert "prompt adherence (CLIP score)" in svg and "style similarity" in svg
    labels = _tick_labels(svg, "y")
    assert len(set(labels)) == len(labels) >= 3


def test_scatter_says_where_an_off_plot_adherence_bar_lies():
    study = _study(POINTS, False)
    info = _info(study, False, margin=100)  # the tests' margin: every trial meets the bar
    svg = search_report.scatter(study.get_trials(), info)
    assert '<line class="floor"' not in svg
    assert "adherence bar -69.70 lies left of the plot: every point meets it" in svg
    assert info["best"]["trial"] == 6  # the most stylish of all


@pytest.mark.parametrize("pareto_mode", [True, False])
def test_merge_search_report_holds_the_scatter_and_its_reading(tmp_path, pareto_mode):
    study = _study(POINTS, pareto_mode)
    trials = study.get_trials()
    info = _info(study, pareto_mode, margin=0.5)
    rng = np.random.default_rng(0)
    a, best = list(rng.normal(0.986, 1e-4, 6)), list(rng.normal(0.9862, 1e-4, 6))
    comparisons = [stats.compare_pairs(a, best, [f"p{i // 2}" for i in range(6)], metric="style",
                                       a_name=k, b_name="best", unit="prompt", n_resamples=200).to_dict()
                   for k in ("A", "B")]
    info.update(run_now=len(trials), comparisons=comparisons, within_noise=True, better_input="B",
                references={"selection": 6, "held_out": 2}, seeds={"selection": [1, 2], "evaluation": [3]},
                held_out={k: {"style": 0.9861, "clip": 30.0} for k in ("best", "A", "B")})
    recipe = SimpleNamespace(name="search", space="alpha", method="weighted_sum")
    html = search_report.write_html(tmp_path, recipe, trials, ["alpha"], info, tmp_path / "grid.png",
                                    "summary").read_text(encoding="utf-8")
    assert html.count('class="plot pareto"') == 1 and html.count("<svg") == 2  # scatter and trace
    assert len(_dots(html)) == len(POINTS) + 2
    assert ("most stylish front trial" in html) == pareto_mode
    assert ("in constraint mode the adherence bar decides" in html) == (not pareto_mode)
    assert "-0.000" not in html and "+0.000" not in html and "<td>0.000</td>" not in html
