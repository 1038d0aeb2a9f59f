"""Training datasets: every layout loads, every fault is reported with its file, caption options."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from workbench.errors import WorkbenchError
from workbench.train.captions import (build_caption, caption_rng, fixed_captions, tag_frequency,
                                      with_trigger)
from workbench.train.check import check_dataset, require_clean
from workbench.train.dataset import detect_layout, load_examples, open_image

SAMPLE = Path(__file__).resolve().parents[1] / "datasets" / "sample-style"


def noise_image(path: Path, size=(96, 96), seed=0, fmt=None, **save) -> Path:
    """A picture of random pixels: no two seeds look alike, so no near-duplicate warnings."""
    rng = random.Random(seed)
    img = Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **save)
    return path


def pair(folder: Path, stem: str, caption: str | None, seed: int, size=(96, 96),
         ext=".txt") -> Path:
    img = noise_image(folder / f"{stem}.png", size, seed)
    if caption is not None:
        img.with_suffix(ext).write_text(caption + "\n", encoding="utf-8")
    return img


def kinds(report) -> dict[str, set[str]]:
    """kind -> file names reported with it."""
    out: dict[str, set[str]] = {}
    for p in report.problems:
        out.setdefault(p.kind, set()).add(Path(p.path).name)
    return out


def check(path, **kw):
    kw.setdefault("resolution", 64)
    return check_dataset(path, **kw)


# ---------------------------------------------------------------- layouts

def test_kohya_layout_reads_repeats_captions_and_sizes(tmp_path):
    pair(tmp_path / "10_mystyle", "a", "a red house, sunny", 1, (96, 64))
    pair(tmp_path / "10_mystyle", "b", "a blue boat", 2)
    pair(tmp_path / "3_extra", "c", "a cat", 3, ext=".caption")
    assert detect_layout(tmp_path) == "kohya"
    ex = load_examples(tmp_path)
    assert [(e.image_path.name, e.repeats, e.caption) for e in ex] == [
        ("a.png", 10, "a red house, sunny"), ("b.png", 10, "a blue boat"), ("c.png", 3, "a cat")]
    assert (ex[0].width, ex[0].height) == (96, 64)
    assert ex[0].sha256 == hashlib.sha256(ex[0].image_path.read_bytes()).hexdigest()


def test_caption_extension_is_respected(tmp_path):
    img = pair(tmp_path, "a", "from txt", 1)
    img.with_suffix(".caption").write_text("from caption")
    assert load_examples(tmp_path)[0].caption == "from txt"  # default: .txt first
    assert load_examples(tmp_path, caption_extension=".caption")[0].caption == "from caption"


def test_flat_folder_loads_with_repeats_one(tmp_path):
    pair(tmp_path, "x", "one", 1)
    pair(tmp_path, "y", "two\n\nignored second line", 2)
    assert detect_layout(tmp_path) == "flat"
    ex = load_examples(tmp_path)
    assert [(e.caption, e.repeats) for e in ex] == [("one", 1), ("two", 1)]
    report = check(tmp_path)
    assert kinds(report) == {"multi_line_caption": {"y.png"}}
    assert report.ok


def test_hf_imagefolder_metadata_jsonl(tmp_path):
    noise_image(tmp_path / "train" / "p1.png", seed=1)
    noise_image(tmp_path / "train" / "sub" / "p2.jpg", seed=2, fmt="JPEG")
    rows = [{"file_name": "p1.png", "text": "first picture"},
            {"file_name": "sub/p2.jpg", "text": "second picture"}]
    (tmp_path / "train" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert detect_layout(tmp_path) == "imagefolder"
    ex = load_examples(tmp_path)
    assert sorted((e.image_path.name, e.caption, e.repeats) for e in ex) == [
        ("p1.png", "first picture", 1), ("p2.jpg", "second picture", 1)]


def test_hf_imagefolder_metadata_csv_with_prompt_column(tmp_path):
    noise_image(tmp_path / "a.png", seed=1)
    noise_image(tmp_path / "b.png", seed=2)
    (tmp_path / "metadata.csv").write_text('file_name,prompt\na.png,"a cat, sitting"\nb.png,\n')
    report = check(tmp_path)
    assert [e.caption for e in report.examples] == ["a cat, sitting"]
    assert kinds(report) == {"empty_caption": {"b.png"}}
    assert "column 'prompt' of metadata.csv" in report.render()


def test_hf_save_to_disk_folder_materialises_images(tmp_path):
    import datasets

    src = [noise_image(tmp_path / "src" / f"{i}.png", seed=10 + i) for i in range(3)]
    ds = datasets.Dataset.from_dict(
        {"image": [str(p) for p in src], "caption": ["one", "two", "three"]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "saved"))
    shutil.rmtree(tmp_path / "src")  # the saved dataset must not need the original files
    assert detect_layout(tmp_path / "saved") == "hf_disk"
    ex = load_examples(tmp_path / "saved", cache_dir=tmp_path / "cache")
    assert [e.caption for e in ex] == ["one", "two", "three"]
    for e in ex:
        assert e.image_path.parent == tmp_path / "cache" / "hf-images"
        assert e.image_path.name.startswith(e.sha256)
        assert open_image(e).size == (96, 96)
    # a second load reuses the same files
    assert [e.image_path for e in load_examples(tmp_path / "saved", cache_dir=tmp_path / "cache")] \
        == [e.image_path for e in ex]


def test_hf_dataset_dict_with_a_bad_row_names_the_original_file(tmp_path):
    import datasets

    good = noise_image(tmp_path / "good.png", seed=1).read_bytes()
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": good, "path": "good.png"}, {"bytes": b"junk", "path": "bad.png"}],
         "text": ["fine", "broken"]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    report = check(tmp_path / "dd", cache_dir=tmp_path / "cache")
    assert report.layout == "hf_disk"
    assert [e.caption for e in report.examples] == ["fine"]
    assert kinds(report) == {"unreadable": {"dd [row 1: bad.png]"}}
    with pytest.raises(WorkbenchError, match=r"dd \[row 1: bad\.png\]: not a readable image"):
        require_clean(report)


def test_sample_style_set_loads_24_examples_with_repeats_10():
    ex = load_examples(SAMPLE, trigger="wbstyle")
    assert len(ex) == 24
    assert {e.repeats for e in ex} == {10}
    assert all(e.caption and "wbstyle" not in e.caption for e in ex)
    report = require_clean(check(SAMPLE, resolution=64, trigger="wbstyle"))
    assert report.images_per_epoch == 240
    assert report.bucket_counts == {(64, 64): 24}


def test_exif_rotation_and_transparency(tmp_path):
    img = Image.new("RGB", (80, 40), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    (tmp_path / "rot.txt").write_text("rotated")
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    (tmp_path / "clear.txt").write_text("transparent")
    ex = {e.image_path.name: e for e in load_examples(tmp_path)}
    assert (ex["rot.jpg"].width, ex["rot.jpg"].height) == (40, 80)
    assert open_image(ex["rot.jpg"]).size == (40, 80)
    assert open_image(ex["clear.png"]).getpixel((5, 5)) == (255, 255, 255)


# ---------------------------------------------------------------- faults

def test_corrupt_and_truncated_images_are_errors_naming_the_file(tmp_path):
    pair(tmp_path, "good", "fine", 1)
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    (tmp_path / "broken.txt").write_text("broken")
    whole = noise_image(tmp_path / "cut.png", seed=2).read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "cut.txt").write_text("cut")
    report = check(tmp_path)
    assert kinds(report)["unreadable"] == {"broken.png", "cut.png"}
    assert [e.image_path.name for e in report.examples] == ["good.png"]
    with pytest.raises(WorkbenchError, match=r"broken\.png") as err:
        require_clean(report)
    assert "cut.png" in str(err.value)
    with pytest.raises(WorkbenchError, match=r"\[unreadable\].*broken\.png"):
        load_examples(tmp_path)


def test_missing_caption_is_an_error_unless_a_trigger_or_folder_name_fills_it(tmp_path):
    pair(tmp_path / "flat", "nocap", None, 1)
    pair(tmp_path / "flat", "ok", "fine", 2)
    report = check(tmp_path / "flat")
    assert kinds(report) == {"missing_caption": {"nocap.png"}}
    assert not report.ok
    with pytest.raises(WorkbenchError, match=r"nocap\.png.*nocap\.txt or nocap\.caption"):
        require_clean(report)
    with_trigger_report = check(tmp_path / "flat", trigger="zzstyle")
    assert with_trigger_report.ok and with_trigger_report.warnings[0].kind == "missing_caption"
    assert {e.image_path.name: e.caption for e in with_trigger_report.examples}["nocap.png"] == ""
    # kohya: the folder's class tokens become the caption, as sd-scripts does
    pair(tmp_path / "k" / "5_my style", "nocap", None, 3)
    ex = load_examples(tmp_path / "k")
    assert ex[0].caption == "my style" and ex[0].repeats == 5


def test_empty_and_non_utf8_captions(tmp_path):
    pair(tmp_path, "empty", "   ", 1)
    img = pair(tmp_path, "latin", None, 2)
    img.with_suffix(".txt").write_bytes("caf\xe9".encode("latin-1"))
    report = check(tmp_path)
    assert kinds(report) == {"empty_caption": {"empty.png"}, "unreadable_caption": {"latin.txt"}}
    msg = str(pytest.raises(WorkbenchError, require_clean, report).value)
    assert "empty.png" in msg and "latin.txt" in msg and "UTF-8" in msg


def test_duplicates_same_bytes_and_same_pixels(tmp_path):
    a = pair(tmp_path, "a", "one", 1)
    shutil.copy(a, tmp_path / "a_copy.png")
    (tmp_path / "a_copy.txt").write_text("copy")
    Image.open(a).save(tmp_path / "a_resaved.png", compress_level=1)  # other bytes, same pixels
    (tmp_path / "a_resaved.txt").write_text("resaved")
    assert (tmp_path / "a_resaved.png").read_bytes() != a.read_bytes()
    pair(tmp_path, "b", "two", 2)
    report = check(tmp_path)
    assert kinds(report) == {"duplicate": {"a_copy.png", "a_resaved.png"}}
    assert sorted(e.image_path.name for e in report.examples) == ["a.png", "b.png"]
    with pytest.raises(WorkbenchError, match=r"a_copy\.png: same file content as .*a\.png"):
        require_clean(report)


def drawing(path: Path, seed: int, size=(128, 128)) -> Path:
    """Flat shapes on a background: picture-like, unlike noise (which thumbnails average away)."""
    rng = random.Random(seed)
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = rng.randrange(size[0] - 30), rng.randrange(size[1] - 30)
        d.ellipse([x, y, x + rng.randint(20, 60), y + rng.randint(20, 60)],
                  fill=tuple(rng.randrange(256) for _ in range(3)))
    img.save(path)
    path.with_suffix(".txt").write_text(f"drawing {seed}")
    return path


def test_near_duplicate_is_a_warning(tmp_path):
    a = drawing(tmp_path / "a.png", 1)
    Image.open(a).resize((120, 120)).save(tmp_path / "a_small.png")
    (tmp_path / "a_small.txt").write_text("smaller copy")
    for seed in range(2, 8):
        drawing(tmp_path / f"other{seed}.png", seed)
    report = check(tmp_path)
    assert kinds(report) == {"near_duplicate": {"a_small.png"}}
    assert report.ok


def test_too_small_warns_then_errors(tmp_path):
    pair(tmp_path, "fine", "f", 1, (256, 256))
    pair(tmp_path, "soft", "s", 2, (96, 96))  # 2.7x to 256
    pair(tmp_path, "thumb", "t", 3, (48, 48))  # 5.3x to 256
    report = check(tmp_path, resolution=256)
    small = {Path(p.path).name: p.severity for p in report.problems if p.kind == "too_small"}
    assert small == {"soft.png": "warning", "thumb.png": "error"}
    with pytest.raises(WorkbenchError, match=r"thumb\.png: 48x48 would be enlarged 5\.3x"):
        require_clean(report)
    assert require_clean(check(tmp_path, resolution=64))  # at 64 px nothing is enlarged


def test_lonely_bucket_is_a_warning_naming_the_image(tmp_path):
    for i in range(3):
        pair(tmp_path, f"sq{i}", "square", i, (512, 512))
    pair(tmp_path, "tall", "tall", 9, (256, 768))
    report = check(tmp_path, resolution=512)
    assert kinds(report) == {"lonely_bucket": {"tall.png"}}
    assert report.bucket_counts == {(256, 832): 1, (512, 512): 3}  # 1:3 is nearest 256x832
    assert report.ok
    with pytest.raises(WorkbenchError, match=r"tall\.png.*bucket 256x832"):
        require_clean(report, strict=True)
    assert kinds(check(tmp_path, resolution=512, bucketing=False)) == {}


def test_metadata_faults_name_the_file_and_line(tmp_path):
    noise_image(tmp_path / "a.png", seed=1)
    noise_image(tmp_path / "unlisted.png", seed=2)
    (tmp_path / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "caption": "ok"}\n{"file_name": "gone.png", "caption": "x"}\n'
        '{not json\n')
    report = check(tmp_path)
    k = kinds(report)
    assert k["missing_image"] == {"gone.png"}
    assert k["missing_caption"] == {"unlisted.png"}
    assert k["bad_metadata"] == {"metadata.jsonl"}
    msg = str(pytest.raises(WorkbenchError, require_clean, report).value)
    assert "line 3" in msg and "gone.png" in msg and "unlisted.png" in msg
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "label": "x"}\n')
    with pytest.raises(WorkbenchError, match=r"metadata\.jsonl: no caption column.*label"):
        load_examples(tmp_path)


def test_empty_or_missing_dataset_folder(tmp_path):
    with pytest.raises(WorkbenchError, match=r"nowhere: does not exist"):
        check(tmp_path / "nowhere")
    (tmp_path / "photos").mkdir()  # a subfolder without the '<repeats>_' prefix
    noise_image(tmp_path / "photos" / "a.png")
    report = check(tmp_path)
    assert kinds(report) == {"no_images": {tmp_path.name}}
    with pytest.raises(WorkbenchError, match=r"no training images found.*10_mystyle"):
        load_examples(tmp_path)


def test_kohya_ignored_entries_are_warnings(tmp_path):
    pair(tmp_path / "10_style", "a", "a", 1)
    pair(tmp_path / "10_style", "b", "b", 2)
    noise_image(tmp_path / "stray.png", seed=3)
    pair(tmp_path / "misc", "m", "m", 4)
    report = check(tmp_path)
    assert kinds(report) == {"ignored": {"stray.png", "misc"}}
    assert report.ok and len(report.examples) == 2
    assert "stray.png" in report.render() and "warnings (2)" in report.render()


# ---------------------------------------------------------------- captions

def test_trigger_is_prepended_once():
    assert with_trigger("a red house", "wbstyle") == "wbstyle, a red house"
    assert with_trigger("a wbstyle house", "wbstyle") == "a wbstyle house"
    assert with_trigger("", "wbstyle") == "wbstyle"
    assert with_trigger("a wbstyles house", "wbstyle") == "wbstyle, a wbstyles house"
    assert build_caption("a red house", trigger="wbstyle") == "wbstyle, a red house"


def test_shuffle_keeps_the_first_tokens_and_the_tag_set():
    caption = "t1, t2, t3, t4, t5, t6"
    seen = set()
    for step in range(30):
        out = build_caption(caption, trigger="wbstyle", shuffle=True, keep_tokens=2,
                            rng=caption_rng(42, step, 0))
        tags = out.split(", ")
        assert tags[:2] == ["wbstyle", "t1"]
        assert sorted(tags[2:]) == ["t2", "t3", "t4", "t5", "t6"]
        seen.add(out)
    assert len(seen) > 10  # really shuffled
    again = build_caption(caption, trigger="wbstyle", shuffle=True, keep_tokens=2,
                          rng=caption_rng(42, 7, 0))
    assert again == build_caption(caption, trigger="wbstyle", shuffle=True, keep_tokens=2,
                                  rng=caption_rng(42, 7, 0))


def test_caption_dropout_rate():
    outs = [build_caption("a cat", trigger="s", dropout_rate=0.25, rng=caption_rng(1, i, 0))
            for i in range(400)]
    dropped = outs.count("")
    assert 60 < dropped < 140
    assert set(outs) == {"", "s, a cat"}
    assert build_caption("a cat", dropout_rate=1.0, rng=random.Random(0)) == ""
    with pytest.raises(ValueError, match="rng"):
        build_caption("a cat", shuffle=True)


def test_fixed_captions_and_tag_frequency():
    assert fixed_captions(["a", "b", "a"], "s", 0.0) == ["s, a", "s, b"]
    assert fixed_captions(["a"], "s", 0.1) == ["", "s, a"]
    assert tag_frequency({"10_s": ["a, b", "b"]}) == {"10_s": {"a": 1, "b": 2}}
