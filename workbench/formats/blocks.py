"""Key -> merge-block tables (supermerger convention) and block-weight value parsing.

One convention for every architecture, supermerger's where it has one (the user-facing summary is
docs/recipes.md, "Block weights"):
- SD1.5/SD2 (26 ids) and SDXL (20 ids): BASE = text encoder(s) + VAE (+ anything outside the UNet);
  `time_embed` and `label_emb` -> IN00; `out.*` -> the last OUT block (OUT11 / OUT08).
- SD3: BASE, IN (pos_embed, x/context/y/t embedders), J00..J37 (joint_blocks; medium has 24),
  OUT (final_layer).
- FLUX: BASE, IN (img_in, txt_in, time_in, vector_in, guidance_in), D00..D18 (double_blocks),
  S00..S37 (single_blocks), OUT (final_layer).
Keys may carry ComfyUI/LDM's `model.diffusion_model.` prefix or be bare (BFL, UNet-only files).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path

from workbench.arch import ARCHS, SD3_MEDIUM_JOINT_BLOCKS, UNET_IDS
from workbench.errors import WorkbenchError
from workbench.formats import lbw

DIFFUSION_PREFIX = "model.diffusion_model."

BLOCK_IDS: dict[str, list[str]] = {a.id: list(a.block_ids) for a in ARCHS}  # workbench/arch.py

TE_VAE_PREFIXES = ("cond_stage_model.", "conditioner.", "text_encoders.", "first_stage_model.",
                   "vae.")
VAE_PREFIXES = ("first_stage_model.", "vae.")
UNET_ROOTS = {"input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out"}
SD3_IN = {"pos_embed", "x_embedder", "context_embedder", "y_embedder", "t_embedder"}
FLUX_IN = {"img_in", "txt_in", "time_in", "vector_in", "guidance_in"}
DIT_ROOTS = {"sd3": SD3_IN | {"joint_blocks", "final_layer"},
             "flux": FLUX_IN | {"double_blocks", "single_blocks", "final_layer"}}
# SD1.5 presets -> SDXL: drop IN09-IN11 and OUT09-OUT11 (supermerger's weighttoxl)
_XL_FROM_26 = [i for i in range(26) if i not in (10, 11, 12, 23, 24, 25)]
PRESETS_FILE = Path(__file__).parent / "data" / "block_presets.json"


def _arch_ids(arch: str) -> list[str]:
    if arch not in BLOCK_IDS:
        raise WorkbenchError(f"block weights: unknown architecture {arch!r}; expected one of "
                             f"{', '.join(BLOCK_IDS)}")
    return BLOCK_IDS[arch]


def _strip(key: str) -> tuple[str, bool]:
    """(key without the diffusion prefix, whether it had the prefix)."""
    if key.startswith(DIFFUSION_PREFIX):
        return key[len(DIFFUSION_PREFIX):], True
    return key, False


def _is_diffusion(arch: str, key: str) -> bool:
    bare, prefixed = _strip(key)
    if prefixed:
        return True
    roots = UNET_ROOTS if arch in UNET_IDS else DIT_ROOTS.get(arch, set())
    return bare.split(".", 1)[0] in roots


def component_of(arch: str, key: str) -> str:
    """'unet' (the diffusion model, DiTs included), 'text_encoder', 'vae' or 'other'."""
    _arch_ids(arch)
    if _is_diffusion(arch, key):
        return "unet"
    if key.startswith(VAE_PREFIXES):
        return "vae"
    if key.startswith(("cond_stage_model.", "conditioner.embedders.", "text_encoders.")):
        return "text_encoder"
    return "other"


def block_of(arch: str, key: str) -> str:
    """The block id of one key. Everything outside the diffusion model is BASE (text encoders,
    VAE, and extras such as model_ema/DDPM buffers, which merges copy rather than average)."""
    ids = _arch_ids(arch)
    if not _is_diffusion(arch, key):
        return "BASE"
    bare, _ = _strip(key)
    parts = bare.split(".")
    root = parts[0]
    index = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    block = None
    if arch in UNET_IDS:
        last_out = ids[-1]
        if root in ("time_embed", "label_emb"):
            block = "IN00"
        elif root == "out":
            block = last_out
        elif root == "middle_block":
            block = "M00"
        elif root == "input_blocks" and index is not None:
            block = f"IN{index:02d}"
        elif root == "output_blocks" and index is not None:
            block = f"OUT{index:02d}"
    elif arch == "sd3":
        block = ("IN" if root in SD3_IN else "OUT" if root == "final_layer" else
                 f"J{index:02d}" if root == "joint_blocks" and index is not None else None)
    elif arch == "flux":
        block = ("IN" if root in FLUX_IN else "OUT" if root == "final_layer" else
                 f"D{index:02d}" if root == "double_blocks" and index is not None else
                 f"S{index:02d}" if root == "single_blocks" and index is not None else None)
    if block is None or block not in ids:
        raise WorkbenchError(f"block weights: key {key!r} of the {arch} diffusion model belongs to "
                             f"no known block (expected one of {ids[1]}..{ids[-1]})")
    return block


def block_ids_for(arch: str, keys: Iterable[str]) -> list[str]:
    """The ids that exist in one file, in table order (SD3 medium: J00..J23 only)."""
    ids = _arch_ids(arch)
    if arch not in ("sd3", "flux"):
        return list(ids)
    present = {block_of(arch, k) for k in keys} | {"BASE"}
    return [i for i in ids if i in present]


@lru_cache(maxsize=1)
def presets() -> dict[str, list[float]]:
    """SuperMerger's named presets (26 values, SD1.5 order), from data/block_presets.json."""
    data = json.loads(PRESETS_FILE.read_text(encoding="utf-8"))
    return {name: [float(v) for v in vals] for name, vals in data["sd15"].items()}


