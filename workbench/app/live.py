"""Page parts that follow running jobs by themselves: each is a Streamlit fragment that re-runs
every `REFRESH_S` seconds while a job it shows is queued or running, and stops its timer when
nothing is (one full rerun then declares it without `run_every`). The Jobs page keeps a slow
timer (`IDLE_S`) even then: a job queued from another tab or page appears there without a reload,
and its first look at an active job switches it to the fast one.

Only the fragment re-runs, so a form being edited above it is not disturbed. The interval each
section was declared with is kept in `st.session_state[DECLARED]` by name: that is how a test
(Streamlit's AppTest never fires `run_every` timers itself) checks that a section refreshes.
"""

from __future__ import annotations

from typing import Callable

import streamlit as st

from workbench.app import forms

REFRESH_S = 2.0  # how often a running job's panel is redrawn
IDLE_S = 10.0  # how often a section that watches for new jobs looks while none is active
DECLARED = "live.declared"  # session_state: {section name: run_every it was declared with}
ACTIVE = ("queued", "running")


def jobs_active(kind: str | None = None) -> bool:
    """Whether a job (of this kind) is queued or running. Jobs of dead workers are marked failed
    first (JobStore.reap), so a crashed job shows "failed" at the next refresh, not "running"."""
    store = forms.job_store()
    store.reap()
    return bool(store.list(kind=kind, statuses=ACTIVE, limit=1))


def section(name: str, body: Callable[[], None], active: Callable[[], bool],
            idle_s: float | None = None) -> float | None:
    """Draw `body` as a fragment that refreshes every REFRESH_S seconds while `active()` holds,
    else every `idle_s` (None: not at all); returns the interval it was declared with."""
    running = active()
    interval = REFRESH_S if running else idle_s
    st.session_state.setdefault(DECLARED, {})[name] = interval

    @st.fragment(run_every=interval)
    def _live() -> None:
        body()
        if running != active():
            # the last job ended, or (idle timer) one appeared: a full run declares the section
            # with the timer that fits
            st.rerun()

    _live()  # its fragment id comes from where it is drawn: one per section
    return interval
