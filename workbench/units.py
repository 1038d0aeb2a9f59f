"""How sizes are printed: decimal units (1 GB = 10^9 bytes) everywhere, as the memory planner counts
(`workbench/pipeline/memory_plan.py`), so a dry run, a scan and a plan never disagree by 7 %."""

from __future__ import annotations


def human_size(n: float) -> str:
    """`532 B`, `4.3 MB`, `6.9 GB`."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # pragma: no cover - the loop always returns