def _hint(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise WorkbenchError(f"block weights: {where}: {value!r} is not a number")
    try:
        return float(value)
    except ValueError:
        raise WorkbenchError(f"block weights: {where}: {value!r} is not a number") from None


def parse_block_values(arch: str, value: object, default: float | None = None,
                       ids: Sequence[str] | None = None) -> dict[str, float]:
    """Turn a recipe's `blocks:` value into {block id: weight} for every id of `arch`.

    Forms (docs/recipes.md): a comma string or list of values in supermerger order (SD1.5 26,
    SDXL 20 — a 26-value list is also accepted for SDXL and converted the way supermerger does,
    dropping IN09-11/OUT09-11; SD3/FLUX: one value per id of BLOCK_IDS[arch]); a single number
    (every block); a mapping {id: value} (ids are case-insensitive; ids not listed take `default`,
    and when `default` is None every id must be listed); or a preset name (GRAD_V, FLAT_25, ...).
    SD3/FLUX accept only presets that are flat over the diffusion model (ALL_A, ALL_B, FLAT_25,
    FLAT_75): BASE takes the preset's BASE value, every other id its block value. `ids` restricts
    the valid ids to the blocks present in one file (see block_ids_for). The LoRA Block Weight
    forms (SD1.5 17 values, SDXL 12, FLUX 61, `lbw=` prefix, presets ALL, INS, ... ALL0.5) are
    read by workbench/formats/lbw.py; blocks they do not name get 0, as in that extension.
    """
    all_ids = _arch_ids(arch)
    valid = list(ids) if ids is not None else list(all_ids)
    if isinstance(value, Mapping):
        return _from_mapping(arch, value, default, valid)
    if isinstance(value, str):
        value = lbw.strip_prefix(value)
    from_lbw = lbw.values(arch, value, valid)  # LoRA Block Weight lists/presets (formats/lbw.py)
    if from_lbw is not None:
        return from_lbw
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {i: float(value) for i in valid}
    if isinstance(value, str) and "," not in value:
        text = value.strip()
        try:
            return {i: float(text) for i in valid}
        except ValueError:
            return _from_preset(arch, text, valid)
    if isinstance(value, str):
        items: list = [v.strip() for v in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise WorkbenchError("block weights: expected a comma list, a mapping, a number or a "
                             f"preset name, got {type(value).__name__} {value!r}")
    nums = [_number(v, f"value {n + 1}") for n, v in enumerate(items)]
    if arch == "sdxl" and len(nums) == 26:
        nums = [nums[i] for i in _XL_FROM_26]
    if len(nums) != len(valid):
        extra = " (or 26 in SD1.5 order)" if arch == "sdxl" else ""
        raise WorkbenchError(f"block weights: {len(nums)} values given for {arch}, expected "
                             f"{len(valid)}{extra} in the order {', '.join(valid)}")
    return dict(zip(valid, nums))


def _from_mapping(arch, value: Mapping, default, valid: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for raw, v in value.items():
        bid = str(raw).strip().upper()
        if bid not in valid:
            raise WorkbenchError(f"block weights: unknown block id {raw!r} for {arch}"
                                 f"{_hint(bid, valid)}; valid ids: {valid[0]}, {valid[1]}, ..., "
                                 f"{valid[-1]}")
        out[bid] = _number(v, f"block {bid}")
    missing = [i for i in valid if i not in out]
    if missing and default is None:
        raise WorkbenchError(f"block weights: no value for {', '.join(missing[:8])}"
                             f"{' ...' if len(missing) > 8 else ''} ({arch}); list every block or "
                             "give a default")
    return {i: out.get(i, default) for i in valid}  # type: ignore[misc]


def _from_preset(arch: str, name: str, valid: list[str]) -> dict[str, float]:
    table = presets()
    match = next((p for p in table if p.upper() == name.upper()), None)
    if match is None:
        names = [*table, *lbw.PRESETS]
        raise WorkbenchError(f"block weights: {name!r} is neither a number nor a known preset"
                             f"{_hint(name.upper(), names)}; presets: {', '.join(names)}")
    vals = table[match]
    if arch in ("sd15", "sd2"):
        return dict(zip(BLOCK_IDS[arch], vals))
    if arch == "sdxl":
        return dict(zip(BLOCK_IDS["sdxl"], (vals[i] for i in _XL_FROM_26)))
    if len(set(vals[1:])) != 1:
        raise WorkbenchError(f"block weights: preset {match} is defined for the SD1.5/SDXL UNet "
                             f"blocks only; for {arch} use a flat preset (ALL_A, ALL_B, FLAT_25, "
                             "FLAT_75) or a mapping such as {BASE: 0, D00: 1}")
    return {i: (vals[0] if i == "BASE" else vals[1]) for i in valid}


def keys_by_block(arch: str, keys: Iterable[str]) -> dict[str, list[str]]:
    """Group keys by block id (table order); handy for dry-run reports and tests."""
    out: dict[str, list[str]] = {i: [] for i in _arch_ids(arch)}
    for k in keys:
        out[block_of(arch, k)].append(k)
    return out


# every block id of every architecture, and the aggregate ids SD3/FLUX use (IN, OUT)
ALL_BLOCK_IDS = frozenset(i for a in ARCHS for i in a.block_ids)
# how many values a block-weight list may have for some architecture: supermerger's lists (every id;
# SDXL also takes SD1.5's 26; an SD3 medium file has J00-J23 only) and the LoRA Block Weight forms
LIST_LENGTHS = frozenset({len(a.block_ids) for a in ARCHS} | {*lbw.LISTS}
                         | {len(BLOCK_IDS["sd3"]) - 38 + SD3_MEDIUM_JOINT_BLOCKS})


def is_block_id(text: str) -> bool:
    """Whether `text` is a block id of some architecture (recipe validation, before the
    architecture is known; `parse_block_values` then checks it against the file's own ids)."""
    return text.strip().upper() in ALL_BLOCK_IDS


def preset_name(text: str) -> str | None:
    """The preset `text` names, spelt as its table spells it (supermerger's, then the LoRA Block
    Weight extension's), or None when it names none."""
    body = lbw.strip_prefix(text).upper()
    return next((n for n in (*presets(), *lbw.PRESETS) if n.upper() == body), None)


def check_block_text(text: str) -> None:
    """What can be checked of a `blocks:` text before the architecture is known: numbers of a
    length some architecture takes, or a preset name that exists (supermerger's or the LoRA Block
    Weight extension's). Raises WorkbenchError saying what was expected."""
    body = lbw.strip_prefix(text)
    if "," not in body:
        try:
            float(body)
            return
        except ValueError:
            pass
        names = [*presets(), *lbw.PRESETS]
        if not any(n.upper() == body.upper() for n in names):
            raise WorkbenchError(f"block weights: {body!r} is neither a number nor a known preset"
                                 f"{_hint(body.upper(), names)}; presets: {', '.join(names)}")
        return
    parts = [p.strip() for p in body.split(",")]
    for n, part in enumerate(parts):
        _number(part, f"value {n + 1}")
    if len(parts) not in LIST_LENGTHS:
        raise WorkbenchError(
            f"block weights: {len(parts)} values; expected 26 for SD1.5/SD2 (BASE, IN00-IN11, M00, "
            "OUT00-OUT11), 20 for SDXL (BASE, IN00-IN08, M00, OUT00-OUT08), one per block for SD3/FLUX "
            "(or a mapping such as {BASE: 0, D00: 1}), or a LoRA Block Weight list of 17 (SD1.5), "
            "12 (SDXL) or 61 (FLUX) values")
