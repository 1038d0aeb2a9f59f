"""Latent and text-encoder output caches on disk, and the option conflicts they create.

Encoding every image through the VAE each step costs time and VRAM on a 12 GB card; encoding it once and
keeping the latents on disk lets later runs (other rank, other LR) skip the VAE entirely. A cached file is
only valid for the same pixels, the same bucket (size and crop) and the same VAE, so the file name is
`<vae id>/<image sha256>_<W>x<H>.safetensors`: a changed VAE or bucket simply misses. The same holds for
text-encoder outputs, keyed by the exact caption text and the text encoders' identity.

The encode steps are plain callables (`encode(pixels) -> latents`, `encode(captions) -> {name: tensor}`),
so the training loop decides scaling/shift and dtype, and tests can pass the tiny models' real VAE or a
simple function. Whatever changes the encoder's output must be part of the identity string.

Caching fixes something that would otherwise vary per step, hence `refuse_conflicts`: cached text
outputs cannot see shuffled tags or a text encoder being trained, cached latents cannot see random crops
or flips. Caption dropout is compatible: the empty caption is cached too (`captions.fixed_captions`).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from workbench.errors import WorkbenchError
from workbench.train.buckets import Bucket, image_to_tensor, resize_and_crop
from workbench.formats.hashes import cache_root
from workbench.train.dataset import Example, open_image
from workbench.formats.writer import atomic_write_bytes

CACHE_FORMAT = "1"  # bump when the cached layout or the preprocessing changes
SAMPLE_ELEMENTS = 1 << 20  # per tensor: larger ones are hashed on a strided sample

LatentEncoder = Callable[[torch.Tensor], torch.Tensor]
TextEncoder = Callable[[list[str]], Mapping[str, torch.Tensor]]
Progress = Callable[[int, int], None]


def module_identity(module: torch.nn.Module | Mapping[str, torch.Tensor], extra: str = "") -> str:
    """16 hex characters naming a model's weights, for cache keys.

    Names, shapes, dtypes and values are hashed; tensors over ~1M elements only on an evenly strided
    sample (a different fine-tune changes every weight, and T5-XXL would take minutes to hash in full).
    `extra` carries what else shapes the output (encode dtype, scaling factor, clip skip...).
    """
    state = module.state_dict() if isinstance(module, torch.nn.Module) else module
    h = hashlib.sha256(f"workbench-cache-{CACHE_FORMAT}\0{extra}\0".encode())
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
        if t.device.type == "meta" or t.numel() == 0:
            continue
        flat = t.reshape(-1)
        if flat.numel() > SAMPLE_ELEMENTS:
            flat = flat[:: flat.numel() // SAMPLE_ELEMENTS + 1]
        h.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class CacheStats:
    """How a caching pass went: `hits` were already on disk, `written` were encoded now."""

    hits: int
    written: int


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """Tensors and metadata of a cache file, or None when absent or damaged (then it is rebuilt)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    try:
        n = struct.unpack("<Q", data[:8])[0]
        meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
        return st_load(data), meta
    except (SafetensorError, ValueError, struct.error, RuntimeError, AttributeError):
        return None


