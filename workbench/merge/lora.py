"""A LoRA file as a merge-graph input: "ΔW tensors keyed by checkpoint keys".

Why a node and not a separate tool: with the LoRA exposed as deltas under the base's key names,
`add_lora(a, delta; alpha)` is an ordinary per-key method, so block weights (`blocks:`), chains
(merge two LoRAs, then weighted_sum with another model), the dry run, streaming and atomic writing
all come from the merge engine unchanged. Keys the LoRA does not touch have no delta (`info` is
None), which the MISSING policy turns into "first input kept".

Module types (formulas in workbench/merge/lora_math.py, the ones loaders use): LoRA/LoCon
(down/up, lora_A/lora_B, optional Tucker `lora_mid`), LoHa (`hada_*`, optional Tucker `hada_t1/t2`),
LoKr (`lokr_*`, factored or full sides, optional `lokr_t2`), each optionally DoRA (`dora_scale`, or
peft's `lora_magnitude_vector`). ΔW = scale · formula, scale = alpha / rank with alpha decided by
workbench/formats/lora_alpha.py (the rule the generation preview uses too); LoKr with two full
sides uses scale 1. For DoRA the node's "delta" is W' − W at full strength, W' = m ⊙ (W + ΔW) /
‖W + ΔW‖, with W the step's first input for that key (so a DoRA baked after another step is
normalised against that step's result); `add_lora`'s strength then scales it linearly,
W + s·(W' − W), as A1111, Forge and ComfyUI do.

Shapes are reshaped to the checkpoint weight (conv k×k, conv 1×1 vs linear). Modules that map to
row slices of one fused weight (SDXL CLIP-G q/k/v -> `in_proj_weight`, FLUX diffusers
to_q/to_k/to_v -> `qkv`) are summed into one delta of the fused shape.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.errors import UnsupportedError, WorkbenchError
from workbench.formats.lora_alpha import (
    PeftAlphas,
    effective_alpha,
    is_defaulted,
    warn_defaulted,
)
from workbench.formats.lora_detect import split_suffix
from workbench.formats.lora_keys import ModuleTable, Target, module_table
from workbench.formats.safetensors_io import SafetensorsHeader, TensorInfo
from workbench.merge import lora_math
from workbench.merge.graph import InputNode, Node, evaluate

# suffix -> (module type, role). Roles of "" type (alpha, DoRA magnitude) go with any type.
ROLES = {
    ".lora_down.weight": ("lora", "down"), ".lora_up.weight": ("lora", "up"),
    ".lora_mid.weight": ("lora", "mid"),
    ".lora_A.weight": ("lora", "down"), ".lora_B.weight": ("lora", "up"),
    ".lora.down.weight": ("lora", "down"), ".lora.up.weight": ("lora", "up"),
    "_lora.down.weight": ("lora", "down"), "_lora.up.weight": ("lora", "up"),
    ".hada_w1_a": ("loha", "w1a"), ".hada_w1_b": ("loha", "w1b"), ".hada_w2_a": ("loha", "w2a"),
    ".hada_w2_b": ("loha", "w2b"), ".hada_t1": ("loha", "t1"), ".hada_t2": ("loha", "t2"),
    ".lokr_w1": ("lokr", "w1"), ".lokr_w1_a": ("lokr", "w1a"), ".lokr_w1_b": ("lokr", "w1b"),
    ".lokr_w2": ("lokr", "w2"), ".lokr_w2_a": ("lokr", "w2a"), ".lokr_w2_b": ("lokr", "w2b"),
    ".lokr_t2": ("lokr", "t2"),
    ".alpha": ("", "alpha"), ".dora_scale": ("", "dora"),
    ".lora_magnitude_vector": ("", "magnitude"), ".lora_magnitude_vector.weight": ("", "magnitude"),
}
REQUIRED = {"lora": ({"down", "up"},), "loha": ({"w1a", "w1b", "w2a", "w2b"},),
            "lokr": ({"w1", "w1a"}, {"w2", "w2a"})}  # lokr: one of each set
UNSUPPORTED = {".oft_blocks": "OFT", ".oft_diag": "OFT", ".diff": "full-difference (.diff)",
               ".diff_b": "full-difference (.diff_b)"}
TYPE_NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}
COMPONENT_NAMES = {"unet": "the diffusion model", "te1": "text encoder 1", "te2": "text encoder 2",
                   "te3": "text encoder 3 (T5)"}


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-family module: its type, its tensors in the file (role -> key) and its target."""

    name: str
    kind: str                     # lora | loha | lokr
    keys: dict[str, str]          # role -> tensor key in the file
    shapes: dict[str, tuple]      # role -> shape (from the header)
    alpha_value: float | None     # from diffusers' `lora_adapter_metadata` when there is no .alpha
    target: Target
    rank: int | None              # what alpha divides by; None: scale 1 (LoKr with two full sides)
    dora_axis: str = ""           # "out" / "in" when the module carries a DoRA magnitude

    @property
    def alpha_key(self) -> str | None:
        return self.keys.get("alpha")

    @property
    def is_dora(self) -> bool:
        return bool(self.dora_axis)


