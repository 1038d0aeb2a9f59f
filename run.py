#!/usr/bin/env python3
"""Set up and run workbench with one command, the same on Windows, macOS and Linux.

    python run.py demo [--cpu] [ARGS]   the tour on tiny built-in models (`workbench demo ARGS`)
    python run.py app [--cpu] [ARGS]    the dashboard (`workbench app ARGS`)
    python run.py doctor [ARGS]         what this machine has and what to fix (`workbench doctor`)
    python run.py test [ARGS]           the whole test suite; ARGS go to pytest
    python run.py test-fast [ARGS]      the same without the slow end-to-end tests (-m "not slow")

(On Windows `py run.py demo` works too, in PowerShell and cmd.) The first run creates `.venv` beside
this file with Python's own venv module, installs torch and torchvision
(workbench/torch_build.py TORCH_PINS), then this package (`pip install -e .`, with the test extra
for the tests). A stamp file per step in .venv records what was installed for which pyproject.toml,
so a second run starts at once and a changed pyproject.toml reinstalls the package only.

The commands run with HF_HUB_OFFLINE=1: nothing is fetched from a model hub. On a machine with an
NVIDIA card whose torch cannot use it (PyPI's torch is CPU-only on Windows; on Linux the driver may
be older than torch's CUDA), the exact pip command that installs a fitting CUDA build is printed
first, and `demo`/`app` stop there unless `--cpu` says the CPU is meant.

Standard library only: this runs before anything is installed. Make's `make demo`/`make test`/
`make test-fast` call this file.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:  # imported by path (tests) rather than run as a script
    sys.path.insert(0, str(ROOT))

from workbench import torch_build  # noqa: E402 - stdlib only; needs ROOT on sys.path first

MIN_PYTHON = (3, 10)
VENV = ROOT / ".venv"
COMMANDS = ("demo", "app", "doctor", "test", "test-fast")
GPU_COMMANDS = ("demo", "app")  # these stop on an unusable GPU unless --cpu is given
TEST_COMMANDS = ("test", "test-fast")
# Candidates for the venv's interpreter, in the order they are looked for: Windows venvs have
# Scripts\python.exe, every other platform bin/python.
VENV_PYTHONS = ("Scripts/python.exe", "Scripts/python", "bin/python", "bin/python3")
USAGE = __doc__.split("\n\n")[1]


@dataclass(frozen=True)
class Command:
    """What was asked: the command, the arguments passed on, and whether `--cpu` was given."""

    name: str
    args: tuple[str, ...] = ()
    cpu: bool = False

    @property
    def for_tests(self) -> bool:
        return self.name in TEST_COMMANDS


def parse_command(argv: list[str]) -> Command | None:
    """The command and its arguments; None for a missing or unknown command (usage is printed).
    Everything after the command is passed on unchanged, except `--cpu` for demo/app."""
    if not argv or argv[0] not in COMMANDS:
        return None
    name, rest = argv[0], list(argv[1:])
    cpu = False
    if name in GPU_COMMANDS and "--cpu" in rest:
        rest = [a for a in rest if a != "--cpu"]
        cpu = True
    return Command(name, tuple(rest), cpu)


_VERBOSITY = ("-q", "-v", "--quiet", "--verbose", "-qq", "-vv")


def child_args(cmd: Command) -> list[str]:
    """Arguments for the venv's Python: `-m workbench NAME ARGS` or `-m pytest ARGS`."""
    if not cmd.for_tests:
        return ["-m", "workbench", cmd.name, *cmd.args]
    quiet = [] if any(a in _VERBOSITY for a in cmd.args) else ["-q"]
    select = ["-m", "not slow"] if cmd.name == "test-fast" else []
    # Two pytest-xdist workers (one on a single-core machine), a test file per worker at a time so
    # module fixtures are built once: the tiny-model builds, imports and CPU-bound tests of two
    # processes overlap (the suite takes about half the time on 2 cores). `-n 0` in ARGS runs
    # everything in one process again.
    workers = [] if any(a == "-n" or a.startswith("-n") and a[2:].isdigit() for a in cmd.args) else \
        ["-n", str(min(2, os.cpu_count() or 1)), "--dist", "loadfile"]
    return ["-m", "pytest", *quiet, *select, *workers, *cmd.args]


# ------------------------------------------------------------------------------------------ .venv

def venv_python(venv: Path) -> Path | None:
    """The venv's interpreter, chosen by which layout exists (None: no venv there yet)."""
    for rel in VENV_PYTHONS:
        candidate = venv / rel
        if candidate.is_file():
            return candidate
    return None


def wanted_stamps(root: Path, for_tests: bool) -> dict[str, str]:
    """Install steps in order, each with the value its stamp must hold to count as done."""
    project = hashlib.sha256((root / "pyproject.toml").read_bytes()).hexdigest()[:16]
    steps = {"pip": "upgraded", "torch": " ".join(torch_build.TORCH_PINS), "package": project}
    if for_tests:
        steps["test"] = project
    return steps


