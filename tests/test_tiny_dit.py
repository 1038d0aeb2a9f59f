"""Tiny SD3.5 / FLUX.1 checkpoints: real key structure, offline loading through diffusers, generation."""

from __future__ import annotations

import hashlib
import re

import pytest
import torch

from workbench.pipeline import load_dit
from workbench.errors import UnsupportedError
from workbench.formats import pipeline_configs_dit as pcd
from workbench.formats.safetensors_io import read_header
from workbench.formats import dit_keys
from workbench.testing import flux, sd3

P = "model.diffusion_model."


def _blocks(keys, head: str) -> set[int]:
    pat = re.compile(re.escape(head) + r"\.(\d+)\.")
    return {int(m.group(1)) for k in keys if (m := pat.match(k))}


def _same_weights(loaded: torch.nn.Module, source: torch.nn.Module) -> list[str]:
    """Names whose tensors differ (or exist on one side only)."""
    a, b = loaded.state_dict(), source.state_dict()
    return sorted(k for k in set(a) | set(b)
                  if k not in a or k not in b or not torch.equal(a[k].float(), b[k].float()))


def _generate(pipe, **kw):
    out = pipe("a photo of a cat", height=64, width=64, num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0), **kw).images
    return torch.from_numpy(out)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_dit")
    return {
        "sd3m": sd3.build(root / "sd3.5_medium.safetensors"),
        "sd3l": sd3.build(root / "sd3.5_large.safetensors", variant="sd3.5-large"),
        "flux_dev": flux.build(root / "flux1-dev-aio.safetensors"),
        "flux_schnell": flux.build(root / "flux1-schnell-aio.safetensors", variant="schnell"),
        "split": flux.build_split(root / "split", "dev"),
    }


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "wb_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ------------------------------------------------------------------------------------- structure

def test_sd35_medium_structure(files):
    keys = set(read_header(files["sd3m"]).tensors)
    assert _blocks(keys, P + "joint_blocks") == set(range(24))
    assert _blocks({k for k in keys if ".x_block.attn2." in k}, P + "joint_blocks") == set(range(13))
    assert all(P + f"joint_blocks.{i}.x_block.attn.ln_q.weight" in keys for i in range(24))
    # the last context block is pre-only: fused qkv and a 2-way adaLN, no output projection, no MLP
    last = P + "joint_blocks.23.context_block."
    assert {k[len(last):] for k in keys if k.startswith(last)} == {
        "attn.qkv.weight", "attn.qkv.bias", "attn.ln_q.weight", "attn.ln_k.weight",
        "adaLN_modulation.1.weight", "adaLN_modulation.1.bias"}
    for k in ("pos_embed", "x_embedder.proj.weight", "context_embedder.weight", "y_embedder.mlp.2.bias",
              "t_embedder.mlp.0.weight", "final_layer.adaLN_modulation.1.weight", "final_layer.linear.bias"):
        assert P + k in keys, k
    groups = {k.split(".transformer.")[0] for k in keys if k.startswith("text_encoders.") and ".transformer." in k}
    assert groups == {"text_encoders.clip_l", "text_encoders.clip_g", "text_encoders.t5xxl"}
    t5 = "text_encoders.t5xxl.transformer.encoder.block"
    assert _blocks(keys, t5) == set(range(24))
    assert [k for k in keys if "relative_attention_bias" in k] == [
        f"{t5}.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    assert sum(k.startswith("first_stage_model.") for k in keys) == 244  # FLUX/SD3 VAE, no quant convs


def test_sd35_large_structure(files):
    keys = set(read_header(files["sd3l"]).tensors)
    assert _blocks(keys, P + "joint_blocks") == set(range(38))
    assert not any(".attn2." in k for k in keys)
    assert pcd.sd3_variant(read_header(files["sd3l"]).shapes()) == "sd3.5-large"


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_flux_structure(files, variant):
    keys = set(read_header(files[f"flux_{variant}"]).tensors)
    diffusion = {k for k in keys if k.startswith(P)}
    assert _blocks(diffusion, P + "double_blocks") == set(range(19))
    assert _blocks(diffusion, P + "single_blocks") == set(range(38))
    assert sum(".double_blocks." in k for k in diffusion) == 456  # real per-block key counts
    assert sum(".single_blocks." in k for k in diffusion) == 304
    assert (P + "guidance_in.in_layer.weight" in keys) == (variant == "dev")
    assert len(diffusion) == (780 if variant == "dev" else 776)
    assert sum(k.startswith("vae.") for k in keys) == 244
    assert sum(k.startswith("text_encoders.clip_l.transformer.text_model.") for k in keys) == 196
    assert sum(k.startswith("text_encoders.t5xxl.transformer.") for k in keys) == 219


def test_flux_split_files(files):
    parts = files["split"]
    assert sorted(p.name for p in parts.values()) == [
        "ae.safetensors", "clip_l.safetensors", "flux1-dev.safetensors", "t5xxl_fp16.safetensors"]
    tr = set(read_header(parts["transformer"]).tensors)
    assert "double_blocks.18.img_attn.norm.query_norm.scale" in tr and "guidance_in.in_layer.bias" in tr
    assert not any(k.startswith("model.") for k in tr)
    ae = set(read_header(parts["vae"]).tensors)
    assert "encoder.down.3.block.1.conv2.weight" in ae and "decoder.up.0.block.2.nin_shortcut.weight" not in ae
    assert read_header(parts["vae"]).shapes()["encoder.conv_out.weight"][0] == 32  # 2 x 16 latent channels
    assert all(k.startswith("text_model.") for k in read_header(parts["text_encoder"]).tensors)
    t5 = set(read_header(parts["text_encoder_2"]).tensors)
    assert "shared.weight" in t5 and "encoder.embed_tokens.weight" not in t5 and len(t5) == 219


@pytest.mark.slow
def test_build_is_deterministic(tmp_path):
    a = flux.build_transformer(tmp_path / "a.safetensors", seed=3, variant="schnell")
    b = flux.build_transformer(tmp_path / "b.safetensors", seed=3, variant="schnell")
    c = flux.build_transformer(tmp_path / "c.safetensors", seed=4, variant="schnell")
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b, c)]
    assert digest[0] == digest[1] != digest[2]
    assert a.stat().st_size < 20e6


