"""A tiny TAESD (AutoencoderTiny) file with the real tensor names, for the CPU few-step path tests.

`naming="diffusers"` writes `decoder.layers.N...` / `encoder.layers.N...` as the diffusers port
does; `naming="original"` writes a decoder-only file with the sequential names of the original
release ("1.weight", "3.conv.0.weight", ...): the decoder Sequential starts with a clamp and a
conv, so the original indices are the diffusers indices shifted by the leading non-parametric
modules; only the order matters to the loader.
"""

from __future__ import annotations

from pathlib import Path

import torch
from workbench.formats.writer import save_file_atomic


def build_tiny_taesd(path: str | Path, width: int = 8, seed: int = 0,
                     naming: str = "diffusers") -> Path:
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    model = AutoencoderTiny(encoder_block_out_channels=(width,) * 4,
                            decoder_block_out_channels=(width,) * 4)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if naming == "original":
        state = {k[len("decoder.layers."):]: v for k, v in state.items()
                 if k.startswith("decoder.layers.")}
        # the original Decoder has Clamp() first, so every index is one higher
        state = {_shift(k, 1): v for k, v in state.items()}
    elif naming != "diffusers":
        raise ValueError(f"naming: expected 'diffusers' or 'original' (got {naming!r})")
    return save_file_atomic(state, Path(path), overwrite=True)


def _shift(key: str, by: int) -> str:
    head, _, rest = key.partition(".")
    return f"{int(head) + by}.{rest}"
