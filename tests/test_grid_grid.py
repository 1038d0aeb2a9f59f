"""The grid engine end to end on tiny SD1.5 models (64x64, 2 steps) and a tiny open_clip.

One base grid (2 models x 2 prompts x 2 seeds) is made once per module; the other tests copy its
output folder and run variants of the recipe on it, counting what the engine loads and generates.
"""

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from workbench import progress
from workbench.cli import main as cli_main
from workbench.pipeline import generate as gen
from workbench.pipeline.image_meta import read_png_metadata
from workbench.formats.hashes import autov2
from workbench.recipes.loader import load_recipe
from workbench.dispatch import run_recipe

PROMPTS = ["a lighthouse at dusk", "portrait of a knight"]


def _recipe_text(prompts=PROMPTS, extra=""):
    return f"""kind: grid
name: ab
defaults: {{model: a.safetensors, sampler: "Euler a", steps: 2, cfg: 7.0, width: 64, height: 64}}
x: {{axis: model, values: [a.safetensors, b.safetensors]}}
y: {{axis: prompt, values: {json.dumps(prompts)}}}
seeds: [1, 2]
scores:
  clip: {{weights: clip}}
output: {{dir: out}}
{extra}"""


@contextmanager
def counting(monkeypatch):
    """Count model loads, generate calls (with their prompt and seeds) and CLIP loads."""
    from workbench.grid import merge_preview, scores
    from workbench.kinds import grid as grid_kind

    calls = {"load": [], "generate": [], "clip": 0}
    real_load, real_gen, real_clip = gen.load_model, gen.generate, scores.load_backbone

    def load(path, **kw):
        calls["load"].append(Path(path).name)
        return real_load(path, **kw)

    def generate(model, settings, seeds, **kw):
        calls["generate"].append((settings.prompt, list(seeds)))
        return real_gen(model, settings, seeds, **kw)

    def clip(*a, **kw):
        calls["clip"] += 1
        return real_clip(*a, **kw)

    monkeypatch.setattr(gen, "load_model", load)
    monkeypatch.setattr(merge_preview, "load_model", load)  # the merge preview's loads
    monkeypatch.setattr(grid_kind, "load_model", load)  # the grid kind calls the core by these names
    monkeypatch.setattr(grid_kind, "generate", generate)
    monkeypatch.setattr(gen, "generate", generate)
    monkeypatch.setattr(scores, "load_backbone", clip)
    yield calls


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model):
    from workbench.testing import clip as tiny_clip

    root = tmp_path_factory.mktemp("grid")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORKBENCH_CACHE", str(root / "wb-cache"))
        shutil.copy(tiny_model("sd15", 1), root / "a.safetensors")
        shutil.copy(tiny_model("sd15", 2), root / "b.safetensors")
        tiny_clip.build(root / "clip", seed=4)
        (root / "grid.yaml").write_text(_recipe_text())
        with counting(mp) as calls:
            result = run_recipe(load_recipe(root / "grid.yaml"), progress=False)
    return {"root": root, "result": result, "calls": calls}


def _copy(base, tmp_path) -> Path:
    root = tmp_path / "g"
    shutil.copytree(base["root"], root, ignore=shutil.ignore_patterns("wb-cache"))
    return root


def _scores(root: Path) -> dict:
    return json.loads((root / "out" / "scores.json").read_text())


@pytest.mark.slow
def test_grid_runs_each_model_once_and_writes_everything(base):
    root, result, calls = base["root"], base["result"], base["calls"]
    assert result.generated == 8
    assert calls["load"] == ["a.safetensors", "b.safetensors"]  # each model loaded once
    assert sorted(calls["generate"]) == sorted([(p, [1, 2]) for p in PROMPTS] * 2)  # seeds batched
    assert calls["clip"] == 1  # scorers load once per grid
    out = root / "out"
    for name in ("grid.png", "scores.csv", "scores.json", "report.html"):
        assert (out / name).is_file()
    assert len(list((out / "cells").glob("*.png"))) == 8
    page = result.pages[0]
    assert set(page.label_boxes) == {"col:a", "col:b", *(f"row:{p}" for p in PROMPTS)}
    grid_params, _ = read_png_metadata(out / "grid.png")
    assert grid_params["X Type"] == "model" and grid_params["X Values"] == "a, b"
    assert grid_params["Y Values"] == ", ".join(PROMPTS) and grid_params["Seeds"] == "1, 2"
    html = (out / "report.html").read_text()
    assert "A/B statistics" in html and "<svg" in html and "grid.png" in html
    assert "portrait of a knight" in html
    assert len((out / "scores.csv").read_text().strip().splitlines()) == 9


def test_cell_png_parameters_parse_back(base):
    root = base["root"]
    rows = _scores(root)["cells"]
    hashes = {"a": autov2(root / "a.safetensors"), "b": autov2(root / "b.safetensors")}
    for row in rows:
        params, prov = read_png_metadata(root / "out" / row["image"])
        assert params["prompt"] == row["prompt"]
        assert params["Seed"] == str(row["seed"]) and params["Steps"] == "2"
        assert params["Sampler"] == "Euler a" and params["Size"] == "64x64"
        assert params["Model hash"] == hashes[row["x_value"]] and params["Model"] == row["x_value"]
        assert prov["cell_key"] == row["key"]


