"""ComfyUI "scaled fp8" checkpoints: fp8 weights that are only right after multiplying by a scale.

Plain fp8 files (`--fp8_e4m3fn-unet` style) hold weights rounded straight to fp8, and any loader that
upcasts them gets the right numbers. Scaled files divide each weight by a per-layer scale before
rounding, so that small weights keep their precision; read without the scale, every such layer is
wrong by that factor and the image is noise. Users meet them as `t5xxl_fp8_e4m3fn_scaled.safetensors`
(the T5 of most FLUX set-ups), `sd3.5_large_fp8_scaled.safetensors` and FLUX transformer files.

Two layouts exist (facts from reading ComfyUI's loader; `comfy/utils.py` `convert_old_quants`):

- old: a marker tensor `<prefix>scaled_fp8` (its dtype is the fp8 format; an fp32 marker means
  e4m3fn) and, per quantized layer, `<layer>.scale_weight` (a scalar) beside the fp8 `<layer>.weight`,
  optionally `<layer>.scale_input` (only used by fp8 matmul kernels);
- new: per layer `<layer>.weight_scale` (+ optional `<layer>.input_scale`) and a `<layer>.comfy_quant`
  uint8 tensor holding JSON such as `{"format": "float8_e4m3fn"}`, or the same per-layer JSON under
  the header metadata key `_quantization_metadata` (`{"layers": {layer: {...}}}`).

In both, the real weight is `weight.float() * scale`. `dequantize` applies that while a state dict is
loaded, so everything downstream (diffusers' converters, LoRA, the memory planner's fp8 storage) sees
ordinary weights; other formats in the new layout (nvfp4, int8) are refused with the layer named.
Merges and LoRA extraction read such files through `ScaledTensors`, which multiplies each scale out
as its weight is read (in float32, exactly), so a scaled file is an ordinary merge input.
(bitsandbytes 4-bit files are `formats.nf4_file`'s.)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from workbench.errors import FormatError
from workbench.formats.packed import HeaderTensors
from workbench.formats.safetensors_io import SafetensorsHeader, TensorInfo

MARKER = "scaled_fp8"
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
INPUT_SCALE_SUFFIXES = (".scale_input", ".input_scale")
CONFIG_SUFFIX = ".comfy_quant"
METADATA_KEY = "_quantization_metadata"
FP8_FORMATS = {"float8_e4m3fn", "float8_e5m2"}


@dataclass
class ScaledLayout:
    """Which layers of one file carry a scale, and in which format their weights are stored."""

    formats: dict[str, str] = field(default_factory=dict)  # layer prefix -> "float8_e4m3fn", ...
    markers: list[str] = field(default_factory=list)        # marker keys (old layout)

    def unsupported(self) -> dict[str, str]:
        return {layer: fmt for layer, fmt in self.formats.items() if fmt not in FP8_FORMATS}


def is_aux_key(key: str) -> bool:
    """A key that only describes quantization (scales, markers, configs), not a weight of the model."""
    return (key == MARKER or key.endswith("." + MARKER) or key.endswith(SCALE_SUFFIXES)
            or key.endswith(INPUT_SCALE_SUFFIXES) or key.endswith(CONFIG_SUFFIX))


def layout_from_keys(keys, metadata: Mapping[str, str] | None = None) -> ScaledLayout | None:
    """The scaled layout of a file from its key names and header metadata, or None if not scaled.

    Per-layer `comfy_quant` JSON needs the tensor data; those layers are listed as "float8_e4m3fn"
    here and checked again by `dequantize`, which reads the JSON.
    """
    keys = list(keys)
    layout = ScaledLayout()
    layout.markers = [k for k in keys if k == MARKER or k.endswith("." + MARKER)]
    meta_layers: dict = {}
    if metadata and METADATA_KEY in metadata:
        try:
            meta_layers = json.loads(metadata[METADATA_KEY]).get("layers", {}) or {}
        except (ValueError, AttributeError):
            raise FormatError(f"header metadata {METADATA_KEY!r} is not the JSON object "
                              '{"layers": {layer: {"format": ...}}} that ComfyUI writes') from None
    for layer, conf in meta_layers.items():
        layout.formats[layer] = conf if isinstance(conf, str) else str(conf.get("format", "?"))
    for k in keys:
        for suffix in SCALE_SUFFIXES + (CONFIG_SUFFIX,):
            if k.endswith(suffix):
                layout.formats.setdefault(k[: -len(suffix)], "float8_e4m3fn")
    if not layout.formats and not layout.markers:
        return None
    return layout


def layout_of(header) -> ScaledLayout | None:
    """`layout_from_keys` for a parsed `SafetensorsHeader`."""
    return layout_from_keys(header.tensors, header.metadata)


def check_supported(layout: ScaledLayout | None, path) -> None:
    """FormatError naming the file and a layer if any layer is in a format we cannot dequantize."""
    if layout is None:
        return
    bad = layout.unsupported()
    if bad:
        layer, fmt = next(iter(bad.items()))
        raise FormatError(f"{path}: layer {layer!r} is quantized as {fmt!r} ({len(bad)} such layers); "
                          f"expected 16-bit, plain fp8 or scaled fp8 ({', '.join(sorted(FP8_FORMATS))}) "
                          "weights. Use the 16-bit or fp8 release of this model (`weights: nf4` "
                          "quantizes it to 4 bits when it loads)")


def _layer_format(tensors: Mapping[str, torch.Tensor], layer: str, fallback: str) -> str:
    conf = tensors.get(layer + CONFIG_SUFFIX)
    if conf is None:
        return fallback
    try:
        parsed = json.loads(bytes(conf.to(torch.uint8).flatten().tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise FormatError(f"tensor {layer + CONFIG_SUFFIX!r} is not the JSON layer config "
                          '(e.g. {"format": "float8_e4m3fn"}) that ComfyUI writes') from None
    return str(parsed.get("format", "?")) if isinstance(parsed, dict) else str(parsed)


def dequantize(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, *, path="state dict",
               metadata: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """A copy of `tensors` with every scaled layer's weight multiplied out (as `dtype`) and every
    quantization key (markers, scales, configs) dropped. Unscaled tensors pass through untouched.
    """
    layout = layout_from_keys(tensors, metadata)
    if layout is None:
        return dict(tensors)
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not is_aux_key(key):
            out[key] = value
    for layer, fallback in layout.formats.items():
        fmt = _layer_format(tensors, layer, fallback)
        if fmt not in FP8_FORMATS:
            check_supported(ScaledLayout({layer: fmt}), path)
        scale = next((tensors[layer + s] for s in SCALE_SUFFIXES if layer + s in tensors), None)
        weight_key = layer + ".weight"
        if weight_key not in out:
            if scale is None:  # a config with neither weight nor scale: nothing to apply
                continue
            raise FormatError(f"{path}: scale {layer!r} has no weight {weight_key!r}; expected each "
                              "scale beside the fp8 weight it belongs to")
        if scale is None:
            continue  # a layer listed as fp8 but stored without a scale is already right
        if scale.numel() != 1:
            raise FormatError(f"{path}: scale of {weight_key!r} has shape {tuple(scale.shape)}; "
                              "expected one number per layer (tensor-wise scaled fp8)")
        out[weight_key] = (out[weight_key].to(torch.float32) * scale.to(torch.float32)).to(dtype)
    return out


def decoded_header(header, layout: ScaledLayout):
    """`header` as a merge sees it through `ScaledTensors`: quantization keys left out, each scaled
    weight a float32 tensor of its shape (the exact product of its fp8 values and scale)."""
    tensors = {}
    for key, t in header.tensors.items():
        if is_aux_key(key):
            continue
        if key.endswith(".weight") and key[: -len(".weight")] in layout.formats:
            t = TensorInfo("F32", t.shape, t.begin, t.begin + t.numel * 4)
        tensors[key] = t
    return SafetensorsHeader(header.path, tensors, dict(header.metadata), header.data_offset,
                             header.file_size)


class ScaledTensors(HeaderTensors):
    """A scaled-fp8 safetensors file read as its real weights, one tensor at a time: each scaled
    weight comes back as `fp8 value x scale` in float32, everything else as stored. The reader
    interface of `formats.lazy.LazySafetensors` over an open one (what merges and extraction use)."""

    def __init__(self, lazy, layout: ScaledLayout):
        check_supported(layout, lazy.path)
        self._lazy = lazy
        self.path = lazy.path
        self.layout = layout
        self.header = decoded_header(lazy.header, layout)

    def __enter__(self) -> "ScaledTensors":
        self._lazy.__enter__()
        return self

    def close(self) -> None:
        self._lazy.close()

    def _scale(self, key: str) -> torch.Tensor | None:
        layer = key[: -len(".weight")] if key.endswith(".weight") else None
        if layer is None or layer not in self.layout.formats:
            return None
        scale_key = next((layer + s for s in SCALE_SUFFIXES if layer + s in self._lazy), None)
        if scale_key is None:
            return None
        scale = self._lazy.get(scale_key)
        if scale.numel() != 1:
            raise FormatError(f"{self.path}: scale of {key!r} has shape {tuple(scale.shape)}; "
                              "expected one number per layer (tensor-wise scaled fp8)")
        if layer + CONFIG_SUFFIX in self._lazy:
            fmt = _layer_format({layer + CONFIG_SUFFIX: self._lazy.get(layer + CONFIG_SUFFIX)}, layer, "?")
            if fmt not in FP8_FORMATS:
                check_supported(ScaledLayout({layer: fmt}), self.path)
        return scale

    def get(self, key: str) -> torch.Tensor:
        scale = self._scale(key)
        value = self._lazy.get(key)
        return value if scale is None else value.to(torch.float32) * scale.to(torch.float32)

    def view(self, key: str) -> torch.Tensor:
        scale = self._scale(key)
        if scale is None:
            return self._lazy.view(key)
        return self._lazy.view(key).to(torch.float32) * scale.to(torch.float32)
