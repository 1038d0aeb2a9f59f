"""Tiny SD1.5 single-file checkpoint: the real A1111 key names and block structure, tiny widths.

Structure kept from runwayml/stable-diffusion-v1-5: UNet with 4 levels, 2 layers per block,
cross-attention on the first three levels (depth 1, conv proj_in), channel pattern c, 2c, 4c, 4c
(so skip connections sit where they do in the real file), 8 attention heads; VAE with 4 levels and
channel pattern c, 2c, 4c, 4c; 12-layer CLIP-L with the full 49408-token vocabulary and 77 positions.
The file has exactly the real 1131 keys (UNet 686, CLIP-L 197, VAE 248).

Norm groups are reduced with the width; `workbench.formats.pipeline_configs_sd` infers them (and every
other width) back from the header, so the tiny configs below are what that inference must produce.
"""

from __future__ import annotations

from pathlib import Path

import torch

from workbench.testing import ldm_keys
from workbench.testing.common import cast_floats, fill_seeded_, write_checkpoint

UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [16, 32, 64, 64],
    "layers_per_block": 2,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,  # SD1.5's config calls the head *count* attention_head_dim
    "norm_num_groups": 16,
    "use_linear_projection": False,
}

VAE_CONFIG = {
    "sample_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 16, 32, 32],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 8,
}

TEXT_ENCODER_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 128,
    "num_hidden_layers": 12,
    "num_attention_heads": 1,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

COMPONENTS = ("unet", "vae", "text_encoder")


def build_models(seed: int = 0) -> dict[str, torch.nn.Module]:
    """The tiny diffusers/transformers models (fp32, eval mode) the checkpoint is written from."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):  # seed construction without touching the caller's RNG
        torch.manual_seed(seed)
        models = {
            "unet": UNet2DConditionModel(**UNET_CONFIG),
            "vae": AutoencoderKL(**VAE_CONFIG),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG)),
        }
    for i, name in enumerate(COMPONENTS):
        fill_seeded_(models[name], seed * 1000 + i).eval()
    return models


def original_state_dict(models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """All components renamed to the SD1.5 single-file layout (fp32)."""
    out = {}
    out.update(ldm_keys.unet_to_original(models["unet"].state_dict(), UNET_CONFIG["layers_per_block"]))
    out.update(ldm_keys.clip_l_to_original(models["text_encoder"].state_dict(), ldm_keys.SD15_CLIP_L_PREFIX,
                                           TEXT_ENCODER_CONFIG["max_position_embeddings"]))
    out.update(ldm_keys.vae_to_original(models["vae"].state_dict()))
    return out


def write(path: str | Path, models: dict[str, torch.nn.Module],
          dtype: torch.dtype = torch.float16) -> Path:
    """Write `models` (from `build_models`) as one SD1.5 single file in `dtype`."""
    return write_checkpoint(path, cast_floats(original_state_dict(models), dtype))


def build(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write a tiny SD1.5 checkpoint to `path` (same seed and dtype -> byte-identical file)."""
    return write(path, build_models(seed), dtype)
