"""GGUF model files: the header with logical shapes, and tensors packed or dequantized.

Users with 8-12 GB cards run FLUX from city96's GGUF conversions (`flux1-dev-Q8_0.gguf`, `Q5_K_S`,
`Q4_K_S`); SD3.5 and SDXL come the same way, and stable-diffusion.cpp writes whole checkpoints as
GGUF. Facts about those files (from reading city96's `tools/convert.py` and ComfyUI-GGUF's loader,
and the `gguf` package):

- tensor names are the original checkpoint names: a ComfyUI-GGUF conversion holds only the denoiser
  with the `model.diffusion_model.` prefix removed (`double_blocks.0.img_attn.qkv.weight`,
  `input_blocks.0.0.weight`); stable-diffusion.cpp keeps every component with its prefix;
- 1-D tensors, tiny tensors and FLUX's in/out layers stay F32 (or F16/BF16); the rest is quantized
  (Q8_0, Q5_0/Q5_1, Q4_0/Q4_1, the K-quants ...); llama.cpp falls back to another type for a tensor
  whose rows do not fill whole blocks (Q4_K -> Q5_0, for example), so one file mixes types;
- for SD1/SDXL UNets a tensor whose rows are not a multiple of 256 is stored reshaped to
  (n/256, 256) with its real shape in the metadata array `comfy.gguf.orig_shape.<name>`;
- GGUF stores dimensions innermost first; `gguf.GGUFReader` gives them in that order.

`read_gguf_header` turns this into a `SafetensorsHeader` whose entries are `PackedTensorInfo` with
the logical torch shape, so detection, config inference and the memory planner read GGUF files as
they read safetensors. Loading keeps the denoiser's Linear weights packed as diffusers'
`GGUFParameter` (dequantized per layer at compute time by diffusers' `GGUFLinear`, as
`GGUFQuantizationConfig` does), and its convolutions and reshaped Linear weights packed too
(`pipeline.gguf_layers`); everything else (norms, biases, text encoders, VAE) is dequantized
while loading with diffusers' torch dequantizers, which are also
what dequantize the packed layers later, so a weight has one value whichever way it is read.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.errors import FormatError, UnsupportedError
from workbench.formats.packed import BNB_4BIT, HeaderTensors, INTEGER, PackedTensorInfo, UNPACKED
from workbench.formats.safetensors_io import SafetensorsHeader

MAGIC = b"GGUF"
ORIG_SHAPE = "comfy.gguf.orig_shape."
GGUF_PIP = "pip install gguf"
SUFFIX = ".gguf"


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether `path` is a GGUF file (by its magic bytes, whatever its name)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def _gguf():
    """The `gguf` package (an optional dependency: `pip install gguf`)."""
    try:
        import gguf  # optional: only GGUF files need it
    except ImportError:
        raise UnsupportedError(f"GGUF files need the gguf package, which is not installed: {GGUF_PIP}") from None
    return gguf


@dataclass
class GGUFHeader(SafetensorsHeader):
    """A GGUF file's tensor table with logical shapes (`PackedTensorInfo`), plus its key/values."""

    arch: str | None = None   # general.architecture ("flux", "sdxl", "sd3", "sd1", ...)

    def bytes_by_type(self) -> dict[str, int]:
        """Stored bytes per GGUF type ("Q8_0", "F32", ...), largest first."""
        by: dict[str, int] = {}
        for t in self.tensors.values():
            by[t.dtype] = by.get(t.dtype, 0) + t.nbytes
        return dict(sorted(by.items(), key=lambda kv: -kv[1]))

    def dtype_summary(self) -> str:
        """The dominant quantized type by bytes ("Q8_0"), else the dominant plain one ("F16")."""
        by = self.bytes_by_type()
        quant = [k for k in by if k not in UNPACKED + INTEGER]
        return quant[0] if quant else next(iter(by), "-")

    def quant_label(self) -> str:
        """What the scan shows: "GGUF Q4_K" or, for mixed files, "GGUF Q4_K+Q5_0" (by bytes)."""
        quant = [k for k in self.bytes_by_type() if k not in UNPACKED + INTEGER]
        return "GGUF " + ("+".join(quant[:3]) if quant else self.dtype_summary())


def _field_value(field) -> object:
    """A key/value field as a Python value (arrays as lists); None for what does not decode."""
    try:
        return field.contents()
    except (ValueError, TypeError, IndexError, UnicodeDecodeError):
        return None


