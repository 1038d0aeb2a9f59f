"""The `merge` recipe: named input models, ordered merge steps, one output file.

The merge engine (workbench/merge/methods.py) registers the methods' math; this module only knows
their names, how many inputs each takes and which parameters it reads, so that a recipe is checked
before any tensor is touched. Numbers in the method descriptions follow docs/recipes.md (alpha is
the share of the second input, as in A1111 and supermerger).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, Discriminator, Field, Tag

from workbench.errors import WorkbenchError
from workbench.formats.blocks import check_block_text, is_block_id
from workbench.recipes.common import (
    RecipeBase,
    RecipeName,
    RecipePath,
    StrictModel,
    choice_error,
    did_you_mean,
    user_error,
)
from workbench.merge.methods import METHODS

# Parameters a step may give; which ones a method reads comes from the engine's registry.
STEP_PARAMS = ("alpha", "beta", "k", "p", "seed", "sim_min", "sim_max", "blocks")


@dataclass(frozen=True)
class MethodRule:
    """How many inputs a method takes and which step parameters it reads.

    Derived from the merge engine's registry (workbench.merge.methods), the one place where a
    method declares its inputs and parameters. `blocks` goes with every method that reads alpha:
    it gives alpha per block; a method declared `alpha_from_blocks` (block_weighted) requires it
    instead of alpha.
    """

    min_inputs: int
    max_inputs: int | None  # None: no upper limit
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()


def _rules_from_registry() -> tuple[dict[str, str], dict[str, MethodRule]]:
    descriptions, rules = {}, {}
    for name, m in METHODS.items():
        required = tuple(p for p, spec in m.params.items() if spec.required)
        optional = tuple(p for p, spec in m.params.items() if not spec.required)
        if m.alpha_from_blocks:
            required = tuple(p for p in required if p != "alpha") + ("blocks",)
        elif "alpha" in m.params:
            optional += ("blocks",)
        rules[name] = MethodRule(m.n_inputs, None if m.variadic else m.n_inputs, required, optional)
        descriptions[name] = m.description
    return descriptions, rules


# name -> one line for `workbench merge --list`; name -> inputs and parameters
KNOWN_MERGE_METHODS, MERGE_METHOD_RULES = _rules_from_registry()

OUTPUT_DTYPES = ("fp16", "bf16", "fp32", "fp8_e4m3fn")



def _check_block_text(value: str) -> str:
    """Numbers of a length some architecture takes, or a known preset (workbench/formats/blocks.py,
    the one block grammar); the count is checked against the model's architecture at dry run."""
    try:
        check_block_text(value)
    except WorkbenchError as e:
        raise user_error("bad_blocks", str(e).removeprefix("block weights: ")) from None
    return value


def _check_block_ids(value: dict[str, float]) -> dict[str, float]:
    for key in value:
        if not is_block_id(key):
            raise user_error(
                "bad_block_id", f"unknown block id {key!r}: expected BASE, INnn, M00, OUTnn (SD1.5/"
                "SDXL), IN, Jnn, OUT (SD3 joint blocks) or IN, Dnn, Snn, OUT (FLUX double/single blocks)")
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

    def params(self) -> dict[str, Any]:
        """The method parameters that were given, by their YAML names."""
        out = {}
        for name in STEP_PARAMS:
            value = getattr(self, name)
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
    # GGUF and bitsandbytes 4-bit inputs are quantized approximations: merged only when this is true,
    # from their dequantized values (the dry run says what precision the output then has)
    allow_dequantized: bool = False


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
