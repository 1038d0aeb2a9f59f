"""LoRAs at generation time: attach for one call, with weights, without reloading the base.

diffusers' `load_lora_weights` reads kohya (sd-scripts, A1111/Forge/ComfyUI files) and diffusers/
peft files alike and wraps the targeted layers in peft adapters, which also works on layers whose
weights are stored in fp8 or nf4 (the LoRA delta is added in the compute dtype, the base stays
quantized: an exact online delta, never a lossy re-quantized merge). Adapters stay loaded on the
model and are switched per call with `set_adapters`, so a grid that alternates LoRAs cell by cell
reads each LoRA file once. The oldest adapters are dropped beyond MAX_LOADED.

So that a preview equals the bake of the same file (workbench/merge/lora.py):
- alpha: kohya files go to diffusers with each module's alpha / rank, as
  workbench/formats/lora_alpha.py decides it, folded into lora_up and no `.alpha` left (diffusers
  would apply an alpha of 0 as 0, give modules without alpha the most common alpha of the others,
  and, in 0.42.1, ignores differing per-module alphas of SD1.5/SDXL U-Net modules: its
  alpha_pattern keys keep `.processor.to_q_lora.down.weight` and match no layer);
- kohya SD3 files are handed over under diffusers names (diffusers' SD3 loader reads no kohya
  names and would skip them silently), alpha folded into lora_B;
- LoHa, LoKr, DoRA and Tucker-LoCon files, which diffusers refuses or applies without their DoRA
  magnitudes, are applied by workbench/pipeline/lora_patch.py with the merge's own formulas;
- LoRA Block Weight (`LoraUse.blocks`) sets each peft layer's scale from its block
  (workbench/formats/lbw.py `diffusers_block`), as the bake does per checkpoint key.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from workbench.errors import WorkbenchError
from workbench.formats import lbw
from workbench.formats.blocks import BLOCK_IDS, block_of, parse_block_values
from workbench.formats.lora_alpha import (
    PeftAlphas,
    effective_alpha,
    is_defaulted,
    warn_defaulted,
)
from workbench.formats.lora_detect import KOHYA_PREFIXES, split_suffix
from workbench.formats.safetensors_io import read_header
from workbench.pipeline.model import LoraUse, Model
from workbench.formats.detect import detect
from workbench.formats.lora_keys import SWAPPED, module_table, swap_halves
from workbench.pipeline.lora_patch import ExactLora

MAX_LOADED = 8
# tensors diffusers' loader cannot apply as trained: those files go to pipeline/lora_patch.py
EXACT_SUFFIXES = (".hada_w1_a", ".lokr_w1", ".lokr_w1_a", ".dora_scale", ".lora_magnitude_vector",
                  ".lora_magnitude_vector.weight", ".lora_mid.weight")
PIPE_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def _key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def _check_lora(model: Model, path: Path) -> None:
    """Refuse a file that is not a LoRA for this model's architecture, before diffusers reads it."""
    if not path.is_file():
        raise WorkbenchError(f"{path}: LoRA file not found")
    info = detect(path)
    if info.kind != "lora":
        raise WorkbenchError(f"{path}: is a {info.arch} {info.kind}, not a LoRA")
    archs = set(info.archs or [info.arch])
    if model.arch not in archs:
        raise WorkbenchError(f"{path}: is a LoRA for {', '.join(sorted(archs))}; the model "
                             f"{model.model_name or ''} is {model.arch}")


def _modules(header) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for key in header.tensors:
        sp = split_suffix(key)
        if sp:
            out.setdefault(sp[0], {})[sp[1]] = key
    return out


def needs_exact(header) -> bool:
    """LoHa, LoKr, DoRA or Tucker-LoCon modules: applied by pipeline/lora_patch.py."""
    return any(k.endswith(EXACT_SUFFIXES) for k in header.tensors)


