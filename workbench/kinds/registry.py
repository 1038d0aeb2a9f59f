"""The recipe kinds by name, and what the dispatcher (workbench/dispatch.py) needs of each."""

from __future__ import annotations

from types import ModuleType
from typing import Any, Protocol

from workbench.kinds import extract_lora, generate, grid, merge, merge_search, pick, train
from workbench.plan import RunPlan, RunResult


class Kind(Protocol):
    """What `workbench/dispatch.py` needs of a kind module."""

    def describe(self, recipe: Any, overwrite: bool = False) -> RunPlan: ...

    def run(self, plan: RunPlan, *, progress: bool = True) -> RunResult: ...


KINDS: dict[str, ModuleType] = {
    "merge": merge,
    "extract_lora": extract_lora,
    "generate": generate,
    "train": train,
    "grid": grid,
    "pick": pick,
    "merge_search": merge_search,
}
