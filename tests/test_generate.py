"""The generation core on tiny real-layout models: same seed, same image as plain diffusers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.pipeline.generate import (
    ImageSettings,
    LoraUse,
    Model,
    generate,
    load_model,
)
from workbench.pipeline.precision import nf4_available
from workbench.errors import WorkbenchError


def _pixels(img) -> np.ndarray:
    return np.asarray(img.image if hasattr(img, "image") else img).astype(np.int16)


SAMPLER = {"sd15": "Euler a", "sdxl": "DPM++ 2M Karras", "sd3": "Euler", "flux": "Euler"}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sd15", "sdxl", "sd3", "flux"])
def test_same_seed_same_image_as_plain_diffusers(tiny_model, arch):
    from workbench.pipeline.load import load_pipeline
    from workbench.pipeline.samplers import make_scheduler

    path = tiny_model(arch)
    settings = ImageSettings("a lighthouse at dusk", "", SAMPLER[arch], 2, 4.0, 64, 64)
    model = load_model(path, device="cpu")
    ours = generate(model, settings, [7])[0]

    pipe = load_pipeline(path, arch, torch.float32)  # an independent pipeline, plain diffusers call
    pipe.scheduler = make_scheduler(SAMPLER[arch], pipe.scheduler.config, arch)
    extra = {} if arch == "flux" else {"negative_prompt": None}
    plain = pipe("a lighthouse at dusk", num_inference_steps=2, guidance_scale=4.0, width=64,
                 height=64, generator=torch.Generator("cpu").manual_seed(7), **extra).images[0]
    assert np.array_equal(_pixels(ours), _pixels(plain))
    assert ours.image.size == (64, 64)
    assert f"Seed: 7, Size: 64x64, Model hash: {model.model_hash}" in ours.parameters


@pytest.mark.slow
def test_seed_order_and_batching_do_not_change_images(tiny_model):
    model = load_model(tiny_model("sd15"), device="cpu")
    s = ImageSettings("a cat", "ugly", "Euler a", 2, 5.0, 64, 64)
    first = generate(model, s, [1, 2], batch_size=1)
    swapped = generate(model, s, [2, 1], batch_size=1)
    batched = generate(model, s, [1, 2], batch_size=2)
    assert np.array_equal(_pixels(first[0]), _pixels(swapped[1]))
    assert np.array_equal(_pixels(first[1]), _pixels(swapped[0]))
    assert not np.array_equal(_pixels(first[0]), _pixels(first[1]))
    # a batch computes the same noise; batched matmuls may round the last bit differently
    assert np.abs(_pixels(first[0]) - _pixels(batched[0])).max() <= 2


@pytest.mark.slow
def test_clip_skip_uses_a1111_numbering(tiny_model):
    model = load_model(tiny_model("sd15"), device="cpu")
    base = ImageSettings("a cat", "", "Euler", 2, 5.0, 64, 64)
    one = generate(model, base, [3])[0]
    unset = generate(model, dataclasses.replace(base, clip_skip=None), [3])[0]
    two = generate(model, dataclasses.replace(base, clip_skip=2), [3])[0]
    assert np.array_equal(_pixels(one), _pixels(unset))
    assert not np.array_equal(_pixels(one), _pixels(two))
    assert "Clip skip: 2" in two.parameters


@pytest.mark.parametrize("arch,settings,words", [
    ("sd15", dict(width=60), "multiple of 8"),
    ("sd3", dict(height=72), "multiple of 16"),
    ("flux", dict(negative_prompt="blurry"), "negative"),
    ("flux", dict(clip_skip=2), "clip"),
    ("flux", dict(sampler="DPM++ 2M Karras"), "flow-matching"),
])
def test_settings_the_architecture_cannot_take_are_refused(arch, settings, words):
    from workbench.pipeline.generate import check_settings
    from workbench.pipeline.samplers import scheduler_spec

    s = ImageSettings(**{"prompt": "x", "width": 64, "height": 64, "sampler": "Euler", **settings})
    with pytest.raises(WorkbenchError, match=words):
        check_settings(arch, s)
        scheduler_spec(s.sampler, arch)


def test_a_lora_is_refused_as_a_model(tmp_path, tiny_sd15):
    from workbench.merge.extract import extract_lora

    lora = extract_lora(tiny_sd15["A"], tiny_sd15["C"], tmp_path / "l.safetensors", rank=4)
    with pytest.raises(WorkbenchError, match="not a checkpoint"):
        load_model(lora, device="cpu")


@pytest.fixture(scope="module")
def extracted_lora(tmp_path_factory, tiny_sd15):
    from workbench.merge.extract import extract_lora

    out = tmp_path_factory.mktemp("lora") / "a-minus-c.safetensors"
    return extract_lora(tiny_sd15["A"], tiny_sd15["C"], out, rank=8, dtype="fp32")


@pytest.mark.slow
def test_lora_at_generation_time_equals_the_baked_merge(tmp_path, tiny_sd15, extracted_lora):
    """A kohya LoRA applied at weight w gives the image of base + w·(up·down·alpha/rank) baked by
    the merge engine, and the base is left untouched afterwards."""
    from workbench.recipes import parse_recipe
    from workbench.dispatch import run_recipe

    baked = tmp_path / "baked.safetensors"
    recipe = parse_recipe(
        f"kind: merge\nname: baked\nmodels: {{A: {tiny_sd15['B']}, L: {extracted_lora}}}\n"
        f"steps:\n  - {{id: out, method: add_lora, inputs: [A, L], alpha: 0.7}}\n"
        f"output: {{path: {baked}, dtype: fp32}}\n", tmp_path / "baked.yaml")
    run_recipe(recipe, progress=False)

    s = ImageSettings("a cat", "", "Euler", 2, 5.0, 64, 64)
    model = load_model(tiny_sd15["B"], device="cpu")
    plain = generate(model, s, [5])[0]
    with_lora = generate(model, s, [5], loras=[LoraUse(extracted_lora, 0.7)])[0]
    after = generate(model, s, [5])[0]
    merged = generate(load_model(baked, device="cpu"), s, [5])[0]

    assert np.array_equal(_pixels(plain), _pixels(after))
    assert np.abs(_pixels(plain) - _pixels(with_lora)).max() > 20
    assert np.abs(_pixels(with_lora) - _pixels(merged)).max() <= 2
    assert "<lora:a-minus-c:0.7>" in with_lora.parameters
    assert "Lora hashes:" in with_lora.parameters


@pytest.mark.slow
def test_a_second_lora_on_one_model_is_quiet_and_the_first_is_off(tmp_path, tiny_sd15, extracted_lora):
    """Two LoRAs used one after the other on one loaded model (a grid's LoRA axis, a pick's steps):
    each is its own cached adapter, only the one asked for is active, and peft's "multiple
    adapters" warning, which this cache causes on purpose, is not shown."""
    import shutil
    import warnings

    twin = tmp_path / "twin.safetensors"
    shutil.copy(extracted_lora, twin)
    s = ImageSettings("a cat", "", "Euler", 2, 5.0, 64, 64)
    model = load_model(tiny_sd15["B"], device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = generate(model, s, [5], loras=[LoraUse(extracted_lora, 0.7)])[0]
        second = generate(model, s, [5], loras=[LoraUse(twin, 0.7)])[0]
    assert len(model.lora_adapters) == 2
    assert not [w for w in caught if "peft_config" in str(w.message)]
    assert np.array_equal(_pixels(first), _pixels(second))  # not both at once: the same picture


def _diffusers_lora(pipe, folder: Path) -> Path:
    """A diffusers-format LoRA (`pytorch_lora_weights.safetensors`, peft lora_A/lora_B keys) as
    diffusers' own `save_lora_weights` writes it, with random (non-zero) up weights."""
    from peft import LoraConfig, get_peft_model_state_dict

    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    torch.manual_seed(0)
    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=2, init_lora_weights=False,
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = get_peft_model_state_dict(denoiser)
    denoiser.delete_adapters("default")
    key = "unet_lora_layers" if hasattr(pipe, "unet") else "transformer_lora_layers"
    type(pipe).save_lora_weights(folder, **{key: layers})
    return folder / "pytorch_lora_weights.safetensors"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sd15", "sdxl", "sd3", "flux"])
def test_diffusers_format_lora_gives_diffusers_own_image(tmp_path, tiny_model, arch):
    """A diffusers/peft-format LoRA at weight 0.6 through our core = plain diffusers with
    load_lora_weights + set_adapters(0.6), same seed; and it changes the image."""
    from workbench.pipeline.load import load_pipeline
    from workbench.pipeline.samplers import make_scheduler

    path = tiny_model(arch)
    pipe = load_pipeline(path, arch, torch.float32)
    lora = _diffusers_lora(pipe, tmp_path / "lora")
    settings = ImageSettings("a lighthouse at dusk", "", SAMPLER[arch], 2, 4.0, 64, 64)
    model = load_model(path, device="cpu")
    base = generate(model, settings, [7])[0]
    ours = generate(model, settings, [7], loras=[LoraUse(lora, 0.6)])[0]

    pipe.scheduler = make_scheduler(SAMPLER[arch], pipe.scheduler.config, arch)
    pipe.load_lora_weights(str(lora), adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[0.6])
    extra = {} if arch == "flux" else {"negative_prompt": None}
    plain = pipe("a lighthouse at dusk", num_inference_steps=2, guidance_scale=4.0, width=64,
                 height=64, generator=torch.Generator("cpu").manual_seed(7), **extra).images[0]
    assert np.abs(_pixels(ours) - _pixels(plain)).max() <= 1
    assert np.abs(_pixels(ours) - _pixels(base)).max() > 20
    assert "<lora:pytorch_lora_weights:0.6>" in ours.parameters


@pytest.mark.slow
def test_lora_of_another_architecture_is_refused(tiny_model, extracted_lora):
    model = load_model(tiny_model("sdxl"), device="cpu")
    with pytest.raises(WorkbenchError, match="LoRA for sd15"):
        generate(model, ImageSettings("x", width=64, height=64, steps=1), [1],
                 loras=[LoraUse(extracted_lora, 1.0)])


@pytest.mark.slow
@pytest.mark.parametrize("naming", ["diffusers", "original"])
def test_tiny_vae_decodes_instead_of_the_full_vae(tmp_path, tiny_model, naming):
    from safetensors.torch import load_file

    from workbench.pipeline.tiny_vae import load_tiny_vae
    from workbench.testing.taesd import build_tiny_taesd

    ref = build_tiny_taesd(tmp_path / "ref.safetensors", seed=3)
    f = build_tiny_taesd(tmp_path / f"{naming}.safetensors", seed=3, naming=naming)
    vae = load_tiny_vae(f, "sd15")
    expected = {k: v for k, v in load_file(ref).items() if k.startswith("decoder.")}
    got = vae.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items())

    s = ImageSettings("a cat", "", "LCM", 2, 1.0, 64, 64)
    full = generate(load_model(tiny_model("sd15"), device="cpu"), s, [1])[0]
    fast = generate(load_model(tiny_model("sd15"), device="cpu", tiny_vae=f), s, [1])[0]
    assert fast.image.size == (64, 64)
    assert not np.array_equal(_pixels(full), _pixels(fast))


