"""Progress and cancellation, one mechanism for the terminal, the job store and the dashboard.

Engines open a `task(...)` and call `advance(n)`; the task draws a tqdm bar in the terminal when
asked to, and forwards every update to the *sink* installed for the current run (a job worker
installs one that writes progress rows to the job store). Cancellation is cooperative: a worker
sets the cancel flag, and the engine's next `advance()` (or `check_cancelled()`) raises
`Cancelled`, so the engine unwinds through its own `finally` blocks and leaves no partial output.

Tasks nest: a task opened while another is open in the same thread (sampling previews inside the
training loop, one picture's sampling inside a grid) counts as part of the parent's current unit.
Every event carries `overall`, the fraction of the outermost task with the open children folded in
("sampling 90 %" at training step 4 of 12 is (3 + 0.9) / 12 of the job, not 90 %), so the
dashboard can show one bar for the whole job and the phase beside it.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

from workbench.errors import WorkbenchError


class Cancelled(WorkbenchError):
    """The user (or a job's cancel button) stopped the run."""


@dataclass(frozen=True)
class ProgressEvent:
    """One update: `done` of `total` units in the task named `desc`; eta_s is None until known."""

    desc: str
    done: float
    total: float | None
    unit: str
    elapsed_s: float
    eta_s: float | None
    message: str | None = None
    metrics: Mapping[str, float] | None = None  # numbers for curves (loss, lr, s/it), as numbers
    overall: float | None = None  # 0..1 of the outermost open task, nested tasks folded in


Sink = Callable[[ProgressEvent], None]

# Process-wide, not per thread: engines report from helper threads too (the merge writer's), and
# a worker process runs one job at a time.
_SINKS: list[Sink] = []
_SINKS_LOCK = threading.Lock()


def _sinks() -> list[Sink]:
    with _SINKS_LOCK:
        return list(_SINKS)


_cancel = threading.Event()
_open = threading.local()  # per thread: the stack of tasks opened with task() and not yet closed


def _open_tasks() -> list["Task"]:
    if not hasattr(_open, "stack"):
        _open.stack = []
    return _open.stack


def cancel_event() -> threading.Event:
    """The process-wide cancel flag, for engines that take a threading.Event."""
    return _cancel


@contextmanager
def sink(callback: Sink) -> Iterator[None]:
    """Send every progress event of this thread to `callback` while the block runs."""
    with _SINKS_LOCK:
        _SINKS.append(callback)
    try:
        yield
    finally:
        with _SINKS_LOCK:
            _SINKS.remove(callback)


def request_cancel() -> None:
    """Ask the running engine to stop at its next progress update (thread- and signal-safe)."""
    _cancel.set()


def reset_cancel() -> None:
    _cancel.clear()


def cancel_requested() -> bool:
    return _cancel.is_set()


def check_cancelled() -> None:
    """Raise Cancelled if a stop was requested; engines call this between units of work."""
    if _cancel.is_set():
        raise Cancelled("cancelled by request")


class Task:
    """A unit counter with ETA that feeds a tqdm bar and the installed sinks."""

    def __init__(self, desc: str, total: float | None, unit: str, bar: bool,
                 parent: "Task | None" = None, **tqdm_kwargs) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.parent = parent  # the task this one is a part of (one unit of it), if any
        self.done = 0.0
        self.start = time.monotonic()
        self._bar = None
        if bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, **tqdm_kwargs)

    def fraction(self) -> float | None:
        """0..1 of this task alone (None while its total is unknown)."""
        if not self.total:
            return None
        return max(0.0, min(1.0, self.done / self.total))

    def overall(self) -> float | None:
        """0..1 of the outermost task: each open child fills the parent's current unit, so a
        phase nested in a step never moves the job's bar past that step. None when the
        outermost task's total is unknown."""
        frac, node = self.fraction(), self
        while node.parent is not None:
            parent = node.parent
            if not parent.total:
                return None
            done = max(0.0, min(parent.done, parent.total))
            frac = min(1.0, (done + (frac or 0.0)) / parent.total)
            node = parent
        return frac

    def event(self, message: str | None = None,
              metrics: Mapping[str, float] | None = None) -> ProgressEvent:
        elapsed = time.monotonic() - self.start
        eta = None
        if self.total and self.done > 0:
            eta = elapsed * (self.total - self.done) / self.done
        return ProgressEvent(self.desc, self.done, self.total, self.unit, elapsed, eta, message,
                             dict(metrics) if metrics else None, self.overall())

    def advance(self, n: float = 1, message: str | None = None, check: bool = True,
                metrics: Mapping[str, float] | None = None) -> None:
        """Count `n` more units done, report them (with any `metrics`), and stop here if a
        cancel was requested (check=False from helper threads: the engine's loop checks it)."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            if message:
                self._bar.set_postfix_str(message, refresh=False)
        self._emit(message, metrics)
        if check:
            check_cancelled()

    def note(self, message: str) -> None:
        """Report a message (e.g. the current loss) without counting work."""
        if self._bar is not None:
            self._bar.set_postfix_str(message)
        self._emit(message)

    def _emit(self, message: str | None, metrics: Mapping[str, float] | None = None) -> None:
        sinks = _sinks()
        if sinks:
            event = self.event(message, metrics)
            for callback in sinks:
                callback(event)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@contextmanager
def task(desc: str, total: float | None, unit: str = "it", bar: bool = True,
         **tqdm_kwargs) -> Iterator[Task]:
    """`with task("sampling", steps, "step", bar=progress) as t: ... t.advance()`."""
    stack = _open_tasks()
    t = Task(desc, total, unit, bar, parent=stack[-1] if stack else None, **tqdm_kwargs)
    stack.append(t)
    try:
        t._emit(None)
        yield t
    finally:
        t.close()
        if t in stack:
            stack.remove(t)
