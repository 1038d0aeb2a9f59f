"""Page parts that follow running jobs by themselves: each is a Streamlit fragment that re-runs
every `REFRESH_S` seconds while a job it shows is queued or running, and stops its timer when
nothing is (one full rerun then declares it without `run_every`).

Only the fragment re-runs, so a form being edited above it is not disturbed. The interval each
section was declared with is kept in `st.session_state[DECLARED]` by name: that is how a test
(Streamlit's AppTest never fires `run_every` timers itself) checks that a section refreshes.
"""

from __future__ import annotations

from typing import Callable

import streamlit as st

from workbench.app import forms

REFRESH_S = 2.0  # how often a running job's panel is redrawn
DECLARED = "live.declared"  # session_state: {section name: run_every it was declared with}
ACTIVE = ("queued", "running")


def jobs_active(kind: str | None = None) -> bool:
    """Whether a job (of this kind) is queued or running. Jobs of dead workers are marked failed
    first (JobStore.reap), so a crashed job shows "failed" at the next refresh, not "running"."""
    store = forms.job_store()
    store.reap()
    return bool(store.list(kind=kind, statuses=ACTIVE, limit=1))


def section(name: str, body: Callable[[], None],
            active: Callable[[], bool]) -> float | None:
    """Draw `body` as a fragment that refreshes every REFRESH_S seconds while `active()` holds;
    returns the interval it was declared with (None: no timer)."""
    running = active()
    interval = REFRESH_S if running else None
    st.session_state.setdefault(DECLARED, {})[name] = interval

    @st.fragment(run_every=interval)
    def _live() -> None:
        body()
        if running and not active():
            st.rerun()  # the last job ended: a full run declares the section without a timer

    _live()  # its fragment id comes from where it is drawn: one per section
    return interval
