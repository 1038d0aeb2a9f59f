"""Tiny SD1.5 / SDXL checkpoints: real key layout, real block structure, offline loading round trip.

Key and block counts are those of the real files (SD1.5: 1131 keys, SDXL: 2519; per block in
tests/test_blocks.py). Loading goes through
diffusers' own single-file converter, so a state dict that comes back equal to the models the file
was written from proves that our key names are the ones real A1111/ComfyUI files use.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from pathlib import Path

import pytest
import torch

from workbench.errors import FormatError
from workbench.formats.pipeline_config import config_dir, config_files
from workbench.formats.pipeline_configs_sd import bundled_files
from workbench.formats.safetensors_io import read_header
from workbench.testing import ldm_keys, sd15, sdxl

SD15_PREFIXES = {"model.diffusion_model.": 686, "cond_stage_model.transformer.text_model.": 197,
                 "first_stage_model.": 248}
# The real sd_xl_base_1.0 file has 2515 tensors. sd-mecha's "diffuser 1684" also counts four optional
# marker keys (v_pred, ztsnr, edm_vpred.sigma_min/max) that the base file does not carry; the
# per-block table below sums to 1680.
SDXL_PREFIXES = {"model.diffusion_model.": 1680, "conditioner.embedders.0.transformer.text_model.": 197,
                 "conditioner.embedders.1.model.": 390, "first_stage_model.": 248}

SD15_BLOCKS = {"BASE": 197 + 248, "IN00": 6, "IN01": 36, "IN02": 36, "IN03": 2, "IN04": 38, "IN05": 36,
               "IN06": 2, "IN07": 38, "IN08": 36, "IN09": 2, "IN10": 10, "IN11": 10, "M00": 46,
               "OUT00": 12, "OUT01": 12, "OUT02": 14, "OUT03": 38, "OUT04": 38, "OUT05": 40,
               "OUT06": 38, "OUT07": 38, "OUT08": 40, "OUT09": 38, "OUT10": 38, "OUT11": 42}
SDXL_BLOCKS = {"BASE": 587 + 248, "IN00": 10, "IN01": 10, "IN02": 10, "IN03": 2, "IN04": 58, "IN05": 56,
               "IN06": 2, "IN07": 218, "IN08": 216, "M00": 226, "OUT00": 218, "OUT01": 218, "OUT02": 220,
               "OUT03": 58, "OUT04": 58, "OUT05": 60, "OUT06": 12, "OUT07": 12, "OUT08": 16}


def supermerger_block(key: str, last_out: str) -> str:
    """SuperMerger/meh block of a key: TE+VAE -> BASE, time/label embeddings -> IN00, out.* -> last OUT."""
    if key.startswith(("cond_stage_model.", "conditioner.", "first_stage_model.")):
        return "BASE"
    k = key.removeprefix("model.diffusion_model.")
    if k.startswith(("time_embed.", "label_emb.")):
        return "IN00"
    if m := re.match(r"input_blocks\.(\d+)\.", k):
        return f"IN{int(m.group(1)):02d}"
    if k.startswith("middle_block."):
        return "M00"
    if m := re.match(r"output_blocks\.(\d+)\.", k):
        return f"OUT{int(m.group(1)):02d}"
    if k.startswith("out."):
        return last_out
    raise AssertionError(f"unassigned key {key}")


def block_counts(keys, last_out: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for key in keys:
        block = supermerger_block(key, last_out)
        counts[block] = counts.get(block, 0) + 1
    return counts


def prefix_counts(keys, prefixes) -> dict[str, int]:
    return {p: sum(k.startswith(p) for k in keys) for p in prefixes}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core box OpenMP contention made
    2-thread generation 10-30x slower than 1 thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def env(tmp_path_factory, one_thread):
    """Offline hub, private config cache, and both tiny files (fp16) with the models they came from."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("WORKBENCH_CACHE", str(tmp_path_factory.mktemp("cache")))
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for arch, module in (("sd15", sd15), ("sdxl", sdxl)):
        models = module.build_models(0)
        out[arch] = (module.write(root / f"{arch}.safetensors", models), models)
    yield out
    mp.undo()


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- layout


