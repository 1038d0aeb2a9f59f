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


def job_fraction(job: Job) -> float:
    """0..1 of the whole job, for its one progress bar: the overall fraction the worker records
    (nested phases folded in, workbench/progress.py), else the current phase's (older stores)."""
    value = job.overall if job.overall is not None else job.progress
    if job.status == "done":
        value = 1.0
    return min(max(value or 0.0, 0.0), 1.0)


def job_eta(job: Job) -> float | None:
    """Seconds left for the whole job: elapsed / fraction - elapsed (A1111's formula), from the
    overall fraction; the phase's own ETA when no overall fraction is known."""
    frac, elapsed = job.overall, job.elapsed_s
    if frac is None or elapsed is None:
        return job.eta_s
    if frac <= 0.0:
        return None
    return max(0.0, elapsed / frac - elapsed)


def progress_text(job: Job, holder: Job | None) -> str:
    """The text beside a job's bar: the job's share done, then the phase and its own share."""
    if job.status == "queued":
        if job.gpu and holder is not None:
            return f"queued: waiting for the GPU (job #{holder.id} is using it)"
        return "queued: waiting for a worker"
    if job.status == "running":
        if job.progress is None and job.overall is None:
            return "running: starting"
        if job.overall is None:  # a store without overall fractions: the phase is all we have
            stage = f"{job.stage}: " if job.stage else ""
            return f"{stage}{job.progress * 100:.0f}% · {fmt_eta(job.eta_s)}"
        phase = ""
        if job.stage:
            own = f" {job.progress * 100:.0f}%" if job.progress is not None else ""
            phase = f" · {job.stage}{own}"
        return f"{job.overall * 100:.0f}% of the job{phase} · {fmt_eta(job_eta(job))}"
    took = f" in {job.elapsed_s:.1f} s" if job.elapsed_s is not None else ""
    return f"{job.status}{took}"
