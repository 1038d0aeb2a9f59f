"""Any model file the workbench reads, whatever its container and quantization: header and tensors.

Three stored forms need more than a safetensors header and memory-mapped tensors:
- GGUF files (`formats.gguf_file`): another container, quantized blocks;
- bitsandbytes 4-bit safetensors files, Forge's NF4 checkpoints (`formats.nf4_file`): packed
  weights whose logical shapes are in small JSON tensors;
- ComfyUI scaled-fp8 safetensors files (`formats.scaled_fp8`): fp8 weights and a scale per layer.

`read_model_header` gives one header type with logical shapes for all of them (what detection,
config inference, the memory planner and the scan read); `quantization_of` says which form a file is
in; `open_model` reads tensors as the model means them (dequantized, scales multiplied out), with
the interface of `formats.lazy.LazySafetensors`, for merges, merge previews and LoRA extraction;
`check_merge_input` is the rule for those: scaled fp8 is exact and always allowed, GGUF and NF4
are approximations and need the user's consent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from workbench.errors import WorkbenchError
from workbench.formats import gguf_file, nf4_file, scaled_fp8
from workbench.formats.lazy import open_lazy
from workbench.formats.packed import PackedTensorInfo, decoded_header
from workbench.formats.safetensors_io import SafetensorsHeader, read_header

@dataclass(frozen=True)
class Quantization:
    """How a file's weights are stored, when that is more than a dtype."""

    kind: str      # "gguf" | "nf4" | "scaled_fp8"
    label: str     # what the user sees: "GGUF Q8_0", "bitsandbytes nf4", "scaled fp8"
    exact: bool    # reading gives the model's own values (scaled fp8), not an approximation


def read_model_header(path: str | os.PathLike) -> SafetensorsHeader:
    """The header of a safetensors or GGUF model file with every tensor in its logical shape
    (packed GGUF and bitsandbytes weights as `PackedTensorInfo`, NF4 quant-state keys left out)."""
    if gguf_file.is_gguf(path):
        return gguf_file.read_gguf_header(path)
    header = read_header(path)
    return nf4_file.logical_header(header) or header


def quantization_of(header: SafetensorsHeader) -> Quantization | None:
    """The stored form of a header from `read_model_header`, or None for plain 16/32-bit/fp8 files."""
    if isinstance(header, gguf_file.GGUFHeader):
        return Quantization("gguf", header.quant_label(), exact=False)
    kinds = {t.dtype for t in header.tensors.values() if isinstance(t, PackedTensorInfo)}
    if kinds:
        return Quantization("nf4", "bitsandbytes " + "+".join(sorted(k.lower() for k in kinds)), exact=False)
    if scaled_fp8.layout_of(header) is not None:
        return Quantization("scaled_fp8", "scaled fp8", exact=True)
    return None


def open_model(path: str | os.PathLike):
    """Tensors of a model file as the model means them, one at a time (use as a context manager):
    GGUF dequantized, bitsandbytes 4-bit dequantized, scaled fp8 multiplied out; plain files are
    `open_lazy`'s memory-mapped reader. `.header` describes what `get`/`view` return."""
    if gguf_file.is_gguf(path):
        reader = gguf_file.GGUFTensors(path)
        reader.header = decoded_header(reader.table)
        return reader
    lazy = open_lazy(path)
    logical = nf4_file.logical_header(lazy.header)
    if logical is not None:
        return nf4_file.NF4Tensors(lazy, decoded_header(logical))
    layout = scaled_fp8.layout_of(lazy.header)
    if layout is not None:
        return scaled_fp8.ScaledTensors(lazy, layout)
    return lazy


def check_merge_input(header: SafetensorsHeader, label: str, what: str, allow_dequantized: bool,
                      flag: str) -> Quantization | None:
    """Refuse a GGUF or bitsandbytes 4-bit input to `what` (a merge, an extraction) unless
    `allow_dequantized`: their weights are a lossy approximation of the model, and a merge of them
    bakes that loss into a full-size file. `flag` names where the user says yes. Returns the
    input's quantization (None for plain files)."""
    quant = quantization_of(header)
    if quant is None or quant.exact or allow_dequantized:
        return quant
    how = f"; set `{flag}: true` to merge their dequantized values" if flag else ""
    raise WorkbenchError(f"{label}: a {quant.label} file; {what} works on full-precision weights and "
                         f"these are {quant.kind.upper()}-quantized approximations (dequantizing "
                         f"cannot bring back what quantization dropped){how}, or use the model's "
                         "16-bit release")
