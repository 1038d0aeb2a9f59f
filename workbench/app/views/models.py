"""Models page: what is in the models and outputs folders and in the A1111/Forge/ComfyUI installs
given with `--tool`: architecture, precision, size, hash, metadata and, for LoRAs, the trigger words
their training left in the file. Names, architectures and sizes come from the file headers at once;
AutoV2 hashes fill in from a background thread (workbench/formats/hash_fill.py) and its cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import streamlit as st

from workbench.app import forms
from workbench.errors import WorkbenchError
from workbench.formats.hash_fill import HashFiller
from workbench.formats.model_folders import KIND_TITLES, ModelFolders
from workbench.formats.scan import PICKLE_NOTE, scan, scan_install
from workbench.units import human_size
from workbench.formats.model_file import read_model_header
from workbench.formats.scan import summarize_metadata

S = st.session_state
LONG_VALUE = 400  # metadata values longer than this are shortened in the table


@st.cache_resource
def hash_filler() -> HashFiller:
    """One hashing queue per dashboard process, shared by every browser session."""
    return HashFiller()


def scan_roots(roots: list[Path], with_hash: bool = False,
               installs: list[ModelFolders] = ()) -> list[dict]:
    """Rows for the table: each install's folders by kind, then the other roots; a file reached
    twice is listed once. Nothing is hashed here unless `with_hash` (the page fills hashes in
    from a HashFiller instead)."""
    rows: list[dict] = []
    seen: set[str] = set()

    def add(base: Path, entries, label) -> None:
        for e in entries:
            file = base / e.path
            real = os.path.normcase(os.path.realpath(file))
            if real in seen:
                continue
            seen.add(real)
            rows.append({"file": str(file), "name": e.path, "folder": label(e),
                         "kind": e.kind or ("pickle" if e.unsafe else ""),
                         "arch": (e.arch or "") + (f" {e.variant}" if e.variant else ""),
                         "dtype": e.dtype or "", "size": human_size(e.size),
                         "hash": e.short_hash or "", "rank": e.rank,
                         "error": e.error or (PICKLE_NOTE if e.unsafe else ""),
                         "metadata": e.metadata, "hashable": not (e.unsafe or e.error or
                                                                   e.dtype == "GGUF")})

    for install in installs:
        add(install.root, scan_install(install, with_hash=with_hash),
            lambda e, tool=install.tool: f"{tool}: {KIND_TITLES.get(e.folder, e.folder)}")
    for root in roots:
        if root.is_dir():
            add(root, scan(root, with_hash=with_hash), lambda e, name=root.name: name)
    return rows


def fill_hashes(rows: list[dict], filler: HashFiller) -> int:
    """Put the known hashes into the rows and queue the rest; returns how many are missing."""
    wanted = [Path(r["file"]) for r in rows if r["hashable"] and not r["hash"]]
    known = filler.known(wanted)
    missing = 0
    for r in rows:
        path = Path(r["file"])
        if path in known and not r["hash"]:
            r["hash"] = known[path][:10]
        elif path in filler.errors and not r["error"]:
            r["error"] = filler.errors[path]
        elif r["hashable"] and not r["hash"]:
            missing += 1
    if missing:
        filler.add([p for p in wanted if p not in known])
        filler.start()
    return missing


def trigger_words(meta: dict[str, str], top: int = 20) -> list[str]:
    """Words a LoRA was trained with: modelspec trigger phrase, then the most frequent tags."""
    summary = summarize_metadata(meta, top=top)
    words = []
    if summary.get("trigger_phrase"):
        words += [w.strip() for w in str(summary["trigger_phrase"]).split(",") if w.strip()]
    words += [t for t in summary.get("top_tags", []) if t not in words]
    return words


def details(path: Path) -> None:
    try:
        header = read_model_header(path)  # GGUF files too
    except WorkbenchError as e:
        st.error(str(e))
        return
    meta = header.metadata
    words = trigger_words(meta)
    if words:
        st.markdown("**Trigger words / top tags:** " + ", ".join(f"`{w}`" for w in words))
    c1, c2 = st.columns(2)
    c1.metric("tensors", len(header.tensors))
    c2.metric("dtypes", header.dtype_summary())
    if meta:
        shown = {k: (v if len(v) <= LONG_VALUE else v[:LONG_VALUE] + f"... ({len(v)} chars)")
                 for k, v in sorted(meta.items())}
        with st.expander(f"Metadata ({len(meta)} keys)", expanded=False):
            st.json(shown)
        if meta.get("workbench_recipe") or "sd_merge_recipe" in meta:
            with st.expander("Merge recipe stored in the file"):
                if meta.get("workbench_recipe"):
                    st.code(meta["workbench_recipe"], language="yaml")
                else:
                    try:
                        st.json(json.loads(meta["sd_merge_recipe"]))
                    except ValueError:
                        st.code(meta["sd_merge_recipe"])
    else:
        st.caption("no metadata in this file")


COLUMNS = ("folder", "name", "kind", "arch", "dtype", "size", "hash", "error")


def render() -> None:
    st.title("Models")
    cfg = forms.config()
    try:
        installs = cfg.installs()
    except WorkbenchError as e:
        st.error(str(e))
        installs = []
    tool_folders = {os.path.normcase(os.path.realpath(p)) for i in installs for p in i.paths()}
    roots = [r for r in cfg.roots["models"] + cfg.roots["outputs"]
             if os.path.normcase(os.path.realpath(r)) not in tool_folders]
    where = [f"{i.tool} at `{i.root}`" for i in installs] + [f"`{r}`" for r in roots]
    st.caption("Listing " + ", ".join(where) + " (add folders with `workbench app --models DIR`, "
               "an A1111/Forge/ComfyUI install with `--tool ROOT`).")
    c1, c2 = st.columns([1, 3])
    with_hash = c1.checkbox("hashes (AutoV2)", value=True, key="models.hash")
    if c2.button("Rescan", key="models.rescan"):
        hash_filler().forget_errors()
    rows = scan_roots(roots, installs=installs)  # headers only: at once, whatever the sizes
    if not rows:
        st.info("No model files found yet.")
        return
    table(rows, with_hash)
    files = [r["file"] for r in rows]
    if S.get("models.selected") not in files:
        S["models.selected"] = files[0]
    st.selectbox("Details of", files, key="models.selected", format_func=lambda f: cfg.show(f))
    details(Path(S["models.selected"]))


def table(rows: list[dict], with_hash: bool) -> None:
    """The table, redrawn every second while the background thread hashes (a fragment: the rest
    of the page is not rerun); one full rerun when the last hash arrives."""
    filler = hash_filler()
    missing = fill_hashes(rows, filler) if with_hash else 0

    @st.fragment(run_every=1.0 if missing else None)
    def draw() -> None:
        left = fill_hashes(rows, filler) if with_hash else 0
        if missing and not left:
            st.rerun()  # all hashes in: a full run draws the table without the timer
        if left:
            done, total = filler.done_bytes, max(filler.total_bytes, 1)
            st.progress(min(done / total, 1.0),
                        text=f"hashing {left} files in the background ({human_size(done)} of "
                             f"{human_size(total)}); the list is usable meanwhile")
        st.dataframe([{k: r[k] for k in COLUMNS} for r in rows], hide_index=True,
                     width="stretch", key="models.table")

    draw()


if __name__ == "__main__":
    render()