def stamp_path(venv: Path, step: str) -> Path:
    return venv / f".workbench-{step}"


def pending_steps(venv: Path, wanted: dict[str, str]) -> list[str]:
    """The steps whose stamp is missing or holds another value, in install order."""
    todo = []
    for step, value in wanted.items():
        path = stamp_path(venv, step)
        try:
            done = path.read_text(encoding="utf-8").strip() == value
        except OSError:
            done = False
        if not done:
            todo.append(step)
    return todo


def pip_args(step: str) -> list[str]:
    """What `python -m pip` is given for each step."""
    return {"pip": ["install", "--upgrade", "pip"],
            "torch": ["install", *torch_build.TORCH_PINS],
            "package": ["install", "-e", "."],
            "test": ["install", "-e", ".[test]"]}[step]


# -------------------------------------------------------------------------------------- the GPU

@dataclass(frozen=True)
class TorchFacts:
    """The installed torch as the venv's Python reports it."""

    version: str
    cuda: str | None
    cuda_available: bool


def gpu_problem(driver: torch_build.DriverFacts, torch: TorchFacts | None, python: str) -> str | None:
    """Why the installed torch cannot use this machine's NVIDIA card, with the fix; None when it
    can, or when there is no card (nvidia-smi absent or silent) or no torch to ask."""
    if not driver.has_gpu or torch is None or torch.cuda_available:
        return None
    if torch.cuda is None:
        what, fix = torch_build.cpu_torch_problem(driver, torch.version, python)
    else:
        what, fix = torch_build.driver_problem(driver, torch.version, torch.cuda, python)
    return f"{what}. To use the GPU, {fix}"


_TORCH_PROBE = ("import json, torch; print(json.dumps([torch.__version__, torch.version.cuda, "
                "torch.cuda.is_available()]))")


def probe_torch(python: Path) -> TorchFacts | None:
    try:
        out = subprocess.run([str(python), "-c", _TORCH_PROBE], capture_output=True, text=True,
                             timeout=300, cwd=ROOT)
        version, cuda, available = json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None
    return TorchFacts(version, cuda, bool(available))


# ------------------------------------------------------------------------------------------ main

def child_env(base: dict[str, str]) -> dict[str, str]:
    """The environment the commands run in: offline hub, UTF-8 output even on a Windows console."""
    env = dict(base)
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("PYTHONIOENCODING", "utf-8")
    return env


def say(text: str) -> None:
    print(f"run.py: {text}", flush=True)


def create_venv() -> Path | None:
    say(f"creating {VENV} (Python {sys.version.split()[0]}, venv module)")
    if subprocess.call([sys.executable, "-m", "venv", str(VENV)]) != 0:
        say("could not create the virtual environment. On Debian/Ubuntu install the venv module "
            "first (sudo apt install python3-venv); elsewhere reinstall Python from python.org")
        return None
    return venv_python(VENV)


def install(python: Path, steps: list[str], wanted: dict[str, str]) -> bool:
    for step in steps:
        args = pip_args(step)
        say(f"installing ({step}): pip {' '.join(args)}")
        code = subprocess.call([str(python), "-m", "pip", *args], cwd=ROOT)
        if code != 0:
            say(f"pip failed (exit status {code}); fix what it printed above, then run the same "
                "command again (finished steps are not repeated)")
            return False
        stamp_path(VENV, step).write_text(wanted[step] + "\n", encoding="utf-8")
    return True


def main(argv: list[str] | None = None) -> int:
    if sys.version_info < MIN_PYTHON:
        say(f"workbench needs Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer; this is "
            f"{sys.version.split()[0]} ({sys.executable})")
        return 2
    cmd = parse_command(list(sys.argv[1:] if argv is None else argv))
    if cmd is None:
        print(USAGE)
        return 2
    python = venv_python(VENV) or create_venv()
    if python is None:
        return 1
    shown = torch_build.display_python(python, Path.cwd())
    wanted = wanted_stamps(ROOT, cmd.for_tests)
    todo = pending_steps(VENV, wanted)
    early = [s for s in todo if s in ("pip", "torch")]
    if not install(python, early, wanted):
        return 1
    if cmd.name != "doctor":  # doctor reports this itself, with everything else
        driver = torch_build.probe_driver()
        problem = gpu_problem(driver, probe_torch(python) if driver.has_gpu else None, shown)
        if problem:
            say(problem)
            if cmd.name in GPU_COMMANDS and not cmd.cpu:
                say(f"stopped: run that command, or add --cpu to run on the CPU anyway "
                    f"(python run.py {cmd.name} --cpu)")
                return 1
    if not install(python, [s for s in todo if s not in early], wanted):
        return 1
    try:
        return subprocess.call([str(python), *child_args(cmd)], cwd=ROOT, env=child_env(dict(os.environ)))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
