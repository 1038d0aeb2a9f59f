"""Jobs page: every job in the store, its progress with ETA, log tail, cancel, delete, results.

The page only reads the store (and asks it to cancel, or to forget a finished job); workers do the
work. The list and the detail panel are a fragment that re-runs every few seconds while a job is
queued or running, and every `live.IDLE_S` seconds otherwise (app/live.py), so progress moves
and a job queued from another tab appears without reloading the page. A worker that does
not react to a cancel (stuck in a long native call) can be stopped by force, after a confirmation
(workbench/jobs/worker.py force_stop: its process tree is terminated, then killed).
"""

from __future__ import annotations

import time
from pathlib import Path

import streamlit as st

from workbench.app import forms, live
from workbench.app.grid_results import IMAGE_SUFFIXES
from workbench.app.jobs_ui import STATE, job_fraction, job_label, progress_text
from workbench.errors import WorkbenchError
from workbench.jobs.store import Job
from workbench.jobs.worker import ensure_workers, force_stop as stop_worker

S = st.session_state
CONFIRM = "jobs.force_confirm"  # session_state: the job id whose force stop awaits confirmation


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


def ask_force_stop(job_id: int) -> None:
    S[CONFIRM] = job_id


def force_stop(job_id: int) -> None:
    """Stop the job's worker process tree (terminate, then kill) and record the job cancelled."""
    S.pop(CONFIRM, None)
    job = forms.job_store().get(job_id)
    pid = job.worker_pid if job else None
    try:
        stopped = stop_worker(forms.job_store(), job_id)
    except WorkbenchError as e:
        S["jobs.notice"] = str(e)
        return
    S["jobs.notice"] = (f"job #{job_id}: worker {pid} stopped by force; the job is cancelled"
                        if stopped else f"job #{job_id} was not running any more")


def force_controls(job: Job) -> None:
    """For a running job whose cancel was requested: stop its worker by force, once confirmed."""
    if S.get(CONFIRM) == job.id:
        st.warning(f"Stop worker process {job.worker_pid} now? Its job ends at once, as cancelled; "
                   "a temp file it was writing may stay next to the output.")
        c1, c2 = st.columns(2)
        c1.button("Yes, stop it now", key=f"jobs.force_yes.{job.id}", type="primary",
                  on_click=force_stop, args=(job.id,))
        c2.button("Keep waiting", key=f"jobs.force_no.{job.id}",
                  on_click=lambda: S.pop(CONFIRM, None))
    else:
        st.button("Force stop…", key=f"jobs.force.{job.id}", on_click=ask_force_stop,
                  args=(job.id,), help="for a worker that does not react to the cancel: stops "
                  "its process (asks for confirmation first)")


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
        st.progress(job_fraction(job), text=progress_text(job, holder))
        if job.message and job.active:
            st.caption(job.message)
        if job.error:
            (st.warning if job.status == "cancelled" else st.error)(job.error)
        if job.active:
            st.button("Cancel job", key=f"jobs.cancel.{job.id}", on_click=cancel, args=(job.id,),
                      disabled=job.cancel_requested and job.status == "running")
            if job.status == "running" and job.cancel_requested:
                st.caption("cancel requested: the worker stops at its next step")
                force_controls(job)
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


def jobs_panel() -> None:
    """The list and the selected job (progress, ETA, log); a live section (app/live.py)."""
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
                   "progress": f"{job_fraction(j) * 100:.0f}%",
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
        ensure_workers(store, cfg.max_workers)  # e.g. after the dashboard was restarted
    wanted = st.query_params.get("job")
    if wanted and wanted.isdigit():
        S["jobs.selected"] = int(wanted)
        del st.query_params["job"]
    live.section("jobs", jobs_panel, live.jobs_active, idle_s=live.IDLE_S)


if __name__ == "__main__":
    render()
