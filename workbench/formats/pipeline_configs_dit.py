"""Offline diffusers configs for SD3/SD3.5 and FLUX.1 checkpoints, sized from the file's header.

The bundled folders under `data/sd3/<variant>/` and `data/flux/<variant>/` are the real configs of
stabilityai/stable-diffusion-3.5-{medium,large} and black-forest-labs/FLUX.1-{dev,schnell}. Every
width and depth is then read back from the tensor shapes, so a full-size file gets its real config
and a tiny test file gets a tiny one through the same code.

Shapes use one namespace, the ComfyUI all-in-one layout: `model.diffusion_model.*` (transformer),
`text_encoders.{clip_l,clip_g,t5xxl}.transformer.*`, VAE under `first_stage_model.*` (SD3) or `vae.*`
(FLUX). Bare BFL/SAI transformer keys (no prefix) are accepted too. Split files are merged into this
namespace by the loader (`workbench.pipeline.load_dit`).

What shapes cannot tell: attention head counts of CLIP (real models use 64-wide heads; widths under
64 are our tiny models, which use 2 heads) and the VAE's GroupNorm groups (min(32, first width)).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from workbench.errors import FormatError, UnsupportedError
from workbench.formats import pipeline_config

DATA = Path(__file__).parent / "data"
Shapes = Mapping[str, tuple[int, ...]]

SD3_VARIANTS = ("sd3.5-medium", "sd3.5-large")
FLUX_VARIANTS = ("dev", "schnell")
TINY_HEADS = 2
T5_REAL_VOCAB = 32128


# ----------------------------------------------------------------------------------------- helpers

def bundled(arch: str, variant: str) -> dict[str, dict[str, Any]]:
    """The shipped real configs of one model: {component: config dict} (+ "model_index")."""
    root = DATA / arch / variant
    if not root.is_dir():
        raise FormatError(f"no bundled config for {arch} variant {variant!r}")
    out = {"model_index": json.loads((root / "model_index.json").read_text())}
    for cfg in sorted(root.glob("*/*.json")):
        out[cfg.parent.name] = json.loads(cfg.read_text())
    return out


def _strip(shapes: Shapes, prefixes: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """Keys under the first prefix that has any key, prefix removed ({} if none)."""
    for p in prefixes:
        sub = {k[len(p):]: tuple(v) for k, v in shapes.items() if k.startswith(p)}
        if sub:
            return sub
    return {}


def _count(keys, head: str) -> int:
    pat = re.compile(re.escape(head) + r"\.(\d+)\.")
    ids = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    return max(ids) + 1 if ids else 0


def _need(sub: Mapping[str, tuple[int, ...]], key: str, what: str) -> tuple[int, ...]:
    if key not in sub:
        raise FormatError(f"{what}: expected tensor {key!r} is missing")
    return sub[key]


def _transformer_shapes(shapes: Shapes, marker: str) -> dict[str, tuple[int, ...]]:
    sub = _strip(shapes, ("model.diffusion_model.",))
    if not sub and any(k.startswith(marker) for k in shapes):
        sub = {k: tuple(v) for k, v in shapes.items()}
    return sub


# --------------------------------------------------------------------------------- text encoders

def clip_config(base: dict, sub: Mapping[str, tuple[int, ...]]) -> dict:
    """CLIP text config from `text_model.*` shapes (prefix removed)."""
    cfg = dict(base)
    vocab, hidden = _need(sub, "text_model.embeddings.token_embedding.weight", "CLIP")
    cfg.update(vocab_size=vocab, hidden_size=hidden,
               max_position_embeddings=_need(sub, "text_model.embeddings.position_embedding.weight", "CLIP")[0],
               num_hidden_layers=_count(sub, "text_model.encoder.layers"),
               intermediate_size=_need(sub, "text_model.encoder.layers.0.mlp.fc1.weight", "CLIP")[0],
               num_attention_heads=hidden // 64 if hidden >= 64 else TINY_HEADS)
    cfg["projection_dim"] = sub["text_projection.weight"][0] if "text_projection.weight" in sub else hidden
    return cfg


def t5_config(base: dict, sub: Mapping[str, tuple[int, ...]]) -> dict:
    """T5 encoder config from HF T5 shapes (prefix removed)."""
    cfg = dict(base)
    vocab, d_model = _need(sub, "shared.weight", "T5")
    buckets, heads = _need(sub, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "T5")
    layers = _count(sub, "encoder.block")
    cfg.update(vocab_size=vocab, d_model=d_model, num_heads=heads, num_layers=layers, num_decoder_layers=layers,
               relative_attention_num_buckets=buckets,
               d_kv=_need(sub, "encoder.block.0.layer.0.SelfAttention.q.weight", "T5")[0] // heads,
               d_ff=_need(sub, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight", "T5")[0])
    return cfg


def vae_config(base: dict, sub: Mapping[str, tuple[int, ...]]) -> dict:
    """AutoencoderKL config from LDM VAE shapes (prefix removed)."""
    cfg = dict(base)
    n = _count(sub, "encoder.down")
    widths = [_need(sub, f"encoder.down.{i}.block.0.conv2.weight", "VAE")[0] for i in range(n)]
    cfg.update(block_out_channels=widths, layers_per_block=_count(sub, "encoder.down.0.block"),
               down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
               in_channels=_need(sub, "encoder.conv_in.weight", "VAE")[1],
               out_channels=_need(sub, "decoder.conv_out.weight", "VAE")[0],
               latent_channels=_need(sub, "encoder.conv_out.weight", "VAE")[0] // 2,
               norm_num_groups=min(32, widths[0]),
               use_quant_conv="quant_conv.weight" in sub, use_post_quant_conv="post_quant_conv.weight" in sub)
    return cfg


def _text_and_vae(cfgs: dict, shapes: Shapes, vae_prefixes: tuple[str, ...], encoders: dict[str, str]) -> None:
    for component, name in encoders.items():
        sub = _strip(shapes, (f"text_encoders.{name}.transformer.",))
        if sub:
            cfgs[component] = (t5_config if name == "t5xxl" else clip_config)(cfgs[component], sub)
    vae = _strip(shapes, vae_prefixes)
    if vae:
        cfgs["vae"] = vae_config(cfgs["vae"], vae)


# --------------------------------------------------------------------------------------------- SD3

def sd3_transformer_config(base: dict, sub: Mapping[str, tuple[int, ...]]) -> dict:
    """SD3Transformer2DModel config from SAI MMDiT shapes (prefix removed)."""
    cfg = dict(base)
    hidden, in_ch, patch, _ = _need(sub, "x_embedder.proj.weight", "SD3 transformer")
    ln_q = sub.get("joint_blocks.0.x_block.attn.ln_q.weight")
    head_dim = ln_q[0] if ln_q else base["attention_head_dim"]
    layers = _count(sub, "joint_blocks")
    caption, joint = _need(sub, "context_embedder.weight", "SD3 transformer")
    cfg.update(num_layers=layers, attention_head_dim=head_dim, num_attention_heads=hidden // head_dim,
               in_channels=in_ch, patch_size=patch, caption_projection_dim=caption, joint_attention_dim=joint,
               pooled_projection_dim=_need(sub, "y_embedder.mlp.0.weight", "SD3 transformer")[1],
               out_channels=_need(sub, "final_layer.linear.weight", "SD3 transformer")[0] // (patch * patch),
               pos_embed_max_size=math.isqrt(_need(sub, "pos_embed", "SD3 transformer")[1]),
               qk_norm="rms_norm" if ln_q else None,
               dual_attention_layers=[i for i in range(layers) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in sub])
    if not cfg["dual_attention_layers"] and "dual_attention_layers" not in base:
        del cfg["dual_attention_layers"]  # keep the real SD3.5-large config as published (default: none)
    return cfg


def sd3_variant(shapes: Shapes) -> str:
    """"sd3.5-medium" (MMDiT-X: second attention in early blocks) or "sd3.5-large"."""
    sub = _transformer_shapes(shapes, "joint_blocks.")
    return "sd3.5-medium" if any(".x_block.attn2." in k for k in sub) else "sd3.5-large"


def sd3_configs(shapes: Shapes, variant: str | None = None) -> dict[str, dict[str, Any]]:
    """{component: config} for StableDiffusion3Pipeline, bundled values resized to `shapes`."""
    variant = variant or sd3_variant(shapes)
    cfgs = copy.deepcopy(bundled("sd3", variant))
    sub = _transformer_shapes(shapes, "joint_blocks.")
    if sub:
        cfgs["transformer"] = sd3_transformer_config(cfgs["transformer"], sub)
    _text_and_vae(cfgs, shapes, ("first_stage_model.", "vae."),
                  {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5xxl"})
    return cfgs


# -------------------------------------------------------------------------------------------- FLUX

def rope_axes(head_dim: int) -> list[int]:
    """FLUX RoPE split of a head: (16, 56, 56) at 128; same proportions, even sizes, elsewhere."""
    side = int(head_dim * 56 / 128) // 2 * 2
    return [head_dim - 2 * side, side, side]


def flux_transformer_config(base: dict, sub: Mapping[str, tuple[int, ...]]) -> dict:
    """FluxTransformer2DModel config from BFL shapes (prefix removed)."""
    cfg = dict(base)
    hidden, in_ch = _need(sub, "img_in.weight", "FLUX transformer")
    head_dim = _need(sub, "double_blocks.0.img_attn.norm.query_norm.scale", "FLUX transformer")[0]
    cfg.update(in_channels=in_ch, attention_head_dim=head_dim, num_attention_heads=hidden // head_dim,
               num_layers=_count(sub, "double_blocks"), num_single_layers=_count(sub, "single_blocks"),
               joint_attention_dim=_need(sub, "txt_in.weight", "FLUX transformer")[1],
               pooled_projection_dim=_need(sub, "vector_in.in_layer.weight", "FLUX transformer")[1],
               guidance_embeds="guidance_in.in_layer.weight" in sub)
    if head_dim != 128:
        cfg["axes_dims_rope"] = rope_axes(head_dim)
    return cfg


def flux_variant(shapes: Shapes) -> str:
    """"dev" when the file has a guidance embedder, else "schnell"."""
    sub = _transformer_shapes(shapes, "double_blocks.")
    return "dev" if "guidance_in.in_layer.weight" in sub else "schnell"


def flux_configs(shapes: Shapes, variant: str | None = None) -> dict[str, dict[str, Any]]:
    """{component: config} for FluxPipeline, bundled values resized to `shapes`."""
    variant = variant or flux_variant(shapes)
    cfgs = copy.deepcopy(bundled("flux", variant))
    sub = _transformer_shapes(shapes, "double_blocks.")
    if sub:
        cfgs["transformer"] = flux_transformer_config(cfgs["transformer"], sub)
    _text_and_vae(cfgs, shapes, ("vae.", "first_stage_model."),
                  {"text_encoder": "clip_l", "text_encoder_2": "t5xxl"})
    return cfgs


# ------------------------------------------------------------------------------ folders (registry)

_CLIP_WRITER = "workbench.formats.clip_tokenizer:write_tokenizer_dir"
_T5_WRITER = "workbench.formats.pipeline_configs_dit:write_t5_tokenizer_dir"


def _files(cfgs: dict[str, dict[str, Any]], tokenizers: dict[str, dict]) -> dict[str, dict[str, Any]]:
    files: dict[str, dict[str, Any]] = {"model_index.json": cfgs["model_index"]}
    for comp, cfg in cfgs.items():
        if comp == "model_index":
            continue
        name = "scheduler_config.json" if comp == "scheduler" else "config.json"
        files[f"{comp}/{name}"] = cfg
    files.update(tokenizers)
    return files


def sd3_files(shapes: Shapes) -> dict[str, dict[str, Any]]:
    """pipeline_config builder for "sd3": config files + tokenizer folder specs."""
    cfgs = sd3_configs(shapes)
    return _files(cfgs, {
        "tokenizer": {"_writer": _CLIP_WRITER, "pad_token": "<|endoftext|>"},
        "tokenizer_2": {"_writer": _CLIP_WRITER, "pad_token": "!"},
        "tokenizer_3": {"_writer": _T5_WRITER, "vocab_size": cfgs["text_encoder_3"]["vocab_size"]},
    })


def flux_files(shapes: Shapes) -> dict[str, dict[str, Any]]:
    """pipeline_config builder for "flux"."""
    cfgs = flux_configs(shapes)
    return _files(cfgs, {
        "tokenizer": {"_writer": _CLIP_WRITER, "pad_token": "<|endoftext|>"},
        "tokenizer_2": {"_writer": _T5_WRITER, "vocab_size": cfgs["text_encoder_2"]["vocab_size"]},
    })


# ---------------------------------------------------------------------------------- T5 tokenizers

_WORDS = ("a", "an", "the", "of", "in", "on", "and", "with", "photo", "painting", "portrait", "cat", "dog",
          "house", "tree", "sky", "sea", "red", "blue", "green", "style", "oil", "light", "city")


def tiny_t5_pieces() -> list[tuple[str, float]]:
    """The tiny T5 Unigram vocabulary: T5's three specials at ids 0-2, then characters and a few words."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    chars = letters + [c.upper() for c in letters] + [str(d) for d in range(10)] + list(",.!?'-:;()")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    pieces += [("\u2581" + w, -1.0) for w in _WORDS]
    return pieces


