"""Aspect-ratio buckets: train on whole pictures instead of square center crops.

The bucket set follows kohya's rule (sd-scripts `make_bucket_resolutions`): every (w, h) whose sides are
multiples of `step`, lie in [min_reso, max_reso], and whose area is at most the training resolution's
area; each width gets the tallest height that fits, and every bucket's transpose is added too. An image
goes to the bucket with the nearest aspect ratio, is scaled to cover it and center-cropped, so at most a
thin strip is lost. SDXL also wants the original size and the crop's top-left corner (micro-conditioning),
so `resize_and_crop` returns them.

Batches only hold images of one bucket (a batch is one tensor). `BucketBatchSampler` makes the order a
pure function of (seed, epoch), so a resumed run that restores its position sees exactly the same batches.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from typing import Sequence

from PIL import Image

from workbench.errors import WorkbenchError

Bucket = tuple[int, int]  # (width, height) in pixels


def as_size(resolution: int | Sequence[int]) -> Bucket:
    """512 -> (512, 512); [768, 512] -> (768, 512): the recipe allows both spellings."""
    if isinstance(resolution, int):
        return resolution, resolution
    w, h = resolution
    return int(w), int(h)


def effective_bucket_range(resolution: Bucket, min_reso: int, max_reso: int) -> tuple[int, int]:
    """(min, max) widened to include the resolution itself.

    kohya refuses a min_bucket_reso above the resolution; we lower it instead, so a tiny demo run at
    resolution 64 works with the recipe defaults (min 256, max 1024) and simply has one 64x64 bucket.
    """
    return min(min_reso, min(resolution)), max(max_reso, max(resolution))


def make_buckets(resolution: Bucket, min_reso: int = 256, max_reso: int = 1024,
                 step: int = 64) -> list[Bucket]:
    """All buckets for `resolution` (w, h), sorted by aspect ratio (tall first)."""
    if step <= 0 or resolution[0] < step or resolution[1] < step:
        raise WorkbenchError(f"resolution {resolution[0]}x{resolution[1]}: each side must be at "
                             f"least the bucket step ({step} px)")
    if min_reso > max_reso:
        raise WorkbenchError(f"min_bucket_reso ({min_reso}) is larger than max_bucket_reso "
                             f"({max_reso})")
    lo, hi = effective_bucket_range(resolution, min_reso, max_reso)
    area = resolution[0] * resolution[1]
    side = math.isqrt(area) // step * step
    found: set[Bucket] = {(side, side)}
    width = max(step, math.ceil(lo / step) * step)
    while width <= hi:
        height = min(hi // step * step, area // width // step * step)
        if height >= lo and height >= step:
            found.add((width, height))
            found.add((height, width))
        width += step
    found = {b for b in found if b[0] * b[1] <= area}
    return sorted(found, key=lambda b: (b[0] / b[1], b[0]))


def buckets_for(resolution: int | Sequence[int], *, bucketing: bool, min_reso: int = 256,
                max_reso: int = 1024, step: int = 64) -> list[Bucket]:
    """The recipe's buckets: kohya's set with bucketing, else just the resolution (square crops)."""
    size = as_size(resolution)
    if not bucketing:
        w, h = size[0] // step * step, size[1] // step * step
        if w < step or h < step:
            raise WorkbenchError(f"resolution {size[0]}x{size[1]}: each side must be at least "
                                 f"{step} px")
        return [(w, h)]
    return make_buckets(size, min_reso, max_reso, step)


def assign_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> int:
    """Index of the bucket with the nearest aspect ratio (log ratio: 2:1 and 1:2 are equally far)."""
    if not buckets:
        raise ValueError("no buckets")
    target = math.log(width / height)
    return min(range(len(buckets)),
               key=lambda i: (abs(math.log(buckets[i][0] / buckets[i][1]) - target),
                              -buckets[i][0] * buckets[i][1], i))


def upscale_factor(width: int, height: int, bucket: Bucket) -> float:
    """How much an image is enlarged to cover `bucket` (1.0 or less: no enlargement)."""
    return max(bucket[0] / width, bucket[1] / height)


def resize_and_crop(image: Image.Image, bucket: Bucket) -> tuple[Image.Image, tuple[int, int],
                                                                 tuple[int, int]]:
    """(image of exactly `bucket` size, crop_top_left (top, left), original_size (height, width)).

    Scaled so the image covers the bucket, then center-cropped: deterministic, which is what lets
    latents be cached per (image, bucket).
    """
    w, h = image.size
    bw, bh = bucket
    scale = upscale_factor(w, h, bucket)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if (nw, nh) != (w, h):
        method = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
        image = image.resize((nw, nh), method)
    left, top = (nw - bw) // 2, (nh - bh) // 2
    if (nw, nh) != (bw, bh):
        image = image.crop((left, top, left + bw, top + bh))
    return image, (top, left), (h, w)


def image_to_tensor(image: Image.Image):
    """float32 tensor [3, H, W] in [-1, 1], the range Stable Diffusion VAEs expect."""
    import numpy as np
    import torch

    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def bucket_counts(bucket_ids: Sequence[int], buckets: Sequence[Bucket]) -> dict[Bucket, int]:
    """Images per bucket (not counting repeats), for the report and `ss_bucket_info`."""
    counts: dict[Bucket, int] = {}
    for i in bucket_ids:
        counts[buckets[i]] = counts.get(buckets[i], 0) + 1
    return dict(sorted(counts.items()))


@dataclass
class BucketBatchSampler:
    """Batches of example indices that share a bucket, in an order fixed by (seed, epoch).

    One epoch shows every example `repeats` times (kohya's meaning). Use `next_batch()` from the training
    loop itself; a prefetching DataLoader sampler would advance the position before a batch is trained,
    and `state_dict()` must describe the next batch the loop will train.
    """

    bucket_ids: Sequence[int]
    repeats: Sequence[int]
    batch_size: int
    seed: int
    epoch: int = 0
    position: int = 0  # index of the next batch within `epoch`

    def __post_init__(self) -> None:
        if len(self.bucket_ids) != len(self.repeats):
            raise ValueError("bucket_ids and repeats differ in length")
        if self.batch_size < 1:
            raise WorkbenchError(f"batch_size must be at least 1 (got {self.batch_size})")
        if not self.bucket_ids or sum(self.repeats) == 0:
            raise WorkbenchError("the dataset has no examples to make batches from")
        self.bucket_ids, self.repeats = list(self.bucket_ids), list(self.repeats)
        self._cached: tuple[int, list[list[int]]] | None = None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Every batch of `epoch`: shuffled within buckets, cut into batches, batches shuffled."""
        if self._cached and self._cached[0] == epoch:
            return self._cached[1]
        rng = random.Random(self.seed * 1_000_003 + epoch)
        by_bucket: dict[int, list[int]] = {}
        for index, (bucket, reps) in enumerate(zip(self.bucket_ids, self.repeats)):
            by_bucket.setdefault(bucket, []).extend([index] * reps)
        batches: list[list[int]] = []
        for bucket in sorted(by_bucket):
            items = by_bucket[bucket]
            rng.shuffle(items)
            batches += [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        rng.shuffle(batches)
        self._cached = (epoch, batches)
        return batches

    @property
    def batches_per_epoch(self) -> int:
        return len(self.epoch_batches(self.epoch))

    def next_batch(self) -> list[int]:
        """The next batch; moves to the next epoch after the last one."""
        batches = self.epoch_batches(self.epoch)
        batch = batches[self.position]
        self.position += 1
        if self.position >= len(batches):
            self.epoch, self.position = self.epoch + 1, 0
        return list(batch)

    def fingerprint(self) -> str:
        """Identifies the inputs that decide the batches, to refuse resuming onto a changed dataset."""
        blob = json.dumps([self.bucket_ids, self.repeats, self.batch_size, self.seed])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def state_dict(self) -> dict:
        return {"version": 1, "epoch": self.epoch, "position": self.position, "seed": self.seed,
                "batch_size": self.batch_size, "examples": len(self.bucket_ids),
                "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Continue where a saved run stopped; WorkbenchError if that run saw other batches."""
        if state.get("fingerprint") != self.fingerprint():
            diffs = [f"{k} {state.get(k)} -> {v}" for k, v in
                     (("seed", self.seed), ("batch_size", self.batch_size),
                      ("examples", len(self.bucket_ids))) if state.get(k) != v]
            why = "; ".join(diffs) or "images, repeats or their buckets changed"
            raise WorkbenchError(f"cannot resume the batch order: the dataset or settings changed "
                                 f"since the state was saved ({why}); resume with the same dataset "
                                 "and settings, or start a new run")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < len(self.epoch_batches(epoch)):
            raise WorkbenchError(f"saved sampler position {epoch}:{position} is out of range")
        self.epoch, self.position = epoch, position
