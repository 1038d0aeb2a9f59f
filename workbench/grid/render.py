"""The stitched grid image: axis labels on top and left, scores printed under every cell, pages.

Layout per z value: columns are the x values (and, when several seeds are used without a seed axis,
one sub-column per seed under its x label), rows are the y values. Labels are drawn at a fixed,
readable size whatever the image size, wrapped to the column and shrunk only down to MIN_FONT before
being cut with an ellipsis. Tiny images are enlarged (nearest neighbour) to MIN_CELL pixels so their
score lines fit. A grid larger than `max_side` pixels in either direction is split into pages (both
directions), each with its own labels, instead of one image no viewer can open (PNG and Pillow limits
are the usual failure of big A1111 grids).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw, ImageFont
from workbench.formats.writer import atomic_write_bytes
from workbench.pipeline.image_meta import png_bytes

LABEL_FONT = 22
MIN_FONT = 12
SCORE_FONT = 14
MIN_CELL = 160
PAD = 8
MAX_SIDE = 8192
SCORE_NAMES = {"clip": ("CLIP", "{:.2f}"), "aesthetic": ("aesthetic", "{:.3f}"),
               "style": ("style", "{:.3f}")}


def font(size: int) -> ImageFont.ImageFont:
    """Pillow's bundled scalable font (no system fonts needed)."""
    return ImageFont.load_default(size=size)


def _text_width(text: str, f) -> float:
    return f.getlength(text)


def wrap(text: str, width: int, size: int = LABEL_FONT, max_lines: int = 3) -> tuple[list[str], int]:
    """(lines, font size): words wrapped to `width` pixels, the font shrunk until the text fits in
    `max_lines`; below MIN_FONT the last line is cut with an ellipsis."""
    for s in range(size, MIN_FONT - 1, -2):
        lines = _wrap_words(text, width, font(s))
        if len(lines) <= max_lines:
            return lines, s
    f = font(MIN_FONT)
    lines = _wrap_words(text, width, f)[:max_lines]
    last = lines[-1]
    while last and _text_width(last + "…", f) > width:
        last = last[:-1]
    lines[-1] = last + "…"
    return lines, MIN_FONT


def _wrap_words(text: str, width: int, f) -> list[str]:
    lines: list[str] = []
    for paragraph in str(text).split("\n"):
        line = ""
        for word in paragraph.split(" "):
            trial = f"{line} {word}".strip()
            if _text_width(trial, f) <= width or not line:
                line = trial
            else:
                lines.append(line)
                line = word
            while _text_width(line, f) > width and len(line) > 1:  # a word longer than the column
                cut = max(1, int(len(line) * width / max(_text_width(line, f), 1)))
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line)
    return lines


def score_lines(scores: dict[str, float], metrics: list[str]) -> list[str]:
    out = []
    for m in metrics:
        name, fmt = SCORE_NAMES.get(m, (m, "{:.3f}"))
        v = scores.get(m)
        out.append(f"{name} {fmt.format(v)}" if v is not None else f"{name} –")
    return out


@dataclass
class PageCell:
    key: str
    row: int
    col: int
    column_label: str
    sub_label: str


@dataclass
class Page:
    """One grid image: which rows and columns of the z slice it shows, and where labels went."""

    path: Path
    z_label: str
    columns: list[str]
    rows: list[str]
    label_boxes: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)


def _draw_lines(draw, lines, box, size, fill=(0, 0, 0)) -> None:
    x0, y0, x1, y1 = box
    f = font(size)
    line_h = size + 4
    y = y0 + (y1 - y0 - line_h * len(lines)) // 2
    for line in lines:
        w = _text_width(line, f)
        draw.text((x0 + (x1 - x0 - w) / 2, y), line, font=f, fill=fill)
        y += line_h