def _component_of_name(module: str) -> str:
    """The component a LoRA module name addresses, from its prefix alone."""
    m = module.removeprefix("base_model.model.")
    for prefix, comp in (("lora_te2_", "te2"), ("text_encoder_2", "te2"), ("lora_te3_", "te3"),
                         ("text_encoder_3", "te3"), ("lora_te", "te1"), ("text_encoder", "te1")):
        if m.startswith(prefix):
            return comp
    return "unet"


def _legacy_name(module: str) -> str:
    """Old diffusers attention-processor names: `attn1.processor.to_q_lora` -> `attn1.to_q`."""
    module = module.replace(".processor.", ".")
    for old, new in (("to_out_lora", "to_out.0"), ("to_q_lora", "to_q"), ("to_k_lora", "to_k"),
                     ("to_v_lora", "to_v")):
        if module.endswith(old):
            return module[: -len(old)] + new
    return module


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _kind(label: str, module: str, roles: dict[str, str]) -> str | None:
    kinds = {ROLES[s][0] for s in roles if ROLES[s][0]}
    if not kinds:
        return None
    if len(kinds) > 1:
        raise WorkbenchError(f"{label}: module {module} mixes {' and '.join(sorted(TYPE_NAMES[k] for k in kinds))} "
                             f"tensors ({sorted(roles)})")
    kind = kinds.pop()
    have = {ROLES[s][1] for s in roles}
    for need in REQUIRED[kind]:
        if not have & need:
            raise WorkbenchError(f"{label}: {TYPE_NAMES[kind]} module {module} lacks "
                                 f"{' or '.join(sorted(need))} ({sorted(roles)})")
    return kind


def _delta_shape(kind: str, s: dict[str, tuple]) -> tuple[int, int, tuple] | None:
    """(out rows, input numel per row, kernel) that the module's ΔW has, from shapes only."""
    try:
        if kind == "lora":
            down, up = s["down"], s["up"]
            if len(up) < 2 or up[1] != down[0] or any(d != 1 for d in up[2:]):
                return None
            if "mid" in s:
                mid = s["mid"]
                if mid[0] != up[1] or mid[1] != down[0]:
                    return None
                return up[0], _numel(down[1:]) * _numel(mid[2:]), tuple(mid[2:])
            return up[0], _numel(down[1:]), tuple(down[2:])
        if kind == "loha":
            if "t1" in s:
                t1, w1a, w1b = s["t1"], s["w1a"], s["w1b"]
                return w1a[1], w1b[1] * _numel(t1[2:]), tuple(t1[2:])
            w1a, w1b, w2a, w2b = s["w1a"], s["w1b"], s["w2a"], s["w2b"]
            if w1a[0] != w2a[0] or _numel(w1b[1:]) != _numel(w2b[1:]) or w1a[1] != w1b[0]:
                return None
            return w1a[0], _numel(w1b[1:]), ()
        # lokr
        a, c = (s["w1"][0], s["w1"][1]) if "w1" in s else (s["w1a"][0], s["w1b"][1])
        if "w2" in s:
            w2 = s["w2"]
            return a * w2[0], c * _numel(w2[1:]), tuple(w2[2:])
        if "t2" in s:
            t2 = s["t2"]
            return a * s["w2a"][1], c * s["w2b"][1] * _numel(t2[2:]), tuple(t2[2:])
        return a * s["w2a"][0], c * _numel(s["w2b"][1:]), ()
    except (KeyError, IndexError):
        return None


