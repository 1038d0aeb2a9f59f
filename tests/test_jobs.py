"""Job store and worker processes: atomic claims, GPU lock, dead workers, cancel, real merges."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from workbench.jobs.store import JobStore, pid_alive
from workbench.jobs.worker import ProgressWriter, work

# A worker plug-in: a fake "merge" engine that writes its output slowly and non-atomically (the
# worst case for cancel), reports progress with a loss, and takes its pace from the description.
PLUGIN = '''
import time
from pathlib import Path
from workbench import progress
from workbench.dispatch import register_handler
from workbench.plan import RunResult


def slow_merge(recipe, *, overwrite=False, progress=True):
    out = Path(recipe.output.path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if recipe.description == "stubborn":  # never reports progress, like an engine without a bar
        with open(out, "wb") as f:
            while True:
                f.write(b"x")
                f.flush()
                time.sleep(0.02)
    steps, dt = (float(x) for x in (recipe.description or "5 0.01").split())
    with open(out, "wb") as f, progress_task(recipe.name, int(steps)) as t:
        for i in range(int(steps)):
            time.sleep(dt)
            f.write(b"x" * 16)
            f.flush()
            t.advance(1, message=f"loss={1.0 / (i + 1):.4f}", metrics={"loss": 1.0 / (i + 1)})
    return RunResult("merge", recipe.name, False, None, [out])

progress_task = progress.task
register_handler("merge", slow_merge)
'''


def merge_yaml(models: dict[str, Path], out: Path, name: str = "m", pace: str = "5 0.01") -> str:
    return textwrap.dedent(f"""\
        kind: merge
        name: {name}
        description: "{pace}"
        models: {{A: {models['A']}, B: {models['B']}}}
        steps: [{{id: out, method: weighted_sum, inputs: [A, B], alpha: 0.5}}]
        output: {{path: {out}}}
        """)


@pytest.fixture
def store(tmp_path) -> JobStore:
    return JobStore(tmp_path / "jobs.sqlite")


@pytest.fixture
def plugin_env(tmp_path) -> dict[str, str]:
    (tmp_path / "fake_engines.py").write_text(PLUGIN)
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}


# Ceiling for every wait on a worker process or a condition. Waits return as soon as the condition
# holds, so only a failing test waits this long; a loaded machine (2 cores, several test runs) can
# take tens of seconds just to start a worker that imports torch.
WAIT_S = 180.0


def start_worker(db: Path, env: dict, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "workbench.jobs.worker", "--db", str(db),
                             "--plugin", "fake_engines", *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_for(predicate, timeout: float = WAIT_S, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# --------------------------------------------------------------------------------------- the store

def test_claim_is_atomic_and_gpu_jobs_wait_for_the_gpu(store):
    g1 = store.submit("generate", "kind: generate", name="g1")
    g2 = store.submit("train", "kind: train", name="g2")
    c1 = store.submit("merge", "kind: merge", name="c1")
    assert store.get(g1).gpu and not store.get(c1).gpu
    first = store.claim(pid=os.getpid())
    assert first.id == g1 and first.status == "running"
    # the GPU is busy: the next claim skips the waiting GPU job and takes the CPU job
    second = store.claim(pid=os.getpid())
    assert second.id == c1
    assert store.claim(pid=os.getpid()) is None
    assert store.get(g2).status == "queued" and store.gpu_holder().id == g1
    store.finish(g1, "done", ["/x"])
    third = store.claim(pid=os.getpid())
    assert third.id == g2
    assert store.get(g1).results == ["/x"] and store.get(g1).progress == 1.0


def test_cancel_queued_job_is_immediate_and_running_job_is_flagged(store):
    a = store.submit("merge", "kind: merge")
    b = store.submit("merge", "kind: merge")
    store.claim(pid=os.getpid())
    assert store.request_cancel(b) == "cancelled"
    assert store.request_cancel(a) == "running"
    assert store.heartbeat(a) is True  # the worker's next heartbeat sees the flag
    assert store.claim(pid=os.getpid()) is None  # the cancelled queued job is never run


def test_reap_marks_dead_and_silent_workers_failed(store):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    a = store.submit("merge", "kind: merge")
    b = store.submit("merge", "kind: merge")
    store.claim(pid=dead.pid)  # a: pid no longer exists
    store.claim(pid=os.getpid())  # b: alive, but silent for longer than the stale limit
    assert store.reap(stale_after_s=3600) == [a]
    assert store.get(a).status == "failed" and "died" in store.get(a).error
    time.sleep(0.05)
    assert store.reap(stale_after_s=0.01) == [b]
    assert "no heartbeat" in store.get(b).error
    assert store.log_tail(b)[-1].startswith("failed: worker process")


def test_log_and_metrics(store):
    job = store.submit("train", "kind: train")
    store.log(job, "one", "two")
    store.add_metrics(job, 1, {"loss": 0.5})
    store.add_metrics(job, 2, {"loss": 0.25})
    assert store.log_tail(job, 1) == ["two"]
    assert store.metrics(job) == {"loss": [(1.0, 0.5), (2.0, 0.25)]}


def test_metrics_travel_as_numbers(store):
    """A progress event's metrics reach the store as the floats the engine had (no text round
    trip: 0.123456789 keeps its digits), and a message alone stores no metrics."""
    from workbench import progress

    job = store.submit("train", "kind: train")
    with progress.sink(ProgressWriter(store, job)), progress.task("training", 3, bar=False) as t:
        t.advance(1, message="loss 0.1235", metrics={"loss": 0.123456789, "lr": 1e-4})
        t.advance(1, message="cell 2/3")
    assert store.metrics(job) == {"loss": [(1.0, 0.123456789)], "lr": [(1.0, 1e-4)]}


def test_zombie_is_not_alive():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    wait_for(lambda: not psutil.pid_exists(child.pid)  # Windows: gone at exit; POSIX: a zombie
             or psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE, what="child exit")
    assert not pid_alive(child.pid)  # exited but not reaped: still in the process table
    child.wait()
    assert pid_alive(os.getpid())


# ------------------------------------------------------------------------------------- the workers

@pytest.mark.slow
def test_four_concurrent_jobs_each_run_once(store, tiny_sd15, tmp_path, plugin_env):
    outs = [tmp_path / "out" / f"m{i}.safetensors" for i in range(4)]
    ids = [store.submit("merge", merge_yaml(tiny_sd15, o, f"m{i}", "8 0.02"), name=f"m{i}")
           for i, o in enumerate(outs)]
    workers = [start_worker(store.path, plugin_env, "--idle-exit", "0.5") for _ in range(2)]
    try:
        for w in workers:
            assert w.wait(timeout=WAIT_S) == 0, w.stdout.read().decode()
    finally:
        for w in workers:
            w.kill()
    jobs = [store.get(i) for i in ids]
    assert [j.status for j in jobs] == ["done"] * 4, [j.error for j in jobs]
    assert len({j.worker_pid for j in jobs}) >= 2  # they really ran in parallel processes
    for j, out in zip(jobs, outs):
        assert j.results == [str(out)] and out.stat().st_size == 8 * 16
        assert sum(line.startswith("worker ") for line in store.log_tail(j.id, 100)) == 1
        assert store.metrics(j.id)["loss"][-1] == (8.0, 0.125)
    assert store.live_workers() == []  # idle workers removed themselves


@pytest.mark.slow
def test_killed_worker_marks_its_job_failed(store, tiny_sd15, tmp_path, plugin_env):
    out = tmp_path / "killed.safetensors"
    job = store.submit("merge", merge_yaml(tiny_sd15, out, pace="1000 0.05"))
    worker = start_worker(store.path, plugin_env)
    wait_for(lambda: (store.get(job).progress or 0) > 0, what="the job to report progress")
    worker.kill()  # SIGKILL on POSIX, TerminateProcess on Windows: no handler runs
    worker.wait()
    assert store.get(job).status == "running"  # nobody has looked yet
    assert store.reap() == [job]
    failed = store.get(job)
    assert failed.status == "failed" and f"worker process {worker.pid} died" in failed.error


@pytest.mark.slow
def test_cancel_running_job_leaves_no_partial_output(store, tiny_sd15, tmp_path, plugin_env):
    out = tmp_path / "merges" / "cancel.safetensors"
    job = store.submit("merge", merge_yaml(tiny_sd15, out, pace="1000 0.02"))
    worker = start_worker(store.path, plugin_env, "--max-jobs", "1")
    try:
        wait_for(lambda: out.exists() and out.stat().st_size > 0, what="partial output")
        assert store.request_cancel(job) == "running"
        assert worker.wait(timeout=WAIT_S) == 0
    finally:
        worker.kill()
    done = store.get(job)
    assert done.status == "cancelled" and done.error == "cancelled by request"
    assert 0 < done.progress < 1
    assert not out.exists() and not (tmp_path / "merges").exists()
    assert any("removed partial outputs" in line for line in store.log_tail(job))


@pytest.mark.slow
def test_cancel_reaches_an_engine_that_never_reports_progress(store, tiny_sd15, tmp_path,
                                                              plugin_env):
    out = tmp_path / "stubborn.safetensors"
    job = store.submit("merge", merge_yaml(tiny_sd15, out, pace="stubborn"))
    worker = start_worker(store.path, plugin_env, "--max-jobs", "1")
    try:
        wait_for(lambda: out.exists() and out.stat().st_size > 0, what="partial output")
        store.request_cancel(job)
        assert worker.wait(timeout=WAIT_S) == 0  # interrupted after the grace time, then exited
    finally:
        worker.kill()
    assert store.get(job).status == "cancelled" and not out.exists()


def test_real_merge_in_process(store, tiny_sd15, tmp_path):
    from workbench.formats.safetensors_io import read_header

    out = tmp_path / "real.safetensors"
    text = merge_yaml(tiny_sd15, out).replace('description: "5 0.01"\n', "")
    job = store.submit("merge", text)
    missing = str(tmp_path / "nope.safetensors")
    bad = store.submit("merge", text.replace(str(tiny_sd15["B"]), missing))
    assert work(store, max_jobs=2) == 2
    ok, failed = store.get(job), store.get(bad)
    assert ok.status == "done", ok.error
    assert str(out) in ok.results and len(read_header(out).tensors) > 100
    assert failed.status == "failed" and "nope.safetensors" in failed.error


def test_ensure_workers_starts_only_what_can_run(store, monkeypatch):
    import workbench.jobs.worker as worker

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    started = []

    class FakeProc:
        pid = sleeper.pid  # alive, so it counts as a live worker

    monkeypatch.setattr(worker, "spawn_worker", lambda db, **kw: started.append(db) or FakeProc())
    try:
        store.register_worker(os.getpid())
        gpu_job = store.submit("generate", "kind: generate")
        store.claim(pid=os.getpid())  # this worker holds the GPU
        store.submit("train", "kind: train")  # waits for the GPU: a new worker would not help
        assert worker.ensure_workers(store, max_workers=4) == 0
        store.submit("merge", "kind: merge")  # a CPU job can run now
        assert worker.ensure_workers(store, max_workers=4) == 1
        assert worker.ensure_workers(store, max_workers=4) == 0  # the new one is counted at once
        assert len(started) == 1 and store.get(gpu_job).status == "running"
    finally:
        sleeper.kill()
        sleeper.wait()


# ------------------------------------------------------------------- the hard stop (portable)

# Engines that ignore their cancel flag: "stuck" also ignores KeyboardInterrupt (a long native
# call), "deaf" ignores everything, even the SystemExit that SIGTERM becomes on POSIX.
DEAF_PLUGIN = '''
import time
from pathlib import Path
from fake_engines import register_handler

def deaf_merge(recipe, *, overwrite=False, progress=True):
    out = Path(recipe.output.path)
    ignored = BaseException if recipe.description == "deaf" else KeyboardInterrupt
    with open(out, "wb") as f:
        f.write(b"partial")
        f.flush()
        while True:
            try:
                time.sleep(0.05)
            except ignored:
                pass

register_handler("merge", deaf_merge)
'''


@pytest.mark.slow
@pytest.mark.parametrize("pace", ["stuck", "deaf"])
def test_force_stop_ends_a_worker_that_ignores_its_cancel(store, tiny_sd15, tmp_path, plugin_env,
                                                          pace):
    """Cancelling needs no signal (the worker polls its job's flag); when an engine ignores it,
    force_stop terminates the worker's process tree through psutil, and kills it when even that
    is ignored. Either way the job ends cancelled and the worker is gone, on every OS."""
    from workbench.jobs.worker import force_stop

    (tmp_path / "deaf_engines.py").write_text(DEAF_PLUGIN)
    out = tmp_path / f"{pace}.safetensors"
    job = store.submit("merge", merge_yaml(tiny_sd15, out, pace=pace))
    worker = start_worker(store.path, plugin_env, "--plugin", "deaf_engines", "--max-jobs", "1")
    try:
        wait_for(lambda: out.exists(), timeout=120, what="the engine to start")
        assert store.request_cancel(job) == "running"
        time.sleep(4)  # the worker's own interrupt (after CANCEL_GRACE_S) is ignored too
        assert store.get(job).status == "running" and worker.poll() is None
        assert force_stop(store, job, grace_s=3) is True
        worker.wait(timeout=60)
    finally:
        worker.kill()
    done = store.get(job)
    assert done.status == "cancelled" and done.error.startswith("cancelled by request"), done.error
    assert not pid_alive(worker.pid) and store.live_workers() == []
    assert force_stop(store, job) is False  # finished: nothing to stop


def test_force_stop_refuses_to_stop_its_own_process(store):
    from workbench.errors import WorkbenchError
    from workbench.jobs.worker import force_stop

    job = store.submit("merge", "kind: merge")
    store.claim(pid=os.getpid())
    with pytest.raises(WorkbenchError, match="runs in this process"):
        force_stop(store, job)
    assert store.get(job).status == "running"


@pytest.mark.slow
def test_spawned_worker_is_detached(tmp_path):
    """spawn_worker starts the worker in its own session (POSIX) or process group (Windows), so
    Ctrl-C in the dashboard's terminal does not reach it."""
    from workbench.jobs.worker import spawn_worker

    proc = spawn_worker(tmp_path / "jobs.sqlite", idle_exit_s=30)
    try:
        wait_for(lambda: JobStore(tmp_path / "jobs.sqlite").live_workers(), timeout=120,
                 what="the worker")
        if hasattr(os, "getsid"):
            assert os.getsid(proc.pid) == proc.pid != os.getsid(0)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert not pid_alive(proc.pid)
