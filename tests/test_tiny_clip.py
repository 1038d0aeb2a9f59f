"""The tiny open_clip model loads through open_clip's own local-dir loader, offline, deterministically."""

import open_clip
import torch
from PIL import Image

from workbench.testing import clip as tiny_clip


def test_tiny_open_clip_loads_and_encodes(tmp_path):
    d = tiny_clip.build(tmp_path / "clip", seed=3)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{d}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{d}")
    tokens = tokenizer(["a lighthouse at dusk"])
    assert tokens.shape == (1, 77) and tokens[0, 0].item() == 49406  # open_clip's BPE start token
    with torch.no_grad():
        img = model.encode_image(preprocess(Image.new("RGB", (40, 40), "red"))[None])
        txt = model.encode_text(tokens)
    assert img.shape == txt.shape == (1, tiny_clip.TINY_MODEL_CFG["embed_dim"])
    assert torch.isfinite(img).all() and img.abs().sum() > 0


def test_tiny_open_clip_is_deterministic(tmp_path):
    a = tiny_clip.build(tmp_path / "a", seed=1) / "open_clip_model.safetensors"
    b = tiny_clip.build(tmp_path / "b", seed=1) / "open_clip_model.safetensors"
    c = tiny_clip.build(tmp_path / "c", seed=2) / "open_clip_model.safetensors"
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
