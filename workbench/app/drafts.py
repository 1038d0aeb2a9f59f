"""The form being edited, kept as a recipe file: a reload (or a new browser tab) gets it back.

Every form page writes what its widgets hold, as recipe YAML, to `<data folder>/drafts/<page>.yaml`
(next to the job store, app/config.py) whenever it changes, and a fresh session loads that draft
into the form before the widgets are drawn (forms.init_state). The draft is the same recipe data
the form validates, fields the widgets do not show included, so it may be incomplete or invalid:
it is loaded as it is and validated like anything typed. A draft that cannot be read is left
aside (the form starts from its defaults) rather than breaking the page.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from workbench.app.config import AppConfig
from workbench.formats.writer import atomic_write_text

FOLDER = "drafts"


def draft_path(cfg: AppConfig, page: str) -> Path:
    """Where the draft of one form page (by its widget prefix: merge, train, grid, generate)
    lives: the dashboard's data folder, which holds the job store."""
    return Path(cfg.db).parent / FOLDER / f"{page}.yaml"


def as_text(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def read_draft(cfg: AppConfig, page: str, kind: str) -> dict | None:
    """The saved form data of this page, or None (none saved, unreadable, another kind)."""
    path = draft_path(cfg, page)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(data, dict) or data.get("kind") != kind:
        return None
    return data


def write_draft(cfg: AppConfig, page: str, text: str) -> Path:
    """Replace the draft (temp file, then rename: a reload never reads half a file)."""
    path = draft_path(cfg, page)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, text, overwrite=True)


def remove_draft(cfg: AppConfig, page: str) -> None:
    draft_path(cfg, page).unlink(missing_ok=True)
