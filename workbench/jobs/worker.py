"""Worker processes: claim queued jobs from the store and run them through `run_recipe`.

`python -m workbench.jobs.worker --db JOBS.sqlite` claims jobs one at a time until it has been idle
for `--idle-exit` seconds (or forever). The dashboard starts workers with `ensure_workers` after
each submit, detached from its own process, so closing the browser or restarting the dashboard
does not stop a job. While a job runs, a side thread beats the heartbeat every second and polls the
job's cancel flag; a cancel becomes `workbench.progress.request_cancel()` (the engine stops at its
next progress update), and if the engine does not stop within `CANCEL_GRACE_S` the worker
interrupts its own main thread, so an engine that never reports progress still unwinds through its
`finally` blocks. Outputs the job created before it was cancelled are removed.

Nothing here depends on POSIX signals, so cancelling works the same on Windows: the cancel flag is
a row the worker polls, and `_thread.interrupt_main` raises KeyboardInterrupt in-process on every
OS. `force_stop` is the hard stop for a worker that no longer reacts at all: it terminates, then
kills, the worker's process tree through psutil (workbench/system.py). The SIGTERM handler only
makes that exit clean where the OS delivers SIGTERM (POSIX; Windows terminates without handlers).
"""

from __future__ import annotations

import argparse
import _thread
import importlib
import io
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from workbench import progress as wb_progress
from workbench import system
from workbench.dispatch import build_plan, run_plan
from workbench.errors import WorkbenchError
from workbench.jobs.store import HEARTBEAT_S, Job, JobStore
from workbench.recipes.loader import parse_recipe

CANCEL_GRACE_S = 3.0
REPORT_EVERY_S = 0.3  # at most this often a progress row is written (messages always are)


class JobLog(io.TextIOBase):
    """A text stream that sends complete lines to the job's log (stdout/stderr of the job)."""

    def __init__(self, store: JobStore, job_id: int, echo=None) -> None:
        self.store, self.job_id, self.echo, self._buf = store, job_id, echo, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.echo is not None:
            self.echo.write(text)
        self._buf += text
        *lines, self._buf = re.split(r"\r?\n", self._buf)
        lines = [ln.rsplit("\r", 1)[-1] for ln in lines if ln.strip()]
        if lines:
            self.store.log(self.job_id, *lines)
        return len(text)

    def flush(self) -> None:
        if self._buf.strip():
            self.store.log(self.job_id, self._buf.rsplit("\r", 1)[-1])
        self._buf = ""


class _LogHandler(logging.Handler):
    def __init__(self, log: JobLog) -> None:
        super().__init__(logging.INFO)
        self.job_log = log

    def emit(self, record: logging.LogRecord) -> None:
        self.job_log.write(self.format(record) + "\n")


class ProgressWriter:
    """The progress sink of a job: events -> progress/ETA rows, log lines and metrics.

    The job's overall fraction (ProgressEvent.overall) never goes back: a phase that runs after
    the job's main task has ended (an export, say) counts as its end. (A training's last samples
    are made inside its training task, workbench/kinds/train.py, so its bar is short of 100 %
    until they are done.)"""

    def __init__(self, store: JobStore, job_id: int) -> None:
        self.store, self.job_id = store, job_id
        self._last_write = 0.0
        self._last_log = (None, 0.0)
        self.overall: float | None = None

    def __call__(self, event: wb_progress.ProgressEvent) -> None:
        now = time.monotonic()
        frac = None
        if event.total:
            frac = max(0.0, min(1.0, event.done / event.total))
        if event.overall is not None:
            self.overall = max(self.overall or 0.0, event.overall)
        metrics = event.metrics
        if metrics:
            self.store.add_metrics(self.job_id, event.done, metrics)
        final = event.total is not None and event.done >= event.total
        if now - self._last_write >= REPORT_EVERY_S or final or self._last_log[0] != event.desc:
            self._last_write = now
            self.store.report(self.job_id, progress=frac, eta_s=event.eta_s, stage=event.desc,
                              message=event.message, overall=self.overall)
        if event.message and (now - self._last_log[1] >= 1.0 or final):
            total = f"/{event.total:g}" if event.total else ""
            self.store.log(self.job_id, f"[{event.desc}] {event.done:g}{total} {event.message}")
            self._last_log = (event.desc, now)
        elif self._last_log[0] != event.desc:
            self.store.log(self.job_id, f"[{event.desc}] started")
            self._last_log = (event.desc, now)


