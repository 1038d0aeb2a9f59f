"""Models page: what is in the models and outputs folders: architecture, precision, size, hash,
metadata and, for LoRAs, the trigger words their training left in the file."""

from __future__ import annotations

import json
from pathlib import Path

import streamlit as st

from workbench.app import forms
from workbench.errors import WorkbenchError

S = st.session_state
LONG_VALUE = 400  # metadata values longer than this are shortened in the table


def scan_roots(roots: list[Path], with_hash: bool) -> list[dict]:
    from workbench.formats.scan import human_size, scan

    rows = []
    for root in roots:
        if not root.is_dir():
            continue
        for e in scan(root, with_hash=with_hash):
            rows.append({"file": str(root / e.path), "name": e.path, "folder": root.name,
                         "kind": e.kind or ("unsafe pickle" if e.unsafe else ""),
                         "arch": (e.arch or "") + (f" {e.variant}" if e.variant else ""),
                         "dtype": e.dtype or "", "size": human_size(e.size),
                         "hash": e.short_hash or "", "rank": e.rank,
                         "error": e.error or "", "metadata": e.metadata})
    return rows


def trigger_words(meta: dict[str, str], top: int = 20) -> list[str]:
    """Words a LoRA was trained with: modelspec trigger phrase, then the most frequent tags."""
    from workbench.formats.scan import summarize_metadata

    summary = summarize_metadata(meta, top=top)
    words = []
    if summary.get("trigger_phrase"):
        words += [w.strip() for w in str(summary["trigger_phrase"]).split(",") if w.strip()]
    words += [t for t in summary.get("top_tags", []) if t not in words]
    return words


def details(path: Path) -> None:
    from workbench.formats.model_file import read_model_header

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


def render() -> None:
    st.title("Models")
    cfg = forms.config()
    roots = cfg.roots["models"] + cfg.roots["outputs"]
    st.caption("Scanning " + ", ".join(f"`{r}`" for r in roots)
               + " (add folders with `workbench app --models DIR`).")
    c1, c2 = st.columns([1, 3])
    with_hash = c1.checkbox("hashes (AutoV2)", value=True, key="models.hash")
    c2.button("Rescan", key="models.rescan")
    rows = scan_roots(roots, with_hash)
    if not rows:
        st.info("No model files found yet.")
        return
    st.dataframe([{k: r[k] for k in ("folder", "name", "kind", "arch", "dtype", "size", "hash",
                                     "error")} for r in rows],
                 hide_index=True, width="stretch", key="models.table")
    files = [r["file"] for r in rows]
    if S.get("models.selected") not in files:
        S["models.selected"] = files[0]
    st.selectbox("Details of", files, key="models.selected", format_func=lambda f: cfg.show(f))
    details(Path(S["models.selected"]))


if __name__ == "__main__":
    render()
