"""The job store: one SQLite file (WAL) that the dashboard and the worker processes share.

A job is a recipe (its YAML text) plus what happened to it: status, progress and ETA, a log, the
files it wrote. The store is the only thing the dashboard and the workers have in common, so a job
survives page reloads, browser restarts and a restarted dashboard. SQLite needs no server; WAL lets
the pages read while a worker writes, and every state change is one short transaction, so several
workers can claim jobs without claiming one twice (`BEGIN IMMEDIATE` takes the write lock first).

Status moves queued -> running -> done | failed | cancelled (queued -> cancelled directly). A job
whose worker died (pid gone, or no heartbeat for `STALE_AFTER_S`) is marked failed by `reap`,
never left "running"; whether a pid is alive comes from psutil (workbench/system.py), which also
answers on Windows, where `os.kill(pid, 0)` would terminate the process instead of probing it.
GPU jobs run one at a time: `claim` skips a GPU job while another runs.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from workbench.system import pid_alive  # noqa: F401 - re-exported: the jobs package's liveness test

STATUSES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")
GPU_KINDS = frozenset({"generate", "train", "grid"})  # kinds that need the GPU (one at a time)
HEARTBEAT_S = 1.0  # how often a worker touches its running job
STALE_AFTER_S = 30.0  # a running job without a heartbeat for this long belongs to a dead worker
LOG_KEEP = 2000  # log lines kept per job (the oldest are dropped)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    recipe TEXT NOT NULL,            -- the recipe YAML, validated before it was stored
    source TEXT,                     -- file the recipe is read as (relative paths resolve there)
    gpu INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL DEFAULT 'queued',
    progress REAL,                   -- 0..1 of the current task, NULL before the first report
    overall REAL,                    -- 0..1 of the whole job (nested tasks folded in)
    eta_s REAL,
    stage TEXT,                      -- the current task's description
    message TEXT,
    results TEXT NOT NULL DEFAULT '[]',  -- JSON list of written paths
    error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    worker_pid INTEGER,
    heartbeat REAL,
    created REAL NOT NULL,
    started REAL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, id);
CREATE TABLE IF NOT EXISTS logs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL,
    t REAL NOT NULL,
    line TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_job ON logs(job_id, id);
CREATE TABLE IF NOT EXISTS metrics (
    job_id INTEGER NOT NULL,
    step REAL NOT NULL,
    name TEXT NOT NULL,
    value REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS metrics_job ON metrics(job_id, name, step);
CREATE TABLE IF NOT EXISTS workers (
    pid INTEGER PRIMARY KEY,
    started REAL NOT NULL,
    heartbeat REAL NOT NULL
);
"""


@dataclass
class Job:
    """One row of the jobs table."""

    id: int
    kind: str
    name: str
    recipe: str
    source: str | None
    gpu: bool
    status: str
    progress: float | None
    eta_s: float | None
    stage: str | None
    message: str | None
    results: list[str] = field(default_factory=list)
    error: str | None = None
    cancel_requested: bool = False
    worker_pid: int | None = None
    heartbeat: float | None = None
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    overall: float | None = None  # 0..1 of the whole job (progress: of the current phase)

    @property
    def finished_ok(self) -> bool:
        return self.status == "done"

    @property
    def active(self) -> bool:
        return self.status in ("queued", "running")

    @property
    def elapsed_s(self) -> float | None:
        if self.started is None:
            return None
        return (self.finished or time.time()) - self.started


def _job(row: sqlite3.Row) -> Job:
    d = dict(row)
    d["gpu"] = bool(d["gpu"])
    d["cancel_requested"] = bool(d["cancel_requested"])
    d["results"] = json.loads(d["results"] or "[]")
    return Job(**d)


