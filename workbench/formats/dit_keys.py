"""Diffusers <-> original key tables for SD3/SD3.5 (MMDiT), FLUX.1, their 16-channel VAE and T5.

Why this exists: the tiny test checkpoints are built as diffusers modules (so every shape is consistent)
and then written in the layout real files use. One table per architecture drives both directions, so
the names we write and the names we read back cannot drift apart. The tables are facts of the formats:
SAI/ComfyUI MMDiT names (`joint_blocks.N.{x_block,context_block}...`), BFL FLUX names
(`double_blocks.N`, `single_blocks.N`), LDM VAE names (`encoder.down.N.block.M...`) and HF T5 names.

Tensor operations a rule can carry:
- "copy": same tensor, new name;
- "cat":  the original tensor is the row-wise concatenation of the diffusers parts (fused qkv, and
          FLUX single-block `linear1` = cat(q, k, v, proj_mlp));
- "swap": the original stores an adaLN projection as (shift, scale), diffusers as (scale, shift);
          swapping the two halves is its own inverse (SD3 `final_layer`, SD3 last context block,
          FLUX `final_layer`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

Tensor = torch.Tensor
SD3_PREFIX = "model.diffusion_model."
FLUX_PREFIX = "model.diffusion_model."


@dataclass(frozen=True)
class Rule:
    """One original tensor and the diffusers tensor(s) it is made of."""

    original: str
    parts: tuple[str, ...]
    op: str = "copy"  # "copy" | "cat" | "swap"


def _linear(original: str, parts: tuple[str, ...] | str, op: str = "copy") -> list[Rule]:
    """Expand a Linear (weight + bias) rule; `parts` name diffusers modules."""
    parts = (parts,) if isinstance(parts, str) else parts
    return [Rule(f"{original}.{s}", tuple(f"{p}.{s}" for p in parts), op) for s in ("weight", "bias")]


def _block_ids(keys, head: str) -> list[int]:
    """Sorted block indices N of keys starting with `head.N.`."""
    pat = re.compile(re.escape(head) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pat.match(k))})


# ---------------------------------------------------------------------------------------------- SD3

def sd3_rules(diffusers_keys) -> list[Rule]:
    """Rules for an SD3Transformer2DModel state dict (original names without `model.diffusion_model.`)."""
    keys = set(diffusers_keys)
    blocks = _block_ids(keys, "transformer_blocks")
    last = blocks[-1]
    rules = [Rule("pos_embed", ("pos_embed.pos_embed",))]
    rules += _linear("x_embedder.proj", "pos_embed.proj")
    rules += _linear("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
    rules += _linear("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
    rules += _linear("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1")
    rules += _linear("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")
    rules += _linear("context_embedder", "context_embedder")
    for i in blocks:
        d, o = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        x, c = o + "x_block.", o + "context_block."
        rules += _linear(x + "attn.qkv", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"), "cat")
        rules += _linear(x + "attn.proj", d + "attn.to_out.0")
        rules += _linear(x + "adaLN_modulation.1", d + "norm1.linear")
        rules += _linear(x + "mlp.fc1", d + "ff.net.0.proj")
        rules += _linear(x + "mlp.fc2", d + "ff.net.2")
        rules += _linear(c + "attn.qkv", (d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"),
                         "cat")
        # The last context block is "pre-only": no output projection, no MLP, and a 2-way adaLN whose
        # halves are stored (shift, scale) in the original and (scale, shift) in diffusers.
        rules += _linear(c + "adaLN_modulation.1", d + "norm1_context.linear", "swap" if i == last else "copy")
        if i != last:
            rules += _linear(c + "attn.proj", d + "attn.to_add_out")
            rules += _linear(c + "mlp.fc1", d + "ff_context.net.0.proj")
            rules += _linear(c + "mlp.fc2", d + "ff_context.net.2")
        if d + "attn.norm_q.weight" in keys:  # SD3.5: RMSNorm on q and k
            rules += [Rule(x + "attn.ln_q.weight", (d + "attn.norm_q.weight",)),
                      Rule(x + "attn.ln_k.weight", (d + "attn.norm_k.weight",)),
                      Rule(c + "attn.ln_q.weight", (d + "attn.norm_added_q.weight",)),
                      Rule(c + "attn.ln_k.weight", (d + "attn.norm_added_k.weight",))]
        if d + "attn2.to_q.weight" in keys:  # SD3.5 medium (MMDiT-X): second image self-attention
            rules += _linear(x + "attn2.qkv", (d + "attn2.to_q", d + "attn2.to_k", d + "attn2.to_v"), "cat")
            rules += _linear(x + "attn2.proj", d + "attn2.to_out.0")
            if d + "attn2.norm_q.weight" in keys:
                rules += [Rule(x + "attn2.ln_q.weight", (d + "attn2.norm_q.weight",)),
                          Rule(x + "attn2.ln_k.weight", (d + "attn2.norm_k.weight",))]
    rules += _linear("final_layer.linear", "proj_out")
    rules += _linear("final_layer.adaLN_modulation.1", "norm_out.linear", "swap")
    return rules


# --------------------------------------------------------------------------------------------- FLUX

def flux_rules(diffusers_keys) -> list[Rule]:
    """Rules for a FluxTransformer2DModel state dict -> BFL names (no prefix)."""
    keys = set(diffusers_keys)
    rules = _linear("img_in", "x_embedder") + _linear("txt_in", "context_embedder")
    for orig, diff in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                       ("guidance_in", "guidance_embedder")):
        if f"time_text_embed.{diff}.linear_1.weight" in keys:  # guidance_in: dev only
            rules += _linear(f"{orig}.in_layer", f"time_text_embed.{diff}.linear_1")
            rules += _linear(f"{orig}.out_layer", f"time_text_embed.{diff}.linear_2")
    for i in _block_ids(keys, "transformer_blocks"):
        d, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        rules += _linear(o + "img_mod.lin", d + "norm1.linear")
        rules += _linear(o + "txt_mod.lin", d + "norm1_context.linear")
        rules += _linear(o + "img_attn.qkv", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"), "cat")
        rules += _linear(o + "txt_attn.qkv", (d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"),
                         "cat")
        rules += [Rule(o + "img_attn.norm.query_norm.scale", (d + "attn.norm_q.weight",)),
                  Rule(o + "img_attn.norm.key_norm.scale", (d + "attn.norm_k.weight",)),
                  Rule(o + "txt_attn.norm.query_norm.scale", (d + "attn.norm_added_q.weight",)),
                  Rule(o + "txt_attn.norm.key_norm.scale", (d + "attn.norm_added_k.weight",))]
        rules += _linear(o + "img_attn.proj", d + "attn.to_out.0")
        rules += _linear(o + "txt_attn.proj", d + "attn.to_add_out")
        rules += _linear(o + "img_mlp.0", d + "ff.net.0.proj") + _linear(o + "img_mlp.2", d + "ff.net.2")
        rules += _linear(o + "txt_mlp.0", d + "ff_context.net.0.proj")
        rules += _linear(o + "txt_mlp.2", d + "ff_context.net.2")
    for i in _block_ids(keys, "single_transformer_blocks"):
        d, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        rules += _linear(o + "modulation.lin", d + "norm.linear")
        rules += _linear(o + "linear1", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"), "cat")
        rules += _linear(o + "linear2", d + "proj_out")
        rules += [Rule(o + "norm.query_norm.scale", (d + "attn.norm_q.weight",)),
                  Rule(o + "norm.key_norm.scale", (d + "attn.norm_k.weight",))]
    rules += _linear("final_layer.linear", "proj_out")
    rules += _linear("final_layer.adaLN_modulation.1", "norm_out.linear", "swap")
    return rules


def flux_rules_from_original(original_keys) -> list[Rule]:
    """The same rules, derived from a BFL state dict's keys (prefix already stripped)."""
    keys = set(original_keys)
    fake = {"x_embedder.weight"}
    if "guidance_in.in_layer.weight" in keys:
        fake.add("time_text_embed.guidance_embedder.linear_1.weight")
    fake |= {"time_text_embed.timestep_embedder.linear_1.weight", "time_text_embed.text_embedder.linear_1.weight"}
    fake |= {f"transformer_blocks.{i}.x" for i in _block_ids(keys, "double_blocks")}
    fake |= {f"single_transformer_blocks.{i}.x" for i in _block_ids(keys, "single_blocks")}
    return flux_rules(fake)