class Watchdog(threading.Thread):
    """Beats the heartbeat and turns the job's cancel flag into a cancel of the engine."""

    def __init__(self, store: JobStore, job_id: int) -> None:
        super().__init__(daemon=True, name=f"job-{job_id}-watchdog")
        self.store, self.job_id = store, job_id
        self.stop = threading.Event()
        self.cancelled_at: float | None = None
        self.interrupted = False
        self.main_thread = threading.current_thread() is threading.main_thread()

    def run(self) -> None:
        while not self.stop.wait(HEARTBEAT_S if self.cancelled_at is None else 0.2):
            try:
                cancel = self.store.heartbeat(self.job_id)
            except Exception:  # a locked or vanished database must not kill the job
                continue
            if cancel and self.cancelled_at is None:
                self.cancelled_at = time.monotonic()
                wb_progress.request_cancel()
            if (self.cancelled_at is not None and not self.interrupted and self.main_thread
                    and time.monotonic() - self.cancelled_at > CANCEL_GRACE_S):
                self.interrupted = True
                _thread.interrupt_main()  # KeyboardInterrupt in the engine, which cleans up

    @property
    def cancelled(self) -> bool:
        return self.cancelled_at is not None


def snapshot(outputs: list[Path]) -> dict[Path, bool]:
    """Which outputs, and which of their parent folders, exist before the job starts."""
    seen: dict[Path, bool] = {}
    for path in outputs:
        for p in (path, *path.parents):
            if p in seen:
                break
            seen[p] = p.exists()
            if seen[p] and p != path:
                break
    return seen


def remove_new_outputs(outputs: list[Path], existed: dict[Path, bool]) -> list[Path]:
    """Delete outputs that did not exist before the job started (what a cancelled job left), and
    the parent folders the job created that are empty afterwards."""
    removed = []
    for path in outputs:
        if existed.get(path, True) or not path.exists():
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    for path in outputs:
        for parent in path.parents:
            if existed.get(parent, True):
                break
            try:
                parent.rmdir()  # only when empty
            except OSError:
                break
    return removed


def run_job(store: JobStore, job: Job, echo: bool = False) -> str:
    """Run one claimed job to its end; returns the final status written to the store."""
    log = JobLog(store, job.id, echo=sys.__stderr__ if echo else None)
    store.log(job.id, f"worker {os.getpid()} started {job.kind} '{job.name}'")
    wb_progress.reset_cancel()
    watchdog = Watchdog(store, job.id)
    outputs: list[Path] = []
    existed: dict[Path, bool] = {}
    handler = _LogHandler(log)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    old_out, old_err = sys.stdout, sys.stderr
    status, results, error = "failed", [], None
    try:
        recipe = parse_recipe(job.recipe, job.source)
        plan = build_plan(recipe)  # the one plan of this job: its outputs, then its run
        keep = {Path(p) for p in plan.keep_on_cancel}  # a training's state: resumable later
        outputs = [Path(p) for p in plan.outputs if Path(p) not in keep]
        existed = snapshot(outputs)
        watchdog.start()
        root.addHandler(handler)
        sys.stdout = sys.stderr = log
        with wb_progress.sink(ProgressWriter(store, job.id)):
            result = run_plan(plan, progress=False)
        status, results = "done", [str(p) for p in result.outputs]
        log.write(f"{result}\n")
    except (wb_progress.Cancelled, KeyboardInterrupt) as e:
        if watchdog.cancelled or isinstance(e, wb_progress.Cancelled):
            # the engine's own message when it has one (a training says how to resume)
            status, error = "cancelled", _cancel_message(e)
        else:
            status, error = "failed", "worker interrupted"
    except WorkbenchError as e:
        error = str(e)
    except Exception as e:  # a bug in an engine: keep the traceback in the log
        error = f"{type(e).__name__}: {e}"
        log.write(traceback.format_exc())
    except BaseException:  # SystemExit from SIGTERM: record it, then let the worker stop
        if watchdog.cancelled or _cancel_requested(store, job.id):  # a hard stop of a cancel
            remove_new_outputs(outputs, existed)
            store.finish(job.id, "cancelled", error="cancelled by request (worker stopped)")
        else:
            store.finish(job.id, "failed", error="worker stopped (terminated)")
        raise
    finally:
        watchdog.stop.set()
        sys.stdout, sys.stderr = old_out, old_err
        root.removeHandler(handler)
        log.flush()
        wb_progress.reset_cancel()
    if watchdog.cancelled and status != "done":
        status, error = "cancelled", error if (error or "").startswith("cancelled by request") \
            else "cancelled by request"
    if status == "cancelled":
        removed = remove_new_outputs(outputs, existed)
        if removed:
            store.log(job.id, "removed partial outputs: " + ", ".join(map(str, removed)))
    if error:
        store.log(job.id, f"{status}: {error}")
    store.finish(job.id, status, results, error)
    return status


def _cancel_message(e: BaseException) -> str:
    """'cancelled by request', plus what the engine said on stopping (a training: its resume
    hint, on a Cancelled or on the watchdog's KeyboardInterrupt alike)."""
    said = str(e)
    if said.startswith("cancelled by request"):
        return said
    return f"cancelled by request: {said}" if said else "cancelled by request"


