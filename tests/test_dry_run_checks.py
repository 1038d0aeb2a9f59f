"""The dry run catches what the run would hit (issue #14): LoRAs of another architecture, CLIP
weights that are missing or of another open_clip model, a missing T5 tokenizer, presets the recipe
refused, extrapolating shares (a note), RAM, and time estimates from speeds measured here."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from workbench import plan as plan_mod
from workbench import throughput
from workbench.dispatch import build_plan, run_recipe
from workbench.errors import WorkbenchError
from workbench.formats import pipeline_configs_dit as pcd
from workbench.formats.blocks import check_block_text, presets
from workbench.formats.detect import detect
from workbench.formats.lora_keys import kohya_modules, module_table
from workbench.formats.safetensors_io import read_header
from workbench.grid import scores as grid_scores
from workbench.kinds import grid as grid_kind
from workbench.recipes.loader import parse_recipe
from workbench.recipes.merge import MergeRecipe
from workbench.testing import clip as tiny_clip

from helpers import formats_keys as fk


def _recipe(tmp_path: Path, text: str, name: str = "r.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return parse_recipe(path.read_text(), path)


def lora_of(model: Path, out: Path, rank: int = 2) -> Path:
    """A kohya LoRA over every default kohya module of `model` (names and widths from the
    project's kohya module table of that checkpoint), zero weights."""
    header = read_header(model)
    table = module_table(detect(header).arch, header.shapes())
    tensors = {}
    for name, t in kohya_modules(table).items():
        tensors[f"{name}.lora_down.weight"] = torch.zeros(rank, t.in_features, *t.kernel)
        tensors[f"{name}.lora_up.weight"] = torch.zeros(t.out_features, rank, *(1 for _ in t.kernel))
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(out))
    return out


@pytest.fixture(scope="module")
def xl_lora(tmp_path_factory, tiny_model):
    return lora_of(tiny_model("sdxl", 0), tmp_path_factory.mktemp("lora") / "xl_style.safetensors")


# ------------------------------------------------------------------------------ LoRA architecture

def test_generate_refuses_an_sdxl_lora_on_an_sd15_model(tmp_path, tiny_model, xl_lora):
    sd15 = tiny_model("sd15", 0)
    text = f"""\
        kind: generate
        model: {{model}}
        prompt: a lighthouse
        loras: ["{xl_lora}:0.8"]
        steps: 1
        memory: {{device: cpu}}
        output: {{dir: {tmp_path / "out"}}}
        """
    plan = build_plan(_recipe(tmp_path, text.replace("{model}", str(sd15))))
    assert plan.problems == [
        "loras[0]: xl_style.safetensors is a LoRA for sdxl, but the model is sd15; a LoRA only "
        "applies to the architecture it was trained on: use an sd15 LoRA here, or an sdxl model"]
    assert next(i for i in plan.inputs if i.label == "loras[0]").detail.startswith("sdxl")
    fine = build_plan(_recipe(tmp_path, text.replace("{model}", str(tiny_model("sdxl", 0)))))
    assert not any("LoRA" in p for p in fine.problems), fine.problems


def test_a_checkpoint_given_as_lora_is_named(tmp_path, tiny_model):
    plan = build_plan(_recipe(tmp_path, f"""\
        kind: generate
        model: {tiny_model("sd15", 0)}
        prompt: x
        loras: ["{tiny_model("sdxl", 0)}"]
        output: {{dir: {tmp_path / "out"}}}
        """))
    assert plan.problems == ["loras[0]: sdxl_0.safetensors is an sdxl checkpoint, not a LoRA; give a "
                             "LoRA file here"]