def test_tiny_vae_rejects_wrong_files(tmp_path, tiny_model):
    from workbench.pipeline.tiny_vae import load_tiny_vae

    with pytest.raises(WorkbenchError, match="TAESD"):
        load_tiny_vae(tiny_model("sd15"), "flux")
    with pytest.raises(WorkbenchError, match="no TAESD decoder|decoder tensors"):
        load_tiny_vae(tiny_model("sd15"), "sd15")


@pytest.mark.slow
def test_model_from_pipeline_wraps_an_in_memory_pipeline(tiny_model):
    from workbench.pipeline.load import load_pipeline

    pipe = load_pipeline(tiny_model("sd15"), "sd15", torch.float32)
    model = Model.from_pipeline(pipe, "sd15", name="in-memory")
    img = generate(model, ImageSettings("x", steps=1, width=64, height=64), [1])[0]
    assert "Model: in-memory" in img.parameters and "Model hash" not in img.parameters


@pytest.mark.slow
def test_fp8_storage_image_is_close_and_takes_a_lora(tiny_sd15, extracted_lora):
    """weights: fp8 stores the UNet and text encoder in float8 (upcast per layer); the picture stays
    close to fp32's, and a LoRA still applies on top of the fp8 base."""
    s = ImageSettings("a cat", "", "Euler", 2, 5.0, 64, 64)
    full = load_model(tiny_sd15["B"], device="cpu", weights="fp32")
    fp8 = load_model(tiny_sd15["B"], device="cpu", weights="fp8")
    assert fp8.pipe.unet.down_blocks[0].resnets[0].conv1.weight.dtype == torch.float8_e4m3fn
    assert fp8.memory_plan.decision("unet").storage == "fp8_e4m3fn"
    a, b = _pixels(generate(full, s, [4])[0]), _pixels(generate(fp8, s, [4])[0])
    unrelated = _pixels(generate(full, s, [5])[0])
    assert np.abs(a - b).mean() < 0.25 * np.abs(a - unrelated).mean()

    lora = [LoraUse(extracted_lora, 1.0)]
    la, lb = _pixels(generate(full, s, [4], loras=lora)[0]), _pixels(generate(fp8, s, [4], loras=lora)[0])
    # the LoRA moves the fp8 image towards the fp32+LoRA image (the adapter computes in fp32)
    assert fp8.pipe.unet.down_blocks[0].attentions[0].proj_in.lora_A[
        next(iter(fp8.pipe.unet.down_blocks[0].attentions[0].proj_in.lora_A))].weight.dtype == torch.float32
    assert np.abs(lb - la).mean() < 0.6 * np.abs(b - la).mean()


