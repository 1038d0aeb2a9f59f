"""Tensors stored packed (GGUF quant blocks, bitsandbytes 4-bit): the header entry detection and sizes see.

A packed tensor's bytes are not its shape: a GGUF Q8_0 row of 3072 values is 102 blocks of 34
bytes, a bitsandbytes NF4 weight is a column of uint8 with two codes per byte. Detection
(`formats.detect`), the pipeline config inference (`formats.pipeline_config`) and the memory planner
(`core.sizes`) need the *logical* shape the model will have once the tensor is unpacked, and the
planner needs the packed byte count too. `PackedTensorInfo` is a `TensorInfo` carrying both, so every
consumer of a safetensors header reads GGUF and NF4 headers (`formats.model_file.read_model_header`)
without knowing about them.
"""

from __future__ import annotations

from dataclasses import dataclass

from workbench.formats.safetensors_io import DTYPE_SIZES, SafetensorsHeader, TensorInfo

# Plain (not quantized) tensor types a packed file may also hold.
UNPACKED = ("F32", "F16", "BF16", "F64")
# bitsandbytes 4-bit weights (Forge NF4 files, formats/nf4_file.py): dequantized when loaded
BNB_4BIT = ("NF4", "FP4")
INTEGER = ("I8", "I16", "I32", "I64")


@dataclass(frozen=True)
class PackedTensorInfo(TensorInfo):
    """`shape` is the logical shape; `begin`/`end` the packed bytes in the file; `dtype` the packed
    format ("Q8_0", "Q4_K", "NF4", or "F16"/"F32"/"BF16" for GGUF's unquantized tensors)."""

    stored_shape: tuple[int, ...] = ()   # the shape as stored (GGUF: reshaped tensors differ)
    unpacked_dtype: str = "F16"          # what dequantizing gives (GGUF: float16; NF4: its state's)

    @property
    def is_float(self) -> bool:
        return self.dtype not in INTEGER  # every quantized format holds floating-point weights

    @property
    def is_packed(self) -> bool:
        """Quantized (not a plain tensor that happens to live in a GGUF file)."""
        return self.dtype not in UNPACKED + INTEGER


def decoded_header(header: SafetensorsHeader) -> SafetensorsHeader:
    """The same table with each packed tensor described as what reading it dequantized gives (its
    logical shape in its unpacked dtype): what a merge plans its output from."""
    tensors = {}
    for key, t in header.tensors.items():
        if isinstance(t, PackedTensorInfo):
            dtype = t.unpacked_dtype if t.is_packed else t.dtype
            t = TensorInfo(dtype, t.shape, t.begin, t.begin + t.numel * DTYPE_SIZES[dtype])
        tensors[key] = t
    return SafetensorsHeader(header.path, tensors, dict(header.metadata), header.data_offset,
                             header.file_size)


class HeaderTensors:
    """The read-only mapping protocol the merge readers share (`formats/model_file.open_model`):
    names, membership, metadata and entries come from `self.header`, the logical header of what
    `get` returns; subclasses give `header`, `get` and `close`."""

    header: SafetensorsHeader

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:  # pragma: no cover - every reader defines its own
        raise NotImplementedError

    def keys(self) -> list[str]:
        return list(self.header.tensors)

    def __contains__(self, key: object) -> bool:
        return key in self.header.tensors

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    def info(self, key: str):
        return self.header.tensors[key]
