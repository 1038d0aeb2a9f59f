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
ordinary weights; other formats in the new layout (nvfp4, int8) are refused with the layer named,
and so are bitsandbytes 4-bit files (Forge's `flux1-dev-bnb-nf4*.safetensors`: packed uint8
`<layer>.weight` plus `absmax`/`quant_map`/`quant_state.bitsandbytes__nf4` beside it), whose packed
shapes would otherwise reach the loaders as nonsense; `weights: nf4` gives the same 4-bit model from
a 16-bit or fp8 file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from workbench.errors import FormatError

MARKER = "scaled_fp8"
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
INPUT_SCALE_SUFFIXES = (".scale_input", ".input_scale")
CONFIG_SUFFIX = ".comfy_quant"
METADATA_KEY = "_quantization_metadata"
FP8_FORMATS = {"float8_e4m3fn", "float8_e5m2"}
BNB_STATE = ".weight.quant_state.bitsandbytes__"  # + "nf4" or "fp4"


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
        if BNB_STATE in k:
            layer, _, kind = k.rpartition(BNB_STATE)
            layout.formats[layer] = f"bitsandbytes {kind}"
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


def refuse_raw_use(header, path, what: str) -> None:
    """FormatError if `header` is a scaled-fp8 file: `what` (a merge, an extraction) reads tensors
    one by one as stored and would combine fp8 values without their scales."""
    layout = layout_of(header)
    if layout is None:
        return
    check_supported(layout, path)
    layer = next(iter(layout.formats), layout.markers[0] if layout.markers else "?")
    raise FormatError(f"{path}: a ComfyUI scaled-fp8 file (layer {layer!r} has a per-layer scale); "
                      f"{what} works on plain weights, and these are only right once multiplied by "
                      "their scales: use the model's 16-bit or plain fp8 release (it loads for "
                      "generation as it is)")