def test_grid_checks_default_and_axis_loras_against_every_model(tmp_path, tiny_model, xl_lora):
    sd15, sdxl = tiny_model("sd15", 0), tiny_model("sdxl", 0)
    plan = build_plan(_recipe(tmp_path, f"""\
        kind: grid
        defaults: {{prompt: a cat, steps: 1, width: 64, height: 64, loras: ["{xl_lora}"]}}
        x: {{axis: model, values: ["{sd15}", "{sdxl}"]}}
        seeds: [1]
        memory: {{device: cpu}}
        output: {{dir: {tmp_path / "g"}}}
        """))
    lora_problems = [p for p in plan.problems if "is a LoRA for" in p]
    assert lora_problems == [
        "defaults.loras[0]: xl_style.safetensors is a LoRA for sdxl, but x.values[0] is sd15; a "
        "LoRA only applies to the architecture it was trained on: use an sd15 LoRA here, or an sdxl "
        "model"]
    plan = build_plan(_recipe(tmp_path, f"""\
        kind: grid
        defaults: {{model: {sd15}, prompt: a cat, steps: 1, width: 64, height: 64}}
        x: {{axis: lora, values: ["{xl_lora}:0.5", "{xl_lora}:1"]}}
        seeds: [1]
        output: {{dir: {tmp_path / "g2"}}}
        """))
    assert [p.split(":")[0] for p in plan.problems if "is a LoRA for sdxl" in p] == \
        ["x.values[0]", "x.values[1]"]


def test_merge_add_lora_of_another_architecture_is_a_plan_problem(tmp_path, tiny_model, xl_lora):
    plan = build_plan(_recipe(tmp_path, f"""\
        kind: merge
        name: m
        models: {{A: {tiny_model("sd15", 0)}, L: {xl_lora}}}
        steps: [{{id: m, method: add_lora, inputs: [A, L], alpha: 0.5}}]
        output: {{path: {tmp_path / "o.safetensors"}}}
        """))
    assert plan.problems == [
        "step m: L: xl_style.safetensors is a LoRA for sdxl, but A (the step's first input) is "
        "sd15; a LoRA only applies to the architecture it was trained on: use an sd15 LoRA here, "
        "or an sdxl model"]


# ---------------------------------------------------------------------------------- CLIP weights

def _open_clip_file(name: str, path: Path) -> Path:
    """open_clip `name` at its real size as a header-only .safetensors file (shapes from open_clip
    building the model on the meta device; the data is a sparse hole)."""
    import open_clip

    with torch.device("meta"):
        model = open_clip.create_model(name, device="meta")
    return fk.write_header_only(path, {k: tuple(v.shape) for k, v in model.state_dict().items()})


def _grid_with_scores(tmp_path, model: Path, scores: str, name: str = "g.yaml"):
    return _recipe(tmp_path, f"""\
        kind: grid
        defaults: {{model: {model}, prompt: a cat, steps: 1, width: 64, height: 64}}
        x: {{axis: cfg, values: [4, 6]}}
        seeds: [1]
        scores: {scores}
        output: {{dir: {tmp_path / "g"}}}
        """, name)