def _rank(kind: str, s: dict[str, tuple]) -> int | None:
    if kind == "lora":
        return int(s["down"][0])
    if kind == "loha":
        return int(s["w1b"][0])
    return lora_math.lokr_rank(s.get("w1b"), s.get("w2b"))


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
                f"{label}: {UNSUPPORTED[suffix]} modules (e.g. {key}) cannot be merged; merging takes "
                "LoRA/LoCon, LoHa and LoKr files (with or without DoRA)")
        if suffix in ROLES:
            groups.setdefault(module, {})[suffix] = key
    alphas = PeftAlphas(header.metadata)
    by_key: dict[str, list[LoraModule]] = {}
    skipped: list[str] = []
    unmatched: list[str] = []
    for module, tensors in groups.items():
        kind = _kind(label, module, tensors)
        if kind is None:
            continue
        target = table.lookup(module) or table.lookup(_legacy_name(module))
        if target is None:
            comp = _component_of_name(module)
            (unmatched if comp in table.components else skipped).append(module)
            continue
        keys = {ROLES[s][1]: k for s, k in tensors.items()}
        sh = {r: tuple(shapes[k]) for r, k in keys.items()}
        _check_shapes(label, module, kind, sh, target)
        axis = ""
        for role in ("dora", "magnitude"):
            if role in sh:
                axis = lora_math.dora_axis(sh[role], target.out_features, target.in_features,
                                           peft=role == "magnitude")
                if not axis or (axis == "in" and target.rows is not None):
                    raise WorkbenchError(
                        f"{label}: module {module}: DoRA magnitude {list(sh[role])} fits neither the "
                        f"output rows ({target.out_features}) nor the input columns "
                        f"({target.in_features}) of {target.key}" if not axis else
                        f"{label}: module {module}: a per-input DoRA magnitude cannot be applied to "
                        f"a slice of the fused weight {target.key}")
        rank = _rank(kind, sh)
        meta_alpha = alphas.alpha(module, rank) if rank else None
        by_key.setdefault(target.key, []).append(LoraModule(
            module, kind, keys, sh, meta_alpha, target, rank, axis))
    if unmatched:
        raise WorkbenchError(
            f"{label}: {len(unmatched)} LoRA module(s) match no weight of the {table.arch} base, e.g. "
            f"{', '.join(unmatched[:3])}; expected kohya (lora_unet_/lora_te*_) or diffusers/PEFT "
            "(unet./text_encoder./transformer.) module names of that architecture")
    if not by_key:
        raise WorkbenchError(f"{label}: no LoRA module of this file applies to the {table.arch} base "
                             f"({len(skipped)} module(s) address components the base does not contain)")
    return by_key, skipped


def _check_shapes(label: str, module: str, kind: str, s: dict[str, tuple], target: Target) -> None:
    """The module's ΔW must have the target's output rows and input size (in · kernel); loaders
    reshape the rest (conv 1×1 vs linear, k×k flattened)."""
    got = _delta_shape(kind, s)
    want = (target.out_features, target.in_features * _numel(target.kernel))
    if got is None or (got[0], got[1]) != want:
        tensors = ", ".join(f"{r} {list(v)}" for r, v in s.items() if r != "alpha")
        raise WorkbenchError(
            f"{label}: {TYPE_NAMES[kind]} module {module}: {tensors} do not fit "
            f"{target.key} {list(target.shape)}" + (f" rows {target.row_range()}" if target.rows else "")
            + "; the LoRA was made for a model of another size or layout")


