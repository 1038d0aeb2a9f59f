"""Load SD3/SD3.5 and FLUX.1 pipelines from single files or split component files, offline.

Configs come from `pipeline_config.config_dir` (bundled real configs sized from the headers), and
diffusers' single-file loaders do the key conversion wherever they can. Where diffusers 0.42.1 can't,
we do that component ourselves:
- T5 (SD3 `text_encoder_3`, FLUX `text_encoder_2`): diffusers' T5 path loads `shared.weight` into a
  model built on the meta device, but transformers >= 5 keeps `encoder.embed_tokens` as a separate
  module that is only *tied* to `shared`, so it stays on meta and the first prompt fails. We build
  the encoder, load its tensors and tie the embedding ourselves.
- FLUX transformer: diffusers' converter hard-codes inner_dim 3072 / MLP 12288 to split
  `single_blocks.N.linear1`, so other widths fail; `dit_keys.flux_to_diffusers` reads the width from
  the file, and the converted dict goes through `FluxTransformer2DModel.from_single_file` (which then
  skips its own conversion).
- FLUX split files (Forge layout) and text encoders outside an all-in-one file: loaded per component.
Nothing touches the network: every call passes a local config folder and `local_files_only=True`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from workbench.pipeline.load_gguf import gguf_denoiser
from workbench.errors import FormatError
from workbench.formats.pipeline_config import config_dir
from workbench.formats import dit_keys, gguf_file, nf4_file, scaled_fp8
from workbench.formats.model_file import read_model_header

TRANSFORMER_PREFIX = "model.diffusion_model."
# Canonical (ComfyUI all-in-one) prefix of each component; split files are read into this namespace.
FLUX_PREFIXES = {"transformer": TRANSFORMER_PREFIX, "vae": "vae.",
                 "text_encoder": "text_encoders.clip_l.transformer.",
                 "text_encoder_2": "text_encoders.t5xxl.transformer."}
SD3_PREFIXES = {"transformer": TRANSFORMER_PREFIX, "vae": "first_stage_model.",
                "text_encoder": "text_encoders.clip_l.transformer.",
                "text_encoder_2": "text_encoders.clip_g.transformer.",
                "text_encoder_3": "text_encoders.t5xxl.transformer."}
PART_ALIASES = {"clip_l": "text_encoder", "t5xxl": "text_encoder_2", "ae": "vae"}


# ---------------------------------------------------------------------------------------- reading

def _read(path: str | os.PathLike, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors under `prefix` (removed) from one safetensors or GGUF file; other tensors are not read.

    ComfyUI scaled-fp8 layers come back multiplied out, bitsandbytes 4-bit and GGUF weights
    dequantized, in `dtype` (`formats.scaled_fp8`, `formats.nf4_file`, `formats.gguf_file`).
    """
    from safetensors import safe_open

    if gguf_file.is_gguf(path):
        return gguf_file.load_tensors(path, dtype, prefix=prefix)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        metadata = f.metadata() or {}
    tensors = nf4_file.dequantize(tensors, dtype, path=path)
    return scaled_fp8.dequantize(tensors, dtype, path=path, metadata=metadata)


read_tensors = _read  # the public name (pipeline/components.py reads denoiser-only files with it)


def _kind(keys: set[str]) -> str | None:
    """Which FLUX component a stand-alone file holds, from its keys."""
    if any(k.endswith("double_blocks.0.img_attn.qkv.weight") for k in keys):
        return "transformer"
    if "encoder.conv_in.weight" in keys or "decoder.conv_in.weight" in keys:
        return "vae"
    if "text_model.embeddings.token_embedding.weight" in keys:
        return "text_encoder"
    if "shared.weight" in keys and any(k.startswith("encoder.block.") for k in keys):
        return "text_encoder_2"
    return None


def flux_parts(path_or_parts: str | os.PathLike | Mapping[str, str | os.PathLike]) -> dict[str, Path]:
    """{component: file} for split FLUX files given as a folder or a mapping.

    Mapping keys may be diffusers names (transformer, vae, text_encoder, text_encoder_2) or the
    file-style names (clip_l, t5xxl, ae). In a folder every .safetensors and .gguf file is
    classified by keys.
    """
    if isinstance(path_or_parts, Mapping):
        parts = {PART_ALIASES.get(k, k): Path(v) for k, v in path_or_parts.items()}
    else:
        parts = {}
        files = [f for f in sorted(Path(path_or_parts).iterdir()) if f.suffix.lower() in (".safetensors", ".gguf")]
        for f in files:
            kind = _kind(set(read_model_header(f).tensors))
            if kind is None:
                continue
            if kind in parts:
                raise FormatError(f"{path_or_parts}: two files hold the {kind}: {parts[kind].name} and {f.name}")
            parts[kind] = f
    missing = [c for c in FLUX_PREFIXES if c not in parts]
    if missing:
        raise FormatError(f"{path_or_parts}: split FLUX files need a transformer, ae (VAE), clip_l and t5xxl file; "
                          f"missing: {', '.join(missing)}")
    return parts


