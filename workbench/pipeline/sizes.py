"""Component sizes for the memory planner: parameter counts per pipeline component and block, from a
safetensors header (nothing loaded: what `workbench generate --plan` uses) or from a loaded
pipeline (whose blocks are exactly the units `workbench.pipeline.streaming` streams), plus the
working-memory estimates per stage. Bytes follow from the storage dtype chosen by the planner.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from workbench.arch import ARCHS, BY_ID
from workbench.formats.gguf_file import keeps_packed
from workbench.formats.packed import PackedTensorInfo
from workbench.formats.scaled_fp8 import SCALE_SUFFIXES
from workbench.pipeline.precision import castable_layers
from workbench.formats.detect import detect
from workbench.formats.model_file import read_model_header
from workbench.formats.safetensors_io import SafetensorsHeader
from workbench.pipeline.load_dit import flux_parts


MB = 10**6
GB = 10**9
NF4_BYTES = 0.53               # per parameter: 4-bit codes + double-quantized absmax (blocks of 64)
STORAGE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8_e4m3fn": 1, "fp8_e5m2": 1, "nf4": NF4_BYTES}
DENOISERS = ("unet", "transformer")
STAGE_OF = {"unet": "denoise", "transformer": "denoise", "vae": "decode"}  # text encoders: encode


# ------------------------------------------------------------------------------------ the sizes

@dataclass(frozen=True)
class ComponentSize:
    """Parameter counts of one pipeline component; bytes follow from the storage dtype.

    `cast_params`: weights fp8 storage holds (Linear/Conv weights; not norms, embeddings, biases).
    `linear_params`: Linear weights (what bitsandbytes NF4 quantizes). `blocks`: parameters per
    streamable block in execution order; what is in no block always stays on the GPU when the
    component is partially resident. `largest_layer`: parameters of the largest castable layer
    (the upcast scratch of fp8 storage).
    """

    name: str
    params: int
    cast_params: int = 0
    linear_params: int = 0
    blocks: tuple[int, ...] = ()
    largest_layer: int = 0
    file_dtype: str = "F16"      # dominant by parameters; "NF4", "Q8_0", ... for packed files
    estimated: bool = False      # not in the file: a standard component's size, assumed
    scaled_fp8: bool = False     # ComfyUI scaled fp8 (formats.scaled_fp8): fp8 values x layer scales
    packed_params: int = 0       # GGUF: parameters that stay packed in memory (Linear weights)
    packed_bytes: int = 0        # ... and their bytes as stored in the file

    @property
    def stage(self) -> str:
        return STAGE_OF.get(self.name, "encode")

    def bytes_at(self, storage: str) -> int:
        """Weight bytes when stored as `storage` (non-castable parameters stay 2-byte). "gguf": the
        file's packed bytes of the weights kept packed, the rest dequantized (2-byte)."""
        if storage == "gguf":
            return self.packed_bytes + (self.params - self.packed_params) * 2
        per = STORAGE_BYTES[storage]
        if storage == "fp32":
            return self.params * 4
        low = self.linear_params if storage == "nf4" else self.cast_params
        return int(low * per + (self.params - low) * 2) if storage in ("nf4", "fp8_e4m3fn", "fp8_e5m2") \
            else self.params * per

    def block_bytes(self, storage: str) -> list[int]:
        """Bytes of each block at `storage` (scaled by the component's average bytes/param)."""
        ratio = self.bytes_at(storage) / max(1, self.params)
        return [int(b * ratio) for b in self.blocks]

    def rest_bytes(self, storage: str) -> int:
        """Bytes outside every block: always on the GPU when partially resident."""
        return max(0, self.bytes_at(storage) - sum(self.block_bytes(storage)))


# Component prefixes of single files (first match wins); the T5 role differs between sd3 and flux.
PREFIXES = (("model.diffusion_model.", "denoiser"), ("cond_stage_model.", "text_encoder"),
            ("conditioner.embedders.0.", "text_encoder"), ("conditioner.embedders.1.", "text_encoder_2"),
            ("text_encoders.clip_l.", "text_encoder"), ("text_encoders.clip_g.", "text_encoder_2"),
            ("text_encoders.t5xxl.", "t5"), ("first_stage_model.", "vae"), ("vae.", "vae"))
# Streamable blocks, in execution order: LDM UNet, BFL FLUX, SAI MMDiT, T5, CLIP (HF, OpenCLIP).
BLOCK_PATTERN = re.compile(r"(?:^|\.)(input_blocks\.\d+|middle_block|output_blocks\.\d+|double_blocks\.\d+|"
                           r"single_blocks\.\d+|joint_blocks\.\d+|encoder\.block\.\d+|"
                           r"encoder\.layers\.\d+|resblocks\.\d+)\.")
BLOCK_ORDER = ("input_blocks", "middle_block", "output_blocks", "double_blocks", "single_blocks",
               "joint_blocks", "encoder.block", "encoder.layers", "resblocks")