def _reader(path: Path):
    gguf = _gguf()
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, OSError) as e:
        raise FormatError(f"{path}: not a readable GGUF file ({e}); the file is corrupt, truncated "
                          "or of a GGUF version the installed gguf package does not read") from None


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """The tensor table of a GGUF file with logical torch shapes; no tensor data is read.

    FormatError naming the file for a corrupt or truncated file or a bad `orig_shape` entry.
    """
    path = Path(path)
    reader = _reader(path)
    size = path.stat().st_size
    metadata: dict[str, str] = {}
    orig: dict[str, tuple[int, ...]] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        value = _field_value(field)
        if name.startswith(ORIG_SHAPE):
            if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
                raise FormatError(f"{path}: metadata {name!r} is {value!r}; expected the tensor's "
                                  "original shape as an array of integers")
            orig[name[len(ORIG_SHAPE):]] = tuple(int(v) for v in value)
        elif isinstance(value, (str, int, float, bool)):
            metadata[name] = str(value)
    tensors: dict[str, PackedTensorInfo] = {}
    for t in reader.tensors:
        stored = tuple(int(d) for d in reversed(t.shape.tolist()))
        shape = orig.get(t.name, stored)
        if _numel(shape) != _numel(stored):
            raise FormatError(f"{path}: tensor {t.name!r} is stored as {list(stored)} but its "
                              f"{ORIG_SHAPE}{t.name} says {list(shape)}; the element counts differ")
        begin = int(t.data_offset) - int(reader.data_offset)
        end = begin + int(t.n_bytes)
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise FormatError(f"{path}: truncated: tensor {t.name!r} ends at byte "
                              f"{int(t.data_offset) + int(t.n_bytes)} but the file has only {size} bytes "
                              "(incomplete download or copy?)")
        tensors[t.name] = PackedTensorInfo(t.tensor_type.name, shape, begin, end, stored_shape=stored)
    return GGUFHeader(path=path, tensors=tensors, metadata=metadata, data_offset=int(reader.data_offset),
                      file_size=size, arch=metadata.get("general.architecture"))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def linear_packed(info: PackedTensorInfo) -> bool:
    """Whether diffusers' GGUF quantizer takes a denoiser tensor packed (a Linear weight for its
    GGUFLinear): quantized, two-dimensional and stored in its own shape."""
    return info.is_packed and len(info.shape) == 2 and info.stored_shape == info.shape


def keeps_packed(info: PackedTensorInfo) -> bool:
    """Whether a denoiser tensor stays packed in memory: the Linear weights diffusers packs
    (`linear_packed`) and the convolutions and reshaped Linear weights that
    `pipeline.gguf_layers.pack_layers` packs after loading (quantized, 2-D or 4-D); not the
    bitsandbytes 4-bit weights that share PackedTensorInfo (dequantized at load)."""
    return info.is_packed and info.dtype not in BNB_4BIT and len(info.shape) in (2, 4)


def unsupported_types(header: GGUFHeader) -> dict[str, str]:
    """{tensor: type} of tensors whose type diffusers cannot dequantize (e.g. IQ1_S, TQ1_0)."""
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES  # heavy: only when loading

    ok = {q.name for q in SUPPORTED_GGUF_QUANT_TYPES} | set(UNPACKED) | set(INTEGER)
    return {k: t.dtype for k, t in header.tensors.items() if t.dtype not in ok}


def check_supported(header: GGUFHeader) -> None:
    """FormatError naming the file, a tensor and its type when some type cannot be dequantized."""
    bad = unsupported_types(header)
    if bad:
        name, qtype = next(iter(bad.items()))
        raise FormatError(f"{header.path}: tensor {name!r} is stored as GGUF {qtype} ({len(bad)} such "
                          "tensors), which diffusers cannot dequantize; expected F32/F16/BF16, Q8_0, "
                          "Q5_0/Q5_1, Q4_0/Q4_1, Q2_K-Q6_K or IQ4_NL/IQ4_XS tensors")


