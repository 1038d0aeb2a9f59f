"""Latent and text-encoder caches: hits, misses on a changed VAE/bucket/caption, and option conflicts."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.recipes.train import TrainRecipe
from workbench.train.buckets import buckets_for
from workbench.train.cache import (LatentCache, TextCache, cache_latents, cache_text, caching_plan,
                                   default_latent_cache, latent_batch, module_identity, pixels_for,
                                   refuse_conflicts, text_batch)
from workbench.train.dataset import load_examples

SAMPLE = Path(__file__).resolve().parents[1] / "datasets" / "sample-style"


@pytest.fixture(scope="module")
def tiny_vae(tiny_model):
    """The tiny SD1.5 checkpoint's real VAE (diffusers AutoencoderKL), as the loop would load it."""
    from workbench.pipeline.load import load_pipeline

    vae = load_pipeline(tiny_model("sd15"), "sd15").vae.eval()
    return vae


def vae_encoder(vae):
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
    return encode


@pytest.fixture(scope="module")
def examples():
    return load_examples(SAMPLE)[:5]  # 4 squares (128x128) and one 160x128


def counting(encode):
    calls = []

    def wrapped(x):
        calls.append(x.shape[0])
        return encode(x)
    return wrapped, calls


def test_latents_are_written_once_and_reused(tmp_path, tiny_vae, examples):
    cache = LatentCache(tmp_path, module_identity(tiny_vae, extra="fp32"))
    bucket = buckets_for(64, bucketing=True)[0]
    encode, calls = counting(vae_encoder(tiny_vae))
    assert cache_latents(examples, [bucket] * 5, cache, encode, batch_size=2).written == 5
    assert calls == [2, 2, 1]
    again, calls2 = counting(vae_encoder(tiny_vae))
    stats = cache_latents(examples, [bucket] * 5, cache, again)
    assert (stats.hits, stats.written, calls2) == (5, 0, [])
    lat, crops, originals = latent_batch(cache, examples[3:5], bucket)
    assert lat.shape == (2, 4, 8, 8) and lat.dtype == torch.float32
    assert originals == [(128, 128), (128, 160)]  # (height, width)
    assert crops == [(0, 0), (0, 8)]  # 160x128 -> 80x64, 8 columns cut on the left
    pixels = torch.stack([pixels_for(e, bucket)[0] for e in examples[3:5]])
    with torch.no_grad():
        direct = vae_encoder(tiny_vae)(pixels)
    assert torch.allclose(lat, direct, atol=1e-5)
    path = cache.path_for(examples[0].sha256, bucket)
    assert path.name == f"{examples[0].sha256}_64x64.safetensors" and cache.vae_id in str(path)


def test_changed_vae_or_bucket_misses(tmp_path, tiny_vae, examples):
    vae_id = module_identity(tiny_vae)
    cache = LatentCache(tmp_path, vae_id)
    cache_latents(examples[:2], [(64, 64)] * 2, cache, vae_encoder(tiny_vae))
    assert cache_latents(examples[:2], [(128, 128)] * 2, cache, vae_encoder(tiny_vae)).written == 2
    other = copy.deepcopy(tiny_vae)
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 0.5
    other_id = module_identity(other)
    assert other_id != vae_id and module_identity(tiny_vae) == vae_id
    assert module_identity(tiny_vae, extra="fp16") != vae_id
    other_cache = LatentCache(tmp_path, other_id)
    assert other_cache.load(examples[0].sha256, (64, 64)) is None
    assert cache_latents(examples[:2], [(64, 64)] * 2, other_cache, vae_encoder(other)).written == 2
    assert cache.load(examples[0].sha256, (64, 64)) is not None  # the first VAE's files stay