def test_sd15_keys_and_blocks_match_real_file(env):
    header = read_header(env["sd15"][0])
    keys = header.keys()
    assert len(keys) == 1131
    assert prefix_counts(keys, SD15_PREFIXES) == SD15_PREFIXES
    assert block_counts(keys, "OUT11") == SD15_BLOCKS
    pos = header.tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    assert (pos.dtype, pos.shape) == ("I64", (1, 77))
    assert {t.dtype for k, t in header.tensors.items() if not k.endswith("position_ids")} == {"F16"}
    # SD1.5 uses 1x1-conv projections in its spatial transformers.
    assert len(header.tensors["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape) == 4


def test_sdxl_keys_and_blocks_match_real_file(env):
    header = read_header(env["sdxl"][0])
    keys = header.keys()
    assert len(keys) == 2515
    assert prefix_counts(keys, SDXL_PREFIXES) == SDXL_PREFIXES
    assert block_counts(keys, "OUT08") == SDXL_BLOCKS
    assert len(header.tensors["model.diffusion_model.input_blocks.4.1.proj_in.weight"].shape) == 2
    depth = {int(m.group(1)) for k in keys
             if (m := re.match(r"model\.diffusion_model\.middle_block\.1\.transformer_blocks\.(\d+)\.", k))}
    assert depth == set(range(10))


def test_vae_layout_is_ldm(env):
    shapes = read_header(env["sd15"][0]).shapes()
    vae = "first_stage_model."
    assert len(shapes[vae + "encoder.mid.attn_1.q.weight"]) == 4  # 1x1 conv, not linear
    assert len(shapes[vae + "decoder.mid.attn_1.proj_out.weight"]) == 4
    # decoder.up is indexed by resolution: up.0 is the full-resolution level, without upsampler.
    assert vae + "decoder.up.0.upsample.conv.weight" not in shapes
    assert vae + "decoder.up.3.upsample.conv.weight" in shapes
    assert vae + "decoder.up.0.block.0.nin_shortcut.weight" in shapes
    assert vae + "decoder.up.3.block.0.nin_shortcut.weight" not in shapes
    assert shapes[vae + "decoder.up.0.block.2.conv2.weight"][0] == sd15.VAE_CONFIG["block_out_channels"][0]


def test_open_clip_g_layout(env):
    models = env["sdxl"][1]
    original = ldm_keys.open_clip_to_original(models["text_encoder_2"].state_dict())
    p = ldm_keys.SDXL_CLIP_G_PREFIX
    width = sdxl.CLIP_G_WIDTH
    attn = models["text_encoder_2"].text_model.encoder.layers[3].self_attn
    fused = original[p + "transformer.resblocks.3.attn.in_proj_weight"]
    assert fused.shape == (3 * width, width)
    assert torch.equal(fused[width:2 * width], attn.k_proj.weight)
    assert torch.equal(original[p + "text_projection"], models["text_encoder_2"].text_projection.weight.t())
    assert original[p + "logit_scale"].shape == ()
    assert (p + "positional_embedding") in original and (p + "ln_final.weight") in original


@pytest.mark.slow
def test_builds_are_deterministic(env, tmp_path):
    for arch, module in (("sd15", sd15), ("sdxl", sdxl)):
        again = module.build(tmp_path / f"{arch}.safetensors", seed=0)
        assert sha256(again) == sha256(env[arch][0]), arch
    other = sd15.build(tmp_path / "seed1.safetensors", seed=1)
    assert sha256(other) != sha256(env["sd15"][0])


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("arch,module", [("sd15", sd15), ("sdxl", sdxl)])
def test_inferred_configs_equal_tiny_configs(env, arch, module):
    import inspect

    from diffusers import AutoencoderKL, UNet2DConditionModel

    files = config_files(env[arch][0], arch)
    for component, tiny, cls in (("unet", module.UNET_CONFIG, UNet2DConditionModel),
                                 ("vae", module.VAE_CONFIG, AutoencoderKL),
                                 ("text_encoder", module.TEXT_ENCODER_CONFIG, None)):
        inferred = files[f"{component}/config.json"]
        defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()} if cls else {}
        diff = {k: (v, inferred.get(k, defaults.get(k))) for k, v in tiny.items()
                if k != "sample_size" and inferred.get(k, defaults.get(k)) != v}
        assert diff == {}, component
    if arch == "sdxl":
        inferred = files["text_encoder_2/config.json"]
        assert {k: inferred[k] for k in sdxl.TEXT_ENCODER_2_CONFIG} == sdxl.TEXT_ENCODER_2_CONFIG
        assert files["tokenizer_2"]["pad_token"] == "!"
    assert files["tokenizer"]["pad_token"] == "<|endoftext|>"


def _real_size_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Header shapes of a full-size file, from meta-device models built from the bundled configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    files = bundled_files(arch)
    with torch.device("meta"):
        sd = ldm_keys.unet_to_original(UNet2DConditionModel.from_config(files["unet/config.json"]).state_dict())
        sd.update(ldm_keys.vae_to_original(AutoencoderKL.from_config(files["vae/config.json"]).state_dict()))
        clip_l = CLIPTextModel(CLIPTextConfig(**files["text_encoder/config.json"])).state_dict()
        if arch == "sd15":
            sd.update(ldm_keys.clip_l_to_original(clip_l, ldm_keys.SD15_CLIP_L_PREFIX))
        else:
            sd.update(ldm_keys.clip_l_to_original(clip_l, ldm_keys.SDXL_CLIP_L_PREFIX))
            g = CLIPTextModelWithProjection(CLIPTextConfig(**files["text_encoder_2/config.json"]))
            sd.update(ldm_keys.open_clip_to_original(g.state_dict()))
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("arch,total,last_out", [("sd15", 1131, "OUT11"), ("sdxl", 2515, "OUT08")])
def test_real_size_layout_and_config_inference(arch, total, last_out):
    shapes = _real_size_shapes(arch)
    assert len(shapes) == total
    assert block_counts(shapes, last_out) == (SD15_BLOCKS if arch == "sd15" else SDXL_BLOCKS)
    files = config_files(shapes, arch)
    real = bundled_files(arch)
    for rel, content in real.items():
        assert files[rel] == content, rel  # inference reproduces the real configs exactly
    if arch == "sdxl":
        assert shapes["model.diffusion_model.label_emb.0.0.weight"] == (1280, 2816)
        assert shapes["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)


def test_config_dir_is_cached_and_complete(env, tmp_path):
    first = config_dir(env["sdxl"][0], "sdxl", cache=tmp_path)
    assert first.parent == tmp_path / "configs"
    assert config_dir(read_header(env["sdxl"][0]), "sdxl", cache=tmp_path) == first
    index = json.loads((first / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    for rel in ("unet/config.json", "vae/config.json", "text_encoder_2/config.json",
                "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer_2/merges.txt"):
        assert (first / rel).is_file(), rel
    assert json.loads((first / "tokenizer_2/tokenizer_config.json").read_text())["pad_token"] == "!"
    assert config_dir(env["sd15"][0], "sd15", cache=tmp_path) != first
    default = config_dir(env["sd15"][0], "sd15")  # no cache argument: $WORKBENCH_CACHE/configs
    assert default.parent == Path(os.environ["WORKBENCH_CACHE"]) / "configs"


def test_config_inference_names_file_and_missing_key(env, tmp_path):
    from safetensors.torch import save_file

    broken = tmp_path / "no_vae.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(broken))
    with pytest.raises(FormatError, match=r"no_vae\.safetensors.*input_blocks\.N\.0\.op"):
        config_files(broken, "sd15")


# ---------------------------------------------------------------- offline loading round trip


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.slow
@pytest.mark.parametrize("arch,module", [("sd15", sd15), ("sdxl", sdxl)])
def test_load_offline_round_trip_and_generate(env, no_network, arch, module):
    from workbench.pipeline.load import load_pipeline

    path, models = env[arch]
    pipe = load_pipeline(path, arch, torch_dtype=torch.float32)
    for name in module.COMPONENTS:
        loaded = getattr(pipe, name).state_dict()
        expected = {k: v.to(torch.float16).to(torch.float32) for k, v in models[name].state_dict().items()}
        assert set(loaded) == set(expected), name
        bad = [k for k in expected if not torch.equal(loaded[k], expected[k])]
        assert bad == [], (name, bad[:3])
    image = pipe("a red cube", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)
    assert bool(torch.isfinite(torch.from_numpy(image)).all())
    assert float(image.std()) > 0.01


def test_testing_entry_point(env, tmp_path, capsys):
    from workbench.testing.__main__ import main

    out = tmp_path / "cli.safetensors"
    assert main(["sd15", str(out)]) == 0
    assert sha256(out) == sha256(env["sd15"][0])
    assert capsys.readouterr().out.strip() == str(out)
