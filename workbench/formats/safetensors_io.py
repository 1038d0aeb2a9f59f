"""Safetensors headers, lazy memory-mapped tensor reading, and the atomic streamed writer.

The header is read on its own (8-byte little-endian length + JSON) so that detection, scanning and
dry runs never touch tensor data. Every problem is reported with the file name and what was expected.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from workbench.errors import FormatError

# Largest JSON header we accept: real headers of 12B-parameter files are a few MB.
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the file; offsets are relative to the start of the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


@dataclass
class SafetensorsHeader:
    """The parsed header of one safetensors file: tensor table plus `__metadata__` strings."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    data_offset: int = 0
    file_size: int = 0

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: t.shape for k, t in self.tensors.items()}

    @property
    def data_bytes(self) -> int:
        return self.file_size - self.data_offset

    def dtype_summary(self) -> str:
        """The dominant float dtype by bytes (e.g. 'F16'), or the dominant dtype if none is float."""
        by_bytes: dict[str, int] = {}
        for t in self.tensors.values():
            by_bytes[t.dtype] = by_bytes.get(t.dtype, 0) + t.nbytes
        floats = {k: v for k, v in by_bytes.items() if k in FLOAT_DTYPES}
        pool = floats or by_bytes
        return max(pool, key=pool.get) if pool else "-"


def read_header(path: str | Path) -> SafetensorsHeader:
    """Parse and validate a safetensors header without reading any tensor data.

    Raises FormatError naming the file for: too short, absurd header length, invalid JSON, unknown
    dtype, a shape that disagrees with its byte range, or data extending past the end of the file
    (a truncated download).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise FormatError(f"{path}: not a safetensors file (only {size} bytes; expected an "
                                  "8-byte header length followed by a JSON header)")
            (n,) = struct.unpack("<Q", raw_len)
            if n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise FormatError(f"{path}: not a safetensors file or truncated (header length field "
                                  f"says {n} bytes, file has {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise FormatError(f"{path}: cannot read file ({e.strerror or e})") from e
    try:
        obj = json.loads(raw.decode("utf-8").rstrip(" \x00"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: safetensors header is not valid JSON ({e}); the file is corrupt "
                          "or not a safetensors file") from e
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: safetensors header must be a JSON object, got {type(obj).__name__}")
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise FormatError(f"{path}: '__metadata__' must be an object of strings")
    data_offset = 8 + n
    data_size = size - data_offset
    tensors: dict[str, TensorInfo] = {}
    for name, entry in obj.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{path}: tensor '{name}': malformed header entry {entry!r} "
                              "(expected dtype, shape and data_offsets)") from e
        if dtype not in DTYPE_SIZES:
            raise FormatError(f"{path}: tensor '{name}': unknown dtype {dtype!r}")
        info = TensorInfo(dtype, shape, begin, end)
        if end < begin or info.nbytes != info.numel * DTYPE_SIZES[dtype]:
            raise FormatError(f"{path}: tensor '{name}': byte range {begin}..{end} does not match "
                              f"shape {list(shape)} of {dtype}")
        if end > data_size:
            raise FormatError(f"{path}: truncated: tensor '{name}' ends at byte {data_offset + end} "
                              f"but the file has only {size} bytes (incomplete download or copy?)")
        tensors[name] = info
    return SafetensorsHeader(path=path, tensors=tensors,
                             metadata={str(k): str(v) for k, v in metadata.items()},
                             data_offset=data_offset, file_size=size)


TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                "U16": "uint16", "U32": "uint32", "U64": "uint64"}


def torch_dtype(name: str):
    """The torch dtype of a safetensors dtype string ('F16' -> torch.float16)."""
    import torch

    return getattr(torch, TORCH_NAMES[name])
