"""Key -> block tables and block-weight parsing (supermerger convention)."""

from __future__ import annotations

import json

import pytest

from helpers.formats_keys import flux, flux_checkpoint, mmdit, sd15_checkpoint, sd3_checkpoint, \
    sdxl_checkpoint
from workbench.errors import WorkbenchError
from workbench.formats.blocks import (BLOCK_IDS, PRESETS_FILE, block_ids_for, block_of,
                                      component_of, keys_by_block, parse_block_values, presets)
from workbench.formats.safetensors_io import read_header

# Keys per block of the real SD1.5 (1131 keys) and SDXL (2519 keys) single-file layouts, counted from
# the full key lists (sd-mecha's sd1-ldm / sdxl-sgm configs list the same keys)
SD15_COUNTS = {"BASE": 197 + 248, "IN00": 6, "IN01": 36, "IN02": 36, "IN03": 2, "IN04": 38,
               "IN05": 36, "IN06": 2, "IN07": 38, "IN08": 36, "IN09": 2, "IN10": 10, "IN11": 10,
               "M00": 46, "OUT00": 12, "OUT01": 12, "OUT02": 14, "OUT03": 38, "OUT04": 38,
               "OUT05": 40, "OUT06": 38, "OUT07": 38, "OUT08": 40, "OUT09": 38, "OUT10": 38,
               "OUT11": 42}
SDXL_COUNTS = {"BASE": 587 + 248, "IN00": 10, "IN01": 10, "IN02": 10, "IN03": 2, "IN04": 58,
               "IN05": 56, "IN06": 2, "IN07": 218, "IN08": 216, "M00": 226, "OUT00": 218,
               "OUT01": 218, "OUT02": 220, "OUT03": 58, "OUT04": 58, "OUT05": 60, "OUT06": 12,
               "OUT07": 12, "OUT08": 16}


def test_block_id_tables():
    assert len(BLOCK_IDS["sd15"]) == 26 and len(BLOCK_IDS["sdxl"]) == 20
    assert BLOCK_IDS["sd15"][0] == "BASE" and BLOCK_IDS["sd15"][13] == "M00"
    assert BLOCK_IDS["sd3"][:3] == ["BASE", "IN", "J00"] and BLOCK_IDS["sd3"][-2:] == ["J37", "OUT"]
    assert len(BLOCK_IDS["flux"]) == 2 + 19 + 38 + 1


def test_per_block_counts_match_reference():
    counts = {b: len(k) for b, k in keys_by_block("sd15", sd15_checkpoint()).items()}
    assert counts == SD15_COUNTS
    counts = {b: len(k) for b, k in keys_by_block("sdxl", sdxl_checkpoint()).items()}
    assert counts == SDXL_COUNTS


@pytest.mark.parametrize("arch,keys", [("sd3", lambda: sd3_checkpoint(38)),
                                       ("flux", flux_checkpoint)])
def test_every_dit_block_has_keys(arch, keys):
    groups = keys_by_block(arch, keys())
    assert all(groups[i] for i in BLOCK_IDS[arch]), [i for i in BLOCK_IDS[arch] if not groups[i]]


def test_edges_of_the_convention():
    assert block_of("sd15", "model.diffusion_model.time_embed.0.weight") == "IN00"
    assert block_of("sd15", "model.diffusion_model.out.2.weight") == "OUT11"
    assert block_of("sdxl", "model.diffusion_model.out.2.bias") == "OUT08"
    assert block_of("sdxl", "model.diffusion_model.label_emb.0.0.weight") == "IN00"
    assert block_of("sd15", "cond_stage_model.transformer.text_model.final_layer_norm.weight") \
        == "BASE"
    assert block_of("sdxl", "first_stage_model.decoder.conv_in.weight") == "BASE"
    assert block_of("sd15", "input_blocks.4.1.proj_in.weight") == "IN04"  # bare UNet file
    assert block_of("flux", "double_blocks.3.img_attn.qkv.weight") == "D03"  # bare BFL
    assert block_of("flux", "model.diffusion_model.single_blocks.37.linear1.weight") == "S37"
    assert block_of("flux", "guidance_in.in_layer.weight") == "IN"
    assert block_of("flux", "final_layer.linear.weight") == "OUT"
    assert block_of("sd3", "model.diffusion_model.context_embedder.weight") == "IN"
    assert block_of("sd3", "model.diffusion_model.joint_blocks.12.x_block.attn.qkv.weight") == "J12"
    assert block_of("sd3", "text_encoders.t5xxl.transformer.shared.weight") == "BASE"
    with pytest.raises(WorkbenchError, match="no known block"):
        block_of("flux", "model.diffusion_model.mystery.weight")