@pytest.mark.slow
@pytest.mark.skipif(not nf4_available("cpu"), reason="bitsandbytes with a CPU backend is not installed")
def test_nf4_image_is_close_and_takes_a_lora(tiny_sd15, extracted_lora):
    """weights: nf4 (bitsandbytes, here on its CPU backend) quantizes the UNet's Linear layers to
    4 bits; the picture stays near fp32's, and a LoRA applies on top as a peft adapter."""
    import bitsandbytes as bnb

    s = ImageSettings("a cat", "", "Euler", 2, 5.0, 64, 64)
    full = load_model(tiny_sd15["B"], device="cpu", weights="fp32")
    nf4 = load_model(tiny_sd15["B"], device="cpu", weights="nf4")
    assert nf4.memory_plan.decision("unet").storage == "nf4"
    assert nf4.memory_plan.decision("text_encoder").storage == "fp32"
    attn = nf4.pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert isinstance(attn.to_q, bnb.nn.Linear4bit) and attn.to_q.weight.bnb_quantized
    a, b = _pixels(generate(full, s, [4])[0]), _pixels(generate(nf4, s, [4])[0])
    unrelated = _pixels(generate(full, s, [5])[0])
    assert 0 < np.abs(a - b).mean() < 0.5 * np.abs(a - unrelated).mean()

    lora = [LoraUse(extracted_lora, 1.0)]
    la, lb = _pixels(generate(full, s, [4], loras=lora)[0]), _pixels(generate(nf4, s, [4], loras=lora)[0])
    # the adapter adds exactly the fp32 delta on top of the 4-bit layer ...
    from workbench.pipeline.loras import attached_loras

    def to_q(m):
        return m.pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q

    x = torch.randn(2, 5, to_q(full).in_features)
    with torch.no_grad():
        with attached_loras(full, []), attached_loras(nf4, []):  # adapters off
            base32, base4 = to_q(full)(x), to_q(nf4)(x)
        with attached_loras(full, lora):
            delta32 = to_q(full)(x) - base32
        with attached_loras(nf4, lora):
            delta4 = to_q(nf4)(x) - base4
    assert isinstance(to_q(nf4).base_layer, bnb.nn.Linear4bit)
    assert torch.allclose(delta4, delta32, atol=1e-5) and delta32.norm() > 0.5 * base32.norm()
    # ... so the image moves towards fp32 + LoRA (this strong LoRA amplifies the 4-bit rounding)
    assert np.abs(lb - la).mean() < 0.85 * np.abs(b - la).mean()
    after = _pixels(generate(nf4, s, [4])[0])
    assert np.array_equal(after, b)  # adapters switched off: the nf4 base image again