def _cancel_requested(store: JobStore, job_id: int) -> bool:
    try:
        job = store.get(job_id)
    except Exception:  # a locked or vanished database: the worker is stopping anyway
        return False
    return bool(job and job.cancel_requested)


def work(store: JobStore, idle_exit_s: float | None = None, poll_s: float = 0.5,
         max_jobs: int | None = None, echo: bool = False) -> int:
    """Claim and run jobs until idle for `idle_exit_s` (None: forever) or `max_jobs` ran."""
    pid = os.getpid()
    store.register_worker(pid)
    ran, idle_since = 0, time.monotonic()
    try:
        while max_jobs is None or ran < max_jobs:
            store.reap()
            retire = idle_exit_s is not None and time.monotonic() - idle_since >= idle_exit_s
            job = store.claim(pid, retire_if_idle=retire)
            if job is None:
                if retire:
                    return ran
                store.heartbeat(None, pid)
                time.sleep(poll_s)
                continue
            try:
                run_job(store, job, echo=echo)
            except KeyboardInterrupt:  # a late cancel interrupt, after the engine had returned
                late = store.get(job.id)
                if late is not None and late.status == "running":
                    store.finish(job.id, "cancelled" if late.cancel_requested else "failed",
                                 error="cancelled by request" if late.cancel_requested
                                 else "worker interrupted")
                if late is None or not late.cancel_requested:
                    raise
            ran += 1
            idle_since = time.monotonic()
        return ran
    finally:
        store.unregister_worker(pid)


# --------------------------------------------------------------------------------------------------
# starting workers from the dashboard


def spawn_worker(db: str | Path, idle_exit_s: float = 15.0, plugins: tuple[str, ...] = (),
                 log_dir: str | Path | None = None) -> subprocess.Popen:
    """Start a detached worker process (its own session or process group, whichever the OS
    offers: it outlives the dashboard and its terminal's Ctrl-C)."""
    db = Path(db)
    log_dir = Path(log_dir) if log_dir else db.parent / "worker-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "workbench.jobs.worker", "--db", str(db),
           "--idle-exit", str(idle_exit_s)]
    for p in plugins:
        cmd += ["--plugin", p]
    out = open(log_dir / f"worker-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log", "ab")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            **system.detached_process_kwargs())
    out.close()
    threading.Thread(target=proc.wait, daemon=True).start()  # reap it: no zombie when it exits
    return proc


def ensure_workers(store: JobStore, max_workers: int = 2, **spawn_kwargs) -> int:
    """Start workers so that queued jobs have someone to run them; returns how many started."""
    store.reap()
    live = len(store.live_workers())
    idle = max(0, live - store.running_count())
    wanted = min(max_workers - live, store.claimable_count() - idle)
    for _ in range(max(0, wanted)):
        proc = spawn_worker(store.path, **spawn_kwargs)
        store.register_worker(proc.pid)  # counted at once, so a second submit does not over-spawn
    return max(0, wanted)


def force_stop(store: JobStore, job_id: int, grace_s: float = 10.0) -> bool:
    """Stop a running job's worker by force: for a worker that ignores its cancel flag (stuck in
    a long native call, hung). Its process tree is terminated, then killed after `grace_s`
    (psutil: the same on every OS), and the job is recorded as cancelled. Returns whether a
    worker was stopped. A temp file its writer had open may stay (`*.tmp` next to the output,
    skipped by the model scan), as after any killed process."""
    job = store.get(job_id)
    if job is None or job.status != "running" or not job.worker_pid:
        return False
    if job.worker_pid == os.getpid():
        raise WorkbenchError(f"job {job_id} runs in this process ({job.worker_pid}); cancel it "
                             "instead of stopping it by force")
    store.request_cancel(job_id)  # a worker that still reacts records its own cancel
    stopped = system.stop_process_tree(job.worker_pid, grace_s)
    store.finish(job_id, "cancelled", error="cancelled by request (worker stopped by force)")
    store.unregister_worker(job.worker_pid)
    if stopped:
        store.log(job_id, f"worker {job.worker_pid} stopped by force")
    return bool(stopped)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workbench.jobs.worker",
                                description="Run queued workbench jobs from a job store.")
    p.add_argument("--db", required=True, help="the job store (SQLite file)")
    p.add_argument("--idle-exit", type=float, default=None,
                   help="exit after this many seconds without a job (default: run forever)")
    p.add_argument("--max-jobs", type=int, default=None, help="exit after this many jobs")
    p.add_argument("--plugin", action="append", default=[],
                   help="import this module first (it may register handlers); repeatable")
    p.add_argument("--echo", action="store_true", help="also print job logs to stderr")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in args.plugin:
        importlib.import_module(name)

    def _terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _terminate)
    work(JobStore(args.db), idle_exit_s=args.idle_exit, max_jobs=args.max_jobs, echo=args.echo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
