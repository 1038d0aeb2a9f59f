"""The Merge page's "Search merge weights" mode: a `kind: merge_search` recipe built from a few
fields, validated by the recipe loader, dry-run by `dispatch.build_plan` and queued through the same
job store as every other page (app/forms.py submit_job). The merge page calls `render_panel()`.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from workbench.app import forms
from workbench.app.views import choice_fields
from workbench.errors import WorkbenchError
from workbench.recipes.merge_search import SEARCH_METHODS, SPACES
from workbench.dispatch import build_plan

P = "msearch."


def panel_data(get, cfg) -> dict[str, Any]:
    """Widget values (read through `get(name)`) -> merge_search recipe data; paths are resolved
    against the dashboard's home folder as on the other forms."""
    def path(text: str) -> str:
        text = str(text or "").strip()
        return str(cfg.resolve(text)) if text else ""

    inputs = {"A": path(get("A")), "B": path(get("B"))}
    if get("method") == "add_difference":
        inputs["C"] = path(get("C"))
    data: dict[str, Any] = {"kind": "merge_search", "name": get("name"), "inputs": inputs,
                            "method": get("method"), "trials": int(get("trials")), "space": get("space"),
                            **choice_fields.section_data(get, path), "output": {"dir": path(get("out"))}}
    data["references"].setdefault("dir", "")  # required here: the loader names the empty field
    data["scores"]["adherence"] = get("adherence")
    return data


DEFAULTS = {"name": "my-search", "A": "", "B": "", "C": "", "method": "weighted_sum", "trials": 30,
            "space": "alpha", "adherence": "constraint", "out": "outputs/searches/my-search"}


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
        choice_fields.render(P, refs_label="Folder of my pictures",
                             refs_help="the style to aim at: your own pictures (png, jpg, webp)")
        c1, c2 = st.columns(2)
        c1.number_input("Trials", 1, 10_000, key=P + "trials")
        c2.selectbox("Adherence", ("constraint", "pareto"), key=P + "adherence",
                     help="constraint: no worse than the better input by more than the margin; "
                          "pareto: a second objective")
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