def module_delta(module: LoraModule, raw: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """scale · ΔW in fp32, shaped like the module's (row slice of the) weight; no DoRA."""
    t = {r: raw(k).float() for r, k in module.keys.items() if r not in ("alpha", "dora", "magnitude")}
    if module.kind == "lora":
        delta = lora_math.lora(t["up"], t["down"], t.get("mid"))
    elif module.kind == "loha":
        delta = lora_math.loha(t["w1a"], t["w1b"], t["w2a"], t["w2b"], t.get("t1"), t.get("t2"))
    else:
        delta = lora_math.lokr(t.get("w1"), t.get("w1a"), t.get("w1b"), t.get("w2"), t.get("w2a"),
                               t.get("w2b"), t.get("t2"))
    scale = module_scale(module, raw)
    if scale != 1.0:
        delta.mul_(scale)
    return delta.reshape(module.target.delta_shape)


def file_alpha(module: LoraModule, raw: Callable[[str], torch.Tensor]) -> float | None:
    """The alpha the file gives this module (its .alpha tensor, else diffusers' metadata)."""
    if module.alpha_key:
        return float(raw(module.alpha_key).float().item())
    return module.alpha_value


def module_scale(module: LoraModule, raw: Callable[[str], torch.Tensor]) -> float:
    """alpha / rank with the shared alpha rule; 1 for LoKr without a factored side."""
    if module.rank is None:
        return 1.0
    return effective_alpha(file_alpha(module, raw), module.rank) / module.rank


def magnitude(module: LoraModule, raw: Callable[[str], torch.Tensor]) -> torch.Tensor | None:
    key = module.keys.get("dora") or module.keys.get("magnitude")
    return raw(key).float() if key else None


class LoraInputNode(InputNode):
    """A LoRA file bound to the checkpoint layout of the step's first input.

    `info(key)` is the base weight's shape for keys the LoRA changes (None otherwise); `reader(key)`
    gives ΔW. The runner sets `reader` to the LoRA file's raw tensor reader (memory-mapped), which
    this node keeps and wraps: that is how the engine opens and closes the file for us. `first` is
    the step's first input (the weight a DoRA module normalises against); set by the plan builder.
    """

    def __init__(self, name: str, path: Path, header: SafetensorsHeader, table: ModuleTable):
        self.name = name
        self.path = Path(path)
        self.header = header
        self.table = table
        self.modules, self.skipped = parse_modules(header, table, f"model {name}: {path}")
        self.first: Node | None = None
        self._raw: Callable[[str], torch.Tensor] | None = None
        self._defaulted: dict[str, bool] = {m: False for m in self.missing_alpha}  # True: alpha 0
        self._warned_zero = False
        self.sliceable = False  # DoRA needs whole rows; deltas are computed per key anyway
        warn_defaulted(str(self.path), self._defaulted, self.n_modules, zero=False)

    @property
    def reader(self) -> Callable[[str], torch.Tensor] | None:  # type: ignore[override]
        return self.delta if self._raw is not None else None

    @reader.setter
    def reader(self, raw: Callable[[str], torch.Tensor] | None) -> None:
        self._raw = raw

    def info(self, key: str) -> TensorInfo | None:
        mods = self.modules.get(key)
        return TensorInfo("F32", mods[0].target.shape, 0, 0) if mods else None

    @property
    def n_modules(self) -> int:
        return sum(len(v) for v in self.modules.values())

    @property
    def missing_alpha(self) -> list[str]:
        """Modules with neither an .alpha tensor nor a metadata alpha (known from the header)."""
        return sorted(m.name for mods in self.modules.values() for m in mods
                      if m.rank is not None and m.alpha_key is None and m.alpha_value is None)

    @property
    def has_dora(self) -> bool:
        return any(m.is_dora for mods in self.modules.values() for m in mods)

    def delta(self, key: str) -> torch.Tensor:
        """ΔW for one checkpoint key (fused q/k/v parts summed into the fused shape; DoRA: W' − W)."""
        mods = self.modules[key]
        raw = self._raw
        if raw is None:
            raise RuntimeError(f"{self.path}: LoRA read outside a merge run")
        self._note_alphas(mods, raw)
        base = None
        if any(m.is_dora for m in mods):
            if self.first is None:
                raise RuntimeError(f"{self.path}: DoRA module read without its base weight")
            base = evaluate(self.first, key).float()
        if len(mods) == 1 and mods[0].target.rows is None:
            return self._module_change(mods[0], raw, base)
        out = torch.zeros(mods[0].target.shape, dtype=torch.float32)
        for m in mods:
            a, b = m.target.row_range()
            out[a:b] += self._module_change(m, raw, None if base is None else base[a:b])
        return out

    @staticmethod
    def _module_change(m: LoraModule, raw, base: torch.Tensor | None) -> torch.Tensor:
        d = module_delta(m, raw)
        if not m.is_dora:
            return d
        return lora_math.dora_apply(base, d, magnitude(m, raw), m.dora_axis) - base

    def _note_alphas(self, mods: list[LoraModule], raw) -> None:
        """Alpha 0 is only known once the tensor is read: warn at the first one (missing alphas
        were reported from the header when the node was built, i.e. in the dry run)."""
        for m in mods:
            if (m.rank is not None and m.name not in self._defaulted and m.alpha_key
                    and is_defaulted(file_alpha(m, raw))):
                self._defaulted[m.name] = True
                if not self._warned_zero:
                    self._warned_zero = True
                    warn_defaulted(str(self.path), [m.name], self.n_modules, zero=True)

    def summary(self) -> str:
        text = f"LoRA {self.name}: {self.n_modules} modules on {len(self.modules)} weights"
        kinds = sorted({TYPE_NAMES[m.kind] + (" (DoRA)" if m.is_dora else "")
                        for mods in self.modules.values() for m in mods})
        if kinds != ["LoRA"]:
            text += f" ({', '.join(kinds)})"
        missing = self.missing_alpha
        if missing:
            text += f"; {len(missing)} modules have no alpha: applied with alpha = rank (scale 1)"
        if self.skipped:
            comps = sorted({COMPONENT_NAMES[_component_of_name(m)] for m in self.skipped})
            text += f"; {len(self.skipped)} modules skipped ({', '.join(comps)} not in the base)"
        return text

    def __repr__(self) -> str:
        return f"LoraInputNode({self.name!r}, {self.path.name})"


def lora_node(name: str, path: Path, header: SafetensorsHeader, arch: str, base: InputNode,
              first: Node | None = None) -> LoraInputNode:
    """A LoRA input bound to `base`'s key layout (module table built from its header only);
    `first` is the node whose value a DoRA module normalises against (default: `base`)."""
    node = LoraInputNode(name, path, header, module_table(arch, base.header.shapes()))
    node.first = first if first is not None else base
    return node