TINY_T5_VOCAB = len(tiny_t5_pieces())


def _write_tiny_t5(out: Path, max_length: int) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.Unigram(tiny_t5_pieces(), unk_id=2))
    tok.normalizer = normalizers.Replace(Regex(" {2,}"), " ")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "T5Tokenizer", "model_max_length": max_length, "eos_token": "</s>",
              "pad_token": "<pad>", "unk_token": "<unk>", "extra_ids": 0, "additional_special_tokens": [],
              "clean_up_tokenization_spaces": True, "legacy": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}, indent=2))


# Where a real T5-XXL tokenizer may already be on disk (HF cache): (repo, subfolder).
_T5_SOURCES = (("black-forest-labs/FLUX.1-dev", "tokenizer_2"), ("black-forest-labs/FLUX.1-schnell", "tokenizer_2"),
               ("stabilityai/stable-diffusion-3.5-large", "tokenizer_3"),
               ("stabilityai/stable-diffusion-3.5-medium", "tokenizer_3"), ("google/t5-v1_1-xxl", ""))


def find_real_t5() -> Path | None:
    env = os.environ.get("WORKBENCH_T5_TOKENIZER")
    if env and Path(env).is_dir():
        return Path(env)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a diffusers dependency
        return None
    for repo, sub in _T5_SOURCES:
        try:
            snap = Path(snapshot_download(repo, allow_patterns=[f"{sub}/*" if sub else "*token*", "spiece.model"],
                                          local_files_only=True))
        except Exception:  # noqa: BLE001 - "not in the cache" comes in several exception types
            continue
        folder = snap / sub if sub else snap
        if (folder / "tokenizer.json").exists() or (folder / "spiece.model").exists():
            return folder
    return None


