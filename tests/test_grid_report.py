"""Reports from stored cells with known scores: pairing, rankings, z pages, tables, HTML."""

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from scipy import stats as sps

from workbench.grid import report, stats
from workbench.grid.cache import CellCache
from workbench.grid.cells import expand, layout, with_keys
from workbench.kinds.grid import render_grid
from workbench.recipes.grid import GridRecipe


@pytest.fixture
def grid(tmp_path):
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"weights" * 10)
    recipe = GridRecipe.model_validate({
        "kind": "grid", "name": "epochs",
        "defaults": {"model": str(model), "steps": 2, "width": 64, "height": 64},
        "x": {"axis": "cfg", "values": [4, 6, 8]},
        "y": {"axis": "prompt", "values": ["a cat", "a dog", "a cow"]},
        "z": {"axis": "steps", "values": [2, 3]},
        "seeds": [1, 2], "output": {"dir": str(tmp_path / "out")}})
    cells = with_keys(expand(recipe))
    cache = CellCache(tmp_path / "out" / "cells")
    rng = np.random.default_rng(0)
    scores = {}
    for c in cells:
        img = SimpleNamespace(image=Image.new("RGB", (64, 64), (30 * c.index[0], 60, 90)),
                              parameters=f"{c.settings.prompt}\nSteps: 2, Seed: {c.seed}, Size: 64x64",
                              provenance={})
        cache.save(c.key, img, {})
        # cfg 6 is best, 8 a bit worse, 4 worst; per-prompt offsets and noise
        scores[c.key] = {"clip": 20 + [0, 3, 2][c.index[0]] + 2 * c.index[1] + rng.normal(0, 0.3)}
    return recipe, cells, layout(recipe), cache, scores


def test_pairs_match_on_everything_but_the_axis(grid):
    recipe, cells, lay, _, scores = grid
    res = report.compare_values(cells, lay, scores, "x", 0, 1, "clip", n_resamples=500)
    a, b, units = [], [], []
    for c in cells:
        if c.index[0] == 0:
            twin = next(o for o in cells if o.index == (1, *c.index[1:]) and o.seed == c.seed)
            a.append(scores[c.key]["clip"])
            b.append(scores[twin.key]["clip"])
            units.append(c.settings.prompt)
    ref = stats.compare_pairs(a, b, units, metric="clip", a_name="4", b_name="6", n_resamples=500)
    assert res == ref
    assert res.n_pairs == 3 * 2 * 2 and res.n_units == 3 and res.win_rate == 1.0


def test_statistics_rank_three_values(grid):
    recipe, cells, lay, _, scores = grid
    entries = report.ab_statistics(cells, lay, scores, ["clip"], n_resamples=300)
    x = next(e for e in entries if e["axis"] == "x")
    assert [(p["a"], p["b"]) for p in x["pairs"]] == [("4", "6"), ("4", "8"), ("6", "8")]
    assert [r["value"] for r in x["ranking"]["rows"]] == ["6", "8", "4"]
    assert x["ranking"]["unit"] == "prompt" and x["ranking"]["n_units"] == 3
    y = next(e for e in entries if e["axis"] == "y")
    assert y["pairs"][0]["unit"] == "seed"  # comparing prompts: the seeds are the units
    assert [r["value"] for r in y["ranking"]["rows"]] == ["a cow", "a dog", "a cat"]
    assert {e["axis"] for e in entries} == {"x", "y", "z"}


