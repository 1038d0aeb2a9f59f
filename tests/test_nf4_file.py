"""Forge's bitsandbytes NF4 checkpoints (`flux1-dev-bnb-nf4*.safetensors`), written by bitsandbytes
itself from the tiny FLUX (`quantize_4bit` + `QuantState.as_dict(packed=True)`), v1 with
double-quantized scales and v2 without: logical shapes for detection, the planner and the scan;
weights equal to bitsandbytes' own dequantization; images close to the unquantized model's;
merges only with `allow_dequantized`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

bnb = pytest.importorskip("bitsandbytes")

from workbench.errors import WorkbenchError  # noqa: E402
from workbench.formats.nf4_file import STATE  # noqa: E402
from workbench.testing.nf4_files import write_nf4  # noqa: E402

SETTINGS = dict(prompt="a red fox in snow", sampler="Euler", steps=2, cfg=3.5, width=64, height=64)


@pytest.fixture(scope="module")
def nf4_files(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("nf4")
    src = tiny_model("flux")
    return {"source": src,
            "v1": write_nf4(src, d / "flux1-dev-bnb-nf4.safetensors", nested=True),
            "v2": write_nf4(src, d / "flux1-dev-bnb-nf4-v2.safetensors", nested=False)}


def _bnb_reference(path: Path) -> dict[str, torch.Tensor]:
    """The file with every packed weight dequantized by bitsandbytes' own QuantState.from_dict and
    dequantize_4bit, written independently of workbench.formats.nf4_file."""
    raw = load_file(str(path))
    weights = {k.rpartition(STATE)[0] for k in raw if STATE in k}
    out = {}
    for key, value in raw.items():
        if key in weights:
            qs = {k[len(key) + 1:]: v for k, v in raw.items() if k.startswith(key + ".")}
            state = bnb.functional.QuantState.from_dict(qs, device=torch.device("cpu"))
            out[key] = bnb.functional.dequantize_4bit(value, state)
        elif not any(key.startswith(w + ".") for w in weights):
            out[key] = value
    return out


@pytest.mark.slow
def test_logical_shapes_reach_detection_the_planner_and_the_scan(nf4_files):
    from workbench.pipeline.memory_plan import DeviceInfo, plan_memory
    from workbench.pipeline.sizes import GB, component_sizes_from_header
    from workbench.pipeline.precision import nf4_available
    from workbench.formats.detect import detect
    from workbench.formats.model_file import read_model_header
    from workbench.formats.scan import scan

    source = load_file(str(nf4_files["source"]))
    want = detect(nf4_files["source"])
    for version in ("v1", "v2"):
        header = read_model_header(nf4_files[version])
        assert header.shapes() == {k: tuple(v.shape) for k, v in source.items()}
        qkv = header.tensors["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"]
        assert (qkv.dtype, qkv.shape, qkv.stored_shape) == ("NF4", (96, 32), (96 * 32 // 2, 1))
        got = detect(nf4_files[version])
        assert (got.arch, got.variant, got.kind, got.components) == (want.arch, want.variant, want.kind,
                                                                     want.components)
    sizes = {s.name: s for s in component_sizes_from_header(nf4_files["v2"], "flux")}
    plain = {s.name: s for s in component_sizes_from_header(nf4_files["source"], "flux")}
    assert sizes["transformer"].params == plain["transformer"].params
    assert sizes["transformer"].linear_params == plain["transformer"].linear_params
    assert sizes["transformer"].file_dtype == "NF4"
    gpu = plan_memory(list(sizes.values()), device=DeviceInfo("cuda", "RTX 2060", 12 * GB, 12 * GB), arch="flux")
    cpu = plan_memory(list(sizes.values()), device=DeviceInfo(), arch="flux")
    for plan in (gpu, cpu) if nf4_available("cpu") else (gpu,):
        assert plan.decision("transformer").storage == "nf4"
        assert "NF4 in the file" in plan.decision("transformer").reason

    listed = {Path(e.path).name: e for e in scan(nf4_files["v1"].parent, with_hash=False)}
    entry = listed["flux1-dev-bnb-nf4.safetensors"]
    assert (entry.arch, entry.kind, entry.dtype, entry.error) == ("flux", "checkpoint", "bitsandbytes nf4", None)
    assert any("generation dequantizes it" in n for n in entry.notes)


@pytest.mark.slow
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_weights_equal_bitsandbytes_dequantization_and_the_image_is_close(nf4_files, version, tmp_path):
    from workbench.pipeline.generate import ImageSettings, generate, load_model
    from workbench.pipeline.load import load_pipeline

    path = nf4_files[version]
    plain = tmp_path / "bnb-dequantized.safetensors"
    save_file(_bnb_reference(path), str(plain))
    ours = load_pipeline(path, "flux", torch_dtype=torch.float32)
    ref = load_pipeline(plain, "flux", torch_dtype=torch.float32)
    for comp in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        a, b = getattr(ours, comp).state_dict(), getattr(ref, comp).state_dict()
        assert a.keys() == b.keys()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, different[:5]

    settings = ImageSettings(**SETTINGS)
    img = generate(load_model(path, device="cpu", weights="fp32"), settings, [3])[0]
    full = load_model(nf4_files["source"], device="cpu", weights="fp32")
    want, other = generate(full, settings, [3])[0], generate(full, settings, [4])[0]
    px = lambda g: np.asarray(g.image, dtype=np.int16)  # noqa: E731
    diff, seeds = np.abs(px(img) - px(want)).mean(), np.abs(px(want) - px(other)).mean()
    # measured on the tiny FLUX: NF4 vs bf16 mean |diff| 11.9 of 255 (v1 and v2); another seed 42
    assert diff <= 20 and diff < 0.6 * seeds, (diff, seeds)


@pytest.mark.slow
def test_merges_refuse_nf4_unless_allowed_then_merge_the_dequantized_weights(nf4_files, tiny_model, tmp_path):
    from workbench.recipes import parse_recipe
    from workbench.dispatch import run_recipe

    def recipe(a, out, extra=""):
        return parse_recipe(f"kind: merge\nname: m\nmodels: {{A: {a}, B: {tiny_model('flux', 1)}}}\n"
                            f"steps:\n  - {{id: m, method: weighted_sum, inputs: [A, B], alpha: 0.4}}\n"
                            f"output: {{path: {out}{extra}}}\n", tmp_path / "m.yaml")

    out = tmp_path / "merged.safetensors"
    with pytest.raises(WorkbenchError, match=r"model A: .*bnb-nf4-v2\.safetensors: a bitsandbytes nf4 file; "
                                             r"a merge .*allow_dequantized: true"):
        run_recipe(recipe(nf4_files["v2"], out), progress=False)
    assert not out.exists()
    result = run_recipe(recipe(nf4_files["v2"], out, ", allow_dequantized: true"), progress=False)
    assert result.outputs[0] == out
    plain = tmp_path / "bnb-dequantized.safetensors"
    save_file(_bnb_reference(nf4_files["v2"]), str(plain))
    expected = tmp_path / "expected.safetensors"
    run_recipe(recipe(plain, expected), progress=False)
    got, want = load_file(str(out)), load_file(str(expected))
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    assert got["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"].dtype == torch.bfloat16


@pytest.mark.slow
def test_a_lora_trains_on_a_forge_nf4_base(nf4_files, style_set, tmp_path):
    from workbench.recipes.loader import load_recipe
    from workbench.dispatch import build_plan, run_plan

    def run(recipe, **options):
        return run_plan(build_plan(recipe), **options)

    (tmp_path / "r.yaml").write_text(
        f"kind: train\nname: tiny\nbase: {nf4_files['v1']}\ndataset: {style_set}\ntrigger: wbstyle\n"
        "resolution: 64\nmax_steps: 2\nlearning_rate: 1.0e-3\nseed: 5\nnetwork: {type: lora, rank: 4, alpha: 4}\n"
        f"output: {{dir: {tmp_path / 'f'}, save_every: 2, save_precision: fp32}}\n")
    recipe = load_recipe(tmp_path / "r.yaml")
    assert "2/2 steps" in run(recipe, progress=False, cache_root=tmp_path / "cache").summary
    w = load_file(str(recipe.lora_path))
    assert all(torch.isfinite(v).all() for v in w.values())
    assert w["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].abs().sum() > 0
