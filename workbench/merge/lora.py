"""A LoRA file as a merge-graph input: "ΔW tensors keyed by checkpoint keys".

Why a node and not a separate tool: with the LoRA exposed as deltas under the base's key names,
`add_lora(a, delta; alpha)` is an ordinary per-key method, so block weights (`blocks:`), chains
(merge two LoRAs, then weighted_sum with another model), the dry run, streaming and atomic writing
all come from the merge engine unchanged. Keys the LoRA does not touch have no delta (`info` is
None), which the MISSING policy turns into "first input kept".

ΔW of one module = (alpha / rank) · up @ down (kohya `networks/lora.py`, and A1111's and ComfyUI's
loaders alike; alpha missing or 0 means alpha = rank), reshaped to the checkpoint weight (conv k×k,
conv 1×1 vs linear). Modules that map to row slices of one fused weight (SDXL CLIP-G q/k/v ->
`in_proj_weight`, FLUX diffusers to_q/to_k/to_v -> `qkv`) are summed into one delta of the fused
shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from workbench.errors import UnsupportedError, WorkbenchError
from workbench.formats.lora_detect import split_suffix
from workbench.formats.lora_keys import ModuleTable, Target, module_table
from workbench.formats.safetensors_io import SafetensorsHeader, TensorInfo
from workbench.merge.graph import InputNode

DOWN_UP = {".lora_down.weight": ".lora_up.weight", ".lora_A.weight": ".lora_B.weight",
           ".lora.down.weight": ".lora.up.weight", "_lora.down.weight": "_lora.up.weight"}
UNSUPPORTED = {".hada_w1_a": "LoHa", ".hada_w1_b": "LoHa", ".lokr_w1": "LoKr", ".lokr_w1_a": "LoKr",
               ".lokr_w2": "LoKr", ".lokr_w2_a": "LoKr", ".oft_blocks": "OFT", ".oft_diag": "OFT",
               ".lora_mid.weight": "LoCon with Tucker decomposition (lora_mid)",
               ".dora_scale": "DoRA (dora_scale)", ".diff": "full-difference (.diff)"}
COMPONENT_NAMES = {"unet": "the diffusion model", "te1": "text encoder 1", "te2": "text encoder 2",
                   "te3": "text encoder 3 (T5)"}


@dataclass(frozen=True)
class LoraModule:
    """One LoRA module: its tensors in the file and the checkpoint weight it changes."""

    name: str
    down: str
    up: str
    alpha_key: str | None
    alpha_value: float | None  # from diffusers' `lora_adapter_metadata` when there is no .alpha
    target: Target


def _component_of_name(module: str) -> str:
    """The component a LoRA module name addresses, from its prefix alone."""
    m = module.removeprefix("base_model.model.")
    for prefix, comp in (("lora_te2_", "te2"), ("text_encoder_2", "te2"), ("lora_te3_", "te3"),
                         ("text_encoder_3", "te3"), ("lora_te", "te1"), ("text_encoder", "te1")):
        if m.startswith(prefix):
            return comp
    return "unet"


def _adapter_alphas(metadata: dict[str, str]) -> dict[str, float]:
    """`unet` / `transformer` / `text_encoder` -> lora_alpha/r from diffusers' adapter metadata."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    out = {}
    for key, value in data.items() if isinstance(data, dict) else ():
        if key.endswith(".lora_alpha") and isinstance(value, (int, float)):
            out[key[: -len(".lora_alpha")]] = float(value)
    return out


def _legacy_name(module: str) -> str:
    """Old diffusers attention-processor names: `attn1.processor.to_q_lora` -> `attn1.to_q`."""
    module = module.replace(".processor.", ".")
    for old, new in (("to_out_lora", "to_out.0"), ("to_q_lora", "to_q"), ("to_k_lora", "to_k"),
                     ("to_v_lora", "to_v")):
        if module.endswith(old):
            return module[: -len(old)] + new
    return module