COMPONENTS = {a.id: a.components for a in ARCHS}  # from workbench/arch.py
# Standard components assumed when a file lacks them: (params, blocks, embedding params).
# clip_h (SD2's OpenCLIP ViT-H text tower, 24 layers): 24 x (12 x 1024^2 + 13 x 1024) + embeddings
# + projection, counted the way clip_g's 694,659,840 is.
STANDARD = {"clip_l": (123_060_480, 12, 38_000_000), "clip_g": (694_659_840, 32, 63_300_000),
            "clip_h": (354_032_640, 24, 50_600_000),
            "t5xxl": (4_762_310_656, 24, 131_600_000), "vae": (83_700_000, 0, 0)}
ROLE_MODEL = {(a.id, t.component): t.model for a in ARCHS for t in a.text_encoders}


def _castable_key(key: str, shape: tuple[int, ...]) -> bool:
    """A Linear/Conv weight that fp8 storage would hold (norms and embeddings stay as they are)."""
    low = key.lower()
    return key.endswith("weight") and len(shape) >= 2 and not re.search(r"norm|embed|ln_|shared", low)


def _size_from_keys(name: str, infos: Mapping[str, object]) -> ComponentSize:
    params = cast = linear = largest = packed = packed_bytes = 0
    blocks: dict[tuple[int, int], int] = {}
    by_dtype: dict[str, int] = {}
    for key, t in infos.items():
        n = t.numel
        if not t.is_float:
            continue
        params += n
        by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + n
        if name in DENOISERS and isinstance(t, PackedTensorInfo) and keeps_packed(t):  # GGUF
            packed += n
            packed_bytes += t.nbytes
        if _castable_key(key, t.shape):
            cast += n
            linear += n if len(t.shape) == 2 else 0
            largest = max(largest, n)
        if m := BLOCK_PATTERN.search(key):
            root, _, num = m.group(1).rpartition(".") if m.group(1)[-1].isdigit() else (m.group(1), "", "0")
            order = BLOCK_ORDER.index(root) if root in BLOCK_ORDER else len(BLOCK_ORDER)
            blocks[(order, int(num))] = blocks.get((order, int(num)), 0) + n
    file_dtype = max(by_dtype, key=by_dtype.get) if by_dtype else "F16"
    scaled = any(key.endswith(SCALE_SUFFIXES) for key in infos)
    return ComponentSize(name, params, cast, linear, tuple(blocks[k] for k in sorted(blocks)),
                         largest, file_dtype, scaled_fp8=scaled, packed_params=packed,
                         packed_bytes=packed_bytes)


