"""The dashboard under Streamlit's AppTest: a workspace the config points at, and a page opened in it
(shared by tests/test_app_pages.py and tests/test_app_live.py)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from streamlit.testing.v1 import AppTest

from workbench.app.config import ENV, AppConfig

MAIN = Path(__file__).resolve().parents[2] / "workbench" / "app" / "main.py"


def make_workspace(root: Path, tiny_sd15: dict[str, Path], monkeypatch) -> Path:
    """models/ (tiny SD1.5 A and B), datasets/style (2 captioned images), outputs/, recipes/ under
    `root`; the dashboard config points at it and starts no workers."""
    for d in ("models", "outputs", "datasets/style", "recipes"):
        (root / d).mkdir(parents=True)
    for name in ("A", "B"):
        (root / "models" / f"{name}.safetensors").symlink_to(tiny_sd15[name])
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 80, 120)).save(root / f"datasets/style/{i}.png")
        (root / f"datasets/style/{i}.txt").write_text("a red house")
    monkeypatch.setenv(ENV, AppConfig(home=root, spawn_workers=False).to_json())
    return root


def open_page(page: str) -> AppTest:
    """The dashboard opened on `page` (a file name in workbench/app/views), with no exception."""
    at = AppTest.from_file(str(MAIN), default_timeout=180).run()
    at.switch_page(f"views/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at
