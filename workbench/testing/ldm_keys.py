"""Diffusers module names -> the original single-file (LDM / SGM / OpenCLIP) key names.

A1111, Forge and ComfyUI store SD1.5 and SDXL checkpoints in the layout of the original training code:
the UNet as `input_blocks` / `middle_block` / `output_blocks` of numbered sequential slots, the VAE as
`encoder.down.i.block.j` with the decoder's `up` list in reverse order, CLIP-L in the transformers
layout under a prefix, and SDXL's CLIP-G in the OpenCLIP layout (fused q/k/v, transposed projection).
The tiny test models are built as diffusers modules (so that diffusers can run them) and written out
through these tables; loading them back through diffusers' own converter proves the names are real.

UNet slot numbering (L = layers_per_block, b = level, j = layer in the level):
  down resnet/attention (b, j)  -> input_blocks.{b*(L+1) + j + 1}.{0 | 1}
  down sampler of level b      -> input_blocks.{b*(L+1) + L + 1}.0.op
  up resnet/attention (b, j)   -> output_blocks.{b*(L+1) + j}.{0 | 1}
  up sampler of level b        -> output_blocks.{b*(L+1) + L}.{2 if that block has attention else 1}.conv
  mid resnet 0 / attention / resnet 1 -> middle_block.0 / .1 / .2
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

import torch

# ---------------------------------------------------------------- UNet

UNET_PREFIX = "model.diffusion_model."

# Top-level modules of the UNet.
UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL: pooled text + size/crop conditioning
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}

# Inside a UNet ResBlock.
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# Inside a SpatialTransformer the names are the same in both layouts (norm, proj_in,
# transformer_blocks.N.{attn1,attn2,ff,norm1-3}, proj_out), so only the slot prefix changes.

_DOWN = re.compile(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)")
_UP = re.compile(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def _resnet(rest: str) -> str:
    """`conv1.weight` -> `in_layers.2.weight` (module name + parameter name)."""
    module, param = rest.rsplit(".", 1)
    return f"{UNET_RESNET[module]}.{param}"


def unet_key_map(diffusers_keys: Iterable[str], layers_per_block: int = 2) -> dict[str, str]:
    """Map every diffusers UNet2DConditionModel key to its LDM/SGM key (without `model.diffusion_model.`).

    The key list is needed as a whole because an up sampler's slot depends on whether its up block
    has attention (SD1.5/SDXL: `output_blocks.2.1.conv` vs `output_blocks.5.2.conv`).
    """
    keys = list(diffusers_keys)
    step = layers_per_block + 1
    up_with_attn = {int(m.group(1)) for k in keys if (m := _UP.fullmatch(k)) and m.group(2) == "attentions"}
    out: dict[str, str] = {}
    for key in keys:
        module, _, param = key.rpartition(".")
        if module in UNET_TOP:
            out[key] = f"{UNET_TOP[module]}.{param}"
        elif m := _DOWN.fullmatch(key):
            b, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            if kind == "resnets":
                out[key] = f"input_blocks.{b * step + j + 1}.0.{_resnet(rest)}"
            elif kind == "attentions":
                out[key] = f"input_blocks.{b * step + j + 1}.1.{rest}"
            else:  # downsamplers.0.conv.{weight,bias}
                out[key] = f"input_blocks.{b * step + layers_per_block + 1}.0.op.{rest.split('.', 1)[1]}"
        elif m := _MID.fullmatch(key):
            kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
            if kind == "resnets":
                out[key] = f"middle_block.{0 if j == 0 else 2}.{_resnet(rest)}"
            else:
                out[key] = f"middle_block.1.{rest}"
        elif m := _UP.fullmatch(key):
            b, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            if kind == "resnets":
                out[key] = f"output_blocks.{b * step + j}.0.{_resnet(rest)}"
            elif kind == "attentions":
                out[key] = f"output_blocks.{b * step + j}.1.{rest}"
            else:  # upsamplers.0.conv.{weight,bias}
                slot = 2 if b in up_with_attn else 1
                out[key] = f"output_blocks.{b * step + layers_per_block}.{slot}.{rest}"
        else:
            raise KeyError(f"UNet key {key!r} has no original-layout name")
    return out


def unet_to_original(state_dict: Mapping[str, torch.Tensor], layers_per_block: int = 2,
                     prefix: str = UNET_PREFIX) -> dict[str, torch.Tensor]:
    """Rename a diffusers UNet state dict to the single-file layout (tensors are unchanged)."""
    names = unet_key_map(state_dict.keys(), layers_per_block)
    return {prefix + names[k]: v for k, v in state_dict.items()}


# ---------------------------------------------------------------- VAE

VAE_PREFIX = "first_stage_model."

VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
              "conv_shortcut": "nin_shortcut"}
# The LDM VAE attention is made of 1x1 convolutions: q/k/v/proj_out weights are [C, C, 1, 1].
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
VAE_TOP = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}

_VAE_BLOCK = re.compile(r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)"
                        r"\.(\d+)\.(.+)")
_VAE_MID = re.compile(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def _vae_module(table: Mapping[str, str], rest: str) -> str:
    module, _, param = rest.rpartition(".")
    return f"{table[module]}.{param}"


def vae_key_map(diffusers_keys: Iterable[str]) -> dict[str, str]:
    """Map every diffusers AutoencoderKL key to its LDM key (without `first_stage_model.`).

    The decoder's `up_blocks` run from low to high resolution while LDM's `up` list is indexed by
    resolution level, so `decoder.up_blocks.i` is `decoder.up.{n-1-i}`.
    """
    keys = list(diffusers_keys)
    n_up = len({m.group(3) for k in keys if (m := _VAE_BLOCK.fullmatch(k)) and m.group(2) == "up_blocks"})
    out: dict[str, str] = {}
    for key in keys:
        side, _, rest = key.partition(".")
        module, _, param = rest.rpartition(".")
        if side in ("quant_conv", "post_quant_conv"):
            out[key] = key
        elif module in VAE_TOP and side in ("encoder", "decoder"):
            out[key] = f"{side}.{VAE_TOP[module]}.{param}"
        elif m := _VAE_BLOCK.fullmatch(key):
            side, group, i, kind, j, rest = m.groups()
            level = int(i) if group == "down_blocks" else n_up - 1 - int(i)
            name = "down" if group == "down_blocks" else "up"
            if kind == "resnets":
                out[key] = f"{side}.{name}.{level}.block.{j}.{_vae_module(VAE_RESNET, rest)}"
            else:  # {down,up}samplers.0.conv.{weight,bias}
                sampler = "downsample" if kind == "downsamplers" else "upsample"
                out[key] = f"{side}.{name}.{level}.{sampler}.{rest}"
        elif m := _VAE_MID.fullmatch(key):
            side, kind, j, rest = m.groups()
            if kind == "resnets":
                out[key] = f"{side}.mid.block_{int(j) + 1}.{_vae_module(VAE_RESNET, rest)}"
            else:
                out[key] = f"{side}.mid.attn_1.{_vae_module(VAE_ATTENTION, rest)}"
        else:
            raise KeyError(f"VAE key {key!r} has no original-layout name")
    return out


def vae_to_original(state_dict: Mapping[str, torch.Tensor],
                    prefix: str = VAE_PREFIX) -> dict[str, torch.Tensor]:
    """Rename a diffusers VAE state dict to the LDM layout; attention linears become 1x1 convs."""
    names = vae_key_map(state_dict.keys())
    out = {}
    for key, value in state_dict.items():
        new = names[key]
        if ".mid.attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[prefix + new] = value
    return out


# ---------------------------------------------------------------- CLIP-L (transformers layout)

SD15_CLIP_L_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."


def clip_l_to_original(state_dict: Mapping[str, torch.Tensor], prefix: str,
                       max_positions: int = 77) -> dict[str, torch.Tensor]:
    """CLIPTextModel weights under `prefix + "text_model."`, plus the int64 `position_ids` row.

    transformers >= 5.6 dropped the `text_model.` level from CLIPTextModel (and keeps position_ids as
    a non-persistent buffer); real files have both, so they are restored here.
    """
    out = {}
    for key, value in state_dict.items():
        if key.startswith("text_projection."):
            continue  # SD1.5/SDXL CLIP-L files carry no projection
        inner = key.removeprefix("text_model.")
        out[f"{prefix}text_model.{inner}"] = value
    out[f"{prefix}text_model.embeddings.position_ids"] = torch.arange(max_positions, dtype=torch.int64)[None]
    return out


# ---------------------------------------------------------------- OpenCLIP ViT-bigG text tower (SDXL)

SDXL_CLIP_G_PREFIX = "conditioner.embedders.1.model."

OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",  # a bare Parameter in OpenCLIP
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_CLIP_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
# OpenCLIP's logit scale: log(1/0.07) at init, trained to (and clamped at) log(100).
OPEN_CLIP_LOGIT_SCALE = math.log(100.0)


def open_clip_to_original(state_dict: Mapping[str, torch.Tensor], prefix: str = SDXL_CLIP_G_PREFIX,
                          logit_scale: float = OPEN_CLIP_LOGIT_SCALE) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection weights in the OpenCLIP layout.

    q/k/v projections are fused into `attn.in_proj_{weight,bias}` (rows q, then k, then v), and
    `text_projection` is stored as OpenCLIP multiplies it (`x @ P`), i.e. the transposed Linear weight.
    """
    sd = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key in OPEN_CLIP_TOP:
            out[prefix + OPEN_CLIP_TOP[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.t().contiguous()
        elif m := _CLIP_LAYER.fullmatch(key):
            layer, module, param = int(m.group(1)), m.group(2), m.group(3)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                fused.setdefault((layer, param), {})[module[-6]] = value
            else:
                out[f"{prefix}transformer.resblocks.{layer}.{OPEN_CLIP_LAYER[module]}.{param}"] = value
        else:
            raise KeyError(f"CLIP-G key {key!r} has no OpenCLIP name")
    for (layer, param), parts in sorted(fused.items()):
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0)
    out[prefix + "logit_scale"] = torch.tensor(logit_scale)
    return out
