"""Stopping the dashboard cleanly: its Streamlit server, the workers it started, and their jobs.

`workbench app` runs the server as a child process, and workers are started by the launcher and by
the server's pages (workbench/jobs/worker.py, each in its own session so that a browser reload does
not touch them). When the dashboard stops (Ctrl-C, SIGTERM, SIGHUP from a closed terminal,
Ctrl-Break or a closed console window on Windows), `Shutdown` stops all of them and leaves no job
"running":

1. the server is suspended (psutil; SIGSTOP or NtSuspendProcess), so it starts no new worker while
   its process tree is read;
2. the server, its descendants and the launcher's own worker children are asked to terminate
   (SIGTERM: a worker records its job as failed, "worker stopped"; on Windows psutil's terminate
   ends the process at once) and the server is resumed so it can act on it;
3. whatever is still alive after `grace_s` is killed;
4. jobs still marked running by one of those workers, or by a worker that no longer exists, are
   marked failed, and the worker rows removed (a killed process could not do it itself). psutil
   answers whether a pid exists on every platform.

Only processes found through the tree are touched: a browser the launcher opened is not a worker
and not under the server, so it is left alone. Which stop signals exist is asked of the `signal`
module (SIGHUP, SIGBREAK), and the console-close hook is installed only where the Windows console
API is there (ctypes.windll).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import psutil

from workbench.jobs.store import JobStore

WORKER_MODULE = "workbench.jobs.worker"
STOPPED_ERROR = "stopped with the dashboard while this job ran"
# Windows console events that end the process once the handler returns (close, log off, shut down)
CONSOLE_CLOSE_EVENTS = (2, 5, 6)


class StopRequested(BaseException):
    """A stop signal arrived (a BaseException like KeyboardInterrupt: nothing catches it by
    accident on its way to the launcher's cleanup)."""


def stop_signals() -> list[int]:
    """The signals that mean "stop the dashboard" on this platform (Ctrl-C stays
    KeyboardInterrupt)."""
    names = ("SIGTERM", "SIGHUP", "SIGBREAK")  # SIGHUP: terminal closed; SIGBREAK: Ctrl-Break
    return [getattr(signal, n) for n in names if hasattr(signal, n)]


def _is_worker(proc: psutil.Process) -> bool:
    try:
        return WORKER_MODULE in " ".join(proc.cmdline())
    except (psutil.Error, OSError):
        return False


def _alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (a dead child nobody has reaped yet counts as stopped)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return []


def dashboard_processes(server_pid: int | None,
                        launcher_pid: int | None = None) -> list[psutil.Process]:
    """The server and its descendants, plus the launcher's worker children and theirs."""
    found: dict[int, psutil.Process] = {}
    if server_pid:
        try:
            for p in _tree(psutil.Process(server_pid)):
                found[p.pid] = p
        except psutil.Error:
            pass
    try:
        launcher = psutil.Process(launcher_pid or os.getpid())
        for child in launcher.children():
            if _is_worker(child):
                for p in _tree(child):
                    found.setdefault(p.pid, p)
    except psutil.Error:
        pass
    return list(found.values())


def stop_processes(procs: list[psutil.Process], grace_s: float = 10.0,
                   kill_wait_s: float = 5.0, resume: psutil.Process | None = None) -> list[int]:
    """Terminate, wait up to grace_s, kill what is left; returns the pids still alive after all
    (empty when everything stopped)."""
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    if resume is not None:
        try:
            resume.resume()
        except psutil.Error:
            pass
    left = _wait_gone(procs, grace_s)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    return [p.pid for p in _wait_gone(left, kill_wait_s)]


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    end = time.monotonic() + timeout
    left = [p for p in procs if _alive(p)]
    while left and time.monotonic() < end:
        time.sleep(0.1)
        left = [p for p in left if _alive(p)]
    return left


def fail_orphaned_jobs(store: JobStore, pids: set[int], error: str = STOPPED_ERROR) -> list[int]:
    """Mark failed the jobs still "running" under one of these (stopped) worker pids, or under a
    worker that no longer exists (on Windows a Ctrl-Break or a closed console ends the workers
    too, before the launcher gets to them); returns their ids. Jobs of live workers that are not
    ours (another dashboard on the same store) are left alone."""
    failed = []
    for job in store.list(statuses=("running",), limit=10_000):
        if job.worker_pid in pids or not (job.worker_pid and psutil.pid_exists(job.worker_pid)):
            store.log(job.id, f"failed: {error}")
            store.finish(job.id, "failed", error=error)
            failed.append(job.id)
    for pid in pids:
        store.unregister_worker(pid)
    return failed


class Shutdown:
    """Stops one dashboard (server process + workers + their jobs); safe to call from a signal
    handler's thread, a console-event thread and the main thread: it runs once."""

    def __init__(self, server: subprocess.Popen | None, store: JobStore, grace_s: float = 10.0,
                 log: Callable[[str], None] | None = None) -> None:
        self.server, self.store, self.grace_s = server, store, grace_s
        self.log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self._lock = threading.Lock()
        self.done = False
        self.left: list[int] = []
        self.failed_jobs: list[int] = []

    def __call__(self) -> None:
        with self._lock:
            if self.done:
                return
            self.done = True
            server = None  # None: stopped before the server was started
            if self.server is not None and self.server.poll() is None:
                try:
                    server = psutil.Process(self.server.pid)
                    server.suspend()  # no new workers while the tree is read
                except psutil.Error:
                    server = None
            procs = dashboard_processes(self.server.pid if self.server else None)
            workers = {p.pid for p in procs if _is_worker(p)}
            if procs:
                self.log(f"stopping the dashboard ({len(procs)} processes)")
            self.left = stop_processes(procs, self.grace_s, resume=server)
            if self.server is not None:
                try:
                    self.server.wait(timeout=1)  # reap our child
                except subprocess.TimeoutExpired:
                    pass
            self.failed_jobs = fail_orphaned_jobs(self.store, workers)
            if self.failed_jobs:
                self.log("jobs stopped: " + ", ".join(f"#{i}" for i in self.failed_jobs))
            if self.left:
                self.log("could not stop processes " + ", ".join(map(str, self.left)))


# --------------------------------------------------------------------------------------------------
# Windows: a closed console window


def console_event_handler(on_close: Callable[[], None]) -> Callable[[int], bool]:
    """The function given to SetConsoleCtrlHandler: on close/log-off/shut-down it stops the
    dashboard before returning (Windows ends the process right after, within ~5 s); Ctrl-C and
    Ctrl-Break are left to Python's own handling (KeyboardInterrupt, SIGBREAK)."""

    def handler(event: int) -> bool:
        if event in CONSOLE_CLOSE_EVENTS:
            on_close()
            return True
        return False

    return handler


def install_console_close_hook(on_close: Callable[[], None]):
    """Install `console_event_handler(on_close)` where the Windows console API exists; returns
    the installed callback (keep a reference: ctypes must not free it) or None."""
    import ctypes  # only for the Windows console API

    windll = getattr(ctypes, "windll", None)
    if windll is None or not hasattr(windll, "kernel32"):
        return None
    from ctypes import wintypes  # noqa: F401  (present where windll is)

    prototype = ctypes.WINFUNCTYPE(wintypes.BOOL, wintypes.DWORD)
    callback = prototype(console_event_handler(on_close))
    if not windll.kernel32.SetConsoleCtrlHandler(callback, True):
        return None
    return callback
