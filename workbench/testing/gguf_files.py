"""Tiny GGUF files from the tiny real-layout models, written with the `gguf` package's writer.

Two layouts, as users meet them:
- `denoiser` (city96's ComfyUI-GGUF conversions, e.g. `flux1-dev-Q8_0.gguf`): only the
  UNet/transformer, `model.diffusion_model.` removed, `general.architecture` flux/sd3/sdxl/sd1;
- `checkpoint` (stable-diffusion.cpp style): every tensor under its checkpoint name, the denoiser
  quantized and the text encoders and VAE kept in F16/F32.

Which type each tensor gets follows city96's `tools/convert.py` plus llama.cpp's quantize step
(facts from reading them, no code taken): 1-D and tiny (<= 1024 values) tensors and FLUX's
in/out layers stay F32; for SD1/SDXL UNets a tensor whose rows are not a multiple of 256 is stored
reshaped to (n/256, 256) with `comfy.gguf.orig_shape.<name>`; the rest takes the asked type, or
llama.cpp's fallback when its rows do not fill whole blocks (Q4_K -> Q5_0, then F16).

Quantizing is `gguf.quants.quantize` for Q8_0, Q5_0 and the others gguf implements. gguf 0.19 can
dequantize Q4_K but not quantize it, so `quantize_q4_k` packs Q4_K blocks here (a plain min/max fit
per 32-value sub-block, not llama.cpp's search); tests check that gguf's own dequantizer reads
back exactly the values it meant to store.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from workbench.formats.gguf_file import ORIG_SHAPE
from workbench.testing import flux

DENOISER_PREFIX = "model.diffusion_model."
GGUF_ARCH = {"flux": "flux", "sd3": "sd3", "sdxl": "sdxl", "sd15": "sd1"}
SHAPE_FIX = ("sdxl", "sd15")  # city96 reshapes UNet tensors; DiT widths are multiples of 256 anyway
F32_BLOCKLIST = ("time_embedding.", "add_embedding.", "time_in.", "txt_in.", "vector_in.", "img_in.",
                 "guidance_in.", "final_layer.")
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # llama.cpp, for rows not of 256
QK_K = 256


def quantize_q4_k(data: np.ndarray) -> np.ndarray:
    """Q4_K blocks (144 bytes per 256 values: f16 d and dmin, 12 bytes of 6-bit sub-block scales
    and mins, 128 bytes of 4-bit codes) for `data` with rows a multiple of 256; value = d*sc*q - dmin*m."""
    rows = data.astype(np.float32).reshape(-1, data.shape[-1])
    x = rows.reshape(-1, 8, 32)
    nb = x.shape[0]
    lo = np.minimum(x.min(-1), 0.0)
    scale = (x.max(-1) - lo) / 15.0
    mins = -lo
    d = (scale.max(-1) / 63.0).astype(np.float16)
    dmin = (mins.max(-1) / 63.0).astype(np.float16)
    df, dmf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.where(df > 0, np.round(scale / np.where(df > 0, df, 1)), 0).clip(0, 63).astype(np.uint8)
    mn = np.where(dmf > 0, np.round(mins / np.where(dmf > 0, dmf, 1)), 0).clip(0, 63).astype(np.uint8)
    step = (df * sc)[..., None]
    offset = (dmf * mn)[..., None]
    q = np.where(step > 0, np.round((x + offset) / np.where(step > 0, step, 1)), 0).clip(0, 15).astype(np.uint8)
    scales = np.empty((nb, 12), np.uint8)
    scales[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    q = q.reshape(nb, 4, 2, 32)
    qs = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(nb, 128)
    blocks = np.concatenate([d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2), scales, qs], axis=1)
    return blocks.reshape(*data.shape[:-1], data.shape[-1] // QK_K * 144)


def tensor_type(key: str, shape: tuple[int, ...], qtype: str, *, denoiser: bool, arch: str) -> tuple[str, tuple | None]:
    """(GGUF type, shape to store when reshaped else None) for one tensor, as the conversion would."""
    n = int(np.prod(shape))
    if len(shape) <= 1 or n <= 1024 or not denoiser:
        return ("F32" if len(shape) <= 1 or n <= 1024 else "F16"), None
    if key.endswith(".weight") and any(b in key for b in F32_BLOCKLIST):
        return "F32", None
    reshaped = None
    if arch in SHAPE_FIX and n >= 512 and n % 256 == 0 and shape[-1] % 256:
        reshaped = (n // 256, 256)
    import gguf  # optional: only GGUF writers and readers need it

    cols = (reshaped or shape)[-1]
    for candidate in (qtype, FALLBACK.get(qtype, "F16"), "F16"):
        if candidate == "F16":
            return "F16", reshaped
        block = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, candidate)][0]
        if cols % block == 0:
            return candidate, reshaped
    return "F16", reshaped


def _quantize(data: np.ndarray, qtype: str) -> np.ndarray:
    import gguf  # optional: only GGUF writers and readers need it

    if qtype == "Q4_K":
        return quantize_q4_k(data)
    return gguf.quants.quantize(data, getattr(gguf.GGMLQuantizationType, qtype))


def write_gguf(tensors: dict[str, torch.Tensor], path: str | os.PathLike, *, arch: str, qtype: str,
               denoiser_keys: set[str]) -> Path:
    """Write `tensors` as a GGUF file with `gguf.GGUFWriter`; `denoiser_keys` are quantized to
    `qtype` (with the conversion's exceptions), the others stored in F16/F32. Integer tensors
    (CLIP position ids) are left out, as the converters do."""
    import gguf  # optional: only GGUF writers and readers need it

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), GGUF_ARCH[arch])
    try:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, t in tensors.items():
            if not t.is_floating_point():
                continue
            data = t.float().numpy()
            kind, reshaped = tensor_type(key, tuple(t.shape), qtype, denoiser=key in denoiser_keys, arch=arch)
            if reshaped is not None:
                writer.add_array(ORIG_SHAPE + key, [int(d) for d in t.shape])
                data = data.reshape(reshaped)
            if kind == "F32":
                writer.add_tensor(key, data.astype(np.float32))
            elif kind == "F16":
                writer.add_tensor(key, data.astype(np.float16))
            else:
                writer.add_tensor(key, _quantize(data, kind), raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def build_gguf(source: str | os.PathLike, path: str | os.PathLike, arch: str, qtype: str = "Q8_0",
               layout: str = "denoiser") -> Path:
    """A GGUF file from a tiny checkpoint (`workbench.testing.build_tiny`): `layout` "denoiser"
    (ComfyUI-GGUF: the UNet/transformer alone, bare keys) or "checkpoint" (every component)."""
    from safetensors.torch import load_file

    tensors = load_file(str(source))
    denoiser = {k for k in tensors if k.startswith(DENOISER_PREFIX)}
    if not denoiser:  # a transformer-only file (BFL keys): all of it is the denoiser
        return write_gguf(tensors, path, arch=arch, qtype=qtype, denoiser_keys=set(tensors))
    if layout == "denoiser":
        tensors = {k[len(DENOISER_PREFIX):]: tensors[k] for k in tensors if k in denoiser}
        denoiser = set(tensors)
    elif layout != "checkpoint":
        raise ValueError(f"layout must be 'denoiser' or 'checkpoint', got {layout!r}")
    return write_gguf(tensors, path, arch=arch, qtype=qtype, denoiser_keys=denoiser)


def build_flux_gguf_folder(folder: str | os.PathLike, qtype: str = "Q8_0", seed: int = 0) -> dict[str, Path]:
    """A Forge-style FLUX folder: `flux1-dev-<qtype>.gguf` (the transformer, ComfyUI-GGUF layout) beside
    the ae, clip_l and t5xxl files of the same tiny model; returns {component: path} and, under
    "source", the bf16 transformer file it was converted from."""
    folder = Path(folder)
    src = flux.build_split(folder / "source", "dev", seed=seed)
    parts = {}
    for comp, p in src.items():
        if comp == "transformer":
            continue
        target = folder / p.name
        target.write_bytes(p.read_bytes())
        parts[comp] = target
    parts["transformer"] = build_gguf(src["transformer"], folder / f"flux1-dev-{qtype}.gguf", "flux", qtype)
    parts["source"] = src["transformer"]
    return parts
