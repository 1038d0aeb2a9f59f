"""Caption options: trigger word, tag shuffle with kept leading tags, caption dropout.

They follow kohya's meaning so settings carry over: captions are comma-separated tags; `keep_tokens`
counts tags (not words) that stay in front; `caption_dropout_rate` replaces the whole caption with ""
(the model also learns the style unconditioned, which helps CFG). The trigger is prepended as its own tag
before shuffling, so `keep_tokens: 1` (the recipe default) keeps it first.

Randomness comes from `caption_rng(seed, step, slot)`, a pure function of where the caption is used: a
resumed run rebuilds exactly the captions the first run would have used, without saving RNG state.
"""

from __future__ import annotations

import hashlib
import random
import re


def split_tags(caption: str) -> list[str]:
    """Comma-separated tags, stripped, empty ones dropped."""
    return [t.strip() for t in caption.split(",") if t.strip()]


def has_trigger(caption: str, trigger: str) -> bool:
    """True when `trigger` already appears as a whole word (so it is not added twice)."""
    return re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption, re.IGNORECASE) is not None


def with_trigger(caption: str, trigger: str | None) -> str:
    """`trigger, caption` unless the caption already holds the trigger; "" becomes the trigger."""
    if not trigger or has_trigger(caption, trigger):
        return caption
    return f"{trigger}, {caption}" if caption.strip() else trigger


def shuffle_tags(caption: str, keep_tokens: int, rng: random.Random) -> str:
    """Shuffle the tags after the first `keep_tokens`; the kept ones stay in order."""
    tags = split_tags(caption)
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


def build_caption(caption: str, *, trigger: str | None = None, shuffle: bool = False,
                  keep_tokens: int = 0, dropout_rate: float = 0.0,
                  rng: random.Random | None = None) -> str:
    """The caption one training step uses.

    Order: dropout (whole caption -> "", trigger included, as kohya does); trigger prepended if
    missing; tags shuffled behind the first `keep_tokens`. `rng` is needed only for dropout/shuffle and
    is consumed the same way every call (one draw for dropout when dropout_rate > 0, then the shuffle).
    """
    if (shuffle or dropout_rate > 0) and rng is None:
        raise ValueError("build_caption needs an rng for shuffle or dropout")
    if dropout_rate > 0 and rng.random() < dropout_rate:
        return ""
    text = with_trigger(caption.strip(), trigger)
    if shuffle:
        text = shuffle_tags(text, keep_tokens, rng)
    return text


def caption_rng(seed: int, step: int, slot: int) -> random.Random:
    """A generator fixed by (seed, step, position in the batch): reproducible captions on resume."""
    digest = hashlib.sha256(f"{seed}:{step}:{slot}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def fixed_captions(captions: list[str], trigger: str | None, dropout_rate: float) -> list[str]:
    """Every distinct caption a run without shuffling can use: what a text-encoder cache must hold.

    Dropout does not stop text-encoder caching (unlike in kohya): its only extra caption is "".
    """
    out = sorted({with_trigger(c.strip(), trigger) for c in captions})
    if dropout_rate > 0 and "" not in out:
        out.insert(0, "")
    return out


def tag_frequency(captions_by_folder: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """kohya's `ss_tag_frequency`: per dataset folder, how often each tag occurs (A1111 shows it)."""
    out: dict[str, dict[str, int]] = {}
    for folder, captions in captions_by_folder.items():
        counts: dict[str, int] = {}
        for c in captions:
            for tag in split_tags(c):
                counts[tag] = counts.get(tag, 0) + 1
        out[folder] = counts
    return out
