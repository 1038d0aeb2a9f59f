"""The one alpha rule for every place a LoRA is applied: the merge's bake and the generation preview.

Why one function: a LoRA whose modules carry alpha 0 or no alpha at all was applied at scale 1
(alpha = rank) by the bake (kohya's rule, networks/lora.py: "alpha = lora_dim if alpha is None or
alpha == 0") but at scale 0 by diffusers/peft at generation time (a 0 alpha becomes lora_alpha 0),
and a file with alphas on some modules only got the most common alpha on the others. So a LoRA
previewed in a grid and the same LoRA baked into a checkpoint differed. Both paths now ask
`effective_alpha` (workbench/merge/lora.py for the bake, workbench/pipeline/loras.py for the preview,
which writes the decided alpha into the state dict it hands to diffusers), and both warn, naming the
file, when a file leaves alpha to this rule.

diffusers/PEFT files keep their alpha in the `lora_adapter_metadata` header (the PEFT config per
component: lora_alpha, alpha_pattern, rank_pattern, use_rslora); `PeftAlphas` reads it the way peft
builds its per-layer scaling (peft.utils.other.get_pattern_key), so bake and diffusers' loader
agree on those files too.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterable, Mapping

PEFT_ROOTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


class LoraAlphaWarning(UserWarning):
    """A LoRA file leaves alpha to the default rule (alpha 0 or missing -> alpha = rank)."""


def effective_alpha(alpha: float | None, rank: int) -> float:
    """The alpha a module is applied with: its own, or `rank` (scale 1) when it is 0 or missing."""
    if alpha is None or alpha == 0 or not math.isfinite(alpha):
        return float(rank)
    return float(alpha)


def is_defaulted(alpha: float | None) -> bool:
    """Whether `effective_alpha` replaces this alpha by the rank."""
    return alpha is None or alpha == 0 or not math.isfinite(alpha)


def warn_defaulted(label: str, modules: Iterable[str], total: int, zero: bool | None = None) -> None:
    """One warning per file naming it and an example module (no warning when nothing defaulted)."""
    names = sorted(modules)
    if not names:
        return
    what = {True: "alpha 0", False: "no alpha", None: "alpha 0 or no alpha"}[zero]
    text = (f"{label}: {len(names)} of {total} LoRA modules have {what} (e.g. {names[0]}); applied "
            "with alpha = rank (scale 1, kohya's rule) in bakes and previews alike")
    if zero is not False:
        text += ("; ComfyUI and A1111 apply an alpha of 0 as scale 0 (no effect), so this file "
                 "may look different there")
    warnings.warn(text, LoraAlphaWarning, stacklevel=3)


class PeftAlphas:
    """Per-module alpha from diffusers' `lora_adapter_metadata` (None where the file has none)."""

    def __init__(self, metadata: Mapping[str, str] | None):
        self.configs: dict[str, dict] = {}
        raw = (metadata or {}).get("lora_adapter_metadata")
        try:
            data = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            data = {}
        if not isinstance(data, dict):
            return
        for key, value in data.items():
            root, _, field = key.partition(".")
            if root in PEFT_ROOTS and field:
                self.configs.setdefault(root, {})[field] = value

    def __bool__(self) -> bool:
        return any("lora_alpha" in c for c in self.configs.values())

    def alpha(self, module: str, rank: int) -> float | None:
        """The alpha peft gives `module` (dotted name with its component root), expressed so that
        alpha / rank is peft's scaling (use_rslora: alpha / sqrt(r))."""
        module = module.removeprefix("base_model.model.")
        root, _, path = module.partition(".")
        cfg = self.configs.get(root)
        if not cfg or not isinstance(cfg.get("lora_alpha"), (int, float)):
            return None
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), path, cfg["lora_alpha"]))
        if cfg.get("use_rslora"):
            r = float(_pattern_value(cfg.get("rank_pattern"), path, rank))
            return alpha * rank / math.sqrt(r) if r > 0 else alpha
        return alpha


def _pattern_value(patterns, path: str, default):
    """peft's `get_pattern_key`: the first pattern p with re.match(rf"(.*\\.)?({p})$", path)."""
    if not isinstance(patterns, dict):
        return default
    for pattern, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", path):
                return value
        except re.error:
            continue
    return default
