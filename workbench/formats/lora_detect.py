"""LoRA detection from header keys: format (kohya / LyCORIS / diffusers / PEFT), architecture, rank.

The architecture of a LoRA is decided from its module names (FLUX `double_blocks`, SD3
`joint_blocks`, SDXL `lora_te1_`/`lora_te2_`, transformer depth > 1) and, where names are shared,
from tensor shapes: the input width of a cross-attention `to_k` is the text-encoder width
(768 SD1.5, 1024 SD2, 2048 SDXL) and the hidden width of a DiT separates FLUX (3072) from SD3.
Text-encoder-only LoRAs are placed by their encoders' widths (`_text_encoder_only`); what the
widths leave open is listed in `ModelInfo.archs` (a CLIP-L-only LoRA fits four families).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping

from workbench.formats.model_info import ModelInfo

# weight suffix -> (lora_format, role); "down" tensors give the rank (dim 0) and input width (dim 1)
SUFFIXES = {
    ".lora_down.weight": ("lora", "down"), ".lora_up.weight": ("lora", "up"),
    ".lora_mid.weight": ("lora", ""), ".alpha": ("", ""), ".dora_scale": ("", ""),
    ".lora_magnitude_vector": ("", ""), ".lora_magnitude_vector.weight": ("", ""),
    ".lora_A.weight": ("lora", "down"), ".lora_B.weight": ("lora", "up"),
    ".lora.down.weight": ("lora", "down"), ".lora.up.weight": ("lora", "up"),
    "_lora.down.weight": ("lora", "down"), "_lora.up.weight": ("lora", "up"),
    ".hada_w1_a": ("loha", ""), ".hada_w1_b": ("loha", "down"), ".hada_w2_a": ("loha", ""),
    ".hada_w2_b": ("loha", ""), ".hada_t1": ("loha", ""), ".hada_t2": ("loha", ""),
    ".lokr_w1": ("lokr", ""), ".lokr_w1_a": ("lokr", ""), ".lokr_w1_b": ("lokr", ""),
    ".lokr_w2": ("lokr", ""), ".lokr_w2_a": ("lokr", ""), ".lokr_w2_b": ("lokr", "down"),
    ".lokr_t2": ("lokr", ""), ".diff": ("full", ""), ".diff_b": ("full", ""),
    ".oft_blocks": ("oft", ""), ".oft_diag": ("oft", ""),
}
# Longest first so ".lora_down.weight" wins over shorter overlapping suffixes.
_ORDERED = sorted(SUFFIXES, key=len, reverse=True)
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_",
                  "lora_transformer_", "lycoris_")
CROSS_WIDTH = {768: "sd15", 1024: "sd2", 2048: "sdxl"}


def split_suffix(key: str) -> tuple[str, str] | None:
    """(module, suffix) if `key` ends with a known LoRA tensor suffix."""
    for suf in _ORDERED:
        if key.endswith(suf):
            return key[: -len(suf)], suf
    return None


def is_lora(shapes: Mapping) -> bool:
    """True when the keys carry LoRA/LyCORIS suffixes or kohya module prefixes."""
    hits = 0
    for key in shapes:
        sp = split_suffix(key)
        if sp and sp[1] != ".alpha" or key.startswith(KOHYA_PREFIXES):
            hits += 1
    return hits > 0 and hits >= len(shapes) // 2


def detect_lora(shapes: Mapping, metadata: Mapping[str, str], label: str,
                unknown: Callable[..., Exception]):
    """ModelInfo for a LoRA-family file."""
    modules: dict[str, dict[str, tuple | None]] = {}
    formats: Counter = Counter()
    for key, shape in shapes.items():
        sp = split_suffix(key)
        if sp is None:
            continue
        mod, suf = sp
        modules.setdefault(mod, {})[suf] = shape
        if SUFFIXES[suf][0]:
            formats[SUFFIXES[suf][0]] += 1
    if not modules:
        raise unknown(label, shapes, "LoRA-style module names without LoRA weight suffixes")
    kohya = any(m.startswith(KOHYA_PREFIXES) for m in modules)
    names = {_norm(m): tensors for m, tensors in modules.items()}
    te_only = _text_encoder_only(names, metadata)
    if te_only is not None:
        arch, archs, notes = te_only
        variant = None
    else:
        arch, variant, notes = _arch(names, kohya, metadata)
        archs = frozenset({arch})
    if arch is None:
        raise unknown(label, shapes, "LoRA module names match no known architecture")
    if kohya:
        layout = "kohya"
    else:
        layout = "peft" if any(".lora_A.weight" in t for t in modules.values()) else "diffusers"
    lora_format = formats.most_common(1)[0][0] if formats else "lora"
    if len(formats) > 1:
        notes.append("mixed module types: " + ", ".join(sorted(formats)))
    rank, rank_note = _rank(modules)
    if rank_note:
        notes.append(rank_note)
    components = _components(names, arch)
    return ModelInfo(arch, variant, "lora", layout, frozenset(components), lora_format=lora_format,
                     rank=rank, notes=tuple(notes), archs=archs,
                     key_count=len(shapes))


def _norm(module: str) -> str:
    """One spelling for all formats: dots as underscores, PEFT wrapper removed."""
    module = module.removeprefix("base_model.model.")
    return module.replace(".", "_")


def _width(names: Mapping[str, dict], pattern: str) -> int | None:
    """Most common input width (dim 1 of the 'down' tensor) of modules matching `pattern`."""
    rx = re.compile(pattern)
    widths: Counter = Counter()
    for mod, tensors in names.items():
        if not rx.search(mod):
            continue
        for suf, shape in tensors.items():
            if SUFFIXES[suf][1] == "down" and shape is not None and len(shape) >= 2:
                widths[shape[1]] += 1
    return widths.most_common(1)[0][0] if widths else None


def _max_index(names, pattern: str) -> int:
    rx = re.compile(pattern)
    found = [int(m.group(1)) for n in names if (m := rx.search(n))]
    return max(found) if found else -1


def _arch(names: Mapping[str, dict], kohya: bool, metadata: Mapping[str, str]):
    notes: list[str] = []
    has = lambda pat: any(re.search(pat, n) for n in names)  # noqa: E731
    if has(r"double_blocks_\d|single_blocks_\d|single_transformer_blocks_\d"):
        return "flux", None, notes
    if has(r"joint_blocks_\d"):
        n = _max_index(names, r"joint_blocks_(\d+)_") + 1
        attn2 = has(r"joint_blocks_\d+_x_block_attn2")
        variant = "sd3.5-large" if n > 24 else ("sd3.5-medium" if attn2 else None)
        return "sd3", variant, notes
    if has(r"(^|_)transformer_transformer_blocks_\d|^lora_transformer_transformer_blocks_\d"):
        hidden = _width(names, r"transformer_blocks_\d+_attn_to_q$")
        if hidden == 3072:
            return "flux", None, notes
        hint = _metadata_arch(metadata)  # widths of neither model (e.g. tiny test models)
        if hidden in (1536, 2432) or has(r"transformer_blocks_\d+_attn2_") or hint == "sd3":
            n = _max_index(names, r"transformer_blocks_(\d+)_") + 1
            variant = "sd3.5-large" if hidden == 2432 or n > 24 else None
            return "sd3", variant, notes
        return ("flux" if hint == "flux" else None), None, notes
    if has(r"^(lora_te3_|text_encoder_3_)"):  # T5: SD3 has CLIP-G (te2) too, FLUX does not
        return ("sd3" if has(r"^(lora_te2_|text_encoder_2_)") else "flux"), None, notes
    # U-Net LoRAs (SD1.5 / SD2 / SDXL), kohya LDM or diffusers names, any prefix
    ctx = _width(names, r"attn2_(processor_)?to_k$")
    if ctx in CROSS_WIDTH:
        return CROSS_WIDTH[ctx], None, notes
    if has(r"^(lora_te2_|text_encoder_2_)") or has(r"transformer_blocks_[1-9]"):
        return "sdxl", None, notes
    if has(r"input_blocks_(9|10|11)_|output_blocks_(9|10|11)_|down_blocks_0_attentions"):
        te_w = _width(names, r"^(lora_te1?_|text_encoder_).*q_proj$")
        return ("sd2" if te_w == 1024 else "sd15"), None, notes
    base = metadata.get("ss_base_model_version", "")
    if base.startswith("sdxl"):
        return "sdxl", None, notes
    if base.startswith("sd_v1"):
        return "sd15", None, notes
    return None, None, notes


_TE_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoder_")
_T5 = re.compile(r"(encoder_block_\d+_layer|SelfAttention|DenseReluDense)")
_FAMILY_HINTS = (("sdxl", "sdxl"), ("stable-diffusion-xl", "sdxl"), ("flux", "flux"),
                 ("stable-diffusion-3", "sd3"), ("sd3", "sd3"), ("sd_v2", "sd2"), ("sd_v1", "sd15"),
                 ("stable-diffusion-v1", "sd15"))


def _metadata_arch(metadata: Mapping[str, str]) -> str | None:
    """The family the trainer wrote (kohya `ss_base_model_version`, SAI `modelspec.architecture`)."""
    for key in ("modelspec.architecture", "ss_base_model_version"):
        value = str(metadata.get(key, "")).lower()
        for hint, arch in _FAMILY_HINTS:
            if value.startswith(hint):
                return arch
    return None


def _text_encoder_only(names: Mapping[str, dict], metadata: Mapping[str, str]):
    """(arch, archs, notes) for a LoRA with text-encoder modules only, from the encoders' widths;
    None when the file also changes the diffusion model.

    Widths: CLIP-L 768 (te1 of SD1.5, SDXL, SD3, FLUX), OpenCLIP-H 1024 (SD2), CLIP-G 1280 (te2 of
    SDXL and SD3), T5 (FLUX `lora_te3_`/diffusers `text_encoder_2`, SD3 `lora_te3_`) by its module
    names. What the widths cannot separate (CLIP-L alone; CLIP-L + CLIP-G without T5 is SDXL or SD3)
    stays open in `archs`, the trainer's metadata picks `arch` when it has a family, else the oldest.
    """
    if not names or not all(n.startswith(_TE_PREFIXES) for n in names):
        return None
    t5 = {n for n in names if _T5.search(n)}
    clip = [n for n in names if n not in t5]
    g = [n for n in clip if n.startswith(("lora_te2_", "text_encoder_2_"))]
    l_names = [n for n in clip if n not in g and not n.startswith(("lora_te3_", "text_encoder_3_"))]
    width = _width({n: names[n] for n in l_names}, r"q_proj$") if l_names else None
    layers = _max_index(l_names, r"encoder_layers_(\d+)_") + 1
    hint = _metadata_arch(metadata)
    notes: list[str] = []
    if t5:
        archs = {"sd3"} if g else {"flux"}
    elif g:
        archs = {"sdxl", "sd3"}
    elif width == 1024 or layers > 12:
        archs = {"sd2"}
    elif all(n.startswith("lora_te_") for n in l_names):
        archs = {"sd15"}  # `lora_te_` is the SD1.x name; SDXL/SD3/FLUX loaders map `lora_te1_`
    else:
        archs = {"sd15", "sdxl", "sd3", "flux"}
    if len(archs) == 1:
        arch = next(iter(archs))
    else:
        arch = hint if hint in archs else ("sdxl" if "sdxl" in archs and g else "sd15")
        notes.append(f"text-encoder-only LoRA: its encoder widths fit {', '.join(sorted(archs))}; "
                     f"{arch} assumed" + (" (from its metadata)" if hint == arch else ""))
    return arch, frozenset(archs), notes


def _rank(modules: Mapping[str, dict]) -> tuple[int | None, str | None]:
    ranks: Counter = Counter()
    for tensors in modules.values():
        for suf, shape in tensors.items():
            if SUFFIXES[suf][1] == "down" and shape:
                ranks[shape[0]] += 1
    if not ranks:
        return None, None
    rank = ranks.most_common(1)[0][0]
    note = None
    if len(ranks) > 1:
        note = "ranks differ between modules: " + ", ".join(str(r) for r in sorted(ranks))
    return rank, note


def _components(names, arch: str) -> set[str]:
    comps: set[str] = set()
    for n in names:
        if n.startswith(("lora_unet_", "unet_", "transformer_", "lora_transformer_",
                         "diffusion_model_", "lycoris_")):
            comps.add("unet")
        elif n.startswith(("lora_te2_", "text_encoder_2_")):
            comps.add("text_encoder_2")
        elif n.startswith(("lora_te3_", "text_encoder_3_")):
            comps.add("text_encoder_2" if arch == "flux" else "text_encoder_3")
        elif n.startswith(("lora_te_", "lora_te1_", "text_encoder_")):
            comps.add("text_encoder")
        else:
            comps.add("unet")
    return comps
