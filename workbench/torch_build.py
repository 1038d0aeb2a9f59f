"""Which PyTorch build fits this machine's NVIDIA driver, and the one command that installs it.

The pip package `torch` on PyPI is a CPU-only build on Windows (and macOS), so a Windows user with an
RTX card who types `py run.py demo` first gets a torch that cannot see the card; on Linux the PyPI
build is a CUDA build that an older driver may be unable to run. Both `run.py` (the set-up at the
repository root, before any dependency is installed) and `workbench doctor` (workbench/doctor.py)
say so with the same message and the same command, so this module uses the standard library only:
run.py imports it with the system Python.

What the driver supports comes from `nvidia-smi`, which every NVIDIA driver installs on PATH
(Windows: System32): its header names the newest CUDA version the driver runs ("CUDA Version: 13.0"),
and `--query-gpu` lists each card with its compute capability. PyTorch publishes one wheel index
per CUDA version (https://download.pytorch.org/whl/cu126, cu128, cu130 for the 2.9 releases); the
newest index not newer than what the driver supports is the one that runs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import PurePath, PurePosixPath, PureWindowsPath

# The versions run.py installs (README "Tested versions"); pyproject.toml holds them as lower bounds.
TORCH_PINS = ("torch==2.14.1", "torchvision==0.29.1")
WHEEL_INDEX = "https://download.pytorch.org/whl/"
# (CUDA version, index name), newest first: the CUDA builds PyTorch publishes for these releases.
# Re-check the list on pytorch.org ("previous versions") when TORCH_PINS moves.
CUDA_INDEXES = (((13, 0), "cu130"), ((12, 8), "cu128"), ((12, 6), "cu126"))
SMI_TIMEOUT_S = 30


@dataclass(frozen=True)
class SmiGpu:
    """One card as nvidia-smi lists it."""

    index: int
    name: str
    vram_mib: int | None = None
    capability: tuple[int, int] | None = None


@dataclass(frozen=True)
class DriverFacts:
    """What nvidia-smi says: driver version, newest CUDA it runs, and the cards."""

    driver: str | None = None
    cuda: tuple[int, int] | None = None
    gpus: tuple[SmiGpu, ...] = field(default_factory=tuple)

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus) or self.driver is not None


# --------------------------------------------------------------------------------------- parsing

_DRIVER = re.compile(r"Driver Version:\s*([0-9][0-9.]*)")
_CUDA = re.compile(r"CUDA Version:\s*([0-9]+)\.([0-9]+)")


def parse_smi_header(text: str) -> tuple[str | None, tuple[int, int] | None]:
    """(driver version, CUDA version) from plain `nvidia-smi` output."""
    driver = _DRIVER.search(text)
    cuda = _CUDA.search(text)
    return (driver.group(1) if driver else None,
            (int(cuda.group(1)), int(cuda.group(2))) if cuda else None)


def parse_smi_query(text: str) -> tuple[SmiGpu, ...]:
    """Cards from `nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv,noheader,nounits`
    (compute_cap may be missing: older drivers do not know that field)."""
    gpus = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if not parts or not parts[0] or parts[0].startswith(("No devices", "NVIDIA-SMI has failed")):
            continue
        vram = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
        cap = None
        if len(parts) > 2 and re.fullmatch(r"\d+\.\d+", parts[2]):
            major, minor = parts[2].split(".")
            cap = (int(major), int(minor))
        gpus.append(SmiGpu(len(gpus), parts[0], vram, cap))
    return tuple(gpus)


def _run(args: list[str]) -> str | None:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=SMI_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def probe_driver() -> DriverFacts:
    """Ask nvidia-smi (when it is on PATH); a machine without it has no NVIDIA driver to use."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return DriverFacts()
    driver, cuda = parse_smi_header(_run([smi]) or "")
    query = "--format=csv,noheader,nounits"
    listing = _run([smi, "--query-gpu=name,memory.total,compute_cap", query])
    if listing is None:  # drivers before compute_cap was a query field
        listing = _run([smi, "--query-gpu=name,memory.total", query])
    return DriverFacts(driver, cuda, parse_smi_query(listing or ""))


# ---------------------------------------------------------------------------------- the advice

def index_for(driver_cuda: tuple[int, int] | None) -> str | None:
    """The newest CUDA wheel index the driver runs (None: the driver is older than all of them)."""
    if driver_cuda is None:
        return CUDA_INDEXES[-1][1]  # nvidia-smi did not say: the oldest build asks least of it
    for version, name in CUDA_INDEXES:
        if driver_cuda >= version:
            return name
    return None


def install_command(python: str, index: str) -> str:
    """The pip command that replaces the installed torch by the build from `index`."""
    return (f"{python} -m pip install --force-reinstall {' '.join(TORCH_PINS)} "
            f"--index-url {WHEEL_INDEX}{index}")


def _version(v: tuple[int, int] | None) -> str:
    return f"{v[0]}.{v[1]}" if v else "unknown"


def cuda_build_fix(facts: DriverFacts, python: str) -> str:
    """What to do so that torch can use the card: the install command, or a driver update first."""
    index = index_for(facts.cuda)
    if index is None:
        oldest = CUDA_INDEXES[-1][0]
        return (f"update the NVIDIA driver (it runs CUDA up to {_version(facts.cuda)}; the oldest "
                f"CUDA build of torch needs {_version(oldest)}), then run: "
                f"{install_command(python, CUDA_INDEXES[-1][1])}")
    return f"run: {install_command(python, index)}"


def _card(facts: DriverFacts) -> str:
    return facts.gpus[0].name if facts.gpus else "the NVIDIA GPU"


def cpu_torch_problem(facts: DriverFacts, torch_version: str, python: str) -> tuple[str, str]:
    """(what, fix) for a machine with an NVIDIA card whose installed torch is a CPU-only build."""
    driver = f" (driver {facts.driver}, CUDA up to {_version(facts.cuda)})" if facts.driver else ""
    return (f"torch {torch_version} is a CPU-only build: {_card(facts)}{driver} is not used",
            cuda_build_fix(facts, python))


def driver_problem(facts: DriverFacts, torch_version: str, torch_cuda: str,
                   python: str) -> tuple[str, str]:
    """(what, fix) when torch is a CUDA build but sees no GPU while nvidia-smi does: the build is
    for a newer CUDA than the driver runs (or the driver is broken)."""
    what = (f"torch {torch_version} is built for CUDA {torch_cuda} but cannot use {_card(facts)}: "
            f"the driver ({facts.driver or 'unknown version'}) runs CUDA up to {_version(facts.cuda)}")
    fix = cuda_build_fix(facts, python)
    if index_for(facts.cuda) is not None:
        fix = f"update the NVIDIA driver, or install the build this driver runs: {fix}"
    return what, fix


def display_python(python: str | PurePath, cwd: str | PurePath) -> str:
    """An interpreter path as the user types it in a fix: relative to `cwd` where it lies below it,
    with the separators of the platform that made it (a venv's Scripts\\ folder means Windows),
    `.exe` left off, quoted when it holds a space (PowerShell, cmd and POSIX shells all take that)."""
    windows = "\\" in str(python) or PurePath(python).parent.name == "Scripts"
    kind = PureWindowsPath if windows else PurePosixPath
    full, base = kind(python), kind(cwd)
    try:
        shown = full.relative_to(base)
    except ValueError:
        shown = full
    if shown.suffix.lower() == ".exe":
        shown = shown.with_suffix("")
    text = str(shown)
    return f'"{text}"' if " " in text else text