def for_diffusers(path: Path, arch: str, model_path: Path | None = None) -> str | dict:
    """What to hand to `load_lora_weights`: the path itself (diffusers/PEFT layout: its own alpha
    metadata, or scale 1 per module, as our rule), or a state dict with every kohya module's scale
    folded into lora_up (kohya layout) / with diffusers names (kohya SD3)."""
    from safetensors.torch import load_file

    header = read_header(path)
    modules = _modules(header)
    kohya = bool(modules) and all(m.startswith(KOHYA_PREFIXES) for m in modules)
    if arch == "sd3" and kohya:
        return _sd3_to_diffusers(path, header, modules, model_path)
    if not kohya:
        if not PeftAlphas(header.metadata):
            # diffusers/PEFT convention without an alpha: scale 1 per module, our rule too
            warn_defaulted(str(path), [m for m, t in modules.items() if ".alpha" not in t],
                           len(modules), zero=False)
        return str(path)
    sd = load_file(str(path))
    defaulted: dict[str, bool] = {}
    for module, tensors in modules.items():
        down, up = tensors.get(".lora_down.weight"), tensors.get(".lora_up.weight")
        alpha_key = tensors.get(".alpha")
        alpha = float(sd.pop(alpha_key).float().item()) if alpha_key else None
        if down is None or up is None:
            continue
        rank = sd[down].shape[0]
        if is_defaulted(alpha):
            defaulted[module] = alpha is not None
        scale = effective_alpha(alpha, rank) / rank
        if scale != 1.0:
            sd[up] = sd[up] * scale
    if defaulted:
        kinds = set(defaulted.values())
        warn_defaulted(str(path), defaulted, len(modules), kinds.pop() if len(kinds) == 1 else None)
    return sd


