"""Dry-run checks that several kinds share and that need the generation core (so they cannot live in
`workbench/plan.py`, which sits below it)."""

from __future__ import annotations

from typing import Any

from workbench.errors import WorkbenchError
from workbench.pipeline.loras import block_table
from workbench.plan import RunPlan


def check_lora_blocks(plan: RunPlan, label: str, arch: str | None, lora: Any) -> None:
    """A LoRA's block weights (`path:weight:INS`) against the model's architecture."""
    if arch and getattr(lora, "blocks", None):
        try:
            block_table(arch, lora.blocks, label)
        except WorkbenchError as e:
            plan.problems.append(str(e))
