"""GGUF convolutions and reshaped Linear weights kept packed, dequantized when their layer runs.

diffusers' `GGUFQuantizationConfig` packs only Linear weights stored in their own shape (its
`GGUFLinear` dequantizes `weight` and calls `F.linear`). A UNet (SD1.5, SDXL) has its weight
elsewhere too: every 3x3 convolution, and Linear weights whose rows are not a multiple of 256, are
stored by the conversions reshaped to (n/256, 256) (`formats.gguf_file` module doc), which
diffusers' quantizer cannot place. Loaded its way, a Q8_0 SDXL UNet would sit in memory at the full
fp16 size. Here those layers get their packed bytes back after diffusers has built the model:

- which layer holds which file tensor is found by value, not by name: a layer is packed only when
  its loaded weight is bit-for-bit the dequantization of a packed file tensor of the same logical
  shape (diffusers' converters rename and may split tensors; equal values make the swap exact
  whatever the name);
- the layer's class becomes `PackedConv2d` / `PackedLinear` (subclasses of the torch layer, so
  peft and diffusers' LoRA loaders still wrap them; peft builds a LoRA conv's own small layers as
  `type(base)(...)`, so a layer without packed bytes computes as the plain torch layer), whose
  forward dequantizes with diffusers'
  torch dequantizer, the one `GGUFLinear` uses, reshapes to the logical shape and computes in the
  dtype the layer was loaded in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _dequantize(weight: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor  # heavy: only with GGUF models

    return dequantize_gguf_tensor(weight).reshape(shape).to(dtype)


class _Packed:
    """What PackedConv2d and PackedLinear share: the logical shape and compute dtype of the packed
    weight, and the (weight, bias) a call computes with."""

    logical_shape: tuple[int, ...]
    compute_dtype: torch.dtype

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The dequantized weight and the bias in the compute dtype; None for a plain layer made as
        type(base) (peft's LoRA convs), which computes as the torch layer."""
        if not hasattr(self.weight, "quant_type"):
            return None
        weight = _dequantize(self.weight, self.logical_shape, self.compute_dtype)
        return weight, self.bias.to(self.compute_dtype) if self.bias is not None else None


class PackedConv2d(_Packed, nn.Conv2d):
    """A Conv2d whose `weight` is a `GGUFParameter` (the file's bytes), dequantized per call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = self.unpacked()
        return super().forward(x) if parts is None else self._conv_forward(x, *parts)


class PackedLinear(_Packed, nn.Linear):
    """A Linear whose `weight` is a `GGUFParameter` stored reshaped, dequantized per call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = self.unpacked()
        return super().forward(x) if parts is None else F.linear(x, *parts)


PACKED_CLASSES = {nn.Conv2d: PackedConv2d, nn.Linear: PackedLinear}


def _fingerprint(t: torch.Tensor) -> tuple:
    """Shape, dtype and the first and last values: a cheap key before the exact comparison."""
    flat = t.reshape(-1)
    return (tuple(t.shape), t.dtype, tuple(flat[:16].tolist()), tuple(flat[-16:].tolist()))


def _as_param(packed: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The packed rows as a parameter with as many dimensions as `weight`: (rows, 1, 1, bytes) for
    a convolution, since peft's LoRA layers read the kernel's rank from `weight.dim()`
    (diffusers' dequantizer keeps the leading dimensions, and forward reshapes to the logical shape)."""
    data = packed.reshape(packed.shape[0], *([1] * (weight.dim() - 2)), packed.shape[-1])
    return packed.__class__(data.to(weight.device), requires_grad=False, quant_type=packed.quant_type)


def pack_layers(model: nn.Module, packed: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]],
                dtype: torch.dtype) -> int:
    """Swap every plain Conv2d/Linear of `model` whose weight equals the dequantization (in
    `dtype`) of one of `packed` ({file key: GGUFParameter}, logical shapes in `shapes`) for its
    packed form; returns how many layers were packed. Layers without such an exact match are
    left as they are (dequantized), so the model computes the same values either way."""
    index: dict[tuple, list[str]] = {}
    for key, p in packed.items():
        index.setdefault(_fingerprint(_dequantize(p, shapes[key], dtype)), []).append(key)
    count = 0
    for module in list(model.modules()):
        cls = PACKED_CLASSES.get(type(module))
        weight = getattr(module, "weight", None)
        if cls is None or weight is None or not weight.is_floating_point() or weight.dtype != dtype:
            continue
        for key in index.get(_fingerprint(weight.data), ()):
            if torch.equal(_dequantize(packed[key], shapes[key], dtype), weight.data):
                module.__class__ = cls
                module.logical_shape = tuple(weight.shape)
                module.compute_dtype = dtype
                module.weight = _as_param(packed[key], weight)
                count += 1
                break
    return count
