"""Dry-run checks that several kinds share and that need the generation core (so they cannot live in
`workbench/plan.py`, which sits below it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.pipeline.components import sources
from workbench.pipeline.loras import block_table
from workbench.plan import RunPlan, check_input


def check_lora_blocks(plan: RunPlan, label: str, arch: str | None, lora: Any) -> None:
    """A LoRA's block weights (`path:weight:INS`) against the model's architecture."""
    if arch and getattr(lora, "blocks", None):
        try:
            block_table(arch, lora.blocks, label)
        except WorkbenchError as e:
            plan.problems.append(str(e))


def component_lines(plan: RunPlan, model: Path, components: Path | None, *, model_field: str = "model",
                    field: str = "components", check: bool = True) -> list[str]:
    """Which file gives which pipeline component when `model` holds only the UNet/transformer
    (`pipeline/components.py`); a missing or unusable `components` becomes a plan problem naming
    the field. Nothing to say (an empty list) for a full checkpoint without `components`.
    `check`: record `components` as an input of the plan (once per recipe)."""
    if components is not None and check:
        check_input(plan, field, components)
    if not Path(model).is_file():
        return []
    try:
        src = sources(model, components, model_field=model_field, field=field)
    except WorkbenchError as e:
        plan.problems.append(str(e))
        return []
    if src is not None:
        return [f"components of {Path(model).name}:", *src.lines()]
    if components is not None:
        return [f"{field}: not used for {Path(model).name} (it has its own text encoders and VAE)"]
    return []
