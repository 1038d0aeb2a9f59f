"""What the two choosing recipes share: prompts, seeds, references, generation and scores.

`kind: pick` (workbench/recipes/pick.py) chooses a LoRA's step and strength and `kind: merge_search`
(workbench/recipes/merge_search.py) chooses merge weights; both make pictures on *selection* seeds,
score them against part of the user's pictures, and re-check the choice on *evaluation* seeds
against the held-out part (workbench/grid/holdout.py). One shape for those sections, so a user who
wrote one recipe can write the other, and the dashboard panels fill both the same way.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Annotated

from pydantic import Field

from workbench.recipes.common import PixelSize, RecipePath, SamplerName, StrictModel
from workbench.recipes.grid import ClipScore, IntValues, expand_range

DEFAULT_SELECTION_SEEDS = [1, 2]
DEFAULT_EVALUATION_SEEDS = [101, 102, 103]
PROMPTS_FILE = "pick_prompts.txt"

Problems = list[tuple[tuple[str | int, ...], str]]


def default_prompts() -> list[str]:
    """The shipped prompt set (workbench/data/pick_prompts.txt): everyday subjects unlike training
    captions, so adherence is measured on prompts the style was not taught."""
    return list(_shipped_prompts())


@lru_cache(maxsize=1)
def _shipped_prompts() -> tuple[str, ...]:
    """The file, read once per process (a dry run asks for the prompts several times)."""
    text = resources.files("workbench").joinpath("data", PROMPTS_FILE).read_text(encoding="utf-8")
    return tuple(prompt_lines(text))


def prompt_lines(text: str) -> list[str]:
    """The prompts of a prompts file: one per line, blank lines and `#` comments skipped (the
    shipped set and `workbench pick --prompts-file` alike)."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


class ChoiceSeeds(StrictModel):
    """Seeds that choose (every candidate is scored on them) and seeds that only check the choice;
    never the same, so the check is not made on the noise the choice was fitted to."""

    selection: IntValues = Field(default_factory=lambda: list(DEFAULT_SELECTION_SEEDS))
    evaluation: IntValues = Field(default_factory=lambda: list(DEFAULT_EVALUATION_SEEDS))

    def values(self, which: str) -> list[int]:
        """'selection' or 'evaluation' as a list (range text such as `1-4` expanded)."""
        value = getattr(self, which)
        return list(expand_range(value, integer=True) if isinstance(value, str) else value)

    def errors(self) -> Problems:
        """Seeds shared by both lists, or -1 (random), which can be neither paired nor cached."""
        problems: Problems = []
        selection, evaluation = self.values("selection"), self.values("evaluation")
        shared = sorted(set(selection) & set(evaluation))
        if shared:
            problems.append((("seeds", "evaluation"), f"seed(s) {shared} are also selection seeds; a "
                             "choice checked on the seeds it was chosen on proves nothing"))
        if -1 in selection or -1 in evaluation:
            problems.append((("seeds",), "seed -1 (random) cannot be paired or cached; give fixed seeds"))
        return problems


class ChoiceReferences(StrictModel):
    """The user's own pictures; a fixed part (chosen by file-name hash, workbench/grid/holdout.py)
    is held out from choosing and used only for the check."""

    dir: RecipePath | None = None
    held_out_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.3


class ChoiceGeneration(StrictModel):
    """How every picture is made: the same for every candidate, so only the candidate differs."""

    sampler: SamplerName = "Euler a"
    steps: Annotated[int, Field(gt=0)] = 20
    cfg: Annotated[float, Field(ge=0)] = 7.0
    width: PixelSize | None = None  # None: the training resolution (pick), the model's native size
    height: PixelSize | None = None  # (merge_search; workbench/arch.py native_side)
    negative_prompt: str = ""
    clip_skip: Annotated[int, Field(gt=0)] | None = None


class ChoiceScores(StrictModel):
    """The CLIP backbone of both scores (style similarity to the references and prompt adherence),
    and how many CLIP-score points of adherence the choice may give up against its baseline."""

    clip: ClipScore = Field(default_factory=ClipScore)
    adherence_margin: Annotated[float, Field(ge=0)] = 1.0
