"""Screenshots of the dashboard with real content, in headless Chromium (issue #14's "Show").

    .venv/bin/python bench/screenshots.py --out docs/screenshots
    .venv/bin/python bench/screenshots.py --out /tmp/shots --pages merge,train --keep

It makes a temporary data folder with the tiny real-layout models of workbench/testing (two SD1.5
checkpoints, a tiny open_clip, a captioned style set), runs a merge, a short training (with samples)
and a 2 x 2 grid through the job worker's own `run_job` (so the job store holds what a worker
records: progress, log, metrics, results), adds a training job that stays "running" while the
pictures are taken (this process beats its heartbeat and moves its progress), leaves a draft in
the Merge and Train forms, starts the dashboard on a free port and saves one full-page PNG per page
into --out. Nothing waits a fixed time: each shot polls for the text that says its page is drawn,
up to --timeout seconds.

To add a page: append a `Shot` to SHOTS (its url path is the view's file name, and `ready` a text
that appears only once the content to show is there).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

CHROMIUM = os.environ.get("WORKBENCH_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
MAX_PNG_BYTES = 400_000  # larger shots are re-saved with a 256-colour palette


@dataclass(frozen=True)
class Shot:
    """One picture: the page's url path (views/<path>.py), a text that appears only once the
    content is drawn, and the PNG's name."""

    path: str
    ready: str
    name: str
    expand: str | None = None  # an expander to open before the picture (its label text)
    fill: tuple[tuple[str, str], ...] = ()  # (field label, text) typed into it, as a user would
    click: str | None = None  # then a button pressed (its label) ...
    shows: str | None = None  # ... and a text waited for


SHOTS = [
    Shot("merge", "done in", "merge.png", expand="Search merge weights toward my pictures",
         fill=(("Model A", "models/base-v1.safetensors"), ("Model B", "models/painterly.safetensors"),
               ("Folder of my pictures", "datasets/wbstyle"),
               ("Trials", "20"), ("Steps", "2"), ("Size", "64"), ("CLIP model", "tiny-open-clip"),
               ("CLIP weights (file or open_clip folder; empty: the Hugging Face cache)", "models/clip")),
         click="Dry run search", shows="estimated time"),
    Shot("train", "of the job", "train.png"),
    Shot("compare", "Verdict", "compare.png"),
    Shot("jobs", "Log", "jobs.png"),
]


# --------------------------------------------------------------------------------------------------
# the data folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_home(home: Path) -> dict[str, Path]:
    """Tiny models, a CLIP folder and a style set under `home`'s models/ and datasets/."""
    from workbench.testing import build_tiny
    from workbench.testing import clip as tiny_clip
    from workbench.testing.style_set import write_set

    for d in ("models", "outputs", "datasets", "recipes"):
        (home / d).mkdir(parents=True, exist_ok=True)
    paths = {name: build_tiny("sd15", home / "models" / f"{name}.safetensors", seed=seed)
             for name, seed in (("base-v1", 1), ("painterly", 2))}
    tiny_clip.build(home / "models" / "clip", seed=4)
    paths["clip"] = home / "models" / "clip"
    paths["style"] = Path(write_set(home / "datasets" / "wbstyle", count=4))
    return paths


def recipes(home: Path, p: dict[str, Path]) -> dict[str, str]:
    out = home / "outputs"
    return {
        "merge": f"""kind: merge
name: painterly-mix
models: {{A: {p['base-v1']}, B: {p['painterly']}}}
steps:
  - {{id: mix, method: weighted_sum, inputs: [A, B], alpha: 0.35}}
output: {{path: {out}/merges/painterly-mix.safetensors}}
""",
        "train": f"""kind: train
name: wbstyle
base: {p['base-v1']}
dataset: {p['style']}
trigger: wbstyle
resolution: 64
max_steps: 6
network: {{type: lora, rank: 2, alpha: 2}}
samples: {{every: 3, prompts: ["wbstyle, a lighthouse"], steps: 2, seed: 1}}
output: {{dir: {out}/loras/wbstyle, save_precision: fp32}}
""",
        "grid": f"""kind: grid
name: base-vs-painterly
defaults: {{model: {p['base-v1']}, sampler: "Euler a", steps: 2, cfg: 7.0, width: 64, height: 64}}
x: {{axis: model, values: [{p['base-v1']}, {p['painterly']}]}}
y: {{axis: prompt, values: ["a lighthouse at dusk", "portrait of a knight"]}}
seeds: [1]
scores:
  clip: {{weights: {p['clip']}}}
output: {{dir: {out}/grids/base-vs-painterly}}
""",
    }


