"""Tiny Forge-style NF4 checkpoints, written by bitsandbytes itself.

Forge's `flux1-dev-bnb-nf4*.safetensors` is an all-in-one FLUX file whose transformer Linear weights
are bitsandbytes NF4 (`Params4bit` state dicts: the packed uint8 weight plus
`QuantState.as_dict(packed=True)` beside it), text encoders and VAE plain. v1 double-quantizes the
block scales (`compress_statistics=True`: `nested_absmax`, `nested_quant_map`), v2 keeps them in
float32. `write_nf4` makes the same from a tiny checkpoint with `bitsandbytes.functional.quantize_4bit`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

DENOISER_PREFIX = "model.diffusion_model."


def write_nf4(source: str | os.PathLike, path: str | os.PathLike, *, nested: bool = False,
              prefix: str = DENOISER_PREFIX) -> Path:
    """Every 2-D `.weight` under `prefix` quantized to NF4 (blocks of 64) as bitsandbytes stores
    it; every other tensor copied. `nested`: Forge v1's double-quantized scales."""
    import bitsandbytes as bnb  # optional: the nf4 extra (and the test extra) install it
    from safetensors.torch import load_file, save_file

    out: dict[str, torch.Tensor] = {}
    for key, t in load_file(str(source)).items():
        if key.startswith(prefix) and key.endswith(".weight") and t.ndim == 2:
            packed, state = bnb.functional.quantize_4bit(t, blocksize=64, quant_type="nf4",
                                                         compress_statistics=nested)
            out[key] = packed
            out.update({f"{key}.{name}": v for name, v in state.as_dict(packed=True).items()})
        else:
            out[key] = t
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    try:
        save_file(out, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target
