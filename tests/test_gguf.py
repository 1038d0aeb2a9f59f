"""GGUF model files (city96's ComfyUI-GGUF conversions, stable-diffusion.cpp checkpoints), written
from the tiny real-layout models with the `gguf` package's own writer and quantizers: header,
detection, sizes, scan, generation (split FLUX folder and all-in-one SDXL), LoRA, grid, training
and merges. Weights are checked against `gguf.quants.dequantize`, images against the unquantized
model's with measured bounds (stated at each assertion)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

gguf = pytest.importorskip("gguf")

from workbench.pipeline.generate import ImageSettings, LoraUse, generate, load_model  # noqa: E402
from workbench.errors import WorkbenchError  # noqa: E402
from workbench.formats.gguf_file import ORIG_SHAPE, iter_packed, read_gguf_header  # noqa: E402
from workbench.testing import flux  # noqa: E402
from workbench.testing.gguf_files import build_flux_gguf_folder, build_gguf, quantize_q4_k  # noqa: E402

from helpers.packed_training import packed_weights_watched  # noqa: E402

FLUX_SETTINGS = ImageSettings("a red fox in snow", sampler="Euler", steps=2, cfg=3.5, width=64, height=64)
SDXL_SETTINGS = ImageSettings("a red fox in snow", steps=2, width=64, height=64)


def _pixels(img) -> np.ndarray:
    return np.asarray(img.image, dtype=np.int16)


def _mean_diff(a, b) -> float:
    return float(np.abs(_pixels(a) - _pixels(b)).mean())


def _gguf_reference(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file dequantized by the gguf package (numpy, float32), in its real
    shape (`comfy.gguf.orig_shape`), independently of workbench.formats.gguf_file."""
    reader = gguf.GGUFReader(str(path))
    orig = {k[len(ORIG_SHAPE):]: tuple(f.contents()) for k, f in reader.fields.items() if k.startswith(ORIG_SHAPE)}
    out = {}
    for t in reader.tensors:
        values = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        out[t.name] = torch.from_numpy(values).reshape(orig.get(t.name, tuple(reversed(t.shape.tolist()))))
    return out


def _diffusers_lora(pipe, folder: Path) -> Path:
    """A diffusers-format FLUX LoRA as diffusers' `save_lora_weights` writes it (random, non-zero)."""
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(0)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                            target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = get_peft_model_state_dict(pipe.transformer)
    pipe.transformer.delete_adapters("default")
    type(pipe).save_lora_weights(folder, transformer_lora_layers=layers)
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def flux_q8(tmp_path_factory):
    """A Forge-style folder with flux1-dev-Q8_0.gguf, and the folder of the bf16 files it came from."""
    parts = build_flux_gguf_folder(tmp_path_factory.mktemp("flux_q8"), "Q8_0")
    return parts, parts["source"].parent