def test_scores_equal_open_clip_on_saved_images(base):
    import open_clip

    root = base["root"]
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{root / 'clip'}")
    tok = open_clip.get_tokenizer(f"local-dir:{root / 'clip'}")
    model.eval()
    data = _scores(root)
    assert data["scorers"]["clip"]["scale"] == "100*max(cos,0)"
    for row in data["cells"]:
        with torch.no_grad(), Image.open(root / "out" / row["image"]) as im:
            f = model.encode_image(preprocess(im.convert("RGB"))[None])
            t = model.encode_text(tok([row["prompt"]]))
        cos = torch.nn.functional.cosine_similarity(f, t).item()
        assert row["clip"] == pytest.approx(100 * max(cos, 0.0), abs=1e-3)
    pair = next(s for s in data["statistics"] if s["axis"] == "x")["pairs"][0]
    by = {(r["x_value"], r["prompt"], r["seed"]): r["clip"] for r in data["cells"]}
    d_p = [np.mean([by[("b", p, s)] - by[("a", p, s)] for s in (1, 2)]) for p in PROMPTS]
    assert pair["mean_diff"] == pytest.approx(np.mean(d_p)) and pair["n_units"] == 2


def test_rerun_generates_nothing(base, tmp_path, monkeypatch, capsys):
    root = _copy(base, tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in (root / "out" / "cells").glob("*.png")}
    with counting(monkeypatch) as calls:
        assert cli_main(["grid", str(root / "grid.yaml"), "--no-progress"]) == 0
    assert "(0 generated, 8 from the cell store)" in capsys.readouterr().out
    assert calls == {"load": [], "generate": [], "clip": 1}
    assert before == {p.name: p.stat().st_mtime_ns for p in (root / "out" / "cells").glob("*.png")}
    assert _scores(root)["cells"] == _scores(base["root"])["cells"]  # cached scores, not recomputed
    # another CLIP model: the saved cells are scored again, nothing is generated
    from workbench.testing import clip as tiny_clip

    shutil.rmtree(root / "clip")
    tiny_clip.build(root / "clip", seed=9)
    with counting(monkeypatch) as calls:
        result = run_recipe(load_recipe(root / "grid.yaml"), progress=False)
    assert result.generated == 0 and calls == {"load": [], "generate": [], "clip": 1}
    new = {r["key"]: r["clip"] for r in _scores(root)["cells"]}
    old = {r["key"]: r["clip"] for r in _scores(base["root"])["cells"]}
    assert new.keys() == old.keys() and all(new[k] != old[k] for k in new)


@pytest.mark.slow
def test_extension_computes_only_new_cells_and_resumes_after_cancel(base, tmp_path, monkeypatch):
    root = _copy(base, tmp_path)
    (root / "grid.yaml").write_text(_recipe_text(PROMPTS + ["a red apple"]))
    recipe = load_recipe(root / "grid.yaml")
    lines = run_recipe(recipe, dry_run=True).plan.lines
    assert "cells: 12 (8 cached, 4 to generate from 2 models)" in lines

    def stop_after_first_cell(event):
        if event.desc == "grid" and event.done >= 1:
            progress.request_cancel()

    with counting(monkeypatch) as calls, progress.sink(stop_after_first_cell):
        try:
            with pytest.raises(progress.Cancelled):
                run_recipe(recipe, progress=False)
        finally:
            progress.reset_cancel()
    assert len(list((root / "out" / "cells").glob("*.json"))) == 9  # one new cell kept
    with counting(monkeypatch) as calls:
        result = run_recipe(recipe, progress=False)
    assert result.generated == 3
    assert calls["load"] == ["a.safetensors", "b.safetensors"]
    assert all(prompt == "a red apple" for prompt, _ in calls["generate"])
    assert sorted(s for _, seeds in calls["generate"] for s in seeds) == [1, 2, 2]
    data = _scores(root)
    assert len(data["cells"]) == 12
    assert next(s for s in data["statistics"] if s["axis"] == "x")["pairs"][0]["n_units"] == 3


@pytest.mark.slow
def test_merge_axis_previews_in_memory_with_shared_noise(base, tmp_path, monkeypatch):
    """alpha 0 and 1 of a weighted sum are models a and b: same (prompt, seed) -> the same pixels as
    the base grid's cells, and no merged checkpoint is written."""
    root = _copy(base, tmp_path)
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "wb-cache"))
    (root / "mix.yaml").write_text("""kind: merge
name: mix
models: {A: a.safetensors, B: b.safetensors}
steps:
  - {id: mix, method: weighted_sum, inputs: [A, B], alpha: 0.5}
output: {path: merged/mix.safetensors}
""")
    (root / "merge_grid.yaml").write_text("""kind: grid
name: mixgrid
defaults: {prompt: "portrait of a knight", steps: 2, width: 64, height: 64}
x: {axis: merge_alpha, values: "0-1 [2]", recipe: mix.yaml}
seeds: [2]
output: {dir: mout}
""")
    with counting(monkeypatch) as calls:
        result = run_recipe(load_recipe(root / "merge_grid.yaml"), progress=False)
    assert result.generated == 2 and calls["load"] == ["a.safetensors"]  # one base pipeline
    assert not (root / "merged").exists()
    cells = {r["x_value"]: r for r in json.loads((root / "mout" / "scores.json").read_text())["cells"]}
    base_cells = {(r["x_value"], r["prompt"], r["seed"]): r for r in _scores(root)["cells"]}
    for alpha, model, other in (("0", "a", "b"), ("1", "b", "a")):
        got = np.asarray(Image.open(root / "mout" / cells[alpha]["image"])).astype(int)
        want, unlike = (np.asarray(Image.open(root / "out" / base_cells[(m, "portrait of a knight", 2)]
                                              ["image"])).astype(int) for m in (model, other))
        # the base grid made seeds 1 and 2 in one batch, the preview seed 2 alone: CPU batch numerics
        # may move a pixel by one level, the initial noise is the same
        assert np.abs(got - want).max() <= 2, f"alpha {alpha} should reproduce model {model}"
        assert np.abs(got - unlike).mean() > 10
    assert cells["0"]["model"] == "mix alpha=0"
