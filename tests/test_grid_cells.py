"""Grid recipes expanded into cells: values, labels, content-addressed keys, run order, the dry run."""

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from workbench.grid import cells as C
from workbench.grid.cache import CellCache
from workbench.kinds.grid import cells_report, problems_of
from workbench.recipes.grid import GridRecipe


@pytest.fixture
def files(tmp_path):
    """Stand-in model and LoRA files: keys only hash their bytes."""
    out = {}
    for name in ("a", "b", "style"):
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(name.encode() * 100)
        out[name] = p
    return out


def _recipe(tmp_path, files, **over):
    data = {"kind": "grid", "name": "t",
            "defaults": {"model": str(files["a"]), "prompt": "a red car", "negative_prompt": "red blur",
                         "steps": 4, "width": 64, "height": 64},
            "x": {"axis": "model", "values": [str(files["a"]), str(files["b"])]},
            "y": {"axis": "cfg", "values": "5-7 [3]"},
            "seeds": [11, 12], "output": {"dir": str(tmp_path / "out")}}
    data.update(over)
    return GridRecipe.model_validate(data)


def test_expand_values_labels_and_shared_seeds(tmp_path, files):
    cells = C.expand(_recipe(tmp_path, files))
    assert len(cells) == 2 * 3 * 2
    assert [(c.index, c.seed) for c in cells[:4]] == [((0, 0, 0), 11), ((0, 0, 0), 12),
                                                       ((1, 0, 0), 11), ((1, 0, 0), 12)]
    assert {c.settings.cfg for c in cells} == {5.0, 6.0, 7.0}
    assert cells[2].source.path == files["b"] and cells[2].label("x") == "b"
    assert cells[0].label("y") == "5"
    for x in range(2):  # every (x, y) position gets the same seed list
        for y in range(3):
            assert [c.seed for c in cells if c.index[:2] == (x, y)] == [11, 12]
    lay = C.layout(_recipe(tmp_path, files))
    assert lay.axes["x"] == ("model", "model", ["a", "b"]) and lay.axes["y"][1] == "CFG"


def test_prompt_sr_lora_size_and_merge_axes(tmp_path, files):
    r = _recipe(tmp_path, files, x={"axis": "prompt_sr", "values": ["red", "blue"]},
                y={"axis": "lora", "values": [f"{files['style']}:0.5", f"{files['style']}:1"]},
                z={"axis": "size", "values": ["64x64", "128x64"]},
                defaults={"model": str(files["a"]), "prompt": "a red car", "negative_prompt": "red blur",
                          "loras": [f"{files['b']}:0.3"]})
    cells = C.expand(r)
    blue = [c for c in cells if c.index[0] == 1][0]
    assert blue.settings.prompt == "a blue car" and blue.settings.negative_prompt == "blue blur"
    assert [(lu.path.name, lu.weight) for lu in cells[0].loras] == [("b.safetensors", 0.3),
                                                                    ("style.safetensors", 0.5)]
    assert {(c.settings.width, c.settings.height) for c in cells} == {(64, 64), (128, 64)}
    assert cells[0].label("y") == "style:0.5"
    merge = _recipe(tmp_path, files, x={"axis": "merge_alpha", "values": "0-1 [3]",
                                        "recipe": str(tmp_path / "m.yaml")})
    srcs = [c.source for c in C.expand(merge)]
    assert {s.merge_value for s in srcs} == {0.0, 0.5, 1.0} and srcs[0].merge_param == "alpha"


def test_keys_are_content_addressed(tmp_path, files):
    r = _recipe(tmp_path, files)
    keyed = C.with_keys(C.expand(r))
    keys = [c.key for c in keyed]
    assert len(set(keys)) == len(keys) and all(len(k) == 64 for k in keys)
    assert keys == [c.key for c in C.with_keys(C.expand(r))]  # stable
    # a copy of a model under another name is the same model: same keys
    copy = tmp_path / "copy_of_a.safetensors"
    shutil.copy(files["a"], copy)
    r2 = _recipe(tmp_path, files, x={"axis": "model", "values": [str(copy), str(files["b"])],
                                     "label": "checkpoint"})
    assert [c.key for c in C.with_keys(C.expand(r2))] == keys
    # anything that changes pixels changes the key
    for change in ({"seeds": [11, 13]},
                   {"defaults": {"model": str(files["a"]), "prompt": "a red car", "negative_prompt": "",
                                 "steps": 4, "width": 64, "height": 64}},
                   {"defaults": {"model": str(files["a"]), "prompt": "a red car",
                                 "negative_prompt": "red blur", "steps": 5, "width": 64, "height": 64}}):
        other = {c.key for c in C.with_keys(C.expand(_recipe(tmp_path, files, **change)))}
        assert other != set(keys) and len(other & set(keys)) < len(keys)
    files["b"].write_bytes(b"changed weights")
    assert [c.key for c in C.with_keys(C.expand(r))][6:] != keys[6:]  # b's cells
    assert [c.key for c in C.with_keys(C.expand(r))][:2] == keys[:2]  # a's cells


def test_run_order_loads_each_model_once(tmp_path, files):
    r = _recipe(tmp_path, files, x={"axis": "cfg", "values": [5, 6]},
                y={"axis": "model", "values": [str(files["a"]), str(files["b"])]},
                z={"axis": "steps", "values": [2, 3]})
    order = C.run_order(C.expand(r))
    assert [s.path.name for s, _ in order] == ["a.safetensors", "b.safetensors"]
    for source, groups in order:
        assert len(groups) == 4  # 2 cfg x 2 steps
        for g in groups:
            assert [c.seed for c in g] == [11, 12] and len({c.group() for c in g}) == 1
            assert all(c.source == source for c in g)


def test_dry_run_problems_and_cached_count(tmp_path, files, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))  # no speed measured by other tests
    bad = _recipe(tmp_path, files, x={"axis": "prompt_sr", "values": ["green", "blue"]}, seeds=[-1])
    problems = problems_of(bad)
    assert any("prompt_sr searches for its first value 'green'" in p for p in problems)
    assert any("seeds: -1" in p for p in problems)
    r = _recipe(tmp_path, files)
    lines, problems, _ = cells_report(r)
    assert problems == [] and lines[0] == "cells: 12 (0 cached, 12 to generate from 2 models)"
    assert lines[1].startswith("estimated time: ~") and "no cell timed on this machine yet" in lines[1]
    cache = CellCache(tmp_path / "out" / "cells")
    img = SimpleNamespace(image=Image.new("RGB", (8, 8)), parameters="p\nSteps: 4, Seed: 1, Size: 8x8",
                          provenance={})
    for cell in C.with_keys(C.expand(r))[:5]:
        cache.save(cell.key, img, {"timing": {"seconds": 0.5, "steps": 4, "megapixels": 0.004}})
    lines, _, _ = cells_report(r)
    assert lines[0] == "cells: 12 (5 cached, 7 to generate from 2 models)"
    assert "speed of the cells already in this grid's store" in lines[1]
    # a record without its PNG is not a finished cell
    key = C.with_keys(C.expand(r))[0].key
    Path(cache.png_path(key)).unlink()
    assert not cache.has(key) and cells_report(r)[0][0].startswith("cells: 12 (4 cached")
