"""Tiny SDXL single-file checkpoint: the real SGM key names and block structure, tiny widths.

Structure kept from stabilityai/stable-diffusion-xl-base-1.0: UNet with 3 levels (c, 2c, 4c), 2 layers
per block, no attention on level 0, transformer depths [1, 2, 10] (10 in the middle block too), linear
proj_in/proj_out, 64-wide heads rule, text_time added conditioning (pooled CLIP-G + 6 size/crop
values); the SD VAE layout; 12-layer CLIP-L and 32-layer OpenCLIP bigG text towers with the full
vocabulary. Exactly the real 2515 keys: UNet 1680, CLIP-L 197, CLIP-G 390, VAE 248.

CLIP-L and CLIP-G must have different widths (as 768 and 1280 do): diffusers tells the two towers
apart by the width of their position embeddings.
"""

from __future__ import annotations

from pathlib import Path

import torch

from workbench.testing import ldm_keys
from workbench.testing.common import cast_floats, fill_seeded_, write_checkpoint
from workbench.testing.sd15 import TEXT_ENCODER_CONFIG as _SD15_TEXT
from workbench.testing.sd15 import VAE_CONFIG as _SD15_VAE

CLIP_L_WIDTH = 32
CLIP_G_WIDTH = 48
TIME_ID_WIDTH = 8  # addition_time_embed_dim (real: 256)

UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [8, 16, 32],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": CLIP_L_WIDTH + CLIP_G_WIDTH,
    "attention_head_dim": [1, 1, 1],  # 64-wide heads rule: max(1, channels // 64)
    "norm_num_groups": 8,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": TIME_ID_WIDTH,
    "projection_class_embeddings_input_dim": CLIP_G_WIDTH + 6 * TIME_ID_WIDTH,
}

VAE_CONFIG = {**_SD15_VAE, "scaling_factor": 0.13025, "force_upcast": True}

TEXT_ENCODER_CONFIG = dict(_SD15_TEXT)

TEXT_ENCODER_2_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": CLIP_G_WIDTH,
    "intermediate_size": 4 * CLIP_G_WIDTH,
    "num_hidden_layers": 32,
    "num_attention_heads": 1,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": CLIP_G_WIDTH,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def build_models(seed: int = 0) -> dict[str, torch.nn.Module]:
    """The tiny diffusers/transformers models (fp32, eval mode) the checkpoint is written from."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        models = {
            "unet": UNet2DConditionModel(**UNET_CONFIG),
            "vae": AutoencoderKL(**VAE_CONFIG),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2_CONFIG)),
        }
    for i, name in enumerate(COMPONENTS):
        fill_seeded_(models[name], seed * 1000 + i).eval()
    return models


def original_state_dict(models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """All components renamed to the SDXL single-file (SGM) layout (fp32)."""
    out = {}
    out.update(ldm_keys.unet_to_original(models["unet"].state_dict(), UNET_CONFIG["layers_per_block"]))
    out.update(ldm_keys.clip_l_to_original(models["text_encoder"].state_dict(), ldm_keys.SDXL_CLIP_L_PREFIX,
                                           TEXT_ENCODER_CONFIG["max_position_embeddings"]))
    out.update(ldm_keys.open_clip_to_original(models["text_encoder_2"].state_dict()))
    out.update(ldm_keys.vae_to_original(models["vae"].state_dict()))
    return out


def write(path: str | Path, models: dict[str, torch.nn.Module],
          dtype: torch.dtype = torch.float16) -> Path:
    """Write `models` (from `build_models`) as one SDXL single file in `dtype`."""
    return write_checkpoint(path, cast_floats(original_state_dict(models), dtype))


def build(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write a tiny SDXL checkpoint to `path` (same seed and dtype -> byte-identical file)."""
    return write(path, build_models(seed), dtype)