def test_damaged_or_foreign_cache_file_is_a_miss_and_gets_rewritten(tmp_path, examples):
    cache = LatentCache(tmp_path, "vae1")
    encode = lambda x: torch.nn.functional.avg_pool2d(x, 8)  # noqa: E731
    cache_latents(examples[:1], [(64, 64)], cache, encode)
    path = cache.path_for(examples[0].sha256, (64, 64))
    path.write_bytes(path.read_bytes()[:50])  # truncated by a crash or a full disk
    assert cache.load(examples[0].sha256, (64, 64)) is None
    assert cache_latents(examples[:1], [(64, 64)], cache, encode).written == 1
    assert cache.load(examples[0].sha256, (64, 64)).latents.shape == (3, 8, 8)
    # a file copied under another VAE's folder is not trusted
    foreign = LatentCache(tmp_path, "vae2")
    foreign.path_for(examples[0].sha256, (64, 64)).parent.mkdir(parents=True)
    foreign.path_for(examples[0].sha256, (64, 64)).write_bytes(path.read_bytes())
    assert foreign.load(examples[0].sha256, (64, 64)) is None
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temp files
    with pytest.raises(WorkbenchError, match=r"no cached latents for bucket 128x128"):
        latent_batch(cache, examples[:1], (128, 128))


def test_default_latent_cache_lives_under_workbench_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "wbc"))
    assert default_latent_cache("abc").path_for("ff" * 32, (64, 64)).is_relative_to(
        tmp_path / "wbc" / "latents" / "abc")


def test_text_cache_keys_on_caption_and_encoder(tmp_path):
    def encode(captions):
        n = torch.tensor([float(len(c)) for c in captions])
        return {"hidden": n[:, None, None].expand(-1, 3, 2).clone(), "pooled": n[:, None] * 2}

    seen: list[list[str]] = []

    def recording(captions):
        seen.append(list(captions))
        return encode(captions)

    cache = TextCache(tmp_path, "te-1")
    caps = ["s, a cat", "s, a dog", "s, a cat", ""]
    assert cache_text(caps, cache, recording, batch_size=2).written == 3
    assert seen == [["s, a cat", "s, a dog"], [""]]
    assert cache_text(caps, cache, recording).hits == 3 and len(seen) == 2
    out = text_batch(cache, ["s, a dog", ""])
    assert out["hidden"].shape == (2, 3, 2) and out["pooled"].tolist() == [[16.0], [0.0]]
    assert TextCache(tmp_path, "te-2").load("s, a cat") is None
    assert cache.load("s, a bird") is None
    with pytest.raises(WorkbenchError, match=r"no cached text-encoder output for caption 's, a bird'"):
        text_batch(cache, ["s, a bird"])


def _recipe(**fields):
    base = {"name": "x", "base": "b.safetensors", "dataset": "d", "output": {"dir": "o"}}
    return TrainRecipe.model_validate({**base, **fields})


def test_caching_plan_from_a_real_recipe():
    plan = caching_plan(_recipe())
    assert (plan.latents, plan.text, plan.why_no_text) == (True, True, "")
    shuffled = caching_plan(_recipe(shuffle_caption=True))
    assert not shuffled.text and "shuffle_caption" in shuffled.why_no_text
    te = caching_plan(_recipe(network={"train_text_encoder": True}))
    assert not te.text and "text encoder is trained" in te.why_no_text
    assert caching_plan(_recipe(caption_dropout_rate=0.1)).text  # "" is cached as well
    assert not caching_plan(_recipe(cache_latents=False)).latents


def test_conflicting_cache_options_are_refused_by_name():
    with pytest.raises(WorkbenchError, match="cache_text_encoder_outputs: true conflicts with "
                                             "shuffle_caption: true"):
        refuse_conflicts({"cache_text_encoder_outputs": True, "shuffle_caption": True})
    with pytest.raises(WorkbenchError, match="network.train_text_encoder"):
        refuse_conflicts(SimpleNamespace(cache_text_encoder_outputs=True, shuffle_caption=False,
                                         network=SimpleNamespace(train_text_encoder=True)))
    with pytest.raises(WorkbenchError, match="cache_latents: true conflicts with flip_aug") as err:
        refuse_conflicts({"cache_latents": True, "flip_aug": True, "random_crop": True})
    assert "random_crop" in str(err.value)
    refuse_conflicts({"cache_latents": True, "shuffle_caption": True})  # latents don't care
    refuse_conflicts({"cache_text_encoder_outputs": False, "shuffle_caption": True})