def test_z_pages_tables_and_html(grid, tmp_path):
    recipe, cells, lay, cache, scores = grid
    out = tmp_path / "out"
    pages = render_grid(recipe, cells, lay, cache, scores, ["clip"], out)
    assert [p.path.name for p in pages] == ["grid_z1.png", "grid_z2.png"]
    assert [p.z_label for p in pages] == ["steps: 2", "steps: 3"]
    assert "col:CFG: 4" in pages[0].label_boxes and "row:a cat" in pages[0].label_boxes
    w, h = Image.open(pages[0].path).size
    assert w > 6 * 160 and h > 3 * 160  # 3 cfg x 2 seeds columns, 3 prompt rows
    rows = report.score_rows(cells, lay, scores, out, cache.png_path)
    statistics = report.ab_statistics(cells, lay, scores, ["clip"], n_resamples=200)
    paths = report.write_tables(rows, out, {"statistics": statistics})
    with open(paths[0]) as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(cells) == 36
    assert table[0]["x_value"] == "4" and table[0]["z"] == "steps" and float(table[0]["clip"]) > 0
    assert json.loads(paths[1].read_text())["cells"][5]["key"] == cells[5].key
    html = report.write_html(out, title="epochs", pages=pages, cells=cells, lay=lay, scores=scores,
                             metrics=["clip"], statistics=statistics, scorers={}, summary="s").read_text()
    assert html.count("<svg") == 3 and "grid_z2.png" in html and "Friedman p" in html
    means = report.axis_table(cells, lay, scores, "x", "clip")
    assert [m["n"] for m in means] == [12, 12, 12]
    assert means[1]["mean"] == pytest.approx(np.mean([scores[c.key]["clip"] for c in cells
                                                      if c.index[0] == 1]))


# ------------------------------------------------------------------------------------ the verdict

def _pairs(n_prompts: int, shift, seeds: int = 4):
    """B = A + shift(prompt, seed): A's scores vary by prompt and seed, as CLIP scores do."""
    a, b, units = [], [], []
    for p in range(n_prompts):
        for s in range(seeds):
            base = 25.0 + 2 * p + 0.3 * s
            a.append(base)
            b.append(base + shift(p, s))
            units.append(f"prompt {p}")
    return a, b, units


def test_verdict_of_a_constructed_case_in_plain_words():
    # 3 prompts x 4 seeds; B loses the seed-0 pair of every prompt, wins the other 9
    a, b, units = _pairs(3, lambda p, s: -0.5 if s == 0 else 2.0 + 0.4 * p + 0.1 * s)
    res = stats.compare_pairs(a, b, units, metric="clip", a_name="model_a", b_name="model_b",
                              n_resamples=2000)
    d_p = (np.array(b) - np.array(a)).reshape(3, 4).mean(axis=1)
    ci = sps.bootstrap((d_p,), np.mean, n_resamples=2000, method="BCa",
                       rng=np.random.default_rng(0)).confidence_interval
    sentence = report.pair_verdict(res.to_dict(), "model", "model")
    assert sentence == (f"model_b beats model_a on prompt adherence in 9 of 12 pairs, "
                        f"+{d_p.mean():.1f} CLIP points, 95 % interval +{ci.low:.1f} to +{ci.high:.1f}; "
                        "with 3 prompts this is weak evidence: add prompts.")
    for jargon in ("BCa", "Wilcoxon", "W/T/L", "p =", "bootstrap"):
        assert jargon not in sentence


def test_verdict_names_the_winner_clear_unclear_and_single_cases():
    many = stats.compare_pairs(*_pairs(8, lambda p, s: -1.0 - 0.1 * p), metric="aesthetic",
                               a_name="4", b_name="6", n_resamples=500)
    text = report.pair_verdict(many.to_dict(), "cfg", "CFG")
    assert text.startswith("CFG 4 beats CFG 6 on the aesthetic score in 32 of 32 pairs, +1.35 points")
    assert text.endswith("; the interval leaves out zero: a clear difference over 8 prompts.")
    mixed = stats.compare_pairs(*_pairs(3, lambda p, s: [1.0, -1.2, 0.5][p]), metric="clip",
                                n_resamples=500)
    assert report.pair_verdict(mixed.to_dict(), "model", "model").endswith(
        "; the interval includes zero, so this grid cannot tell them apart (with 3 prompts: add prompts).")
    one = stats.compare_pairs([20.0], [21.0], ["p"], metric="clip")
    assert report.pair_verdict(one.to_dict(), "model", "model") == (
        "B beats A on prompt adherence in 1 of 1 pairs, +1.0 CLIP points; a single prompt gives no "
        "interval: add prompts.")
    seeds = stats.compare_pairs(*_pairs(1, lambda p, s: 1.0 + 0.1 * s, seeds=4), metric="clip",
                                n_resamples=500)
    assert "with 4 seeds of one prompt this is weak evidence: add prompts." in \
        report.pair_verdict(seeds.to_dict(), "model", "model")


