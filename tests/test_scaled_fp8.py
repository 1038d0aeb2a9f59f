"""ComfyUI scaled-fp8 files (old `scale_weight` + marker layout, new `weight_scale` + `comfy_quant`
layout) load as their multiplied-out weights, on tiny real-layout SD1.5 and split FLUX files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from workbench.pipeline.load import load_pipeline
from workbench.errors import FormatError
from workbench.formats import scaled_fp8

FP8 = torch.float8_e4m3fn


def write_scaled(src, scaled_path, plain_path, *, prefix: str, layout: str) -> int:
    """Write `src` as a ComfyUI scaled-fp8 file (every >=2-D float weight under `prefix`), and the
    same weights multiplied out in fp32 as a plain file. Returns the number of scaled layers."""
    tensors = load_file(src)
    scaled, plain, n = {}, {}, 0
    for key, w in tensors.items():
        if key.startswith(prefix) and key.endswith(".weight") and w.ndim >= 2 and w.is_floating_point():
            layer = key[: -len(".weight")]
            scale = w.float().abs().max() / torch.finfo(FP8).max
            q = (w.float() / scale).to(FP8)
            scaled[key] = q
            if layout == "old":
                scaled[layer + ".scale_weight"] = scale.reshape(())
                scaled[layer + ".scale_input"] = torch.ones(())
            else:
                scaled[layer + ".weight_scale"] = scale.reshape(())
                scaled[layer + ".comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'),
                                                              dtype=torch.uint8)
            plain[key] = q.float() * scale
            n += 1
        else:
            scaled[key] = plain[key] = w
    if layout == "old":
        scaled[prefix + "scaled_fp8"] = torch.empty(0, dtype=FP8)
    save_file(scaled, str(scaled_path))
    save_file(plain, str(plain_path))
    return n


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, different[:5]


@pytest.mark.slow
def test_old_layout_sd15_file_loads_as_its_multiplied_out_weights(tmp_path, tiny_sd15):
    scaled, plain = tmp_path / "scaled.safetensors", tmp_path / "plain.safetensors"
    n = write_scaled(tiny_sd15["A"], scaled, plain, prefix="model.diffusion_model.", layout="old")
    assert n > 50
    ours = load_pipeline(scaled, "sd15", torch_dtype=torch.float32)
    ref = load_pipeline(plain, "sd15", torch_dtype=torch.float32)
    _same_state(ours.unet, ref.unet)
    _same_state(ours.text_encoder, ref.text_encoder)
    # what a loader that ignores the scales holds: the raw fp8 values, not the weights; diffusers
    # called directly (outside our loader, e.g. in another thread) still reads the file as it is
    raw = load_file(scaled)["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"].float()
    conv = ours.unet.down_blocks[0].resnets[0].conv1.weight
    assert not torch.allclose(conv, raw) and raw.abs().max() == torch.finfo(FP8).max
    from diffusers import StableDiffusionPipeline

    from workbench.formats.pipeline_config import config_dir

    plain = StableDiffusionPipeline.from_single_file(str(scaled), config=str(config_dir(scaled, "sd15")),
                                                     local_files_only=True, safety_checker=None,
                                                     requires_safety_checker=False)
    assert torch.equal(plain.unet.down_blocks[0].resnets[0].conv1.weight.detach(), raw)


@pytest.mark.slow
def test_auto_plan_keeps_a_scaled_unet_in_fp8_with_its_own_values(tmp_path, tiny_sd15):
    """Under `auto` the planner keeps an fp8 file in fp8; a scaled file's layers come back to the
    file's fp8 values and scale (to_scaled_fp8 recovers them), not to unscaled rounding."""
    from workbench.pipeline.generate import ImageSettings, generate, load_model

    scaled, plain = tmp_path / "scaled.safetensors", tmp_path / "plain.safetensors"
    write_scaled(tiny_sd15["A"], scaled, plain, prefix="model.diffusion_model.", layout="old")
    from workbench.formats.scan import scan

    listed = {e.path: e for e in scan(tmp_path, with_hash=False)}
    assert listed["scaled.safetensors"].dtype == "F16 + scaled fp8"  # the tiny text encoder is F16
    assert listed["plain.safetensors"].dtype == "F32"
    assert not any("scaled" in n for n in listed["plain.safetensors"].notes)
    assert any("scaled fp8: read with the scales applied" in n for n in listed["scaled.safetensors"].notes)
    model = load_model(scaled, device="cpu")
    unet = model.memory_plan.decision("unet")
    assert unet.storage == "fp8_e4m3fn" and "scaled fp8 in the file" in unet.reason
    conv = model.pipe.unet.down_blocks[0].resnets[0].conv1
    stored = load_file(scaled)
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2"
    assert conv.weight.dtype == FP8
    assert conv.fp8_scale == pytest.approx(float(stored[key + ".scale_weight"]), rel=1e-6)
    same = (conv.weight.view(torch.uint8) == stored[key + ".weight"].view(torch.uint8)).float().mean()
    assert same > 0.999
    img = generate(model, ImageSettings("a cat", steps=2, width=64, height=64), [1])[0]
    ref = generate(load_model(plain, device="cpu", weights="fp32"),
                   ImageSettings("a cat", steps=2, width=64, height=64), [1])[0]
    import numpy as np

    diff = np.abs(np.asarray(img.image, dtype=int) - np.asarray(ref.image, dtype=int))
    assert diff.max() <= 2