def _write(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    """Atomic write (temp file + rename): an interrupted run never leaves a half cache file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=meta)
    return atomic_write_bytes(path, data, overwrite=True)


@dataclass(frozen=True)
class CachedLatent:
    latents: torch.Tensor  # [C, h, w] float32
    crop_top_left: tuple[int, int]  # (top, left) in the resized image, for SDXL conditioning
    original_size: tuple[int, int]  # (height, width) of the source image


@dataclass(frozen=True)
class LatentCache:
    """VAE latents per (image content, bucket) under `root/<vae_id>/`."""

    root: Path
    vae_id: str

    def path_for(self, sha256: str, bucket: Bucket) -> Path:
        return (Path(self.root) / self.vae_id / sha256[:2] /
                f"{sha256}_{bucket[0]}x{bucket[1]}.safetensors")

    def load(self, sha256: str, bucket: Bucket) -> CachedLatent | None:
        """The cached latents, or None for a miss (absent, damaged, or written for other inputs)."""
        got = _read(self.path_for(sha256, bucket))
        if got is None:
            return None
        tensors, meta = got
        expect = {"format": f"workbench-latents-{CACHE_FORMAT}", "vae_id": self.vae_id,
                  "sha256": sha256, "bucket": f"{bucket[0]}x{bucket[1]}"}
        if any(meta.get(k) != v for k, v in expect.items()) or "latents" not in tensors:
            return None
        top, left = (int(x) for x in meta["crop_top_left"].split(","))
        oh, ow = (int(x) for x in meta["original_size"].split(","))
        return CachedLatent(tensors["latents"], (top, left), (oh, ow))

    def save(self, sha256: str, bucket: Bucket, latents: torch.Tensor,
             crop_top_left: tuple[int, int], original_size: tuple[int, int]) -> Path:
        meta = {"format": f"workbench-latents-{CACHE_FORMAT}", "vae_id": self.vae_id,
                "sha256": sha256, "bucket": f"{bucket[0]}x{bucket[1]}",
                "crop_top_left": f"{crop_top_left[0]},{crop_top_left[1]}",
                "original_size": f"{original_size[0]},{original_size[1]}"}
        return _write(self.path_for(sha256, bucket), {"latents": latents.float()}, meta)


def default_latent_cache(vae_id: str, root: Path | None = None) -> LatentCache:
    """`$WORKBENCH_CACHE/latents/<vae_id>/`: shared by every run that uses the same VAE."""
    return LatentCache((root or cache_root()) / "latents", vae_id)


def pixels_for(example: Example, bucket: Bucket) -> tuple[torch.Tensor, tuple[int, int],
                                                          tuple[int, int]]:
    """([3, H, W] in [-1, 1], crop_top_left, original_size): what the VAE sees for this example."""
    image, crop, original = resize_and_crop(open_image(example), bucket)
    return image_to_tensor(image), crop, original


def cache_latents(examples: Sequence[Example], buckets: Sequence[Bucket], cache: LatentCache,
                  encode: LatentEncoder, *, batch_size: int = 4,
                  progress: Progress | None = None) -> CacheStats:
    """Encode every (example, bucket) not yet on disk, in same-bucket batches; `buckets[i]` is
    example i's bucket."""
    todo: dict[Bucket, list[Example]] = {}
    seen: set[tuple[str, Bucket]] = set()
    hits = 0
    for e, b in zip(examples, buckets, strict=True):
        if (e.sha256, b) in seen:
            continue
        seen.add((e.sha256, b))
        if cache.load(e.sha256, b) is not None:
            hits += 1
        else:
            todo.setdefault(b, []).append(e)
    total, written = sum(len(v) for v in todo.values()), 0
    for bucket, items in todo.items():
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            prepared = [pixels_for(e, bucket) for e in chunk]
            with torch.no_grad():
                latents = encode(torch.stack([p[0] for p in prepared]))
            if latents.shape[0] != len(chunk):
                raise ValueError(f"encode returned {latents.shape[0]} latents for {len(chunk)} images")
            for e, (_, crop, original), lat in zip(chunk, prepared, latents):
                cache.save(e.sha256, bucket, lat, crop, original)
            written += len(chunk)
            if progress:
                progress(written, total)
    return CacheStats(hits, written)


def latent_batch(cache: LatentCache, examples: Sequence[Example], bucket: Bucket
                 ) -> tuple[torch.Tensor, list[tuple[int, int]], list[tuple[int, int]]]:
    """(latents [B, C, h, w], crops, original sizes) for one batch; WorkbenchError on a miss."""
    got = []
    for e in examples:
        c = cache.load(e.sha256, bucket)
        if c is None:
            raise WorkbenchError(f"{e.image_path}: no cached latents for bucket {bucket[0]}x"
                                 f"{bucket[1]} in {cache.path_for(e.sha256, bucket).parent}; "
                                 "run the caching pass first")
        got.append(c)
    return (torch.stack([c.latents for c in got]), [c.crop_top_left for c in got],
            [c.original_size for c in got])


@dataclass(frozen=True)
class TextCache:
    """Text-encoder outputs per exact caption text under `root/<te_id>/`."""

    root: Path
    te_id: str

    def key(self, caption: str) -> str:
        return hashlib.sha256(f"{self.te_id}\0{caption}".encode()).hexdigest()

    def path_for(self, caption: str) -> Path:
        k = self.key(caption)
        return Path(self.root) / self.te_id / k[:2] / f"{k}.safetensors"

    def load(self, caption: str) -> dict[str, torch.Tensor] | None:
        got = _read(self.path_for(caption))
        if got is None:
            return None
        tensors, meta = got
        if meta.get("format") != f"workbench-text-{CACHE_FORMAT}" or \
                meta.get("te_id") != self.te_id or meta.get("caption") != caption:
            return None
        return tensors

    def save(self, caption: str, tensors: Mapping[str, torch.Tensor]) -> Path:
        meta = {"format": f"workbench-text-{CACHE_FORMAT}", "te_id": self.te_id,
                "caption": caption}
        return _write(self.path_for(caption), dict(tensors), meta)


def default_text_cache(te_id: str, root: Path | None = None) -> TextCache:
    """`$WORKBENCH_CACHE/text/<te_id>/`."""
    return TextCache((root or cache_root()) / "text", te_id)


def cache_text(captions: Iterable[str], cache: TextCache, encode: TextEncoder, *,
               batch_size: int = 8, progress: Progress | None = None) -> CacheStats:
    """Encode each distinct caption not yet on disk; `encode` returns tensors with a batch dim."""
    unique = list(dict.fromkeys(captions))
    todo = [c for c in unique if cache.load(c) is None]
    for i in range(0, len(todo), batch_size):
        chunk = todo[i:i + batch_size]
        with torch.no_grad():
            out = encode(chunk)
        for n, caption in enumerate(chunk):
            cache.save(caption, {k: v[n] for k, v in out.items()})
        if progress:
            progress(min(i + batch_size, len(todo)), len(todo))
    return CacheStats(len(unique) - len(todo), len(todo))


def text_batch(cache: TextCache, captions: Sequence[str]) -> dict[str, torch.Tensor]:
    """Stacked cached outputs for a batch of final captions; WorkbenchError on a miss."""
    rows = []
    for c in captions:
        got = cache.load(c)
        if got is None:
            raise WorkbenchError(f"no cached text-encoder output for caption {c!r} in "
                                 f"{cache.path_for(c).parent}; run the caching pass first")
        rows.append(got)
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]} if rows else {}


