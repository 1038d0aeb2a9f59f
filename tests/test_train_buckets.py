"""Aspect buckets: kohya's bucket set, nearest-aspect assignment, crops, and a resumable sampler."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from PIL import Image

from workbench.errors import WorkbenchError
from workbench.train.buckets import (BucketBatchSampler, assign_bucket, buckets_for, image_to_tensor,
                                     make_buckets, resize_and_crop)


def test_kohya_bucket_set_at_512():
    buckets = make_buckets((512, 512), 256, 1024)
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert 256 <= w <= 1024 and 256 <= h <= 1024
        assert w * h <= 512 * 512
        assert (h, w) in buckets  # portrait and landscape alike
    for b in [(512, 512), (448, 576), (576, 448), (384, 640), (320, 768), (256, 1024)]:
        assert b in buckets
    assert len(buckets) == len(set(buckets)) == 17


def test_bucket_range_widens_to_the_resolution_and_bad_settings_are_refused():
    assert make_buckets((64, 64), 256, 1024) == [(64, 64)]  # the demo recipe's resolution 64
    assert buckets_for(128, bucketing=True) == [(128, 128)]
    assert buckets_for([768, 512], bucketing=False) == [(768, 512)]
    wide = make_buckets((768, 512), 256, 1024)
    assert all(w * h <= 768 * 512 for w, h in wide) and (768, 512) in wide
    with pytest.raises(WorkbenchError, match="min_bucket_reso"):
        make_buckets((512, 512), 1024, 512)
    with pytest.raises(WorkbenchError, match="at least the bucket step"):
        make_buckets((32, 32), 16, 64)


def test_assign_bucket_picks_the_nearest_aspect_ratio():
    buckets = make_buckets((512, 512), 256, 1024)
    assert buckets[assign_bucket(160, 128, buckets)] == (576, 448)
    assert buckets[assign_bucket(128, 160, buckets)] == (448, 576)
    assert buckets[assign_bucket(1000, 1000, buckets)] == (512, 512)
    assert buckets[assign_bucket(4000, 100, buckets)] == (1024, 256)  # extreme: the widest one
    assert buckets[assign_bucket(768, 256, buckets)] == (832, 256)


def test_resize_and_crop_covers_the_bucket_and_reports_sdxl_conditioning():
    img = Image.new("RGB", (160, 128), (0, 0, 0))
    out, crop, original = resize_and_crop(img, (576, 448))
    assert out.size == (576, 448)
    assert original == (128, 160)  # (height, width)
    assert crop == ((461 - 448) // 2, 0)  # scaled 3.6x to 576x461, center crop of 13 rows
    down, crop2, _ = resize_and_crop(Image.new("RGB", (1000, 500)), (512, 256))
    assert down.size == (512, 256) and crop2 == (0, 0)
    t = image_to_tensor(Image.new("RGB", (8, 4), (255, 0, 128)))
    assert t.shape == (3, 4, 8) and t.dtype == torch.float32
    assert torch.allclose(t[:, 0, 0], torch.tensor([1.0, -1.0, 128 / 127.5 - 1]), atol=1e-6)


def _sampler(seed=3, batch=2):
    # 7 examples in 3 buckets, mixed repeats
    return BucketBatchSampler([0, 0, 0, 1, 1, 2, 0], [2, 1, 1, 3, 1, 1, 2], batch, seed)


def test_sampler_epoch_covers_every_repeat_once_in_single_bucket_batches():
    s = _sampler()
    ids = s.bucket_ids
    epoch = s.epoch_batches(0)
    assert Counter(i for b in epoch for i in b) == Counter(
        {0: 2, 1: 1, 2: 1, 3: 3, 4: 1, 5: 1, 6: 2})
    assert all(len({ids[i] for i in b}) == 1 for b in epoch)
    assert all(1 <= len(b) <= 2 for b in epoch)
    assert s.batches_per_epoch == len(epoch) == 3 + 2 + 1  # buckets hold 6, 4 and 1 items


def test_sampler_is_deterministic_per_seed_and_epoch():
    assert _sampler().epoch_batches(0) == _sampler().epoch_batches(0)
    assert _sampler().epoch_batches(0) != _sampler().epoch_batches(1)
    orders = {json.dumps(_sampler(seed=s).epoch_batches(0)) for s in range(8)}
    assert len(orders) > 4


def test_sampler_resume_continues_with_exactly_the_same_batches():
    straight = _sampler()
    reference = [straight.next_batch() for _ in range(20)]  # crosses three epoch boundaries
    first = _sampler()
    seen = [first.next_batch() for _ in range(8)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    assert (state["epoch"], state["position"]) == (1, 2)
    resumed = _sampler()
    resumed.load_state_dict(state)
    seen += [resumed.next_batch() for _ in range(12)]
    assert seen == reference


def test_sampler_refuses_to_resume_onto_a_changed_dataset():
    state = _sampler().state_dict()
    with pytest.raises(WorkbenchError, match="batch_size 2 -> 4"):
        _sampler(batch=4).load_state_dict(state)
    other = BucketBatchSampler([0, 0, 0, 1, 1, 2, 1], [2, 1, 1, 3, 1, 1, 2], 2, 3)
    with pytest.raises(WorkbenchError, match="images, repeats or their buckets changed"):
        other.load_state_dict(state)
    with pytest.raises(WorkbenchError, match="no examples"):
        BucketBatchSampler([], [], 1, 0)
