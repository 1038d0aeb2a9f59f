"""Grid images: labels drawn where the layout says, scores printed, pages for big grids, infotext."""

import numpy as np
from PIL import Image

from workbench.grid import render
from workbench.pipeline.image_meta import format_parameters, read_png_metadata


def _grid(tmp_path, n_rows=2, n_cols=3, max_side=render.MAX_SIDE, metrics=("clip", "style")):
    images = {f"k{r}{c}": Image.new("RGB", (64, 64), (40 * r, 60 * c, 90)) for r in range(n_rows)
              for c in range(n_cols)}
    grid = [[f"k{r}{c}" for c in range(n_cols)] for r in range(n_rows)]
    grid[-1][-1] = None  # a missing cell stays blank
    info = format_parameters("a prompt", "", Script="X/Y/Z plot", **{"X Type": "model",
                                                                      "X Values": "v1, v2, v3"})
    return render.render_pages(
        title="my grid", z_label="", column_labels=[f"model v{c + 1}" for c in range(n_cols)],
        sub_labels=[""] * n_cols, row_labels=[f"prompt number {r}" for r in range(n_rows)], grid=grid,
        image_of=images.__getitem__, scores_of=lambda k: {"clip": 31.234, "style": 0.5},
        metrics=list(metrics), out_stem=tmp_path / "grid", infotext=info, max_side=max_side)


def _ink(img, box):
    """Dark pixels in a box (text is black on white)."""
    arr = np.asarray(img.crop(box).convert("L"))
    return int((arr < 128).sum())


def test_labels_and_scores_are_drawn(tmp_path):
    pages = _grid(tmp_path)
    assert len(pages) == 1 and pages[0].path == tmp_path / "grid.png"
    img = Image.open(pages[0].path)
    boxes = pages[0].label_boxes
    assert set(boxes) == {"col:model v1", "col:model v2", "col:model v3", "row:prompt number 0",
                          "row:prompt number 1"}
    for box in boxes.values():
        assert _ink(img, box) > 20  # the label's text is there
    # the first cell: the image is pasted unchanged (scaled up) and two score lines under it
    col0 = boxes["col:model v1"]
    row0 = boxes["row:prompt number 0"]
    cell = np.asarray(img.crop((col0[0], row0[1], col0[0] + 160, row0[1] + 160)))
    assert (cell == np.array([0, 0, 90])).all()
    strip = (col0[0], row0[1] + 160, col0[2], row0[1] + 160 + 2 * (render.SCORE_FONT + 4))
    assert _ink(img, strip) > 20
    assert render.score_lines({"clip": 31.234, "style": 0.5}, ["clip", "style"]) == \
        ["CLIP 31.23", "style 0.500"]


def test_label_text_is_the_label(tmp_path):
    """Redrawing a label's text alone gives the same pixels as in the grid (not just any ink)."""
    pages = _grid(tmp_path)
    img = Image.open(pages[0].path).convert("RGB")
    box = pages[0].label_boxes["col:model v2"]
    blank = Image.new("RGB", img.size, "white")
    from PIL import ImageDraw

    lines, size = render.wrap("model v2", box[2] - box[0] - render.PAD)
    render._draw_lines(ImageDraw.Draw(blank), lines, box, size)
    assert np.array_equal(np.asarray(img.crop(box)), np.asarray(blank.crop(box)))


def test_big_grids_are_split_into_pages(tmp_path):
    pages = _grid(tmp_path, n_rows=5, n_cols=6, max_side=800)
    assert len(pages) > 1
    for page in pages:
        w, h = Image.open(page.path).size
        assert w <= 800 and h <= 800
        assert all(f"col:{c}" in page.label_boxes for c in page.columns)  # every page has labels
    shown = {(r, c) for p in pages for r in p.rows for c in p.columns}
    assert len(shown) == 5 * 6  # each (row, column) is on exactly one page
    assert sum(len(p.rows) * len(p.columns) for p in pages) == 30
    assert pages[0].path.name == "grid_p1.png"


def test_grid_png_carries_xyz_infotext(tmp_path):
    pages = _grid(tmp_path)
    params, _ = read_png_metadata(pages[0].path)
    assert params["prompt"] == "a prompt"
    assert params["Script"] == "X/Y/Z plot" and params["X Type"] == "model"
    assert params["X Values"] == "v1, v2, v3"


def test_wrap_shrinks_then_cuts():
    lines, size = render.wrap("short", 300)
    assert lines == ["short"] and size == render.LABEL_FONT
    long = "a very long prompt about a lighthouse standing on a cliff at dusk " * 4
    lines, size = render.wrap(long, 150, max_lines=3)
    assert len(lines) == 3 and size == render.MIN_FONT and lines[-1].endswith("…")
    f = render.font(size)
    assert all(f.getlength(line) <= 150 for line in lines)