# ---------------------------------------------------------------------------------------- apply

def _swap(t: Tensor) -> Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def to_original(diffusers_sd: dict[str, Tensor], rules: list[Rule], prefix: str = "") -> dict[str, Tensor]:
    """Build the original-layout state dict; every diffusers tensor must be used exactly once."""
    used: set[str] = set()
    out: dict[str, Tensor] = {}
    for r in rules:
        tensors = [diffusers_sd[p] for p in r.parts]
        used.update(r.parts)
        if r.op == "cat":
            out[prefix + r.original] = torch.cat(tensors, dim=0)
        elif r.op == "swap":
            out[prefix + r.original] = _swap(tensors[0])
        else:
            out[prefix + r.original] = tensors[0]
    left = set(diffusers_sd) - used
    if left:
        raise KeyError(f"diffusers tensors without an original name: {sorted(left)[:5]}")
    return out


def to_diffusers(original_sd: dict[str, Tensor], rules: list[Rule], part_rows: dict[str, int] | None = None,
                 prefix: str = "") -> dict[str, Tensor]:
    """Split/rename original tensors into diffusers names.

    `part_rows` gives the row count of a part when a "cat" is not an equal split (FLUX `linear1`:
    q, k, v have `hidden` rows and proj_mlp the rest); parts not listed share the remaining rows equally.
    """
    part_rows = part_rows or {}
    out: dict[str, Tensor] = {}
    for r in rules:
        t = original_sd[prefix + r.original]
        if r.op == "swap":
            out[r.parts[0]] = _swap(t)
        elif r.op == "cat":
            known = [part_rows.get(p) for p in r.parts]
            free = [i for i, n in enumerate(known) if n is None]
            rest = t.shape[0] - sum(n for n in known if n is not None)
            sizes = [n if n is not None else rest // len(free) for n in known]
            for p, piece in zip(r.parts, torch.split(t, sizes, dim=0)):
                out[p] = piece.clone()
        else:
            out[r.parts[0]] = t
    return out


def flux_to_diffusers(original_sd: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Convert a BFL FLUX transformer state dict (any width) to FluxTransformer2DModel names.

    diffusers 0.42.1's own converter hard-codes inner_dim 3072 / mlp 12288 when it splits
    `single_blocks.N.linear1`, so it cannot read other widths; this one reads the width from `img_in`.
    """
    keys = [k[len(prefix):] for k in original_sd if k.startswith(prefix)]
    rules = flux_rules_from_original(keys)
    hidden = original_sd[prefix + "img_in.weight"].shape[0]
    rows = {}
    for r in rules:
        if r.original.startswith("single_blocks.") and r.original.endswith(("linear1.weight", "linear1.bias")):
            rows.update({p: hidden for p in r.parts[:3]})
    return to_diffusers(original_sd, rules, rows, prefix)


# ---------------------------------------------------------------------------------------------- VAE

_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(diffusers_sd: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """AutoencoderKL state dict -> LDM names (`encoder.down.N.block.M`, `decoder.up.N`, `mid.attn_1`).

    LDM numbers decoder up-blocks from the lowest resolution upwards in reverse of diffusers, and
    stores the mid-block attention projections as 1x1 convolutions.
    """
    n_up = len(_block_ids(diffusers_sd, "decoder.up_blocks"))
    out: dict[str, Tensor] = {}
    for key, t in diffusers_sd.items():
        k = key
        k = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", k)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", k)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                   lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.block.{m.group(2)}.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                   lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.upsample.", k)
        k = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.",
                   lambda m: f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.", k)
        for new, old in _VAE_RESNET.items():
            k = k.replace(f".{new}.", f".{old}.")
        m = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", k)
        if m:
            k = f"{m.group(1)}.mid.attn_1.{_VAE_ATTN[m.group(2)]}.{m.group(3)}"
            if m.group(2) != "group_norm" and t.dim() == 2:
                t = t[:, :, None, None]
        out[prefix + k] = t
    return out


# ----------------------------------------------------------------------------------- text encoders

def t5_to_original(hf_sd: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """transformers T5EncoderModel -> t5xxl file names: identical, minus the tied `encoder.embed_tokens`."""
    return {prefix + k: v for k, v in hf_sd.items() if k != "encoder.embed_tokens.weight"}


def clip_to_original(hf_sd: dict[str, Tensor], prefix: str = "", projection: bool = True) -> dict[str, Tensor]:
    """transformers CLIPTextModel(WithProjection) -> `text_model.*` (+ `text_projection.weight`).

    transformers >= 5.6 dropped the `text_model.` level from CLIPTextModel's own state dict; files
    (clip_l.safetensors, ComfyUI `text_encoders.clip_l.transformer.*`) keep it.
    """
    out = {}
    for k, v in hf_sd.items():
        if k == "text_projection.weight":
            if projection:
                out[prefix + k] = v
            continue
        if k.endswith("position_ids"):
            continue
        out[prefix + (k if k.startswith("text_model.") else "text_model." + k)] = v
    return out