def _sd3_to_diffusers(path: Path, header, modules, model_path: Path | None) -> dict:
    """kohya SD3 (`lora_unet_joint_blocks_N_x_block_attn_qkv`, `lora_te1_/te2_`) -> diffusers/PEFT
    keys (`transformer.transformer_blocks.N.attn.to_q.lora_A.weight`, ...): fused qkv split by rows,
    lora_A shared, alpha/rank (shared rule) folded into lora_B. T5 (`lora_te3_`) modules are left
    out: diffusers' SD3 pipeline takes no LoRA on its T5."""
    from safetensors.torch import load_file

    if model_path is None or not Path(model_path).is_file():
        raise WorkbenchError(f"{path}: a kohya SD3 LoRA is mapped to diffusers names through the "
                             "checkpoint's layout; this model was not loaded from a checkpoint file")
    table = module_table("sd3", read_header(model_path).shapes())
    sd = load_file(str(path))
    out: dict[str, torch.Tensor] = {}
    skipped, defaulted = [], {}
    for module, tensors in modules.items():
        down_key, up_key = tensors.get(".lora_down.weight"), tensors.get(".lora_up.weight")
        if down_key is None or up_key is None:
            continue
        target = table.lookup(module)
        if target is None:
            raise WorkbenchError(f"{path}: LoRA module {module} matches no weight of the SD3 model")
        parts = [(n, r) for n, r in table.diffusers.get(target.key, [])
                 if n.startswith(("transformer.", "text_encoder.", "text_encoder_2."))]
        if not parts:
            skipped.append(module)
            continue
        down, up = sd[down_key], sd[up_key]
        rank = down.shape[0]
        alpha = float(sd[tensors[".alpha"]].float().item()) if ".alpha" in tensors else None
        if is_defaulted(alpha):
            defaulted[module] = alpha is not None
        up = up * (effective_alpha(alpha, rank) / rank)
        n = up.shape[0]
        for name, rows in parts:
            if rows == SWAPPED:  # e.g. the last context block's adaLN: halves stored the other way
                part = swap_halves(up)
            else:
                a, b = (0, n) if rows is None else (n * rows[0] // rows[2], n * rows[1] // rows[2])
                part = up[a:b]
            out[f"{name}.lora_A.weight"] = down.contiguous()
            out[f"{name}.lora_B.weight"] = part.contiguous()
    if defaulted:
        kinds = set(defaulted.values())
        warn_defaulted(str(path), defaulted, len(modules), kinds.pop() if len(kinds) == 1 else None)
    if skipped:
        warnings.warn(f"{path}: {len(skipped)} T5 modules (e.g. {skipped[0]}) are not applied at "
                      "generation time (diffusers' SD3 pipeline takes no LoRA on T5); a bake "
                      "applies them", UserWarning, stacklevel=2)
    return out


def _load(model: Model, path: Path):
    loaded = model.lora_adapters
    key = _key(path)
    if key in loaded:
        return loaded[key]
    _check_lora(model, path)
    if len(loaded) >= MAX_LOADED:
        _drop(model, loaded.pop(next(iter(loaded))))
    header = read_header(path)
    if needs_exact(header):
        handle = ExactLora(model, path)
        loaded[key] = handle
        return handle
    name = f"lora_{abs(hash(key)) % 10**10}"
    try:
        with warnings.catch_warnings():
            # several adapters on one model is this cache's purpose (a grid's LoRA axis, a pick's
            # steps); peft warns about it each time
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            model.pipe.load_lora_weights(for_diffusers(path, model.arch, model.path), adapter_name=name)
    except (ValueError, KeyError, RuntimeError) as e:
        raise WorkbenchError(f"{path}: diffusers could not apply this LoRA to the "
                             f"{model.arch} model: {e}") from e
    loaded[key] = name
    _adapters_to_device(model)
    return name


def _drop(model: Model, handle) -> None:
    if isinstance(handle, str):
        model.pipe.delete_adapters(handle)
    else:
        handle.remove()


def _adapters_to_device(model: Model) -> None:
    """peft puts an adapter where its base layer's weight is at load time; for layers that are
    streamed or offloaded that is the CPU. Adapters are small: keep them all on the compute
    device."""
    if model.device.type != "cuda":
        return
    for component in model.pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for pname, param in component.named_parameters():
                if "lora_" in pname and param.device != model.device:
                    param.data = param.data.to(model.device)


def block_table(arch: str, blocks: str | None, label: str = "LoRA") -> dict[str, float] | None:
    """{block id: weight} for a `blocks` value on `arch` (None: every block at 1)."""
    if not blocks:
        return None
    if arch not in BLOCK_IDS:
        raise WorkbenchError(f"{label}: block weights are not defined for {arch}")
    try:
        return parse_block_values(arch, blocks)
    except WorkbenchError as e:
        raise WorkbenchError(f"{label}: {e}") from None


def _peft_layers(model: Model, adapter: str) -> Iterator[tuple[str, str, torch.nn.Module]]:
    for comp in PIPE_COMPONENTS:
        m = getattr(model.pipe, comp, None)
        if not isinstance(m, torch.nn.Module):
            continue
        for path, module in m.named_modules():
            if hasattr(module, "set_scale") and adapter in getattr(module, "scaling", {}):
                yield comp, path, module


def _set_block_scales(model: Model, adapter: str, weight: float, table: dict[str, float]) -> None:
    """Per-layer weight = LoRA weight × its block's weight (after diffusers' set_adapters)."""
    for comp, path, module in _peft_layers(model, adapter):
        block = lbw.diffusers_block(model.arch, comp, path)
        module.set_scale(adapter, weight * table.get(block, 0.0) if block else weight)


@contextmanager
def attached_loras(model: Model, loras: Sequence[LoraUse]) -> Iterator[None]:
    """Inside the block exactly `loras` are active with their weights; others are off."""
    loaded = model.lora_adapters
    exact = [h for h in loaded.values() if not isinstance(h, str)]
    for h in exact:
        h.deactivate()
    if not loras:
        if any(isinstance(h, str) for h in loaded.values()):
            model.pipe.disable_lora()
        yield
        return
    tables = [block_table(model.arch, lu.blocks, str(lu.path)) for lu in loras]
    handles = [_load(model, Path(lu.path)) for lu in loras]
    names = [h for h in handles if isinstance(h, str)]
    if names:
        model.pipe.enable_lora()
        model.pipe.set_adapters(names, adapter_weights=[float(lu.weight) for lu, h in zip(loras, handles)
                                                        if isinstance(h, str)])
    elif any(isinstance(h, str) for h in loaded.values()):
        model.pipe.disable_lora()
    for lu, h, table in zip(loras, handles, tables):
        if isinstance(h, str):
            if table is not None:
                _set_block_scales(model, h, float(lu.weight), table)
        else:
            h.activate(float(lu.weight), _key_weight(model.arch, table))
    try:
        yield
    finally:
        for h in handles:
            if not isinstance(h, str):
                h.deactivate()


def _key_weight(arch: str, table: dict[str, float] | None) -> Callable[[str], float] | None:
    if table is None:
        return None
    return lambda key: table.get(block_of(arch, key), 0.0)


def unload_all(model: Model) -> None:
    """Remove every adapter this module attached (the model returns to its plain weights)."""
    loaded = model.lora_adapters
    if any(isinstance(h, str) for h in loaded.values()):
        model.pipe.unload_lora_weights()
    for h in loaded.values():
        if not isinstance(h, str):
            h.remove()
    loaded.clear()
