"""One module per recipe kind, each holding its dry run and its run behind one small protocol.

A kind module has `describe(recipe, overwrite=False) -> RunPlan` (inputs checked, lines to print,
problems, and the kind's own plan in `RunPlan.detail`) and `run(plan, *, progress=True, ...) ->
RunResult`, which executes exactly that plan. A new kind costs its recipe model
(`workbench/recipes/`, one line in `RECIPE_KINDS`) and its module here, one line in `KINDS`.
"""

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
