"""A GGUF file's denoiser as diffusers builds it with `GGUFQuantizationConfig`.

Linear weights stay packed (`GGUFParameter`); diffusers' `GGUFLinear` dequantizes each one when its
layer runs and computes in the model's dtype, so a Q8_0 FLUX transformer takes ~12.7 GB instead of
~24 GB. Convolutions and Linear weights stored reshaped, which diffusers' quantizer dequantizes
while loading, get their packed bytes back afterwards (`pipeline.gguf_layers.pack_layers`); norms,
biases and the small F32 tensors stay dequantized (`formats.gguf_file.keeps_packed` decides what
stays packed, and the memory planner counts the same). Used by `pipeline.load` for UNet
checkpoints and by `pipeline.load_dit` for FLUX and SD3 transformers.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from workbench.formats import gguf_file
from workbench.formats.model_file import read_model_header
from workbench.pipeline.gguf_layers import pack_layers

DENOISER_PREFIX = "model.diffusion_model."


def gguf_denoiser(model_class, path: str | os.PathLike, folder: Path, subfolder: str, dtype: torch.dtype,
                  tensors: dict[str, torch.Tensor] | None = None):
    """`model_class` (UNet2DConditionModel, FluxTransformer2DModel, SD3Transformer2DModel) from
    the GGUF file at `path`, computing in `dtype`. `tensors`: the state dict when the caller has
    converted it already (FLUX); else the file's denoiser keys, under the checkpoint prefix that
    diffusers' converters expect (ComfyUI-GGUF files store them without it)."""
    from diffusers import GGUFQuantizationConfig

    header = read_model_header(path)
    gguf_file.check_supported(header)
    prefix = DENOISER_PREFIX if any(k.startswith(DENOISER_PREFIX) for k in header.tensors) else ""
    if tensors is None:
        tensors = {DENOISER_PREFIX + k: v for k, v in gguf_file.denoiser_tensors(path, prefix, dtype).items()}
    model = model_class.from_single_file(tensors, config=str(folder), subfolder=subfolder, local_files_only=True,
                                         torch_dtype=dtype,
                                         quantization_config=GGUFQuantizationConfig(compute_dtype=dtype))
    del tensors
    packed, shapes = gguf_file.packed_rest(path, prefix)
    if packed:
        pack_layers(model, packed, shapes, dtype)
    return model
