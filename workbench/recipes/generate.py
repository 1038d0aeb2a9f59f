"""The `generate` recipe: images from one model, prompt and settings, optionally with LoRAs.

`memory` states a VRAM budget and a weight storage choice; the generation core (issue #4) plans
what stays resident, what is stored in fp8/nf4 and what is streamed from it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from workbench.recipes.common import (
    LoraSpec,
    PixelSize,
    RecipeBase,
    RecipeName,
    RecipePath,
    SamplerName,
    StrictModel,
)

WEIGHT_MODES = ("auto", "fp32", "fp16", "bf16", "fp8", "nf4")


class MemorySpec(StrictModel):
    """How much GPU memory the run may use and how weights are stored."""

    vram_budget_mb: Annotated[int, Field(ge=256)] | None = None  # None: measure the card
    weights: Literal["auto", "fp32", "fp16", "bf16", "fp8", "nf4"] = "auto"
    device: str | None = None  # "cuda", "cuda:1", "cpu"; None: the first GPU, else the CPU


class GenerateOutput(StrictModel):
    dir: RecipePath
    format: Literal["png", "jpg", "webp"] = "png"


class GenerateRecipe(RecipeBase):
    """kind: generate: `count` images; seeds are seed, seed+1, ... (seed -1: random, recorded)."""

    KIND = "generate"
    kind: Literal["generate"] = "generate"
    name: RecipeName | None = None  # default: the recipe file's name
    description: str | None = None
    model: RecipePath
    # the text encoders and VAE for a `model` that holds only the UNet/transformer (a GGUF
    # conversion): a checkpoint of the same architecture or a diffusers folder (pipeline/components.py)
    components: RecipePath | None = None
    prompt: str
    negative_prompt: str = ""
    sampler: SamplerName = "Euler a"
    steps: Annotated[int, Field(gt=0, le=1000)] = 20
    cfg: Annotated[float, Field(ge=0)] = 7.0
    width: PixelSize = 512
    height: PixelSize = 512
    seed: Annotated[int, Field(ge=-1)] = -1
    count: Annotated[int, Field(gt=0)] = 1
    batch_size: Annotated[int, Field(gt=0)] = 1
    clip_skip: Annotated[int, Field(gt=0)] | None = None
    loras: list[LoraSpec] = Field(default_factory=list)
    # a tiny autoencoder (TAESD / TAESDXL) used to decode instead of the full VAE: much faster on a
    # CPU at a small cost in detail; a diffusers AutoencoderTiny folder or .safetensors file
    tiny_vae: RecipePath | None = None
    memory: MemorySpec = Field(default_factory=MemorySpec)
    output: GenerateOutput
