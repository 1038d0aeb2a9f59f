"""The sample style set: small pictures in one recognisable made-up style, drawn procedurally.

The style ("wbstyle") is what a personal-style LoRA should pick up: a flat four-colour palette
(navy, teal, coral, cream), thick navy outlines, a halftone-dot sky and a paper grain. Subjects vary
so that a LoRA learns the style rather than a subject. Everything is drawn with Pillow from a seed:
no downloads, identical pixels on every run.

    python -m workbench.testing.style_set datasets/sample-style
writes a kohya-layout folder `10_wbstyle/` with `NNN_subject.png` + `NNN_subject.txt` captions.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw

NAVY, TEAL, CORAL, CREAM = (27, 38, 79), (38, 150, 140), (240, 110, 90), (246, 236, 214)
TRIGGER = "wbstyle"
REPEATS = 10
OUTLINE = 4

Drawer = Callable[[ImageDraw.ImageDraw, int, int, random.Random], str]


def _sky(img: Image.Image, rng: random.Random, horizon: int) -> None:
    """Halftone dots that grow toward the horizon: the style's signature sky."""
    d = ImageDraw.Draw(img)
    w = img.width
    step = 8
    for y in range(step // 2, horizon, step):
        r = 1 + 3 * y / max(horizon, 1)
        for x in range(step // 2 + (y // step % 2) * step // 2, w, step):
            d.ellipse([x - r, y - r, x + r, y + r], fill=TEAL)


def _grain(img: Image.Image, rng: random.Random) -> None:
    px = img.load()
    for _ in range(img.width * img.height // 12):
        x, y = rng.randrange(img.width), rng.randrange(img.height)
        r, g, b = px[x, y]
        k = rng.choice((-10, 10))
        px[x, y] = (max(0, min(255, r + k)), max(0, min(255, g + k)), max(0, min(255, b + k)))


def _lighthouse(d, w, h, rng):
    cx = w // 2 + rng.randint(-w // 6, w // 6)
    d.polygon([(cx - 14, h - 30), (cx + 14, h - 30), (cx + 8, 30), (cx - 8, 30)], fill=CREAM,
              outline=NAVY, width=OUTLINE)
    for y in range(45, h - 35, 18):
        d.rectangle([cx - 12, y, cx + 12, y + 7], fill=CORAL)
    d.rectangle([cx - 10, 16, cx + 10, 30], fill=CORAL, outline=NAVY, width=OUTLINE)
    d.rectangle([0, h - 30, w, h], fill=NAVY)
    return "a lighthouse by the sea"


def _house(d, w, h, rng):
    x0 = rng.randint(10, w // 3)
    x1 = x0 + w // 2
    d.rectangle([x0, h // 2, x1, h - 20], fill=CREAM, outline=NAVY, width=OUTLINE)
    d.polygon([(x0 - 8, h // 2), (x1 + 8, h // 2), ((x0 + x1) // 2, h // 4)], fill=CORAL,
              outline=NAVY, width=OUTLINE)
    d.rectangle([x0 + 12, h - 48, x0 + 28, h - 20], fill=TEAL, outline=NAVY, width=OUTLINE)
    d.rectangle([0, h - 20, w, h], fill=TEAL)
    return "a small house with a red roof"


def _tree(d, w, h, rng):
    cx = rng.randint(w // 3, 2 * w // 3)
    d.rectangle([cx - 6, h // 2, cx + 6, h - 18], fill=CORAL, outline=NAVY, width=OUTLINE)
    r = rng.randint(w // 5, w // 4)
    d.ellipse([cx - r, h // 2 - 2 * r + 10, cx + r, h // 2 + 10], fill=TEAL, outline=NAVY,
              width=OUTLINE)
    d.rectangle([0, h - 18, w, h], fill=NAVY)
    return "a round tree on a hill"


def _mountains(d, w, h, rng):
    for i in range(3):
        x = rng.randint(-20, w - 20)
        peak = rng.randint(h // 5, h // 2)
        d.polygon([(x - w // 3, h), (x + w // 3, h), (x, peak)], fill=(CORAL, CREAM, TEAL)[i],
                  outline=NAVY, width=OUTLINE)
    return "mountains under a dotted sky"


def _boat(d, w, h, rng):
    cx = rng.randint(w // 3, 2 * w // 3)
    d.rectangle([0, h - 36, w, h], fill=NAVY)
    d.polygon([(cx - 30, h - 44), (cx + 30, h - 44), (cx + 20, h - 30), (cx - 20, h - 30)],
              fill=CORAL, outline=CREAM, width=OUTLINE)
    d.polygon([(cx, h - 46), (cx, h - 100), (cx + 26, h - 50)], fill=CREAM, outline=NAVY,
              width=OUTLINE)
    return "a sailing boat on dark water"


def _sun(d, w, h, rng):
    r = rng.randint(w // 6, w // 4)
    cx, cy = rng.randint(r, w - r), rng.randint(r, h // 2)
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=CORAL, outline=NAVY, width=OUTLINE)
    d.rectangle([0, h - 24, w, h], fill=TEAL, outline=NAVY, width=OUTLINE)
    return "a big sun over a field"


def _cat(d, w, h, rng):
    cx, cy = w // 2 + rng.randint(-10, 10), h // 2 + 10
    d.ellipse([cx - 30, cy - 10, cx + 30, cy + 40], fill=CORAL, outline=NAVY, width=OUTLINE)
    d.ellipse([cx - 20, cy - 40, cx + 20, cy], fill=CORAL, outline=NAVY, width=OUTLINE)
    d.polygon([(cx - 18, cy - 30), (cx - 12, cy - 52), (cx - 4, cy - 36)], fill=CORAL, outline=NAVY)
    d.polygon([(cx + 18, cy - 30), (cx + 12, cy - 52), (cx + 4, cy - 36)], fill=CORAL, outline=NAVY)
    d.ellipse([cx - 10, cy - 26, cx - 4, cy - 20], fill=NAVY)
    d.ellipse([cx + 4, cy - 26, cx + 10, cy - 20], fill=NAVY)
    return "a sitting cat"


def _flower(d, w, h, rng):
    cx, cy = rng.randint(w // 3, 2 * w // 3), h // 2 - 6
    d.line([cx, cy, cx, h - 10], fill=TEAL, width=6)
    for k in range(6):
        ox, oy = [(0, -16), (14, -8), (14, 8), (0, 16), (-14, 8), (-14, -8)][k]
        d.ellipse([cx + ox - 10, cy + oy - 10, cx + ox + 10, cy + oy + 10], fill=CREAM,
                  outline=NAVY, width=3)
    d.ellipse([cx - 8, cy - 8, cx + 8, cy + 8], fill=CORAL, outline=NAVY, width=3)
    return "a flower"


def _castle(d, w, h, rng):
    x0, x1 = w // 5, 4 * w // 5
    d.rectangle([x0, h // 2, x1, h - 12], fill=CREAM, outline=NAVY, width=OUTLINE)
    for x in range(x0, x1, 16):
        d.rectangle([x, h // 2 - 10, x + 8, h // 2], fill=CREAM, outline=NAVY, width=2)
    d.rectangle([(x0 + x1) // 2 - 10, h - 40, (x0 + x1) // 2 + 10, h - 12], fill=NAVY)
    d.polygon([(x1 - 8, h // 2 - 10), (x1 - 8, h // 2 - 40), (x1 + 14, h // 2 - 32)], fill=CORAL)
    return "a castle with a flag"


def _fish(d, w, h, rng):
    d.rectangle([0, 0, w, h], fill=TEAL)
    cx, cy = w // 2 + rng.randint(-14, 14), h // 2 + rng.randint(-14, 14)
    d.ellipse([cx - 34, cy - 18, cx + 24, cy + 18], fill=CORAL, outline=NAVY, width=OUTLINE)
    d.polygon([(cx + 20, cy), (cx + 44, cy - 18), (cx + 44, cy + 18)], fill=CORAL, outline=NAVY,
              width=OUTLINE)
    d.ellipse([cx - 24, cy - 6, cx - 16, cy + 2], fill=NAVY)
    return "a fish swimming"


def _bird(d, w, h, rng):
    cx, cy = rng.randint(w // 3, 2 * w // 3), rng.randint(h // 3, h // 2)
    d.ellipse([cx - 20, cy - 14, cx + 20, cy + 14], fill=CREAM, outline=NAVY, width=OUTLINE)
    d.polygon([(cx - 4, cy - 4), (cx - 30, cy - 30), (cx + 10, cy - 8)], fill=CORAL, outline=NAVY)
    d.polygon([(cx + 18, cy - 4), (cx + 30, cy), (cx + 18, cy + 4)], fill=CORAL)
    d.line([0, h - 20, w, h - 20], fill=NAVY, width=OUTLINE)
    return "a bird on a wire"


def _cup(d, w, h, rng):
    cx = w // 2
    d.rectangle([cx - 24, h // 2 - 10, cx + 24, h - 24], fill=CREAM, outline=NAVY, width=OUTLINE)
    d.arc([cx + 14, h // 2, cx + 40, h // 2 + 26], -90, 90, fill=NAVY, width=OUTLINE)
    for k in range(3):
        d.arc([cx - 16 + 12 * k, h // 2 - 44, cx - 6 + 12 * k, h // 2 - 16], 90, 270, fill=CORAL,
              width=3)
    d.rectangle([0, h - 24, w, h], fill=CORAL)
    return "a steaming cup of tea"


SUBJECTS: list[tuple[str, Drawer]] = [
    ("lighthouse", _lighthouse), ("house", _house), ("tree", _tree), ("mountains", _mountains),
    ("boat", _boat), ("sun", _sun), ("cat", _cat), ("flower", _flower), ("castle", _castle),
    ("fish", _fish), ("bird", _bird), ("cup", _cup),
]
# (width, height) per picture: mostly square, some landscape and portrait for aspect buckets.
SIZES = [(128, 128)] * 4 + [(160, 128), (128, 160)]


def draw(index: int, seed: int = 0) -> tuple[Image.Image, str, str]:
    """Picture number `index`: (image, subject slug, caption without the trigger word)."""
    rng = random.Random(seed * 1000 + index)
    slug, drawer = SUBJECTS[index % len(SUBJECTS)]
    w, h = SIZES[index % len(SIZES)]
    img = Image.new("RGB", (w, h), CREAM)
    _sky(img, rng, horizon=h * 2 // 3)
    caption = drawer(ImageDraw.Draw(img), w, h, rng)
    _grain(img, rng)
    extra = rng.choice(["simple background", "flat colors", "thick outlines", "dotted sky"])
    return img, slug, f"{caption}, {extra}"


def write_set(out_dir: str | Path, count: int = 24, seed: int = 0) -> Path:
    """Write `count` pictures with captions in kohya layout under `out_dir/10_wbstyle/`."""
    folder = Path(out_dir) / f"{REPEATS}_{TRIGGER}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img, slug, caption = draw(i, seed)
        stem = folder / f"{i:03d}_{slug}"
        img.save(stem.with_suffix(".png"), optimize=True)
        stem.with_suffix(".txt").write_text(caption + "\n")
    return folder


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "datasets/sample-style"
    print(f"wrote {write_set(target)}")
