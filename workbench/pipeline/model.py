"""The values the generation core passes around: what a picture is asked for (`ImageSettings`,
`LoraUse`), what is loaded (`Model`) and what comes out (`GeneratedImage`). Their own module so
that `pipeline/generate.py` and `pipeline/loras.py` both use them without importing each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class ImageSettings:
    """Everything about one picture except the model, the LoRAs and the seed."""

    prompt: str
    negative_prompt: str = ""
    sampler: str = "Euler a"
    steps: int = 20
    cfg: float = 7.0
    width: int = 512
    height: int = 512
    clip_skip: int | None = None  # A1111 numbering: 1 = last layer (no skip), 2 = penultimate


@dataclass(frozen=True)
class LoraUse:
    """A LoRA file applied with `weight` (A1111's `<lora:name:weight>`); `blocks`: a LoRA Block
    Weight value (`INS`, 17/12 numbers, ...; workbench/formats/lbw.py) or None for every block."""

    path: Path
    weight: float = 1.0
    blocks: str | None = None

    @property
    def prompt_tag(self) -> str:
        """`<lora:name:w>` or, with block weights, the extension's `<lora:name:w:lbw=...>`."""
        return f"<lora:{self.name}:{self.weight:g}" + (f":lbw={self.blocks}>" if self.blocks else ">")

    @property
    def name(self) -> str:
        return Path(self.path).stem


@dataclass
class Model:
    """A loaded pipeline plus what identifies it in image metadata and cache keys."""

    pipe: Any
    arch: str
    path: Path | None = None
    variant: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    model_hash: str = ""  # AutoV2, as A1111 writes "Model hash"
    model_name: str = ""
    memory_plan: Any = None  # workbench.pipeline.memory_plan.MemoryPlan when one was applied
    offload: Any = None  # the handle apply_plan returned (remove() undoes the hooks)
    # LoRA files attached: (resolved path, size, mtime_ns) -> diffusers adapter name, or an
    # ExactLora for LoHa/LoKr/DoRA files (workbench/pipeline/lora_patch.py)
    lora_adapters: dict[tuple[str, int, int], Any] = field(default_factory=dict)

    @classmethod
    def from_pipeline(cls, pipe, arch: str, *, name: str = "", model_hash: str = "",
                      device: str | torch.device | None = None) -> "Model":
        """Wrap a pipeline built in memory (training samples, merge previews)."""
        dev = torch.device(device) if device is not None else _module_device(pipe)
        dtype = _denoiser(pipe).dtype
        return cls(pipe, arch, None, None, dev, dtype, model_hash, name)


@dataclass
class GeneratedImage:
    image: Any  # PIL.Image.Image
    seed: int
    parameters: str  # A1111 "parameters" text
    provenance: dict[str, Any]


def _denoiser(pipe) -> torch.nn.Module:
    return getattr(pipe, "unet", None) or pipe.transformer


def _module_device(pipe) -> torch.device:
    try:
        return next(_denoiser(pipe).parameters()).device
    except StopIteration:
        return torch.device("cpu")
