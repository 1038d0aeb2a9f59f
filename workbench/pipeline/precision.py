"""Weight storage precision per component: fp16/bf16/fp32, fp8 storage upcast per layer, NF4.

fp8 storage (float8_e4m3fn or float8_e5m2) halves a 16-bit model: each Linear/Conv weight is kept
in fp8 and cast to the compute dtype just before its layer runs, then the upcast copy is dropped, so
only one layer's upcast copy exists at a time. Our own forward hooks do this (not diffusers'
layerwise casting), so it works the same on CPU and GPU, for diffusers and transformers models, and
composes with `workbench.pipeline.streaming` (streaming swaps a block's tensors in; the cast hooks then
upcast layer by layer).

What stays in the compute dtype: biases, norms and embeddings (not Linear/Conv), the model's first
and last layers (`conv_in`/`proj_in`/`conv_out`/`proj_out` at the top level, and the layer holding
the first parameter: diffusers and transformers read `model.dtype` from it and cast inputs to it),
and a model's `_keep_in_fp32_modules` (T5's `wo`, whose caller casts activations to its weight dtype).

Each layer is stored with one scale (fp8 value x scale = weight), chosen so that its largest
weight lands on the format's largest value: fp8 has few exponent steps, and weights rounded straight
to e4m3fn (smallest normal 2^-6) lose most of their bits when they are small, as most are. The
upcast multiplies the scale back in; it is the tensor-wise scheme of ComfyUI's "scaled fp8" files.

Already-fp8 single files: every e4m3fn and e5m2 value is exactly representable in fp16 and bf16, so
a plain fp8 file loaded through a 16-bit dtype is stored back with scale 1 in the file's own format,
bit-identical (a weight that fp8 holds exactly is never rescaled): "load as they are" needs nothing
but choosing the file's format (the planner does: `ComponentSize.file_dtype`). Scaled-fp8 files are
multiplied out while loading (`formats.scaled_fp8`) and come back here to nearly their own values.
`file_fp8_storage` names a file's fp8 format from its header.

NF4 goes through bitsandbytes `Linear4bit` (optional dependency) on a CUDA GPU, and on the CPU
where the installed bitsandbytes has its CPU backend (0.48 and later: `nf4_available` tries it).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from workbench.errors import UnsupportedError, WorkbenchError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
STORAGES = (*DTYPES, "nf4")
EDGE_LAYERS = re.compile(r"^(conv_in|proj_in|conv_out|proj_out)$")
CAST_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NF4_PIP = "pip install bitsandbytes"


def storage_dtype(storage: str) -> torch.dtype:
    """The torch dtype of a storage name (fp8_e4m3fn -> torch.float8_e4m3fn); nf4 has none."""
    if storage not in DTYPES:
        raise WorkbenchError(f"storage: expected one of {', '.join(STORAGES)} (got {storage!r})")
    return DTYPES[storage]


def castable_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of the Linear/Conv layers whose weight may be stored in low precision."""
    first = next((n for n, p in module.named_parameters() if p.is_floating_point()), "")
    first_owner = first.rpartition(".")[0]
    keep32 = tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
    out = []
    for name, layer in module.named_modules():
        if not isinstance(layer, CAST_TYPES) or getattr(layer, "weight", None) is None:
            continue
        if name == first_owner or EDGE_LAYERS.match(name):
            continue
        if any(k in name.split(".") for k in keep32):
            continue
        out.append((name, layer))
    return out


def file_fp8_storage(header) -> str | None:
    """The fp8 storage a safetensors header's float weights are mostly in, else None."""
    by: dict[str, int] = {}
    for t in header.tensors.values():
        if t.is_float:
            by[t.dtype] = by.get(t.dtype, 0) + t.nbytes
    top = max(by, key=by.get) if by else None
    return {"F8_E4M3": "fp8_e4m3fn", "F8_E5M2": "fp8_e5m2"}.get(top)


# --------------------------------------------------------------------------- per-layer upcasting

@dataclass
class StorageHandle:
    """What `apply_storage` did; `remove()` takes the hooks off and upcasts the weights back."""

    module: nn.Module
    storage: str
    compute_dtype: torch.dtype
    layers: list[nn.Module] = field(default_factory=list)
    hooks: list = field(default_factory=list)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        if self.storage != "nf4":
            for layer in self.layers:
                layer.weight.data = layer.weight.data.to(self.compute_dtype)
                scale = layer.__dict__.pop("fp8_scale", 1.0)
                if scale != 1.0:
                    layer.weight.data.mul_(scale)
                layer.__dict__.pop("compute_dtype", None)
        self.layers.clear()


def to_scaled_fp8(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """(fp8 tensor, scale) with fp8 x scale ~= weight; scale 1 where fp8 already holds it exactly."""
    as_fp8 = weight.to(dtype)
    if torch.equal(as_fp8.to(weight.dtype), weight):
        return as_fp8, 1.0
    amax = float(weight.abs().max())
    if not amax or not torch.isfinite(torch.tensor(amax)):
        return as_fp8, 1.0
    scale = amax / torch.finfo(dtype).max
    return (weight.to(torch.float32) / scale).to(dtype), scale


def _upcast_hooks(layer: nn.Module, compute_dtype: torch.dtype) -> list:
    """Forward hooks that swap in an upcast copy of the weight for this call only."""
    stored: list[torch.Tensor] = []

    def pre(mod, args):
        stored.append(mod.weight.data)
        mod.weight.data = mod.weight.data.to(compute_dtype)
        scale = getattr(mod, "fp8_scale", 1.0)
        if scale != 1.0:
            mod.weight.data.mul_(scale)

    def post(mod, args, output):
        if stored:
            mod.weight.data = stored.pop()

    return [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post, always_call=True)]


