"""The `merge_search` recipe: search merge weights toward the user's own pictures.

Inputs A, B (and C for add_difference), one merge method of workbench/merge/methods.py, a folder of
the user's pictures split by workbench/grid/holdout.py into selection and held-out parts, prompts,
selection seeds (scored while searching) and evaluation seeds (only for the final check; never the
same), a trial budget and a search space: one `alpha`, the four `block_groups` (BASE / IN / MID /
OUT), or every block id of the architecture (`blocks`). The run is workbench/kinds/merge_search.py.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from workbench.recipes.choice import (
    ChoiceGeneration,
    ChoiceReferences,
    ChoiceScores,
    ChoiceSeeds,
    Problems,
    default_prompts,
)
from workbench.recipes.common import RecipeBase, RecipeName, RecipePath, StrictModel
from workbench.recipes.generate import MemorySpec

SEARCH_METHODS = ("weighted_sum", "add_difference")
SPACES = ("alpha", "block_groups", "blocks")
ADHERENCE_MODES = ("constraint", "pareto")


class SearchInputs(StrictModel):
    """The models merged: A (its layout is kept), B, and C for add_difference (A + α(B − C))."""

    A: RecipePath
    B: RecipePath
    C: RecipePath | None = None


class SearchReferences(ChoiceReferences):
    """The user's pictures are what a search aims at: here the folder must be given."""

    dir: RecipePath


class SearchScores(ChoiceScores):
    """Style similarity to the selection pictures is maximised; CLIP adherence is either a
    constraint (no worse than the better input by more than `adherence_margin` CLIP-score
    points) or a second objective (`pareto`: optuna keeps the front; the best is its most
    stylish member within the margin)."""

    adherence: Literal["constraint", "pareto"] = "constraint"


class SearchOutput(StrictModel):
    dir: RecipePath
    overwrite: bool = False


class MergeSearchRecipe(RecipeBase):
    """kind: merge_search: optuna TPE over merge weights, scored by in-memory merge previews."""

    KIND = "merge_search"
    kind: Literal["merge_search"] = "merge_search"
    name: RecipeName | None = None
    description: str | None = None
    inputs: SearchInputs
    method: Literal["weighted_sum", "add_difference"] = "weighted_sum"
    references: SearchReferences
    prompts: list[str] | None = Field(default=None, min_length=1)  # None: the shipped set
    seeds: ChoiceSeeds = Field(default_factory=ChoiceSeeds)
    trials: Annotated[int, Field(ge=1, le=10_000)] = 30
    space: Literal["alpha", "block_groups", "blocks"] = "alpha"
    alpha_range: tuple[float, float] = (0.0, 1.0)
    sampler_seed: int = 0  # the TPE sampler's seed: the same recipe proposes the same trials
    generation: ChoiceGeneration = Field(default_factory=ChoiceGeneration)  # size None: native
    scores: SearchScores = Field(default_factory=SearchScores)
    memory: MemorySpec = Field(default_factory=MemorySpec)
    output: SearchOutput

    def reference_errors(self) -> Problems:
        problems: Problems = []
        if self.method == "add_difference" and self.inputs.C is None:
            problems.append((("inputs",), "method add_difference needs input C (A + alpha * (B - C))"))
        if self.method == "weighted_sum" and self.inputs.C is not None:
            problems.append((("inputs", "C"), "method weighted_sum takes A and B only; remove C or "
                             "use method add_difference"))
        low, high = self.alpha_range
        if not low < high:
            problems.append((("alpha_range",), f"expected [low, high] with low < high (got "
                             f"[{low:g}, {high:g}])"))
        return problems + self.seeds.errors()

    def prompt_values(self) -> list[str]:
        return list(self.prompts) if self.prompts else default_prompts()

    def cells_per_trial(self) -> int:
        """Pictures one trial makes: every prompt on every selection seed."""
        return len(self.prompt_values()) * len(self.seeds.values("selection"))