# ------------------------------------------------------------------ names against diffusers itself

def _real_flux_sd(variant: str):
    """A real-width FLUX transformer on the meta device, in BFL names."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(pcd.bundled("flux", variant)["transformer"])
    sd = model.state_dict()
    return sd, dit_keys.to_original(sd, dit_keys.flux_rules(sd))


def test_flux_names_match_diffusers_converter_at_real_width():
    """diffusers' converter only handles the real width; run it on meta tensors of real shape, with
    real values where the order of fused/swapped parts matters, and compare with ours."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    model_sd, original = _real_flux_sd("dev")
    for key in ("single_blocks.0.linear1.bias", "double_blocks.0.img_attn.qkv.bias",
                "double_blocks.0.txt_attn.qkv.bias", "final_layer.adaLN_modulation.1.bias"):
        original[key] = torch.arange(original[key].shape[0], dtype=torch.float32)
    theirs = convert_flux_transformer_checkpoint_to_diffusers({P + k: v for k, v in original.items()})
    ours = dit_keys.flux_to_diffusers(dict(original))
    assert set(theirs) == set(ours) == set(model_sd)
    assert all(theirs[k].shape == ours[k].shape == model_sd[k].shape for k in ours)
    real = [k for k, v in theirs.items() if not v.is_meta]
    assert len(real) == 4 + 6 + 1  # linear1 -> q,k,v,mlp; two qkv -> 3 each; adaLN
    for k in real:
        assert torch.equal(theirs[k], ours[k]), k


def _full_config(cls, cfg: dict) -> dict:
    """A config with every default filled in, so absent-vs-default does not count as a difference."""
    if hasattr(cls, "extract_init_dict"):
        init = cls.extract_init_dict(dict(cfg))[0]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in init.items()}
    return cls(**cfg).to_dict()


