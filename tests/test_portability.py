"""Windows/macOS code paths, run on Linux by forcing each fallback (issue #13).

The user runs Windows; CI runs Linux. So every POSIX-only call in `workbench/` has a portable
path, and this file (1) fails the build when a POSIX-only call appears without a capability guard
(an AST scan), and (2) runs the writer, a merge, a training resume, the job store and a worker
under `spawn` with the POSIX extras taken away: no `os.pwrite`/`pread`, no `O_DIRECT`, no
`posix_fallocate`, no `madvise`, no glibc `mallopt`, no `/proc` for workbench code.
docs/portability.md lists each call and its portable path.
"""

from __future__ import annotations

import ast
import errno
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path, PureWindowsPath
from typing import NamedTuple

import psutil
import pytest
import torch
from safetensors.torch import load_file

import workbench
from workbench import system
from workbench.cli import main as cli_main
from workbench.formats import lazy, pipeline_configs_sd, writer
from workbench.jobs.store import JobStore, pid_alive
from workbench.merge import executor

PACKAGE = Path(workbench.__file__).parent

# --------------------------------------------------------------------------- the POSIX-only list

# module -> names that Windows lacks or that mean something else there (os.kill(pid, 0) kills)
POSIX_ONLY_NAMES = {
    "os": {"pwrite", "pread", "pwritev", "preadv", "kill", "killpg", "fork", "forkpty", "setsid",
           "setpgid", "setpgrp", "getpgid", "getpgrp", "getsid", "getuid", "geteuid", "getgid",
           "getegid", "sync", "posix_fallocate", "posix_fadvise", "sched_getaffinity",
           "sched_setaffinity", "getloadavg", "mkfifo", "mknod", "nice", "wait3", "wait4",
           "WNOHANG", "O_DIRECT", "O_NOATIME", "O_NOFOLLOW", "O_CLOEXEC", "uname", "chown",
           "lchown", "fchown", "fchmod", "statvfs", "fstatvfs", "openpty", "memfd_create",
           "sendfile", "splice", "copy_file_range", "pidfd_open", "register_at_fork"},
    "signal": {"SIGKILL", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGCHLD",
               "SIGSTOP", "SIGCONT", "SIGPIPE", "SIGTSTP", "SIGXFSZ", "SIGWINCH", "alarm",
               "setitimer", "getitimer", "pause", "pthread_kill", "pthread_sigmask",
               "siginterrupt", "sigwait", "sigpending"},
}
POSIX_ONLY_PREFIXES = {"mmap": "MADV_"}  # mmap.MADV_*: Windows maps have no madvise
POSIX_ONLY_METHODS = {"madvise"}  # a method of mmap objects on POSIX only
POSIX_ONLY_MODULES = {"fcntl", "resource", "termios", "tty", "pty", "pwd", "grp", "posix",
                      "syslog", "crypt", "spwd"}
POSIX_ONLY_TEXT = ("/proc/", "/proc\\", "/sys/", "/dev/shm", "libc.so")
POSIX_ONLY_KWARGS = {"start_new_session", "preexec_fn", "pass_fds", "process_group"}

# What a use's guard must catch when the use is tried rather than checked (EAFP): exactly the
# error its absence raises; `except Exception` hides bugs (it hid #14's ENOSPC), so it is no guard.
# POSIX paths and library names are never guarded automatically: each is in ALLOWED, or gone.
CATCHES = {"name": {"AttributeError"}, "method": {"AttributeError"},
           "module": {"ImportError", "ModuleNotFoundError"}, "text": set(), "kwarg": set()}

# "path:qualname:call" -> the portable path taken where it is missing (docs/portability.md).
ALLOWED: dict[str, str] = {
    "workbench/merge/executor.py:_glibc:'libc.so'":
        "glibc is loaded by its soname inside try/except OSError; where it is missing (Windows, "
        "macOS, musl) malloc keeps its defaults: the merge is the same, only slower to allocate "
        "(forced by test_merge_with_every_fallback_forced)",
}


class Finding(NamedTuple):
    where: str  # "path:qualname:call"
    line: int