def _bare_prefix(path: Path, marker: str) -> str:
    """"" for bare BFL/SAI transformer files, the ComfyUI prefix when the file has it."""
    keys = read_model_header(path).tensors
    return TRANSFORMER_PREFIX if any(k.startswith(TRANSFORMER_PREFIX + marker) for k in keys) else ""


def split_shapes(parts: Mapping[str, Path], prefixes: Mapping[str, str], marker: str) -> dict[str, tuple]:
    """Header shapes of split files, renamed into the all-in-one namespace (for config inference)."""
    shapes: dict[str, tuple] = {}
    for comp, f in parts.items():
        sub = read_model_header(f).shapes()
        own = _bare_prefix(f, marker) if comp == "transformer" else ""
        for k, v in sub.items():
            if k.startswith(own):
                shapes[prefixes[comp] + k[len(own):]] = v
    return shapes


# ------------------------------------------------------------------------------------- components

def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast to `dtype`, keeping transformers' fp32-only modules (T5 `wo`) in fp32 for fp16."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    model.to(dtype)
    if dtype == torch.float16 and keep:
        for name, module in model.named_modules():
            if any(part in keep for part in name.split(".")):
                module.to(torch.float32)
    return model.eval()


def _no_meta(model: torch.nn.Module, what: str) -> None:
    meta = [n for n, t in model.state_dict().items() if t.is_meta]
    if meta:
        raise FormatError(f"{what}: tensors were not loaded: {', '.join(meta[:5])}")