@pytest.mark.slow
def test_split_flux_with_scaled_t5_and_transformer(tmp_path):
    """Forge/ComfyUI FLUX folders: t5xxl in the new layout (weight_scale + comfy_quant), the
    transformer in the old one with a bare `scaled_fp8` marker; both load multiplied out."""
    from workbench.testing import flux

    parts = flux.build_split(tmp_path / "src", "dev")
    ours, ref = tmp_path / "ours", tmp_path / "ref"
    ours.mkdir(), ref.mkdir()
    for comp, path in parts.items():
        if comp == "text_encoder_2":
            write_scaled(path, ours / path.name, ref / path.name, prefix="", layout="new")
        elif comp == "transformer":
            write_scaled(path, ours / path.name, ref / path.name, prefix="", layout="old")
        else:
            shutil.copy(path, ours / path.name)
            shutil.copy(path, ref / path.name)
    assert "scaled_fp8" in load_file(ours / parts["transformer"].name)
    a = load_pipeline(ours, "flux", torch_dtype=torch.float32)
    b = load_pipeline(ref, "flux", torch_dtype=torch.float32)
    _same_state(a.text_encoder_2, b.text_encoder_2)
    _same_state(a.transformer, b.transformer)


def test_unsupported_formats_and_bad_scales_are_refused_with_the_layer(tmp_path, tiny_sd15):
    tensors = load_file(tiny_sd15["A"])
    layer = "model.diffusion_model.input_blocks.1.0.in_layers.2"
    meta = {scaled_fp8.METADATA_KEY: json.dumps({"layers": {layer: {"format": "nvfp4"}}})}
    path = tmp_path / "nvfp4.safetensors"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(FormatError, match=r"nvfp4\.safetensors.*in_layers\.2.*'nvfp4'"):
        load_pipeline(path, "sd15", torch_dtype=torch.float32)

    w = torch.randn(4, 4)
    with pytest.raises(FormatError, match=r"m\.safetensors.*shape \(4,\).*one number per layer"):
        scaled_fp8.dequantize({"a.weight": w.to(FP8), "a.weight_scale": torch.ones(4)}, torch.float32,
                              path="m.safetensors")
    with pytest.raises(FormatError, match="has no weight 'b.weight'"):
        scaled_fp8.dequantize({"b.scale_weight": torch.ones(())}, torch.float32)
    out = scaled_fp8.dequantize({"a.weight": w, "b": w}, torch.float32)
    assert out.keys() == {"a.weight", "b"} and out["a.weight"] is w  # unscaled dicts pass through


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["old", "new"])
def test_merge_and_extraction_read_a_scaled_file_as_its_multiplied_out_weights(tmp_path, tiny_sd15, layout):
    """Merges and LoRA extraction multiply the scales out while reading: the same results, tensor
    for tensor, as from the multiplied-out (fp32) file."""
    from workbench.merge.extract import extract_lora
    from workbench.kinds import merge as merge_kind

    def describe(recipe):
        plan = merge_kind.describe(recipe)
        return plan.lines, plan.problems
    from workbench.recipes import parse_recipe
    from workbench.dispatch import run_recipe

    scaled, plain = tmp_path / "scaled.safetensors", tmp_path / "plain.safetensors"
    write_scaled(tiny_sd15["A"], scaled, plain, prefix="model.diffusion_model.", layout=layout)

    def recipe(a, b, out):  # A + 0.5 (B - C)
        return parse_recipe(
            f"kind: merge\nname: s\nmodels: {{A: {a}, B: {b}, C: {tiny_sd15['C']}}}\n"
            f"steps:\n  - {{id: m, method: add_difference, inputs: [A, B, C], alpha: 0.5}}\n"
            f"output: {{path: {out}}}\n", tmp_path / "s.yaml")

    for first, second, name in ((scaled, tiny_sd15["B"], "a"), (tiny_sd15["B"], scaled, "b")):
        ours, ref = tmp_path / f"{name}-ours.safetensors", tmp_path / f"{name}-ref.safetensors"
        r = recipe(first, second, ours)
        lines, problems = describe(r)
        assert not problems and any("scaled fp8: each layer read as its fp8 values times its scale" in ln
                                    for ln in lines)
        run_recipe(r, progress=False)
        run_recipe(recipe(plain if first == scaled else first, plain if second == scaled else second, ref),
                   progress=False)
        got, want = load_file(ours), load_file(ref)
        assert got.keys() == want.keys() and not any(k.endswith(("scale_weight", "weight_scale")) for k in got)
        assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)

    a = extract_lora(scaled, tiny_sd15["C"], tmp_path / "x.safetensors", rank=4, dtype="fp32")
    b = extract_lora(plain, tiny_sd15["C"], tmp_path / "y.safetensors", rank=4, dtype="fp32")
    la, lb = load_file(a), load_file(b)
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in lb)


@pytest.mark.slow
def test_scaled_files_load_right_from_two_threads_at_once(tmp_path, tiny_sd15):
    """The dashboard runs jobs in worker threads: overlapping loads of scaled files all get their
    scales (the reader wrapper is installed once and keyed by file, not swapped in and out)."""
    from concurrent.futures import ThreadPoolExecutor

    scaled, plain = tmp_path / "scaled.safetensors", tmp_path / "plain.safetensors"
    write_scaled(tiny_sd15["B"], scaled, plain, prefix="model.diffusion_model.", layout="new")
    ref = load_pipeline(plain, "sd15", torch_dtype=torch.float32)
    with ThreadPoolExecutor(3) as pool:
        pipes = list(pool.map(lambda p: load_pipeline(p, "sd15", torch_dtype=torch.float32),
                              [scaled, scaled, plain]))
    for pipe in pipes:
        _same_state(pipe.unet, ref.unet)
    # overlapping loads must not leave accelerate's meta-device init installed (LOAD_LOCK)
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"