@pytest.mark.slow
def test_sde_sampler_is_seeded_per_image(tiny_model):
    """DPM++ SDE draws its noise from a Brownian tree; it is seeded with each image's seed, so
    the SDE sampler repeats like the others (diffusers would pick a random tree seed)."""
    model = load_model(tiny_model("sd15"), device="cpu")
    s = ImageSettings("a cat", "", "DPM++ SDE Karras", 3, 5.0, 64, 64)
    first, again, other = (generate(model, s, [seed])[0] for seed in (11, 11, 12))
    assert np.array_equal(_pixels(first), _pixels(again))
    assert not np.array_equal(_pixels(first), _pixels(other))
    assert "Sampler: DPM++ SDE Karras" in first.parameters


@pytest.mark.slow
def test_a_diffusers_folder_loads_offline_with_the_same_weights(tmp_path, tiny_model):
    import diffusers

    from workbench.pipeline.load import load_pipeline
    from workbench.pipeline.samplers import make_scheduler

    path = tiny_model("sd15")
    folder = tmp_path / "sd15-diffusers"
    load_pipeline(path, "sd15", torch.float32).save_pretrained(folder, safe_serialization=True)
    model = load_model(folder, device="cpu")
    single = load_model(path, device="cpu")
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(model.pipe, name).state_dict(), getattr(single.pipe, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    s = ImageSettings("a cat", "", "Euler", 2, 5.0, 64, 64)
    ours = generate(model, s, [9])[0]
    plain = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    plain.scheduler = make_scheduler("Euler", plain.scheduler.config)
    expected = plain("a cat", num_inference_steps=2, guidance_scale=5.0, width=64, height=64,
                     negative_prompt=None, generator=torch.Generator("cpu").manual_seed(9)).images[0]
    assert np.array_equal(_pixels(ours), _pixels(expected))
    assert "Model: sd15-diffusers" in ours.parameters


def test_a_folder_of_another_pipeline_is_refused(tmp_path):
    folder = tmp_path / "kandinsky"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "KandinskyV22Pipeline"}')
    with pytest.raises(WorkbenchError, match="KandinskyV22Pipeline"):
        load_model(folder, device="cpu")


