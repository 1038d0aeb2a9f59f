"""Recipes: the YAML files users keep, share and re-run (the format: docs/recipes.md).

`load_recipe(path)` returns a typed recipe (one pydantic model per kind) or raises one RecipeError
listing every problem as `FILE:LINE: field: what was expected (got X)`.
"""

from workbench.recipes.common import LoraRef, SAMPLERS, resolve_path, split_lora
from workbench.recipes.generate import GenerateRecipe
from workbench.recipes.grid import GridRecipe, expand_range
from workbench.recipes.loader import (
    RECIPE_KINDS,
    Recipe,
    RecipeProblem,
    load_recipe,
    parse_recipe,
    recipe_to_yaml,
)
from workbench.recipes.merge import KNOWN_MERGE_METHODS, MERGE_METHOD_RULES, MergeRecipe
from workbench.recipes.train import TrainRecipe

__all__ = [
    "GenerateRecipe", "GridRecipe", "KNOWN_MERGE_METHODS", "LoraRef", "MERGE_METHOD_RULES",
    "MergeRecipe", "RECIPE_KINDS", "Recipe", "RecipeProblem", "SAMPLERS", "TrainRecipe",
    "expand_range", "load_recipe", "parse_recipe", "recipe_to_yaml", "resolve_path", "split_lora",
]
