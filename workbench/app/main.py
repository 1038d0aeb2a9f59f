"""The dashboard's entry script (`streamlit run workbench/app/main.py`): navigation and sidebar.

Every page edits recipes and submits them as jobs, or reads the job store and result files; the
work itself happens in worker processes (workbench.jobs.worker).
"""

from __future__ import annotations

import streamlit as st

from workbench.app import forms

PAGES = {
    "Library": [("views/models.py", "Models", ":material/inventory_2:")],
    "Workbench": [("views/merge.py", "Merge", ":material/merge:"),
                  ("views/train.py", "Train", ":material/school:"),
                  ("views/compare.py", "Compare", ":material/grid_view:"),
                  ("views/generate.py", "Generate", ":material/image:")],
    "System": [("views/jobs.py", "Jobs", ":material/schedule:")],
}


def sidebar() -> None:
    cfg = forms.config()
    store = forms.job_store()
    running = store.list(statuses=("running",), limit=50)
    queued = store.list(statuses=("queued",), limit=50)
    with st.sidebar:
        st.markdown(f"**Jobs:** {len(running)} running · {len(queued)} queued")
        holder = store.gpu_holder()
        st.caption(f"GPU: job #{holder.id} ({holder.kind})" if holder else "GPU: free")
        with st.expander("Folders"):
            for kind, roots in cfg.roots.items():
                st.caption(f"{kind}: " + ", ".join(str(r) for r in roots))


def main() -> None:
    st.set_page_config(page_title="workbench", page_icon=":material/merge:", layout="wide")
    nav = st.navigation({section: [st.Page(path, title=title, icon=icon)
                                   for path, title, icon in pages]
                         for section, pages in PAGES.items()})
    sidebar()
    nav.run()


main()
