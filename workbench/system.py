"""What the workbench asks of the operating system, each in one way that works on Windows, macOS
and Linux.

The user we build for runs Windows; the tests run on Linux. So nothing here reads `/proc`, sends
POSIX signals or relies on POSIX-only `os` functions: process facts come from psutil, and where a
platform offers something better it is chosen by capability (`getattr(subprocess, ...)`), never
by OS name. tests/test_portability.py forces every fallback on Linux, and fails the build when a
POSIX-only call appears elsewhere without a guard; docs/portability.md lists them all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import psutil

from workbench.errors import OutputExistsError, WorkbenchError

# Renames onto a file another program holds open fail on Windows (PermissionError: the file is in
# use); virus scanners and indexers hold new files for a moment, so a few retries usually pass.
REPLACE_DELAYS_S = (0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0)


def ram_available() -> int | None:
    """Bytes of RAM that can be used without swapping (None where the OS does not say: the RAM
    check is then skipped)."""
    try:
        return int(psutil.virtual_memory().available)
    except (OSError, RuntimeError, psutil.Error):
        return None


def pid_alive(pid: int | None) -> bool:
    """Whether a process with this pid exists and has not exited (a killed child its parent has
    not reaped yet is a zombie: it counts as gone)."""
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # someone else's process: it exists
        return True


def detached_process_kwargs() -> dict:
    """Popen arguments that start a process outside this one's console group, so Ctrl-C in (or
    closing) the dashboard's terminal does not stop it: a new process group without a console
    window where `subprocess` offers that (Windows), else a new session (POSIX setsid)."""
    group = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", None)
    if group is not None:
        return {"creationflags": group | getattr(subprocess, "CREATE_NO_WINDOW", 0)}
    return {"start_new_session": True}


def stop_process_tree(pid: int, grace_s: float = 10.0) -> list[int]:
    """Stop a process and all its descendants: terminate (POSIX SIGTERM, which the worker turns
    into a clean exit; TerminateProcess on Windows), then kill what is left after `grace_s`.
    Returns the pids that were running. Cancelling a job never needs this (the worker polls the
    job's cancel flag, workbench/jobs/worker.py); it is the hard stop for a worker that hangs."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    return [p.pid for p in procs]


def replace_file(src: str | Path, dst: str | Path) -> None:
    """os.replace, retried while the target is in use (Windows refuses to replace a file another
    process has open: a model loaded in Forge, an image open in a viewer); a WorkbenchError
    saying so when it never frees up. `src` is left for the caller to remove."""
    for delay in (*REPLACE_DELAYS_S, None):
        try:
            os.replace(src, dst)
            return
        except PermissionError as e:
            if delay is None:
                waited = sum(REPLACE_DELAYS_S)
                raise WorkbenchError(
                    f"{dst}: cannot be replaced ({e.strerror or e}; tried "
                    f"{len(REPLACE_DELAYS_S) + 1} times over {waited:.1f} s). Another program "
                    "probably has it open (a UI that loaded the model, an image viewer, a "
                    "virus scanner): close it and run again, or choose another output name"
                ) from e
            time.sleep(delay)


def existing_folder(path: str | Path) -> Path:
    """The folder `path` is in or would be created in: itself, or its nearest existing parent
    (a file's own folder)."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder.parent if folder.is_file() else folder


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the disk that holds `path`, or would hold it (existing_folder); None when the
    OS does not say. shutil.disk_usage answers on every OS, asked of a folder (Windows'
    GetDiskFreeSpaceEx takes no file)."""
    try:
        return int(shutil.disk_usage(existing_folder(path)).free)
    except OSError:
        return None


def link_or_copy(src: str | Path, dst: str | Path, *, overwrite: bool = False) -> str:
    """Put `src` at `dst`: a hard link where the file system can make one (no second copy of a
    multi-GB model), else a copy. Returns "hard link", "copy" or "same file" (dst already is src).

    An existing `dst` is an OutputExistsError naming it unless `overwrite`. The new name appears
    whole: the file is made under a temp name first, removed on every error path. Without
    `overwrite` the temp file is linked to `dst`, which fails instead of replacing a file another
    writer put there meanwhile; where links are refused (FAT/exFAT, another drive), it is a check
    then a rename. Used for the chosen LoRA of a pick (kinds/pick.py) and for results put into a
    UI's model folders (formats/model_folders.py publish)."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        try:
            if os.path.samefile(src, dst):
                return "same file"
        except OSError:
            pass
        if not overwrite:
            raise OutputExistsError(f"{dst}: output exists; pass --overwrite (or set "
                                    "`output.overwrite: true`) to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    link = getattr(os, "link", None)  # not every platform/file system offers hard links
    try:
        how = "copy"
        if link is not None:
            try:
                link(src, tmp)
                how = "hard link"
            except OSError:  # another drive (EXDEV), FAT/exFAT, a share that refuses links
                tmp.unlink(missing_ok=True)
        if how == "copy":
            shutil.copyfile(src, tmp)
        _publish_new(tmp, dst, overwrite, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return how


def _publish_new(tmp: Path, dst: Path, overwrite: bool, link) -> None:
    """`tmp` becomes `dst`: replaced when `overwrite`, else never over a file that appeared."""
    if not overwrite and link is not None:
        try:
            link(tmp, dst)  # a link in one folder: fails instead of replacing
        except FileExistsError:
            raise OutputExistsError(f"{dst}: output appeared while writing; not overwritten") from None
        except OSError:  # no hard links on this file system: check, then rename
            pass
        else:
            tmp.unlink()
            return
    if dst.exists() and not overwrite:
        raise OutputExistsError(f"{dst}: output appeared while writing; not overwritten")
    replace_file(tmp, dst)


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in `folder` durable where the OS can open a folder for that (POSIX). Windows
    cannot open a folder this way; the rename is atomic there too, only its durability across a
    power cut is then left to the file system."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