@pytest.mark.slow
def test_an_fp8_checkpoint_stays_fp8_and_bit_exact(tmp_path, tiny_sd15):
    """A file already stored in fp8 (here written by the merge engine) is used as stored under
    `auto`: the UNet's weights are the file's fp8 values, not an fp32 copy of them."""
    from safetensors import safe_open

    from workbench.recipes import parse_recipe
    from workbench.dispatch import run_recipe

    fp8 = tmp_path / "fp8.safetensors"
    recipe = parse_recipe(
        f"kind: merge\nname: fp8\nmodels: {{A: {tiny_sd15['A']}, B: {tiny_sd15['B']}}}\n"
        f"steps:\n  - {{id: m, method: weighted_sum, inputs: [A, B], alpha: 0.5}}\n"
        f"output: {{path: {fp8}, dtype: fp8_e4m3fn}}\n", tmp_path / "fp8.yaml")
    run_recipe(recipe, progress=False)
    model = load_model(fp8, device="cpu")
    assert model.memory_plan.decision("unet").storage == "fp8_e4m3fn"
    conv = model.pipe.unet.down_blocks[0].resnets[0].conv1.weight
    assert conv.dtype == torch.float8_e4m3fn
    with safe_open(str(fp8), "pt") as f:
        stored = f.get_tensor("model.diffusion_model.input_blocks.1.0.in_layers.2.weight")
    assert torch.equal(conv.view(torch.uint8), stored.view(torch.uint8))
    img = generate(model, ImageSettings("a cat", steps=2, width=64, height=64), [1])[0]
    assert img.image.size == (64, 64)
