"""Scanning a models tree: detection per file, metadata summary, per-file errors, table."""

from __future__ import annotations

import hashlib
import json

import pytest

from helpers.formats_keys import flux, hf_clip, ldm_vae, sd15_checkpoint, write_header_only
from workbench.errors import WorkbenchError
from workbench.formats.scan import format_table, scan, summarize_metadata


@pytest.fixture(autouse=True)
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))


def tiny(shapes):
    """Real names, 2-element tensors: keeps the files (and hashing them) small."""
    return {k: (2,) for k in shapes}


def make_tree(root):
    sd = root / "models" / "Stable-diffusion"
    lora = root / "models" / "Lora"
    comfy = root / "ComfyUI" / "models"
    for d in (sd, lora, root / "models" / "VAE", comfy / "diffusion_models", comfy / "clip"):
        d.mkdir(parents=True)
    write_header_only(sd / "mine_v1.safetensors", tiny(sd15_checkpoint()),
                      metadata={"sd_merge_recipe": "{}", "modelspec.title": "Mine"})
    lora_keys = {}
    for i in range(3):
        m = f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k{i}"
        lora_keys.update({f"{m}.lora_down.weight": (8, 768), f"{m}.lora_up.weight": (320, 8),
                          f"{m}.alpha": ()})
    lora_keys["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"] \
        = (8, 768)
    tags = {"10_mystyle": {"mystyle": 40, "lighthouse": 12, "dusk": 3}, "5_extra": {"dusk": 20}}
    write_header_only(lora / "my-style.safetensors", lora_keys,
                      metadata={"ss_output_name": "my-style", "ss_base_model_version": "sd_v1",
                                "ss_tag_frequency": json.dumps(tags)})
    write_header_only(root / "models" / "VAE" / "vae-ft-mse.safetensors", tiny(ldm_vae("")))
    write_header_only(comfy / "diffusion_models" / "flux1-dev.safetensors", tiny(flux(prefix="")))
    write_header_only(comfy / "clip" / "clip_l.safetensors", tiny(hf_clip("")))
    (sd / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json here!}")
    (sd / "old.ckpt").write_bytes(b"PK not really")
    (sd / "notes.txt").write_text("not a model")
    (sd / "half.safetensors.1a2b3c4d.tmp").write_bytes(b"partial")


def test_scan_tree(tmp_path):
    make_tree(tmp_path)
    entries = scan(tmp_path, with_hash=True)
    by = {e.path: e for e in entries}
    assert sorted(by) == sorted([
        "ComfyUI/models/clip/clip_l.safetensors",
        "ComfyUI/models/diffusion_models/flux1-dev.safetensors",
        "models/Lora/my-style.safetensors", "models/Stable-diffusion/broken.safetensors",
        "models/Stable-diffusion/mine_v1.safetensors", "models/Stable-diffusion/old.ckpt",
        "models/VAE/vae-ft-mse.safetensors"])
    ck = by["models/Stable-diffusion/mine_v1.safetensors"]
    assert (ck.arch, ck.kind, ck.dtype) == ("sd15", "checkpoint", "F16")
    assert ck.metadata == {"title": "Mine", "merge_recipe": True}
    data = (tmp_path / ck.path).read_bytes()
    assert ck.short_hash == hashlib.sha256(data).hexdigest()[:10]
    lo = by["models/Lora/my-style.safetensors"]
    assert (lo.kind, lo.arch, lo.rank) == ("lora", "sd15", 8)
    assert lo.metadata["output_name"] == "my-style"
    assert lo.metadata["top_tags"][:3] == ["mystyle", "dusk", "lighthouse"]
    assert by["ComfyUI/models/diffusion_models/flux1-dev.safetensors"].variant == "dev"
    assert by["models/VAE/vae-ft-mse.safetensors"].kind == "vae"
    broken = by["models/Stable-diffusion/broken.safetensors"]
    assert broken.error and "not valid JSON" in broken.error and broken.arch is None
    pickle = by["models/Stable-diffusion/old.ckpt"]
    assert pickle.unsafe and pickle.error is None and pickle.short_hash is None
    table = format_table(entries)
    assert "ERROR:" in table and "pickle: convert with `workbench convert`" in table
    assert "rank 8" in table
    assert table.splitlines()[-1] == ("7 files, 1 with problems, 1 pickles not read "
                                      "(`workbench convert` makes a safetensors copy)")


def test_scan_without_hash_and_bad_root(tmp_path):
    make_tree(tmp_path)
    assert all(e.short_hash is None for e in scan(tmp_path, with_hash=False))
    with pytest.raises(WorkbenchError, match="not a folder"):
        scan(tmp_path / "nope")


def test_summarize_metadata_tolerates_bad_json():
    assert summarize_metadata({"ss_tag_frequency": "{broken"}) == {}
    assert summarize_metadata({"ss_base_model_version": "sdxl_base_v1-0"}) == \
        {"base_model": "sdxl_base_v1-0"}


def test_listing_first_then_hashes_fill_in(tmp_path):
    from workbench.formats.hash_fill import HashFiller
    from workbench.formats.scan import apply_hashes, hash_targets

    make_tree(tmp_path)
    (tmp_path / "models" / "Stable-diffusion" / "flux-Q8_0.gguf").write_bytes(b"GGUF" + bytes(28))
    entries = scan(tmp_path, with_hash=False)
    by = {e.path: e for e in entries}
    gguf = by["models/Stable-diffusion/flux-Q8_0.gguf"]
    # listed with its size; a 32-byte stand-in has no GGUF header, so its entry says so
    assert gguf.size == 32 and gguf.error and "flux-Q8_0.gguf" in gguf.error
    assert by["models/Stable-diffusion/old.ckpt"].notes[0].startswith(
        "pickle: convert with `workbench convert` old.ckpt")
    targets = hash_targets(entries, tmp_path)
    # readable safetensors only: not the broken one, the pickle or the GGUF file
    assert sorted(p.name for p in targets) == ["clip_l.safetensors", "flux1-dev.safetensors",
                                               "mine_v1.safetensors", "my-style.safetensors",
                                               "vae-ft-mse.safetensors"]
    assert apply_hashes(entries, tmp_path, {}) == 5
    filler = HashFiller()
    filler.add(targets)
    seen = []
    filler.run(on_bytes=seen.append)
    assert sum(seen) == sum(p.stat().st_size for p in targets)
    assert apply_hashes(entries, tmp_path, filler.hashes, filler.errors) == 0
    vae = tmp_path / "models" / "VAE" / "vae-ft-mse.safetensors"
    assert by["models/VAE/vae-ft-mse.safetensors"].short_hash == \
        hashlib.sha256(vae.read_bytes()).hexdigest()[:10]
    # the next listing finds every hash in the cache without reading a file
    again = scan(tmp_path, with_hash=False)
    assert apply_hashes(again, tmp_path, HashFiller().known(targets)) == 0