def run_jobs(store, texts: dict[str, str]) -> None:
    """Each recipe as a job, run to its end by the worker's own code in this process."""
    from workbench.jobs.worker import run_job

    for kind in ("merge", "train", "grid"):
        name = next(line.split(":", 1)[1].strip() for line in texts[kind].splitlines()
                    if line.startswith("name:"))
        job_id = store.submit(kind, texts[kind], name=name)
        job = store.claim(pid=os.getpid())
        assert job is not None and job.id == job_id
        status = run_job(store, job)
        print(f"  {kind} job #{job_id}: {status}", flush=True)
        if status != "done":
            raise SystemExit(f"the {kind} job did not finish: {store.get(job_id).error}\n"
                             + "\n".join(store.log_tail(job_id, 30)))


class RunningTraining(threading.Thread):
    """A training job that stays "running" while the shots are taken: this process is its
    worker (heartbeat every second, so the pages do not reap it), and it reports sampling inside
    a training step, as the real loop does, with a loss curve."""

    def __init__(self, store, text: str) -> None:
        super().__init__(daemon=True)
        self.store = store
        self.job_id = store.submit("train", text.replace("name: wbstyle\n", "name: wbstyle-v2\n"),
                                   name="wbstyle-v2")  # same folder: its samples are shown
        store.claim(pid=os.getpid())
        self.halt = threading.Event()
        for step in range(1, 41):
            store.add_metrics(self.job_id, step, {"loss": 0.2 + 0.15 / step ** 0.5})
        store.log(self.job_id, "[training] 40/120 loss 0.2237", "[sampling] started")

    def run(self) -> None:
        tick = 0
        while not self.halt.wait(1.0):
            tick += 1
            phase = min(0.95, 0.45 + 0.05 * tick)  # step 41 of 120: sampling its previews
            self.store.report(self.job_id, progress=phase, eta_s=8.0, stage="sampling",
                              message=f"preview 1 of 1, {phase * 100:.0f}%",
                              overall=(40 + phase) / 120)


def write_drafts(home: Path, texts: dict[str, str]) -> None:
    """The Merge and Train forms as someone left them (app/drafts.py reads these on load)."""
    import yaml

    from workbench.app import drafts
    from workbench.app.config import AppConfig

    cfg = AppConfig(home=home)
    for kind, page in (("merge", "merge"), ("train", "train"), ("grid", "grid")):
        data = yaml.safe_load(texts[kind])
        drafts.write_draft(cfg, page, drafts.as_text(data))


# --------------------------------------------------------------------------------------------------
# the browser


def settle(page, timeout_ms: int) -> None:
    """Connected, and no script run in progress (Streamlit's own e2e helpers wait on these)."""
    page.wait_for_selector("[data-testid='stApp'][data-test-connection-state='CONNECTED']",
                           timeout=timeout_ms)
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']",
                           timeout=timeout_ms)


DRAWN = """() => !document.querySelector('[data-testid="stSkeleton"]')
    && Array.from(document.images).every(img => img.complete)"""


def wait_drawn(page, timeout_ms: int) -> None:
    """Until Streamlit has replaced its loading skeletons (elements that come into view are drawn
    lazily) and every image has loaded."""
    settle(page, timeout_ms)
    page.wait_for_function(DRAWN, timeout=timeout_ms, polling=250)


def shrink(png: Path) -> None:
    """Re-save a large shot with a 256-colour palette (text and charts stay sharp)."""
    from PIL import Image

    if png.stat().st_size <= MAX_PNG_BYTES:
        return
    with Image.open(png) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    tmp = png.with_name(png.name + ".tmp")
    small.save(tmp, format="PNG", optimize=True)
    os.replace(tmp, png)


MAX_HEIGHT = 12_000  # pixels: a runaway page does not make a giant picture
PAD = 40  # pixels below the content (a window as tall as the content measures that tall + PAD)