def _standard(arch: str, name: str) -> ComponentSize | None:
    model = "vae" if name == "vae" else ROLE_MODEL.get((arch, name))
    if model is None:
        return None
    params, n, embed = STANDARD[model]
    blocks = tuple([(params - embed) // n] * n) if n else ()
    return ComponentSize(name, params, params - embed, params - embed, blocks,
                         (params - embed) // max(1, 6 * n), estimated=True)


def component_sizes_from_header(source, arch: str | None = None, *,
                                fill_missing: bool = True) -> list[ComponentSize]:
    """Sizes of each component from safetensors headers only (nothing is loaded).

    `source`: a path or parsed header, or a sequence/mapping of them (split files), or a folder of
    split FLUX files. Keys are grouped by their single-file prefixes; a file without prefixes is one
    component, as `detect` says. GGUF and bitsandbytes 4-bit files count their logical shapes
    (`formats.model_file.read_model_header`). Standard components missing from the files (e.g. T5
    beside a FLUX transformer-only file) are added with assumed sizes when `fill_missing`.
    """
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        source = flux_parts(source)  # split FLUX files: the only folders of single files we load
    items = list(source.values()) if isinstance(source, Mapping) else (
        list(source) if isinstance(source, (list, tuple)) else [source])
    groups: dict[str, dict] = {}
    for item in items:
        header = item if isinstance(item, SafetensorsHeader) else read_model_header(item)
        info = detect(header)
        arch = arch or info.arch
        denoiser = BY_ID[arch].denoiser if arch in BY_ID else "unet"
        t5 = "text_encoder_3" if arch == "sd3" else "text_encoder_2"
        single = sorted(info.components)[0] if len(info.components) == 1 else None
        for key, t in header.tensors.items():
            role = next((r for p, r in PREFIXES if key.startswith(p)), None)
            if role is None:
                role = {"unet": denoiser}.get(single, single) if single else denoiser
            role = {"denoiser": denoiser, "t5": t5}.get(role, role)
            groups.setdefault(role, {})[key] = t
    order = COMPONENTS.get(arch, ())
    sizes = [_size_from_keys(n, groups[n]) for n in sorted(groups, key=lambda n: (
        order.index(n) if n in order else len(order), n))]
    if fill_missing:
        have = {s.name for s in sizes}
        for n in order:
            if n not in have and (std := _standard(arch, n)) is not None:
                sizes.append(std)
    return sizes


def component_sizes_from_folder(folder: str | os.PathLike, names: Sequence[str]) -> list[ComponentSize]:
    """Sizes of the components `names` of a diffusers folder, from the headers of the safetensors
    files in each component's subfolder (shards added up); a component without such files is left out."""
    sizes = []
    for name in names:
        infos: dict = {}
        for f in sorted((Path(folder) / name).glob("*.safetensors")):
            infos.update(read_model_header(f).tensors)
        if infos:
            sizes.append(_size_from_keys(name, infos))
    return sizes


def component_sizes_from_pipeline(pipe) -> list[ComponentSize]:
    """Sizes of a loaded diffusers pipeline; blocks are exactly the units `streaming` streams."""

    return [module_size(name, module) for name, module in pipe.components.items()
            if name in ("unet", "transformer", "vae") or name.startswith("text_encoder")
            if module is not None and hasattr(module, "parameters")]


def choose_resident(block_bytes: Sequence[int], resident_bytes: int) -> list[bool]:
    """Which blocks stay on the GPU within `resident_bytes`, spread evenly over execution order.

    Spreading (rather than keeping the first N) leaves resident blocks between streamed ones, so
    each streamed block's copy overlaps the compute of the blocks before it. The same function is
    used by the plan and by `streaming`, so the counts agree.
    """
    total = sum(block_bytes)
    if total <= 0:
        return [True] * len(block_bytes)
    frac = min(1.0, max(0.0, resident_bytes / total))
    keep, kept, seen = [], 0, 0
    for b in block_bytes:
        seen += b
        ok = kept + b <= frac * seen + 1e-6 and kept + b <= resident_bytes
        keep.append(ok)
        kept += b if ok else 0
    return keep


def activation_bytes(arch: str, width: int, height: int, batch: int = 1) -> int:
    """Estimated VRAM for one denoiser call's activations at `width`×`height` (compute dtype 2 B).

    Per latent pixel (1/8 of the image side) and image in the model's batch (2 images with CFG for
    SD1.5/SDXL/SD3, 1 for guidance-distilled FLUX), with SDPA attention (no N² matrix): sd15 60 kB
    (attention at the full latent resolution), sdxl 30 kB (none at full resolution), sd3 30 kB,
    flux 40 kB (a single block holds ~4 maps of 4608 tokens x 3072-12288 channels). That is ~0.5 GB
    for SD1.5 at 512², ~1.0 GB for SDXL and ~0.65 GB for FLUX at 1024² (diffusers' FLUX bf16 peak,
    36.2 GB, minus 33.7 GB of weights leaves 2.5 GB with the VAE decode in it); plus a fixed 256 MB
    for allocator fragmentation. `bench/gpu_core.py` reports measured peaks to check these.
    """
    per_px = {a.id: a.activation_bytes_per_px for a in ARCHS}
    cfg = BY_ID[arch].images_per_call if arch in BY_ID else 2
    latent_px = math.ceil(width / 8) * math.ceil(height / 8)
    return int(per_px.get(arch, 98_000) * latent_px * batch * cfg) + 256 * MB


def vae_decode_bytes(width: int, height: int, batch: int = 1, tiled: bool = False) -> int:
    """Estimated VRAM for decoding: ~6 live 128-channel fp16 maps at full resolution (tiles: 512²)."""
    px = min(width * height, 512 * 512) if tiled else width * height
    return int(px * 128 * 2 * 6 * (1 if tiled else batch)) + 128 * MB


# ----------------------------------------------------------- the units streaming moves, and their sizes

UNITS_PER_COMPONENT = 24     # unit size target: 1/24 of the component
FILE_DTYPES = {torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.bfloat16: "BF16",
               torch.float32: "F32"}


# ------------------------------------------------------------------------------------- the units

def _nbytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.is_floating_point())


def stream_units(root: nn.Module, unit_params: int | None = None) -> list[tuple[str, nn.Module]]:
    """The streamable units of `root` in definition order: modules of at most `unit_params`
    parameters (default 1/24 of the component). Containers (ModuleList/Dict) are never units (they
    are not called), nor is the module holding the first parameter (`model.device`/`.dtype`)."""
    target = unit_params or max(1, _numel(root) // UNITS_PER_COMPONENT)
    first = next((n for n, _ in root.named_parameters()), "").rpartition(".")[0]
    out: list[tuple[str, nn.Module]] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = prefix + name
            n = _numel(child)
            if n == 0 or full == first or first.startswith(full + ".") and n <= target:
                if n and first.startswith(full + ".") and full != first:
                    walk(child, full + ".")
                continue
            container = isinstance(child, (nn.ModuleList, nn.ModuleDict))
            leafish = not any(_numel(c) for c in child.children())
            if not container and (n <= target or leafish):
                out.append((full, child))
            else:
                walk(child, full + ".")

    walk(root, "")
    return out


def module_size(name: str, module: nn.Module) -> ComponentSize:
    """`ComponentSize` of a loaded module: blocks are its `stream_units`."""
    cast = castable_layers(module)
    weights = [layer.weight.numel() for _, layer in cast]
    linear = sum(layer.weight.numel() for _, layer in cast if isinstance(layer, nn.Linear))
    dtype = cast[0][1].weight.dtype if cast else torch.float16
    return ComponentSize(name, _numel(module), sum(weights), linear,
                         tuple(_numel(m) for _, m in stream_units(module)), max(weights, default=0),
                         FILE_DTYPES.get(dtype, "F16"))
