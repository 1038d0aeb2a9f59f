"""Training images and their captions, from the four folder layouts people actually have.

Layouts (detected in this order, see `detect_layout`):
- "hf_disk": a Hugging Face `Dataset.save_to_disk` folder (`state.json` + `*.arrow`, or a
  `dataset_dict.json` with split folders; split "train" or the only one is used). Images live inside the
  arrow files, so each is written once to `<cache>/hf-images/<sha256>.<ext>` and `Example.image_path`
  points there: everything downstream then works on plain files.
- "imagefolder": HF imagefolder with `metadata.jsonl` (or `metadata.csv`) at the root or in `train/`;
  `file_name` plus a caption column `text`, `caption` or `prompt` (diffusers' scripts default to `text`).
- "kohya": `<repeats>_<class tokens>/` folders (e.g. `10_wbstyle/`) with same-named caption files.
- "flat": images directly in the folder with same-named caption files (repeats 1).

Caption files: `caption_extension` if given, else `.txt` then `.caption` (kohya's default is `.caption`,
most tools write `.txt`). Only the first non-empty line is used; more lines give a warning.
A missing or empty caption is filled like kohya does: with the folder's class tokens in the kohya layout;
otherwise it stays "" and is allowed only when a trigger word is given (build_caption adds it later);
without either it is an error, because an image trained on an empty prompt teaches nothing about prompts.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from workbench.errors import WorkbenchError
from workbench.formats.hashes import cache_root
from workbench.formats.writer import atomic_write_bytes

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTS = (".txt", ".caption")
CAPTION_COLUMNS = ("text", "caption", "prompt")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
REPEAT_DIR = re.compile(r"^(\d+)_(.*)$")
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Example:
    """One training image. `caption` is raw (no trigger added); width/height are EXIF-corrected."""

    image_path: Path
    caption: str
    repeats: int
    width: int
    height: int
    sha256: str  # of the image file's bytes: latent-cache key and duplicate check


@dataclass(frozen=True)
class DatasetProblem:
    """One thing wrong with a dataset, named by its file so the user can fix it."""

    path: Path
    kind: str
    message: str
    severity: str = "error"  # "error" stops training, "warning" is reported only


@dataclass(frozen=True)
class _Candidate:
    """An image found by a layout reader, before it is opened."""

    image_path: Path
    label: str  # how the user knows this image (file path, or original name inside an arrow file)
    caption: str | None  # None: no caption found
    caption_source: str  # where the caption was looked for, for messages
    repeats: int = 1
    fallback: str = ""  # kohya class tokens, used when the caption is missing or empty
    extra_lines: bool = False


@dataclass
class ScanResult:
    """What a scan of the dataset folder found; `fingerprints` feed the duplicate checks."""

    path: Path
    layout: str
    examples: list[Example] = field(default_factory=list)
    problems: list[DatasetProblem] = field(default_factory=list)
    # image path -> (sha256 of decoded RGB pixels + size, `thumbnail` bytes)
    fingerprints: dict[Path, tuple[str, bytes]] = field(default_factory=dict)


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _metadata_file(root: Path) -> Path | None:
    for folder in (root, root / "train"):
        for name in METADATA_FILES:
            if (folder / name).is_file():
                return folder / name
    return None


def detect_layout(path: str | Path) -> str:
    """Which layout `path` has: "hf_disk", "imagefolder", "kohya" or "flat".

    WorkbenchError if `path` is not a folder.
    """
    root = Path(path)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise WorkbenchError(f"dataset {root}: {what}; expected a folder of images with captions, "
                             "kohya '<repeats>_<name>/' folders, or a Hugging Face dataset folder")
    if (root / "dataset_dict.json").is_file() or (
            (root / "state.json").is_file() and any(root.glob("*.arrow"))):
        return "hf_disk"
    if _metadata_file(root) is not None:
        return "imagefolder"
    if any(d.is_dir() and REPEAT_DIR.match(d.name) for d in root.iterdir() if _visible(d)):
        return "kohya"
    return "flat"


def _read_caption(image: Path, caption_extension: str | None) -> tuple[str | None, str, bool]:
    """(caption or None if no file, where it was looked for, whether extra lines were dropped)."""
    if caption_extension and not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    exts = (caption_extension,) if caption_extension else CAPTION_EXTS
    for ext in exts:
        cap = image.with_suffix(ext)
        if cap.is_file():
            try:
                text = cap.read_text(encoding="utf-8-sig")
            except UnicodeDecodeError as e:
                raise _CaptionError(cap, f"caption file is not UTF-8 text ({e.reason} at byte "
                                         f"{e.start})") from e
            except OSError as e:
                raise _CaptionError(cap, f"cannot read caption file ({e.strerror or e})") from e
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            return (lines[0] if lines else ""), str(cap), len(lines) > 1
    looked = " or ".join(image.with_suffix(e).name for e in exts)
    return None, looked, False


class _CaptionError(Exception):
    def __init__(self, path: Path, message: str):
        super().__init__(message)
        self.path, self.message = path, message


def _folder_candidates(folder: Path, repeats: int, fallback: str, caption_extension: str | None,
                       problems: list[DatasetProblem]) -> list[_Candidate]:
    out = []
    for img in sorted(p for p in folder.iterdir() if _is_image(p)):
        try:
            caption, source, extra = _read_caption(img, caption_extension)
        except _CaptionError as e:
            problems.append(DatasetProblem(e.path, "unreadable_caption", e.message))
            continue
        out.append(_Candidate(img, str(img), caption, source, repeats, fallback, extra))
    return out


def _kohya_candidates(root: Path, caption_extension: str | None,
                      problems: list[DatasetProblem]) -> list[_Candidate]:
    out: list[_Candidate] = []
    for entry in sorted(p for p in root.iterdir() if _visible(p)):
        m = REPEAT_DIR.match(entry.name) if entry.is_dir() else None
        if entry.is_dir() and m and int(m.group(1)) > 0:
            out += _folder_candidates(entry, int(m.group(1)), m.group(2).strip(), caption_extension,
                                      problems)
        elif entry.is_dir():
            why = "repeats of 0" if m else "a name that is not '<repeats>_<name>' (e.g. 10_mystyle)"
            problems.append(DatasetProblem(entry, "ignored", f"folder has {why}; its images are "
                                           "not used", "warning"))
        elif _is_image(entry):
            problems.append(DatasetProblem(entry, "ignored", "image outside the '<repeats>_<name>/' "
                                           "folders is not used (kohya layout)", "warning"))
    return out


def _metadata_rows(meta: Path, problems: list[DatasetProblem]) -> list[tuple[int, dict]]:
    """(line number, row) pairs; unparseable lines become problems."""
    rows: list[tuple[int, dict]] = []
    try:
        text = meta.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise WorkbenchError(f"dataset metadata {meta}: cannot read it as UTF-8 text ({e})") from e
    if meta.suffix == ".csv":
        return [(n, row) for n, row in enumerate(csv.DictReader(io.StringIO(text)), 2)]
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            problems.append(DatasetProblem(meta, "bad_metadata", f"line {n}: not valid JSON ({e})"))
            continue
        if not isinstance(row, dict):
            problems.append(DatasetProblem(meta, "bad_metadata", f"line {n}: expected a JSON object "
                                           "with 'file_name' and a caption, got "
                                           f"{type(row).__name__}"))
            continue
        rows.append((n, row))
    return rows


def _caption_column(columns: list[str], where: Path) -> str:
    for name in CAPTION_COLUMNS:
        if name in columns:
            return name
    raise WorkbenchError(f"dataset {where}: no caption column; expected one of "
                         f"{', '.join(CAPTION_COLUMNS)} (columns found: {', '.join(columns) or 'none'})")


def _imagefolder_candidates(root: Path, problems: list[DatasetProblem]) -> list[_Candidate]:
    meta = _metadata_file(root)
    assert meta is not None
    base = meta.parent
    rows = _metadata_rows(meta, problems)
    columns = sorted({k for _, r in rows for k in r})
    if rows and "file_name" not in columns:
        raise WorkbenchError(f"dataset metadata {meta}: rows have no 'file_name' field "
                             f"(columns found: {', '.join(columns)})")
    col = _caption_column(columns, meta) if rows else CAPTION_COLUMNS[0]
    out: list[_Candidate] = []
    listed: set[Path] = set()
    for n, row in rows:
        if not row.get("file_name"):
            problems.append(DatasetProblem(meta, "bad_metadata", f"line {n}: no 'file_name'"))
            continue
        img = (base / str(row["file_name"])).resolve()
        if img in listed:
            problems.append(DatasetProblem(img, "duplicate", f"listed again on line {n} of "
                                           f"{meta.name}"))
            continue
        listed.add(img)
        if not img.is_file():
            problems.append(DatasetProblem(img, "missing_image", f"{meta.name} line {n} names "
                                           "this file but it does not exist"))
            continue
        value = row.get(col)
        caption = None if value is None else str(value).strip()
        out.append(_Candidate(img, str(img), caption, f"column '{col}' of {meta.name}"))
    for img in sorted(p for p in base.rglob("*") if _is_image(p)):
        if img.resolve() not in listed:
            out.append(_Candidate(img, str(img), None, f"a row in {meta.name}"))
    return out


def _hf_disk_candidates(root: Path, cache_dir: Path | None,
                        problems: list[DatasetProblem]) -> list[_Candidate]:
    import datasets  # slow import; only this layout needs it

    try:
        ds = datasets.load_from_disk(str(root))
    except Exception as e:  # datasets raises many types for a damaged folder
        raise WorkbenchError(f"dataset {root}: cannot open it as a Hugging Face save_to_disk "
                             f"folder ({type(e).__name__}: {e})") from e
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds.keys())
        if "train" not in ds and len(splits) != 1:
            raise WorkbenchError(f"dataset {root}: has splits {', '.join(splits)}; expected a "
                                 "'train' split or a single split")
        ds = ds["train"] if "train" in ds else ds[splits[0]]
    image_cols = [k for k, f in ds.features.items() if isinstance(f, datasets.Image)]
    if not image_cols:
        raise WorkbenchError(f"dataset {root}: no image column (columns: "
                             f"{', '.join(ds.column_names)}); expected a datasets.Image feature")
    icol = image_cols[0]
    ccol = _caption_column(list(ds.column_names), root)
    ds = ds.cast_column(icol, datasets.Image(decode=False))
    target = (cache_dir or cache_root()) / "hf-images"
    out: list[_Candidate] = []
    for n, row in enumerate(ds):
        cell = row[icol] or {}
        name = cell.get("path") or f"row {n}"
        label = f"{root} [row {n}: {name}]"
        data = cell.get("bytes")
        if data is None and cell.get("path") and Path(cell["path"]).is_file():
            data = Path(cell["path"]).read_bytes()
        if not data:
            problems.append(DatasetProblem(Path(name), "unreadable", f"{label}: the image cell "
                                           "holds no bytes and no readable path"))
            continue
        img_path = _materialise(data, str(name), target)
        caption = row.get(ccol)
        out.append(_Candidate(img_path, label, None if caption is None else str(caption).strip(),
                              f"column '{ccol}' of {root.name}"))
    return out


def _materialise(data: bytes, name: str, target: Path) -> Path:
    """Write image bytes once under their content hash, so reruns reuse the file."""
    ext = Path(name).suffix.lower()
    if ext not in IMAGE_EXTS:
        ext = ".img"
    path = target / f"{hashlib.sha256(data).hexdigest()}{ext}"
    if not path.is_file():
        target.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data, overwrite=True)
    return path


THUMB = 16  # side of the thumbnail used to spot near-duplicates


def thumbnail(image: Image.Image) -> bytes:
    """16x16 RGB box-averaged thumbnail: re-saved or resized copies stay within a few levels of it,
    while different drawings of one subject differ clearly (bit hashes flip on flat, grainy areas)."""
    return image.convert("RGB").resize((THUMB, THUMB), Image.Resampling.BOX).tobytes()


def _open_checked(c: _Candidate) -> tuple[str, int, int, str, bytes] | DatasetProblem:
    """(file sha256, width, height, pixel sha256, thumbnail), or the problem that stops it."""
    try:
        data = c.image_path.read_bytes()
    except OSError as e:
        return DatasetProblem(Path(c.label), "unreadable", f"cannot read file ({e.strerror or e})")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = _to_rgb(ImageOps.exif_transpose(im))
    except _DECODE_ERRORS as e:
        return DatasetProblem(Path(c.label), "unreadable", f"not a readable image ({e})")
    w, h = rgb.size
    if w == 0 or h == 0:
        return DatasetProblem(Path(c.label), "unreadable", f"image has size {w}x{h}")
    pix = hashlib.sha256(f"{w}x{h}".encode() + rgb.tobytes()).hexdigest()
    return hashlib.sha256(data).hexdigest(), w, h, pix, thumbnail(rgb)


def _resolve_caption(c: _Candidate, trigger: str | None,
                     problems: list[DatasetProblem]) -> str | None:
    """The caption to store, or None when the image must be left out (an error was added)."""
    where = Path(c.label)
    if c.extra_lines:
        problems.append(DatasetProblem(where, "multi_line_caption", f"{c.caption_source} has "
                                       "several lines; only the first is used", "warning"))
    if c.caption:
        return c.caption
    kind = "missing_caption" if c.caption is None else "empty_caption"
    what = f"no caption ({c.caption_source} not found)" if c.caption is None else \
        f"empty caption in {c.caption_source}"
    if c.fallback:
        problems.append(DatasetProblem(where, kind, f"{what}; using the folder's class tokens "
                                       f"{c.fallback!r} (kohya behaviour)", "warning"))
        return c.fallback
    if trigger:
        problems.append(DatasetProblem(where, kind, f"{what}; the caption will be just the "
                                       f"trigger {trigger!r}", "warning"))
        return ""
    problems.append(DatasetProblem(where, kind, f"{what}; write a caption, or set `trigger` so "
                                   "the trigger word alone is used"))
    return None


def scan_dataset(path: str | Path, *, caption_extension: str | None = None,
                 trigger: str | None = None, cache_dir: Path | None = None) -> ScanResult:
    """Read every image and caption once; never raises for a fault in a single file."""
    root = Path(path)
    result = ScanResult(root, detect_layout(root))
    problems = result.problems
    if result.layout == "hf_disk":
        cands = _hf_disk_candidates(root, cache_dir, problems)
    elif result.layout == "imagefolder":
        cands = _imagefolder_candidates(root, problems)
    elif result.layout == "kohya":
        cands = _kohya_candidates(root, caption_extension, problems)
    else:
        cands = _folder_candidates(root, 1, "", caption_extension, problems)
    for c in cands:
        opened = _open_checked(c)
        if isinstance(opened, DatasetProblem):
            problems.append(opened)
            continue
        caption = _resolve_caption(c, trigger, problems)
        if caption is None:
            continue
        sha, w, h, pix, thumb = opened
        result.examples.append(Example(c.image_path, caption, c.repeats, w, h, sha))
        result.fingerprints[c.image_path] = (pix, thumb)
    if not cands:
        hint = {"kohya": "the '<repeats>_<name>/' folders hold no images",
                "imagefolder": "the metadata names no images",
                "hf_disk": "the dataset has no rows"}.get(
            result.layout, f"expected {', '.join(IMAGE_EXTS)} files with captions, or kohya "
                           "'<repeats>_<name>/' folders such as 10_mystyle/")
        problems.append(DatasetProblem(root, "no_images", f"no training images found: {hint}"))
    return result


def format_problems(problems: list[DatasetProblem]) -> str:
    """One line per problem: `  [kind] file: message`."""
    return "\n".join(f"  [{p.kind}] {p.path}: {p.message}" for p in problems)


def load_examples(path: str | Path, *, caption_extension: str | None = None,
                  trigger: str | None = None, cache_dir: Path | None = None) -> list[Example]:
    """The dataset's examples; WorkbenchError naming every file that has an error-level fault."""
    result = scan_dataset(path, caption_extension=caption_extension, trigger=trigger,
                          cache_dir=cache_dir)
    errors = [p for p in result.problems if p.severity == "error"]
    if errors:
        raise WorkbenchError(f"dataset {result.path} ({result.layout} layout): {len(errors)} "
                             f"problem(s):\n{format_problems(errors)}")
    return result.examples


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB with transparent areas on white: PIL's plain convert would show hidden (often black) pixels."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def open_image(example: Example) -> Image.Image:
    """The example's pixels: RGB, EXIF-rotated, transparency on white; WorkbenchError if unreadable."""
    try:
        with Image.open(example.image_path) as im:
            im.load()
            return _to_rgb(ImageOps.exif_transpose(im))
    except _DECODE_ERRORS as e:
        raise WorkbenchError(f"{example.image_path}: not a readable image ({e})") from e
