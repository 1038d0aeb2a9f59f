"""End to end in headless Chromium: open the dashboard, run a merge of two tiny SD1.5 models from
the Merge page, watch the job finish on the Jobs page, find the result on the Models page.

Needs Debian's `chromium` (/usr/bin/chromium, installed by .ci/run) and the `playwright` Python
package (test extras); `playwright install` is never run. Screenshots go to outputs/e2e/.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("WORKBENCH_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
SHOTS = Path(__file__).resolve().parents[1] / "outputs" / "e2e"

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (`apt-get install -y chromium`, "
                "as .ci/run does) to run the browser test", allow_module_level=True)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is not installed: "
    "`pip install -e '.[test]'` (never `playwright install`; Debian's chromium is used)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path, tiny_sd15):
    from workbench.app import start, wait_healthy
    from workbench.app.config import AppConfig

    (tmp_path / "models").mkdir()
    for name in ("A", "B"):
        shutil.copy(tiny_sd15[name], tmp_path / "models" / f"{name}.safetensors")
    cfg = AppConfig(home=tmp_path, max_workers=1)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "streamlit.log", "wb")
    proc = start(cfg, "127.0.0.1", port, stdout=log, stderr=subprocess.STDOUT)
    try:
        assert wait_healthy(url, timeout=180, proc=proc), (tmp_path / "streamlit.log").read_text()
        yield url, tmp_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def settle(page) -> None:
    """Wait until the app is connected and its script has finished (Streamlit's e2e helpers)."""
    page.wait_for_selector("[data-testid='stApp'][data-test-connection-state='CONNECTED']",
                           timeout=120_000)
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']",
                           timeout=120_000)


def fill(page, label: str, text: str) -> None:
    box = page.get_by_label(label, exact=True)
    box.fill(text)
    box.press("Enter")
    settle(page)


@pytest.mark.slow
def test_merge_from_the_dashboard(server):
    url, home = server
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.set_default_timeout(120_000)
        try:
            page.goto(url)
            settle(page)
            page.get_by_role("link", name="Merge").first.click()
            settle(page)
            page.get_by_text("Input models").wait_for()
            fill(page, "Model 1 path", "models/A.safetensors")
            fill(page, "Model 2 path", "models/B.safetensors")
            page.get_by_role("button", name="Dry run").click()
            settle(page)
            page.get_by_text("problems: none").wait_for()
            page.screenshot(path=SHOTS / "1-merge-dry-run.png", full_page=True)
            page.get_by_role("button", name="Submit job").click()
            settle(page)
            page.get_by_text("job #1 queued").wait_for()

            page.get_by_role("link", name="Watch job #1 on the Jobs page").click()
            settle(page)
            page.get_by_text("#1 merge 'my-merge': done").first.wait_for(timeout=180_000)
            page.get_by_text("merge 'my-merge': wrote").first.wait_for()
            page.screenshot(path=SHOTS / "2-jobs-done.png", full_page=True)

            page.get_by_role("link", name="Models").first.click()
            settle(page)
            page.get_by_text("Details of").wait_for()
            select = page.get_by_test_id("stSelectbox").filter(has_text="Details of")
            select.click()
            page.get_by_role("option", name="outputs/merges/my-merge.safetensors").click()
            settle(page)
            page.get_by_text("Merge recipe stored in the file").wait_for()
            page.screenshot(path=SHOTS / "3-models-result.png", full_page=True)
        finally:
            browser.close()
    out = home / "outputs" / "merges" / "my-merge.safetensors"
    assert out.stat().st_size > 0
    assert (SHOTS / "3-models-result.png").stat().st_size > 0
