"""Architecture detection from headers: checkpoints, components, LoRAs, unknown files."""

from __future__ import annotations

import struct

import pytest

from helpers.formats_keys import (flux, flux_checkpoint, hf_clip, ldm_unet, ldm_vae, mmdit,
                                   open_clip, sd15_checkpoint, sd2_checkpoint, sd3_checkpoint,
                                   sdxl_checkpoint, sdxl_refiner_unet, sdxl_unet, t5xxl,
                                   write_header_only)
from helpers.kohya_keys import KOHYA_MODULES
from workbench.errors import FormatError, UnknownModelError
from workbench.formats.detect import detect

KOHYA = KOHYA_MODULES


def kohya_lora(mods: dict, suffix=("lora_down.weight", "lora_up.weight")) -> dict:
    out = {}
    for m, (down, up) in mods.items():
        out[f"{m}.{suffix[0]}"] = tuple(down)
        out[f"{m}.{suffix[1]}"] = tuple(up)
        out[f"{m}.alpha"] = ()
    return out


CHECKPOINTS = [
    ("sd15", sd15_checkpoint, "sd15", None, "ldm"),
    ("sd15-nai", lambda: sd15_checkpoint(nai=True), "sd15", None, "ldm"),
    ("sd2", sd2_checkpoint, "sd2", None, "ldm"),
    ("sdxl", sdxl_checkpoint, "sdxl", "sdxl-base", "sgm"),
    ("sd3m", sd3_checkpoint, "sd3", "sd3-medium", "comfyui"),
    ("sd35m", lambda: sd3_checkpoint(24, 13, True), "sd3", "sd3.5-medium", "comfyui"),
    ("sd35l", lambda: sd3_checkpoint(38, 0, True), "sd3", "sd3.5-large", "comfyui"),
    ("flux-dev", flux_checkpoint, "flux", "dev", "comfyui"),
    ("flux-schnell", lambda: flux_checkpoint(False), "flux", "schnell", "comfyui"),
]
COMPONENTS = {
    "sd15": {"unet", "text_encoder", "vae"}, "sd2": {"unet", "text_encoder", "vae"},
    "sdxl": {"unet", "text_encoder", "text_encoder_2", "vae"},
    "sd3": {"unet", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"},
    "flux": {"unet", "text_encoder", "text_encoder_2", "vae"},
}


@pytest.mark.parametrize("name,build,arch,variant,layout", CHECKPOINTS, ids=[c[0] for c in CHECKPOINTS])
def test_all_in_one_checkpoints(tmp_path, name, build, arch, variant, layout):
    path = write_header_only(tmp_path / f"{name}.safetensors", build())
    info = detect(path)
    assert (info.arch, info.variant, info.kind, info.layout) == (arch, variant, "checkpoint", layout)
    assert info.components == COMPONENTS[arch]
    assert info.notes == ()


def test_diffusion_models_alone():
    assert detect(flux(prefix="")).kind == "transformer"
    assert detect(flux(prefix="")).layout == "bfl"
    assert detect(flux(prefix="", guidance=False)).variant == "schnell"
    info = detect(flux())  # ComfyUI diffusion_models/ file keeps the prefix
    assert (info.arch, info.kind, info.layout) == ("flux", "transformer", "comfyui")
    info = detect(mmdit(depth=38))
    assert (info.arch, info.variant, info.kind) == ("sd3", "sd3.5-large", "transformer")
    info = detect(sdxl_unet(prefix=""))
    assert (info.arch, info.kind, info.layout) == ("sdxl", "unet", "sgm")
    info = detect(ldm_unet(prefix=""))
    assert (info.arch, info.kind) == ("sd15", "unet")
    assert detect(ldm_unet(ctx=1024)).arch == "sd2"


def test_inpainting_and_refiner_variants():
    info = detect(ldm_unet(in_ch=9))
    assert info.variant == "sd15-inpainting" and "inpainting" in info.notes[0]
    refiner = {**sdxl_refiner_unet(), **open_clip("conditioner.embedders.0.model.", 32, 1280),
               **ldm_vae()}
    info = detect(refiner)
    assert (info.arch, info.variant) == ("sdxl", "sdxl-refiner")
    assert any("not supported" in n for n in info.notes)


def test_split_components(tmp_path):
    ae = detect(write_header_only(tmp_path / "ae.safetensors", ldm_vae("", 16, quant=False)))
    assert (ae.arch, ae.kind, ae.archs) == ("flux", "vae", frozenset({"sd3", "flux"}))
    sdvae = detect(ldm_vae(""))
    assert sdvae.kind == "vae" and sdvae.archs == frozenset({"sd15", "sd2", "sdxl"})
    clip_l = detect(hf_clip(""))
    assert (clip_l.kind, clip_l.variant) == ("text_encoder", "clip_l")
    assert clip_l.archs == frozenset({"sd15", "sdxl", "sd3", "flux"})
    assert detect(hf_clip("", 32, 1280)).variant == "clip_g"
    t5 = detect(write_header_only(tmp_path / "t5xxl_fp16.safetensors", t5xxl("")))
    assert (t5.variant, t5.arch, t5.archs) == ("t5xxl", "flux", frozenset({"sd3", "flux"}))
    assert detect(t5xxl(""), name="sd3_t5xxl.safetensors").arch == "sd3"


def test_diffusers_component_files():
    sd15 = {"conv_in.weight": (320, 4, 3, 3), "time_embedding.linear_1.weight": (1280, 320),
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": (320, 768),
            "down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3),
            "mid_block.resnets.0.conv1.weight": (1280, 1280, 3, 3),
            "up_blocks.0.resnets.0.conv1.weight": (1280, 2560, 3, 3),
            "conv_out.weight": (4, 320, 3, 3)}
    info = detect(sd15)
    assert (info.arch, info.kind, info.layout) == ("sd15", "unet", "diffusers")
    xl = {k.replace("down_blocks.0.attentions.0", "down_blocks.1.attentions.0"): v
          for k, v in sd15.items()}
    xl["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"] = (640, 2048)
    xl["add_embedding.linear_1.weight"] = (1280, 2816)
    assert detect(xl).arch == "sdxl"
    fx = {"x_embedder.weight": (3072, 64), "transformer_blocks.0.attn.to_q.weight": (3072, 3072),
          "single_transformer_blocks.0.attn.to_q.weight": (3072, 3072),
          "time_text_embed.guidance_embedder.linear_1.weight": (3072, 256),
          "proj_out.weight": (64, 3072)}
    info = detect(fx)
    assert (info.arch, info.variant, info.kind, info.layout) == ("flux", "dev", "transformer",
                                                                 "diffusers")
    s3 = {"pos_embed.proj.weight": (1536, 16, 2, 2), "proj_out.weight": (64, 1536),
          **{f"transformer_blocks.{i}.attn.to_q.weight": (1536, 1536) for i in range(24)}}
    assert detect(s3).variant == "sd3-medium"


@pytest.mark.parametrize("arch", ["sd15", "sdxl", "flux"])
def test_golden_kohya_loras(tmp_path, arch):
    """Real module names and real shapes (header only; the data is a sparse hole)."""
    path = write_header_only(tmp_path / f"{arch}_lora.safetensors", kohya_lora(KOHYA[arch]),
                             metadata={"ss_network_dim": "16"})
    info = detect(path)
    assert (info.arch, info.kind, info.layout, info.lora_format, info.rank) == \
        (arch, "lora", "kohya", "lora", 16)
    unet_only = {k: v for k, v in KOHYA[arch].items() if k.startswith("lora_unet_")}
    assert detect(kohya_lora(unet_only)).arch == arch
    names_only = {k: None for k in kohya_lora(KOHYA[arch])}
    assert detect(names_only).arch == arch
    te_only = {k: v for k, v in KOHYA[arch].items() if not k.startswith("lora_unet_")}
    assert detect(kohya_lora(te_only)).arch == arch


def test_sd2_lora_by_cross_attention_width_and_lycoris():
    sd2 = {}
    for m, (down, up) in KOHYA["sd15"].items():
        if "attn2_to_k" in m or "attn2_to_v" in m:
            down = [down[0], 1024]
        sd2[m] = (down, up)
    assert detect(kohya_lora(sd2)).arch == "sd2"
    loha = {}
    for m, (down, up) in KOHYA["sdxl"].items():
        r = down[0]
        loha.update({f"{m}.hada_w1_a": (up[0], r), f"{m}.hada_w1_b": (r, down[1]),
                     f"{m}.hada_w2_a": (up[0], r), f"{m}.hada_w2_b": (r, down[1]), f"{m}.alpha": ()})
    info = detect(loha)
    assert (info.arch, info.lora_format, info.rank) == ("sdxl", "loha", 16)
    lokr = {f"{m}.lokr_w1": (4, 4) for m in KOHYA["flux"]}
    lokr.update({f"{m}.lokr_w2": (8, 8) for m in KOHYA["flux"]})
    info = detect(lokr)
    assert (info.arch, info.lora_format, info.rank) == ("flux", "lokr", None)


def test_peft_and_diffusers_loras():
    base = "down_blocks.0.attentions.0.transformer_blocks.0."
    peft = {f"unet.{base}attn2.to_k.lora_A.weight": (8, 768),
            f"unet.{base}attn2.to_k.lora_B.weight": (320, 8),
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": (8, 768),
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": (768, 8)}
    info = detect(peft)
    assert (info.arch, info.layout, info.rank) == ("sd15", "peft", 8)
    assert info.components == {"unet", "text_encoder"}
    old = {f"unet.{base}attn2.processor.to_k_lora.down.weight": (4, 768),
           f"unet.{base}attn2.processor.to_k_lora.up.weight": (320, 4)}
    assert (detect(old).layout, detect(old).arch) == ("diffusers", "sd15")
    xl = {"unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.lora.down.weight": (4, 2048),
          "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.lora.up.weight": (640, 4),
          "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora.down.weight": (4, 1280),
          "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora.up.weight": (1280, 4)}
    assert detect(xl).arch == "sdxl" and "text_encoder_2" in detect(xl).components
    fx = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": (16, 3072),
          "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": (3072, 16),
          "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": (16, 3072),
          "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": (3072, 16)}
    assert (detect(fx).arch, detect(fx).layout) == ("flux", "peft")
    s3 = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": (16, 1536),
          "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": (1536, 16)}
    assert detect(s3).arch == "sd3"


