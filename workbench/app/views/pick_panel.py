"""The Train page's "Pick step and strength" panel: a `kind: pick` job for a training output folder.

It builds the same PickRecipe as `workbench pick` (workbench/recipes/pick.py), runs its dry run
(workbench/kinds/pick.py) and submits it through the job queue like every other form
(forms.submit_job), so the job runs, resumes and shows on the Jobs page as any other kind.
The folder defaults to the output folder of the training job chosen in the page's progress view.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from workbench.app import forms
from workbench.app.config import AppConfig
from workbench.app.views import choice_fields
from workbench.errors import WorkbenchError
from workbench.recipes.pick import PickRecipe
from workbench.dispatch import build_plan

P = "train.pick"
S = st.session_state


def k(name: str) -> str:
    return f"{P}.{name}"


def recipe_of_panel(cfg: AppConfig) -> PickRecipe:
    """The pick recipe the panel's fields describe (a validation error names the field)."""
    folder = cfg.check(str(S.get(k("training")) or ""), ("outputs",))

    def path(text: str) -> str:
        return str(cfg.check(str(text), ("models", "outputs", "datasets")))

    data = {"name": f"{Path(folder).name}-pick", "training": str(folder),
            "strengths": S.get(k("strengths")) or "0.4-1.2 [5]",
            **choice_fields.section_data(lambda name: S.get(k(name)), path),
            "output": {"overwrite": bool(S.get(k("overwrite")))}}
    return PickRecipe.model_validate(data)


def _default_folder(train_job) -> str:
    recipe = forms.recipe_of(train_job) if train_job is not None else None
    return str(recipe.output.dir) if recipe is not None else ""


def render(cfg: AppConfig | None = None) -> None:
    """The panel: folder, strengths, CLIP scorer, and the button that submits a pick job."""
    cfg = cfg or forms.config()
    chosen = S.get("train.results_job")  # the job shown in the Train page's progress view
    train_job = forms.job_store().get(chosen) if chosen is not None else None
    st.subheader("Pick step and strength")
    st.caption("Score every saved step at several strengths for style (against your training "
               "pictures, part held out for the check) and prompt adherence; the chosen step is "
               "written under the LoRA's name with its A1111 sidecar (`preferred weight`).")
    if k("training") not in S or (train_job is not None and S.get(k("for_job")) != train_job.id):
        S[k("training")] = _default_folder(train_job)
        S[k("for_job")] = train_job.id if train_job is not None else None
    c1, c2 = st.columns([3, 1])
    c1.text_input("Training output folder", key=k("training"))
    c2.text_input("Strengths", value="0.4-1.2 [5]", key=k("strengths"),
                  help="LoRA strengths to try, e.g. '0.4-1.2 [5]' or '0.6, 0.8, 1.0'; 1.0 is always tried")
    choice_fields.render(P + ".", refs_label="Pictures of the style (empty: the training pictures)",
                         refs_help="a folder of your own pictures; by default the dataset the LoRA "
                                   "was trained on")
    st.checkbox("overwrite an existing chosen LoRA", key=k("overwrite"))
    if st.button("Pick step and strength", key=k("submit"), type="primary"):
        # the kinds (diffusers, peft) load on the click, not with the page (as forms.py does)

        try:
            recipe = recipe_of_panel(cfg)
            plan = build_plan(recipe)
        except (WorkbenchError, ValueError) as e:
            st.error(str(e))
            return
        if not plan.ok:
            st.error("the pick's dry run found problems:\n" + "\n".join(plan.problems))
            st.code(plan.render(), language=None)
            return
        job_id = forms.submit_job(recipe, cfg)
        S[k("last_job")] = job_id
        st.success(f"job #{job_id} queued: pick '{recipe.name}'")
        st.code(plan.render(), language=None)
