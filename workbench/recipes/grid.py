"""The `grid` recipe: an X/Y(/Z) comparison of models, LoRAs, prompts or settings, with scores.

Axis values are a list, or for numeric axes an A1111-style range text ("1-10 (+2)", "0.2-1.0 [5]")
that is kept as written in the recipe and expanded by `expand_range` when the grid is built.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Literal, Union

from pydantic import AfterValidator, Discriminator, Field, Tag

from workbench.recipes.generate import MemorySpec
from workbench.recipes.common import (
    LoraSpec,
    PixelSize,
    RecipeBase,
    RecipeName,
    RecipePath,
    SamplerName,
    SizeText,
    StrictModel,
    user_error,
)

MAX_RANGE_VALUES = 10_000
_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_RANGE_RE = re.compile(
    rf"^\s*(?P<start>{_NUM})\s*-\s*(?P<end>{_NUM})\s*"
    rf"(?:\(\s*(?P<step>[+-]?\s*(?:\d+(?:\.\d*)?|\.\d+))\s*\)|\[\s*(?P<count>\d+)\s*\])?\s*$")
_SINGLE_RE = re.compile(rf"^\s*{_NUM}\s*$")
RANGE_HELP = ("numbers or ranges separated by commas, e.g. '1-10', '1-10 (+2)', '10-1 (-3)', "
              "'0.2-1.0 [5]'")


def _range_error(text: str, why: str) -> Exception:
    return user_error("bad_range", f"bad range {text!r}: {why}; expected {RANGE_HELP}")


def _as_int(value: float, text: str) -> int:
    if abs(value - round(value)) > 1e-9:
        raise _range_error(text, f"{value:g} is not a whole number")
    return int(round(value))


def _expand_one(item: str, text: str) -> list[float]:
    if _SINGLE_RE.match(item):
        return [float(item)]
    m = _RANGE_RE.match(item)
    if not m:
        raise _range_error(text, f"cannot read {item.strip()!r}")
    start, end = float(m["start"]), float(m["end"])
    if m["count"] is not None:
        count = int(m["count"])
        if count < 1:
            raise _range_error(text, "the [count] must be at least 1")
        if count == 1:
            return [start]
        return [start + (end - start) * i / (count - 1) for i in range(count)]
    step = float(m["step"].replace(" ", "")) if m["step"] is not None else (1.0 if end >= start else -1.0)
    if step == 0:
        raise _range_error(text, "the (step) must not be 0")
    if (end - start) * step < 0:
        raise _range_error(text, f"a step of {step:+g} never goes from {start:g} to {end:g}")
    count = int(math.floor((end - start) / step + 1e-9)) + 1
    if count > MAX_RANGE_VALUES:
        raise _range_error(text, f"{count} values is more than {MAX_RANGE_VALUES}")
    return [start + i * step for i in range(count)]


def expand_range(text: str, integer: bool = False) -> list[int] | list[float]:
    """Expand A1111 X/Y/Z value text into numbers.

    `1-5` -> 1..5 (both ends included); `1-10 (+3)` -> 1, 4, 7, 10 (a step); `0.2-1.0 [5]` ->
    5 evenly spaced values; items may be mixed with plain numbers: `1, 5-7, 20`. With `integer`
    every value must be whole ([count] ranges are rounded, as a seed or step count must be).
    Raises a pydantic error of type 'bad_range' whose message gives the expected syntax.
    """
    items = str(text).split(",")
    if not str(text).strip():
        raise _range_error(str(text), "it is empty")
    values: list[float] = []
    for item in items:
        if not item.strip():
            raise _range_error(text, "an item between commas is empty")
        values.extend(_expand_one(item, text))
    if len(values) > MAX_RANGE_VALUES:
        raise _range_error(text, f"{len(values)} values is more than {MAX_RANGE_VALUES}")
    if integer:
        rounded_ranges = "[" in text
        return [int(round(v)) if rounded_ranges else _as_int(v, text) for v in values]
    return [round(v, 10) for v in values]


def _check_int_range(text: str) -> str:
    expand_range(text, integer=True)
    return text


def _check_float_range(text: str) -> str:
    expand_range(text)
    return text


def _list_or_range(item_type, check):
    return Annotated[
        Union[Annotated[list[item_type], Field(min_length=1), Tag("list")],
              Annotated[str, AfterValidator(check), Tag("range")]],
        Discriminator(lambda v: "range" if isinstance(v, str) else "list"),
    ]


IntValues = _list_or_range(int, _check_int_range)
FloatValues = _list_or_range(float, _check_float_range)


class _Axis(StrictModel):
    label: str | None = None  # shown on the grid instead of the axis name

    def expanded_values(self) -> list:
        """The values as a list (range text expanded)."""
        values = self.values  # type: ignore[attr-defined]
        if isinstance(values, str):
            return expand_range(values, integer=isinstance(self, IntAxis))
        return list(values)


class ModelAxis(_Axis):
    axis: Literal["model"]
    values: list[RecipePath] = Field(min_length=1)


class LoraAxis(_Axis):
    axis: Literal["lora"]
    values: list[LoraSpec] = Field(min_length=1)


class TextAxis(_Axis):
    # prompt_sr: A1111 "Prompt S/R": each value replaces the first value in the default prompt
    axis: Literal["prompt", "negative_prompt", "prompt_sr"]
    values: list[str] = Field(min_length=1)


class IntAxis(_Axis):
    axis: Literal["seed", "steps", "clip_skip"]
    values: IntValues


class FloatAxis(_Axis):
    axis: Literal["cfg"]
    values: FloatValues


class SamplerAxis(_Axis):
    axis: Literal["sampler"]
    values: list[SamplerName] = Field(min_length=1)


class SizeAxis(_Axis):
    axis: Literal["size"]
    values: list[SizeText] = Field(min_length=1)


class MergeAxis(_Axis):
    """A parameter of a merge recipe, previewed without writing a checkpoint."""

    axis: Literal["merge_alpha", "merge_beta"]
    values: FloatValues
    recipe: RecipePath  # the merge recipe whose parameter varies
    step: str | None = None  # the step to vary (None: every step that has the parameter)


Axis = Annotated[
    Union[ModelAxis, LoraAxis, TextAxis, IntAxis, FloatAxis, SamplerAxis, SizeAxis, MergeAxis],
    Field(discriminator="axis"),
]
AXIS_NAMES: tuple[str, ...] = ("model", "lora", "prompt", "negative_prompt", "prompt_sr", "seed",
                               "steps", "clip_skip", "cfg", "sampler", "size", "merge_alpha",
                               "merge_beta")


class GridDefaults(StrictModel):
    """Settings every cell shares unless an axis changes them."""

    model: RecipePath | None = None
    # text encoders and VAE for every model that holds only the UNet/transformer (a GGUF
    # conversion): a checkpoint of the same architecture or a diffusers folder; full checkpoints
    # keep their own (pipeline/components.py)
    components: RecipePath | None = None
    prompt: str = ""
    negative_prompt: str = ""
    sampler: SamplerName = "Euler a"
    steps: Annotated[int, Field(gt=0)] = 20
    cfg: Annotated[float, Field(ge=0)] = 7.0
    width: PixelSize = 512
    height: PixelSize = 512
    clip_skip: Annotated[int, Field(gt=0)] | None = None
    loras: list[LoraSpec] = Field(default_factory=list)


class ClipScore(StrictModel):
    """CLIP score: how well each image matches its prompt (open_clip)."""

    model: str = "ViT-L-14"
    weights: RecipePath | None = None  # a weights file or an open_clip folder; None: the HF cache
    pretrained: str | None = None  # open_clip tag looked up in the HF cache when `weights` is unset


class AestheticScore(StrictModel):
    """LAION-style aesthetic predictor on CLIP image embeddings."""

    weights: RecipePath | None = None


class StyleScore(StrictModel):
    """Similarity of each image to a folder of reference images of the style."""

    reference_dir: RecipePath


class Scores(StrictModel):
    clip: ClipScore | None = None
    aesthetic: AestheticScore | None = None
    style: StyleScore | None = None


class GridOutput(StrictModel):
    dir: RecipePath
    format: Literal["png", "jpg", "webp"] = "png"
    save_cells: bool = True


class GridRecipe(RecipeBase):
    """kind: grid: X/Y(/Z) comparison; cells are paired by seed."""

    KIND = "grid"
    kind: Literal["grid"] = "grid"
    name: RecipeName | None = None  # default: the recipe file's name
    description: str | None = None
    defaults: GridDefaults = Field(default_factory=GridDefaults)
    x: Axis
    y: Axis | None = None
    z: Axis | None = None
    seeds: list[int] | None = Field(default=None, min_length=1)
    scores: Scores | None = None
    # VRAM budget, weight storage and device for every model the grid loads (as in `kind: generate`)
    memory: MemorySpec = Field(default_factory=MemorySpec)
    output: GridOutput

    def axes(self) -> list[tuple[str, object]]:
        """The axes that are set, as (letter, axis)."""
        return [(k, a) for k, a in (("x", self.x), ("y", self.y), ("z", self.z)) if a is not None]

    def cell_count(self) -> int:
        """Images the grid makes: product of the axis lengths times the seeds."""
        n = 1
        for _, axis in self.axes():
            n *= len(axis.expanded_values())  # type: ignore[attr-defined]
        seeded = any(a.axis == "seed" for _, a in self.axes())  # type: ignore[attr-defined]
        return n * (1 if seeded else len(self.seeds or [1]))

    def reference_errors(self) -> list[tuple[tuple[str | int, ...], str]]:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        used: dict[str, str] = {}
        for letter, axis in self.axes():
            name = axis.axis  # type: ignore[attr-defined]
            if name in used:
                problems.append(((letter, "axis"), f"axis '{name}' is already used by "
                                 f"{used[name]}; each axis may appear once"))
            used.setdefault(name, letter)
        if self.z is not None and self.y is None:
            problems.append((("z",), "a z axis needs a y axis"))
        if self.defaults.model is None and "model" not in used and not (
                set(used) & {"merge_alpha", "merge_beta"}):
            problems.append((("defaults",), "missing `model`: give `defaults.model` or a model "
                             "axis"))
        if "seed" in used and self.seeds is not None:
            problems.append((("seeds",), f"`seeds` and the seed axis ({used['seed']}) both set the "
                             "seed; keep one"))
        return problems
