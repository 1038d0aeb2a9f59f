"""A/B comparison grids (issue #6): cells, cell store, scores, statistics, grid images, reports.

`workbench grid RECIPE.yaml` (kind: grid) runs `workbench.compare.runner.run`.
"""
