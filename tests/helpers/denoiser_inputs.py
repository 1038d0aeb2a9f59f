"""Random inputs of the right shapes for one forward of a tiny denoiser (shared by several tests)."""

from __future__ import annotations

import torch


def flux_inputs(model, seed: int = 0) -> dict:
    """16 image tokens and 8 text tokens for a FluxTransformer2DModel, from a private generator."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    return dict(hidden_states=torch.randn(1, 16, c.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, 8, c.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g),
                timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
                guidance=torch.tensor([3.5]))


def denoiser_inputs(arch: str, model) -> dict:
    """Small inputs for a tiny UNet (sd15/sdxl), SD3 or FLUX transformer, drawn from torch's global RNG
    (callers seed it)."""
    c = model.config
    if arch == "flux":
        return dict(hidden_states=torch.randn(1, 4, c.in_channels),
                    encoder_hidden_states=torch.randn(1, 3, c.joint_attention_dim),
                    pooled_projections=torch.randn(1, c.pooled_projection_dim),
                    timestep=torch.tensor([0.5]), img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(3, 3),
                    guidance=torch.tensor([1.0]) if c.guidance_embeds else None)
    if arch == "sd3":  # SD3Transformer2DModel: unpacked latents, timestep on the 0-1000 scale
        return dict(hidden_states=torch.randn(1, c.in_channels, 8, 8),
                    encoder_hidden_states=torch.randn(1, 5, c.joint_attention_dim),
                    pooled_projections=torch.randn(1, c.pooled_projection_dim),
                    timestep=torch.tensor([500.0]))
    kw = dict(sample=torch.randn(1, c.in_channels, 8, 8), timestep=torch.tensor([10]),
              encoder_hidden_states=torch.randn(1, 5, c.cross_attention_dim))
    if arch == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, c.projection_class_embeddings_input_dim
                                                              - 6 * c.addition_time_embed_dim),
                              "time_ids": torch.randn(1, 6)}
    return kw