@pytest.mark.slow
def test_configs_inferred_from_real_shapes_equal_bundled():
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    for variant in pcd.SD3_VARIANTS:
        real = pcd.bundled("sd3", variant)
        with init_empty_weights():
            tr = SD3Transformer2DModel.from_config(real["transformer"]).state_dict()
            vae = AutoencoderKL.from_config(real["vae"]).state_dict()
            te = {n: CLIPTextModelWithProjection(CLIPTextConfig(**real[c])).state_dict()
                  for c, n in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"))}
            t5 = T5EncoderModel(T5Config(**real["text_encoder_3"])).state_dict()
        shapes = {k: tuple(v.shape) for k, v in dit_keys.to_original(tr, dit_keys.sd3_rules(tr), P).items()}
        shapes.update({k: tuple(v.shape) for k, v in dit_keys.vae_to_ldm(vae, "first_stage_model.").items()})
        for n, sd in te.items():
            shapes.update({k: tuple(v.shape) for k, v in
                           dit_keys.clip_to_original(sd, f"text_encoders.{n}.transformer.").items()})
        shapes.update({k: tuple(v.shape) for k, v in
                       dit_keys.t5_to_original(t5, "text_encoders.t5xxl.transformer.").items()})
        assert pcd.sd3_variant(shapes) == variant
        inferred = pcd.sd3_configs(shapes)
        classes = {"transformer": SD3Transformer2DModel, "vae": AutoencoderKL, "text_encoder": CLIPTextConfig,
                   "text_encoder_2": CLIPTextConfig, "text_encoder_3": T5Config}
        for comp, cls in classes.items():
            assert _full_config(cls, inferred[comp]) == _full_config(cls, real[comp]), (variant, comp)
    for variant in pcd.FLUX_VARIANTS:
        _, original = _real_flux_sd(variant)
        inferred = pcd.flux_configs({k: tuple(v.shape) for k, v in original.items()})
        assert inferred["transformer"] == pcd.bundled("flux", variant)["transformer"]


def test_tiny_configs_and_t5_tokenizer(files, tmp_path):
    cfgs = pcd.flux_configs(read_header(files["flux_schnell"]).shapes())
    tr = cfgs["transformer"]
    assert (tr["num_layers"], tr["num_single_layers"], tr["guidance_embeds"]) == (19, 38, False)
    assert tr["axes_dims_rope"] == [4, 6, 6] and cfgs["scheduler"]["shift"] == 1.0
    assert cfgs["text_encoder_2"]["vocab_size"] == pcd.TINY_T5_VOCAB
    from transformers import T5TokenizerFast

    tok = T5TokenizerFast.from_pretrained(pcd.write_t5_tokenizer_dir(tmp_path / "t5", pcd.TINY_T5_VOCAB))
    assert len(tok) == pcd.TINY_T5_VOCAB
    ids = tok("A photo of a cat").input_ids
    assert ids[-1] == 1 and 2 not in ids and max(ids) < pcd.TINY_T5_VOCAB


def test_real_t5_tokenizer_is_not_invented(tmp_path, monkeypatch):
    monkeypatch.setattr(pcd, "find_real_t5", lambda: None)
    with pytest.raises(UnsupportedError, match="WORKBENCH_T5_TOKENIZER"):
        pcd.write_t5_tokenizer_dir(tmp_path / "t5", pcd.T5_REAL_VOCAB)


# --------------------------------------------------------------------------- loading + generation

@pytest.mark.slow
def test_sd35_medium_loads_exactly_and_generates(files):
    pipe = load_dit.load_sd3_pipeline(files["sd3m"], torch_dtype=torch.float32)
    source = sd3.tiny_models(variant="sd3.5-medium")
    for comp in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        assert _same_weights(getattr(pipe, comp), source[comp]) == [], comp
    assert tuple(pipe.transformer.config.dual_attention_layers) == tuple(range(13))
    img = _generate(pipe, max_sequence_length=32)
    assert img.shape == (1, 64, 64, 3) and torch.isfinite(img).all() and img.std() > 1e-3


@pytest.mark.slow
def test_sd35_large_transformer_loads_exactly(files):
    from diffusers import SD3Transformer2DModel
    from workbench.formats.pipeline_config import config_dir

    folder = config_dir(files["sd3l"], "sd3")
    model = SD3Transformer2DModel.from_single_file(str(files["sd3l"]), config=str(folder), subfolder="transformer",
                                                   local_files_only=True, torch_dtype=torch.float32)
    assert _same_weights(model, sd3.tiny_models(variant="sd3.5-large")["transformer"]) == []


@pytest.mark.slow
def test_flux_dev_all_in_one_loads_exactly_and_generates(files):
    pipe = load_dit.load_flux_pipeline(files["flux_dev"], torch_dtype=torch.float32)
    source = flux.tiny_models(variant="dev")
    for comp in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        assert _same_weights(getattr(pipe, comp), source[comp]) == [], comp
    assert pipe.transformer.config.guidance_embeds is True
    img = _generate(pipe, max_sequence_length=32, guidance_scale=3.5)
    assert img.shape == (1, 64, 64, 3) and torch.isfinite(img).all() and img.std() > 1e-3


@pytest.mark.slow
def test_flux_split_files_load_exactly_and_generate(files):
    pipe = load_dit.load_flux_pipeline(files["split"]["transformer"].parent, torch_dtype=torch.float32)
    source = flux.tiny_models(variant="dev")
    for comp in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        assert _same_weights(getattr(pipe, comp), source[comp]) == [], comp
    by_name = load_dit.flux_parts({"transformer": files["split"]["transformer"], "ae": files["split"]["vae"],
                                   "clip_l": files["split"]["text_encoder"],
                                   "t5xxl": files["split"]["text_encoder_2"]})
    assert by_name == files["split"]
    img = _generate(pipe, max_sequence_length=32)
    assert torch.isfinite(img).all() and img.std() > 1e-3


def test_flux_transformer_only_file_is_refused_alone(tmp_path):
    from workbench.errors import FormatError

    path = flux.build_transformer(tmp_path / "flux1-schnell.safetensors", variant="schnell")
    with pytest.raises(FormatError, match="no text encoders"):
        load_dit.load_flux_pipeline(path)
