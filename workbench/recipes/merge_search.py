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

from workbench.recipes.common import (
    RecipeBase,
    RecipeName,
    RecipePath,
    SamplerName,
    StrictModel,
)
from workbench.recipes.generate import MemorySpec
from workbench.recipes.grid import ClipScore
from workbench.recipes.common import PixelSize

SEARCH_METHODS = ("weighted_sum", "add_difference")
SPACES = ("alpha", "block_groups", "blocks")
ADHERENCE_MODES = ("constraint", "pareto")


class SearchInputs(StrictModel):
    """The models merged: A (its layout is kept), B, and C for add_difference (A + α(B − C))."""

    A: RecipePath
    B: RecipePath
    C: RecipePath | None = None


class SearchReferences(StrictModel):
    """The user's own pictures; a fixed part (by name hash) is held out from the search."""

    dir: RecipePath
    held_out_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.3


class SearchSeeds(StrictModel):
    """Seeds that choose (every trial) and seeds that check the choice (best vs A vs B)."""

    selection: list[int] = Field(min_length=1)
    evaluation: list[int] = Field(min_length=1)


class SearchSettings(StrictModel):
    """How every picture of the search is made (the same for every trial)."""

    negative_prompt: str = ""
    sampler: SamplerName = "Euler a"
    steps: Annotated[int, Field(gt=0)] = 20
    cfg: Annotated[float, Field(ge=0)] = 7.0
    width: PixelSize = 512
    height: PixelSize = 512
    clip_skip: Annotated[int, Field(gt=0)] | None = None


class SearchObjective(StrictModel):
    """Style similarity to the selection pictures is maximised; CLIP adherence is either a
    constraint (no worse than the better input by more than `margin` CLIP-score points) or a
    second objective (`pareto`: optuna keeps the front; the best is its most stylish member
    within the margin)."""

    adherence: Literal["constraint", "pareto"] = "constraint"
    margin: Annotated[float, Field(ge=0)] = 1.0


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
    prompts: list[str] = Field(min_length=1)
    seeds: SearchSeeds
    trials: Annotated[int, Field(ge=1, le=10_000)] = 30
    space: Literal["alpha", "block_groups", "blocks"] = "alpha"
    alpha_range: tuple[float, float] = (0.0, 1.0)
    sampler_seed: int = 0  # the TPE sampler's seed: the same recipe proposes the same trials
    objective: SearchObjective = Field(default_factory=SearchObjective)
    settings: SearchSettings = Field(default_factory=SearchSettings)
    clip: ClipScore = Field(default_factory=ClipScore)  # the backbone of both scores (as in grids)
    memory: MemorySpec = Field(default_factory=MemorySpec)
    output: SearchOutput

    def reference_errors(self) -> list[tuple[tuple[str | int, ...], str]]:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        if self.method == "add_difference" and self.inputs.C is None:
            problems.append((("inputs",), "method add_difference needs input C (A + alpha * (B - C))"))
        if self.method == "weighted_sum" and self.inputs.C is not None:
            problems.append((("inputs", "C"), "method weighted_sum takes A and B only; remove C or "
                             "use method add_difference"))
        shared = sorted(set(self.seeds.selection) & set(self.seeds.evaluation))
        if shared:
            problems.append((("seeds", "evaluation"), f"seed(s) {shared} are also selection seeds; a "
                             "choice checked on the seeds it was chosen on proves nothing"))
        if -1 in self.seeds.selection or -1 in self.seeds.evaluation:
            problems.append((("seeds",), "seed -1 (random) cannot be paired; give fixed seeds"))
        low, high = self.alpha_range
        if not low < high:
            problems.append((("alpha_range",), f"expected [low, high] with low < high (got "
                             f"[{low:g}, {high:g}])"))
        return problems

    def cells_per_trial(self) -> int:
        """Pictures one trial makes: every prompt on every selection seed."""
        return len(self.prompts) * len(self.seeds.selection)