class GGUFTensors(HeaderTensors):
    """An open GGUF file: header up front, tensors on demand (memory-mapped by `gguf.GGUFReader`).

    `packed(key)` gives a weight as diffusers' `GGUFParameter` (quantized bytes, dequantized when its
    layer runs); `get(key)` / `view(key)` give it dequantized, in its logical shape. The same
    interface as `formats.lazy.LazySafetensors`, so merges read GGUF inputs through it.
    """

    def __init__(self, path: str | os.PathLike, header: GGUFHeader | None = None):
        self.path = Path(path)
        self.table = header or read_gguf_header(self.path)   # packed types, logical shapes
        self.header = self.table  # what callers plan from (`model_file.open_model`: decoded dtypes)
        self._reader = None
        self._index: dict[str, int] = {}

    def __enter__(self) -> "GGUFTensors":
        check_supported(self.table)
        self._reader = _reader(self.path)
        self._index = {t.name: i for i, t in enumerate(self._reader.tensors)}
        return self

    def close(self) -> None:
        self._reader = None  # the memory map goes with the reader

    def info(self, key: str) -> PackedTensorInfo:
        try:
            return self.table.tensors[key]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {key!r}") from None

    def _raw(self, key: str) -> torch.Tensor:
        if self._reader is None:
            raise RuntimeError(f"{self.path}: GGUFTensors read outside its `with` block")
        import numpy as np

        data = self._reader.tensors[self._index[key]].data
        return torch.from_numpy(np.array(data))  # a copy: the file's map is read-only

    def packed(self, key: str) -> torch.Tensor:
        """The tensor as stored: a `GGUFParameter` for quantized types, a plain tensor otherwise."""
        from diffusers.quantizers.gguf.utils import GGUFParameter  # heavy: only when loading

        info = self.info(key)
        raw = self._raw(key)
        if not info.is_packed:
            return raw.view(_torch_dtype(info.dtype)).reshape(info.shape) if info.dtype == "BF16" \
                else raw.reshape(info.shape)
        return GGUFParameter(raw, quant_type=_qtype(info.dtype))

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor dequantized to its logical shape (in `dtype`, else what the dequantizer gives:
        float16 for the quantized types, as diffusers computes them)."""
        info = self.info(key)
        value = self.packed(key)
        if info.is_packed:
            from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor  # heavy: only when loading

            value = dequantize_gguf_tensor(value).reshape(info.shape)
        return value.to(dtype) if dtype is not None else value

    view = get  # the merge executor's reader name; a dequantized tensor is a fresh one anyway


def _qtype(name: str):
    return getattr(_gguf().GGMLQuantizationType, name)


def _torch_dtype(name: str) -> torch.dtype:
    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[name]


def load_tensors(path: str | os.PathLike, dtype: torch.dtype, *, prefix: str = "",
                 packed: Callable[[str, PackedTensorInfo], bool] | None = None) -> dict[str, torch.Tensor]:
    """Tensors under `prefix` (removed from the names), dequantized to `dtype`, except those for
    which `packed(name, info)` is true: they stay packed (`GGUFParameter`) for diffusers' GGUFLinear."""
    out: dict[str, torch.Tensor] = {}
    with GGUFTensors(path) as f:
        for key, info in f.table.tensors.items():
            if not key.startswith(prefix):
                continue
            name = key[len(prefix):]
            out[name] = f.packed(key) if packed is not None and packed(name, info) else f.get(key, dtype)
    return out


def denoiser_tensors(path: str | os.PathLike, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The denoiser's tensors under `prefix`: Linear weights packed (`linear_packed`), the rest in `dtype`."""
    return load_tensors(path, dtype, prefix=prefix, packed=lambda _name, info: linear_packed(info))


def packed_rest(path: str | os.PathLike, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, ...]]]:
    """({name: GGUFParameter}, {name: logical shape}) of the tensors under `prefix` that stay packed
    but that diffusers' quantizer dequantizes (`keeps_packed` and not `linear_packed`): convolutions
    and reshaped Linear weights, for `pipeline.gguf_layers.pack_layers`."""
    packed: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    with GGUFTensors(path) as f:
        for key, info in f.table.tensors.items():
            if key.startswith(prefix) and keeps_packed(info) and not linear_packed(info):
                packed[key[len(prefix):]] = f.packed(key)
                shapes[key[len(prefix):]] = info.shape
    return packed, shapes


def iter_packed(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, parameter) of every weight a loaded module keeps packed (diffusers' GGUFParameter)."""
    for name, p in module.named_parameters():
        if hasattr(p, "quant_type"):
            yield name, p
