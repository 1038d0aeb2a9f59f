"""A/B comparison grids: cells, cell store, scores, statistics, grid images, reports.

`workbench grid RECIPE.yaml` (kind: grid) runs `workbench/kinds/grid.py`.
"""
