"""Tiny FLUX.1 checkpoints: BFL transformer files, ComfyUI all-in-one files and Forge-style split files.

Keys and block structure are the real ones: 19 `double_blocks` and 38 `single_blocks`, `img_in`,
`txt_in`, `time_in`, `vector_in`, `guidance_in` (dev only; schnell has none) and `final_layer`.
- all-in-one (`build`): `model.diffusion_model.*`, `text_encoders.clip_l.transformer.*`,
  `text_encoders.t5xxl.transformer.*`, VAE under `vae.*` (ComfyUI's FLUX checkpoints);
- split (`build_split`): `flux1-<variant>.safetensors` (bare BFL keys), `ae.safetensors` (LDM VAE keys,
  16 latent channels), `clip_l.safetensors` (`text_model.*`), `t5xxl_fp16.safetensors` (HF T5 encoder
  keys: `shared.weight`, `encoder.block.N.layer.*`, `encoder.final_layer_norm.weight`).
Widths are tiny (2 heads of 16).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from workbench.formats.pipeline_configs_dit import rope_axes
from workbench.formats import dit_keys
from workbench.testing import dit_parts

VARIANTS = ("dev", "schnell")
TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=dit_parts.T5["d_model"],
                   pooled_projection_dim=dit_parts.CLIP_L["hidden_size"], axes_dims_rope=tuple(rope_axes(16)))
VAE_FACTORS = dict(scaling_factor=0.3611, shift_factor=0.1159)  # FLUX.1 ae (bundled config)
PREFIX = "model.diffusion_model."
SPLIT_NAMES = {"vae": "ae.safetensors", "text_encoder": "clip_l.safetensors",
               "text_encoder_2": "t5xxl_fp16.safetensors"}


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"flux variant must be one of {VARIANTS}, got {variant!r}")


def transformer_name(variant: str) -> str:
    return f"flux1-{variant}.safetensors"


def tiny_models(seed: int = 0, variant: str = "dev", dtype: torch.dtype = torch.bfloat16) -> dict:
    """The source modules, rounded through `dtype`. FLUX uses CLIP-L's unprojected pooled output."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel

    _check_variant(variant)
    gen = torch.Generator().manual_seed(seed)
    transformer = dit_parts.randomize(FluxTransformer2DModel(**TRANSFORMER, guidance_embeds=variant == "dev"), gen)
    clip_wp = dit_parts.clip("l", gen)
    clip_l = CLIPTextModel(clip_wp.config)
    missing, unexpected = clip_l.load_state_dict(
        {k.removeprefix("text_model."): v for k, v in clip_wp.state_dict().items() if k != "text_projection.weight"},
        strict=False)
    assert not missing, missing
    models = {"transformer": transformer, "text_encoder": clip_l, "text_encoder_2": dit_parts.t5(gen),
              "vae": dit_parts.vae(gen, **VAE_FACTORS)}
    return {k: dit_parts.rounded(m, dtype).eval() for k, m in models.items()}


def component_state_dicts(models: dict, dtype: torch.dtype = torch.bfloat16) -> dict[str, dict[str, torch.Tensor]]:
    """Each component in its stand-alone file layout (no prefixes)."""
    tr = dit_parts.state(models["transformer"], dtype)
    return {
        "transformer": dit_keys.to_original(tr, dit_keys.flux_rules(tr)),
        "vae": dit_keys.vae_to_ldm(dit_parts.state(models["vae"], dtype)),
        "text_encoder": dit_keys.clip_to_original(dit_parts.state(models["text_encoder"], dtype), projection=False),
        "text_encoder_2": dit_keys.t5_to_original(dit_parts.state(models["text_encoder_2"], dtype)),
    }


def original_state_dict(models: dict, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """All tensors of a ComfyUI-style all-in-one FLUX file."""
    parts = component_state_dicts(models, dtype)
    prefixes = {"transformer": PREFIX, "vae": "vae.", "text_encoder": "text_encoders.clip_l.transformer.",
                "text_encoder_2": "text_encoders.t5xxl.transformer."}
    sd = {prefixes[c] + k: v for c, part in parts.items() for k, v in part.items()}
    width = dit_parts.CLIP_L["hidden_size"]
    # ComfyUI's CLIP-L wrapper carries an (unused by FLUX) projection and logit scale.
    sd["text_encoders.clip_l.transformer.text_projection.weight"] = torch.eye(width, dtype=dtype)
    sd["text_encoders.clip_l.logit_scale"] = torch.tensor(4.6055, dtype=dtype)
    return sd


def _meta(variant: str) -> dict[str, str]:
    return {"format": "pt", "modelspec.architecture": f"Flux.1-{variant}", "workbench.tiny": "1"}


def build(path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.bfloat16, variant: str = "dev") -> Path:
    """Write a tiny all-in-one FLUX.1 checkpoint (ComfyUI layout)."""
    return dit_parts.save(original_state_dict(tiny_models(seed, variant, dtype), dtype), path, _meta(variant))


def build_transformer(path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                      variant: str = "dev") -> Path:
    """Write only the transformer with bare BFL keys, like black-forest-labs' flux1-dev.safetensors."""
    parts = component_state_dicts(tiny_models(seed, variant, dtype), dtype)
    return dit_parts.save(parts["transformer"], path, _meta(variant))


def build_split(out_dir: str | os.PathLike, variant: str = "dev", seed: int = 0,
                dtype: torch.dtype = torch.bfloat16) -> dict[str, Path]:
    """Write the four files Forge users keep in separate folders; returns {component: path}."""
    _check_variant(variant)
    out = Path(out_dir)
    parts = component_state_dicts(tiny_models(seed, variant, dtype), dtype)
    names = dict(SPLIT_NAMES, transformer=transformer_name(variant))
    return {c: dit_parts.save(parts[c], out / names[c], _meta(variant) if c == "transformer" else None)
            for c in ("transformer", "vae", "text_encoder", "text_encoder_2")}