class JobStore:
    """All reads and writes of the job database; safe to use from many processes at once."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
            columns = {r["name"] for r in db.execute("PRAGMA table_info(jobs)")}
            if "overall" not in columns:  # a store written before the column existed
                db.execute("ALTER TABLE jobs ADD COLUMN overall REAL")

    # ---------------------------------------------------------------------------------- plumbing

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA busy_timeout=30000")
        return closing(db)  # type: ignore[return-value]

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction holding the database's write lock from its first statement."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # -------------------------------------------------------------------------------- submitting

    def submit(self, kind: str, recipe_yaml: str, name: str | None = None,
               source: str | Path | None = None, gpu: bool | None = None) -> int:
        """Queue a validated recipe; returns the job id. GPU kinds wait for the GPU."""
        gpu = kind in GPU_KINDS if gpu is None else gpu
        with self._write() as db:
            cur = db.execute(
                "INSERT INTO jobs (kind, name, recipe, source, gpu, created) VALUES (?,?,?,?,?,?)",
                (kind, name or kind, recipe_yaml, str(source) if source else None, int(gpu),
                 time.time()))
            return int(cur.lastrowid)

    # ----------------------------------------------------------------------------------- reading

    def get(self, job_id: int) -> Job | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _job(row) if row else None

    def list(self, limit: int = 200, kind: str | None = None,
             statuses: tuple[str, ...] | None = None) -> list[Job]:
        """Newest first."""
        sql, args = "SELECT * FROM jobs WHERE 1=1", []
        if kind:
            sql += " AND kind=?"
            args.append(kind)
        if statuses:
            sql += f" AND status IN ({','.join('?' * len(statuses))})"
            args += list(statuses)
        sql += " ORDER BY id DESC LIMIT ?"
        with self._connect() as db:
            return [_job(r) for r in db.execute(sql, (*args, limit))]

    def log_tail(self, job_id: int, n: int = 40) -> list[str]:
        with self._connect() as db:
            rows = db.execute("SELECT line FROM logs WHERE job_id=? ORDER BY id DESC LIMIT ?",
                              (job_id, n)).fetchall()
        return [r["line"] for r in reversed(rows)]

    def metrics(self, job_id: int) -> dict[str, list[tuple[float, float]]]:
        """{name: [(step, value), ...]} in step order, e.g. the training loss curve."""
        out: dict[str, list[tuple[float, float]]] = {}
        with self._connect() as db:
            for r in db.execute("SELECT step, name, value FROM metrics WHERE job_id=? "
                                "ORDER BY name, step", (job_id,)):
                out.setdefault(r["name"], []).append((r["step"], r["value"]))
        return out

    def claimable_count(self) -> int:
        """Queued jobs a new worker could start now: every CPU job, and one GPU job when the GPU
        is free."""
        with self._connect() as db:
            cpu, gpu = db.execute("SELECT COALESCE(SUM(gpu=0), 0), COALESCE(SUM(gpu=1), 0) "
                                  "FROM jobs WHERE status='queued'").fetchone()
            busy = db.execute("SELECT 1 FROM jobs WHERE gpu=1 AND status='running'").fetchone()
        return int(cpu) + (1 if gpu and not busy else 0)

    def running_count(self) -> int:
        with self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM jobs WHERE status='running'").fetchone()[0]

    def gpu_holder(self) -> Job | None:
        """The GPU job that is running now, if any."""
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE gpu=1 AND status='running' "
                             "LIMIT 1").fetchone()
        return _job(row) if row else None

    # ---------------------------------------------------------------------------------- workers

    def claim(self, pid: int | None = None, retire_if_idle: bool = False) -> Job | None:
        """Atomically take the oldest queued job this worker may run now (None: nothing to do).

        A GPU job is taken only while no other GPU job runs; CPU jobs may pass a waiting GPU job.
        With `retire_if_idle`, a worker that finds nothing removes its row in the same transaction,
        so a job submitted a moment later sees no worker and starts one (never a job left queued
        next to a worker that is exiting).
        """
        pid = pid or os.getpid()
        now = time.time()
        with self._write() as db:
            gpu_busy = db.execute("SELECT 1 FROM jobs WHERE gpu=1 AND status='running'").fetchone()
            sql = "SELECT id FROM jobs WHERE status='queued'"
            if gpu_busy:
                sql += " AND gpu=0"
            row = db.execute(sql + " ORDER BY id LIMIT 1").fetchone()
            if row is None:
                if retire_if_idle:
                    db.execute("DELETE FROM workers WHERE pid=?", (pid,))
                return None
            db.execute("UPDATE jobs SET status='running', worker_pid=?, heartbeat=?, started=?, "
                       "message=NULL WHERE id=? AND status='queued'", (pid, now, now, row["id"]))
            job = db.execute("SELECT * FROM jobs WHERE id=?", (row["id"],)).fetchone()
        return _job(job)

    def register_worker(self, pid: int | None = None) -> None:
        now = time.time()
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO workers (pid, started, heartbeat) VALUES (?,?,?)",
                       (pid or os.getpid(), now, now))

    def unregister_worker(self, pid: int | None = None) -> None:
        with self._write() as db:
            db.execute("DELETE FROM workers WHERE pid=?", (pid or os.getpid(),))

    def live_workers(self) -> list[int]:
        """Pids of workers that are alive; rows of dead ones are removed."""
        now = time.time()
        with self._write() as db:
            rows = db.execute("SELECT pid, heartbeat FROM workers").fetchall()
            alive = []
            for r in rows:
                if pid_alive(r["pid"]) and now - r["heartbeat"] < STALE_AFTER_S:
                    alive.append(r["pid"])
                else:
                    db.execute("DELETE FROM workers WHERE pid=?", (r["pid"],))
        return alive

    def heartbeat(self, job_id: int | None, pid: int | None = None) -> bool:
        """Touch the worker (and its running job); returns whether a cancel was requested."""
        now = time.time()
        with self._write() as db:
            db.execute("UPDATE workers SET heartbeat=? WHERE pid=?", (now, pid or os.getpid()))
            if job_id is None:
                return False
            db.execute("UPDATE jobs SET heartbeat=? WHERE id=? AND status='running'", (now, job_id))
            row = db.execute("SELECT cancel_requested FROM jobs WHERE id=?", (job_id,)).fetchone()
        return bool(row and row["cancel_requested"])

    def report(self, job_id: int, progress: float | None = None, eta_s: float | None = None,
               stage: str | None = None, message: str | None = None,
               overall: float | None = None) -> None:
        """Progress of a running job (the fields given replace the stored ones): `progress` of
        the current phase (`stage`), `overall` of the whole job."""
        sets, args = ["heartbeat=?"], [time.time()]
        for col, value in (("progress", progress), ("eta_s", eta_s), ("stage", stage),
                           ("message", message), ("overall", overall)):
            if value is not None:
                sets.append(f"{col}=?")
                args.append(value)
        if progress is not None and eta_s is None:
            sets.append("eta_s=NULL")
        with self._write() as db:
            db.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id=? AND status='running'",
                       (*args, job_id))

    def log(self, job_id: int, *lines: str) -> None:
        """Append lines to a job's log, dropping the oldest beyond LOG_KEEP."""
        now = time.time()
        with self._write() as db:
            db.executemany("INSERT INTO logs (job_id, t, line) VALUES (?,?,?)",
                           [(job_id, now, line) for line in lines])
            db.execute("DELETE FROM logs WHERE job_id=? AND id <= (SELECT id FROM logs WHERE "
                       "job_id=? ORDER BY id DESC LIMIT 1 OFFSET ?)", (job_id, job_id, LOG_KEEP))

    def add_metrics(self, job_id: int, step: float, values: dict[str, float]) -> None:
        with self._write() as db:
            db.executemany("INSERT INTO metrics (job_id, step, name, value) VALUES (?,?,?,?)",
                           [(job_id, step, k, v) for k, v in values.items()])

    def finish(self, job_id: int, status: str, results: list[str] | None = None,
               error: str | None = None) -> None:
        """Record the end of a running job: done, failed or cancelled."""
        if status not in FINISHED:
            raise ValueError(f"finish: status must be one of {FINISHED}, got {status!r}")
        with self._write() as db:
            db.execute("UPDATE jobs SET status=?, results=?, error=?, finished=?, "
                       "progress=CASE WHEN ?='done' THEN 1.0 ELSE progress END, "
                       "overall=CASE WHEN ?='done' THEN 1.0 ELSE overall END, eta_s=NULL "
                       "WHERE id=? AND status='running'",
                       (status, json.dumps([str(p) for p in results or []]), error, time.time(),
                        status, status, job_id))

    # --------------------------------------------------------------------------------- controls

    def request_cancel(self, job_id: int) -> str | None:
        """Cancel a job: a queued one at once, a running one when its worker notices (within a
        heartbeat). Returns the job's status after the request (None: no such job)."""
        with self._write() as db:
            db.execute("UPDATE jobs SET status='cancelled', finished=?, cancel_requested=1 "
                       "WHERE id=? AND status='queued'", (time.time(), job_id))
            db.execute("UPDATE jobs SET cancel_requested=1 WHERE id=? AND status='running'",
                       (job_id,))
            row = db.execute("SELECT status FROM jobs WHERE id=?", (job_id,)).fetchone()
        return row["status"] if row else None

    def reap(self, stale_after_s: float = STALE_AFTER_S) -> list[int]:
        """Mark running jobs of dead workers failed (pid gone, or heartbeat older than
        `stale_after_s`); returns their ids. Called by workers and pages, so it is idempotent."""
        now = time.time()
        dead = []
        with self._write() as db:
            for r in db.execute("SELECT id, worker_pid, heartbeat FROM jobs "
                                "WHERE status='running'").fetchall():
                gone = not pid_alive(r["worker_pid"])
                stale = r["heartbeat"] is None or now - r["heartbeat"] > stale_after_s
                if gone or stale:
                    why = (f"worker process {r['worker_pid']} died" if gone else
                           f"worker process {r['worker_pid']} stopped answering "
                           f"(no heartbeat for {now - (r['heartbeat'] or now):.0f} s)")
                    db.execute("UPDATE jobs SET status='failed', error=?, finished=?, eta_s=NULL "
                               "WHERE id=? AND status='running'",
                               (why + " while running this job", now, r["id"]))
                    db.execute("INSERT INTO logs (job_id, t, line) VALUES (?,?,?)",
                               (r["id"], now, f"failed: {why}"))
                    dead.append(r["id"])
        return dead

    def delete(self, job_id: int) -> bool:
        """Forget a finished job (its files stay)."""
        with self._write() as db:
            cur = db.execute(f"DELETE FROM jobs WHERE id=? AND status IN "
                             f"({','.join('?' * len(FINISHED))})", (job_id, *FINISHED))
            if cur.rowcount:
                db.execute("DELETE FROM logs WHERE job_id=?", (job_id,))
                db.execute("DELETE FROM metrics WHERE job_id=?", (job_id,))
            return bool(cur.rowcount)