def test_no_clip_weights_on_this_machine_is_a_problem_naming_where_to_put_them(tmp_path, tiny_model,
                                                                             monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf"))
    plan = build_plan(_grid_with_scores(tmp_path, tiny_model("sd15", 0), "{clip: {model: ViT-B-32}}"))
    assert plan.problems == [
        "scores.clip: the weights of open_clip ViT-B-32 (openai) are not on this machine: looked for "
        "timm/vit_base_patch32_clip_224.openai in the Hugging Face cache "
        f"({tmp_path / 'empty-hf'}); workbench never downloads. Download it once with `hf download "
        "timm/vit_base_patch32_clip_224.openai open_clip_model.safetensors` (it goes to the Hugging "
        "Face cache), or give `scores.clip.weights:` a local weights file (.safetensors) or an "
        "open_clip folder (open_clip_config.json + weights)"]
    # the aesthetic score alone loads the default backbone, so it needs the weights too
    aesthetic = tmp_path / "aes.safetensors"
    save_file({"layers.0.weight": torch.zeros(1, 768), "layers.0.bias": torch.zeros(1)}, str(aesthetic))
    plan = build_plan(_grid_with_scores(tmp_path, tiny_model("sd15", 0),
                                        f"{{aesthetic: {{weights: {aesthetic}}}}}", "a.yaml"))
    assert len(plan.problems) == 1 and "open_clip ViT-L-14 (openai) are not on this machine" in \
        plan.problems[0]


def test_clip_weights_of_another_architecture_are_named_with_the_fitting_model(tmp_path, tiny_model):
    """What crashed the run with `AssertionError: text pos_embed width changed!`: ViT-B-32 weights
    scored as ViT-L-14. The expected widths are read from open_clip's own model configs."""
    import open_clip

    weights = _open_clip_file("ViT-B-32", tmp_path / "vitb32.safetensors")
    want = open_clip.get_model_config("ViT-L-14")
    have = open_clip.get_model_config("ViT-B-32")
    plan = build_plan(_grid_with_scores(tmp_path, tiny_model("sd15", 0),
                                        f"{{clip: {{model: ViT-L-14, weights: {weights}}}}}"))
    assert len(plan.problems) == 1
    problem = plan.problems[0]
    assert problem.startswith("scores.clip: the weights vitb32.safetensors do not fit open_clip "
                              f"ViT-L-14: text width {have['text_cfg']['width']} (ViT-L-14 has "
                              f"{want['text_cfg']['width']}), embedding width {have['embed_dim']} "
                              f"(ViT-L-14 has {want['embed_dim']})")
    assert f"image width {have['vision_cfg']['width']} (ViT-L-14 has {want['vision_cfg']['width']})" \
        in problem
    assert "; set `scores.clip.model: ViT-B-32` (or " in problem
    assert problem.endswith(", or give weights made for ViT-L-14")
    ok = build_plan(_grid_with_scores(tmp_path, tiny_model("sd15", 0),
                                      f"{{clip: {{model: ViT-B-32, weights: {weights}}}}}", "ok.yaml"))
    assert ok.problems == [] and \
        f"score backbone: open_clip ViT-B-32, weights {weights} (shapes match)" in ok.lines


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip.build(tmp_path_factory.mktemp("clip") / "clip", seed=5)


@pytest.mark.slow
def test_pickled_weights_are_checked_on_the_meta_device(tmp_path, tiny_model, clip_dir, monkeypatch):
    import open_clip

    from safetensors.torch import load_file

    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "tiny-clip", tiny_clip.TINY_MODEL_CFG)
    weights = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(load_file(str(clip_dir / "open_clip_model.safetensors")), weights)
    ok = build_plan(_grid_with_scores(tmp_path, tiny_model("sd15", 0),
                                      f"{{clip: {{model: tiny-clip, weights: {weights}}}}}"))
    assert ok.problems == []
    bad = build_plan(_grid_with_scores(tmp_path, tiny_model("sd15", 0),
                                       f"{{clip: {{model: ViT-B-32, weights: {weights}}}}}", "b.yaml"))
    assert len(bad.problems) == 1 and "text width 32 (ViT-B-32 has 512)" in bad.problems[0] \
        and "set `scores.clip.model: tiny-clip`" in bad.problems[0]


def test_clip_folder_and_aesthetic_width_from_headers(tmp_path, tiny_model, clip_dir):
    ok = build_plan(_grid_with_scores(tmp_path, tiny_model("sd15", 0), f"{{clip: {{weights: {clip_dir}}}}}"))
    assert ok.problems == [] and any(line.endswith("(shapes match)") for line in ok.lines)
    aesthetic = tmp_path / "aes768.safetensors"
    save_file({"layers.0.weight": torch.zeros(4, 768), "layers.0.bias": torch.zeros(4),
               "layers.2.weight": torch.zeros(1, 4), "layers.2.bias": torch.zeros(1)}, str(aesthetic))
    bad = build_plan(_grid_with_scores(tmp_path, tiny_model("sd15", 0),
                                       f"{{clip: {{weights: {clip_dir}}}, aesthetic: {{weights: {aesthetic}}}}}",
                                       "b.yaml"))
    assert bad.problems == [
        "scores.aesthetic.weights: aes768.safetensors expects 768-d CLIP embeddings but the CLIP "
        "backbone (the config in clip/) gives 16-d; use the backbone the predictor was trained on "
        "(ViT-L-14 for the LAION predictor)"]


@pytest.mark.slow
def test_loading_weights_of_another_architecture_is_a_workbench_error(clip_dir):
    """Without the dry run, the same file used to end in open_clip's bare AssertionError."""
    with pytest.raises(WorkbenchError, match="pos_embed width changed"):
        grid_scores.load_backbone("ViT-B-32", clip_dir / "open_clip_model.safetensors", device="cpu")


# ---------------------------------------------------------------------------------- T5 tokenizer

