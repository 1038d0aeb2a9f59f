"""Tiny autoencoders (TAESD for SD1.5, TAESDXL for SDXL) as a fast decoder for CPU previews.

On a CPU the full VAE decoder costs several UNet steps at 512²; TAESD decodes the same latents
in a fraction of that with a little less detail. Users get the weights as a diffusers folder
(config.json + diffusion_pytorch_model.safetensors) or as one .safetensors file; the original
release names its decoder tensors by sequential index ("1.weight", "3.conv.0.weight", ...), the
diffusers port by `decoder.layers.N...`. Both list the same tensors in the same order, so a file
in either naming is matched to the diffusers module by position and checked shape by shape.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from workbench.arch import ARCHS
from workbench.errors import FormatError, WorkbenchError
from workbench.formats.safetensors_io import read_header
from workbench.pipeline.load import LOAD_LOCK

TINY_VAE_ARCHS = tuple(a.id for a in ARCHS if a.tiny_vae)  # 4-channel TAESD/TAESDXL; no TAESD3/TAEF1 yet
_INDEX = re.compile(r"(?:^|\.)(\d+)\.")


def _order(key: str) -> tuple:
    """Sort key that puts sequential-module tensors in execution order (1 < 2 < 10)."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"\.", key))


def _channels(tensors: dict[str, torch.Tensor]) -> int:
    conv = [k for k in tensors if k.endswith(".weight") and tensors[k].ndim == 4]
    first = min(conv, key=_order)
    return int(tensors[first].shape[0])


def load_tiny_vae(path: str | Path, arch: str, dtype: torch.dtype = torch.float32):
    """An AutoencoderTiny (decoder, plus encoder when the file has one) for `arch` latents."""
    from diffusers import AutoencoderTiny
    from safetensors.torch import load_file

    path = Path(path)
    if arch not in TINY_VAE_ARCHS:
        raise WorkbenchError(f"tiny_vae: only TAESD (SD1.5) and TAESDXL (SDXL) are supported; the "
                             f"model is {arch}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FormatError(f"{path}: a tiny-VAE folder needs config.json and "
                              "diffusion_pytorch_model.safetensors")

        with LOAD_LOCK:  # see LOAD_LOCK: diffusers' model construction is not thread-safe
            return AutoencoderTiny.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    if not path.is_file():
        raise WorkbenchError(f"tiny_vae: {path}: file not found")

    read_header(path)  # clear errors for corrupt / truncated files
    tensors = load_file(str(path))
    decoder = {k: v for k, v in tensors.items() if k.startswith("decoder.")}
    raw = {k: v for k, v in tensors.items() if not k.startswith(("decoder.", "encoder."))}
    source = decoder or raw
    if not source:
        raise FormatError(f"{path}: no TAESD decoder tensors (expected 'decoder.layers.*' or the "
                          "original sequential names '1.weight', '3.conv.0.weight', ...)")
    width = _channels(source)
    model = AutoencoderTiny(encoder_block_out_channels=(width,) * 4,
                            decoder_block_out_channels=(width,) * 4)
    target = {k: v for k, v in model.state_dict().items() if k.startswith("decoder.")}
    mine, theirs = sorted(target, key=_order), sorted(source, key=_order)
    if len(mine) != len(theirs):
        raise FormatError(f"{path}: {len(theirs)} decoder tensors, a TAESD decoder has {len(mine)}")
    state = {}
    for ours, key in zip(mine, theirs):
        if tuple(target[ours].shape) != tuple(source[key].shape):
            raise FormatError(f"{path}: tensor {key} has shape {tuple(source[key].shape)}, expected "
                              f"{tuple(target[ours].shape)} for {ours}")
        state[ours] = source[key]
    encoder = {k: v for k, v in tensors.items() if k.startswith("encoder.")}
    state.update(encoder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise FormatError(f"{path}: unexpected tensors {unexpected[:3]}")
    if encoder and missing:
        raise FormatError(f"{path}: incomplete encoder, missing {missing[:3]}")
    return model.to(dtype)


def use_tiny_vae(pipe, vae) -> None:
    """Decode with `vae` from now on (the pipeline's VAE slot; scaling_factor 1 is TAESD's own)."""
    pipe.vae = vae
    if hasattr(pipe, "register_modules"):
        pipe.register_modules(vae=vae)
