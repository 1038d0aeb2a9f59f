"""The trained adapter: which layers get one (from the fixed kohya tables) and peft injection.

Why the tables: an exported kohya name must be what A1111/ComfyUI/Forge map, whatever the installed
transformers/diffusers call their modules (with transformers 5, `CLIPTextModel` has no
`text_model.` level, so names built from `named_modules()` come out as
`lora_te_encoder_layers_0_...` instead of the `lora_te_text_model_encoder_layers_0_...` every UI
maps). So the module list comes
from `workbench.formats.lora_keys` (built from the base checkpoint's own keys); the installed pipeline
is only asked where each listed layer lives, trying the table's spellings in order.

One kohya module may cover several diffusers layers: FLUX `img_attn_qkv` is diffusers `to_q/to_k/to_v`,
`single_blocks_N_linear1` is `to_q/to_k/to_v/proj_mlp`; SD3 `joint_blocks_N_x_block_attn_qkv` is
`transformer_blocks.N.attn.to_q/to_k/to_v` (`context_block_attn_qkv`: `add_q/k/v_proj`). kohya trains
ONE low-rank pair there (shared `lora_down`, `lora_up` = the stacked rows). We reproduce that exactly:
peft puts an adapter on each diffusers layer and the input-side factor (`lora_A`, LoHa `hada_w*_b`)
is tied to one shared Parameter, so the exported fused module is the trained one with the trained
alpha. The last SD3 block's `context_block_adaLN_modulation_1` is diffusers' `norm1_context.linear`
with its two row halves swapped (`SWAPPED` in workbench/formats/lora_keys.py): the export swaps its
output-side factor back.

Adapter types: lora, dora (LoRA + magnitude vector), loha, lokr (peft's LoHa/LoKr, tensors named like
LyCORIS). Trainable tensors stay fp32 whatever the base dtype.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workbench.arch import ARCHS
from workbench.errors import UnsupportedError, RecipeError, WorkbenchError
from workbench.formats.blocks import block_of
from workbench.formats.lora_keys import ModuleTable, Target, kohya_modules, module_table
from workbench.formats.model_file import read_model_header
from workbench.pipeline.components import Sources, combined_shapes
from workbench.formats import lora_keys
from workbench.pipeline.precision import nf4_linear, to_scaled_fp8

ADAPTER = "default"
DENOISER = {a.id: a.denoiser for a in ARCHS}  # from workbench/arch.py
TE_ATTRS = {"te1": "text_encoder", "te2": "text_encoder_2"}
TE_TRAINABLE = tuple(a.id for a in ARCHS if a.text_encoder_trainable)
TRAINABLE = tuple(a.id for a in ARCHS if a.trainable)
TYPES = ("lora", "dora", "loha", "lokr")
# architectures whose kohya modules fuse several diffusers layers (qkv): no LoKr there
FUSED_ARCHS = {a.id: a.name for a in ARCHS if a.kohya_unet_names == "original"}
# the input-side factors that fused (row-split) kohya modules share, per adapter type
SHARED_FACTORS = {"lora": ("lora_A",), "dora": ("lora_A",), "loha": ("hada_w1_b", "hada_w2_b")}


@dataclass
class NetworkModule:
    """One exported kohya module: its name, the pipeline layers it covers (row order) and size."""

    name: str
    target: Target
    component: str                               # pipeline attribute: unet, transformer, text_encoder(_2)
    parts: list[tuple[str, tuple[int, int, int] | None]]  # (module path inside the component, rows)
    rank: int
    alpha: float

    @property
    def is_conv(self) -> bool:
        return self.target.is_conv


@dataclass
class NetworkPlan:
    """What will be trained, from the checkpoint header alone (used by the dry run too)."""

    arch: str
    type: str
    rank: int
    alpha: float
    modules: dict[str, NetworkModule]
    conv_rank: int | None = None
    conv_alpha: float | None = None
    dropout: float | None = None

    def count(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.modules.values():
            out[m.component] = out.get(m.component, 0) + 1
        return out

    def n_params(self) -> int:
        """Trainable values (LoRA/DoRA formula; LoHa has twice, LoKr fewer)."""
        total = 0
        for m in self.modules.values():
            t = m.target
            k = 1
            for s in t.kernel:
                k *= s
            total += m.rank * (t.in_features * k + t.out_features)
            if self.type == "dora":
                total += t.out_features
        return total * (2 if self.type == "loha" else 1)


def _names_by_target(table: ModuleTable) -> dict[int, list[str]]:
    inv: dict[int, list[str]] = {}
    for name, t in table.targets.items():
        inv.setdefault(id(t), []).append(name)
    return inv


def _flux_parts(shapes: dict[str, tuple[int, ...]]) -> dict[str, list[tuple[str, tuple[int, int, int] | None]]]:
    prefix = "model.diffusion_model." if any(k.startswith("model.diffusion_model.") for k in shapes) else ""
    return lora_keys._flux_diffusers([k[len(prefix):] for k in shapes if k.startswith(prefix)])


def plan_network(arch: str, shapes: dict[str, tuple[int, ...]], *, type: str = "lora", rank: int = 16,
                 alpha: float = 1.0, conv_rank: int | None = None, conv_alpha: float | None = None,
                 train_text_encoder: bool = False, blocks: list[str] | None = None,
                 dropout: float | None = None) -> NetworkPlan:
    """The modules kohya trains for `arch` (optionally only inside merge-block ids `blocks`, e.g.
    ["IN04", "M00", "OUT05"] or FLUX ["D00", "S10"]), with pipeline paths and ranks."""
    if type not in TYPES:
        raise RecipeError(f"network.type: expected one of {', '.join(TYPES)} (got {type!r})")
    if arch not in TRAINABLE:
        raise UnsupportedError(f"training a LoRA for {arch} is not supported ({', '.join(TRAINABLE)})")
    if train_text_encoder and arch not in TE_TRAINABLE:
        raise RecipeError(f"network.train_text_encoder: text-encoder training is only offered for "
                          f"{' and '.join(TE_TRAINABLE)} (base is {arch})")
    if arch in FUSED_ARCHS and type == "lokr":
        raise UnsupportedError(f"network.type lokr: a Kronecker factor cannot be split over {FUSED_ARCHS[arch]}'s "
                                f"fused qkv layers; use lora, dora or loha for {FUSED_ARCHS[arch]}")
    table = module_table(arch, shapes)
    comps = {"unet"} | ({"text_encoder"} if train_text_encoder else set())
    wanted = kohya_modules(table, comps, conv=conv_rank is not None)
    inv = _names_by_target(table)
    flux = _flux_parts(dict(shapes)) if arch == "flux" else {}
    modules: dict[str, NetworkModule] = {}
    for name, t in wanted.items():
        if blocks is not None and t.component == "unet" and block_of(arch, t.key) not in blocks:
            continue
        if t.component == "unet":
            comp = DENOISER[arch]
            if arch == "flux":
                bare = t.key.removeprefix("model.diffusion_model.")[:-len(".weight")]
                parts = flux.get(bare)
                if not parts:
                    raise WorkbenchError(f"no diffusers layer known for FLUX module {name} ({t.key})")
            elif arch == "sd3":  # the table's diffusers placement (fused qkv: row thirds)
                parts = [(p.removeprefix("transformer."), rows) for p, rows in table.diffusers.get(t.key, [])]
                if not parts:
                    raise WorkbenchError(f"no diffusers layer known for SD3 module {name} ({t.key})")
            else:
                parts = [(n[len("unet."):], None) for n in inv[id(t)] if n.startswith("unet.")][:1]
        else:
            comp = TE_ATTRS[t.component]
            # both spellings (with and without `text_model.`); the installed model decides
            parts = [(n[len(comp) + 1:], None) for n in inv[id(t)] if n.startswith(comp + ".")]
        if not parts:
            raise WorkbenchError(f"no pipeline layer known for {name} ({t.key})")
        big_kernel = t.is_conv and any(k > 1 for k in t.kernel)
        r = conv_rank if (big_kernel and conv_rank) else rank
        a = (conv_alpha if conv_alpha is not None else float(r)) if (big_kernel and conv_rank) else alpha
        modules[name] = NetworkModule(name, t, comp, parts, r, float(a))
    if not modules:
        raise RecipeError(f"network: no layer of the {arch} model selected"
                          + (f" by blocks {blocks}" if blocks else ""))
    return NetworkPlan(arch, type, rank, alpha, modules, conv_rank, conv_alpha, dropout)


def plan_for_base(base: str | Path, arch: str, spec, blocks: list[str] | None = None,
                  sources: Sources | None = None) -> NetworkPlan:
    """plan_network from a recipe's `network:` section and the base file's header (with a
    UNet/transformer-only base: that file's denoiser beside the `components` file's encoders)."""
    # GGUF / NF4 bases: logical shapes
    shapes = combined_shapes(sources) if sources is not None else read_model_header(Path(base)).shapes()
    return plan_network(arch, shapes, type=spec.type, rank=spec.rank, alpha=spec.alpha,
                        conv_rank=spec.conv_rank, conv_alpha=spec.conv_alpha,
                        train_text_encoder=spec.train_text_encoder,
                        blocks=blocks if blocks is not None else getattr(spec, "blocks", None),
                        dropout=spec.dropout)


# ------------------------------------------------------------------------------------- injection

def _resolve(installed: dict[str, torch.nn.Module], module: NetworkModule) -> list[str]:
    """Installed module paths for `module`: fused parts all; alternative spellings first found.
    `installed` = dict(model.named_modules()): the real tree, not compatibility aliases."""
    if len(module.parts) > 1 and module.parts[0][1] is not None:
        paths = [p for p, _ in module.parts]
    else:
        paths = [p for p, _ in module.parts if p in installed][:1]
    for p in paths:
        layer = installed.get(p)
        if layer is None:
            raise WorkbenchError(f"{module.name}: the loaded {module.component} has no layer {p}")
        if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            raise WorkbenchError(f"{module.name}: {module.component}.{p} is a {type(layer).__name__}, "
                                 "expected Linear or Conv2d")
    if not paths:
        raise WorkbenchError(f"{module.name}: none of {[p for p, _ in module.parts]} exists in the "
                             f"loaded {module.component}")
    return paths


def _peft_config(plan: NetworkPlan, targets: list[str], ranks: dict[str, tuple[int, float]]):
    import peft

    rank_pattern = {re.escape(p): r for p, (r, _) in ranks.items() if r != plan.rank}
    alpha_pattern = {re.escape(p): a for p, (_, a) in ranks.items() if a != plan.alpha}
    common = dict(target_modules=targets, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    if plan.type in ("lora", "dora"):
        return peft.LoraConfig(r=plan.rank, lora_alpha=plan.alpha, lora_dropout=plan.dropout or 0.0,
                               init_lora_weights=True, use_dora=plan.type == "dora", **common)
    if plan.type == "loha":
        return peft.LoHaConfig(r=plan.rank, alpha=plan.alpha, module_dropout=plan.dropout or 0.0,
                               init_weights=True, **common)
    return peft.LoKrConfig(r=plan.rank, alpha=plan.alpha, module_dropout=plan.dropout or 0.0,
                           init_weights=True, **common)


def _factor(layer: torch.nn.Module, attr: str) -> torch.nn.Parameter:
    holder = getattr(layer, attr)[ADAPTER]
    return holder.weight if isinstance(holder, torch.nn.Module) else holder


def _set_factor(layer: torch.nn.Module, attr: str, param: torch.nn.Parameter) -> None:
    holder = getattr(layer, attr)
    if isinstance(holder[ADAPTER], torch.nn.Module):
        holder[ADAPTER].weight = param
    else:
        holder[ADAPTER] = param


@dataclass
class Network:
    """The injected adapter: the plan, the pipeline components it lives in and resolved paths."""

    plan: NetworkPlan
    models: dict[str, torch.nn.Module]
    paths: dict[str, list[str]] = field(default_factory=dict)  # kohya name -> installed paths

    def layer(self, component: str, path: str) -> torch.nn.Module:
        return self.models[component].get_submodule(path)

    def named_trainable(self) -> dict[str, torch.nn.Parameter]:
        """Every trainable tensor once (tied factors under their first name), `component.path`."""
        out: dict[str, torch.nn.Parameter] = {}
        seen: set[int] = set()
        for comp, model in self.models.items():
            for n, p in model.named_parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out[f"{comp}.{n}"] = p
        return out

    def param_groups(self, lr: float, unet_lr: float | None = None,
                     text_encoder_lr: float | None = None) -> list[dict]:
        """Optimizer groups: denoiser and text encoders can have their own learning rates."""
        groups: dict[str, list[torch.nn.Parameter]] = {}
        for name, p in self.named_trainable().items():
            comp = name.split(".", 1)[0]
            groups.setdefault("unet" if comp in ("unet", "transformer") else "te", []).append(p)
        out = []
        if "unet" in groups:
            out.append({"params": groups["unet"], "lr": unet_lr or lr, "name": "unet"})
        if "te" in groups:
            out.append({"params": groups["te"], "lr": text_encoder_lr or lr, "name": "text_encoder"})
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.named_trainable().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy trained tensors back in (resume); refuses a different network."""
        mine = self.named_trainable()
        if set(mine) != set(state):
            extra, missing = sorted(set(state) - set(mine)), sorted(set(mine) - set(state))
            raise WorkbenchError("the saved network does not match this recipe's network "
                                 f"({len(missing)} tensors missing, {len(extra)} unexpected, e.g. "
                                 f"{(missing or extra)[0]}); was network: changed?")
        with torch.no_grad():
            for k, p in mine.items():
                if tuple(state[k].shape) != tuple(p.shape):
                    raise WorkbenchError(f"saved tensor {k} has shape {tuple(state[k].shape)}, this "
                                         f"network needs {tuple(p.shape)}; was network.rank changed?")
                p.copy_(state[k])