def render_pages(*, title: str, z_label: str, column_labels: list[str], sub_labels: list[str],
                 row_labels: list[str], grid: list[list[str | None]], image_of: Callable[[str], Image.Image],
                 scores_of: Callable[[str], dict], metrics: list[str], out_stem: Path,
                 fmt: str = "png", infotext: str | None = None, max_side: int = MAX_SIDE) -> list[Page]:
    """Draw one z slice: `grid[r][c]` is the cell key at row r, column c (None: empty)."""
    first = next((k for row in grid for k in row if k), None)
    sample = image_of(first) if first else Image.new("RGB", (64, 64), "white")
    scale = max(1, math.ceil(MIN_CELL / max(1, min(sample.size))))
    cw, ch = sample.width * scale, sample.height * scale
    score_h = (SCORE_FONT + 4) * len(metrics) + (PAD if metrics else 0)
    col_w, row_h = cw + PAD, ch + score_h + PAD
    head_h = 3 * (LABEL_FONT + 4) + PAD
    sub_h = (SCORE_FONT + 8) if any(sub_labels) else 0
    title_h = LABEL_FONT + 2 * PAD
    left_w = max(200, min(360, cw))
    per_row = max(1, (max_side - left_w - PAD) // col_w)
    per_col = max(1, (max_side - head_h - sub_h - title_h - PAD) // row_h)
    n_rows, n_cols = len(row_labels), len(column_labels)
    row_chunks = [range(r, min(r + per_col, n_rows)) for r in range(0, n_rows, per_col)]
    col_chunks = [range(c, min(c + per_row, n_cols)) for c in range(0, n_cols, per_row)]
    pages = []
    n_pages = len(row_chunks) * len(col_chunks)
    for p, (rows, cols) in enumerate((r, c) for r in row_chunks for c in col_chunks):
        width = left_w + col_w * len(cols) + PAD
        height = title_h + head_h + sub_h + row_h * len(rows) + PAD
        canvas = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(canvas)
        page_title = title + (f"  ·  {z_label}" if z_label else "") + \
            (f"  ·  page {p + 1}/{n_pages}" if n_pages > 1 else "")
        lines, size = wrap(page_title, width - 2 * PAD, LABEL_FONT, 1)
        _draw_lines(draw, lines, (PAD, PAD, width - PAD, title_h), size)
        boxes: dict[str, tuple[int, int, int, int]] = {}
        # column labels, merged over neighbouring columns with the same label (seed sub-columns)
        c = 0
        cols_l = list(cols)
        while c < len(cols_l):
            span = 1
            while c + span < len(cols_l) and column_labels[cols_l[c + span]] == column_labels[cols_l[c]]:
                span += 1
            x0 = left_w + c * col_w
            box = (x0, title_h, x0 + span * col_w, title_h + head_h - PAD)
            text = column_labels[cols_l[c]]
            lines, size = wrap(text, box[2] - box[0] - PAD)
            _draw_lines(draw, lines, box, size)
            boxes.setdefault(f"col:{text}", box)
            c += span
        for i, col in enumerate(cols_l):
            if sub_labels[col]:
                x0 = left_w + i * col_w
                box = (x0, title_h + head_h - PAD, x0 + col_w, title_h + head_h + sub_h - PAD)
                _draw_lines(draw, [sub_labels[col]], box, SCORE_FONT, (80, 80, 80))
        top = title_h + head_h + sub_h
        for j, row in enumerate(rows):
            y0 = top + j * row_h
            box = (PAD, y0, left_w - PAD, y0 + ch)
            if row_labels[row]:
                lines, size = wrap(row_labels[row], box[2] - box[0], LABEL_FONT, 5)
                _draw_lines(draw, lines, box, size)
                boxes.setdefault(f"row:{row_labels[row]}", box)
            for i, col in enumerate(cols_l):
                key = grid[row][col]
                x0 = left_w + i * col_w
                if key is None:
                    continue
                img = image_of(key).convert("RGB")
                if img.size != (cw, ch):
                    img = img.resize((cw, ch), Image.NEAREST)
                canvas.paste(img, (x0, y0))
                lines = score_lines(scores_of(key), metrics)
                f = font(SCORE_FONT)
                for n, line in enumerate(lines):
                    draw.text((x0 + 2, y0 + ch + 4 + n * (SCORE_FONT + 4)), line, font=f, fill=(0, 0, 0))
        suffix = "" if n_pages == 1 else f"_p{p + 1}"
        path = out_stem.with_name(out_stem.name + suffix + "." + fmt)
        _save(canvas, path, fmt, infotext)
        pages.append(Page(path, z_label, [column_labels[i] for i in cols_l],
                          [row_labels[i] for i in rows], boxes))
    return pages


def _save(canvas: Image.Image, path: Path, fmt: str, infotext: str | None) -> None:
    if fmt == "png":
        atomic_write_bytes(path, png_bytes(canvas, infotext or ""), overwrite=True)
        return
    import io

    buf = io.BytesIO()
    canvas.save(buf, format="JPEG" if fmt == "jpg" else fmt.upper(), quality=92)
    atomic_write_bytes(path, buf.getvalue(), overwrite=True)
