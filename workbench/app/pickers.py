"""Pick a model, LoRA or dataset from the configured folders instead of typing its path.

Each picker is a select box beside a path field: choosing a file writes its path into the field
(or, for LoRA lists, adds a `path:1` line), and the field stays free text, so a path the lists do
not show can still be typed. Model files are listed from the models and outputs folders (those of
A1111/Forge/ComfyUI installs given with `--tool` included, app/config.py) with the architecture
and kind the scan detects from each file's header (workbench/formats/scan.py); the scan of a
folder is cached for `SCAN_TTL_S`, so pages stay quick while files arrive.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from workbench.app.config import AppConfig
from workbench.formats.scan import scan
from workbench.plan import IMAGE_SUFFIXES  # what the dry run counts as a dataset's pictures

SCAN_TTL_S = 30.0
MODEL_KINDS = ("checkpoint", "unet", "transformer")  # what a model field takes
LORA_KINDS = ("lora",)


@dataclass(frozen=True)
class Choice:
    path: str    # absolute
    label: str   # what the list shows: shown path · architecture kind


@st.cache_data(ttl=SCAN_TTL_S, show_spinner=False)
def scan_folder(root: str) -> list[tuple[str, str, str, str]]:
    """(absolute path, architecture, variant, kind) of every readable model file under root;
    headers only, no hashing."""
    base = Path(root)
    if not base.is_dir():
        return []
    out = []
    for e in scan(base, with_hash=False):
        if e.error or e.unsafe:
            continue
        path = Path(e.path) if Path(e.path).is_absolute() else base / e.path
        out.append((str(path), e.arch or "", e.variant or "", e.kind or ""))
    return out


def arch_text(arch: str, variant: str, kind: str) -> str:
    """"sd15 checkpoint", "sdxl lora", "flux dev transformer"; "unknown" when nothing detected."""
    words = [w for w in (arch, variant, kind) if w]
    return " ".join(words) if words else "unknown"


def model_choices(cfg: AppConfig, kinds: tuple[str, ...]) -> list[Choice]:
    """Model files of these kinds in the models and outputs folders, each path once."""
    seen, out = set(), []
    for root in cfg.roots["models"] + cfg.roots["outputs"]:
        for path, arch, variant, kind in scan_folder(str(root)):
            if kind not in kinds or path in seen:
                continue
            seen.add(path)
            out.append(Choice(path, f"{cfg.show(path)} · {arch_text(arch, variant, kind)}"))
    return sorted(out, key=lambda c: c.label.lower())


def dataset_choices(cfg: AppConfig) -> list[Choice]:
    """Folders in the datasets folders that hold images (their own or in sub-folders, as the
    kohya `10_name` layout has them), with the image count."""
    out = []
    for root in cfg.roots["datasets"]:
        if not root.is_dir():
            continue
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            n = sum(1 for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if n:
                out.append(Choice(str(folder), f"{cfg.show(folder)} · {n} images"))
    return out


def _fill(target: str, source: str, append: bool, cfg: AppConfig) -> None:
    chosen = st.session_state.get(source)
    if not chosen:
        return
    shown = cfg.show(chosen)
    if append:  # LoRA lists: one "path:weight" line per LoRA
        current = (st.session_state.get(target) or "").rstrip("\n")
        st.session_state[target] = f"{current}\n{shown}:1" if current else f"{shown}:1"
    else:
        st.session_state[target] = shown
    st.session_state[source] = ""  # ready for the next pick


def picker(target: str, choices: list[Choice], cfg: AppConfig, what: str = "a model",
           append: bool = False, container=None, beside_label: bool = True) -> None:
    """A select box that fills the path field with widget key `target` (append: add a line);
    `beside_label`: keep a label's height free, to line up with a labelled field beside it."""
    where = container if container is not None else st
    by_path = {c.path: c.label for c in choices}
    source = f"{target}.pick"
    if st.session_state.get(source) not in ("", None, *by_path):
        st.session_state[source] = ""
    where.selectbox(f"pick {what}", [""] + list(by_path), key=source,
                    format_func=lambda p: by_path.get(p, "") if p else
                    (f"pick {what}…" if by_path else f"no {what} in the folders"),
                    on_change=_fill, args=(target, source, append, cfg),
                    label_visibility="hidden" if beside_label else "collapsed",
                    disabled=not by_path)
