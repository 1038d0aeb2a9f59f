"""Hashes that fill in after a listing: a queue of files hashed one after another.

Hashing a folder of multi-GB checkpoints takes minutes, reading a header takes milliseconds; so
listings (`workbench models scan`, the dashboard's Models page) show names, architectures and sizes
at once with the hashes already in the cache (workbench/formats/hashes.py), and a `HashFiller`
computes the rest, either in the caller with a progress callback (the CLI's tqdm bar) or in a
background thread (the dashboard, which redraws as results arrive). Results go through the same
cache, so every file is hashed once whatever asked for it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.formats.hashes import cached, sha256_file


class HashFiller:
    """A queue of files to sha256; thread-safe, one worker thread at most."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: deque[Path] = deque()
        self._queued: set[Path] = set()
        self.hashes: dict[Path, str] = {}    # full sha256 of the files done
        self.errors: dict[Path, str] = {}    # files that could not be read
        self.total_bytes = 0                 # of everything queued so far
        self.done_bytes = 0
        self.current: Path | None = None
        self._thread: threading.Thread | None = None

    def known(self, paths: Iterable[str | Path]) -> dict[Path, str]:
        """{path: sha256} for the files whose hash is known now (cache or this queue)."""
        paths = [Path(p) for p in paths]
        with self._lock:
            out = {p: self.hashes[p] for p in paths if p in self.hashes}
        out.update(cached([p for p in paths if p not in out]))
        return out

    def add(self, paths: Iterable[str | Path]) -> int:
        """Queue the files whose hash is not known yet; returns how many were queued."""
        paths = [Path(p) for p in paths]
        known = self.known(paths)
        n = 0
        with self._lock:
            for p in paths:
                if p in known or p in self._queued or p in self.errors:
                    if p in known:
                        self.hashes.setdefault(p, known[p])
                    continue
                try:
                    self.total_bytes += p.stat().st_size
                except OSError:
                    pass
                self._queue.append(p)
                self._queued.add(p)
                n += 1
        return n

    def forget_errors(self) -> None:
        """Let files that failed be tried again (the Models page's Rescan)."""
        with self._lock:
            self.errors.clear()

    @property
    def pending(self) -> int:
        """Files queued or being hashed."""
        with self._lock:
            return len(self._queued)

    def run(self, on_bytes: Callable[[int], None] | None = None, _worker: bool = False) -> None:
        """Hash everything queued, in the calling thread."""
        while True:
            with self._lock:
                if not self._queue:
                    self.current = None
                    if _worker:  # under the lock: a later start() sees no thread and starts one
                        self._thread = None
                    return
                path = self._queue.popleft()
                self.current = path

            def count(n: int) -> None:
                with self._lock:
                    self.done_bytes += n
                if on_bytes is not None:
                    on_bytes(n)

            try:
                digest = sha256_file(path, on_bytes=count)
                with self._lock:
                    self.hashes[path] = digest
            except WorkbenchError as e:  # unreadable file: listed with its error, queue goes on
                with self._lock:
                    self.errors[path] = str(e)
            except Exception as e:  # a bug must not leave the queue stuck behind a dead thread
                with self._lock:
                    self.errors[path] = f"{type(e).__name__}: {e}"
            finally:
                with self._lock:
                    self._queued.discard(path)

    def start(self) -> bool:
        """Hash the queue in a daemon thread (one at most); returns whether one is running."""
        with self._lock:
            if self._thread is not None:
                return True
            if not self._queue:
                return False
            self._thread = threading.Thread(target=self.run, kwargs={"_worker": True},
                                            name="hash-filler", daemon=True)
            self._thread.start()
            return True

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the background thread; returns whether the queue is done."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.pending == 0
