"""The Merge page's "Search merge weights" mode: a `kind: merge_search` recipe built from a few
fields, validated by the recipe loader, dry-run by `dispatch.build_plan` and queued through the same
job store as every other page (app/forms.py submit_job). The merge page calls `render_panel()`.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from workbench.app import forms
from workbench.errors import WorkbenchError
from workbench.recipes.merge_search import SEARCH_METHODS, SPACES
from workbench.dispatch import build_plan

P = "msearch."


def _seeds(text: str) -> list[int] | str:
    """'1, 2, 3' -> [1, 2, 3]; anything else is kept as text so the validator names the field."""
    try:
        return [int(s) for s in str(text).replace(",", " ").split()]
    except ValueError:
        return str(text)


def panel_data(get, cfg) -> dict[str, Any]:
    """Widget values (read through `get(name)`) -> merge_search recipe data; paths are resolved
    against the dashboard's home folder as on the other forms."""
    def path(name: str) -> str:
        text = str(get(name) or "").strip()
        return str(cfg.resolve(text)) if text else ""

    inputs = {"A": path("A"), "B": path("B")}
    if get("method") == "add_difference":
        inputs["C"] = path("C")
    data: dict[str, Any] = {
        "kind": "merge_search", "name": get("name"), "inputs": inputs, "method": get("method"),
        "references": {"dir": path("refs"), "held_out_fraction": float(get("held_out"))},
        "prompts": [p.strip() for p in str(get("prompts")).splitlines() if p.strip()],
        "seeds": {"selection": _seeds(get("selection")), "evaluation": _seeds(get("evaluation"))},
        "trials": int(get("trials")), "space": get("space"),
        "generation": {"steps": int(get("steps"))},
        "scores": {"adherence": get("adherence"), "adherence_margin": float(get("margin"))},
        "output": {"dir": path("out")},
    }
    if int(get("size") or 0):  # 0: the model's native size
        data["generation"].update(width=int(get("size")), height=int(get("size")))
    if get("clip"):
        data["scores"]["clip"] = {"model": get("clip_model"), "weights": path("clip")}
    return data


DEFAULTS = {"name": "my-search", "A": "", "B": "", "C": "", "method": "weighted_sum", "refs": "",
            "held_out": 0.3, "prompts": "a lighthouse at dusk\nportrait of a knight",
            "selection": "1, 2", "evaluation": "101, 102, 103", "trials": 30, "space": "alpha",
            "adherence": "constraint", "margin": 1.0, "steps": 20, "size": 0, "clip_model": "ViT-L-14",
            "clip": "", "out": "outputs/searches/my-search"}


def render_panel() -> None:
    """The search mode, in an expander under the merge form."""
    with st.expander("Search merge weights toward my pictures (merge_search)", expanded=False):
        for name, value in DEFAULTS.items():
            st.session_state.setdefault(P + name, value)
        st.caption("Each trial merges in memory (no file per trial) and scores style against your "
                   "pictures and CLIP adherence; part of the pictures and the evaluation seeds are "
                   "held out to check the best against both inputs.")
        c1, c2, c3 = st.columns(3)
        c1.text_input("Search name", key=P + "name")
        c2.selectbox("Method", SEARCH_METHODS, key=P + "method")
        c3.selectbox("Search space", SPACES, key=P + "space",
                     help="alpha: one weight; block_groups: BASE/IN/MID/OUT; blocks: every block")
        c1, c2, c3 = st.columns(3)
        c1.text_input("Model A", key=P + "A")
        c2.text_input("Model B", key=P + "B")
        c3.text_input("Model C (add_difference)", key=P + "C")
        c1, c2 = st.columns([3, 1])
        c1.text_input("Folder of my pictures", key=P + "refs")
        c2.number_input("held out", 0.05, 0.95, step=0.05, key=P + "held_out")
        st.text_area("Prompts (one per line)", key=P + "prompts")
        c1, c2, c3, c4 = st.columns(4)
        c1.text_input("Selection seeds", key=P + "selection")
        c2.text_input("Evaluation seeds", key=P + "evaluation")
        c3.number_input("Trials", 1, 10_000, key=P + "trials")
        c4.selectbox("Adherence", ("constraint", "pareto"), key=P + "adherence")
        c1, c2, c3, c4 = st.columns(4)
        c1.number_input("Margin (CLIP points)", 0.0, 100.0, key=P + "margin")
        c2.number_input("Steps", 1, 150, key=P + "steps")
        c3.number_input("Size", 0, 2048, step=64, key=P + "size",
                        help="width and height of every picture; 0: the model's native size")
        c4.text_input("CLIP model", key=P + "clip_model")
        st.text_input("CLIP weights (file or open_clip folder; empty: the Hugging Face cache)", key=P + "clip")
        st.text_input("Output folder", key=P + "out")
        cfg = forms.config()
        recipe, problems = forms.validate(panel_data(lambda n: st.session_state[P + n], cfg))
        if recipe is not None:
            problems = forms.path_problems_of(recipe, cfg, set())
            recipe = None if problems else recipe
        if not any(st.session_state[P + n] for n in ("A", "B", "refs")):
            st.caption("Fill in models A and B and the folder of your pictures to dry-run a search.")
        else:  # nothing is flagged before the user acts
            for field, message in problems:
                st.error(f"{field}: {message}" if field else message)
        c1, c2 = st.columns(2)
        if c1.button("Dry run search", key=P + "dry", disabled=recipe is None):
            try:
                plan = build_plan(recipe)
                st.session_state[P + "plan"] = (plan.render(), plan.ok)
            except WorkbenchError as e:
                st.session_state[P + "plan"] = (str(e), False)
        saved = st.session_state.get(P + "plan")
        if saved:
            st.code(saved[0], language=None)
        if c2.button("Submit search job", key=P + "submit", type="primary",
                     disabled=recipe is None or not (saved and saved[1])):
            job_id = forms.submit_job(recipe, cfg)
            st.session_state["jobs.selected"] = job_id
            st.session_state[P + "plan"] = None
            st.success(f"job #{job_id} queued: merge_search '{recipe.name}'")
            st.page_link(forms.JOBS_PAGE, label=f"Watch job #{job_id} on the Jobs page",
                         icon=":material/schedule:")
