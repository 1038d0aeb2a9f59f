"""Reports from stored cells with known scores: pairing, rankings, z pages, tables, HTML."""

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

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
