"""LoRAs at generation time: attach for one call, with weights, without reloading the base.

diffusers' `load_lora_weights` reads kohya (sd-scripts, A1111/Forge/ComfyUI files) and diffusers/
peft files alike and wraps the targeted layers in peft adapters, which also works on layers whose
weights are stored in fp8 or nf4 (the LoRA delta is added in the compute dtype, the base stays
quantized: an exact online delta, never a lossy re-quantized merge). Adapters stay loaded on the
model and are switched per call with `set_adapters`, so a grid that alternates LoRAs cell by cell
reads each LoRA file once. The oldest adapters are dropped beyond MAX_LOADED.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch

from workbench.errors import WorkbenchError
from workbench.pipeline.model import LoraUse, Model

MAX_LOADED = 8


def _key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def _check_lora(model: "Model", path: Path) -> None:
    """Refuse a file that is not a LoRA for this model's architecture, before diffusers reads it."""
    from workbench.formats.detect import detect

    if not path.is_file():
        raise WorkbenchError(f"{path}: LoRA file not found")
    info = detect(path)
    if info.kind != "lora":
        raise WorkbenchError(f"{path}: is a {info.arch} {info.kind}, not a LoRA")
    archs = set(info.archs or [info.arch])
    if model.arch not in archs:
        raise WorkbenchError(f"{path}: is a LoRA for {', '.join(sorted(archs))}; the model "
                             f"{model.model_name or ''} is {model.arch}")


def _load(model: "Model", path: Path) -> str:
    loaded = model.lora_adapters
    key = _key(path)
    if key in loaded:
        return loaded[key]
    _check_lora(model, path)
    if len(loaded) >= MAX_LOADED:
        oldest_key = next(iter(loaded))
        model.pipe.delete_adapters(loaded.pop(oldest_key))
    name = f"lora_{abs(hash(key)) % 10**10}"
    try:
        model.pipe.load_lora_weights(str(path), adapter_name=name)
    except (ValueError, KeyError, RuntimeError) as e:
        raise WorkbenchError(f"{path}: diffusers could not apply this LoRA to the "
                             f"{model.arch} model: {e}") from e
    loaded[key] = name
    _adapters_to_device(model)
    return name


def _adapters_to_device(model: "Model") -> None:
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


@contextmanager
def attached_loras(model: "Model", loras: Sequence["LoraUse"]) -> Iterator[None]:
    """Inside the block exactly `loras` are active with their weights; others are off."""
    loaded = model.lora_adapters
    if not loras:
        if loaded:
            model.pipe.disable_lora()
        yield
        return
    names = [_load(model, Path(lu.path)) for lu in loras]
    model.pipe.enable_lora()
    model.pipe.set_adapters(names, adapter_weights=[float(lu.weight) for lu in loras])
    yield


def unload_all(model: "Model") -> None:
    """Remove every adapter this module attached (the model returns to its plain weights)."""
    loaded = model.lora_adapters
    if loaded:
        model.pipe.unload_lora_weights()
        loaded.clear()
