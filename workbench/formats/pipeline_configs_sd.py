"""SD1.5 and SDXL diffusers configs inferred from single-file (LDM / SGM) header shapes.

Starts from the bundled real configs (`data/sd15`, `data/sdxl`: runwayml/stable-diffusion-v1-5 and
stabilityai/stable-diffusion-xl-base-1.0) and replaces every size that the shapes determine: UNet
levels, widths, layers per block, attention placement and depth, cross-attention width, linear vs conv
projection, SDXL's added-conditioning widths; VAE widths, levels and latent channels; CLIP widths,
depths, vocabulary and positions. On a real checkpoint the result equals the bundled config.

Three values are not visible in shapes and follow the real models' rules:
  * norm groups: 32, or the largest divisor of the channels' common divisor that is <= 32;
  * UNet heads: SD1.5 uses 8 heads everywhere; SDXL uses 64-wide heads (channels // 64, at least 1);
  * CLIP heads: 64-wide (hidden // 64, at least 1) as in CLIP-L (12) and OpenCLIP bigG (20).
The tiny test models in `workbench.testing` are built with the same rules.
"""

from __future__ import annotations

import copy
import json
import math
import re
from functools import cache
from pathlib import Path, PurePath
from typing import Any

from workbench.errors import FormatError
from workbench.formats.pipeline_config import ConfigFiles, Shapes, register

DATA = Path(__file__).parent / "data"
CLIP_TOKENIZER_WRITER = "workbench.formats.clip_tokenizer:write_tokenizer_dir"

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD15_CLIP_L = "cond_stage_model.transformer.text_model."
SDXL_CLIP_L = "conditioner.embedders.0.transformer.text_model."
SDXL_CLIP_G = "conditioner.embedders.1.model."


def config_key(path: PurePath, root: PurePath) -> str:
    """The table key of a bundled config file: `unet/config.json` on every OS (str() of the
    relative path would give `unet\\config.json` on Windows, which no lookup here matches)."""
    return path.relative_to(root).as_posix()


@cache
def _bundled(arch: str) -> dict[str, dict[str, Any]]:
    root = DATA / arch
    return {config_key(p, root): json.loads(p.read_text(encoding="utf-8"))
            for p in sorted(root.rglob("*.json"))}


def bundled_files(arch: str) -> dict[str, dict[str, Any]]:
    """A fresh copy of the real config files shipped for `arch` ("sd15" or "sdxl")."""
    return copy.deepcopy(_bundled(arch))