def parse_modules(header: SafetensorsHeader, table: ModuleTable, label: str
                  ) -> tuple[dict[str, list[LoraModule]], list[str]]:
    """({checkpoint key: modules}, skipped module names) for a LoRA against one checkpoint layout.

    Refuses (before reading any tensor) module types we cannot merge, modules whose shapes do not
    fit the checkpoint, and modules that match nothing although the checkpoint has their component.
    Modules of a component the checkpoint lacks (a CLIP-L LoRA part merged into a transformer-only
    FLUX file) are skipped and returned, so the caller can report them.
    """
    shapes = header.shapes()
    groups: dict[str, dict[str, str]] = {}
    for key in shapes:
        sp = split_suffix(key)
        if sp is None:
            continue
        module, suffix = sp
        if suffix in UNSUPPORTED:
            raise UnsupportedError(
                f"{label}: {UNSUPPORTED[suffix]} modules (e.g. {key}) cannot be merged yet; "
                "merging takes LoRA/LoCon files (lora_down/lora_up, lora_A/lora_B)")
        groups.setdefault(module, {})[suffix] = key
    alphas = _adapter_alphas(header.metadata)
    by_key: dict[str, list[LoraModule]] = {}
    skipped: list[str] = []
    unmatched: list[str] = []
    for module, tensors in groups.items():
        pair = next(((d, u) for d, u in DOWN_UP.items() if d in tensors), None)
        if pair is None:
            if set(tensors) <= {".alpha", ".lora_up.weight", ".lora_B.weight"}:
                raise WorkbenchError(f"{label}: module {module} has no down/A tensor ({sorted(tensors)})")
            continue
        if pair[1] not in tensors:
            raise WorkbenchError(f"{label}: module {module} has {pair[0]} but no {pair[1]}")
        target = table.lookup(module) or table.lookup(_legacy_name(module))
        if target is None:
            comp = _component_of_name(module)
            (unmatched if comp in table.components else skipped).append(module)
            continue
        down, up = shapes[tensors[pair[0]]], shapes[tensors[pair[1]]]
        _check_shapes(label, module, down, up, target)
        root = module.removeprefix("base_model.model.").split(".", 1)[0]
        by_key.setdefault(target.key, []).append(LoraModule(
            module, tensors[pair[0]], tensors[pair[1]], tensors.get(".alpha"), alphas.get(root), target))
    if unmatched:
        raise WorkbenchError(
            f"{label}: {len(unmatched)} LoRA module(s) match no weight of the {table.arch} base, e.g. "
            f"{', '.join(unmatched[:3])}; expected kohya (lora_unet_/lora_te*_) or diffusers/PEFT "
            "(unet./text_encoder./transformer.) module names of that architecture")
    if not by_key:
        raise WorkbenchError(f"{label}: no LoRA module of this file applies to the {table.arch} base "
                             f"({len(skipped)} module(s) address components the base does not contain)")
    return by_key, skipped


def _check_shapes(label: str, module: str, down: tuple, up: tuple, target: Target) -> None:
    rank = down[0] if down else 0
    numel_in = 1
    for d in down[1:]:
        numel_in *= d
    want_in = target.in_features
    for d in target.kernel:
        want_in *= d
    up_ok = len(up) >= 2 and up[1] == rank and all(d == 1 for d in up[2:]) and up[0] == target.out_features
    if len(down) < 2 or not up_ok or numel_in != want_in:
        raise WorkbenchError(
            f"{label}: module {module}: down {list(down)} / up {list(up)} do not fit "
            f"{target.key} {list(target.shape)}" + (f" rows {target.row_range()}" if target.rows else "")
            + "; the LoRA was made for a model of another size or layout")


def module_delta(module: LoraModule, raw: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """(alpha / rank) · up @ down in fp32, shaped like the module's (row slice of the) weight."""
    down = raw(module.down).float()
    up = raw(module.up).float()
    rank = down.shape[0]
    alpha = float(raw(module.alpha_key).float().item()) if module.alpha_key else module.alpha_value
    if not alpha:
        alpha = float(rank)
    delta = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
    delta.mul_(alpha / rank)
    return delta.reshape(module.target.delta_shape)


class LoraInputNode(InputNode):
    """A LoRA file bound to the checkpoint layout of the step's first input.

    `info(key)` is the base weight's shape for keys the LoRA changes (None otherwise); `reader(key)`
    gives ΔW. The runner sets `reader` to the LoRA file's raw tensor reader (memory-mapped), which
    this node keeps and wraps: that is how the engine opens and closes the file for us.
    """

    def __init__(self, name: str, path: Path, header: SafetensorsHeader, table: ModuleTable):
        self.name = name
        self.path = Path(path)
        self.header = header
        self.table = table
        self.modules, self.skipped = parse_modules(header, table, f"model {name}: {path}")
        self._raw: Callable[[str], torch.Tensor] | None = None

    @property
    def reader(self) -> Callable[[str], torch.Tensor] | None:  # type: ignore[override]
        return self.delta if self._raw is not None else None

    @reader.setter
    def reader(self, raw: Callable[[str], torch.Tensor] | None) -> None:
        self._raw = raw

    def info(self, key: str) -> TensorInfo | None:
        mods = self.modules.get(key)
        return TensorInfo("F32", mods[0].target.shape, 0, 0) if mods else None

    def delta(self, key: str) -> torch.Tensor:
        """ΔW for one checkpoint key (fused q/k/v parts summed into the fused shape)."""
        mods = self.modules[key]
        if self._raw is None:
            raise RuntimeError(f"{self.path}: LoRA read outside a merge run")
        if len(mods) == 1 and mods[0].target.rows is None:
            return module_delta(mods[0], self._raw)
        out = torch.zeros(mods[0].target.shape, dtype=torch.float32)
        for m in mods:
            a, b = m.target.row_range()
            out[a:b] += module_delta(m, self._raw)
        return out

    def summary(self) -> str:
        n = sum(len(v) for v in self.modules.values())
        text = f"LoRA {self.name}: {n} modules on {len(self.modules)} weights"
        if self.skipped:
            comps = sorted({COMPONENT_NAMES[_component_of_name(m)] for m in self.skipped})
            text += f"; {len(self.skipped)} modules skipped ({', '.join(comps)} not in the base)"
        return text

    def __repr__(self) -> str:
        return f"LoraInputNode({self.name!r}, {self.path.name})"


def lora_node(name: str, path: Path, header: SafetensorsHeader, arch: str, base: InputNode) -> LoraInputNode:
    """A LoRA input bound to `base`'s key layout (module table built from its header only)."""
    return LoraInputNode(name, path, header, module_table(arch, base.header.shapes()))
