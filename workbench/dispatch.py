"""Run a validated recipe: its kind's dry run, then (unless only the plan was asked for) that plan.

The CLI, the YAML runner, the job worker and the dashboard all come through here, so the plan a
user sees with `--dry-run` is the plan that runs. No library module imports this one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from workbench.errors import OutputExistsError, RecipeError, WorkbenchError
from workbench.kinds.registry import KINDS
from workbench.plan import RunPlan, RunResult
from workbench.recipes.loader import Recipe

# handler(recipe, overwrite=, progress=) used instead of a kind's run: the tests' and plug-ins' seam
_HANDLERS: dict[str, Callable[..., Any]] = {}


def register_handler(kind: str, handler: Callable[..., Any] | None) -> None:
    """Use `handler` for `kind` instead of its kind module's run (None removes it)."""
    if handler is None:
        _HANDLERS.pop(kind, None)
    else:
        _HANDLERS[kind] = handler


def build_plan(recipe: Recipe, overwrite: bool = False) -> RunPlan:
    """Everything a dry run shows: inputs checked on disk, steps, outputs and problems."""
    kind = KINDS.get(recipe.kind)
    if kind is None:
        raise WorkbenchError(f"unknown recipe kind {recipe.kind!r}; expected one of {', '.join(KINDS)}")
    return kind.describe(recipe, overwrite=overwrite)


def refuse_problems(plan: RunPlan) -> None:
    """A real run refuses a plan with problems, and existing outputs it may not replace."""
    where = plan.source or f"{plan.kind} recipe '{plan.name}'"
    other = [p for p in plan.problems if not p.startswith("output exists: ")]
    if other:
        n = len(other)
        raise RecipeError(f"cannot run {where}: {n} problem{'s' if n != 1 else ''} "
                          "(`--dry-run` shows the whole plan):\n" + "\n".join(f"  - {p}" for p in other))
    if plan.existing_outputs:
        raise OutputExistsError(f"{where}: output exists: {plan.existing_outputs[0]}; pass "
                                "--overwrite (or set `overwrite: true` in the recipe's output)")


def run_plan(plan: RunPlan, progress: bool = True, **options: Any) -> RunResult:
    """Execute a plan made by `build_plan` (refused when it has problems)."""
    refuse_problems(plan)
    handler = _HANDLERS.get(plan.kind)
    if handler is not None:
        result = handler(plan.recipe, overwrite=plan.overwrite, progress=progress)
        if isinstance(result, RunResult):
            result.plan = result.plan or plan
            return result
        return RunResult(plan.kind, plan.name, False, plan, [Path(p) for p in (result or [])])
    return KINDS[plan.kind].run(plan, progress=progress, **options)


def run_recipe(recipe: Recipe, dry_run: bool = False, overwrite: bool = False,
               progress: bool = True) -> RunResult:
    """Dry run: the plan. Real run: the same plan executed."""
    plan = build_plan(recipe, overwrite=overwrite)
    if dry_run:
        return RunResult(recipe.kind, plan.name, True, plan, list(plan.outputs))
    return run_plan(plan, progress=progress)
