"""The `pick` recipe: choose a trained LoRA's step and strength by scores, checked on held-out data.

`workbench pick TRAINING_FOLDER` builds this same recipe from its options (workbench/cli_pick.py),
and the Train page's "Pick step and strength" button builds it too (workbench/app/views/
pick_panel.py), so there is one description of a pick: this model. The kind's dry run and run are
in workbench/kinds/pick.py.
"""

from __future__ import annotations

from importlib import resources
from typing import Annotated, Literal

from pydantic import Field

from workbench.recipes.common import PixelSize, RecipeBase, RecipeName, RecipePath, SamplerName, StrictModel
from workbench.recipes.generate import MemorySpec
from workbench.recipes.grid import ClipScore, FloatValues, IntValues, expand_range

DEFAULT_STRENGTHS = "0.4-1.2 [5]"
DEFAULT_SELECTION_SEEDS = [1, 2]
DEFAULT_EVALUATION_SEEDS = [101, 102, 103]
PROMPTS_FILE = "pick_prompts.txt"


def default_prompts() -> list[str]:
    """The shipped prompt set (workbench/data/pick_prompts.txt): subjects unlike training captions."""
    text = resources.files("workbench").joinpath("data", PROMPTS_FILE).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


class PickGeneration(StrictModel):
    """How every image of the pick is made (the same for every step and strength)."""

    sampler: SamplerName = "Euler a"
    steps: Annotated[int, Field(gt=0)] = 20
    cfg: Annotated[float, Field(ge=0)] = 7.0
    width: PixelSize | None = None  # None: the training resolution
    height: PixelSize | None = None
    negative_prompt: str = ""
    clip_skip: Annotated[int, Field(gt=0)] | None = None


class PickScores(StrictModel):
    """The CLIP backbone both scores use (style similarity and prompt adherence), and how much
    adherence the choice may give up against the last step at strength 1.0."""

    clip: ClipScore = Field(default_factory=ClipScore)
    adherence_margin: Annotated[float, Field(ge=0)] = 1.0  # CLIP points


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
    selection_seeds: IntValues = Field(default_factory=lambda: list(DEFAULT_SELECTION_SEEDS))
    evaluation_seeds: IntValues = Field(default_factory=lambda: list(DEFAULT_EVALUATION_SEEDS))
    held_out_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.3
    generation: PickGeneration = Field(default_factory=PickGeneration)
    scores: PickScores = Field(default_factory=PickScores)
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

    def seed_values(self, which: str) -> list[int]:
        """'selection' or 'evaluation' seeds as a list (range text expanded)."""
        values = getattr(self, f"{which}_seeds")
        return list(expand_range(values, integer=True) if isinstance(values, str) else values)

    def prompt_values(self) -> list[str]:
        return list(self.prompts) if self.prompts else default_prompts()

    def reference_errors(self) -> list[tuple[tuple[str | int, ...], str]]:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        if any(v <= 0 for v in self.strength_values()):
            problems.append((("strengths",), "strengths must be above 0 (a LoRA at strength 0 is "
                             "the base model)"))
        for which in ("selection", "evaluation"):
            if -1 in self.seed_values(which):
                problems.append(((f"{which}_seeds",), "seed -1 (random) cannot be paired or "
                                 "cached; give fixed seeds"))
        return problems
