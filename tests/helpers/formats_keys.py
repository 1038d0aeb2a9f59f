"""Real-layout key lists (names + shapes) for format tests, built from published architectures.

The names follow the original LDM/SGM, SAI-MMDiT, BFL, OpenCLIP, HF-CLIP and T5 layouts (the counts
are checked against the real files' per-block counts in tests/test_blocks.py). Files are written "header
only": the data section is a sparse hole (or garbage), which is all detection and scanning need.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from workbench.formats.safetensors_io import DTYPE_SIZES

Shapes = dict[str, tuple[int, ...]]


def ldm_unet(prefix="model.diffusion_model.", ch=320, mult=(1, 2, 4, 4), depth=(1, 1, 1, 0),
             mid_depth=1, ctx=768, adm=None, in_ch=4, num_res=2) -> Shapes:
    """LDM/SGM UNet keys (SD1.5 defaults; SD2: ctx=1024; SDXL: see sdxl_unet)."""
    k: Shapes = {}

    def add(name, shape):
        k[prefix + name] = tuple(shape)

    def wb(name, wshape):
        add(name + ".weight", wshape)
        add(name + ".bias", (wshape[0],))

    emb = ch * 4
    wb("time_embed.0", (emb, ch))
    wb("time_embed.2", (emb, emb))
    if adm:
        wb("label_emb.0.0", (emb, adm))
        wb("label_emb.0.2", (emb, emb))
    wb("input_blocks.0.0", (ch, in_ch, 3, 3))

    def res(p, cin, cout):
        wb(p + "in_layers.0", (cin,))
        wb(p + "in_layers.2", (cout, cin, 3, 3))
        wb(p + "emb_layers.1", (cout, emb))
        wb(p + "out_layers.0", (cout,))
        wb(p + "out_layers.3", (cout, cout, 3, 3))
        if cin != cout:
            wb(p + "skip_connection", (cout, cin, 1, 1))

    def attn(p, c, d):
        wb(p + "norm", (c,))
        wb(p + "proj_in", (c, c, 1, 1))
        for t in range(d):
            tb = f"{p}transformer_blocks.{t}."
            for a, kv in (("attn1", c), ("attn2", ctx)):
                add(f"{tb}{a}.to_q.weight", (c, c))
                add(f"{tb}{a}.to_k.weight", (c, kv))
                add(f"{tb}{a}.to_v.weight", (c, kv))
                wb(f"{tb}{a}.to_out.0", (c, c))
            wb(tb + "ff.net.0.proj", (c * 8, c))
            wb(tb + "ff.net.2", (c, c * 4))
            for n in (1, 2, 3):
                wb(f"{tb}norm{n}", (c,))
        wb(p + "proj_out", (c, c, 1, 1))

    idx, cur, chans = 1, ch, [ch]
    for lvl, m in enumerate(mult):
        for _ in range(num_res):
            p = f"input_blocks.{idx}."
            res(p + "0.", cur, ch * m)
            cur = ch * m
            if depth[lvl]:
                attn(p + "1.", cur, depth[lvl])
            chans.append(cur)
            idx += 1
        if lvl != len(mult) - 1:
            wb(f"input_blocks.{idx}.0.op", (cur, cur, 3, 3))
            chans.append(cur)
            idx += 1
    res("middle_block.0.", cur, cur)
    attn("middle_block.1.", cur, mid_depth)
    res("middle_block.2.", cur, cur)
    idx = 0
    for lvl, m in reversed(list(enumerate(mult))):
        for r in range(num_res + 1):
            p = f"output_blocks.{idx}."
            res(p + "0.", cur + chans.pop(), ch * m)
            cur = ch * m
            sub = 1
            if depth[lvl]:
                attn(p + "1.", cur, depth[lvl])
                sub = 2
            if lvl and r == num_res:
                wb(f"{p}{sub}.conv", (cur, cur, 3, 3))
            idx += 1
    wb("out.0", (cur,))
    wb("out.2", (4, cur, 3, 3))
    return k


def sdxl_unet(prefix="model.diffusion_model.") -> Shapes:
    return ldm_unet(prefix, ch=320, mult=(1, 2, 4), depth=(0, 2, 10), mid_depth=10, ctx=2048,
                    adm=2816)


def sdxl_refiner_unet(prefix="model.diffusion_model.") -> Shapes:
    return ldm_unet(prefix, ch=384, mult=(1, 2, 4, 4), depth=(0, 4, 4, 0), mid_depth=4,
                    ctx=1280, adm=2560)


def hf_clip(prefix: str, layers=12, width=768, nai=False) -> Shapes:
    """HF CLIPTextModel keys; nai=True drops `text_model.` (old NovelAI-derived SD1 files)."""
    p = prefix + ("" if nai else "text_model.")
    k: Shapes = {p + "embeddings.token_embedding.weight": (49408, width),
                 p + "embeddings.position_embedding.weight": (77, width),
                 p + "embeddings.position_ids": (1, 77)}
    for i in range(layers):
        lp = f"{p}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            k[f"{lp}self_attn.{proj}.weight"] = (width, width)
            k[f"{lp}self_attn.{proj}.bias"] = (width,)
        for n in ("layer_norm1", "layer_norm2"):
            k[f"{lp}{n}.weight"] = (width,)
            k[f"{lp}{n}.bias"] = (width,)
        k[f"{lp}mlp.fc1.weight"] = (width * 4, width)
        k[f"{lp}mlp.fc1.bias"] = (width * 4,)
        k[f"{lp}mlp.fc2.weight"] = (width, width * 4)
        k[f"{lp}mlp.fc2.bias"] = (width,)
    k[p + "final_layer_norm.weight"] = (width,)
    k[p + "final_layer_norm.bias"] = (width,)
    return k


def open_clip(prefix: str, layers=32, width=1280) -> Shapes:
    """OpenCLIP text tower keys (SD2 ViT-H: 24 x 1024; SDXL ViT-bigG: 32 x 1280)."""
    k: Shapes = {prefix + "positional_embedding": (77, width),
                 prefix + "text_projection": (width, width),
                 prefix + "token_embedding.weight": (49408, width),
                 prefix + "ln_final.weight": (width,), prefix + "ln_final.bias": (width,),
                 prefix + "logit_scale": ()}
    for i in range(layers):
        lp = f"{prefix}transformer.resblocks.{i}."
        k[lp + "attn.in_proj_weight"] = (3 * width, width)
        k[lp + "attn.in_proj_bias"] = (3 * width,)
        k[lp + "attn.out_proj.weight"] = (width, width)
        k[lp + "attn.out_proj.bias"] = (width,)
        for n in ("ln_1", "ln_2"):
            k[f"{lp}{n}.weight"] = (width,)
            k[f"{lp}{n}.bias"] = (width,)
        k[lp + "mlp.c_fc.weight"] = (4 * width, width)
        k[lp + "mlp.c_fc.bias"] = (4 * width,)
        k[lp + "mlp.c_proj.weight"] = (width, 4 * width)
        k[lp + "mlp.c_proj.bias"] = (width,)
    return k


def t5xxl(prefix: str, layers=24, width=4096) -> Shapes:
    k: Shapes = {prefix + "shared.weight": (32128, width),
                 prefix + "encoder.final_layer_norm.weight": (width,),
                 prefix + "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
                     (32, 64)}
    for i in range(layers):
        b = f"{prefix}encoder.block.{i}.layer."
        for n in "qkvo":
            k[f"{b}0.SelfAttention.{n}.weight"] = (width, width)
        k[b + "0.layer_norm.weight"] = (width,)
        k[b + "1.DenseReluDense.wi_0.weight"] = (10240, width)
        k[b + "1.DenseReluDense.wi_1.weight"] = (10240, width)
        k[b + "1.DenseReluDense.wo.weight"] = (width, 10240)
        k[b + "1.layer_norm.weight"] = (width,)
    return k


def ldm_vae(prefix="first_stage_model.", z=4, quant=True) -> Shapes:
    """LDM AutoencoderKL keys (SD: z=4 with quant convs, 248 keys; SD3/FLUX: z=16, no quant, 244)."""
    k: Shapes = {}

    def wb(name, wshape):
        k[prefix + name + ".weight"] = tuple(wshape)
        k[prefix + name + ".bias"] = (wshape[0],)

    def block(p, cin, cout):
        wb(p + "norm1", (cin,))
        wb(p + "conv1", (cout, cin, 3, 3))
        wb(p + "norm2", (cout,))
        wb(p + "conv2", (cout, cout, 3, 3))
        if cin != cout:
            wb(p + "nin_shortcut", (cout, cin, 1, 1))

    def mid(p):
        block(p + "mid.block_1.", 512, 512)
        for n in ("norm", "q", "k", "v", "proj_out"):
            wb(f"{p}mid.attn_1.{n}", (512, 512, 1, 1) if n != "norm" else (512,))
        block(p + "mid.block_2.", 512, 512)

    chans = (128, 256, 512, 512)
    wb("encoder.conv_in", (128, 3, 3, 3))
    cur = 128
    for i, c in enumerate(chans):
        for j in range(2):
            block(f"encoder.down.{i}.block.{j}.", cur, c)
            cur = c
        if i < 3:
            wb(f"encoder.down.{i}.downsample.conv", (c, c, 3, 3))
    mid("encoder.")
    wb("encoder.norm_out", (512,))
    wb("encoder.conv_out", (2 * z, 512, 3, 3))
    wb("decoder.conv_in", (512, z, 3, 3))
    mid("decoder.")
    cur = 512
    for i in reversed(range(4)):
        for j in range(3):
            block(f"decoder.up.{i}.block.{j}.", cur, chans[i])
            cur = chans[i]
        if i > 0:
            wb(f"decoder.up.{i}.upsample.conv", (cur, cur, 3, 3))
    wb("decoder.norm_out", (128,))
    wb("decoder.conv_out", (3, 128, 3, 3))
    if quant:
        wb("quant_conv", (2 * z, 2 * z, 1, 1))
        wb("post_quant_conv", (z, z, 1, 1))
    return k


def mmdit(prefix="model.diffusion_model.", depth=24, attn2_blocks=0, qk_norm=False) -> Shapes:
    """SAI MMDiT (SD3 medium: depth 24; SD3.5 medium: 24 with x_block.attn2 in the first 13
    blocks; SD3.5 large: 38)."""
    h = 64 * depth
    k: Shapes = {prefix + "pos_embed": (1, 36864, h)}

    def wb(name, wshape):
        k[prefix + name + ".weight"] = tuple(wshape)
        k[prefix + name + ".bias"] = (wshape[0],)

    wb("x_embedder.proj", (h, 16, 2, 2))
    wb("context_embedder", (h, 4096))
    wb("y_embedder.mlp.0", (h, 2048))
    wb("y_embedder.mlp.2", (h, h))
    wb("t_embedder.mlp.0", (h, 256))
    wb("t_embedder.mlp.2", (h, h))
    for i in range(depth):
        for part in ("context_block", "x_block"):
            p = f"joint_blocks.{i}.{part}."
            pre_only = part == "context_block" and i == depth - 1
            wb(p + "attn.qkv", (3 * h, h))
            wb(p + "adaLN_modulation.1", ((2 if pre_only else 6) * h, h))
            if qk_norm:
                k[prefix + p + "attn.ln_q.weight"] = (64,)
                k[prefix + p + "attn.ln_k.weight"] = (64,)
            if not pre_only:
                wb(p + "attn.proj", (h, h))
                wb(p + "mlp.fc1", (4 * h, h))
                wb(p + "mlp.fc2", (h, 4 * h))
            if part == "x_block" and i < attn2_blocks:
                wb(p + "attn2.qkv", (3 * h, h))
                wb(p + "attn2.proj", (h, h))
    wb("final_layer.linear", (64, h))
    wb("final_layer.adaLN_modulation.1", (2 * h, h))
    return k


def flux(prefix="model.diffusion_model.", guidance=True, double=19, single=38) -> Shapes:
    """BFL FLUX.1 transformer keys (dev has guidance_in; schnell does not)."""
    h = 3072
    k: Shapes = {}

    def wb(name, wshape):
        k[prefix + name + ".weight"] = tuple(wshape)
        k[prefix + name + ".bias"] = (wshape[0],)

    wb("img_in", (h, 64))
    wb("txt_in", (h, 4096))
    embedders = [("time_in", 256), ("vector_in", 768)] + ([("guidance_in", 256)] if guidance else [])
    for name, width in embedders:
        wb(name + ".in_layer", (h, width))
        wb(name + ".out_layer", (h, h))
    for i in range(double):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}_"
            wb(p + "mod.lin", (6 * h, h))
            wb(p + "attn.qkv", (3 * h, h))
            k[prefix + p + "attn.norm.query_norm.scale"] = (128,)
            k[prefix + p + "attn.norm.key_norm.scale"] = (128,)
            wb(p + "attn.proj", (h, h))
            wb(p + "mlp.0", (4 * h, h))
            wb(p + "mlp.2", (h, 4 * h))
    for i in range(single):
        p = f"single_blocks.{i}."
        wb(p + "linear1", (7 * h, h))
        wb(p + "linear2", (h, 5 * h))
        k[prefix + p + "norm.query_norm.scale"] = (128,)
        k[prefix + p + "norm.key_norm.scale"] = (128,)
        wb(p + "modulation.lin", (3 * h, h))
    wb("final_layer.linear", (64, h))
    wb("final_layer.adaLN_modulation.1", (2 * h, h))
    return k


# ---- whole files --------------------------------------------------------------------------------
def sd15_checkpoint(nai=False) -> Shapes:
    return {**ldm_unet(), **hf_clip("cond_stage_model.transformer.", nai=nai), **ldm_vae()}


def sd2_checkpoint() -> Shapes:
    return {**ldm_unet(ctx=1024), **open_clip("cond_stage_model.model.", 24, 1024), **ldm_vae()}


def sdxl_checkpoint() -> Shapes:
    return {**sdxl_unet(), **hf_clip("conditioner.embedders.0.transformer."),
            **open_clip("conditioner.embedders.1.model.", 32, 1280), **ldm_vae()}


def sd3_checkpoint(depth=24, attn2_blocks=0, qk_norm=False) -> Shapes:
    return {**mmdit(depth=depth, attn2_blocks=attn2_blocks, qk_norm=qk_norm),
            **hf_clip("text_encoders.clip_l.transformer."),
            **hf_clip("text_encoders.clip_g.transformer.", 32, 1280),
            **t5xxl("text_encoders.t5xxl.transformer."),
            **ldm_vae(z=16, quant=False)}


def flux_checkpoint(guidance=True) -> Shapes:
    return {**flux(guidance=guidance), **hf_clip("text_encoders.clip_l.transformer."),
            **t5xxl("text_encoders.t5xxl.transformer."), **ldm_vae("vae.", z=16, quant=False)}


def write_header_only(path: Path, shapes: Shapes, dtype: str = "F16",
                      metadata: dict[str, str] | None = None, garbage: bool = False) -> Path:
    """A valid safetensors header for `shapes`; the data section is a sparse hole (or, with
    garbage=True, random-looking bytes), so multi-GB real shapes cost nothing on disk."""
    entries: dict = {"__metadata__": metadata} if metadata else {}
    pos = 0
    for name, shape in shapes.items():
        dt = "I64" if name.endswith("position_ids") else dtype
        n = DTYPE_SIZES[dt]
        for d in shape:
            n *= d
        entries[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(entries).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        if garbage:
            f.write(bytes((i * 7919 + 13) % 256 for i in range(pos)))
        else:
            f.truncate(8 + len(raw) + pos)
    return path
