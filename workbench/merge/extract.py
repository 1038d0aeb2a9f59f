"""Extract a kohya LoRA from a fine-tune: ΔW = tuned − base, one module's SVD at a time.

Method (kohya sd-scripts `networks/extract_lora_from_models.py`, reimplemented from its description):
per module, ΔW (fp32; k×k convs flattened to [out, in·k·k]) is factored by SVD, U·diag(S) truncated
to `rank` columns becomes `lora_up`, Vh truncated to `rank` rows becomes `lora_down`; both are
clamped to ±(the `clamp_quantile` quantile of their joined values), which trims rare outliers so
fp16 storage stays safe. alpha = the module's rank, so the scale alpha/rank is 1. Rank is capped at
min(out, in·k·k). `clamp_quantile=None` skips the clamp (exact truncated SVD).

Streaming: both inputs are memory-mapped; weights are read per module, and every module whose two
weights are bit-identical is left out (a frozen text encoder yields no modules). That check runs
first, so the output file's plan (names, shapes) is known before the first SVD; the atomic writer
then receives each module's three tensors right after its SVD.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from workbench.arch import ARCHS
from workbench.errors import WorkbenchError
from workbench.formats.detect import detect
from workbench.formats.hashes import sha256_file
from workbench.formats.lora_keys import Target, kohya_modules, module_table
from workbench.formats.model_file import check_merge_input, open_model, read_model_header
from workbench.formats.writer import SafetensorsWriter
from workbench.progress import task
from workbench import __version__

DTYPES = {"fp16": (torch.float16, "F16"), "bf16": (torch.bfloat16, "BF16"), "fp32": (torch.float32, "F32")}
BASE_MODEL_VERSION = {a.id: a.kohya_base_model_version for a in ARCHS}  # from workbench/arch.py
NETWORK_MODULE = {a.id: a.kohya_network_module for a in ARCHS}
CLAMP_QUANTILE = 0.99


@dataclass
class ExtractPlan:
    """Everything extraction will do, from headers and an identity check of each module."""

    arch: str
    modules: dict[str, tuple[Target, int]]  # name -> (target, rank)
    unchanged: int
    missing: list[str]

    def tensor_plan(self, st_dtype: str) -> dict[str, tuple[str, tuple[int, ...]]]:
        plan = {}
        for name, (t, r) in self.modules.items():
            plan[f"{name}.alpha"] = (st_dtype, ())
            plan[f"{name}.lora_down.weight"] = (st_dtype, (r, t.in_features, *t.kernel))
            plan[f"{name}.lora_up.weight"] = (st_dtype, (t.out_features, r, *(1 for _ in t.kernel)))
        return plan


def _weight(raw: Callable[[str], torch.Tensor], target: Target) -> torch.Tensor:
    t = raw(target.key)
    a, b = target.row_range()
    return t[a:b] if target.rows else t


def plan_extraction(tuned: Path, base: Path, rank: int, conv_rank: int | None,
                    components: tuple[str, ...], check_identical: bool = True) -> ExtractPlan:
    """Modules and ranks, from headers (and, when `check_identical`, one pass over both files)."""
    th, bh = read_model_header(tuned), read_model_header(base)
    # scaled fp8 is read with its scales multiplied out (open_model); GGUF and NF4 are refused
    check_merge_input(th, f"tuned: {tuned}", "LoRA extraction", False, "")
    check_merge_input(bh, f"base: {base}", "LoRA extraction", False, "")
    ti, bi = detect(th), detect(bh)
    for label, path, info in (("tuned", tuned, ti), ("base", base, bi)):
        if info.kind == "lora":
            raise WorkbenchError(f"{label}: {path} is a LoRA; extraction needs two full models")
    if ti.arch != bi.arch:
        raise WorkbenchError(f"cannot extract a LoRA between different architectures: tuned "
                             f"({tuned.name}) is {ti.arch}, base ({base.name}) is {bi.arch}")
    table = module_table(bi.arch, bh.shapes())
    wanted = kohya_modules(table, set(components), conv=conv_rank is not None)
    modules, missing = {}, []
    tshapes = th.shapes()
    for name, t in wanted.items():
        if tuple(tshapes.get(t.key, ())) != t.shape:
            missing.append(name)
            continue
        limit = conv_rank if (t.is_conv and any(k > 1 for k in t.kernel)) else rank
        cap = t.in_features
        for k in t.kernel:
            cap *= k
        modules[name] = (t, max(1, min(limit, t.out_features, cap)))
    plan = ExtractPlan(bi.arch, modules, 0, missing)
    if not check_identical:
        if not modules:
            raise WorkbenchError(f"{tuned}: no module a LoRA covers has the same shape in {base} "
                                 f"(components: {', '.join(components)}); nothing to extract")
        return plan
    return drop_unchanged(plan, tuned, base, components)


def drop_unchanged(plan: ExtractPlan, tuned: Path, base: Path, components: tuple[str, ...]) -> ExtractPlan:
    """The header-only plan less every module whose weights are bit-identical in both files (one
    pass over both; a frozen text encoder yields no modules)."""
    modules = dict(plan.modules)
    unchanged = 0
    if modules:
        with open_model(tuned) as ft, open_model(base) as fb:
            for name in list(modules):
                t = modules[name][0]
                if torch.equal(_weight(ft.get, t), _weight(fb.get, t)):
                    del modules[name]
                    unchanged += 1
    if not modules:
        raise WorkbenchError(f"{tuned}: no weight differs from {base} in the modules a LoRA covers "
                             f"(components: {', '.join(components)}); nothing to extract")
    return ExtractPlan(plan.arch, modules, plan.unchanged + unchanged, plan.missing)


@torch.no_grad()
def low_rank(delta: torch.Tensor, rank: int, clamp_quantile: float | None = CLAMP_QUANTILE
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, rank], down [rank, in]) with up @ down ≈ delta (2-D fp32), kohya-style clamp."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    up = u[:, :rank] * s[:rank]
    down = vh[:rank, :]
    if clamp_quantile is not None and clamp_quantile < 1.0:
        joined = torch.cat([up.flatten(), down.flatten()])
        if joined.numel() > 16_000_000:  # torch.quantile's input limit: estimate from a sample
            joined = joined[torch.randperm(joined.numel(), generator=torch.Generator().manual_seed(0))[:16_000_000]]
        hi = torch.quantile(joined, clamp_quantile)
        up = up.clamp(-hi, hi)
        down = down.clamp(-hi, hi)
    return up.contiguous(), down.contiguous()


def extraction_metadata(plan: ExtractPlan, rank: int, conv_rank: int | None, tuned: Path, base: Path,
                        hashes: dict[str, str] | None = None) -> dict[str, str]:
    meta = {"ss_network_module": NETWORK_MODULE.get(plan.arch, "networks.lora"),
            "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
            "ss_base_model_version": BASE_MODEL_VERSION.get(plan.arch, plan.arch),
            "ss_v2": str(plan.arch == "sd2"),
            "ss_training_comment": "extracted by workbench (SVD of tuned - base)",
            "workbench_version": __version__}
    if conv_rank is not None:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(conv_rank), "conv_alpha": str(conv_rank)})
    if hashes is not None:
        meta["workbench_extracted_from"] = json.dumps({
            "tuned": {"file": tuned.name, "sha256": hashes["tuned"]},
            "base": {"file": base.name, "sha256": hashes["base"]}})
    return meta


def extract_lora(tuned: str | Path, base: str | Path, out: str | Path, rank: int,
                 conv_rank: int | None = None, dtype: str = "fp16",
                 components: tuple[str, ...] = ("unet", "text_encoder"), overwrite: bool = False,
                 progress: bool = True, clamp_quantile: float | None = CLAMP_QUANTILE,
                 header_plan: ExtractPlan | None = None) -> Path:
    """Write a kohya-format LoRA approximating `tuned − base`; returns the output path.
    `header_plan` is the dry run's plan (`check_identical=False`), refined here rather than redone."""
    tuned, base, out = Path(tuned), Path(base), Path(out)
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise WorkbenchError(f"rank and conv_rank must be at least 1 (got {rank}, {conv_rank})")
    if dtype not in DTYPES:
        raise WorkbenchError(f"dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    torch_dtype, st = DTYPES[dtype]
    if header_plan is None:
        plan = plan_extraction(tuned, base, rank, conv_rank, components)
    else:
        plan = drop_unchanged(header_plan, tuned, base, components)
    meta = extraction_metadata(plan, rank, conv_rank, tuned, base,
                               {"tuned": sha256_file(tuned), "base": sha256_file(base)})
    out.parent.mkdir(parents=True, exist_ok=True)
    with task("extracting LoRA modules", len(plan.modules), "module", bar=progress) as bar, \
            open_model(tuned) as ft, open_model(base) as fb, \
            SafetensorsWriter(out, plan.tensor_plan(st), meta, overwrite=overwrite) as writer:
        for name, (t, r) in plan.modules.items():
            delta = _weight(ft.get, t).float() - _weight(fb.get, t).float()
            up, down = low_rank(delta.reshape(t.out_features, -1), r, clamp_quantile)
            writer.write(f"{name}.alpha", torch.tensor(float(r), dtype=torch_dtype))
            writer.write(f"{name}.lora_down.weight", down.reshape(r, t.in_features, *t.kernel).to(torch_dtype))
            writer.write(f"{name}.lora_up.weight",
                         up.reshape(t.out_features, r, *(1 for _ in t.kernel)).to(torch_dtype))
            del delta, up, down
            bar.advance(1)  # reports to the dashboard's job too; a cancel stops here, no file left
    return out
