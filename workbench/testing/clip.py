"""A tiny open_clip model in the same on-disk form as a real one, for offline scoring tests.

open_clip loads a self-describing folder with `create_model_and_transforms("local-dir:DIR")`:
`open_clip_config.json` ({"model_cfg", "preprocess_cfg"}) plus `open_clip_model.safetensors`.
The tiny model keeps the real text side's vocabulary (49408 BPE tokens, 77 positions), so open_clip's
own tokenizer (its bundled BPE vocabulary) works unchanged; widths are tiny.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_MODEL_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
PREPROCESS_CFG = {"mean": [0.48145466, 0.4578275, 0.40821073],
                  "std": [0.26862954, 0.26130258, 0.27577711],
                  "interpolation": "bicubic", "resize_mode": "shortest"}


def build(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random open_clip model folder; same seed -> same weights."""
    import open_clip
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_MODEL_CFG)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))
    (out / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": TINY_MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}, indent=2))
    return out