def scan_source(source: str, path: str = "<source>") -> list[Finding]:
    """POSIX-only uses in `source` that no capability check or try/except guards."""
    tree = ast.parse(source)
    modules: dict[str, str] = {}  # local name -> module, for `import os`, `import signal as sig`
    candidates: list[tuple[ast.AST, tuple[ast.AST, ...]]] = []  # (node, its ancestors)
    all_names = set().union(*POSIX_ONLY_NAMES.values(), POSIX_ONLY_METHODS)

    def visit(node: ast.AST, ancestors: tuple[ast.AST, ...]) -> None:  # one pass over the tree
        if isinstance(node, ast.Import):
            for a in node.names:
                modules[a.asname or a.name.split(".")[0]] = a.name.split(".")[0]
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.keyword, ast.Call)) or (
                isinstance(node, ast.Attribute) and (node.attr in all_names or any(
                    node.attr.startswith(p) for p in POSIX_ONLY_PREFIXES.values()))) or (
                isinstance(node, ast.Constant) and isinstance(node.value, str)):
            candidates.append((node, ancestors))
        inner = (*ancestors, node)
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, ())

    def module_of(expr: ast.AST) -> str | None:
        return modules.get(expr.id) if isinstance(expr, ast.Name) else None

    def posix_only(module: str | None, name: str) -> bool:
        return (name in POSIX_ONLY_NAMES.get(module or "", ())
                or name.startswith(POSIX_ONLY_PREFIXES.get(module or "", "\0")))

    def checks_capability(test: ast.AST, name: str) -> bool:
        """`if hasattr(x, "name")` / `if getattr(x, "name", None)` ... (any x)."""
        return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                   and n.func.id in ("hasattr", "getattr") and len(n.args) >= 2
                   and isinstance(n.args[1], ast.Constant) and n.args[1].value == name
                   for n in ast.walk(test))

    def catches(handler: ast.ExceptHandler, kind: str) -> bool:
        if handler.type is None:
            return False
        types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        names = {t.id if isinstance(t, ast.Name) else getattr(t, "attr", "") for t in types}
        return bool(names & CATCHES[kind])

    def guarded(node: ast.AST, ancestors: tuple[ast.AST, ...], kind: str, name: str) -> bool:
        child = node
        for parent in reversed(ancestors):
            if isinstance(parent, ast.If) and child in parent.body and \
                    checks_capability(parent.test, name):
                return True
            if isinstance(parent, ast.Try) and child in parent.body and \
                    any(catches(h, kind) for h in parent.handlers):
                return True
            child = parent
        return False

    def qualname(ancestors: tuple[ast.AST, ...]) -> str:
        return ".".join(a.name for a in ancestors if isinstance(
            a, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))) or "<module>"

    found: list[Finding] = []
    for node, ancestors in candidates:
        uses = []  # (kind, name, call)
        if isinstance(node, ast.Attribute):
            module = module_of(node.value)
            if posix_only(module, node.attr):
                uses.append(("name", node.attr, f"{module}.{node.attr}"))
            elif module is None and node.attr in POSIX_ONLY_METHODS:
                uses.append(("method", node.attr, f".{node.attr}()"))
        elif isinstance(node, ast.Call):
            args = node.args
            if isinstance(node.func, ast.Name) and node.func.id == "getattr" and \
                    len(args) == 2 and isinstance(args[1], ast.Constant) and \
                    posix_only(module_of(args[0]), str(args[1].value)):
                uses.append(("name", args[1].value,  # no default: fails where it is missing
                             f"getattr({module_of(args[0])}, {args[1].value!r})"))
        elif isinstance(node, ast.Import):
            uses += [("module", a.name, f"import {a.name}") for a in node.names
                     if a.name.split(".")[0] in POSIX_ONLY_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            top = node.module.split(".")[0]
            uses += [("module", a.name, f"from {node.module} import {a.name}") for a in node.names
                     if top in POSIX_ONLY_MODULES or posix_only(top, a.name)]
        elif isinstance(node, ast.Constant):
            if not (ancestors and isinstance(ancestors[-1], ast.Expr)):  # docstrings may name them
                uses += [("text", t, repr(t)) for t in POSIX_ONLY_TEXT if t in node.value]
        elif isinstance(node, ast.keyword) and node.arg in POSIX_ONLY_KWARGS:
            uses.append(("kwarg", node.arg, f"{node.arg}="))
        for kind, name, call in uses:
            if not guarded(node, ancestors, kind, name):
                line = getattr(node, "lineno", None) or getattr(ancestors[-1], "lineno", 0)
                found.append(Finding(f"{path}:{qualname(ancestors)}:{call}", line))
    return found


def scan_package() -> list[Finding]:
    found = []
    for file in sorted(PACKAGE.rglob("*.py")):
        rel = file.relative_to(PACKAGE.parent).as_posix()
        found += scan_source(file.read_text(encoding="utf-8"), rel)
    return found


@pytest.mark.slow
def test_no_unguarded_posix_only_call_in_the_package():
    """A new os.pwrite, os.kill, '/proc/...', fcntl, mmap.MADV_*, libc... fails the build unless
    a capability check guards it or ALLOWED names its portable path."""
    found = scan_package()
    new = [f"{f.where} (line {f.line})" for f in found if f.where not in ALLOWED]
    assert new == [], ("POSIX-only calls without a portable path (guard them with a capability "
                       "check, see docs/portability.md):\n  " + "\n  ".join(new))
    stale = set(ALLOWED) - {f.where for f in found}
    assert not stale, f"ALLOWED entries no longer used: {sorted(stale)}"


@pytest.mark.parametrize("source, flagged", [
    ("import os\nos.pwrite(1, b'', 0)", ["<source>:<module>:os.pwrite"]),
    ("import os as o\ndef f(p):\n    o.kill(p, 0)", ["<source>:f:os.kill"]),
    ("import os\nflags = os.O_DIRECT", ["<source>:<module>:os.O_DIRECT"]),
    ("import os\nw = getattr(os, 'pwrite')", ["<source>:<module>:getattr(os, 'pwrite')"]),
    ("import signal\nsignal.signal(signal.SIGKILL, None)", ["<source>:<module>:signal.SIGKILL"]),
    ("import mmap\nx = mmap.MADV_WILLNEED", ["<source>:<module>:mmap.MADV_WILLNEED"]),
    ("class M:\n    def f(self):\n        self.map.madvise(1)", ["<source>:M.f:.madvise()"]),
    ("import fcntl", ["<source>:<module>:import fcntl"]),
    ("from resource import getrlimit", ["<source>:<module>:from resource import getrlimit"]),
    ("from os import pwrite", ["<source>:<module>:from os import pwrite"]),
    ("open(f'/proc/{pid}/stat')", ["<source>:<module>:'/proc/'"]),
    ("import ctypes\nctypes.CDLL('libc.so.6')", ["<source>:<module>:'libc.so'"]),
    ("import subprocess\nsubprocess.Popen(['x'], start_new_session=True)",
     ["<source>:<module>:start_new_session="]),
    # guarded: a capability check, a tried call, a getattr with a default, a docstring
    ("import os\nif hasattr(os, 'pwrite'):\n    os.pwrite(1, b'', 0)", []),
    ("import os\ntry:\n    os.posix_fallocate(1, 0, 1)\nexcept AttributeError:\n    pass", []),
    ("import os\nflags = getattr(os, 'O_DIRECT', 0)", []),
    ("try:\n    import fcntl\nexcept ImportError:\n    fcntl = None", []),
    ('"""Reads nothing from /proc/ (docstring)."""', []),
    # a guard must cover the use: the else branch and the handler are not guarded
    ("import os\nif hasattr(os, 'pwrite'):\n    pass\nelse:\n    os.pwrite(1, b'', 0)",
     ["<source>:<module>:os.pwrite"]),
    ("import os\nif hasattr(os, 'O_DIRECT'):\n    os.pwrite(1, b'', 0)",
     ["<source>:<module>:os.pwrite"]),
    ("import os\ntry:\n    pass\nexcept OSError:\n    os.kill(1, 0)", ["<source>:<module>:os.kill"]),
    # a catch-all is no capability check, and paths/libraries need an ALLOWED entry
    ("import os\ntry:\n    os.pwrite(1, b'', 0)\nexcept Exception:\n    pass",
     ["<source>:<module>:os.pwrite"]),
    ("import ctypes\ntry:\n    ctypes.CDLL('libc.so.6')\nexcept OSError:\n    pass",
     ["<source>:<module>:'libc.so'"]),
    ("from pathlib import Path\ntry:\n    Path('/proc/meminfo').read_text()\nexcept OSError:\n"
     "    pass", ["<source>:<module>:'/proc/'"]),
])
def test_the_scan_flags_unguarded_uses_only(source, flagged):
    assert [f.where for f in scan_source(source)] == flagged


# ------------------------------------------------------------------- forcing the fallbacks

_NO_PROC = threading.local()
_STDLIB = (os.path.dirname(os.__file__) + os.sep,)
_SITE = ("site-packages", "dist-packages")


def _proc_guard(event: str, args: tuple) -> None:
    """Audit hook: while a test forces it, workbench code (not psutil, the portable layer that
    reads /proc on Linux only) cannot open anything under /proc or /sys."""
    if not getattr(_NO_PROC, "on", False) or event not in ("open", "os.listdir", "os.scandir"):
        return
    path = args[0] if args else None
    if isinstance(path, bytes):
        path = path.decode("utf-8", "replace")
    if not isinstance(path, str) or not path.startswith(("/proc", "/sys")):
        return
    frame = sys._getframe(1)
    while frame is not None:  # the first caller outside the standard library decides
        file = frame.f_code.co_filename
        stdlib = file.startswith(_STDLIB + ("<frozen ",)) and not any(s in file for s in _SITE)
        if not stdlib:
            break
        frame = frame.f_back
    caller = frame.f_globals.get("__name__", "") if frame is not None else ""
    if caller.startswith("workbench"):
        raise FileNotFoundError(errno.ENOENT, "no /proc here (forced by the test)", path)


sys.addaudithook(_proc_guard)  # hooks cannot be removed; `_NO_PROC.on` switches it per test


def force_fallbacks(patch) -> None:
    """Take away what Windows lacks. `patch` is pytest's monkeypatch (undone after the test) or
    a one-way patcher in a spawned worker."""
    for name in ("pwrite", "pread", "O_DIRECT", "posix_fallocate"):
        if hasattr(os, name):
            patch.delattr(os, name)
    patch.setattr(lazy, "MADV_POPULATE_READ", None)
    patch.setattr(executor, "_glibc", lambda: None)


@pytest.fixture
def windows_like(monkeypatch):
    force_fallbacks(monkeypatch)
    _NO_PROC.on = True
    yield
    _NO_PROC.on = False


def test_the_forced_fallbacks_are_in_force(windows_like, tmp_path):
    assert not hasattr(os, "pwrite") and not hasattr(os, "O_DIRECT")
    assert executor._reuse_freed_memory() is False
    probe = {"__name__": "workbench.probe", "Path": Path, "os": os}  # code of the package
    exec("def read():\n    return Path('/proc/meminfo').read_text()\n"
         "def open_fd():\n    return os.open('/proc/self/stat', os.O_RDONLY)\n", probe)
    for attempt in (probe["read"], probe["open_fd"]):
        with pytest.raises(FileNotFoundError, match="forced by the test"):
            attempt()
    assert pid_alive(os.getpid())  # psutil answers without workbench reading /proc
    assert system.ram_available() > 0


def test_writer_without_pwrite_o_direct_fallocate(windows_like, tmp_path, monkeypatch):
    """The same bytes as the full POSIX path (several staging buffers, a padded tail)."""
    monkeypatch.setattr(writer._SequentialSink, "BUFFER", 64 * 1024)
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(1000 + i, generator=g) for i in range(40)}  # ~160 KB
    with writer.SafetensorsWriter(tmp_path / "a.safetensors",
                                  {k: ("F32", tuple(t.shape)) for k, t in tensors.items()}) as w:
        for k, t in tensors.items():
            w.write(k, t)
        assert not w.direct_io
    monkeypatch.undo()  # the POSIX extras are back
    writer.save_file_atomic(tensors, tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]