def test_report_opens_with_the_verdict_beside_the_grid_and_hides_unreachable_p(grid, tmp_path):
    recipe, cells, lay, cache, scores = grid
    out = tmp_path / "out"
    pages = render_grid(recipe, cells, lay, cache, scores, ["clip"], out)
    statistics = report.ab_statistics(cells, lay, scores, ["clip"], n_resamples=300)
    sentences = report.verdict(statistics)
    assert sentences[0] == "Of 3 CFG values, CFG 6 ranks first on prompt adherence."
    six_vs_four = next(p for e in statistics if e["axis"] == "x" for p in e["pairs"]
                       if (p["a"], p["b"]) == ("4", "6"))
    assert sentences[1].startswith("CFG 6 beats CFG 4 on prompt adherence in 12 of 12 pairs, "
                                   f"+{six_vs_four['mean_diff']:.1f} CLIP points, 95 % interval ")
    assert sentences[1].endswith("with 3 prompts this is weak evidence: add prompts.")
    assert not any("a cat" in s for s in sentences)  # prompts are not rivals: details only
    sha = "ab" * 32
    html = report.write_html(out, title="epochs", pages=pages, cells=cells, lay=lay, scores=scores,
                             metrics=["clip"], statistics=statistics,
                             scorers={"clip": {"sha256": sha}}, summary="s").read_text()
    top = html.index("<h2>Verdict</h2>")
    assert top < html.index("grid_z1.png") < html.index("Scores per axis value") \
        < html.index("Details: A/B statistics")
    assert html.index("<div class='pages'>") < html.index("grid_z1.png") < html.index("</div></div>")
    verdict_html = html[top:html.index("<div class='pages'>")]
    assert "BCa" not in verdict_html and "Wilcoxon" not in verdict_html
    # 3 prompts: the signed-rank test cannot go below 2/2^3, so no p is shown
    assert "– (cannot go below 0.25 with 3 prompts)" in html
    x_pairs = next(e for e in statistics if e["axis"] == "x")["pairs"]
    assert all(f"{p['wilcoxon_p']:.3f}" not in html for p in x_pairs)
    assert "with n units it cannot go below 2/2<sup>n</sup>" in html.lower()
    assert sha not in html and sha[:10] in html


def test_enough_prompts_show_the_p_value(tmp_path):
    res = stats.compare_pairs(*_pairs(8, lambda p, s: 1.0 + 0.1 * p), metric="clip", n_resamples=300)
    lay = SimpleNamespace(axes={})
    entry = {"axis": "x", "axis_name": "model", "title": "model", "metric": "clip",
             "pairs": [res.to_dict()], "ranking": None}
    html = report.write_html(tmp_path, title="t", pages=[], cells=[], lay=lay, scores={},
                             metrics=["clip"], statistics=[entry], scorers={}, summary="s").read_text()
    assert res.wilcoxon_p == pytest.approx(2 / 2**8)
    assert "– (cannot go below" not in html and f"<td>{report._fmt(res.wilcoxon_p)}</td>" in html
    assert "a clear difference over 8 prompts" in html


def test_score_table_keys_are_short(grid, tmp_path):
    recipe, cells, lay, cache, scores = grid
    rows = report.score_rows(cells, lay, scores, tmp_path, cache.png_path)
    csv_path, json_path = report.write_tables(rows, tmp_path, {})
    with open(csv_path) as f:
        table = list(csv.DictReader(f))
    assert len(cells[0].key) == 64 and table[0]["key"] == cells[0].key[:10]
    assert json.loads(json_path.read_text())["cells"][0]["key"] == cells[0].key
