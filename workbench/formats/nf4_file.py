"""Forge's bitsandbytes 4-bit checkpoints (`flux1-dev-bnb-nf4-v2.safetensors`): read as ordinary weights.

These are safetensors files written from bitsandbytes `Params4bit` modules (bitsandbytes' own
serialization, `QuantState.as_dict(packed=True)`). Per quantized Linear `<layer>`:

- `<layer>.weight`: the packed codes, uint8, two 4-bit codes per byte, shape [ceil(n/2), 1];
- `<layer>.weight.absmax` (one scale per block of 64; uint8 when the scales are themselves
  quantized, "double quantization", with `nested_absmax` and `nested_quant_map` beside them);
- `<layer>.weight.quant_map`: the 16 code values (NF4's normal-float table);
- `<layer>.weight.quant_state.bitsandbytes__nf4` (or `__fp4`): uint8 JSON with the logical
  `shape`, the original `dtype`, the block sizes and the nested offset.

Forge's v1 file double-quantizes the scales, v2 stores them in float32; the text encoders and the VAE
in the same file are plain tensors. Reading dequantizes each packed weight with its own stored state
through `bitsandbytes.functional.dequantize_4bit` (what bitsandbytes' Linear4bit computes with),
so everything downstream sees a 16-bit model; the memory planner may pack it to NF4 again
(`weights: nf4`, or under `auto` when bitsandbytes runs on the device).

The logical shapes live in the small JSON tensors, not in the safetensors header: `logical_header`
reads just those (a few hundred bytes per layer) to give detection and the planner real shapes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from workbench.errors import FormatError, UnsupportedError
from workbench.formats.packed import HeaderTensors, PackedTensorInfo
from workbench.formats.safetensors_io import SafetensorsHeader

STATE = ".quant_state.bitsandbytes__"   # + "nf4" | "fp4", after `<layer>.weight`
PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
BNB_PIP = "pip install bitsandbytes"
TORCH_TO_ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def packed_weights(keys) -> dict[str, str]:
    """{weight key: "nf4" | "fp4"} for every weight stored in bitsandbytes 4-bit form."""
    out = {}
    for k in keys:
        if STATE in k:
            weight, _, kind = k.rpartition(STATE)
            out[weight] = kind
    return out


def is_aux_key(key: str, weights: Mapping[str, str]) -> bool:
    """A key that only describes a packed weight's quantization (its absmax, maps, state)."""
    weight, _, part = key.rpartition(".")
    if part in PARTS and weight in weights:
        return True
    return STATE in key


def _state_json(tensor: torch.Tensor, key: str, path) -> dict:
    try:
        state = json.loads(bytes(tensor.to(torch.uint8).flatten().tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        state = None
    if not isinstance(state, dict) or not isinstance(state.get("shape"), list):
        raise FormatError(f"{path}: tensor {key!r} is not bitsandbytes' packed quant state (JSON "
                          "with quant_type, blocksize, dtype and shape)")
    return state


def logical_header(header: SafetensorsHeader) -> SafetensorsHeader | None:
    """`header` with each packed weight given its logical shape (`PackedTensorInfo`, dtype "NF4" or
    "FP4") and the quantization keys left out; None if the file holds no bitsandbytes 4-bit weight."""
    weights = packed_weights(header.tensors)
    if not weights:
        return None
    from safetensors import safe_open

    states = {}
    with safe_open(str(header.path), framework="pt") as f:
        for weight, kind in weights.items():
            key = weight + STATE + kind
            states[weight] = _state_json(f.get_tensor(key), key, header.path)
    tensors = {}
    for key, t in header.tensors.items():
        if key in weights:
            state = states[key]
            missing = [p for p in ("absmax", "quant_map") if f"{key}.{p}" not in header.tensors]
            if missing:
                raise FormatError(f"{header.path}: packed weight {key!r} has no {key}.{missing[0]}; "
                                  "expected bitsandbytes' absmax and quant_map beside each 4-bit weight")
            t = PackedTensorInfo(weights[key].upper(), tuple(int(d) for d in state["shape"]), t.begin,
                                 t.end, stored_shape=t.shape,
                                 unpacked_dtype=TORCH_TO_ST.get(str(state.get("dtype")), "F16"))
        elif is_aux_key(key, weights):
            continue
        tensors[key] = t
    return SafetensorsHeader(header.path, tensors, dict(header.metadata), header.data_offset,
                             header.file_size)


def _bnb():
    try:
        import bitsandbytes  # optional: only 4-bit files and `weights: nf4` need it
    except ImportError:
        raise UnsupportedError(f"bitsandbytes 4-bit files need bitsandbytes, which is not installed: "
                                f"{BNB_PIP}") from None
    return bitsandbytes


def dequantize_weight(packed: torch.Tensor, parts: Mapping[str, torch.Tensor], weight: str,
                      path="state dict") -> torch.Tensor:
    """One packed weight back in its stored dtype and logical shape, with bitsandbytes' own
    `QuantState.from_dict` + `dequantize_4bit` (on the CPU)."""
    bnb = _bnb()
    qs = {k[len(weight) + 1:]: v for k, v in parts.items()}
    try:
        state = bnb.functional.QuantState.from_dict(qs, device=torch.device("cpu"))
        return bnb.functional.dequantize_4bit(packed.to("cpu"), state)
    except (ValueError, KeyError, AssertionError, RuntimeError) as e:
        raise FormatError(f"{path}: cannot unpack the 4-bit weight {weight!r} with its stored quant "
                          f"state ({e}); the file is damaged or not bitsandbytes' layout") from None


def dequantize(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, *,
               path="state dict") -> dict[str, torch.Tensor]:
    """A copy of `tensors` with every bitsandbytes 4-bit weight dequantized (as `dtype`) and its
    quantization keys dropped; other tensors pass through untouched."""
    weights = packed_weights(tensors)
    if not weights:
        return dict(tensors)
    out = {k: v for k, v in tensors.items() if not is_aux_key(k, weights)}
    for weight in weights:
        if weight not in tensors:
            raise FormatError(f"{path}: quant state for {weight!r} but no such weight; expected the "
                              "packed weight beside its quant state")
        parts = {k: v for k, v in tensors.items() if k.startswith(weight + ".") and is_aux_key(k, weights)}
        out[weight] = dequantize_weight(tensors[weight], parts, weight, path).to(dtype)
    return out


class NF4Tensors(HeaderTensors):
    """A bitsandbytes 4-bit safetensors file read as plain tensors, one at a time: the reader
    interface of `formats.lazy.LazySafetensors` (what merges use) over an open one."""

    def __init__(self, lazy, header: SafetensorsHeader):
        self._lazy = lazy
        self.path = Path(lazy.path)
        self.header = header  # logical (see logical_header)
        self._weights = packed_weights(lazy.header.tensors)

    def __enter__(self) -> "NF4Tensors":
        self._lazy.__enter__()
        return self

    def close(self) -> None:
        self._lazy.close()

    def get(self, key: str) -> torch.Tensor:
        if key not in self._weights:
            return self._lazy.get(key)
        raw = self._lazy.header.tensors
        parts = {k: self._lazy.get(k) for k in raw if k.startswith(key + ".") and is_aux_key(k, self._weights)}
        return dequantize_weight(self._lazy.get(key), parts, key, self.path)

    def view(self, key: str) -> torch.Tensor:
        return self.get(key) if key in self._weights else self._lazy.view(key)