def test_lazy_views_without_madvise(windows_like, tmp_path):
    big = torch.arange(600_000, dtype=torch.float32)  # 2.4 MB: large enough to be advised
    path = writer.save_file_atomic({"big": big, "small": torch.ones(3)}, tmp_path / "m.safetensors")
    with lazy.open_lazy(path) as f:
        assert torch.equal(f.view("big"), big) and torch.equal(f.view("small"), torch.ones(3))


def test_pipeline_config_keys_with_windows_paths(monkeypatch):
    """On Windows `str(relative path)` is `unet\\config.json`, which the lookups
    (`files["unet/config.json"]` in sd15_configs/sdxl_configs) never matched. The bundled configs
    are read here through Windows-flavoured paths."""
    real = pipeline_configs_sd.DATA

    class WinFile(PureWindowsPath):
        def read_text(self, encoding=None):
            return (real / Path(*self.parts[3:])).read_text(encoding=encoding)

    class WinData(PureWindowsPath):  # C:\workbench\data\<arch>
        def rglob(self, pattern):
            for p in (real / self.name).rglob(pattern):
                yield WinFile(self, *p.relative_to(real / self.name).parts)

    assert str(WinFile("C:/workbench/data/sd15/unet/config.json").relative_to(
        "C:/workbench/data/sd15")) == "unet\\config.json"  # what the old key was on Windows
    monkeypatch.setattr(pipeline_configs_sd, "DATA", WinData("C:/workbench/data"))
    pipeline_configs_sd._bundled.cache_clear()
    try:
        windows = {arch: pipeline_configs_sd.bundled_files(arch) for arch in ("sd15", "sdxl")}
    finally:
        pipeline_configs_sd._bundled.cache_clear()
    for arch, files in windows.items():
        assert files == pipeline_configs_sd.bundled_files(arch)  # the same table as on Linux
        assert {"unet/config.json", "vae/config.json", "text_encoder/config.json"} <= set(files)
    assert windows["sdxl"]["text_encoder_2/config.json"]["hidden_size"] == 1280


