"""LoRA Block Weight strings (the A1111/Forge "LoRA Block Weight" extension) in our block ids.

Why: users copy `<lora:style:1:INS>` or a 17-value list from the extension; a bake (`add_lora` with
`blocks:`) and a generation-time LoRA (`loras:` entries) take the same text and must mean what the
extension means. Facts below are from hako-mikan/sd-webui-lora-block-weight, scripts/
lora_block_weight.py at commit b403cb73 (2025-06-19): the id lists BLOCKID17/12/20/26 and
BLOCKIDFLUX, the default presets (DEF_WEIGHT_PRESET), and `to26`, which gives every block a list
does not name the weight 0 (the 17-value form leaves out the blocks without attention layers: IN00,
IN03, IN06, IN09-IN11, OUT00-OUT02 of SD1.5; a plain LoRA has no module there, a LoCon/conv LoRA has).

Presets are 17-value lists; on SDXL the extension applies them by block id as well (BLOCKID17 ->
26 ids -> the SDXL blocks with those numbers), so OUT00-OUT02, which hold attention in SDXL, get 0
from e.g. ALL. We do the same so a preset means the same thing here and in Forge; SDXL users write
12 values (BASE, IN04, IN05, IN07, IN08, M00, OUT00-OUT05) or 20 (every SDXL block).

BASE is every text encoder (workbench/formats/blocks.py). FLUX's 61-value form has separate CLIP and
T5 weights; both are BASE here, so they must be equal.
"""

from __future__ import annotations

import re

from workbench.arch import ARCHS, BY_ID
from workbench.errors import WorkbenchError

BLOCKID26 = ["BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12))]
BLOCKID17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
             *(f"OUT{i:02d}" for i in range(3, 12))]
