"""The top of HTML reports as PNGs, in headless Chromium (the reports' counterpart of screenshots.py).

    workbench demo --out /tmp/wbdemo
    .venv/bin/python bench/report_screenshots.py docs/screenshots \
        grid-report=/tmp/wbdemo/grids/demo-grid/report.html \
        pick-report=/tmp/wbdemo/loras/demo-style/pick/report.html \
        merge-search-report=/tmp/wbdemo/searches/demo-search/report.html

Each NAME=REPORT pair gives NAME.png: the first 1280 x 1000 pixels, what a person sees on opening
it (the verdict, the plot and the grid). Chromium is $WORKBENCH_CHROMIUM or /usr/bin/chromium.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM = os.environ.get("WORKBENCH_CHROMIUM", "/usr/bin/chromium")


def main(argv: list[str]) -> int:
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        print(__doc__)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        for name, report in (a.split("=", 1) for a in argv[1:]):
            page.goto(Path(report).resolve().as_uri())
            page.wait_for_load_state("load")
            page.screenshot(path=str(out / f"{name}.png"))
            print(f"  {out / f'{name}.png'}")
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