def _weighted_sum_recipe(tmp_path: Path, models: dict[str, Path], out: Path) -> Path:
    recipe = tmp_path / f"{out.stem}.yaml"
    recipe.write_text(f"kind: merge\nname: m\nmodels: {{A: {models['A']}, B: {models['B']}}}\n"
                      "steps: [{id: out, method: weighted_sum, inputs: [A, B], alpha: 0.3}]\n"
                      f"output: {{path: {out}}}\n")
    return recipe


@pytest.mark.slow
def test_merge_with_every_fallback_forced(windows_like, tmp_path, tiny_sd15):
    out = tmp_path / "merged.safetensors"
    assert cli_main(["merge", str(_weighted_sum_recipe(tmp_path, tiny_sd15, out)),
                     "--no-progress"]) == 0
    merged, a, b = load_file(out), load_file(tiny_sd15["A"]), load_file(tiny_sd15["B"])
    assert merged.keys() == a.keys()
    for key, ta in a.items():  # the reference formula, as tests/test_merge_engine.py checks it
        expected = ((1 - 0.3) * ta.float() + 0.3 * b[key].float()).to(ta.dtype) \
            if ta.is_floating_point() else ta
        assert torch.equal(merged[key], expected), key
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_training_resume_with_every_fallback_forced(windows_like, tmp_path, tiny_model,
                                                    style_set):
    """Stop at step 2, resume to 4: bit-identical to an uninterrupted run, with the state folder
    written and renamed through the portable calls (writable fsync handles, system.fsync_dir,
    system.replace_file)."""
    from workbench.recipes.loader import load_recipe
    from workbench.kinds import train as train_kind  # heavy: torch models

    def run(recipe, **options):
        return train_kind.run(train_kind.describe(recipe), **options)

    def recipe(name: str, **extra):
        text = (f"kind: train\nname: tiny\nbase: {tiny_model('sd15')}\ndataset: {style_set}\n"
                "trigger: wbstyle\nresolution: 64\nnetwork: {type: lora, rank: 4, alpha: 2}\n"
                "max_steps: 4\nlearning_rate: 1.0e-3\nseed: 5\n"
                + "".join(f"{k}: {v}\n" for k, v in extra.items())
                + f"output: {{dir: {tmp_path / name}, save_every: 2, save_precision: fp32}}\n")
        (tmp_path / f"{name}.yaml").write_text(text)
        return load_recipe(tmp_path / f"{name}.yaml")

    cache = tmp_path / "cache"
    a = recipe("a")
    run(a, progress=False, cache_root=cache)
    run(recipe("b"), progress=False, cache_root=cache, stop_at=2)
    states = sorted(p.name for p in (tmp_path / "b" / "state").iterdir())
    assert states == ["step-00000002"]
    b2 = recipe("b", resume=str(tmp_path / "b"))
    run(b2, progress=False, cache_root=cache)
    wa, wb = load_file(str(a.lora_path)), load_file(str(b2.lora_path))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]


