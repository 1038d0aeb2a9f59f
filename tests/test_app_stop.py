"""Stopping the dashboard stops its Streamlit server, its workers and their jobs: no process of its
tree is left and no job stays "running" (workbench/app/lifecycle.py)."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from workbench.app import lifecycle
from workbench.app.lifecycle import (STOPPED_ERROR, Shutdown, console_event_handler,
                                     install_console_close_hook, stop_processes, stop_signals)
from workbench.jobs.store import JobStore

REPO = Path(__file__).resolve().parents[1]
# a process that ignores the polite stop (SIGTERM) and says when it is ready
STUBBORN = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(600)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def sleeper(*argv_tail: str, stubborn: bool = True) -> subprocess.Popen:
    code = STUBBORN if stubborn else "print('ready', flush=True); import time; time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", code, *argv_tail], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"  # its SIGTERM handler is in place
    return proc


def test_stop_signals_and_the_console_close_hook():
    sigs = stop_signals()
    assert signal.SIGTERM in sigs
    assert (getattr(signal, "SIGHUP", None) in sigs) == hasattr(signal, "SIGHUP")
    assert (getattr(signal, "SIGBREAK", None) in sigs) == hasattr(signal, "SIGBREAK")
    closed = []
    handler = console_event_handler(lambda: closed.append(True))
    assert handler(0) is False and handler(1) is False and closed == []  # Ctrl-C, Ctrl-Break
    assert handler(2) is True and closed == [True]  # the console window was closed
    if not hasattr(ctypes, "windll"):  # no Windows console API: nothing is installed
        assert install_console_close_hook(lambda: None) is None


def test_stop_processes_kills_what_ignores_terminate():
    proc = sleeper()
    try:
        assert stop_processes([psutil.Process(proc.pid)], grace_s=0.5) == []
        code = proc.wait(timeout=120)
        if hasattr(signal, "SIGKILL"):  # POSIX: SIGTERM was ignored, the kill fallback ended it
            assert code == -signal.SIGKILL
    finally:
        proc.kill()


def test_shutdown_stops_server_and_workers_and_fails_their_jobs(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    server = sleeper()
    # a worker as the launcher starts them (its command line names the worker module), which
    # ignores SIGTERM like a worker stuck in a long native call: it must be killed, and its job
    # marked failed for it
    worker = sleeper(lifecycle.WORKER_MODULE, "--db", str(store.path))
    bystander = sleeper(stubborn=False)  # e.g. a browser the launcher opened: not ours to stop
    try:
        job = store.submit("merge", "kind: merge\n", name="m")
        store.register_worker(worker.pid)
        assert store.claim(pid=worker.pid).id == job
        # a worker that is already gone (on Windows, Ctrl-Break ends workers before the launcher
        # reaches them) and one that is alive but not ours
        ended = subprocess.Popen([sys.executable, "-c", "pass"])
        ended.wait()
        orphan = store.submit("merge", "kind: merge\n", name="orphan")
        assert store.claim(pid=ended.pid).id == orphan
        other = store.submit("merge", "kind: merge\n", name="other")
        assert store.claim(pid=bystander.pid).id == other
        queued = store.submit("merge", "kind: merge\n", name="later")
        shutdown = Shutdown(server, store, grace_s=0.5, log=lambda text: None)
        shutdown()
        shutdown()  # idempotent: signal handler, console hook and `finally` may all call it
        assert server.poll() is not None and worker.wait(timeout=120) is not None
        assert bystander.poll() is None
        assert shutdown.left == [] and sorted(shutdown.failed_jobs) == [job, orphan]
        for stopped in (job, orphan):
            failed = store.get(stopped)
            assert failed.status == "failed" and failed.error == STOPPED_ERROR
        assert store.get(queued).status == "queued"  # runs at the next start
        assert [j.id for j in store.list(statuses=("running",))] == [other]
        assert worker.pid not in store.live_workers()
    finally:
        for p in (server, worker, bystander):
            p.kill()
            p.wait()


TRAIN = """\
kind: train
name: long
base: {base}
dataset: {dataset}
resolution: 64
network: {{type: lora, rank: 2, alpha: 2}}
max_steps: 1000000
batch_size: 1
learning_rate: 1.0e-4
seed: 1
output: {{dir: {out}}}
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT"])  # SIGINT: Ctrl-C
def test_stopping_workbench_app_leaves_no_process_and_no_running_job(tmp_path, tiny_sd15,
                                                                       style_set, how):
    home = tmp_path / "home"
    (home / "outputs").mkdir(parents=True)
    store = JobStore(home / ".workbench" / "jobs.sqlite")
    job = store.submit("train", TRAIN.format(base=tiny_sd15["A"], dataset=style_set,
                                             out=home / "outputs" / "long"), name="long")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    # Windows has no SIGTERM to send: Ctrl-Break reaches a process in its own process group
    windows_style = hasattr(signal, "CTRL_BREAK_EVENT")
    if windows_style and how != "SIGTERM":
        pytest.skip("one stop signal to send on Windows: Ctrl-Break")
    flags = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if windows_style else {}
    log = open(tmp_path / "app.log", "wb")
    app = subprocess.Popen([sys.executable, "-m", "workbench", "app", "--home", str(home),
                            "--port", str(port), "--no-browser", "--workers", "1"],
                           env=env, stdout=log, stderr=subprocess.STDOUT, **flags)
    tree: list[psutil.Process] = []
    try:
        from workbench.app import wait_healthy

        assert wait_healthy(f"http://127.0.0.1:{port}", timeout=180, proc=app), \
            (tmp_path / "app.log").read_text()
        wait_for(lambda: store.get(job).status == "running", 240, "the queued job to start")
        tree = psutil.Process(app.pid).children(recursive=True)
        commands = [" ".join(p.cmdline()) for p in tree]
        assert any("streamlit" in c for c in commands), commands
        assert any(lifecycle.WORKER_MODULE in c for c in commands), commands
        app.send_signal(signal.CTRL_BREAK_EVENT if windows_style else getattr(signal, how))
        code = app.wait(timeout=120)
        if not windows_style:
            assert code == (130 if how == "SIGINT" else 128 + signal.SIGTERM)
    finally:
        if app.poll() is None:
            app.kill()
        log.close()
    left = [p for p in tree if not gone(p)]
    for p in left:  # do not leak them into the rest of the session, then fail
        p.kill()
    assert not left, [(p.pid, p.cmdline()) for p in left]
    assert store.list(statuses=("running",)) == []
    stopped = store.get(job)
    assert stopped.status == "failed", stopped
    assert stopped.error in ("worker stopped (terminated)", STOPPED_ERROR)
    text = (tmp_path / "app.log").read_text()
    assert "stopping the dashboard" in text
    with pytest.raises(OSError):  # nothing listens on the port any more
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
