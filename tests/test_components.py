"""UNet/transformer-only files (the common SDXL and SD3.5 GGUF downloads) with the text encoders and
VAE of a base checkpoint or a diffusers folder named by the recipe's `components` field
(`pipeline/components.py`): the dry run says which file gives which component and refuses, naming
the field, what cannot work; the images match the full tiny model's within measured bounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("gguf")

from workbench.dispatch import build_plan, run_plan  # noqa: E402
from workbench.errors import WorkbenchError  # noqa: E402
from workbench.formats.gguf_file import iter_packed  # noqa: E402
from workbench.pipeline.components import denoiser_only, sources  # noqa: E402
from workbench.pipeline.generate import ImageSettings, generate, load_model  # noqa: E402
from workbench.recipes import parse_recipe  # noqa: E402
from workbench.testing.gguf_files import build_gguf  # noqa: E402

from helpers.packed_training import packed_weights_watched  # noqa: E402

SETTINGS = ImageSettings("a red fox in snow", steps=2, width=64, height=64)
SD3_SETTINGS = ImageSettings("a red fox in snow", sampler="Euler", steps=2, cfg=4.0, width=64, height=64)


def _generate_recipe(tmp_path: Path, model: Path, components: Path | None, extra: str = "") -> object:
    line = f"components: {components}\n" if components is not None else ""
    text = (f"kind: generate\nname: g\nmodel: {model}\n{line}prompt: a red fox in snow\nsteps: 2\n"
            f"width: 64\nheight: 64\nseed: 3\nmemory: {{device: cpu}}\noutput: {{dir: {tmp_path / 'out'}}}\n{extra}")
    return parse_recipe(text, tmp_path / "g.yaml")


def _diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean())


@pytest.fixture(scope="module")
def sdxl_unet(tmp_path_factory, tiny_model):
    return build_gguf(tiny_model("sdxl"), tmp_path_factory.mktemp("unet") / "sdxl-unet-Q8_0.gguf", "sdxl", "Q8_0")


@pytest.mark.slow
def test_dry_run_names_the_field_when_components_are_missing_or_wrong(sdxl_unet, tiny_model, tmp_path):
    assert denoiser_only(sdxl_unet) == ("sdxl", "sdxl-base", "unet") and denoiser_only(tiny_model("sdxl")) is None
    plan = build_plan(_generate_recipe(tmp_path, sdxl_unet, None))
    assert any("sdxl-unet-Q8_0.gguf holds only the SDXL unet" in p and "set `components:`" in p
               for p in plan.problems), plan.problems
    plan = build_plan(_generate_recipe(tmp_path, sdxl_unet, tiny_model("sd15")))
    assert any(p.startswith("components: sd15_0.safetensors is an SD1.5 model but model") for p in plan.problems), \
        plan.problems
    plan = build_plan(_generate_recipe(tmp_path, sdxl_unet, sdxl_unet))
    assert any(p.startswith("components: sdxl-unet-Q8_0.gguf is an SDXL unet, not a checkpoint") for p in plan.problems)
    plan = build_plan(_generate_recipe(tmp_path, sdxl_unet, tmp_path / "nowhere.safetensors"))
    assert any(p.startswith("components: not found") for p in plan.problems)

    plan = build_plan(_generate_recipe(tmp_path, sdxl_unet, tiny_model("sdxl")))
    assert not plan.problems, plan.problems
    text = "\n".join(plan.lines)
    assert "  unet: sdxl-unet-Q8_0.gguf (GGUF Q8_0)" in text
    assert "  text_encoder, text_encoder_2, vae: sdxl_0.safetensors (components)" in text
    # the planner sizes the UNet from the GGUF header and the rest from the components file
    assert plan.detail.decision("unet").storage == "gguf"
    assert not plan.detail.decision("text_encoder_2").estimated  # the tiny file's, not a standard size
    # a full checkpoint keeps its own components; the dry run says `components` is not used
    plan = build_plan(_generate_recipe(tmp_path, tiny_model("sdxl"), tiny_model("sdxl", 1)))
    assert not plan.problems and any("components: not used for sdxl_0.safetensors" in ln for ln in plan.lines)


@pytest.mark.slow
def test_sdxl_gguf_unet_generates_with_a_base_checkpoints_components(sdxl_unet, tiny_model, tmp_path):
    source = tiny_model("sdxl")
    result = run_plan(build_plan(_generate_recipe(tmp_path, sdxl_unet, source)), progress=False)
    image = Image.open(next(p for p in result.outputs if p.suffix == ".png"))
    full = load_model(source, device="cpu", weights="fp32")
    want, other = (generate(full, SETTINGS, [s])[0].image for s in (3, 4))
    # measured: Q8_0 UNet vs the fp32 checkpoint mean |diff| 3.9 of 255; another seed differs by 48
    # and another base checkpoint's text encoders and VAE by 69
    assert _diff(image, want) <= 8 < 20 < _diff(want, other)
    # the text encoders and VAE are the named base's: another base gives another picture
    other_base = load_model(sdxl_unet, device="cpu", components=tiny_model("sdxl", 1))
    assert _diff(generate(other_base, SETTINGS, [3])[0].image, image) > 10


@pytest.mark.slow
def test_sd35_gguf_transformer_generates_with_a_diffusers_folders_components(tiny_model, tmp_path):
    source = tiny_model("sd3")
    gguf = build_gguf(source, tmp_path / "sd3.5-tiny-Q8_0.gguf", "sd3", "Q8_0")
    full = load_model(source, device="cpu", weights="fp32")
    folder = tmp_path / "sd3-diffusers"
    full.pipe.save_pretrained(folder)  # diffusers' own folder layout
    src = sources(gguf, folder)
    assert (src.arch, src.denoiser, src.label) == ("sd3", "transformer", "GGUF Q8_0")
    model = load_model(gguf, device="cpu", weights="fp32", components=folder)
    assert len(dict(iter_packed(model.pipe.transformer))) > 20  # the GGUF transformer, packed
    assert not model.memory_plan.decision("text_encoder_3").estimated  # sized from the folder's files
    te = model.pipe.text_encoder.state_dict()
    assert all(torch.equal(te[k], v) for k, v in full.pipe.text_encoder.state_dict().items())
    got, want = generate(model, SD3_SETTINGS, [3])[0].image, generate(full, SD3_SETTINGS, [3])[0].image
    other = generate(full, SD3_SETTINGS, [4])[0].image
    # measured: mean |diff| 1.0 of 255 to the fp32 model; another seed differs by 48.5
    assert _diff(got, want) <= 3 < 10 < _diff(want, other)


def test_a_diffusers_folder_of_another_architecture_is_refused(sdxl_unet, tmp_path):
    folder = tmp_path / "flux-folder"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(WorkbenchError, match=r"^components: flux-folder is a FLUX\.1 model but model "
                                             r"\(sdxl-unet-Q8_0\.gguf\) is an SDXL unet"):
        sources(sdxl_unet, folder)


@pytest.mark.slow
def test_grid_takes_defaults_components_for_the_unet_only_model(sdxl_unet, tiny_model, tmp_path):
    """defaults.components completes the UNet-only GGUF; the full checkpoint beside it keeps its own."""
    from workbench.grid.cells import Source, source_identity

    source = tiny_model("sdxl")
    text = (f"kind: grid\nname: c\ndefaults: {{components: {source}, steps: 2, width: 64, height: 64}}\n"
            f"x: {{axis: model, values: [{sdxl_unet}, {source}]}}\nseeds: [3]\nmemory: {{device: cpu}}\n"
            f"output: {{dir: {tmp_path / 'out'}}}\n")
    plan = build_plan(parse_recipe(text, tmp_path / "c.yaml"))
    assert not plan.problems, plan.problems
    assert "  unet: sdxl-unet-Q8_0.gguf (GGUF Q8_0)" in plan.lines
    assert any("defaults.components: not used for sdxl_0.safetensors" in ln for ln in plan.lines)
    # the cells' cache key covers the components only where they are used
    assert "components" in source_identity(Source(sdxl_unet, components=source))
    assert "components" not in source_identity(Source(source, components=tiny_model("sdxl", 1)))
    run_plan(plan, progress=False)
    cells = [np.asarray(Image.open(p), dtype=np.int16) for p in sorted((tmp_path / "out" / "cells").glob("*.png"))]
    assert len(cells) == 2
    assert 0 < _diff(cells[0], cells[1]) <= 8  # Q8_0 UNet vs its source (generate: measured 3.9)
    missing = build_plan(parse_recipe(text.replace(f"components: {source}, ", ""), tmp_path / "c.yaml"))
    assert any(p.startswith("x.values[0]: sdxl-unet-Q8_0.gguf holds only the SDXL unet")
               and "`defaults.components:`" in p for p in missing.problems), missing.problems


@pytest.mark.slow
def test_flux_gguf_transformer_with_an_all_in_one_checkpoints_components(tiny_model, tmp_path):
    source = tiny_model("flux")
    gguf = build_gguf(source, tmp_path / "flux1-dev-Q8_0.gguf", "flux", "Q8_0")
    assert denoiser_only(gguf)[0::2] == ("flux", "transformer")
    settings = ImageSettings("a red fox in snow", sampler="Euler", steps=2, cfg=3.5, width=64, height=64)
    model = load_model(gguf, device="cpu", weights="fp32", components=source)
    assert len(dict(iter_packed(model.pipe.transformer))) > 20
    full = load_model(source, device="cpu", weights="fp32")
    got, want = generate(model, settings, [3])[0].image, generate(full, settings, [3])[0].image
    other = generate(full, settings, [4])[0].image
    # test_gguf's split-folder FLUX measured 0.36 of 255 for Q8_0 against bf16; another seed ~42
    assert _diff(got, want) <= 3 < 10 < _diff(want, other)


def _train_recipe(tmp_path: Path, base: Path, components: Path | None, dataset: Path, extra: str = ""):
    line = f"components: {components}\n" if components is not None else ""
    text = (f"kind: train\nname: u\nbase: {base}\n{line}dataset: {dataset}\ntrigger: wbstyle\n"
            "resolution: 64\nmax_steps: 2\nlearning_rate: 1.0e-3\nseed: 5\n"
            "network: {type: lora, rank: 4, alpha: 4, train_text_encoder: true}\n"
            f"output: {{dir: {tmp_path / 'lora'}, save_precision: fp32}}\n{extra}")
    return parse_recipe(text, tmp_path / "t.yaml")


@pytest.mark.slow
def test_a_lora_trains_on_an_sdxl_gguf_unet_with_a_checkpoints_components(sdxl_unet, tiny_model, style_set,
                                                                          tmp_path):
    """The common SDXL GGUF download holds only the UNet: with `components:` naming an SDXL
    checkpoint it trains, with the same kohya modules (text encoders included) as that checkpoint
    would give, and the UNet's packed weights stay packed and unchanged."""
    from safetensors.torch import load_file

    plan = build_plan(_train_recipe(tmp_path, sdxl_unet, None, style_set))
    assert any(p.startswith("base: sdxl-unet-Q8_0.gguf holds only the SDXL unet") and "`components:`" in p
               for p in plan.problems), plan.problems
    folder = tmp_path / "diffusers"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    plan = build_plan(_train_recipe(tmp_path, sdxl_unet, folder, style_set))
    assert any(p.startswith("components:") and "diffusers folder" in p for p in plan.problems), plan.problems

    whole = build_plan(_train_recipe(tmp_path / "whole", tiny_model("sdxl"), None, style_set))
    plan = build_plan(_train_recipe(tmp_path, sdxl_unet, tiny_model("sdxl"), style_set))
    assert not plan.problems, plan.problems
    assert "  unet: sdxl-unet-Q8_0.gguf (GGUF Q8_0)" in plan.lines
    assert list(plan.detail.network.modules) == list(whole.detail.network.modules)

    with packed_weights_watched() as seen:
        result = run_plan(plan, progress=False, cache_root=tmp_path / "cache")
    assert "2/2 steps" in result.summary
    assert len(seen["before"]) > 20 and all(torch.equal(seen["before"][n], seen["after"][n])
                                            for n in seen["before"])
    weights = load_file(str(plan.recipe.lora_path))
    names = {k.split(".")[0] for k in weights}
    assert names == set(whole.detail.network.modules)
    assert all(torch.isfinite(v).all() for v in weights.values())
    for prefix in ("lora_unet_", "lora_te1_", "lora_te2_"):
        ups = [v for k, v in weights.items() if k.startswith(prefix) and k.endswith("lora_up.weight")]
        assert ups and any(v.abs().sum() > 0 for v in ups), prefix