def content_height(page) -> int:
    """The height of the dashboard's scrolled content (its inner scroll container)."""
    height = page.evaluate("""() => Math.max(document.body.scrollHeight, ...Array.from(
        document.querySelectorAll('[data-testid="stMain"], [data-testid="stAppViewContainer"], '
                                  + '[data-testid="stMainBlockContainer"], section.main'),
        el => el.scrollHeight))""")
    return int(min(max(height + PAD, 800), MAX_HEIGHT))


def take(url: str, shots: list[Shot], out: Path, timeout_s: float, width: int) -> list[Path]:
    from playwright.sync_api import sync_playwright  # only this script needs a browser

    out.mkdir(parents=True, exist_ok=True)
    timeout_ms = int(timeout_s * 1000)
    written = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": 1000})
            page.set_default_timeout(timeout_ms)
            for shot in shots:
                page.goto(f"{url}/{shot.path}")
                settle(page, timeout_ms)
                page.get_by_text(shot.ready).first.wait_for(timeout=timeout_ms)
                settle(page, timeout_ms)
                if shot.expand:
                    page.get_by_text(shot.expand).first.click()
                    settle(page, timeout_ms)
                for label, text in shot.fill:
                    field = page.locator(f'input[aria-label="{label}"], textarea[aria-label="{label}"]').first
                    field.fill(text)
                    field.press("Enter")  # Streamlit takes a text input's value on Enter
                    settle(page, timeout_ms)
                if shot.click:
                    page.get_by_role("button", name=shot.click).click()
                    page.get_by_text(shot.shows).first.wait_for(timeout=timeout_ms)
                    settle(page, timeout_ms)
                # Streamlit scrolls an inner element, not the page: a "full page" shot of the
                # window would stop at the first screen, so the window is made as tall as the
                # content, as long as the content grows
                height = 0
                while (grown := content_height(page)) > height + PAD:  # images load: it grows
                    height = grown
                    page.set_viewport_size({"width": width, "height": height})
                    wait_drawn(page, timeout_ms)
                path = out / shot.name
                page.screenshot(path=str(path), full_page=True)
                page.set_viewport_size({"width": width, "height": 1000})
                shrink(path)
                print(f"  {path} ({path.stat().st_size // 1000} kB)", flush=True)
                written.append(path)
        finally:
            browser.close()
    return written


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for the PNGs")
    ap.add_argument("--pages", default=",".join(s.path for s in SHOTS),
                    help="comma-separated url paths to shoot (default: all)")
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="seconds to wait for the server and for each page's content")
    ap.add_argument("--width", type=int, default=1280, help="browser width in pixels")
    ap.add_argument("--keep", action="store_true", help="keep the temporary data folder")
    args = ap.parse_args(argv)
    wanted = [s for s in SHOTS if s.path in args.pages.split(",")]
    if not wanted:
        ap.error(f"--pages: none of {args.pages!r} is one of {', '.join(s.path for s in SHOTS)}")
    if not Path(CHROMIUM).exists():
        ap.error(f"{CHROMIUM} not found (Debian: apt-get install chromium; or set "
                 "WORKBENCH_CHROMIUM)")

    home = Path(tempfile.mkdtemp(prefix="wb-screens-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["WORKBENCH_CACHE"] = str(home / ".cache")  # never the user's cache
    from workbench.app import start, wait_healthy
    from workbench.app.config import AppConfig
    from workbench.jobs.store import JobStore

    server = running = None
    try:
        print(f"data folder {home}; building tiny models and running the jobs", flush=True)
        paths = make_home(home)
        texts = recipes(home, paths)
        cfg = AppConfig(home=home, spawn_workers=False)
        store = JobStore(cfg.db)
        run_jobs(store, texts)
        running = RunningTraining(store, texts["train"])
        running.start()
        write_drafts(home, texts)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(home / "streamlit.log", "wb")
        server = start(cfg, "127.0.0.1", port, stdout=log, stderr=subprocess.STDOUT)
        if not wait_healthy(url, timeout=args.timeout, proc=server):
            raise SystemExit("the dashboard did not start:\n"
                             + (home / "streamlit.log").read_text(errors="replace")[-3000:])
        print(f"dashboard at {url}; taking {len(wanted)} pictures", flush=True)
        take(url, wanted, args.out, args.timeout, args.width)
    finally:
        if running is not None:
            running.halt.set()
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
        if args.keep:
            print(f"kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
