"""The shipped sample style set is what its generator draws, in kohya layout, with captions."""

from pathlib import Path

import numpy as np
from PIL import Image

from workbench.testing import style_set

SHIPPED = Path(__file__).resolve().parent.parent / "datasets" / "sample-style"


def test_shipped_set_is_kohya_layout_with_a_caption_per_image():
    folders = [p for p in SHIPPED.iterdir() if p.is_dir()]
    assert [p.name for p in folders] == [f"{style_set.REPEATS}_{style_set.TRIGGER}"]
    images = sorted(folders[0].glob("*.png"))
    assert 16 <= len(images) <= 40
    for img in images:
        caption = img.with_suffix(".txt").read_text().strip()
        assert caption and "," in caption, img


def test_shipped_pixels_equal_the_generator(tmp_path):
    regenerated = style_set.write_set(tmp_path)
    shipped = SHIPPED / regenerated.name
    for new in sorted(regenerated.glob("*.png")):
        a = np.asarray(Image.open(new).convert("RGB"))
        b = np.asarray(Image.open(shipped / new.name).convert("RGB"))
        assert a.shape == b.shape and np.array_equal(a, b), new.name
        assert new.with_suffix(".txt").read_text() == (shipped / new.name).with_suffix(".txt").read_text()


def test_style_is_consistent_palette_and_sizes_vary():
    sizes, palette_share = set(), []
    for i in range(24):
        img, _, _ = style_set.draw(i)
        sizes.add(img.size)
        px = np.asarray(img).reshape(-1, 3).astype(int)
        ref = np.array([style_set.NAVY, style_set.TEAL, style_set.CORAL, style_set.CREAM])
        dist = np.abs(px[:, None, :] - ref[None]).sum(-1).min(1)
        palette_share.append((dist <= 30).mean())
    assert len(sizes) == 3  # square, landscape, portrait: exercises aspect buckets
    assert min(palette_share) > 0.95  # every picture is drawn in the four-colour palette