def _shape(shapes: Shapes, key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise FormatError(f"tensor {key!r} is missing (needed to size the diffusers config)")
    return tuple(shapes[key])


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    """Sorted distinct integers captured by `pattern` (one group) over all keys."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})


def norm_groups(channels: list[int], most: int = 32) -> int:
    """Largest group count <= `most` that divides every channel count (32 for the real models)."""
    common = math.gcd(*channels)
    return max(g for g in range(1, most + 1) if common % g == 0)


def heads_64(width: int) -> int:
    """Head count for 64-wide attention heads, at least one."""
    return max(1, width // 64)


# ---------------------------------------------------------------- UNet


def infer_unet(shapes: Shapes, prefix: str = UNET) -> dict[str, Any]:
    """UNet2DConditionModel sizes from LDM/SGM UNet shapes (keys under `prefix`)."""
    p = prefix
    downs = _indices(shapes, re.escape(p) + r"input_blocks\.(\d+)\.0\.op\.weight")
    if not downs:
        raise FormatError(f"no {p}input_blocks.N.0.op downsamplers found: not an SD-style UNet")
    per_level = downs[0]  # first downsampler sits after layers_per_block + conv_in slots
    layers = per_level - 1
    levels = len(downs) + 1
    if any(d != (i + 1) * per_level for i, d in enumerate(downs)):
        raise FormatError(f"downsamplers at input_blocks {downs}: expected every {per_level}th slot")
    conv_in = _shape(shapes, f"{p}input_blocks.0.0.weight")
    channels, attn, depth = [], [], []
    for b in range(levels):
        first = b * per_level + 1
        channels.append(_shape(shapes, f"{p}input_blocks.{first}.0.out_layers.3.weight")[0])
        blocks = _indices(shapes, re.escape(f"{p}input_blocks.{first}.1.transformer_blocks.") + r"(\d+)\.")
        attn.append(bool(blocks))
        depth.append(len(blocks) or 1)
    first_attn = next((b * per_level + 1 for b in range(levels) if attn[b]), None)
    if first_attn is None:
        raise FormatError("no cross-attention blocks in input_blocks: not an SD1.5/SDXL UNet")
    t = f"{p}input_blocks.{first_attn}.1."
    mid_depth = len(_indices(shapes, re.escape(f"{p}middle_block.1.transformer_blocks.") + r"(\d+)\."))
    time_dim = _shape(shapes, f"{p}time_embed.0.weight")[0]
    config = {
        "in_channels": conv_in[1],
        "out_channels": _shape(shapes, f"{p}out.2.weight")[0],
        "block_out_channels": channels,
        "layers_per_block": layers,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "cross_attention_dim": _shape(shapes, t + "transformer_blocks.0.attn2.to_k.weight")[1],
        "use_linear_projection": len(_shape(shapes, t + "proj_in.weight")) == 2,
        "transformer_layers_per_block": depth,
        "norm_num_groups": norm_groups(channels),
        "time_embedding_dim": None if time_dim == 4 * channels[0] else time_dim,
    }
    if mid_depth and mid_depth != depth[-1]:
        raise FormatError(f"middle_block has {mid_depth} transformer blocks but the last level has "
                          f"{depth[-1]}: diffusers ties them together")
    return config


def _apply_unet(base: dict[str, Any], inferred: dict[str, Any], heads: list[int] | int) -> dict[str, Any]:
    out = dict(base)
    out.update(inferred)
    out["attention_head_dim"] = heads
    if out["time_embedding_dim"] is None and "time_embedding_dim" not in base:
        del out["time_embedding_dim"]
    if "transformer_layers_per_block" not in base and set(inferred["transformer_layers_per_block"]) == {1}:
        del out["transformer_layers_per_block"]  # SD1.5's config leaves it at the default
    if "use_linear_projection" not in base and not inferred["use_linear_projection"]:
        del out["use_linear_projection"]
    return out


# ---------------------------------------------------------------- VAE


def infer_vae(shapes: Shapes, prefix: str = VAE) -> dict[str, Any]:
    """AutoencoderKL sizes from LDM VAE shapes."""
    p = prefix
    levels = _indices(shapes, re.escape(f"{p}encoder.down.") + r"(\d+)\.")
    if not levels:
        raise FormatError(f"no {p}encoder.down.N blocks: not an LDM VAE")
    channels = [_shape(shapes, f"{p}encoder.down.{i}.block.0.conv1.weight")[0] for i in levels]
    layers = len(_indices(shapes, re.escape(f"{p}encoder.down.0.block.") + r"(\d+)\."))
    return {
        "in_channels": _shape(shapes, f"{p}encoder.conv_in.weight")[1],
        "out_channels": _shape(shapes, f"{p}decoder.conv_out.weight")[0],
        "block_out_channels": channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "layers_per_block": layers,
        "latent_channels": _shape(shapes, f"{p}post_quant_conv.weight")[0],
        "norm_num_groups": norm_groups(channels),
    }


# ---------------------------------------------------------------- text encoders


def infer_clip_l(shapes: Shapes, prefix: str) -> dict[str, Any]:
    """CLIPTextModel sizes from transformers-layout keys under `prefix` (ending in `text_model.`)."""
    vocab, hidden = _shape(shapes, prefix + "embeddings.token_embedding.weight")
    layers = _indices(shapes, re.escape(prefix + "encoder.layers.") + r"(\d+)\.")
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "max_position_embeddings": _shape(shapes, prefix + "embeddings.position_embedding.weight")[0],
        "num_hidden_layers": len(layers),
        "intermediate_size": _shape(shapes, prefix + "encoder.layers.0.mlp.fc1.weight")[0],
        "num_attention_heads": heads_64(hidden),
        "projection_dim": hidden,
    }


def infer_open_clip(shapes: Shapes, prefix: str = SDXL_CLIP_G) -> dict[str, Any]:
    """CLIPTextModelWithProjection sizes from an OpenCLIP text tower under `prefix`."""
    vocab, hidden = _shape(shapes, prefix + "token_embedding.weight")
    layers = _indices(shapes, re.escape(prefix + "transformer.resblocks.") + r"(\d+)\.")
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "max_position_embeddings": _shape(shapes, prefix + "positional_embedding")[0],
        "num_hidden_layers": len(layers),
        "intermediate_size": _shape(shapes, prefix + "transformer.resblocks.0.mlp.c_fc.weight")[0],
        "num_attention_heads": heads_64(hidden),
        "projection_dim": _shape(shapes, prefix + "text_projection")[1],  # stored as [hidden, proj]
    }


def _tokenizer(pad_token: str, max_length: int) -> dict[str, Any]:
    return {"_writer": CLIP_TOKENIZER_WRITER, "pad_token": pad_token, "max_length": max_length}


# ---------------------------------------------------------------- the two architectures


def sd15_configs(shapes: Shapes) -> ConfigFiles:
    """Config files for an SD1.5 single file (A1111 layout)."""
    files = bundled_files("sd15")
    unet = infer_unet(shapes)
    files["unet/config.json"] = _apply_unet(files["unet/config.json"], unet, 8)
    files["vae/config.json"].update(infer_vae(shapes))
    text = infer_clip_l(shapes, SD15_CLIP_L)
    if text["hidden_size"] != unet["cross_attention_dim"]:
        raise FormatError(f"CLIP hidden size {text['hidden_size']} != UNet cross-attention width "
                          f"{unet['cross_attention_dim']}")
    files["text_encoder/config.json"].update(text)
    files["tokenizer"] = _tokenizer("<|endoftext|>", text["max_position_embeddings"])
    return files


def sdxl_configs(shapes: Shapes) -> ConfigFiles:
    """Config files for an SDXL single file (SGM layout: CLIP-L + OpenCLIP bigG)."""
    files = bundled_files("sdxl")
    unet = infer_unet(shapes)
    clip_l = infer_clip_l(shapes, SDXL_CLIP_L)
    clip_g = infer_open_clip(shapes)
    if clip_l["hidden_size"] + clip_g["hidden_size"] != unet["cross_attention_dim"]:
        raise FormatError(f"CLIP-L {clip_l['hidden_size']} + CLIP-G {clip_g['hidden_size']} != UNet "
                          f"cross-attention width {unet['cross_attention_dim']}")
    heads = [heads_64(c) for c in unet["block_out_channels"]]
    config = _apply_unet(files["unet/config.json"], unet, heads)
    added = _shape(shapes, UNET + "label_emb.0.0.weight")[1]
    time_ids = added - clip_g["projection_dim"]  # pooled CLIP-G + 6 Fourier-embedded size/crop values
    if time_ids <= 0 or time_ids % 6:
        raise FormatError(f"label_emb input width {added} is not pooled width {clip_g['projection_dim']} "
                          "+ 6 x addition_time_embed_dim")
    config["projection_class_embeddings_input_dim"] = added
    config["addition_time_embed_dim"] = time_ids // 6
    files["unet/config.json"] = config
    files["vae/config.json"].update(infer_vae(shapes))
    files["text_encoder/config.json"].update(clip_l)
    files["text_encoder_2/config.json"].update(clip_g)
    files["tokenizer"] = _tokenizer("<|endoftext|>", clip_l["max_position_embeddings"])
    files["tokenizer_2"] = _tokenizer("!", clip_g["max_position_embeddings"])
    return files


register("sd15", sd15_configs)
register("sdxl", sdxl_configs)
