"""The `pick` recipe: choose a trained LoRA's step and strength by scores, checked on held-out data.

`workbench pick TRAINING_FOLDER` builds this same recipe from its options (workbench/cli_pick.py),
and the Train page's "Pick step and strength" button builds it too (workbench/app/views/
pick_panel.py), so there is one description of a pick: this model. The kind's dry run and run are
in workbench/kinds/pick.py.
"""

from __future__ import annotations

from typing import Literal

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
from workbench.recipes.grid import FloatValues, IntValues, expand_range

DEFAULT_STRENGTHS = "0.4-1.2 [5]"


class PickOutput(StrictModel):
    dir: RecipePath | None = None  # None: <training folder>/pick
    # where the chosen step goes as <lora name>.safetensors with its A1111 sidecar <lora name>.json
    # (e.g. Forge's models/Lora); None: the pick folder
    lora_dir: RecipePath | None = None
    overwrite: bool = False


class PickRecipe(RecipeBase):
    """kind: pick: the best (step, strength) of a trained LoRA for the user's own pictures."""

    KIND = "pick"
    kind: Literal["pick"] = "pick"
    name: RecipeName | None = None  # default: the recipe file's name
    description: str | None = None
    training: RecipePath  # a `workbench train` output folder (step files, provenance.json)
    steps: IntValues | None = None  # None: every step file in the folder
    strengths: FloatValues = DEFAULT_STRENGTHS  # 1.0 is added: it is the baseline's strength
    prompts: list[str] | None = Field(default=None, min_length=1)  # None: the shipped set
    seeds: ChoiceSeeds = Field(default_factory=ChoiceSeeds)
    # dir None: the training run's dataset (its provenance.json says where)
    references: ChoiceReferences = Field(default_factory=ChoiceReferences)
    generation: ChoiceGeneration = Field(default_factory=ChoiceGeneration)  # size None: training size
    scores: ChoiceScores = Field(default_factory=ChoiceScores)
    memory: MemorySpec = Field(default_factory=MemorySpec)
    output: PickOutput = Field(default_factory=PickOutput)

    def strength_values(self) -> list[float]:
        """The strengths to try, ascending, with 1.0 (the baseline's) always among them."""
        values = expand_range(self.strengths) if isinstance(self.strengths, str) else list(self.strengths)
        return sorted({round(float(v), 6) for v in values} | {1.0})

    def step_values(self) -> list[int] | None:
        if self.steps is None:
            return None
        return list(expand_range(self.steps, integer=True) if isinstance(self.steps, str) else self.steps)

    def prompt_values(self) -> list[str]:
        return list(self.prompts) if self.prompts else default_prompts()

    def reference_errors(self) -> Problems:
        problems: Problems = []
        if any(v <= 0 for v in self.strength_values()):
            problems.append((("strengths",), "strengths must be above 0 (a LoRA at strength 0 is "
                             "the base model)"))
        return problems + self.seeds.errors()