def _option(options: Any, name: str, default: Any = None) -> Any:
    """Read a field from a recipe, a nested `network` spec, or a plain mapping."""
    if isinstance(options, Mapping):
        if name in options:
            return options[name]
        net = options.get("network")
    else:
        if hasattr(options, name):
            return getattr(options, name)
        net = getattr(options, "network", None)
    if net is not None:
        return net.get(name, default) if isinstance(net, Mapping) else getattr(net, name, default)
    return default


@dataclass(frozen=True)
class CachingPlan:
    latents: bool
    text: bool
    why_no_text: str  # "" when text outputs are cached


def caching_plan(options: Any) -> CachingPlan:
    """What to cache for a recipe-like `options`, after `refuse_conflicts`.

    `cache_text_encoder_outputs` may be True, False or absent/None (= automatic: cache whenever it is
    valid, i.e. captions are not shuffled and no text encoder is trained).
    """
    refuse_conflicts(options)
    asked = _option(options, "cache_text_encoder_outputs")
    reason = ""
    if _option(options, "train_text_encoder", False):
        reason = "the text encoder is trained"
    elif _option(options, "shuffle_caption", False):
        reason = "captions are shuffled (shuffle_caption)"
    elif asked is False:
        reason = "cache_text_encoder_outputs is false"
    return CachingPlan(bool(_option(options, "cache_latents", False)), not reason, reason)


def refuse_conflicts(options: Any) -> None:
    """WorkbenchError naming both fields when a cache would silently undo another option."""
    problems = []
    if _option(options, "cache_text_encoder_outputs") is True:
        if _option(options, "shuffle_caption", False):
            problems.append("cache_text_encoder_outputs: true conflicts with shuffle_caption: true "
                            "(text-encoder outputs are computed once per caption, so the shuffled "
                            "tag order would never reach the model); turn one of them off")
        if _option(options, "train_text_encoder", False):
            problems.append("cache_text_encoder_outputs: true conflicts with "
                            "network.train_text_encoder: true (a text encoder that is being trained "
                            "changes its outputs every step); turn one of them off")
    if _option(options, "cache_latents", False):
        for aug in ("random_crop", "flip_aug", "color_aug"):
            if _option(options, aug, False):
                problems.append(f"cache_latents: true conflicts with {aug}: true (cached latents "
                                "are encoded once, so the augmentation would never happen); turn one "
                                "of them off")
    if problems:
        raise WorkbenchError("train recipe: caching options conflict:\n" +
                             "\n".join(f"  {p}" for p in problems))
