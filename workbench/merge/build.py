"""Turn a validated merge recipe into an evaluation graph and an output plan, from headers only.

Everything a merge will do is decided here before any tensor is read: the architecture of every
input (mixed architectures are refused, naming both), the method and α of every step for every key,
the per-key policies, the output key list, dtypes and sizes. The dry run prints this; the real run
streams it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from workbench.errors import WorkbenchError
from workbench.formats.blocks import block_of, component_of, parse_block_values
from workbench.formats.detect import ModelInfo, detect
from workbench.formats.model_file import Quantization, check_merge_input, open_model, read_model_header
from workbench.formats.safetensors_io import SafetensorsHeader, read_header, torch_dtype
from workbench.formats.writer import st_dtype_of
from workbench.merge.executor import CHUNK, OutputKey
from workbench.merge.graph import (InputNode, Node, Policy, StepNode, chunkable, count_policies, is_prunable,
                                   leaf, steps_of)
from workbench.merge.methods import get_method, validate_params
from workbench.merge.lora import lora_node

MERGEABLE_KINDS = {"checkpoint", "unet", "transformer", "vae", "text_encoder"}
OUTPUT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
                 "fp8_e4m3fn": torch.float8_e4m3fn}

VAE_PREFIX = {"flux": "vae."}


@dataclass
class MergeInput:
    name: str
    path: Path
    header: SafetensorsHeader   # as read through `open_model`: dequantized dtypes, logical shapes
    info: ModelInfo
    quant: Quantization | None = None   # GGUF / NF4 / scaled fp8 (read decoded), None for plain files


@dataclass
class MergePlan:
    """The graph, the inputs and every output tensor, ready to stream or to report."""

    arch: str
    inputs: dict[str, MergeInput]
    steps: list[StepNode]
    final: Node
    keys: list[OutputKey]
    policies: dict[str, dict[Policy, list[str]]] = field(default_factory=dict)
    pruned: list[str] = field(default_factory=list)
    baked_vae: int = 0
    notes: list[str] = field(default_factory=list)  # what the dry run and provenance should say

    @property
    def output_bytes(self) -> int:
        return sum(k.nbytes for k in self.keys)

    @property
    def input_bytes(self) -> int:
        return sum(i.header.data_bytes for i in self.inputs.values())


def read_inputs(models: dict[str, Path], allow_dequantized: bool = False) -> dict[str, MergeInput]:
    """Headers and architectures of every input; refuses mixed architectures before any read.

    ComfyUI scaled-fp8 inputs are read with their scales multiplied out (exact: ordinary inputs);
    GGUF and bitsandbytes 4-bit inputs are refused unless `allow_dequantized`, then read
    dequantized (`formats.model_file`). Their nodes are read whole, not slice by slice: a slice of
    a dequantized tensor costs the whole tensor's dequantization.
    """
    inputs = {}
    for name, path in models.items():
        if not Path(path).is_file():
            raise WorkbenchError(f"model {name}: {path}: file not found")
        header = read_model_header(path)
        quant = check_merge_input(header, f"model {name}: {path}", "a merge", allow_dequantized,
                                  "output.allow_dequantized")
        info = detect(header)
        if info.kind not in MERGEABLE_KINDS and info.kind != "lora":  # LoRAs: see merge/lora.py
            raise WorkbenchError(f"model {name}: {path} is a {info.arch} {info.kind}; merge steps take "
                                 "checkpoints, model components or LoRAs (method add_lora)")
        if quant is not None:
            with open_model(path) as decoded:  # the header of what reading will give
                header = decoded.header
        inputs[name] = MergeInput(name, Path(path), header, info, quant)
    models = {i.info.arch for i in inputs.values() if i.info.kind != "lora"}
    for inp in inputs.values():  # a text-encoder-only LoRA may fit several families (lora_detect)
        if inp.info.kind == "lora" and len(models) == 1 and (arch := next(iter(models))) in inp.info.archs:
            inp.info = replace(inp.info, arch=arch)
    archs = {}
    for inp in inputs.values():
        archs.setdefault(inp.info.arch, inp)
    if len(archs) > 1:
        (a1, i1), (a2, i2) = list(archs.items())[:2]
        kind = lambda i: " LoRA" if i.info.kind == "lora" else ""  # noqa: E731
        raise WorkbenchError(
            f"cannot merge models of different architectures: {i1.name} ({i1.path.name}) is {a1}{kind(i1)}, "
            f"{i2.name} ({i2.path.name}) is {a2}{kind(i2)}; every input of a merge must be the same "
            "architecture")
    return inputs


def _step_inputs(step, nodes: dict[str, Node], inputs: dict[str, MergeInput], arch: str,
                 lora_nodes: dict) -> list[Node]:
    """The step's input nodes; a LoRA input becomes a LoraInputNode bound to the layout of the
    step's first input (LoRA modules are looked up in that checkpoint's key table)."""
    loras = [i for i in step.inputs if i in inputs and inputs[i].info.kind == "lora"]
    if not loras:
        return [nodes[i] for i in step.inputs]
    if step.method != "add_lora" or step.inputs[0] in loras or len(step.inputs) != 2:
        raise WorkbenchError(f"step {step.id}: {', '.join(loras)} is a LoRA; LoRAs are merged with "
                             "method add_lora, inputs [model or step, LoRA]")

    first = nodes[step.inputs[0]]  # a DoRA module normalises against this step input's weight
    name = step.inputs[1]
    if (name, id(first)) not in lora_nodes:
        inp = inputs[name]
        try:
            lora_nodes[(name, id(first))] = lora_node(name, inp.path, inp.header, arch, leaf(first), first)
        except WorkbenchError as e:
            raise type(e)(f"step {step.id}: {e}") from None
    return [first, lora_nodes[(name, id(first))]]


def _alpha_function(arch: str, step, method_name: str):
    """key -> α for this step: per block (`blocks`), per component (mapping) or one number."""
    if step.blocks is not None:
        table = parse_block_values(arch, step.blocks, default=0.0)
        return lambda key: table[block_of(arch, key)]
    alpha = step.alpha
    if alpha is None:
        return None
    if isinstance(alpha, (int, float)):
        return lambda key, a=float(alpha): a
    by_comp = {"unet": alpha.unet, "text_encoder": alpha.text_encoder, "vae": alpha.vae}
    # a component left out keeps the first input (α = 0); keys outside the three components too
    return lambda key: float(by_comp.get(component_of(arch, key)) or 0.0)


def build_steps(recipe, inputs: dict[str, MergeInput], arch: str) -> tuple[dict[str, Node], list[StepNode]]:
    nodes: dict[str, Node] = {n: InputNode(n, i.path, i.header) for n, i in inputs.items()}
    for n, i in inputs.items():
        if i.quant is not None:
            nodes[n].sliceable = False  # see read_inputs
    lora_nodes: dict = {}  # (LoRA name, id of the step's first input) -> LoraInputNode
    steps = []
    for step in recipe.steps:
        method = get_method(step.method)
        static = {k: v for k, v in step.params().items() if k not in ("alpha", "blocks")}
        alpha_of = _alpha_function(arch, step, method.name)
        probe = dict(static)
        if alpha_of is not None and "alpha" in method.params:
            probe["alpha"] = 0.5
        try:
            validate_params(method.name, probe)
        except WorkbenchError as e:
            raise WorkbenchError(f"step {step.id}: {e}") from None
        if alpha_of is not None and "alpha" in method.params:
            params_for = (lambda key, s=static, f=alpha_of: {**s, "alpha": f(key)})
        else:
            params_for = (lambda key, s=static: s)
        if step.method == "add_lora" and not (step.inputs[-1] in inputs
                                              and inputs[step.inputs[-1]].info.kind == "lora"):
            raise WorkbenchError(f"step {step.id}: add_lora's second input must be a LoRA file "
                                 f"({step.inputs[-1]} is not); to add a model difference use add_difference")
        node = StepNode(step.id, method, _step_inputs(step, nodes, inputs, arch, lora_nodes), params_for)
        nodes[step.id] = node
        steps.append(node)
    return nodes, steps


def _bake_vae_source(path: Path, arch: str, out_keys: list[str]) -> tuple[InputNode, dict[str, str]]:
    """Map the checkpoint's VAE keys onto a VAE file's keys (bare or prefixed)."""
    header = read_header(path)
    prefix = VAE_PREFIX.get(arch, "first_stage_model.")
    mapping = {}
    vae_keys = [k for k in out_keys if k.startswith(prefix)]
    for key in vae_keys:
        bare = key[len(prefix):]
        for candidate in (key, bare, "first_stage_model." + bare, "vae." + bare):
            if candidate in header.tensors:
                mapping[key] = candidate
                break
    missing = [k for k in vae_keys if k not in mapping]
    if missing or not vae_keys:
        raise WorkbenchError(f"bake_vae: {path} does not provide the checkpoint's VAE tensors "
                             f"({len(missing)} of {len(vae_keys)} missing, e.g. {missing[:2]}); "
                             f"expected a {arch} VAE file")
    return InputNode("vae", path, header), mapping


def plan_merge(recipe) -> MergePlan:
    """Everything the merge will do, from headers only."""
    inputs = read_inputs(dict(recipe.models), getattr(recipe.output, "allow_dequantized", False))
    arch = next(iter(inputs.values())).info.arch
    nodes, steps = build_steps(recipe, inputs, arch)
    final = nodes[recipe.final_step]
    base = leaf(final)
    names = sorted(base.header.tensors, key=lambda k: base.header.tensors[k].begin)
    pruned = [k for k in names if recipe.output.prune and is_prunable(k)]
    names = [k for k in names if k not in set(pruned)]
    vae_node, vae_map = (None, {})
    if recipe.output.bake_vae is not None:
        vae_node, vae_map = _bake_vae_source(Path(recipe.output.bake_vae), arch, names)
    out_dtype = OUTPUT_DTYPES.get(recipe.output.dtype) if recipe.output.dtype else None
    n_leaves = len(inputs)
    keys = []
    for name in names:
        info = base.header.tensors[name]
        src, src_key = (vae_node, vae_map[name]) if name in vae_map else (final, name)
        dtype = torch_dtype(src.header.tensors[src_key].dtype if src is vae_node else info.dtype)
        if out_dtype is not None and dtype.is_floating_point:
            dtype = out_dtype
        shape = src.header.tensors[src_key].shape if src is vae_node else info.shape
        sliced = chunkable(src, src_key) if src is final else True
        # sliced keys hold the output tensor and a few CHUNK-sized fp32 operands
        work = (math.prod(shape) * dtype.itemsize + CHUNK * 4 * (n_leaves + 2)) if sliced \
            else math.prod(shape) * 4 * (n_leaves + 2)
        keys.append(OutputKey(name, src, src_key, dtype, tuple(shape), work, sliced))
    policies = {s.id: count_policies(s, [k.source_key for k in keys if k.source is final])
                for s in steps_of(final)}
    notes = _precision_notes(inputs, keys, recipe.output.dtype)
    return MergePlan(arch, inputs, steps, final, keys, policies, pruned, len(vae_map), notes)


def _precision_notes(inputs: dict[str, MergeInput], keys: list[OutputKey], out_dtype: str | None) -> list[str]:
    """What reading quantized inputs means for the output's precision, one line per input."""
    stored: dict[str, int] = {}
    for k in keys:
        name = str(k.dtype).replace("torch.", "")
        stored[name] = stored.get(name, 0) + k.numel
    written = ", ".join(f"{n} {c / max(1, sum(stored.values())):.0%}" for n, c in
                        sorted(stored.items(), key=lambda kv: -kv[1]))
    notes = []
    for i in inputs.values():
        if i.quant is None:
            continue
        if i.quant.exact:
            notes.append(f"{i.name}: {i.quant.label}: each layer read as its fp8 values times its scale "
                         "(float32, exact)")
        else:
            notes.append(f"{i.name}: {i.quant.label}, read dequantized (allow_dequantized): its weights carry "
                         f"{i.quant.label}'s precision, not the original model's")
    if notes:
        notes.append(f"output precision: {written} of the values"
                     + ("" if out_dtype else " (the first input's dtypes; set output.dtype to choose)"))
    return notes


def output_plan(plan: MergePlan) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The writer's plan: name -> (safetensors dtype, shape), in write order."""
    return {k.name: (st_dtype_of(k.dtype), k.shape) for k in plan.keys}
