"""The kind modules' contract: `run` executes the plan `describe` printed (memory plans made for the
recipe's own size and batch, and applied as they are), and a training run scans its dataset once."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from workbench.kinds import registry
from workbench.dispatch import build_plan, run_recipe
from workbench.kinds import generate as generate_kind
from workbench.kinds import grid as grid_kind
from workbench.pipeline import generate as core
from workbench.recipes.loader import parse_recipe
from workbench.train import check


def _write(tmp_path: Path, text: str) -> object:
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(text))
    return parse_recipe(path.read_text(), path)


def test_every_kind_module_follows_the_protocol():
    from workbench.recipes.loader import RECIPE_KINDS

    assert set(registry.KINDS) == set(RECIPE_KINDS)
    for name, module in registry.KINDS.items():
        assert callable(module.describe) and callable(module.run), name


@pytest.mark.slow
def test_generate_applies_the_plan_printed_for_its_own_size_and_batch(tmp_path, tiny_model, monkeypatch):
    """An SDXL recipe at 1536x1536, batch 4: `--plan` and the loaded model carry the same plan,
    field by field, and it was made for 1536x1536 x4, not for the native size and one image."""
    recipe = _write(tmp_path, f"""\
        kind: generate
        name: big
        model: {tiny_model("sdxl", 0)}
        prompt: a lighthouse
        width: 1536
        height: 1536
        batch_size: 4
        count: 4
        steps: 1
        memory: {{device: cpu}}
        output: {{dir: {tmp_path / "out"}}}
        """)
    printed = build_plan(recipe)
    assert printed.ok, printed.problems
    planned = printed.detail
    assert (planned.width, planned.height, planned.batch) == (1536, 1536, 4)
    native = core.plan_for_file(recipe.model, device="cpu")
    assert (native.width, native.batch) == (1024, 1)  # what the run used to plan for
    seen = []
    monkeypatch.setattr(generate_kind, "generate", lambda model, *a, **k: seen.append(model) or [])
    generate_kind.run(printed, progress=False)
    applied = seen[0].memory_plan
    assert dataclasses.asdict(applied) == dataclasses.asdict(planned)
    assert applied.render() == planned.render()


@pytest.mark.slow
def test_grid_cells_load_with_the_plan_for_their_largest_size(tmp_path, tiny_model, monkeypatch):
    model = tiny_model("sd15", 0)
    recipe = _write(tmp_path, f"""\
        kind: grid
        name: sizes
        defaults: {{model: {model}, prompt: a red car, steps: 1, width: 64, height: 64}}
        x: {{axis: size, values: ["64x64", "128x96"]}}
        seeds: [1]
        memory: {{device: cpu, weights: fp32}}
        output: {{dir: {tmp_path / "grid"}}}
        """)
    printed = build_plan(recipe)
    assert printed.ok, printed.problems
    (source, planned), = printed.detail.memory.items()
    assert (planned.width, planned.height) == (128, 96) and planned.compute_dtype == "fp32"
    loaded = []
    real = grid_kind.load_model
    monkeypatch.setattr(grid_kind, "load_model", lambda *a, **k: loaded.append(k) or real(*a, **k))
    grid_kind.run(printed, progress=False)
    assert loaded and loaded[0]["plan"] is planned and loaded[0]["weights"] == "fp32"
    assert (tmp_path / "grid" / "provenance.json").is_file()


@pytest.mark.slow
def test_a_training_run_scans_its_dataset_once(tmp_path, tiny_model, style_set, monkeypatch):
    calls = []
    real = check.scan_dataset
    monkeypatch.setattr(check, "scan_dataset", lambda *a, **k: calls.append(a) or real(*a, **k))
    recipe = _write(tmp_path, f"""\
        kind: train
        name: once
        base: {tiny_model("sd15", 0)}
        dataset: {style_set}
        resolution: 64
        max_steps: 1
        network: {{type: lora, rank: 2, alpha: 2}}
        output: {{dir: {tmp_path / "t"}, save_precision: fp32}}
        """)
    result = run_recipe(recipe, progress=False)
    assert len(calls) == 1, calls
    assert (tmp_path / "t" / "once.safetensors").is_file() and result.plan.detail.dataset.examples
