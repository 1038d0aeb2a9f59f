"""Tiny SD3.5 all-in-one checkpoints in the ComfyUI/SAI single-file layout.

Keys and block structure are those of the real files: `model.diffusion_model.joint_blocks.N.*` with
the real block count (SD3.5 medium: 24 MMDiT-X blocks, dual attention `x_block.attn2` in blocks 0-12;
SD3.5 large: 38 blocks), q/k RMSNorm (`attn.ln_q/ln_k`), a pre-only last context block, the
embedders and `final_layer`, then `text_encoders.{clip_l,clip_g,t5xxl}.*` and the VAE under
`first_stage_model.*`. Widths are tiny (2 heads of 16), so a file is a few MB and builds in seconds.

`tiny_models()` returns the diffusers/transformers modules a file is written from, so tests can check
that loading the file gives exactly these weights back.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from workbench.formats import dit_keys
from workbench.testing import dit_parts

VARIANTS = {
    # num_layers, dual-attention blocks (facts of stabilityai/stable-diffusion-3.5-{medium,large})
    "sd3.5-medium": (24, tuple(range(13))),
    "sd3.5-large": (38, ()),
}
TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=dit_parts.T5["d_model"], caption_projection_dim=32,
                   pooled_projection_dim=dit_parts.CLIP_L["projection_dim"] + dit_parts.CLIP_G["projection_dim"],
                   pos_embed_max_size=16, qk_norm="rms_norm")
VAE_FACTORS = dict(scaling_factor=1.5305, shift_factor=0.0609)  # SD3/SD3.5 VAE (bundled config)
PREFIX = "model.diffusion_model."


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"sd3 variant must be one of {sorted(VARIANTS)}, got {variant!r}")


def tiny_models(seed: int = 0, variant: str = "sd3.5-medium", dtype: torch.dtype = torch.float16) -> dict:
    """The source modules, already rounded through `dtype` (float32 compute copies)."""
    from diffusers import SD3Transformer2DModel

    _check_variant(variant)
    layers, dual = VARIANTS[variant]
    gen = torch.Generator().manual_seed(seed)
    models = {
        "transformer": dit_parts.randomize(
            SD3Transformer2DModel(**TRANSFORMER, num_layers=layers, dual_attention_layers=dual), gen),
        "text_encoder": dit_parts.clip("l", gen, eye_projection=True),
        "text_encoder_2": dit_parts.clip("g", gen),
        "text_encoder_3": dit_parts.t5(gen),
        "vae": dit_parts.vae(gen, **VAE_FACTORS),
    }
    return {k: dit_parts.rounded(m, dtype).eval() for k, m in models.items()}


def original_state_dict(models: dict, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """All tensors of the all-in-one file, in ComfyUI/SAI names."""
    tr = dit_parts.state(models["transformer"], dtype)
    sd = dit_keys.to_original(tr, dit_keys.sd3_rules(tr), PREFIX)
    scale = torch.tensor(4.6055, dtype=dtype)  # CLIP's logit scale ln(100); ComfyUI saves one per encoder
    for comp, name in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
        sd.update(dit_keys.clip_to_original(dit_parts.state(models[comp], dtype),
                                            f"text_encoders.{name}.transformer."))
        sd[f"text_encoders.{name}.logit_scale"] = scale
    sd.update(dit_keys.t5_to_original(dit_parts.state(models["text_encoder_3"], dtype),
                                      "text_encoders.t5xxl.transformer."))
    sd["text_encoders.t5xxl.logit_scale"] = scale
    sd.update(dit_keys.vae_to_ldm(dit_parts.state(models["vae"], dtype), "first_stage_model."))
    return sd


def build(path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float16,
          variant: str = "sd3.5-medium") -> Path:
    """Write a tiny all-in-one SD3.5 checkpoint to `path`; same arguments -> same bytes."""
    models = tiny_models(seed, variant, dtype)
    meta = {"format": "pt", "modelspec.architecture": f"stable-diffusion-v3-5-{variant.split('-')[-1]}",
            "workbench.tiny": "1"}
    return dit_parts.save(original_state_dict(models, dtype), path, meta)
