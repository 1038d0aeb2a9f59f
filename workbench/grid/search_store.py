"""Where a merge search keeps its trials: an optuna journal file in the search's output folder.

optuna's JournalStorage appends every trial event to one file, so a search stopped at any point
(Ctrl-C, a crash, a closed laptop) reopens with every finished trial and continues to its budget.
The journal file needs a lock between writers. optuna's default is a symlink lock, but creating a
symlink on Windows needs Developer Mode or admin rights, so the lock is chosen by capability: a
symlink is tried in the output folder and, when the system refuses it, the open-file lock
(`O_CREAT | O_EXCL`, which works everywhere) is used instead.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

JOURNAL_FILE = "search.journal"


def symlinks_work(folder: Path) -> bool:
    """Whether this process may create a symlink in `folder` (tried, then removed)."""
    probe = Path(folder) / f".symlink-probe-{uuid.uuid4().hex[:8]}"
    try:
        os.symlink(Path(folder).name, probe)
    except (OSError, NotImplementedError, AttributeError):
        return False
    try:
        probe.unlink()
    except OSError:
        pass
    return True


def journal_lock(path: Path):
    """The journal lock that works on this system (symlink lock, else the open-file lock)."""
    from optuna.storages.journal import JournalFileOpenLock, JournalFileSymlinkLock  # heavy import

    if symlinks_work(Path(path).parent):
        return JournalFileSymlinkLock(str(path))
    return JournalFileOpenLock(str(path))


def open_storage(folder: Path):
    """The JournalStorage of a search folder (created when missing)."""
    from optuna.storages import JournalStorage  # heavy import: only when a search runs
    from optuna.storages.journal import JournalFileBackend

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / JOURNAL_FILE
    return JournalStorage(JournalFileBackend(str(path), lock_obj=journal_lock(path)))