def write_t5_tokenizer_dir(out_dir: str | os.PathLike, vocab_size: int, max_length: int = 512) -> Path:
    """Write a T5TokenizerFast folder whose vocabulary fits an encoder with `vocab_size` rows.

    Our tiny test encoders use the tiny Unigram vocabulary built here. A real T5-XXL (32128 rows)
    needs the real SentencePiece vocabulary, which we cannot ship or download: it is copied from
    $WORKBENCH_T5_TOKENIZER or a Hugging Face cache snapshot of FLUX.1 / SD3.5 / t5-v1_1-xxl.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if vocab_size == TINY_T5_VOCAB:
        _write_tiny_t5(out, max_length)
        return out
    src = find_real_t5()
    if src is None:
        raise UnsupportedError(
            f"the T5 text encoder has {vocab_size} tokens and needs the real T5-XXL tokenizer, which is not "
            "bundled: set WORKBENCH_T5_TOKENIZER to a folder with tokenizer.json (or spiece.model), e.g. "
            "the tokenizer_2 folder of black-forest-labs/FLUX.1-dev")
    for f in src.iterdir():
        if f.is_file():
            shutil.copyfile(f, out / f.name)
    return out


def register() -> None:
    pipeline_config.register("sd3", sd3_files)
    pipeline_config.register("flux", flux_files)


register()