def load_t5(tensors: dict[str, torch.Tensor], folder: Path, subfolder: str, dtype: torch.dtype):
    """T5EncoderModel from HF-named tensors; ties `encoder.embed_tokens` to `shared` explicitly."""
    from accelerate import init_empty_weights
    from transformers import T5Config, T5EncoderModel

    config = T5Config.from_pretrained(folder / subfolder, local_files_only=True)
    with init_empty_weights():
        model = T5EncoderModel(config)
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in missing if k != "encoder.embed_tokens.weight"]
    if missing or unexpected:
        raise FormatError(f"T5 encoder: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.encoder.embed_tokens.weight = model.shared.weight
    _no_meta(model, "T5 encoder")
    return _cast(model, dtype)


def load_clip(tensors: dict[str, torch.Tensor], folder: Path, subfolder: str, class_name: str,
              dtype: torch.dtype, eye_projection: bool = False):
    """CLIPTextModel(WithProjection) from `text_model.*` tensors (+ optional `text_projection.weight`).

    `eye_projection`: SD3's CLIP-L pooled output is used unprojected; diffusers loads that encoder
    with an identity projection whatever the file holds, and so do we.
    """
    import transformers
    from accelerate import init_empty_weights

    cls = getattr(transformers, class_name)
    config = cls.config_class.from_pretrained(folder / subfolder, local_files_only=True)
    with init_empty_weights():
        model = cls(config)
    wanted = set(model.state_dict())
    sd = {}
    for k, v in tensors.items():
        name = k if k in wanted else k.removeprefix("text_model.")
        if name in wanted:
            sd[name] = v
    if eye_projection and "text_projection.weight" in wanted:
        sd["text_projection.weight"] = torch.eye(config.hidden_size, dtype=next(iter(sd.values())).dtype)
    missing, _ = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise FormatError(f"CLIP text encoder ({subfolder}): missing {missing[:5]}")
    _no_meta(model, f"CLIP text encoder ({subfolder})")
    return _cast(model, dtype)


def load_flux_transformer(path: str | os.PathLike, folder: Path, dtype: torch.dtype, prefix: str | None = None):
    """FluxTransformer2DModel from a BFL-named file (bare or `model.diffusion_model.` prefixed);
    a GGUF file's Linear weights stay packed (`load_gguf.gguf_denoiser`; the row splits of fused qkv
    and `linear1` cut whole quantized rows)."""
    from diffusers import FluxTransformer2DModel

    prefix = _bare_prefix(Path(path), "double_blocks.") if prefix is None else prefix
    if gguf_file.is_gguf(path):
        converted = dit_keys.flux_to_diffusers(gguf_file.denoiser_tensors(path, prefix, dtype))
        model = gguf_denoiser(FluxTransformer2DModel, path, folder, "transformer", dtype, converted)
    else:
        converted = dit_keys.flux_to_diffusers(_read(path, prefix, dtype))
        model = FluxTransformer2DModel.from_single_file(converted, config=str(folder), subfolder="transformer",
                                                        local_files_only=True, torch_dtype=dtype)
    _no_meta(model, f"{path}: FLUX transformer")
    return model


def _tokenizers_and_scheduler(folder: Path, names: Mapping[str, str]) -> dict[str, Any]:
    import diffusers
    import transformers

    out: dict[str, Any] = {}
    for comp, class_name in names.items():
        lib = diffusers if comp == "scheduler" else transformers
        out[comp] = getattr(lib, class_name).from_pretrained(folder / comp, local_files_only=True)
    return out


# ---------------------------------------------------------------------------------------- public

def load_sd3_pipeline(path: str | os.PathLike, torch_dtype: torch.dtype = torch.float16, **kwargs: Any):
    """StableDiffusion3Pipeline from an all-in-one SD3/SD3.5 file (ComfyUI/SAI layout).

    diffusers' pipeline-level `from_single_file` loads the transformer, both CLIPs and the VAE from
    the file; T5 is loaded here (see module doc). Extra kwargs go to `from_single_file`.
    """
    from diffusers import StableDiffusion3Pipeline

    path = Path(path)
    folder = config_dir(path, "sd3")
    keys = read_model_header(path).tensors
    if "transformer" not in kwargs and gguf_file.is_gguf(path):
        from diffusers import SD3Transformer2DModel

        kwargs["transformer"] = gguf_denoiser(SD3Transformer2DModel, path, folder, "transformer", torch_dtype)
    if "text_encoder_3" not in kwargs and any(k.startswith(SD3_PREFIXES["text_encoder_3"]) for k in keys):
        kwargs["text_encoder_3"] = load_t5(_read(path, SD3_PREFIXES["text_encoder_3"], torch_dtype), folder,
                                           "text_encoder_3", torch_dtype)
    pipe = StableDiffusion3Pipeline.from_single_file(str(path), config=str(folder), local_files_only=True,
                                                     torch_dtype=torch_dtype, **kwargs)
    for comp in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        _no_meta(getattr(pipe, comp), f"{path}: {comp}")
    return pipe


def load_flux_pipeline(path_or_parts: str | os.PathLike | Mapping[str, str | os.PathLike],
                       torch_dtype: torch.dtype = torch.bfloat16, **kwargs: Any):
    """FluxPipeline from an all-in-one file (ComfyUI layout), or from split files.

    `path_or_parts`: a .safetensors file with transformer + clip_l + t5xxl + vae; or a folder / a
    mapping with the four Forge-style files (flux1-*.safetensors or a GGUF such as
    flux1-dev-Q8_0.gguf, ae, clip_l, t5xxl).
    """
    from diffusers import FluxPipeline

    if not isinstance(path_or_parts, Mapping) and Path(path_or_parts).is_file():
        path = Path(path_or_parts)
        keys = read_model_header(path).tensors
        if not any(k.startswith(FLUX_PREFIXES["text_encoder_2"]) for k in keys):
            raise FormatError(f"{path}: holds no text encoders; pass the folder or a mapping with ae, clip_l "
                              "and t5xxl files as well")
        folder = config_dir(path, "flux")
        kwargs.setdefault("transformer", load_flux_transformer(path, folder, torch_dtype))
        kwargs.setdefault("text_encoder_2", load_t5(_read(path, FLUX_PREFIXES["text_encoder_2"], torch_dtype), folder,
                                                    "text_encoder_2", torch_dtype))
        pipe = FluxPipeline.from_single_file(str(path), config=str(folder), local_files_only=True,
                                             torch_dtype=torch_dtype, **kwargs)
    else:
        from diffusers import AutoencoderKL

        parts = flux_parts(path_or_parts)
        folder = config_dir(split_shapes(parts, FLUX_PREFIXES, "double_blocks."), "flux")
        components = {
            "transformer": kwargs.pop("transformer", None) or load_flux_transformer(parts["transformer"], folder,
                                                                                   torch_dtype),
            "vae": kwargs.pop("vae", None) or AutoencoderKL.from_single_file(
                str(parts["vae"]), config=str(folder), subfolder="vae", local_files_only=True,
                torch_dtype=torch_dtype),
            "text_encoder": kwargs.pop("text_encoder", None) or load_clip(
                _read(parts["text_encoder"], "", torch_dtype), folder, "text_encoder", "CLIPTextModel",
                torch_dtype),
            "text_encoder_2": kwargs.pop("text_encoder_2", None) or load_t5(
                _read(parts["text_encoder_2"], "", torch_dtype), folder, "text_encoder_2", torch_dtype),
        }
        components.update(_tokenizers_and_scheduler(folder, {
            "tokenizer": "CLIPTokenizer", "tokenizer_2": "T5TokenizerFast",
            "scheduler": "FlowMatchEulerDiscreteScheduler"}))
        components.update(kwargs)
        pipe = FluxPipeline(**components)
    for comp in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        _no_meta(getattr(pipe, comp), f"{path_or_parts}: {comp}")
    return pipe


def load_pipeline(path: str | os.PathLike, arch: str, torch_dtype: torch.dtype = torch.float32, **kwargs: Any):
    """Entry point used by `workbench.pipeline.load.load_pipeline` for arch "sd3" / "flux"."""
    if arch == "sd3":
        return load_sd3_pipeline(path, torch_dtype=torch_dtype, **kwargs)
    if arch == "flux":
        return load_flux_pipeline(path, torch_dtype=torch_dtype, **kwargs)
    raise FormatError(f"{path}: load_dit handles sd3 and flux, not {arch!r}")
