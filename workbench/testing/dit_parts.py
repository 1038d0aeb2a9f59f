"""Tiny text encoders and VAE shared by the SD3 and FLUX test checkpoints.

Real depths and key structure, tiny widths: CLIP-L 12 layers, CLIP-G 32 layers, T5-XXL 24 layers
(relative attention bias in block 0, gated-GELU feed-forward), the 16-channel LDM VAE with four
resolution levels and two resnets per level. CLIP keeps the real 49408-token vocabulary so the real
BPE tokenizer works; T5 uses the tiny Unigram vocabulary of `pipeline_configs_dit.tiny_t5_pieces`.
Widths differ between CLIP-L and CLIP-G on purpose: diffusers tells the two apart by width.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from workbench.formats.pipeline_configs_dit import TINY_T5_VOCAB
from workbench.formats.writer import save_file_atomic

CLIP_L = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=12, num_attention_heads=2, projection_dim=8,
              hidden_act="quick_gelu", vocab_size=49408, max_position_embeddings=77)
CLIP_G = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=32, num_attention_heads=2, projection_dim=16,
              hidden_act="gelu", vocab_size=49408, max_position_embeddings=77)
T5 = dict(d_model=32, d_kv=16, num_heads=2, d_ff=32, num_layers=24, num_decoder_layers=24,
          relative_attention_num_buckets=32, relative_attention_max_distance=128, vocab_size=TINY_T5_VOCAB,
          dense_act_fn="gelu_new", is_gated_act=True, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6)
VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16, 32, 32), layers_per_block=2,
           norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)


def randomize(model: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    """Give every float tensor distinct seeded values, so a swapped or misplaced tensor shows.

    Default inits leave many tensors at 0 or 1 (norm weights, adaLN, biases), which would hide
    exactly the mistakes the round-trip tests look for.
    """
    with torch.no_grad():
        for name, t in sorted(model.state_dict(keep_vars=True).items()):
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
            if t.dim() >= 2:
                fan_in = t[0].numel()
                t.copy_(noise / fan_in ** 0.5)
            elif t.dim() == 1 and bool((t == 1).all()):
                t.copy_(1 + 0.1 * noise)
            else:
                t.copy_(0.02 * noise)
    return model


def clip(kind: str, gen: torch.Generator, eye_projection: bool = False):
    """Tiny CLIPTextModelWithProjection ("l" or "g")."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    model = randomize(CLIPTextModelWithProjection(CLIPTextConfig(**(CLIP_L if kind == "l" else CLIP_G))), gen)
    if eye_projection:  # SD3 uses CLIP-L's pooled output unprojected; diffusers loads it as identity
        with torch.no_grad():
            model.text_projection.weight.copy_(torch.eye(model.text_projection.weight.shape[0]))
    return model.eval()


def t5(gen: torch.Generator):
    from transformers import T5Config, T5EncoderModel

    return randomize(T5EncoderModel(T5Config(**T5)), gen).eval()


def vae(gen: torch.Generator, scaling_factor: float, shift_factor: float):
    from diffusers import AutoencoderKL

    return randomize(AutoencoderKL(**VAE, scaling_factor=scaling_factor, shift_factor=shift_factor), gen).eval()


def rounded(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Round float weights through the storage dtype, in place, keeping float32 compute copies."""
    with torch.no_grad():
        for t in model.state_dict(keep_vars=True).values():
            if t.is_floating_point():
                t.copy_(t.to(dtype).to(t.dtype))
    return model


def state(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}


def save(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write safetensors atomically, tensors and metadata in sorted order, so equal inputs give equal
    bytes (safetensors' own writer orders metadata by a random hash)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    ordered = {k: tensors[k].contiguous() for k in sorted(tensors)}
    return save_file_atomic(ordered, out, dict(sorted((metadata or {"format": "pt"}).items())), overwrite=True)
