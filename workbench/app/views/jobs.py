"""Jobs page: every job in the store, its progress with ETA, log tail, cancel, delete, results.

The page only reads the store (and asks it to cancel, or to forget a finished job); workers do the
work. The detail panel is a fragment that re-runs every second, so progress moves without reloading
the page.
"""

from __future__ import annotations

import time
from pathlib import Path

import streamlit as st

from workbench.app import forms
from workbench.app.jobs_ui import STATE, job_label, progress_text
from workbench.jobs.store import Job

S = st.session_state
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
def show_results(job: Job) -> None:
    """Written files: images shown, models pointed to the Models page, folders listed."""
    if not job.results:
        return
    st.markdown("**Results**")
    images = []
    for raw in job.results:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            images += found
            st.markdown(f"folder `{path}` ({len(found)} images)")
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        else:
            size = f"{path.stat().st_size / 1e6:.1f} MB" if path.exists() else "missing"
            st.markdown(f"`{path}` ({size})")
    if any(Path(r).suffix == ".safetensors" for r in job.results):
        st.page_link("views/models.py", label="See it on the Models page",
                     icon=":material/inventory_2:")
    if images:
        st.image([str(p) for p in images[:24]], width=160, caption=[p.name for p in images[:24]])


def cancel(job_id: int) -> None:
    status = forms.job_store().request_cancel(job_id)
    S["jobs.notice"] = (f"job #{job_id} cancelled" if status == "cancelled" else
                        f"job #{job_id}: cancel requested; the worker stops at its next step")


def delete(job_id: int) -> None:
    """Forget a finished job: its row, log and metrics go, its output files stay."""
    removed = forms.job_store().delete(job_id)
    S["jobs.notice"] = (f"job #{job_id} deleted (its output files are kept)" if removed else
                        f"job #{job_id} is not finished; cancel it first")


def detail(job_id: int) -> None:
    store = forms.job_store()
    job = store.get(job_id)
    if job is None:
        st.info(f"job #{job_id} is gone")
        return
    holder = store.gpu_holder()
    with st.status(job_label(job), state=STATE[job.status], expanded=True):
        value = job.progress if job.progress is not None else 0.0
        st.progress(min(max(value, 0.0), 1.0), text=progress_text(job, holder))
        if job.message and job.active:
            st.caption(job.message)
        if job.error:
            (st.warning if job.status == "cancelled" else st.error)(job.error)
        if job.active:
            st.button("Cancel job", key=f"jobs.cancel.{job.id}", on_click=cancel, args=(job.id,),
                      disabled=job.cancel_requested and job.status == "running")
        else:
            st.button("Delete job", key=f"jobs.delete.{job.id}", on_click=delete, args=(job.id,),
                      help="removes the job and its log from this list; output files stay")
        show_results(job)
        st.markdown("**Log**")
        st.code("\n".join(store.log_tail(job.id, 40)) or "(empty)", language=None)
        with st.expander("Recipe"):
            st.code(job.recipe, language="yaml")
    metrics = store.metrics(job.id)
    if metrics.get("loss"):
        st.line_chart({"loss": [v for _, v in metrics["loss"]]})


@st.fragment(run_every=1.0)
def jobs_panel() -> None:
    """The list and the selected job; re-runs every second on its own (progress, ETA, log)."""
    store = forms.job_store()
    store.reap()
    jobs = store.list(limit=200)
    if S.get("jobs.notice"):
        st.info(S.pop("jobs.notice"))
    if not jobs:
        st.info("No jobs yet. Submit one from the Merge, Train, Compare or Generate page.")
        return
    counts = {s: sum(j.status == s for j in jobs) for s in ("queued", "running", "done", "failed",
                                                            "cancelled")}
    st.caption(" · ".join(f"{n} {s}" for s, n in counts.items() if n))
    st.dataframe([{"id": j.id, "kind": j.kind, "name": j.name, "status": j.status,
                   "progress": f"{(j.progress or 0) * 100:.0f}%",
                   "created": time.strftime("%H:%M:%S", time.localtime(j.created))}
                  for j in jobs], hide_index=True, width="stretch")
    ids = [j.id for j in jobs]
    if S.get("jobs.selected") not in ids:
        S["jobs.selected"] = ids[0]
    by_id = {j.id: j for j in jobs}
    st.selectbox("Job", ids, key="jobs.selected", format_func=lambda i: job_label(by_id[i]))
    detail(S["jobs.selected"])


def render() -> None:
    st.title("Jobs")
    store = forms.job_store()
    cfg = forms.config()
    store.reap()
    if cfg.spawn_workers and store.list(statuses=("queued",), limit=1):
        from workbench.jobs.worker import ensure_workers

        ensure_workers(store, cfg.max_workers)  # e.g. after the dashboard was restarted
    wanted = st.query_params.get("job")
    if wanted and wanted.isdigit():
        S["jobs.selected"] = int(wanted)
        del st.query_params["job"]
    jobs_panel()


if __name__ == "__main__":
    render()
