"""LoRA Block Weight strings and presets: their meaning in our block ids, the recipe syntax, and a
LoRA with block weights previewed at generation time equal to the same LoRA baked with `blocks:`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from workbench.errors import WorkbenchError
from workbench.formats import lbw
from workbench.formats.blocks import BLOCK_IDS, block_of, parse_block_values
from workbench.formats.lora_keys import kohya_modules, module_table
from workbench.formats.safetensors_io import read_header

sys.path.insert(0, str(Path(__file__).parent))
from helpers.denoiser_inputs import denoiser_inputs

# ------------------------------------------------------------------------------------ meanings


def test_presets_in_our_block_ids():
    """The extension's 17-value order BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03-OUT11;
    blocks it does not name (IN00, IN03, IN06, IN09-11, OUT00-02) get 0 (its `to26`)."""
    ins = parse_block_values("sd15", "INS")
    assert {k for k, v in ins.items() if v} == {"BASE", "IN01", "IN02", "IN04"}
    outd = parse_block_values("sd15", "lbw=OUTD")
    assert {k for k, v in outd.items() if v} == {"BASE", "OUT03", "OUT04", "OUT05", "OUT06"}
    half = parse_block_values("sd15", "all0.5")
    assert half["BASE"] == half["OUT11"] == 0.5 and half["IN00"] == half["OUT00"] == 0.0
    assert set(parse_block_values("sd15", "NONE").values()) == {0.0}
    every = parse_block_values("sd15", "ALL")
    assert [k for k, v in every.items() if not v] == ["IN00", "IN03", "IN06", "IN09", "IN10", "IN11",
                                                      "OUT00", "OUT01", "OUT02"]
    # on SDXL a 17-value preset is applied by block id, as the extension does
    xl = parse_block_values("sdxl", "ALL")
    assert set(xl) == set(BLOCK_IDS["sdxl"])
    assert [k for k, v in xl.items() if not v] == ["IN00", "IN03", "IN06", "OUT00", "OUT01", "OUT02"]


def test_value_lists_by_architecture():
    vals17 = ",".join(str(i) for i in range(17))
    sd15 = parse_block_values("sd15", vals17)
    assert [sd15[i] for i in lbw.BLOCKID17] == list(range(17)) and sd15["IN03"] == 0.0
    vals12 = [0.5, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    xl = parse_block_values("sdxl", vals12)
    assert [xl[i] for i in lbw.BLOCKID12] == vals12 and xl["OUT06"] == xl["IN01"] == 0.0
    flux = parse_block_values("flux", "FLUXALL")
    assert set(flux.values()) == {1.0} and set(flux) == set(BLOCK_IDS["flux"])
    f61 = [0.3, 0.3, 0.7] + [1.0] * 19 + [0.0] * 38 + [0.2]
    flux = parse_block_values("flux", f61)
    assert flux["BASE"] == 0.3 and flux["IN"] == 0.7 and flux["D18"] == 1.0 and flux["S00"] == 0.0
    assert flux["OUT"] == 0.2
    with pytest.raises(WorkbenchError, match="CLIP 0.3 and T5 0.4"):
        parse_block_values("flux", [0.3, 0.4] + [1.0] * 59)
    with pytest.raises(WorkbenchError, match="SDXL .* sd15 LoRA takes 17 or 26"):
        parse_block_values("sd15", vals12)
    with pytest.raises(WorkbenchError, match="FLUX"):
        parse_block_values("sd15", [1.0] * 61)
    # the supermerger forms still work
    assert parse_block_values("sd15", "GRAD_V")["OUT11"] == 1.0


def test_recipe_syntax_for_generation_loras(tmp_path):
    from workbench.recipes import parse_recipe, recipe_to_yaml
    from workbench.recipes.common import LoraRef, split_lora_spec

    assert split_lora_spec("s.safetensors:0.8:INS") == ("s.safetensors", 0.8, "INS")
    assert split_lora_spec("C:\\l\\s.safetensors:0.8:ALL0.5") == ("C:\\l\\s.safetensors", 0.8, "ALL0.5")
    assert split_lora_spec("s.safetensors:lbw=OUTS") == ("s.safetensors", 1.0, "OUTS")
    assert split_lora_spec("s.safetensors:0.7") == ("s.safetensors", 0.7, None)
    body = ("kind: generate\nname: g\nmodel: m.safetensors\nprompt: a cat\nloras:\n"
            "  - 'a.safetensors:0.5:1,1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0'\n"
            "  - {path: b.safetensors, weight: 1.0, blocks: MIDD}\n  - c.safetensors:1\n"
            "output: {dir: out}\n")
    recipe = parse_recipe(body, tmp_path / "r.yaml")
    a, b, c = recipe.loras
    assert (a.weight, a.blocks) == (0.5, "1,1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0")
    assert b.blocks == "MIDD" and c.blocks is None
    text = recipe_to_yaml(recipe)
    assert "b.safetensors:1:lbw=MIDD" in text and "c.safetensors:1\n" in text
    assert parse_recipe(text, tmp_path / "r.yaml").model_dump() == recipe.model_dump()
    with pytest.raises(WorkbenchError, match="bad LoRA block weights"):
        parse_recipe(body.replace("MIDD", "MIDDLE"), tmp_path / "r.yaml")
    assert LoraRef(path=tmp_path / "x", weight=1, blocks="lbw=INS").blocks == "INS"


def test_merge_recipe_accepts_lbw_blocks(tmp_path):
    from workbench.recipes import parse_recipe

    for blocks in ("ALL0.5", "INS", ",".join(["1"] * 17), ",".join(["1"] * 12), "SMOOTHSTEP*2"):
        body = (f"kind: merge\nname: t\nmodels:\n  A: a.safetensors\n  L: l.safetensors\nsteps:\n"
                f"  - {{id: m, method: add_lora, inputs: [A, L], blocks: '{blocks}'}}\n"
                "output:\n  path: o.safetensors\n")
        assert parse_recipe(body, tmp_path / "r.yaml").steps[0].blocks == blocks


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sd15", "sdxl", "sd3", "flux"])
def test_diffusers_layers_get_the_block_of_their_checkpoint_weight(tiny_model, arch):
    """lbw.diffusers_block (used for peft layers at generation time) agrees with blocks.block_of
    (used for checkpoint keys in bakes) on every layer of the tiny model."""
    table = module_table(arch, read_header(tiny_model(arch)).shapes())
    n = 0
    for key, places in table.diffusers.items():
        for name, _ in places:
            comp, _, path = name.partition(".")
            assert lbw.diffusers_block(arch, comp, path) == block_of(arch, key), (name, key)
            n += 1
    assert n > 50


# ---------------------------------------------------------------------- preview equals bake

def _kohya_lora(path: Path, ckpt: Path, arch: str, conv: bool = False) -> None:
    """Every module kohya trains (text encoder, ResNet convs when `conv`), random, rank 4, alpha 2."""
    table = module_table(arch, read_header(ckpt).shapes())
    g = torch.Generator().manual_seed(7)
    sd = {}
    for name, t in kohya_modules(table, conv=conv).items():
        k = 1
        for d in t.kernel:
            k *= d
        down = torch.randn(4, t.in_features, *t.kernel, generator=g) * 0.2 if t.kernel else \
            torch.randn(4, t.in_features, generator=g) * 0.2
        up = torch.randn(t.out_features, 4, *([1, 1] if t.kernel else []), generator=g) * 0.2
        sd.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                   f"{name}.alpha": torch.tensor(2.0)})
    save_file(sd, str(path))


def _bake(tmp_path, base, lora, blocks, name):
    from workbench.recipes import parse_recipe
    from workbench.dispatch import run_recipe

    body = (f"kind: merge\nname: b\nmodels:\n  A: {base}\n  L: {lora}\nsteps:\n"
            f"  - {{id: m, method: add_lora, inputs: [A, L], blocks: '{blocks}'}}\n"
            f"output:\n  path: {tmp_path / name}\n  dtype: fp32\n")
    run_recipe(parse_recipe(body, tmp_path / f"{name}.yaml"), progress=False)
    return tmp_path / name


def _outputs(pipe, arch):
    torch.manual_seed(1)
    with torch.no_grad():
        den = pipe.unet(**denoiser_inputs(arch, pipe.unet))[0]
        te = pipe.text_encoder(torch.arange(10)[None])[0]
    return den, te


@pytest.mark.slow
@pytest.mark.parametrize("arch,blocks,weight", [
    ("sd15", "INS", 1.0),
    ("sd15", "0.5,0,1,0,1,0.25,1,0.75,1,0,1,0,1,0,1,0,1", 0.8),
    ("sdxl", "1,0,0.5,1,0,1,0.3,0,1,1,0,1", 1.0),
])
def test_block_weighted_preview_equals_block_weighted_bake(tmp_path, tiny_model, arch, blocks, weight):
    from workbench.pipeline.generate import LoraUse, load_model
    from workbench.pipeline.load import load_pipeline
    from workbench.pipeline.loras import attached_loras

    ckpt = tiny_model(arch)
    lora = tmp_path / "l.safetensors"
    _kohya_lora(lora, ckpt, arch, conv=arch == "sd15")
    table = parse_block_values(arch, blocks)
    bake_blocks = ",".join(f"{weight * table[i]:g}" for i in BLOCK_IDS[arch])  # strength × block
    baked = load_pipeline(_bake(tmp_path, ckpt, lora, bake_blocks, "b.safetensors"), arch, torch.float32)
    model = load_model(ckpt, device="cpu")
    with attached_loras(model, [LoraUse(lora, weight, blocks)]):
        got = _outputs(model.pipe, arch)
    with attached_loras(model, [LoraUse(lora, weight)]):
        full = _outputs(model.pipe, arch)
    want = _outputs(baked, arch)
    assert torch.allclose(got[0], want[0], atol=2e-5) and torch.allclose(got[1], want[1], atol=2e-5)
    assert not torch.allclose(got[0], full[0], atol=1e-3)  # the block weights did something


@pytest.mark.slow
def test_block_weights_on_a_loha_preview(tmp_path, tiny_model):
    """The LyCORIS path (core/lora_patch.py) takes block weights per checkpoint key, as the bake."""
    from workbench.pipeline.generate import LoraUse, load_model
    from workbench.pipeline.load import load_pipeline
    from workbench.pipeline.loras import attached_loras

    ckpt = tiny_model("sd15")
    table = module_table("sd15", read_header(ckpt).shapes())
    g = torch.Generator().manual_seed(2)
    sd = {}
    for name, t in kohya_modules(table).items():
        if t.kernel:
            continue
        sd.update({f"{name}.hada_w1_a": torch.randn(t.out_features, 2, generator=g) * 0.3,
                   f"{name}.hada_w1_b": torch.randn(2, t.in_features, generator=g) * 0.3,
                   f"{name}.hada_w2_a": torch.randn(t.out_features, 2, generator=g) * 0.3,
                   f"{name}.hada_w2_b": torch.randn(2, t.in_features, generator=g) * 0.3,
                   f"{name}.alpha": torch.tensor(1.0)})
    lora = tmp_path / "h.safetensors"
    save_file(sd, str(lora))
    baked = load_pipeline(_bake(tmp_path, ckpt, lora, "OUTALL", "b.safetensors"), "sd15", torch.float32)
    model = load_model(ckpt, device="cpu")
    with attached_loras(model, [LoraUse(lora, 1.0, "OUTALL")]):
        got = _outputs(model.pipe, "sd15")
    want = _outputs(baked, "sd15")
    assert torch.allclose(got[0], want[0], atol=2e-5) and torch.allclose(got[1], want[1], atol=2e-5)


def test_dry_run_checks_lora_block_weights_against_the_model(tmp_path, tiny_model):
    from workbench.recipes import parse_recipe
    from workbench.dispatch import run_recipe

    lora = tmp_path / "l.safetensors"
    _kohya_lora(lora, tiny_model("sd15"), "sd15")
    body = (f"kind: generate\nname: g\nmodel: {tiny_model('sd15')}\nprompt: a cat\nloras:\n"
            f"  - '{lora}:1:1,1,1,1,1,1,1,1,1,1,1,1'\noutput: {{dir: out}}\n")
    dry = str(run_recipe(parse_recipe(body, tmp_path / "g.yaml"), dry_run=True))
    assert "12 values are the LoRA Block Weight form for SDXL" in dry and "loras[0]" in dry
    dry = str(run_recipe(parse_recipe(body.replace("1,1,1,1,1,1,1,1,1,1,1,1", "OUTS"),
                                      tmp_path / "g.yaml"), dry_run=True))
    assert "problems: none" in dry