def test_job_store_without_proc(windows_like, tmp_path):
    """Liveness (psutil) of a live, an exited and an unknown pid; reap and live_workers."""
    store = JobStore(tmp_path / "jobs.sqlite")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert pid_alive(os.getpid()) and not pid_alive(gone.pid) and not pid_alive(None)
    a, b = store.submit("merge", "kind: merge"), store.submit("merge", "kind: merge")
    store.claim(pid=gone.pid)
    store.claim(pid=os.getpid())
    store.heartbeat(b)
    assert store.reap(stale_after_s=3600) == [a]
    assert f"worker process {gone.pid} died" in store.get(a).error
    store.register_worker(gone.pid)
    store.register_worker(os.getpid())
    assert store.live_workers() == [os.getpid()]


# ---------------------------------------------------------------------------- process starts

def test_detached_start_is_chosen_by_capability(monkeypatch):
    if hasattr(subprocess, "CREATE_NEW_PROCESS_GROUP"):  # this is Windows: force the POSIX path
        monkeypatch.delattr(subprocess, "CREATE_NEW_PROCESS_GROUP")
    assert system.detached_process_kwargs() == {"start_new_session": True}
    monkeypatch.setattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200, raising=False)
    monkeypatch.setattr(subprocess, "CREATE_NO_WINDOW", 0x08000000, raising=False)
    assert system.detached_process_kwargs() == {"creationflags": 0x08000200}