def inject(pipe, plan: NetworkPlan) -> Network:
    """Put the adapter into the pipeline's components (in place); everything else is frozen."""
    import peft

    by_comp: dict[str, list[NetworkModule]] = {}
    for m in plan.modules.values():
        by_comp.setdefault(m.component, []).append(m)
    models: dict[str, torch.nn.Module] = {}
    net = Network(plan, models)
    for comp, modules in by_comp.items():
        model = getattr(pipe, comp, None)
        if model is None:
            raise WorkbenchError(f"the loaded pipeline has no {comp}")
        model.requires_grad_(False)
        targets: list[str] = []
        ranks: dict[str, tuple[int, float]] = {}
        installed = dict(model.named_modules())
        for m in modules:
            paths = _resolve(installed, m)
            net.paths[m.name] = paths
            for p in paths:
                targets.append(p)
                ranks[p] = (m.rank, m.alpha)
        peft.inject_adapter_in_model(_peft_config(plan, targets, ranks), model, adapter_name=ADAPTER)
        models[comp] = model
    for p in net.named_trainable().values():  # peft casts adapters to the base dtype: keep fp32
        p.data = p.data.float()
    _tie_fused(net)
    return net


def _tie_fused(net: Network) -> None:
    """One shared input-side factor per fused kohya module (see the module docstring)."""
    shared = SHARED_FACTORS.get(net.plan.type, ())
    for m in net.plan.modules.values():
        paths = net.paths[m.name]
        if len(paths) < 2:
            continue
        layers = [net.layer(m.component, p) for p in paths]
        for attr in shared:
            first = _factor(layers[0], attr)
            for layer in layers[1:]:
                _set_factor(layer, attr, first)


