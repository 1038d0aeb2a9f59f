"""Speeds measured on this machine, so a dry run's time estimate comes from what earlier runs took.

A constant throughput guesses wrong by a factor of several on another machine (a merge estimated at
5 s took 34.5 s on the user's disk), so every run records what it measured and the next dry run
uses it. One JSON file in the cache root (`<cache_root>/throughput.json`, see
`formats/hashes.cache_root`) maps "kind/arch/device" to the last few measurements; the
estimate is their median, so one disturbed run does not swing it. A missing or unreadable file
just means "nothing measured yet": the callers fall back to their rough constants and say so.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass

from workbench.errors import WorkbenchError
from workbench.formats.hashes import cache_root
from workbench.formats.writer import atomic_write_text

FILE_NAME = "throughput.json"
KEEP = 5  # measurements kept per key


@dataclass(frozen=True)
class Measured:
    """The median of the last measurements of one kind/arch/device, in `unit`."""

    value: float
    unit: str
    runs: int


def _path():
    return cache_root() / FILE_NAME


def _key(kind: str, arch: str | None, device: str) -> str:
    return f"{kind}/{arch or 'any'}/{device}"


def _read() -> dict:
    try:
        data = json.loads(_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def measured(kind: str, arch: str | None, device: str) -> Measured | None:
    """What earlier runs of `kind` on `arch` and `device` measured, or None."""
    entry = _read().get(_key(kind, arch, device))
    if not isinstance(entry, dict):
        return None
    values = [float(v) for v in entry.get("values", []) if isinstance(v, (int, float)) and v > 0]
    if not values:
        return None
    return Measured(statistics.median(values), str(entry.get("unit", "")), len(values))


def record(kind: str, arch: str | None, device: str, value: float, unit: str) -> None:
    """Add one measurement (kept: the last KEEP). Never fails a run: a cache that cannot be
    written only costs the next estimate its calibration."""
    if not value > 0:
        return
    data = _read()
    key = _key(kind, arch, device)
    entry = data.get(key) if isinstance(data.get(key), dict) else {}
    values = [v for v in entry.get("values", []) if isinstance(v, (int, float))][-(KEEP - 1):]
    data[key] = {"unit": unit, "values": values + [float(value)],
                 "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        _path().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(_path(), json.dumps(data, indent=1, sort_keys=True) + "\n", overwrite=True)
    except (OSError, WorkbenchError):
        pass


def human_time(seconds: float) -> str:
    """`12 s`, `4 min`, `1.5 h`."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
