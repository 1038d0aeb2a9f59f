"""Where the workbench keeps files of its own that a user may want to open: the per-user data folder.

The demo (workbench/demo.py) writes its tiny models and results here, never into the checkout.
The folder is chosen by what the machine offers, not by its OS name (docs/portability.md):
`$WORKBENCH_DATA` when set; `%LOCALAPPDATA%` where that variable exists (Windows); the per-user
`~/Library/Application Support` where that folder exists (macOS); else `$XDG_DATA_HOME` or
`~/.local/share` (the XDG base-directory rule of Linux and the BSDs). The workbench's folder is
`workbench` inside it. The cache has its own root (formats/hashes.cache_root): a cache may be
deleted at any time, data the user made may not.
"""

from __future__ import annotations

import os
from pathlib import Path

APP = "workbench"


def data_root() -> Path:
    """The workbench's per-user data folder (not created here)."""
    own = os.environ.get("WORKBENCH_DATA")
    if own:
        return Path(own).expanduser()
    local = os.environ.get("LOCALAPPDATA")
    if local:
        return Path(local) / APP
    mac = Path.home() / "Library" / "Application Support"
    if mac.is_dir():
        return mac / APP
    xdg = os.environ.get("XDG_DATA_HOME")
    if xdg and Path(xdg).is_absolute():  # the XDG rule: a relative value is ignored
        return Path(xdg) / APP
    return Path.home() / ".local" / "share" / APP
