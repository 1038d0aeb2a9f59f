"""One module per recipe kind, each holding its dry run and its run behind one small protocol.

A kind module has `describe(recipe, overwrite=False) -> RunPlan` (inputs checked, lines to print,
problems, and the kind's own plan in `RunPlan.detail`) and `run(plan, *, progress=True, ...) ->
RunResult`, which executes exactly that plan. A new kind costs its recipe model
(`workbench/recipes/`, one line in `RECIPE_KINDS`) and its module here, one line in `KINDS`
(workbench/kinds/registry.py, which only the dispatcher imports: a kind may use another kind,
as `pick` runs its grids through `grid`, without an import circle through this package).
"""
