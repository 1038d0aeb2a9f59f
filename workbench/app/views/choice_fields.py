"""The fields both choosing panels share: pick (Train page, views/pick_panel.py) and merge search
(Merge page, views/merge_search_panel.py).

Both recipes write their pictures, seeds, prompts, generation and scores the same way
(workbench/recipes/choice.py); one renderer for those fields keeps the two panels asking the same
questions with the same words and defaults, and `section_data` turns the answers into those recipe
sections. Empty optional fields are left out, so the recipe's own default applies (the shipped
prompts, the training dataset, the model's native size).
"""

from __future__ import annotations

from typing import Any, Callable

import streamlit as st

DEFAULTS: dict[str, Any] = {"refs": "", "held_out": 0.3, "prompts": "", "selection": "1, 2",
                            "evaluation": "101, 102, 103", "steps": 20, "size": 0, "margin": 1.0,
                            "clip_model": "ViT-L-14", "clip": ""}


def seeds_value(text: str) -> list[int] | str:
    """'1, 2, 3' -> [1, 2, 3]; other text (a range such as '1-4') is kept for the recipe to read
    or to refuse naming the field."""
    try:
        return [int(s) for s in str(text).replace(",", " ").split()]
    except ValueError:
        return str(text).strip()


def render(prefix: str, *, refs_label: str, refs_help: str) -> None:
    """The shared widgets, keyed `prefix + name` (names as in DEFAULTS)."""
    for name, value in DEFAULTS.items():
        st.session_state.setdefault(prefix + name, value)
    c1, c2 = st.columns([3, 1])
    c1.text_input(refs_label, key=prefix + "refs", help=refs_help)
    c2.number_input("held out", 0.05, 0.95, step=0.05, key=prefix + "held_out",
                    help="share of the pictures kept out of choosing, to check the choice on")
    st.text_area("Prompts (one per line; empty: the shipped set of everyday subjects)",
                 key=prefix + "prompts")
    c1, c2, c3, c4 = st.columns(4)
    c1.text_input("Selection seeds", key=prefix + "selection", help="seeds the choice is made on")
    c2.text_input("Evaluation seeds", key=prefix + "evaluation",
                  help="seeds that only check the choice; never a selection seed")
    c3.number_input("Steps", 1, 150, key=prefix + "steps", help="sampling steps per picture")
    c4.number_input("Size", 0, 2048, step=64, key=prefix + "size",
                    help="width and height of every picture; 0: the default (the training "
                         "resolution for a pick, the model's native size for a search)")
    c1, c2, c3 = st.columns([1, 1, 2])
    c1.number_input("Margin (CLIP points)", 0.0, 100.0, key=prefix + "margin",
                    help="prompt adherence the choice may give up against its baseline")
    c2.text_input("CLIP model", key=prefix + "clip_model")
    c3.text_input("CLIP weights (file or open_clip folder; empty: the Hugging Face cache)",
                  key=prefix + "clip")


def section_data(get: Callable[[str], Any], path: Callable[[str], str]) -> dict[str, Any]:
    """The recipe sections the widgets describe (`get(name)` reads a widget, `path(text)` resolves
    a path against the dashboard's folders)."""
    data: dict[str, Any] = {
        "seeds": {"selection": seeds_value(get("selection")), "evaluation": seeds_value(get("evaluation"))},
        "references": {"held_out_fraction": float(get("held_out"))},
        "generation": {"steps": int(get("steps"))},
        "scores": {"adherence_margin": float(get("margin"))},
    }
    prompts = [p.strip() for p in str(get("prompts") or "").splitlines() if p.strip()]
    if prompts:
        data["prompts"] = prompts
    refs = str(get("refs") or "").strip()
    if refs:
        data["references"]["dir"] = path(refs)
    if int(get("size") or 0):
        data["generation"].update(width=int(get("size")), height=int(get("size")))
    clip = {"model": str(get("clip_model") or "").strip()}
    weights = str(get("clip") or "").strip()
    if weights:
        clip["weights"] = path(weights)
    data["scores"]["clip"] = {k: v for k, v in clip.items() if v}
    return data
