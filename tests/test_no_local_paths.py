"""Issue #14: a model file a user might share names no local folder. The merged checkpoint, the
extracted LoRA and the trained LoRA (step file and final) keep file names and hashes in their
metadata; the full paths stay in the local provenance files beside them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workbench.dispatch import run_recipe
from workbench.formats.safetensors_io import read_header
from workbench.recipes.loader import load_recipe


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _metadata_text(path: Path) -> str:
    return json.dumps(read_header(path).metadata)


@pytest.mark.slow
def test_merged_extracted_and_trained_files_carry_no_local_path(tmp_path, tiny_sd15, tiny_model,
                                                               style_set):
    recipes, out = tmp_path / "recipes", tmp_path / "out"
    recipes.mkdir()
    merge = _write(recipes / "merge.yaml",
                   f"kind: merge\nname: m\nmodels: {{A: {tiny_sd15['A']}, B: ../../{tiny_sd15['B'].parent.name}"
                   f"/B.safetensors}}\n"
                   "steps: [{id: out, method: weighted_sum, inputs: [A, B], alpha: 0.5}]\n"
                   f"output: {{path: {out / 'm.safetensors'}}}\n")
    extract = _write(recipes / "extract.yaml",
                     f"kind: extract_lora\nname: x\ntuned: {tiny_sd15['A']}\nbase: {tiny_sd15['C']}\n"
                     f"rank: 4\noutput: {{path: {out / 'x.safetensors'}}}\n")
    train = _write(recipes / "train.yaml",
                   f"kind: train\nname: t\nbase: {tiny_model('sd15')}\ndataset: {style_set}\n"
                   "trigger: wbstyle\nresolution: 64\nnetwork: {type: lora, rank: 4, alpha: 2}\n"
                   "max_steps: 2\nseed: 5\nlearning_rate: 1.0e-3\n"
                   f"output: {{dir: {out / 'lora'}, save_every: 1}}\n")
    # the merge's B is relative to the recipe: it must still resolve (and be reduced to its name)
    assert load_recipe(merge).models["B"].resolve() == tiny_sd15["B"].resolve()
    for recipe in (merge, extract, train):
        run_recipe(load_recipe(recipe), progress=False)
    files = [out / "m.safetensors", out / "x.safetensors", out / "lora" / "t.safetensors",
             out / "lora" / "t-step00000001.safetensors"]
    roots = {str(tmp_path), str(tiny_sd15["A"].parent), str(Path(tiny_model("sd15")).parent),
             str(style_set)}
    for f in files:
        meta = _metadata_text(f)
        assert not [r for r in roots if r in meta or json.dumps(r)[1:-1] in meta], f
    merged = read_header(files[0]).metadata
    assert "A: A.safetensors" in merged["workbench_recipe"]
    assert "B: B.safetensors" in merged["workbench_recipe"]
    assert "path: m.safetensors" in merged["workbench_recipe"]
    trained = read_header(files[2]).metadata["workbench_recipe"]
    assert f"base: {Path(tiny_model('sd15')).name}\ndataset: {style_set.name}\n" in trained
    # the full paths are kept locally, beside the outputs
    assert str(tiny_sd15["A"]) in (out / "m.provenance.json").read_text()
    assert str(Path(tiny_model("sd15"))) in (out / "lora" / "provenance.json").read_text()
