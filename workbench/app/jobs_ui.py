"""How a job reads in the dashboard (label, state, progress line with ETA), shared by the Jobs page
and the job widgets every form page shows (`app/forms.py`); pages import helpers, never each other."""

from __future__ import annotations

from workbench.jobs.store import Job

STATE = {"queued": "running", "running": "running", "done": "complete", "failed": "error",
         "cancelled": "error"}


def fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "ETA unknown"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"ETA {seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"ETA {seconds // 60} min {seconds % 60:02d} s"
    return f"ETA {seconds} s"


def job_label(job: Job) -> str:
    return f"#{job.id} {job.kind} '{job.name}': {job.status}"


def progress_text(job: Job, holder: Job | None) -> str:
    if job.status == "queued":
        if job.gpu and holder is not None:
            return f"queued: waiting for the GPU (job #{holder.id} is using it)"
        return "queued: waiting for a worker"
    if job.status == "running":
        pct = f"{job.progress * 100:.0f}%" if job.progress is not None else "starting"
        stage = f"{job.stage}: " if job.stage else ""
        return f"{stage}{pct} · {fmt_eta(job.eta_s)}"
    took = f" in {job.elapsed_s:.1f} s" if job.elapsed_s is not None else ""
    return f"{job.status}{took}"