def _flux_file(path: Path, vocab: int | None = None) -> Path:
    """A real-size FLUX.1-dev all-in-one header (sparse data); `vocab` resizes T5's embedding."""
    shapes = fk.flux_checkpoint()
    if vocab is not None:
        key = "text_encoders.t5xxl.transformer.shared.weight"
        shapes[key] = (vocab, shapes[key][1])
    return fk.write_header_only(path, shapes)


def test_t5_tokenizer_is_a_problem_only_when_the_model_needs_one(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(pcd, "find_real_t5", lambda: None)
    flux = _flux_file(tmp_path / "flux1-dev.safetensors")
    text = f"""\
        kind: generate
        model: {{model}}
        prompt: a lighthouse
        memory: {{device: cpu}}
        output: {{dir: {tmp_path / "out"}}}
        """
    plan = build_plan(_recipe(tmp_path, text.replace("{model}", str(flux))))
    t5 = [p for p in plan.problems if "T5" in p]
    assert t5 == [
        "model: this flux model's T5 text encoder needs the T5-XXL tokenizer, which is not bundled "
        "and was not found on this machine; set the environment variable WORKBENCH_T5_TOKENIZER to "
        "a folder holding tokenizer.json (or spiece.model), e.g. the tokenizer_2 folder of "
        "black-forest-labs/FLUX.1-dev, or put a snapshot of FLUX.1-dev, FLUX.1-schnell, SD3.5 or "
        "google/t5-v1_1-xxl (its tokenizer files) in the Hugging Face cache "
        f"({plan_mod.hf_cache_dir()})"]
    # a tokenizer where the loader looks: no problem
    monkeypatch.setattr(pcd, "find_real_t5", lambda: tmp_path)
    assert not any("T5" in p for p in build_plan(_recipe(tmp_path, text.replace("{model}", str(flux)))).problems)
    monkeypatch.setattr(pcd, "find_real_t5", lambda: None)
    # the tiny T5 vocabulary ships with workbench, and SD1.5 has no T5 at all
    tiny_vocab = _flux_file(tmp_path / "tiny-vocab.safetensors", pcd.TINY_T5_VOCAB)
    assert plan_mod.t5_tokenizer_problem("model", tiny_vocab, "flux") is None
    assert plan_mod.t5_tokenizer_problem("model", tiny_model("sd15", 0), "sd15") is None


# ------------------------------------------------------------------------------- block presets

def test_every_offered_preset_validates_in_a_recipe(tmp_path, tiny_sd15):
    names = list(presets())
    assert len(names) == 38 and {"SMOOTHSTEP*2", "REVERSE-SMOOTHSTEP", "R_SMOOTHSTEP/3"} <= set(names)
    for name in names:
        check_block_text(name)  # the one block grammar (formats/blocks.py) takes it
        MergeRecipe.model_validate({
            "kind": "merge", "name": "p", "models": {"A": "a.safetensors", "B": "b.safetensors"},
            "steps": [{"id": "m", "method": "block_weighted", "inputs": ["A", "B"], "blocks": name}],
            "output": {"path": "o.safetensors"}})
    plan = build_plan(_recipe(tmp_path, f"""\
        kind: merge
        name: p
        models: {{A: {tiny_sd15["A"]}, B: {tiny_sd15["B"]}}}
        steps: [{{id: m, method: block_weighted, inputs: [A, B], blocks: "SMOOTHSTEP*2"}}]
        output: {{path: {tmp_path / "o.safetensors"}}}
        """))
    assert plan.ok, plan.problems


def test_block_texts_follow_the_one_grammar_before_the_architecture_is_known():
    def recipe(blocks):
        return {"kind": "merge", "name": "p", "models": {"A": "a.safetensors", "B": "b.safetensors"},
                "steps": [{"id": "m", "method": "block_weighted", "inputs": ["A", "B"], "blocks": blocks}],
                "output": {"path": "o.safetensors"}}

    # one value per SD3.5 large block (41) or FLUX block (60): refused by the old recipe grammar
    MergeRecipe.model_validate(recipe(",".join(["0.5"] * 41)))
    MergeRecipe.model_validate(recipe(",".join(["0.5"] * 60)))
    MergeRecipe.model_validate(recipe({"BASE": 0, "J05": 1, "S37": 0.5}))
    with pytest.raises(ValueError, match="SMOOTHSTEP"):  # misspelt preset: refused with a hint
        MergeRecipe.model_validate(recipe("SMOOTHSTEPP"))
    with pytest.raises(ValueError, match="7 values"):
        MergeRecipe.model_validate(recipe(",".join(["1"] * 7)))
    with pytest.raises(ValueError, match="J99"):
        MergeRecipe.model_validate(recipe({"J99": 1}))


# ------------------------------------------------------------------------------ extrapolation

@pytest.mark.parametrize("alpha,note", [
    (1.5, "note: alpha 1.5 is above 1: weighted_sum extrapolates past B (A + 1.5·(B − A)), pushing "
          "further in B's direction; legitimate, but the further past 1, the likelier artefacts"),
    (-1, "note: alpha -1 is below 0: weighted_sum extrapolates away from B (A − 1·(B − A)), moving "
         "A opposite to B; legitimate, but the further below 0, the likelier artefacts"),
    (0.5, None)])
def test_extrapolating_alpha_is_a_note_not_a_problem(tmp_path, tiny_sd15, alpha, note):
    plan = build_plan(_recipe(tmp_path, f"""\
        kind: merge
        name: x
        models: {{A: {tiny_sd15["A"]}, B: {tiny_sd15["B"]}}}
        steps: [{{id: m, method: weighted_sum, inputs: [A, B], alpha: {alpha}}}]
        output: {{path: {tmp_path / "o.safetensors"}}}
        """))
    assert plan.ok, plan.problems
    notes = [line.strip() for line in plan.lines if line.strip().startswith("note:")]
    assert notes == ([note] if note else [])


def test_block_weights_outside_0_1_are_noted(tmp_path, tiny_sd15):
    plan = build_plan(_recipe(tmp_path, f"""\
        kind: merge
        name: x
        models: {{A: {tiny_sd15["A"]}, B: {tiny_sd15["B"]}}}
        steps: [{{id: m, method: block_weighted, inputs: [A, B], blocks: {{BASE: 0, IN04: 1.3, OUT02: -0.2}}}}]
        output: {{path: {tmp_path / "o.safetensors"}}}
        """))
    assert plan.ok, plan.problems
    assert "     note: block weights outside 0..1 (IN04 1.3, OUT02 -0.2) extrapolate beyond A and B in " \
           "those blocks: legitimate, but the further outside, the likelier artefacts" in plan.lines


# ------------------------------------------------------------------------------------------ RAM

def test_merge_and_generation_refuse_what_does_not_fit_in_free_ram(tmp_path, tiny_sd15, monkeypatch):
    import workbench.kinds.merge as merge_kind
    from workbench import system

    monkeypatch.setattr(system, "ram_available", lambda: 10**6)  # what psutil reports as available
    merge = build_plan(_recipe(tmp_path, f"""\
        kind: merge
        name: x
        models: {{A: {tiny_sd15["A"]}, B: {tiny_sd15["B"]}}}
        steps: [{{id: m, method: weighted_sum, inputs: [A, B], alpha: 0.5}}]
        output: {{path: {tmp_path / "o.safetensors"}}}
        """))
    peak = merge_kind.estimated_peak_ram(merge.detail)
    from workbench.units import human_size

    assert merge.problems == [
        f"not enough free RAM for this merge: needs about {human_size(peak)}, 1.0 MB free; close other "
        "programs to free RAM (the merge holds libraries and the tensors in flight; the inputs are "
        "read from disk as needed)"]
    generate = build_plan(_recipe(tmp_path, f"""\
        kind: generate
        model: {tiny_sd15["A"]}
        prompt: x
        memory: {{device: cpu}}
        output: {{dir: {tmp_path / "out"}}}
        """, "g.yaml"))
    assert len(generate.problems) == 1, generate.problems
    assert generate.problems[0].startswith("sd15 does not fit in VRAM + RAM: ")
    assert "RAM free is 1 MB; close other programs" in generate.problems[0]


# ------------------------------------------------------------------------------ measured speeds

def test_throughput_keeps_the_median_of_the_last_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    assert throughput.measured("merge", "sd15", "cpu") is None
    for v in (10, 20, 1000, 30, 40, 50):
        throughput.record("merge", "sd15", "cpu", v, "output bytes/s")
    got = throughput.measured("merge", "sd15", "cpu")
    assert (got.value, got.runs, got.unit) == (40, throughput.KEEP, "output bytes/s")  # 20..50 + 1000
    assert throughput.measured("merge", "sdxl", "cpu") is None
    (tmp_path / throughput.FILE_NAME).write_text("{not json")
    assert throughput.measured("merge", "sd15", "cpu") is None
    throughput.record("merge", "sd15", "cpu", 5.0, "output bytes/s")
    assert throughput.measured("merge", "sd15", "cpu").value == 5.0


@pytest.mark.slow
def test_merge_estimate_comes_from_the_last_measured_merge(tmp_path, tiny_sd15, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    text = f"""\
        kind: merge
        name: x
        models: {{A: {tiny_sd15["A"]}, B: {tiny_sd15["B"]}}}
        steps: [{{id: m, method: weighted_sum, inputs: [A, B], alpha: 0.5}}]
        output: {{path: {tmp_path / "o.safetensors"}, overwrite: true}}
        """
    first = build_plan(_recipe(tmp_path, text))
    assert any("(rough: no sd15 merge measured on this machine yet; assumes 400.0 MB/s)" in line
               for line in first.lines), first.lines
    result = run_recipe(_recipe(tmp_path, text), progress=False)
    assert f"; the dry run estimated {throughput.human_time(first.estimated_seconds)})" in result.summary
    data = json.loads((tmp_path / "cache" / throughput.FILE_NAME).read_text())
    (rate,) = data["merge/sd15/cpu"]["values"]
    assert data["merge/sd15/cpu"]["unit"] == "output bytes/s" and rate > 0
    from workbench.units import human_size

    assert f" at {human_size(rate)}/s" in result.summary
    second = build_plan(_recipe(tmp_path, text))
    out_bytes = second.detail.output_bytes
    assert second.estimated_seconds == pytest.approx(max(1.0, out_bytes / rate))
    assert any(f"(measured on this machine: {human_size(rate)}/s, median of the last 1 sd15 merge)"
               in line for line in second.lines), second.lines


def test_grid_estimate_uses_speeds_measured_by_earlier_grids(tmp_path, tiny_sd15, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    recipe = _recipe(tmp_path, f"""\
        kind: grid
        defaults: {{model: {tiny_sd15["A"]}, prompt: a cat, steps: 10, width: 400, height: 256}}
        x: {{axis: cfg, values: [4, 6]}}
        seeds: [1, 2]
        memory: {{device: cpu}}
        output: {{dir: {tmp_path / "g"}}}
        """)
    lines, _, _ = grid_kind.cells_report(recipe)
    assert lines[1].endswith("(rough for sd15: no cell timed on this machine yet)")
    grid_kind.record_speeds({("grid", "sd15"): [0.5, 0.7, 0.6], ("grid-load", "sd15"): [3.0]}, "cpu")
    lines, _, grid = grid_kind.cells_report(recipe)
    # 4 cells x 10 steps x 0.1024 MP x 0.6 s per step per megapixel + one 3 s load
    assert grid.estimated_seconds == pytest.approx(4 * 10 * 0.1024 * 0.6 + 3.0)
    assert lines[1] == ("estimated time: ~5 s (measured on this machine (cpu): sd15 0.6 s per step per "
                        "megapixel, median of the last 1 grid)")


@pytest.mark.slow
def test_a_grid_run_records_its_speed_and_shows_the_estimate(tmp_path, tiny_sd15, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    recipe = _recipe(tmp_path, f"""\
        kind: grid
        defaults: {{model: {tiny_sd15["A"]}, prompt: a cat, steps: 1, width: 64, height: 64}}
        x: {{axis: cfg, values: [4, 6]}}
        seeds: [1]
        memory: {{device: cpu, weights: fp32}}
        output: {{dir: {tmp_path / "g"}}}
        """)
    result = run_recipe(recipe, progress=False)
    assert "s per step per megapixel; the dry run estimated ~" in result.summary
    assert throughput.measured("grid", "sd15", "cpu").runs == 1
    assert throughput.measured("grid-load", "sd15", "cpu").value > 0
    again = build_plan(recipe)  # every cell is cached now; a changed size would use the speed
    assert again.detail.todo == []