@pytest.fixture(scope="module")
def sdxl_files(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("sdxl_gguf")
    src = tiny_model("sdxl")
    return {"source": src,
            "checkpoint": build_gguf(src, d / "sdxl-tiny-Q4_K.gguf", "sdxl", "Q4_K", layout="checkpoint"),
            "unet": build_gguf(src, d / "sdxl-unet-Q8_0.gguf", "sdxl", "Q8_0")}


# ------------------------------------------------------------------------------------- quantizers

def test_q4_k_blocks_read_back_by_gguf_and_by_diffusers():
    """The test writer's Q4_K packing (gguf 0.19 has no Q4_K quantizer) is what gguf's own
    dequantizer and diffusers' torch dequantizer both read, and the values are close to the data."""
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor

    x = np.random.default_rng(0).normal(size=(6, 512)).astype(np.float32)
    for qtype, packed in (("Q4_K", quantize_q4_k(x)),
                          ("Q8_0", gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0))):
        kind = getattr(gguf.GGMLQuantizationType, qtype)
        block, size = gguf.GGML_QUANT_SIZES[kind]
        assert packed.shape == (6, 512 // block * size) and packed.dtype == np.uint8
        ours = gguf.quants.dequantize(packed, kind)
        rel = np.sqrt(((ours - x) ** 2).mean() / (x ** 2).mean())
        assert rel < {"Q4_K": 0.12, "Q8_0": 0.01}[qtype], (qtype, rel)  # measured 0.085 and 0.0045
        theirs = dequantize_gguf_tensor(GGUFParameter(torch.from_numpy(packed), quant_type=kind)).float()
        _assert_fp16_close(theirs, torch.from_numpy(ours))


def _dequantized(packed: torch.Tensor) -> torch.Tensor:
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    return dequantize_gguf_tensor(packed)


def _assert_fp16_close(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """diffusers dequantizes in float16: Q8_0's one product is rounded once; K-quants round
    d*scale, then *q, then the min's product (measured worst 1.3e-3 of the tensor's range)."""
    err = float((got.float() - want.float()).abs().max())
    assert err <= 2**-8 * float(want.abs().max()) + 1e-7, (what, err)


# ------------------------------------------------------------------------ header, detection, scan

@pytest.mark.slow
def test_headers_give_logical_shapes_to_detection_sizes_and_scan(flux_q8, sdxl_files, tiny_model, tmp_path):
    from workbench.pipeline.memory_plan import DeviceInfo, plan_memory
    from workbench.pipeline.sizes import GB, component_sizes_from_header
    from workbench.formats.detect import detect
    from workbench.formats.scan import scan

    parts, source = flux_q8
    sd3 = build_gguf(tiny_model("sd3"), tmp_path / "sd3.5_tiny-Q8_0.gguf", "sd3", "Q8_0")
    cases = [(parts["transformer"], load_file(parts["source"]), ("flux", "dev", "transformer")),
             (sdxl_files["unet"], load_file(sdxl_files["source"]), ("sdxl", "sdxl-base", "unet")),
             (sd3, load_file(tiny_model("sd3")), ("sd3", None, "transformer"))]
    for path, src, (arch, variant, kind) in cases:
        header = read_gguf_header(path)
        bare = {k.removeprefix("model.diffusion_model."): tuple(v.shape) for k, v in src.items()
                if not k.startswith(("text_encoders.", "vae.", "first_stage_model.", "conditioner."))}
        assert header.shapes() == bare  # logical shapes, not the packed byte shapes
        for name, t in header.tensors.items():  # bytes per quant type from the gguf package's table
            block, size = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, t.dtype)]
            assert t.nbytes == t.numel // block * size, name
        info = detect(path)
        assert (info.arch, info.kind) == (arch, kind) and (variant is None or info.variant == variant)
    sdxl = read_gguf_header(sdxl_files["unet"])
    reshaped = [k for k, t in sdxl.tensors.items() if t.stored_shape != t.shape]
    # rows not a multiple of 256 are stored as (n/256, 256) with comfy.gguf.orig_shape: convolutions too
    assert any(len(sdxl.tensors[k].shape) == 4 for k in reshaped)
    assert all(sdxl.tensors[k].stored_shape == (sdxl.tensors[k].numel // 256, 256) for k in reshaped)

    size = component_sizes_from_header(parts["transformer"], "flux", fill_missing=False)[0]
    header = read_gguf_header(parts["transformer"])
    packed = [t for t in header.tensors.values() if t.dtype == "Q8_0" and len(t.shape) == 2]
    assert size.params == sum(v.numel() for v in load_file(parts["source"]).values())
    assert size.packed_bytes == sum(t.nbytes for t in packed) and size.packed_params > 0
    assert size.bytes_at("gguf") < size.bytes_at("bf16")
    plan = plan_memory([size], device=DeviceInfo("cuda", "RTX 2060", 12 * GB, 12 * GB), arch="flux",
                       weights="fp8")
    assert plan.decision("transformer").storage == "gguf"
    assert "GGUF Q8_0" in plan.decision("transformer").reason and "does not apply" in plan.decision("transformer").reason

    listed = {Path(e.path).name: e for e in scan(parts["transformer"].parent, with_hash=False)}
    entry = listed["flux1-dev-Q8_0.gguf"]
    assert (entry.arch, entry.kind, entry.dtype, entry.error) == ("flux", "transformer", "GGUF Q8_0", None)
    assert any("allow_dequantized" in n for n in entry.notes)
    listed = {Path(e.path).name: e for e in scan(sdxl_files["checkpoint"].parent, with_hash=False)}
    assert listed["sdxl-tiny-Q4_K.gguf"].dtype == "GGUF Q4_K"  # every UNet row reshaped to 256
    assert listed["sdxl-tiny-Q4_K.gguf"].kind == "checkpoint"


def test_a_damaged_gguf_file_is_named(tmp_path):
    from workbench.errors import FormatError
    from workbench.formats.detect import detect

    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 20)
    with pytest.raises(FormatError, match=r"broken\.gguf: not a readable GGUF file"):
        detect(path)


# -------------------------------------------------------------------------------------- generation

@pytest.mark.slow
def test_flux_gguf_folder_generates_close_to_bf16_and_takes_a_lora(flux_q8, tmp_path):
    """The FLUX set-up of 8-12 GB cards: the transformer as Q8_0 GGUF beside ae, clip_l and t5xxl."""
    parts, source = flux_q8
    model = load_model(parts["transformer"].parent, device="cpu")
    assert model.memory_plan.decision("transformer").storage == "gguf"
    packed = dict(iter_packed(model.pipe.transformer))
    assert len(packed) > 300 and all(p.dtype == torch.uint8 for p in packed.values())
    # a packed weight, dequantized as its layer will, is the gguf package's value (the fused qkv's
    # first third is to_q)
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    ref = _gguf_reference(parts["transformer"])["double_blocks.0.img_attn.qkv.weight"]
    to_q = dequantize_gguf_tensor(packed["transformer_blocks.0.attn.to_q.weight"]).float()
    assert torch.equal(to_q, ref[: ref.shape[0] // 3].half().float())  # Q8_0: d*q rounded once to fp16

    full = load_model(source, device="cpu", weights="fp32")
    a, b = generate(model, FLUX_SETTINGS, [3])[0], generate(full, FLUX_SETTINGS, [3])[0]
    other = generate(full, FLUX_SETTINGS, [4])[0]
    # measured: Q8_0 vs bf16 source mean |diff| 0.36 (max 3) of 255; another seed differs by 42
    assert _mean_diff(a, b) <= 2.0 and _mean_diff(b, other) > 20

    lora = _diffusers_lora(full.pipe, tmp_path / "lora")  # diffusers' kohya FLUX converter needs full widths
    la = generate(model, FLUX_SETTINGS, [3], loras=[LoraUse(lora, 1.0)])[0]
    lb = generate(full, FLUX_SETTINGS, [3], loras=[LoraUse(lora, 1.0)])[0]
    effect, gap = _mean_diff(la, a), _mean_diff(la, lb)
    # the LoRA changes the picture (measured 5.3) the same way on both bases (measured 0.44)
    assert effect > 3 and gap <= 2.0 and gap < effect / 2, (effect, gap)
    assert len(dict(iter_packed(model.pipe.transformer))) == len(packed)  # still packed, LoRA beside it


@pytest.mark.slow
def test_sdxl_gguf_checkpoint_q4_k_weights_equal_gguf_and_image_is_close(sdxl_files):
    """An all-in-one SDXL GGUF (stable-diffusion.cpp style) with Q4_K UNet tensors, stored reshaped
    with `comfy.gguf.orig_shape` where rows are short: every loaded weight is gguf's dequantization."""
    from workbench.pipeline.load import load_pipeline

    path = sdxl_files["checkpoint"]
    ref = _gguf_reference(path)
    pipe = load_pipeline(path, "sdxl", torch_dtype=torch.float32)
    plain = path.with_suffix(".dequantized.safetensors")
    save_file({k: v.contiguous() for k, v in ref.items()}, str(plain))
    expected = load_pipeline(plain, "sdxl", torch_dtype=torch.float32)
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        got, want = getattr(pipe, comp).state_dict(), getattr(expected, comp).state_dict()
        assert got.keys() == want.keys()
        for k in want:  # packed UNet weights (convolutions, reshaped Linear) compared dequantized
            value = _dequantized(got[k]).reshape(want[k].shape) if hasattr(got[k], "quant_type") else got[k]
            _assert_fp16_close(value, want[k], k)
    model = load_model(path, device="cpu")
    full = load_model(sdxl_files["source"], device="cpu", weights="fp32")
    a, b = generate(model, SDXL_SETTINGS, [3])[0], generate(full, SDXL_SETTINGS, [3])[0]
    other = generate(full, SDXL_SETTINGS, [4])[0]
    # measured: the 4-bit tiny UNet (widths 8-32) mean |diff| 24.5 of 255 (Q8_0: 3.9); another seed 48
    diff, seeds = _mean_diff(a, b), _mean_diff(b, other)
    assert diff <= 35 and diff < 0.75 * seeds, (diff, seeds)


def _resident_bytes(module: torch.nn.Module) -> int:
    """Parameter and buffer bytes as they sit in memory (packed uint8 for GGUF weights)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _unpack(module: torch.nn.Module) -> int:
    """Turn every packed layer back into a plain one holding its dequantized weight (what loading
    did before `pipeline.gguf_layers` existed); returns how many layers changed."""
    from diffusers.quantizers.gguf.utils import GGUFLinear, dequantize_gguf_tensor

    from workbench.pipeline.gguf_layers import PackedConv2d, PackedLinear

    count = 0
    for m in module.modules():
        if isinstance(m, (PackedConv2d, PackedLinear)):
            weight = dequantize_gguf_tensor(m.weight).reshape(m.logical_shape).to(m.compute_dtype)
            m.__class__ = torch.nn.Conv2d if isinstance(m, PackedConv2d) else torch.nn.Linear
            m.weight = torch.nn.Parameter(weight, requires_grad=False)
            count += 1
        elif isinstance(m, GGUFLinear):
            m.weight = torch.nn.Parameter(dequantize_gguf_tensor(m.weight).to(m.compute_dtype), requires_grad=False)
            m.__class__ = torch.nn.Linear
            count += 1
    return count


@pytest.mark.slow
def test_gguf_unets_stay_packed_in_memory_as_the_planner_sizes_them_and_draw_the_same_image(sdxl_files, tiny_model,
                                                                                            tmp_path):
    """Convolutions and reshaped Linear weights stay packed too (`pipeline.gguf_layers`): the UNet's
    resident bytes are the planner's `gguf` bytes from the header, well under the fp16 model's, and
    the image equals the one of the same model with every weight dequantized at load."""
    from workbench.pipeline.load import load_pipeline
    from workbench.pipeline.sizes import component_sizes_from_header

    sd15 = build_gguf(tiny_model("sd15"), tmp_path / "sd15-Q8_0.gguf", "sd15", "Q8_0", layout="checkpoint")
    for path, source, arch, bound in ((sd15, tiny_model("sd15"), "sd15", 0.6),
                                      (sdxl_files["checkpoint"], sdxl_files["source"], "sdxl", 0.5)):
        unet = load_pipeline(path, arch, torch_dtype=torch.float16).unet
        plain = load_pipeline(source, arch, torch_dtype=torch.float16).unet
        planned = next(s for s in component_sizes_from_header(path, arch) if s.name == "unet")
        # measured: SD1.5 Q8_0 0.554 of fp16, SDXL Q4_K 0.476 (the tiny models' many <= 1024-value
        # tensors stay F32 in the file, as the conversions keep them, and fp16 in memory)
        assert _resident_bytes(unet) == planned.bytes_at("gguf") < bound * _resident_bytes(plain), arch
        header = read_gguf_header(path).tensors  # every quantized convolution of the file stays packed
        quantized = [k for k, t in header.items() if k.startswith("model.diffusion_model.") and t.is_packed
                     and len(t.shape) == 4]
        convs = [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d) and hasattr(m.weight, "quant_type")]
        assert len(convs) == len(quantized) > 10, arch

    model = load_model(sdxl_files["checkpoint"], device="cpu")
    assert model.memory_plan.decision("unet").storage == "gguf"
    packed = generate(model, SDXL_SETTINGS, [3])[0]
    assert _unpack(model.pipe.unet) > 100 and not list(iter_packed(model.pipe.unet))
    unpacked = generate(model, SDXL_SETTINGS, [3])[0]
    assert np.array_equal(_pixels(packed), _pixels(unpacked))  # the same values, dequantized later


@pytest.mark.slow
def test_grid_runs_a_gguf_folder_beside_its_source(flux_q8, tmp_path):
    from workbench.recipes.loader import load_recipe
    from workbench.dispatch import run_recipe

    parts, source = flux_q8
    folder = parts["transformer"].parent
    recipe = tmp_path / "g.yaml"
    recipe.write_text(f"kind: grid\nname: q8\n"
                      f"defaults: {{model: {folder}, sampler: Euler, steps: 2, cfg: 3.5, width: 64, height: 64}}\n"
                      f"x: {{axis: model, values: [{folder}, {source}]}}\nseeds: [3]\noutput: {{dir: out}}\n")
    run_recipe(load_recipe(recipe), progress=False)
    cells = sorted((tmp_path / "out" / "cells").glob("*.png"))
    assert len(cells) == 2 and (tmp_path / "out" / "grid.png").is_file()
    a, b = (np.asarray(Image.open(c), dtype=np.int16) for c in cells)
    assert 0 < np.abs(a - b).mean() <= 2.0  # the Q8_0 and bf16 cells: different files, nearly one image


# -------------------------------------------------------------------------------------- training

@pytest.mark.slow
def test_a_lora_trains_on_a_gguf_flux_base(tmp_path, tiny_model, style_set):
    """The frozen base stays packed (peft wraps diffusers' GGUFLinear); the LoRA learns."""
    from workbench.recipes.loader import load_recipe
    from workbench.dispatch import build_plan, run_plan

    def run(recipe, **options):
        return run_plan(build_plan(recipe), **options)

    base = build_gguf(tiny_model("flux"), tmp_path / "flux-tiny-Q8_0.gguf", "flux", "Q8_0", layout="checkpoint")
    text = (f"kind: train\nname: tiny\nbase: {base}\ndataset: {style_set}\ntrigger: wbstyle\nresolution: 64\n"
            "max_steps: 2\nlearning_rate: 1.0e-3\nseed: 5\nnetwork: {type: lora, rank: 4, alpha: 4}\n"
            f"output: {{dir: {tmp_path / 'f'}, save_every: 2, save_precision: fp32}}\n")
    (tmp_path / "r.yaml").write_text(text)
    recipe = load_recipe(tmp_path / "r.yaml")
    with packed_weights_watched() as seen:
        result = run(recipe, progress=False, cache_root=tmp_path / "cache")
    assert "2/2 steps" in result.summary
    assert len(seen["before"]) > 300 and seen["wrapped"]
    assert all(torch.equal(seen["before"][n], seen["after"][n]) for n in seen["before"])
    w = load_file(str(recipe.lora_path))
    assert all(torch.isfinite(v).all() for v in w.values())
    assert w["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].abs().sum() > 0


# ---------------------------------------------------------------------------------------- merges

def _merge_recipe(tmp_path: Path, a: Path, b: Path, out: Path, extra: str = ""):
    from workbench.recipes import parse_recipe

    return parse_recipe(f"kind: merge\nname: m\nmodels: {{A: {a}, B: {b}}}\n"
                        f"steps:\n  - {{id: m, method: weighted_sum, inputs: [A, B], alpha: 0.3}}\n"
                        f"output: {{path: {out}{extra}}}\n", tmp_path / "m.yaml")


@pytest.mark.slow
def test_merges_refuse_gguf_unless_allowed_then_merge_its_dequantized_values(flux_q8, tmp_path):
    from workbench.merge.extract import plan_extraction
    from workbench.kinds import merge as merge_kind

    def describe(recipe):
        plan = merge_kind.describe(recipe)
        return plan.lines, plan.problems
    from workbench.dispatch import run_recipe

    parts, _ = flux_q8
    a = parts["transformer"]
    b = flux.build_transformer(tmp_path / "flux1-dev-other.safetensors", seed=1)
    out = tmp_path / "merged.safetensors"
    with pytest.raises(WorkbenchError, match=r"model A: .*flux1-dev-Q8_0\.gguf: a GGUF Q8_0 file; a merge .*"
                                             r"approximations.*output\.allow_dequantized: true"):
        run_recipe(_merge_recipe(tmp_path, a, b, out), progress=False)
    assert not out.exists()
    with pytest.raises(WorkbenchError, match=r"tuned: .*\.gguf: a GGUF Q8_0 file; LoRA extraction"):
        plan_extraction(a, b, 4, None, ("unet",))

    allowed = _merge_recipe(tmp_path, a, b, out, ", allow_dequantized: true")
    lines, problems = describe(allowed)
    assert not problems and any("A: GGUF Q8_0, read dequantized" in ln for ln in lines)
    assert any("output precision: float16" in ln for ln in lines)
    run_recipe(allowed, progress=False)
    # the same merge of a safetensors file holding gguf's own dequantization (Q8_0: one exact
    # product d*q, rounded once to float16 as diffusers' dequantizer does)
    header = read_gguf_header(a)
    ref = {k: (v if header.tensors[k].dtype == "F32" else v.half()) for k, v in _gguf_reference(a).items()}
    plain = tmp_path / "dequantized.safetensors"
    save_file(ref, str(plain))
    expected = tmp_path / "expected.safetensors"
    run_recipe(_merge_recipe(tmp_path, plain, b, expected), progress=False)
    got, want = load_file(str(out)), load_file(str(expected))
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)


def test_planner_fits_flux_q4_k_on_a_12_gb_card_and_names_the_way_out_for_q8_0():
    """Full-size FLUX.1-dev transformer sizes (11.9 G parameters, Linear weights ~11.8 G) at the
    gguf package's bytes per quant type: Q8_0 (12.6 GB) is kept whole and does not fit an 11 GB
    budget, Q4_K (6.6 GB) does."""
    from workbench.pipeline.memory_plan import DeviceInfo, plan_memory
    from workbench.pipeline.sizes import GB
    from workbench.pipeline.sizes import ComponentSize, _standard

    params, linear = 11_901_408_320, 11_800_000_000
    device = DeviceInfo("cuda", "RTX 2060", 12 * GB, 12 * GB)
    others = [_standard("flux", n) for n in ("text_encoder", "text_encoder_2", "vae")]
    for qtype, fits in (("Q8_0", False), ("Q4_K", True)):
        block, size = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, qtype)]
        t = ComponentSize("transformer", params, linear, linear, tuple([params // 57] * 57), 3072 * 12288, qtype,
                          packed_params=linear, packed_bytes=linear * size // block)
        plan = lambda: plan_memory([t, *others], device=device, arch="flux", vram_budget_mb=11000)  # noqa: E731
        if fits:
            assert plan().decision("transformer").storage == "gguf"
        else:
            with pytest.raises(WorkbenchError, match=r"12\.\d GB in gguf.*not streamed.*Q5_K_S or Q4_K_S"):
                plan()