def test_unknown_files_name_the_file(tmp_path):
    path = write_header_only(tmp_path / "mystery.safetensors",
                             {f"backbone.layer{i}.weight": (4, 4) for i in range(30)})
    with pytest.raises(UnknownModelError) as err:
        detect(path)
    msg = str(err.value)
    assert "mystery.safetensors" in msg and "30 tensors" in msg and "backbone.layer" in msg
    assert "expected" in msg
    odd = {"model.diffusion_model.blocks.0.weight": (4, 4)}
    with pytest.raises(UnknownModelError, match="diffusion-model keys"):
        detect(odd, name="odd.safetensors")
    with pytest.raises(UnknownModelError, match="no tensors"):
        detect({}, name="empty.safetensors")


def test_detect_reads_header_only(tmp_path):
    """Garbage tensor bytes do not matter: only the header is parsed."""
    keys = {**hf_clip(""), "text_model.embeddings.token_embedding.weight": (64, 768)}
    path = write_header_only(tmp_path / "clip_l.safetensors", keys, garbage=False)
    size = path.stat().st_size
    with open(path, "r+b") as f:  # overwrite the data section with garbage
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n)
        f.write(b"\xff\x00garbage" * ((size - 8 - n) // 9))
    assert detect(path).variant == "clip_l"


def test_truncated_file_is_a_format_error(tmp_path):
    path = write_header_only(tmp_path / "cut.safetensors", ldm_vae(""))
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 10)
    with pytest.raises(FormatError, match="truncated"):
        detect(path)


@pytest.mark.parametrize("arch", ["sd15", "sdxl", "sd3", "flux"])
def test_tiny_builders_detect_as_their_arch(tiny_model, arch):
    """The real-layout tiny model builders (workbench.testing.<arch>) detect as their arch."""
    info = detect(tiny_model(arch))
    assert (info.arch, info.kind) == (arch, "checkpoint")
    assert info.components == COMPONENTS[arch]
    assert not any("does not belong" in n or "not in the file" in n for n in info.notes)


def test_open_clip_scoring_model_is_recognised(tmp_path):
    from workbench.testing import clip as tiny_clip

    folder = tiny_clip.build(tmp_path / "clip")
    info = detect(folder / "open_clip_model.safetensors")
    assert (info.arch, info.kind, info.layout) == ("clip", "scorer", "open_clip")


@pytest.mark.parametrize("variant", ["sd3.5-medium", "sd3.5-large"])
def test_golden_kohya_sd3_loras(tmp_path, variant):
    """kohya's SD3.5 LoRA modules (golden list from sd-scripts' lora_sd3, real shapes) and the
    diffusers names of the same LoRA (our peft copy), which need the trainer's metadata to be told
    from FLUX's double blocks when the width is neither model's."""
    from helpers.kohya_keys import KOHYA_SD3

    mods = KOHYA_SD3[variant]["modules"]
    path = write_header_only(tmp_path / f"{variant}.safetensors", kohya_lora(mods))
    info = detect(path)
    assert (info.arch, info.variant, info.kind, info.layout, info.rank) == ("sd3", variant, "lora", "kohya", 16)
    assert info.components == {"unet"}
    tiny = {"transformer.transformer_blocks.37.attn.to_q.lora_A.weight": (4, 32),
            "transformer.transformer_blocks.37.attn.to_q.lora_B.weight": (32, 4)}
    with pytest.raises(UnknownModelError):
        detect(tiny)
    for meta in ({"modelspec.architecture": "stable-diffusion-3-5-large/lora"},
                 {"ss_base_model_version": "sd3"}):
        info = detect(write_header_only(tmp_path / "peft.safetensors", tiny, metadata=meta))
        assert (info.arch, info.variant, info.layout) == ("sd3", "sd3.5-large", "peft")
    flux = detect(write_header_only(tmp_path / "fx.safetensors", tiny, metadata={"ss_base_model_version": "flux1"}))
    assert flux.arch == "flux"
