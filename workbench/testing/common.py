"""Shared helpers for the tiny test models: seeded weights and writing the single file.

Default initialisations leave many tensors constant (norm weights 1, biases 0), so two layers mixed
up by a wrong key map could not be told apart. `fill_seeded_` gives every tensor its own seeded
random values at a scale that keeps activations finite, which makes round-trip checks meaningful.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file


def fill_seeded_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter with values drawn from a generator seeded with `seed`.

    Matrices and kernels get N(0, 1/fan_in); 1-D weights (norm scales) 1 + N(0, 0.1); biases and
    other 1-D tensors N(0, 0.02). Parameters are visited in name order so the result depends only
    on the seed and the architecture.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if param.ndim >= 2:
                fan_in = param[0].numel()
                value = noise / fan_in ** 0.5
            elif name.endswith("weight"):
                value = 1.0 + 0.1 * noise
            else:
                value = 0.02 * noise
            param.copy_(value.to(param.dtype))
    return module


def cast_floats(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Cast floating tensors to `dtype`; integer tensors (CLIP position_ids) keep their dtype."""
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}


def write_checkpoint(path: str | Path, tensors: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Write the tensors as one safetensors file (parents created) and return its path."""
    # TODO: switch to workbench.formats.safetensors_io's atomic writer once it exists.
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(dict(tensors), str(out), metadata=dict(metadata) if metadata else None)
    return out