def apply_storage(module: nn.Module, storage: str, compute_dtype: torch.dtype, *,
                  device: torch.device | str | None = None) -> StorageHandle:
    """Store `module`'s castable weights as `storage`, computing in `compute_dtype`.

    The module should already be in `compute_dtype` (as loaded). Weights already in the storage
    dtype, or exactly representable in it (an fp8 file kept as is), keep their values; others get a
    per-layer scale (`to_scaled_fp8`). For nf4, `device` must be a CUDA device: each
    Linear is replaced by a bitsandbytes Linear4bit there (not undone by `remove()`).
    """
    handle = StorageHandle(module, storage, compute_dtype)
    if storage == "gguf":  # a GGUF denoiser as loaded: diffusers' GGUFLinear dequantizes per layer
        return handle
    if storage == "nf4":
        handle.layers = _apply_nf4(module, compute_dtype, device)
        return handle
    dtype = storage_dtype(storage)
    if dtype == compute_dtype:
        return handle
    via = torch.device(device) if device is not None and torch.device(device).type == "cuda" else None
    for _, layer in castable_layers(module):
        w = layer.weight.data
        if w.dtype != dtype:  # rounding on the GPU when there is one: far faster than the CPU's
            stored, scale = to_scaled_fp8(w.to(via) if via is not None else w, dtype)
            layer.weight.data = stored.to(w.device)
            layer.fp8_scale = scale
        handle.layers.append(layer)
        handle.hooks += _upcast_hooks(layer, compute_dtype)
        # peft gives a LoRA added later the dtype of its base layer's `compute_dtype` when there is
        # one (as for bitsandbytes layers), else of its weight: fp8 adapters would lose the LoRA
        layer.compute_dtype = compute_dtype
    return handle


def stored_bytes(module: nn.Module) -> int:
    """Bytes the module's parameters and buffers take as stored now."""
    return sum(t.numel() * t.element_size() for t in _tensors(module))


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


# ---------------------------------------------------------------------------------------- NF4

def bitsandbytes():
    """The bitsandbytes module, or UnsupportedError with the pip command."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UnsupportedError(f"weights nf4 needs bitsandbytes, which is not installed: {NF4_PIP}") from None
    return bnb


@functools.cache
def nf4_available(device_type: str) -> bool:
    """Whether bitsandbytes can quantize to NF4 on this kind of device ("cuda" or "cpu"): tried on a
    small tensor, since CPU support depends on the installed version and build."""
    try:
        bnb = bitsandbytes()
        packed, state = bnb.functional.quantize_4bit(torch.randn(64, 64, device=device_type),
                                                     quant_type="nf4")
        return packed.dtype == torch.uint8 and state is not None
    except Exception:  # noqa: BLE001 - any failure means "not here"
        return False


def require_nf4(device: torch.device | str | None) -> torch.device:
    """The device NF4 will run on, or UnsupportedError saying what is missing."""
    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type not in ("cuda", "cpu"):
        raise UnsupportedError(f"weights nf4 needs a device (cuda or cpu); got {dev or 'none'}")
    bitsandbytes()  # not installed: the pip command
    if not nf4_available(dev.type):
        raise UnsupportedError(f"weights nf4: the installed bitsandbytes cannot quantize on {dev.type}"
                                + (" (its CPU backend needs bitsandbytes >= 0.48)" if dev.type == "cpu" else "")
                                + f"; use fp8 storage instead, or {NF4_PIP} --upgrade")
    return dev


def nf4_linear(layer: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    """A frozen bitsandbytes NF4 Linear4bit holding `layer`'s weights, not yet quantized:
    Params4bit packs them when the module is moved to its device. Built on the meta device, so no
    throwaway weight is initialised per layer (minutes and 24 GB of RAM for FLUX)."""
    bnb = bitsandbytes()
    q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          compute_dtype=compute_dtype, quant_type="nf4", device="meta")
    q.weight = bnb.nn.Params4bit(layer.weight.data.to(compute_dtype), requires_grad=False,
                                 quant_type="nf4", compress_statistics=True, blocksize=64, module=q)
    if layer.bias is not None:
        q.bias = nn.Parameter(layer.bias.data.to(compute_dtype), requires_grad=False)
    return q


def _apply_nf4(module: nn.Module, compute_dtype: torch.dtype, device) -> list[nn.Module]:
    """Replace every castable Linear with a bitsandbytes NF4 Linear4bit on `device`."""
    dev = require_nf4(device)
    replaced = []
    for name, layer in castable_layers(module):
        if not isinstance(layer, nn.Linear):
            continue
        parent = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
        q = nf4_linear(layer, compute_dtype).to(dev)  # quantized here
        setattr(parent, name.rpartition(".")[2], q)
        replaced.append(q)
    return replaced