def test_component_of():
    assert component_of("sd15", "model.diffusion_model.out.0.weight") == "unet"
    assert component_of("flux", "double_blocks.0.img_mod.lin.weight") == "unet"
    assert component_of("sdxl", "conditioner.embedders.1.model.ln_final.weight") == "text_encoder"
    assert component_of("flux", "text_encoders.clip_l.transformer.text_model.x") == "text_encoder"
    assert component_of("flux", "vae.decoder.conv_in.weight") == "vae"
    assert component_of("sd15", "first_stage_model.encoder.conv_in.weight") == "vae"
    assert component_of("sd15", "model_ema.decay") == "other"


def test_block_ids_for_a_file():
    assert block_ids_for("sd3", mmdit(depth=24)) == ["BASE", "IN", *(f"J{i:02d}" for i in range(24)),
                                                      "OUT"]
    assert block_ids_for("flux", flux()) == BLOCK_IDS["flux"]


def test_parse_comma_lists_and_numbers():
    text = "0,0.2,0.4,0.6,0.8,1,1,1,1,1,1,1,1,0.5,1,1,1,1,1,1,0.8,0.6,0.4,0.2,0,0"
    vals = parse_block_values("sd15", text)
    assert list(vals) == BLOCK_IDS["sd15"]
    assert vals["IN00"] == 0.2 and vals["M00"] == 0.5 and vals["OUT11"] == 0
    xl = parse_block_values("sdxl", text)  # supermerger's 26 -> 20 conversion
    assert list(xl) == BLOCK_IDS["sdxl"] and xl["OUT00"] == 1 and xl["OUT08"] == 0.4
    assert xl["IN08"] == 1 and xl["M00"] == 0.5
    assert parse_block_values("sdxl", [0.5] * 20)["IN08"] == 0.5
    assert set(parse_block_values("flux", 0.3).values()) == {0.3}
    with pytest.raises(WorkbenchError, match="25 values given for sd15, expected 26"):
        parse_block_values("sd15", ",".join(["1"] * 25))
    with pytest.raises(WorkbenchError, match="not a number"):
        parse_block_values("sd15", ",".join(["1"] * 25 + ["x"]))


def test_parse_mapping_with_default():
    vals = parse_block_values("flux", {"BASE": 0, "d00": 1, "S05": 0.5}, default=0.25)
    assert vals["BASE"] == 0 and vals["D00"] == 1 and vals["S05"] == 0.5 and vals["D01"] == 0.25
    with pytest.raises(WorkbenchError, match="no value for"):
        parse_block_values("sdxl", {"BASE": 0})
    with pytest.raises(WorkbenchError) as err:
        parse_block_values("sdxl", {"IN10": 1}, default=0)
    assert "IN10" in str(err.value) and "did you mean" in str(err.value)
    ids = block_ids_for("sd3", mmdit(depth=24))
    with pytest.raises(WorkbenchError, match="J30"):
        parse_block_values("sd3", {"J30": 1}, default=0, ids=ids)


def test_presets():
    table = presets()
    assert len(table) == 38 and all(len(v) == 26 for v in table.values())
    assert table["ALL_B"] == [1.0] * 26
    grad = parse_block_values("sd15", "GRAD_V")
    assert grad["BASE"] == 0 and grad["IN00"] == 1 and grad["M00"] == 0 and grad["OUT11"] == 1
    xl = parse_block_values("sdxl", "grad_v")
    assert len(xl) == 20 and xl["IN08"] == pytest.approx(0.3333333333)
    assert parse_block_values("flux", "FLAT_25")["D07"] == 0.25
    assert parse_block_values("flux", "FLAT_25")["BASE"] == 0
    with pytest.raises(WorkbenchError, match="SD1.5/SDXL UNet blocks only"):
        parse_block_values("sd3", "GRAD_V")
    with pytest.raises(WorkbenchError, match="did you mean GRAD_V"):
        parse_block_values("sd15", "GRAD_VV")
    assert "mbwpresets_master.txt" in json.loads(PRESETS_FILE.read_text())["_source"]


def test_tiny_builder_blocks(tiny_model):
    for arch, table in (("sd15", SD15_COUNTS), ("sdxl", SDXL_COUNTS)):
        keys = read_header(tiny_model(arch)).keys()
        assert {b: len(k) for b, k in keys_by_block(arch, keys).items()} == table
