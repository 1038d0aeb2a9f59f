"""LoRA types diffusers cannot apply as trained, attached at generation time as exact weight changes.

Why: diffusers' loader refuses LoHa and LoKr files and drops DoRA magnitudes (with a log line), so a
grid showed nothing, or something else than the bake, for the types we train (workbench/train/).
Here the same code the merge uses computes each weight's change (workbench/merge/lora.py: the
LyCORIS/peft formulas, the shared alpha rule, DoRA normalised against the checkpoint's own
weights), and a forward hook on the loaded layer adds `w · F.linear(x, ΔW)` (or the conv), so the
preview equals the bake at every strength: W + w·(W' − W), per block with LoRA Block Weight.

Cost: ΔW is held whole per targeted layer (these types are not low-rank as stored), in the compute
dtype on the compute device, i.e. about the size of the layers the file touches. Layers are found
through `ModuleTable.diffusers` (workbench/formats/lora_keys.py); a fused checkpoint weight (FLUX
qkv, CLIP-G in_proj) gives each diffusers layer its row slice.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from workbench.errors import UnsupportedError, WorkbenchError
from workbench.formats.lazy import open_lazy
from workbench.formats.lora_keys import SWAPPED, ModuleTable, module_table, swap_halves
from workbench.formats.safetensors_io import read_header
from workbench.merge.graph import InputNode
from workbench.merge.lora import LoraInputNode

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
Layer = tuple[str, str]  # (pipeline component, module path)


def installed_layers(pipe, table: ModuleTable, keys) -> dict[str, list[tuple[Layer, tuple[int, int] | None, bool]]]:
    """checkpoint key -> [((component, path), row range or None, halves swapped)] of the pipeline's
    Linear/Conv2d layers holding it. CLIP paths are tried with and without `text_model.`
    (transformers 5)."""
    trees = {c: dict(m.named_modules()) for c in COMPONENTS
             if isinstance((m := getattr(pipe, c, None)), torch.nn.Module)}
    rows_of = {t.key: t.shape[0] for t in table.canonical.values()}
    out: dict[str, list] = {}
    for key in keys:
        n = rows_of.get(key)
        for name, rows in table.diffusers.get(key, []):
            comp, _, path = name.partition(".")
            tree = trees.get(comp)
            if tree is None:
                continue
            for p in (path, path.removeprefix("text_model.")):
                if isinstance(tree.get(p), (torch.nn.Linear, torch.nn.Conv2d)):
                    rng = None
                    if rows is not None and rows != SWAPPED and n is not None:
                        start, stop, of = rows
                        rng = (n * start // of, n * stop // of)
                    out.setdefault(key, []).append(((comp, p), rng, rows == SWAPPED))
                    break
    return out


class ExactLora:
    """One LoRA file's weight changes, hooked into a loaded pipeline; inactive (weight 0) until
    `activate`."""

    def __init__(self, model, path: Path):
        ckpt = Path(model.path) if model.path else None
        if ckpt is None or not ckpt.is_file():
            raise UnsupportedError(f"{path}: LoHa, LoKr and DoRA files are applied from the "
                                    "checkpoint's own weights at generation time; this model was "
                                    "not loaded from a single checkpoint file")
        self.path = Path(path)
        self.arch = model.arch
        header = read_header(ckpt)
        table = module_table(model.arch, header.shapes())
        node = LoraInputNode(self.path.stem, self.path, read_header(self.path), table)
        base = InputNode("base", ckpt, header)
        node.first = base
        layers = installed_layers(model.pipe, table, node.modules)
        missing = [k for k in node.modules if k not in layers]
        if missing:
            raise WorkbenchError(f"{path}: no layer of the loaded {model.arch} pipeline holds "
                                 f"{len(missing)} weight(s) this LoRA changes, e.g. {missing[0]}")
        self.deltas: dict[Layer, torch.Tensor] = {}
        self.keys: dict[Layer, str] = {}
        with open_lazy(self.path) as lz, open_lazy(ckpt) as bz:
            node.reader, base.reader = lz.view, bz.view
            try:
                for key, places in layers.items():
                    full = node.delta(key)
                    for layer, rng, swapped in places:
                        d = full if rng is None else full[rng[0]:rng[1]]
                        d = swap_halves(d) if swapped else d
                        self.deltas[layer] = d.to(model.device, model.dtype).contiguous()
                        self.keys[layer] = key
            finally:
                node.reader = base.reader = None
        self.weights: dict[Layer, float] = {layer: 0.0 for layer in self.deltas}
        self.handles = []
        for (comp, p) in self.deltas:
            module = getattr(model.pipe, comp).get_submodule(p)
            module = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            self.handles.append(module.register_forward_hook(self._hook((comp, p))))

    def _hook(self, layer: Layer):
        def add_change(module, inputs, output):
            w = self.weights.get(layer, 0.0)
            if not w:
                return output
            x = inputs[0]
            d = self.deltas[layer]
            if d.dtype != x.dtype or d.device != x.device:
                d = d.to(x.device, x.dtype)
            if isinstance(module, torch.nn.Conv2d):
                extra = F.conv2d(x, d, None, module.stride, module.padding, module.dilation, module.groups)
            else:
                extra = F.linear(x, d)
            return output + w * extra
        return add_change

    def activate(self, weight: float, block_weight: Callable[[str], float] | None = None) -> None:
        """Apply at `weight`, times `block_weight(checkpoint key)` when block weights are given."""
        for layer, key in self.keys.items():
            self.weights[layer] = weight * (block_weight(key) if block_weight else 1.0)

    def deactivate(self) -> None:
        for layer in self.weights:
            self.weights[layer] = 0.0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.deltas.clear()
