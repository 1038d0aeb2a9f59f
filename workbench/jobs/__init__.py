"""Jobs: recipes queued in a SQLite store and run by worker processes (see store.py, worker.py)."""

from workbench.jobs.store import FINISHED, GPU_KINDS, STATUSES, Job, JobStore, pid_alive

__all__ = ["FINISHED", "GPU_KINDS", "Job", "JobStore", "STATUSES", "pid_alive"]
