"""Full-size checkpoints with the real key set and shapes and random weights, for benchmarks.

The layout comes from the bundled real configs (workbench/formats/data/<arch>/): the models are
built on the meta device (no memory), renamed to the single-file layout with the same key maps the
tiny builders use, and the file is streamed tensor by tensor through the atomic writer, so writing
a 7 GB SDXL file needs a few hundred MB of RAM.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from workbench.formats.writer import SafetensorsWriter, st_dtype_of
from workbench.testing import ldm_keys

DATA = Path(__file__).resolve().parent.parent / "formats" / "data"
CHUNK = 16 * 1024 * 1024  # elements generated at a time


def _config(arch: str, component: str) -> dict:
    cfg = json.loads((DATA / arch / component / "config.json").read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def real_layout(arch: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """key -> (dtype as stored in an fp16 release file, shape) for a real SD1.5 or SDXL file."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if arch not in ("sd15", "sdxl"):
        raise ValueError(f"full-size layouts exist for sd15 and sdxl, not {arch!r}")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**_config(arch, "unet"))
        vae = AutoencoderKL(**_config(arch, "vae"))
        te = CLIPTextModel(CLIPTextConfig(**_config(arch, "text_encoder")))
        te2 = (CLIPTextModelWithProjection(CLIPTextConfig(**_config(arch, "text_encoder_2")))
               if arch == "sdxl" else None)
    sd = {}
    sd.update(ldm_keys.unet_to_original(unet.state_dict(), unet.config.layers_per_block))
    prefix = ldm_keys.SD15_CLIP_L_PREFIX if arch == "sd15" else ldm_keys.SDXL_CLIP_L_PREFIX
    sd.update(ldm_keys.clip_l_to_original(te.state_dict(), prefix, te.config.max_position_embeddings))
    if te2 is not None:
        sd.update(ldm_keys.open_clip_to_original(te2.state_dict()))
    sd.update(ldm_keys.vae_to_original(vae.state_dict()))
    return {k: (torch.float16 if v.is_floating_point() else v.dtype, tuple(v.shape))
            for k, v in sorted(sd.items())}


def write_random(path: str | Path, arch: str, seed: int = 0, overwrite: bool = False) -> Path:
    """A full-size fp16 checkpoint of `arch` with N(0, 0.02²) weights (integer tensors: arange)."""
    layout = real_layout(arch)
    gen = torch.Generator().manual_seed(seed)
    plan = {k: (st_dtype_of(dt), shape) for k, (dt, shape) in layout.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with SafetensorsWriter(path, plan, {"format": "pt"}, overwrite=overwrite) as writer:
        for key, (dtype, shape) in layout.items():
            numel = math.prod(shape)
            if not dtype.is_floating_point:
                tensor = torch.arange(shape[-1], dtype=dtype).expand(shape).contiguous()
            else:
                flat = torch.empty(numel, dtype=dtype)
                for start in range(0, numel, CHUNK):
                    n = min(CHUNK, numel - start)
                    flat[start:start + n] = torch.randn(n, generator=gen).mul_(0.02)
                tensor = flat.view(shape)
            writer.write(key, tensor)
    return Path(path)