def set_multiplier(net: Network, value: float) -> None:
    """Scale every adapter's output (0 switches it off: the base model's output exactly)."""
    for comp, paths in _all_paths(net):
        for p in paths:
            layer = net.layer(comp, p)
            base = layer._wb_scaling if hasattr(layer, "_wb_scaling") else dict(layer.scaling)
            layer._wb_scaling = base
            layer.scaling[ADAPTER] = base[ADAPTER] * value


def _all_paths(net: Network):
    for m in net.plan.modules.values():
        yield m.component, net.paths[m.name]


# --------------------------------------------------------------------------------- low-bit base

class Fp8Linear(torch.nn.Linear):
    """A frozen Linear whose weight is stored as float8_e4m3fn (x `fp8_scale`) and upcast for each
    matmul; the same fp8 values and scale as `pipeline.precision` stores for generation, so a LoRA is
    previewed on exactly the base it was trained on."""

    fp8_scale: float = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        weight = self.weight.to(x.dtype)
        if self.fp8_scale != 1.0:
            weight = weight * self.fp8_scale
        return torch.nn.functional.linear(x, weight, bias)


def quantize_base(model: torch.nn.Module, mode: str, compute_dtype: torch.dtype) -> int:
    """Store the frozen base's Linear weights in fp8 (any device) or NF4 (bitsandbytes, CUDA).
    Call BEFORE inject. Returns the number of layers converted."""
    if mode in ("none", None):
        return 0
    linears = [(n, m) for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    if mode == "fp8":
        for _, m in linears:
            m.weight.requires_grad_(False)
            m.weight.data, scale = to_scaled_fp8(m.weight.data, torch.float8_e4m3fn)
            m.__class__ = Fp8Linear
            m.fp8_scale = scale
        return len(linears)
    if mode == "nf4":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UnsupportedError("base_precision nf4 needs bitsandbytes (pip install bitsandbytes); "
                                    "use fp8 otherwise") from None
        for name, m in linears:  # quantized when the runner moves the model to its device
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, nf4_linear(m, compute_dtype))
        return len(linears)
    raise RecipeError(f"base_precision: expected none, fp8 or nf4 (got {mode!r})")
