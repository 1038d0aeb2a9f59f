"""The `merge` recipe: named input models, ordered merge steps, one output file.

The merge engine (issue #3) registers the methods' math; this module only knows their names, how
many inputs each takes and which parameters it reads, so that a recipe is checked before any tensor
is touched. Numbers in the method descriptions follow recipes.md (alpha is the share of the second
input, as in A1111 and supermerger).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, Discriminator, Field, Tag

from workbench.recipes.common import (
    RecipeBase,
    RecipeName,
    RecipePath,
    StrictModel,
    choice_error,
    did_you_mean,
    user_error,
)

# name -> one line for `workbench merge --list` (the engine's registry, workbench.merge.methods,
# adds formulas and parameter docs when it is importable)
KNOWN_MERGE_METHODS: dict[str, str] = {
    "weighted_sum": "(1 - alpha)*A + alpha*B; alpha is the share of B",
    "add_difference": "A + alpha*(B - C): add what B learned on top of its base C",
    "block_weighted": "weighted sum of A toward B with one alpha per UNet block (`blocks`)",
    "triple_sum": "(1 - alpha - beta)*A + alpha*B + beta*C",
    "sum_twice": "(1 - beta)*((1 - alpha)*A + alpha*B) + beta*C",
    "train_difference": "A + alpha*(B - C), damped where A is already close to B",
    "add_cosine_a": "weighted sum gated by the cosine similarity of A and B (favours A's structure)",
    "add_cosine_b": "weighted sum gated by the cosine similarity of A and B (favours B's structure)",
    "ties": "TIES: trim each task vector to its top `k` share, elect signs, merge onto the base (first input)",
    "dare": "DARE: A + alpha*(B - C) with each element of B - C dropped with probability `p`, rescaled",
    "slerp": "spherical interpolation from A to B by alpha",
    "model_stock": "Model Stock: average the fine-tunes, pulled toward the base (first input) by their angle",
    "no_merge": "copy A unchanged (to prune, convert dtype or bake a VAE)",
}

# Parameters a step may give; which ones a method reads is in MERGE_METHOD_RULES.
STEP_PARAMS = ("alpha", "beta", "k", "p", "seed", "sim_min", "sim_max", "blocks", "lambda", "density")


@dataclass(frozen=True)
class MethodRule:
    """How many inputs a method takes and which step parameters it reads.

    Mirrors the engine's registry (workbench.merge.methods; a test keeps them in step) so that a
    recipe is checked without importing torch. `blocks` goes with every method that reads alpha:
    it gives alpha per block.
    """

    min_inputs: int
    max_inputs: int | None  # None: no upper limit
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()


MERGE_METHOD_RULES: dict[str, MethodRule] = {
    "weighted_sum": MethodRule(2, 2, ("alpha",), ("blocks",)),
    "add_difference": MethodRule(3, 3, ("alpha",), ("blocks",)),
    "block_weighted": MethodRule(2, 2, ("blocks",)),
    "triple_sum": MethodRule(3, 3, ("alpha", "beta")),
    "sum_twice": MethodRule(3, 3, ("alpha", "beta")),
    "train_difference": MethodRule(3, 3, ("alpha",), ("blocks",)),
    "add_cosine_a": MethodRule(2, 2, ("alpha",), ("sim_min", "sim_max")),
    "add_cosine_b": MethodRule(2, 2, ("alpha",), ("sim_min", "sim_max")),
    "ties": MethodRule(2, None, (), ("k", "alpha")),
    "dare": MethodRule(3, 3, (), ("p", "alpha", "seed")),
    "slerp": MethodRule(2, 2, ("alpha",), ("blocks",)),
    "model_stock": MethodRule(3, None),
    "no_merge": MethodRule(1, 1),
}

OUTPUT_DTYPES = ("fp16", "bf16", "fp32", "fp8_e4m3fn")

# Number of values in a block-weight list, per architecture (supermerger's order).
BLOCK_COUNTS = {26: "BASE, IN00-IN11, M00, OUT00-OUT11", 20: "BASE, IN00-IN08, M00, OUT00-OUT08"}
# Block ids accepted in a `blocks:` mapping; the merge engine checks them against the architecture.
BLOCK_ID_RE = re.compile(r"^(BASE|VAE|TE|CLIP|CLIPL|CLIPG|T5|IN|OUT|M00|(IN|OUT|D|S|J)\d\d)$")
PRESET_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def parse_block_values(text: str) -> list[float] | None:
    """A comma list of block weights -> floats; a preset name -> None. Raises on anything else."""
    text = text.strip()
    if PRESET_RE.match(text):
        return None
    parts = [p.strip() for p in text.split(",")]
    values = []
    for i, part in enumerate(parts):
        try:
            values.append(float(part))
        except ValueError:
            raise user_error(
                "bad_blocks", f"block weight {i + 1} is {part!r}: expected comma-separated numbers "
                "or a preset name like GRAD_V") from None
    if len(values) not in BLOCK_COUNTS:
        raise user_error(
            "bad_blocks", f"expected 26 comma-separated block weights for SD1.5/SD2 ({BLOCK_COUNTS[26]}) "
            f"or 20 for SDXL ({BLOCK_COUNTS[20]}) (got {len(values)}); for SD3/FLUX use a mapping "
            "such as {BASE: 0, D00: 1}")
    return values


def _check_block_text(value: str) -> str:
    parse_block_values(value)
    return value


def _check_block_ids(value: dict[str, float]) -> dict[str, float]:
    for key in value:
        if not BLOCK_ID_RE.match(key):
            raise user_error(
                "bad_block_id", f"unknown block id {key!r}: expected BASE, INnn, M00, OUTnn (SD1.5/"
                "SDXL), Jnn (SD3 joint blocks) or Dnn/Snn (FLUX double/single blocks)")
    return value


BlockWeights = Annotated[
    Union[
        Annotated[str, AfterValidator(_check_block_text), Tag("text")],
        Annotated[dict[str, float], AfterValidator(_check_block_ids), Tag("mapping")],
    ],
    Discriminator(lambda v: "mapping" if isinstance(v, dict) else "text"),
]
"""`blocks:` as "0,0.2,...", a preset name ("GRAD_V") or a mapping {block id: weight}."""


class ComponentAlpha(StrictModel):
    """`alpha` per model component; a component left out keeps the first input (alpha 0)."""

    unet: float | None = None
    text_encoder: float | None = None
    vae: float | None = None


AlphaValue = Annotated[
    Union[Annotated[float, Tag("number")], Annotated[ComponentAlpha, Tag("components")]],
    Discriminator(lambda v: "components" if isinstance(v, dict) else "number"),
]


def _check_method(value: str) -> str:
    if value not in KNOWN_MERGE_METHODS:
        raise choice_error(value, tuple(KNOWN_MERGE_METHODS), "merge method")
    return value


_ID_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def _check_id(value: str) -> str:
    if not _ID_RE.match(value):
        raise user_error(
            "bad_id", "expected a name of letters, digits and '_', '-', '.', starting with a letter "
            f"(got {value!r})")
    return value


StepName = Annotated[str, AfterValidator(_check_id)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class MergeStep(StrictModel):
    """One merge operation; its result can be used by later steps under its `id`."""

    id: StepName
    method: Annotated[str, AfterValidator(_check_method)]
    inputs: list[str] = Field(min_length=1)
    alpha: AlphaValue | None = None
    beta: float | None = None
    k: Fraction | None = None
    p: Annotated[float, Field(ge=0.0, lt=1.0)] | None = None
    seed: int | None = None
    sim_min: float | None = None
    sim_max: float | None = None
    blocks: BlockWeights | None = None
    lambda_: float | None = Field(default=None, alias="lambda")
    density: Fraction | None = None

    def params(self) -> dict[str, Any]:
        """The method parameters that were given, by their YAML names."""
        out = {}
        for name in STEP_PARAMS:
            value = getattr(self, "lambda_" if name == "lambda" else name)
            if value is not None:
                out[name] = value
        return out


class MergeOutput(StrictModel):
    """Where the merged checkpoint goes and how it is stored."""

    path: RecipePath
    dtype: Literal["fp16", "bf16", "fp32", "fp8_e4m3fn"] | None = None  # None: first input's dtype
    from_: StepName | None = Field(default=None, alias="from")  # None: the last step
    prune: bool = False
    bake_vae: RecipePath | None = None
    overwrite: bool = False


class MergeRecipe(RecipeBase):
    """kind: merge: named inputs, ordered steps, one output checkpoint."""

    KIND = "merge"
    kind: Literal["merge"] = "merge"
    name: RecipeName
    description: str | None = None
    models: dict[StepName, RecipePath] = Field(min_length=1)
    steps: list[MergeStep] = Field(min_length=1)
    output: MergeOutput

    @property
    def final_step(self) -> str:
        """The id of the step whose result is written."""
        return self.output.from_ or self.steps[-1].id

    def reference_errors(self) -> list[tuple[tuple[str | int, ...], str]]:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        models = list(self.models)
        all_ids = [s.id for s in self.steps]
        earlier: list[str] = []
        for i, step in enumerate(self.steps):
            if step.id in self.models:
                problems.append((("steps", i, "id"), f"step id '{step.id}' is also a model name; "
                                 "give the step another id"))
            elif step.id in earlier:
                problems.append((("steps", i, "id"), f"step id '{step.id}' is used twice"))
            for j, ref in enumerate(step.inputs):
                if ref in self.models or ref in earlier:
                    continue
                known = models + earlier
                if ref in all_ids:
                    msg = (f"input '{ref}' is a later step; steps run in order, so a step can use "
                           "only models and earlier steps")
                else:
                    msg = (f"unknown input '{ref}'{did_you_mean(ref, known)} (expected a model "
                           f"name from `models` ({', '.join(models)})"
                           + (f" or an earlier step id ({', '.join(earlier)})" if earlier else "")
                           + ")")
                problems.append((("steps", i, "inputs", j), msg))
            problems.extend(_method_problems(i, step))
            earlier.append(step.id)
        if self.output.from_ is not None and self.output.from_ not in all_ids:
            problems.append((("output", "from"), f"unknown step '{self.output.from_}'"
                             f"{did_you_mean(self.output.from_, all_ids)} (expected one of: "
                             f"{', '.join(all_ids)})"))
        return problems


def _method_problems(i: int, step: MergeStep) -> list[tuple[tuple[str | int, ...], str]]:
    """Input count and parameters that the step's method does not match."""
    rule = MERGE_METHOD_RULES.get(step.method)
    if rule is None:
        return []
    problems: list[tuple[tuple[str | int, ...], str]] = []
    n = len(step.inputs)
    if n < rule.min_inputs or (rule.max_inputs is not None and n > rule.max_inputs):
        if rule.max_inputs == rule.min_inputs:
            want = f"{rule.min_inputs}"
        elif rule.max_inputs is None:
            want = f"at least {rule.min_inputs}"
        else:
            want = f"{rule.min_inputs} to {rule.max_inputs}"
        problems.append((("steps", i, "inputs"),
                         f"method {step.method} takes {want} inputs (got {n})"))
    given = step.params()
    for name in rule.required:
        if name not in given:
            problems.append((("steps", i, name), f"required by method {step.method}"))
    uses = rule.required + rule.optional
    for name in given:
        if name not in uses:
            listed = ", ".join(uses) if uses else "no parameters"
            problems.append((("steps", i, name), f"method {step.method} does not use `{name}` "
                             f"(it uses: {listed})"))
    return problems
