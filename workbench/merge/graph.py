"""A merge recipe as a graph evaluated one key at a time, with explicit per-key policies.

Why per key: a chain of steps (`tuned = A + α(B − C)`, then `final = blocks(tuned, A)`) is evaluated
for one tensor name at a time, so no intermediate model is ever written to disk or held whole in
memory; a shared input read twice in one key's evaluation is read once (per-key memo).

The policy of each (step, key) is decided from the headers alone, so the dry run reports exactly
what the real run will do:
- MERGE: every input has the key with the same shape: the method runs on fp32 copies;
- MISSING: an input lacks the key: the first input's tensor is kept;
- CONV_IN: inpainting / instruct-pix2pix `conv_in` (9 or 8 input channels against 4): the common
  channels are merged, the first input's extra channels are kept;
- SHAPE_MISMATCH: other shape differences: the first input's tensor is kept;
- NON_FLOAT / MARKER: integer tensors (`position_ids`) and flag tensors (`v_pred`, `ztsnr`, ...)
  are copied from the first input, never averaged.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

import torch

from workbench.formats.safetensors_io import SafetensorsHeader, TensorInfo
from workbench.merge.methods import MergeMethod

# Flag tensors: their value is a setting, not a weight; averaging them is meaningless.
MARKER_SUFFIXES = ("position_ids", "v_pred", "ztsnr", "edm_vpred.sigma_max", "edm_vpred.sigma_min",
                   "model_sampling.sigmas", "logit_scale")
# Keys that `prune` drops: EMA copies and DDPM schedule buffers only used by training.
PRUNE_PREFIXES = ("model_ema.",)
DDPM_BUFFERS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
                "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
                "logvar"}
CONV_IN_KEYS = ("model.diffusion_model.input_blocks.0.0.weight", "input_blocks.0.0.weight")
class Policy(str, enum.Enum):
    MERGE = "merged"
    MISSING = "missing in an input: first input kept"
    CONV_IN = "conv_in channels differ: common channels merged, extra kept"
    SHAPE_MISMATCH = "shapes differ: first input kept"
    NON_FLOAT = "non-float tensor: copied from first input"
    MARKER = "marker key: copied from first input"


def is_marker(key: str) -> bool:
    return key.endswith(MARKER_SUFFIXES)


def is_prunable(key: str) -> bool:
    return key.startswith(PRUNE_PREFIXES) or key in DDPM_BUFFERS


@dataclass
class InputNode:
    """A model file; its tensors are read on demand through `reader(key)`."""

    name: str
    path: Path
    header: SafetensorsHeader
    reader: Callable[[str], torch.Tensor] | None = None

    def info(self, key: str) -> TensorInfo | None:
        return self.header.tensors.get(key)


@dataclass
class StepNode:
    """One merge step. `params_for(key)` gives the method's parameters for that key (α per block)."""

    id: str
    method: MergeMethod
    inputs: list["Node"]
    params_for: Callable[[str], dict]
    policy_counts: dict[Policy, int] = field(default_factory=dict)

    def info(self, key: str) -> TensorInfo | None:
        """A step's output for a key has the first input's shape (that is what every policy keeps)."""
        return self.inputs[0].info(key)


Node = Union[InputNode, StepNode]


def leaf(node: Node) -> InputNode:
    """The first input at the bottom of a chain: it decides the output's key set and dtypes."""
    while isinstance(node, StepNode):
        node = node.inputs[0]
    return node


def classify(step: StepNode, key: str) -> Policy:
    """The policy for one key in one step, from header information only."""
    first = step.inputs[0].info(key)
    if first is None:
        raise KeyError(key)
    if not first.is_float:
        return Policy.NON_FLOAT
    if is_marker(key):
        return Policy.MARKER
    infos = [n.info(key) for n in step.inputs[1:]]
    if any(i is None for i in infos):
        return Policy.MISSING
    shapes = {first.shape, *(i.shape for i in infos)}
    if len(shapes) == 1:
        return Policy.MERGE
    if key in CONV_IN_KEYS and all(len(s) == 4 and s[0] == first.shape[0] and s[2:] == first.shape[2:]
                                   for s in shapes):
        return Policy.CONV_IN
    return Policy.SHAPE_MISMATCH


def chunkable(node: Node, key: str) -> bool:
    """Whether `node`'s value for `key` can be computed slice by slice of the flattened tensor."""
    if isinstance(node, InputNode):
        return getattr(node, "sliceable", True)
    policy = classify(node, key)
    if policy is Policy.CONV_IN:
        return False
    if policy is not Policy.MERGE:
        return chunkable(node.inputs[0], key)
    return node.method.elementwise and all(chunkable(n, key) for n in node.inputs)


def evaluate(node: Node, key: str, memo: dict[int, torch.Tensor] | None = None,
             chunk: slice | None = None) -> torch.Tensor:
    """The value of `node` for `key` (or for a slice of its flattened elements, when `chunkable`).
    Merged results are fp32; copied tensors keep their dtype."""
    memo = {} if memo is None else memo
    if id(node) in memo:
        return memo[id(node)]
    if isinstance(node, InputNode):
        value = node.reader(key)
        if chunk is not None:
            value = value.reshape(-1)[chunk]
    else:
        value = _evaluate_step(node, key, memo, chunk)
    memo[id(node)] = value
    return value


def _evaluate_step(step: StepNode, key: str, memo: dict, chunk: slice | None) -> torch.Tensor:
    policy = classify(step, key)
    first = evaluate(step.inputs[0], key, memo, chunk)
    if policy not in (Policy.MERGE, Policy.CONV_IN):
        return first
    tensors = [first] + [evaluate(n, key, memo, chunk) for n in step.inputs[1:]]
    tensors = [t.float() for t in tensors]
    params = step.params_for(key)
    if policy is Policy.MERGE:
        return step.method(*tensors, key=key, **params)
    common = min(t.shape[1] for t in tensors)
    merged = step.method(*(t[:, :common].contiguous() for t in tensors), key=key, **params)
    out = tensors[0].clone()
    out[:, :common] = merged
    return out


def count_policies(step: StepNode, keys: list[str]) -> dict[Policy, list[str]]:
    """Every key of every step grouped by policy (keys absent from a step's first input skipped)."""
    groups: dict[Policy, list[str]] = {}
    for key in keys:
        if step.inputs[0].info(key) is None:
            continue
        groups.setdefault(classify(step, key), []).append(key)
    return groups


def steps_of(node: Node) -> list[StepNode]:
    """All steps under `node`, each once, inputs before the steps that use them."""
    seen: list[StepNode] = []

    def visit(n: Node) -> None:
        if isinstance(n, StepNode) and n not in seen:
            for child in n.inputs:
                visit(child)
            seen.append(n)

    visit(node)
    return seen