BLOCKID12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(6))]
BLOCKID20 = ["BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9))]
BLOCKID_FLUX = ["CLIP", "T5", "IN", *(f"D{i:02d}" for i in range(19)), *(f"S{i:02d}" for i in range(38)),
                "OUT"]
LISTS = {17: BLOCKID17, 12: BLOCKID12, 20: BLOCKID20, 26: BLOCKID26, 61: BLOCKID_FLUX}
# which list lengths each architecture takes (the extension's "17(1.X/2.X)", "12(XL)", ...)
LENGTHS = {a.id: a.lbw_lengths for a in ARCHS if a.lbw_lengths}  # workbench/arch.py

PRESETS: dict[str, list[float]] = {
    "NONE": [0.0] * 17,
    "ALL": [1.0] * 17,
    "INS": [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    "IND": [1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    "INALL": [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    "MIDD": [1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    "OUTD": [1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    "OUTS": [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
    "OUTALL": [1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    "ALL0.5": [0.5] * 17,
    "FLUXALL": [1.0] * 61,
}
_PREFIX = re.compile(r"^\s*(lbw|w)\s*=\s*", re.IGNORECASE)


def strip_prefix(text: str) -> str:
    """`lbw=INS` / `w=1,0,...` (the extension's prompt syntax) -> `INS` / `1,0,...`."""
    return _PREFIX.sub("", text.strip())


def preset(name: str) -> list[float] | None:
    """A preset's values (case-insensitive name), or None."""
    return next((list(map(float, v)) for k, v in PRESETS.items() if k.upper() == name.strip().upper()),
                None)


def looks_like_lbw(text: str) -> bool:
    """Whether `text` has the form of an LBW value: a preset name or 12/17/20/26/61 numbers."""
    body = strip_prefix(text)
    if preset(body) is not None:
        return True
    parts = [p.strip() for p in body.split(",")]
    if len(parts) not in LISTS:
        return False
    try:
        [float(p) for p in parts]
    except ValueError:
        return False
    return True


def values(arch: str, text_or_list, ids: list[str]) -> dict[str, float] | None:
    """{block id of `ids`: weight} for an LBW value on `arch`; None when it is not in LBW form
    (a supermerger-style list or preset: workbench/formats/blocks.py handles those).

    `ids` are the architecture's block ids (blocks.BLOCK_IDS[arch] or the ones present in a file).
    """
    if isinstance(text_or_list, str):
        body = strip_prefix(text_or_list)
        nums = preset(body)
        if nums is None:
            if "," not in body:
                return None
            try:
                nums = [float(p) for p in body.split(",")]
            except ValueError:
                return None
    elif isinstance(text_or_list, (list, tuple)):
        try:
            nums = [float(v) for v in text_or_list]
        except (TypeError, ValueError):
            return None
    else:
        return None
    if len(nums) not in LISTS or len(nums) not in LENGTHS.get(arch, ()):
        if arch in LENGTHS and len(nums) in (12, 17, 61):
            want = " or ".join(str(n) for n in LENGTHS[arch])
            raise WorkbenchError(f"LoRA block weights: {len(nums)} values are the LoRA Block Weight "
                                 f"form for {_FOR[len(nums)]}; a {arch} LoRA takes {want} values "
                                 f"({', '.join(LISTS[LENGTHS[arch][0]])})")
        return None
    named = dict(zip(LISTS[len(nums)], nums))
    if len(nums) == 61:
        if named["CLIP"] != named["T5"]:
            raise WorkbenchError("LoRA block weights: the FLUX list gives CLIP "
                                 f"{named['CLIP']:g} and T5 {named['T5']:g}; both are the BASE "
                                 "block here, so give them the same value")
        named["BASE"] = named.pop("CLIP")
        named.pop("T5")
    return {i: float(named.get(i, 0.0)) for i in ids}


_FOR = {17: "SD1.5/SD2 (BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03-OUT11)",
        12: "SDXL (BASE, IN04, IN05, IN07, IN08, M00, OUT00-OUT05)",
        61: "FLUX (CLIP, T5, IN, D00-D18, S00-S37, OUT)"}


# ------------------------------------------------------------------ diffusers module -> block id

_SD = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(attentions|resnets|downsamplers|upsamplers)\.(\d+)\.")
_DIT = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.")
LAYERS_PER_BLOCK = 2  # SD1.5, SD2 and SDXL: 2 ResBlocks per level, so 3 LDM slots per level


def diffusers_block(arch: str, component: str, path: str) -> str | None:
    """The block id of one layer of a loaded diffusers pipeline (`component` "unet",
    "transformer" or a text encoder; `path` its module path inside that component).

    The inverse of the LDM slot arithmetic in workbench/formats/lora_keys.py
    (`ldm_unet_to_diffusers`): input_blocks.{3b+j+1} = down_blocks.b.{resnets,attentions}.j,
    input_blocks.{3b+3} = down_blocks.b.downsamplers, output_blocks.{3b+j} = up_blocks.b.*.j,
    the upsampler of up_blocks.b sits in output_blocks.{3b+2}. None: outside every block.
    """
    if component not in ("unet", "transformer"):
        return "BASE"
    step = LAYERS_PER_BLOCK + 1
    if BY_ID[arch].family == "unet":
        if path.startswith("mid_block."):
            return "M00"
        m = _SD.match(path)
        if m:
            side, b, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
            if side == "down_blocks":
                n = step * b + (LAYERS_PER_BLOCK if kind == "downsamplers" else j) + 1
                return f"IN{n:02d}"
            n = step * b + (LAYERS_PER_BLOCK if kind == "upsamplers" else j)
            return f"OUT{n:02d}"
        if path.startswith(("conv_in", "time_embedding", "add_embedding")):
            return "IN00"
        if path.startswith(("conv_norm_out", "conv_out")):
            return BY_ID[arch].block_ids[-1]  # the last OUT block (OUT11 / OUT08)
        return None
    m = _DIT.match(path)
    if m:
        n = int(m.group(2))
        if arch == "flux":
            return f"{'D' if m.group(1) == 'transformer_blocks' else 'S'}{n:02d}"
        return f"J{n:02d}"
    if path.startswith(("x_embedder", "context_embedder", "time_text_embed", "pos_embed")):
        return "IN"
    if path.startswith(("norm_out", "proj_out")):
        return "OUT"
    return None
