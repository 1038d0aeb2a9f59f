"""The `extract_lora` recipe: a kohya LoRA from the difference between a fine-tune and its base.

    kind: extract_lora
    name: my-style
    tuned: models/my-finetune.safetensors
    base: models/v1-5-pruned-emaonly.safetensors
    rank: 32
    conv_rank: 16          # optional: LoCon on the ResNet 3x3 convs (kohya conv_dim)
    output: {path: loras/my-style.safetensors, dtype: fp16}

The engine is workbench/merge/extract.py (kohya extract_lora_from_models' method).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from workbench.recipes.common import RecipeBase, RecipeName, RecipePath, StrictModel

PositiveInt = Annotated[int, Field(gt=0)]


class ExtractOutput(StrictModel):
    """Where the LoRA goes and how it is stored."""

    path: RecipePath
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    overwrite: bool = False


class ExtractLoraRecipe(RecipeBase):
    """kind: extract_lora: SVD of (tuned - base) per LoRA module, kohya format, alpha = rank."""

    KIND = "extract_lora"
    kind: Literal["extract_lora"] = "extract_lora"
    name: RecipeName
    description: str | None = None
    tuned: RecipePath
    base: RecipePath
    rank: PositiveInt = 32
    conv_rank: PositiveInt | None = None
    components: list[Literal["unet", "text_encoder"]] = Field(default=["unet", "text_encoder"], min_length=1)
    clamp_quantile: Annotated[float, Field(gt=0.5, le=1.0)] | None = 0.99  # kohya's; null: no clamp
    output: ExtractOutput