def test_ram_available_comes_from_psutil(monkeypatch):
    assert 0 < system.ram_available() <= psutil.virtual_memory().total

    def broken():
        raise OSError(errno.EACCES, "denied")

    monkeypatch.setattr(psutil, "virtual_memory", broken)
    assert system.ram_available() is None  # the planner then skips its RAM check


@pytest.mark.slow
def test_stop_process_tree_stops_children_too(tmp_path):
    child_code = "import time; time.sleep(120)"
    parent_code = textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", {child_code!r}])
        print(child.pid, flush=True)
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE,
                              text=True)
    try:
        child = int(parent.stdout.readline())
        stopped = system.stop_process_tree(parent.pid, grace_s=30)
        assert set(stopped) == {parent.pid, child}
        assert parent.wait(timeout=30) is not None
        assert not psutil.pid_exists(child) or psutil.Process(child).status() == "zombie"
    finally:
        parent.kill()
    assert system.stop_process_tree(parent.pid) == []  # already gone: nothing to do


class _OneWay:
    """monkeypatch's setattr/delattr without the undo, for a spawned worker process."""

    setattr = staticmethod(setattr)
    delattr = staticmethod(delattr)


def _spawned_worker(db: str) -> None:
    """The body of a worker started with the `spawn` method (a fresh interpreter, nothing
    inherited: what Windows and macOS do), with the POSIX extras taken away."""
    from workbench.jobs.worker import work

    force_fallbacks(_OneWay)
    _NO_PROC.on = True
    sys.exit(0 if work(JobStore(db), max_jobs=1) == 1 else 1)


@pytest.mark.slow
def test_worker_under_spawn_runs_a_real_merge(tmp_path, tiny_sd15):
    store = JobStore(tmp_path / "jobs.sqlite")
    out = tmp_path / "merged.safetensors"
    job = store.submit("merge", _weighted_sum_recipe(tmp_path, tiny_sd15, out).read_text())
    proc = multiprocessing.get_context("spawn").Process(target=_spawned_worker,
                                                        args=(str(store.path),))
    proc.start()
    proc.join(timeout=300)
    assert proc.exitcode == 0, store.log_tail(job)
    done = store.get(job)
    assert done.status == "done" and str(out) in done.results, done.error
    assert done.worker_pid == proc.pid and not pid_alive(proc.pid)
    a, b, merged = load_file(tiny_sd15["A"]), load_file(tiny_sd15["B"]), load_file(out)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    expected = ((1 - 0.3) * a[key].float() + 0.3 * b[key].float()).to(a[key].dtype)
    assert torch.equal(merged[key], expected)
