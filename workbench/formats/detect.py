"""Architecture detection from a safetensors header: key names, shapes and metadata only.

Detection never reads tensor data, so it is instant even on 24 GB files and works on files whose
data section is damaged (exception: a bitsandbytes 4-bit file's logical shapes are in small JSON
tensors, read by `formats.nf4_file`). GGUF files are read through the same tables: their tensor
names are the checkpoint's and their shapes the logical ones (`formats.gguf_file`). The decision tables below are facts about published layouts (SD1.5 / SD2 /
SDXL LDM-SGM single files, SAI/ComfyUI SD3 files, BFL and ComfyUI FLUX files, diffusers component
files, kohya and diffusers/PEFT LoRAs); the block tables are in workbench/formats/blocks.py and the
LoRA module names in workbench/formats/lora_keys.py.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from workbench.arch import ARCHS as RECORDS, BY_ID, DIT_IDS, IDS
from workbench.errors import UnknownModelError
from workbench.formats.lora_detect import detect_lora, is_lora
from workbench.formats.model_file import read_model_header
from workbench.formats.model_info import ModelInfo
from workbench.formats.safetensors_io import SafetensorsHeader

ARCHS = IDS  # workbench/arch.py
Shapes = Mapping[str, "tuple[int, ...] | None"]


# ---- key groups -------------------------------------------------------------------------------
DIFFUSION_PREFIX = "model.diffusion_model."
TE_PREFIXES = ("cond_stage_model.", "conditioner.embedders.0.", "conditioner.embedders.1.",
               "text_encoders.clip_l.", "text_encoders.clip_g.", "text_encoders.t5xxl.")
VAE_PREFIXES = ("first_stage_model.", "vae.")
EXTRA_PREFIXES = ("model_ema.", "model.model_sampling.", "edm_vpred.", "betas", "alphas_cumprod",
                  "alphas_cumprod_prev", "sqrt_", "log_one_minus", "posterior_", "v_pred", "ztsnr",
                  "logvar", "conditioner.embedders.2.", "conditioner.embedders.3.")
DIFFUSION_ROOTS = {
    # LDM / SGM UNet
    "input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out",
    # BFL FLUX
    "double_blocks", "single_blocks", "img_in", "txt_in", "time_in", "vector_in", "guidance_in",
    "final_layer", "distilled_guidance_layer",
    # SAI MMDiT (SD3)
    "joint_blocks", "pos_embed", "x_embedder", "context_embedder", "y_embedder", "t_embedder",
    # diffusers UNet2DConditionModel / transformers
    "conv_in", "time_embedding", "down_blocks", "mid_block", "up_blocks", "conv_norm_out",
    "conv_out", "add_embedding", "transformer_blocks", "single_transformer_blocks",
    "time_text_embed", "norm_out", "proj_out",
}
TE_ROOTS = {"text_model", "transformer", "token_embedding", "positional_embedding", "ln_final",
            "text_projection", "logit_scale", "shared", "embeddings", "final_layer_norm"}
VAE_ROOTS = {"encoder", "decoder", "quant_conv", "post_quant_conv"}

# arch -> {text encoder name: pipeline role}, from the records in workbench/arch.py
TE_ROLE = {a.id: {t.model: t.component for t in a.text_encoders} for a in RECORDS}
# text encoder name -> (archs it serves, the arch a lone file of it is taken for)
TE_DEFAULT = {"clip_l": "sd15", "clip_h": "sd2", "clip_g": "sdxl", "t5xxl": "flux"}
TE_FAMILY = {te: (tuple(a for a in ARCHS if te in TE_ROLE[a]), default) for te, default in TE_DEFAULT.items()}
CLIP_WIDTH = {768: "clip_l", 1024: "clip_h", 1280: "clip_g"}
CLIP_LAYERS = {12: "clip_l", 23: "clip_h", 24: "clip_h", 32: "clip_g"}
PREFIX_TE = {"text_encoders.clip_l.": "clip_l", "text_encoders.clip_g.": "clip_g",
             "text_encoders.t5xxl.": "t5xxl", "conditioner.embedders.1.": "clip_g"}
CROSS_ATTN_WIDTH = {768: "sd15", 1024: "sd2", 2048: "sdxl", 1280: "sdxl"}  # 1280: SDXL refiner
EXPECTED = ("expected a SD1.5/SD2/SDXL/SD3/FLUX single-file checkpoint, a diffusion model "
            "(UNet/transformer, LDM, BFL, ComfyUI or diffusers keys), a VAE, a text encoder "
            "(CLIP-L/G/H, T5-XXL) or a LoRA (kohya, LyCORIS, diffusers/PEFT)")


def detect(source: str | Path | SafetensorsHeader | Shapes, name: str | None = None) -> ModelInfo:
    """Detect what a safetensors or GGUF file is from its header alone.

    `source` is a path (only the header is read; GGUF and bitsandbytes 4-bit files give their
    weights' logical shapes, `formats.model_file.read_model_header`), a parsed header, or a mapping
    key -> shape (shape may be None when unknown). Raises UnknownModelError naming the file otherwise.
    """
    metadata: Mapping[str, str] = {}
    if isinstance(source, SafetensorsHeader):
        shapes, metadata, label = source.shapes(), source.metadata, str(source.path)
    elif isinstance(source, Mapping):
        shapes, label = dict(source), name or "<header>"
    else:
        header = read_model_header(source)
        shapes, metadata, label = header.shapes(), header.metadata, str(header.path)
    return detect_keys(shapes, metadata, label)


def detect_keys(shapes: Shapes, metadata: Mapping[str, str], label: str) -> ModelInfo:
    """The decision itself, on key -> shape; `label` names the file in errors and hints."""
    if not shapes:
        raise UnknownModelError(f"{label}: the file holds no tensors; {EXPECTED}")
    if is_lora(shapes):
        return detect_lora(shapes, metadata, label, unknown=_unknown)
    if _is_open_clip_model(shapes):
        return ModelInfo(arch="clip", variant=None, kind="scorer", layout="open_clip",
                         notes=("open_clip image+text model (for CLIP/style scores), not a "
                                "diffusion component",), key_count=len(shapes))
    groups, extras, unknown = _split_groups(shapes)
    diffusion = groups.pop("diffusion", None)
    vae = groups.pop("vae", None)
    tes = [_classify_te(prefix, g) for prefix, g in groups.items()]
    notes: list[str] = []
    if extras:
        notes.append(f"{len(extras)} non-weight/extra keys kept as-is (e.g. {extras[0]})")
    if unknown:
        notes.append(f"{len(unknown)} unrecognised keys (e.g. {', '.join(unknown[:3])})")
    if diffusion is not None:
        return _with_diffusion(diffusion, tes, vae, shapes, notes, label)
    if unknown and not tes and vae is None:
        raise _unknown(label, shapes, "no diffusion model, text encoder or VAE keys found")
    return _component_only(tes, vae, notes, label, len(shapes))


def _is_open_clip_model(shapes: Shapes) -> bool:
    """A whole open_clip CLIP (image tower `visual.*` beside a text tower): a scoring model."""
    keys = set(shapes)
    return any(k.startswith("visual.") for k in keys) and bool(
        keys & {"token_embedding.weight", "text.token_embedding.weight", "logit_scale"})


def _unknown(label: str, shapes: Shapes, why: str) -> UnknownModelError:
    keys = sorted(shapes)
    step = max(1, len(keys) // 5)
    examples = ", ".join(repr(k) for k in keys[::step][:5])
    return UnknownModelError(f"{label}: unknown model layout ({why}); {len(keys)} tensors, e.g. "
                             f"{examples}; {EXPECTED}")


def _split_groups(shapes: Shapes) -> tuple[dict[str, dict], list[str], list[str]]:
    """Partition keys into diffusion / one group per text encoder / vae, extras and unknowns."""
    groups: dict[str, dict] = {}
    extras: list[str] = []
    unknown: list[str] = []
    bare_is_t5 = any(k.startswith("encoder.block.") for k in shapes) or "shared.weight" in shapes
    for key, shape in shapes.items():
        if key.startswith(DIFFUSION_PREFIX):
            groups.setdefault("diffusion", {})["+" + key[len(DIFFUSION_PREFIX):]] = shape
            continue
        te = next((p for p in TE_PREFIXES if key.startswith(p)), None)
        if te:
            groups.setdefault(te, {})[key[len(te):]] = shape
            continue
        vae = next((p for p in VAE_PREFIXES if key.startswith(p)), None)
        if vae:
            groups.setdefault("vae", {})[key[len(vae):]] = shape
            continue
        if key.startswith(EXTRA_PREFIXES):
            extras.append(key)
            continue
        root = key.split(".", 1)[0]
        if root in VAE_ROOTS and not bare_is_t5:
            groups.setdefault("vae", {})["." + key] = shape
        elif root in TE_ROOTS or (root == "encoder" and bare_is_t5):
            groups.setdefault("te:bare", {})[key] = shape
        elif root in DIFFUSION_ROOTS:
            groups.setdefault("diffusion", {})[key] = shape
        else:
            unknown.append(key)
    return groups, extras, unknown


# ---- diffusion models -------------------------------------------------------------------------
def _blocks(keys, root: str) -> set[int]:
    pat = re.compile(re.escape(root) + r"\.(\d+)\.")
    return {int(m.group(1)) for k in keys if (m := pat.match(k))}


def _dim(shapes: Shapes, key: str, axis: int) -> int | None:
    shape = shapes.get(key)
    return shape[axis] if shape is not None and len(shape) > axis else None


def _classify_diffusion(d: dict) -> tuple[str, str | None, str, list[str]] | None:
    """(arch, variant, style, notes) of a diffusion-model key group (style: bfl/sai/ldm/diffusers)."""
    keys = {k.lstrip("+") for k in d}
    sh = {k.lstrip("+"): v for k, v in d.items()}
    roots = {k.split(".", 1)[0] for k in keys}
    notes: list[str] = []
    if roots & {"double_blocks", "single_blocks"}:
        n_d, n_s = len(_blocks(keys, "double_blocks")), len(_blocks(keys, "single_blocks"))
        if "guidance_in" in roots:
            variant = "dev"
        elif "vector_in" in roots:
            variant = "schnell"
        else:
            variant = None
            notes.append("FLUX-like transformer without guidance_in/vector_in (e.g. a distilled "
                         "derivative): variant unknown")
        in_ch = _dim(sh, "img_in.weight", 1)
        if in_ch not in (None, 64):
            notes.append(f"img_in takes {in_ch} channels (64 for text-to-image; Fill/Depth/Canny "
                         "models differ)")
        if (n_d, n_s) != (19, 38):
            notes.append(f"{n_d} double and {n_s} single blocks (FLUX.1 has 19 and 38)")
        return "flux", variant, "bfl", notes
    if "joint_blocks" in roots:
        n = len(_blocks(keys, "joint_blocks"))
        x_attn2 = any(".x_block.attn2." in k for k in keys)
        return ("sd3", _sd3_variant(n, x_attn2, notes), "sai", notes)
    if "single_transformer_blocks" in roots:
        variant = "dev" if any(k.startswith("time_text_embed.guidance_embedder.") for k in keys) \
            else "schnell"
        return "flux", variant, "diffusers", notes
    if "transformer_blocks" in roots and "pos_embed" in roots:
        n = len(_blocks(keys, "transformer_blocks"))
        attn2 = any(re.match(r"transformer_blocks\.\d+\.attn2\.", k) for k in keys)
        return "sd3", _sd3_variant(n, attn2, notes), "diffusers", notes
    if "input_blocks" in roots:
        return _classify_unet(keys, sh, "label_emb" in roots, "input_blocks.0.0.weight", "ldm")
    if "down_blocks" in roots and "up_blocks" in roots:
        return _classify_unet(keys, sh, "add_embedding" in roots, "conv_in.weight", "diffusers")
    return None


def _sd3_variant(n: int, attn2: bool, notes: list[str]) -> str | None:
    if n == 38:
        return "sd3.5-large"
    if n == 24:
        return "sd3.5-medium" if attn2 else "sd3-medium"
    notes.append(f"{n} joint blocks (SD3 medium / SD3.5 medium have 24, SD3.5 large 38)")
    return None


def _classify_unet(keys: set[str], sh: dict, has_adm: bool, conv_in: str, style: str):
    notes: list[str] = []
    widths = Counter(s[1] for k, s in sh.items()
                     if s is not None and len(s) == 2 and k.endswith("attn2.to_k.weight"))
    ctx = widths.most_common(1)[0][0] if widths else None
    arch = CROSS_ATTN_WIDTH.get(ctx) if ctx else None
    if arch is None:  # names only (or tiny widths): SDXL has label_emb; SD1 vs SD2 needs the TE
        arch = "sdxl" if has_adm else "sd15"
        if not has_adm:
            notes.append("cross-attention width unknown: SD1 vs SD2 decided by the text encoder")
        if ctx:
            notes.append(f"non-standard cross-attention width {ctx} (a tiny or modified model)")
    in_ch = _dim(sh, conv_in, 1)
    variant = None
    if arch == "sdxl":
        refiner = ctx == 1280 or (ctx not in CROSS_ATTN_WIDTH and "input_blocks.9.0.op.weight"
                                  not in keys and len(_blocks(keys, "input_blocks")) == 12)
        variant = "sdxl-refiner" if refiner else "sdxl-base"
        if ctx == 1280:
            notes.append("SDXL refiner: not supported for merging or generation (detected only)")
    if in_ch in (9, 8, 5):
        kind = {9: "inpainting", 8: "instruct-pix2pix", 5: "depth"}[in_ch]
        variant = f"{arch}-{kind}"
        notes.append(f"{in_ch}-channel conv_in ({kind} model)")
    return arch, variant, style, notes


# ---- text encoders and VAEs ---------------------------------------------------------------------
def _classify_te(prefix: str, g: dict) -> tuple[str, str] | None:
    """(name, prefix) with name clip_l/clip_h/clip_g/t5xxl, or None; handles HF, OpenCLIP and old
    NAI names (`cond_stage_model.transformer.encoder.*` without `text_model.`)."""
    sh = {}
    for k, v in g.items():
        for wrap in ("transformer.text_model.", "transformer.", "model.", "text_model."):
            if k.startswith(wrap) and not k.startswith("transformer.resblocks."):
                k = k[len(wrap):]
                break
        sh[k] = v
    keys = set(sh)
    if any(k.startswith("encoder.block.") for k in keys):
        return ("t5xxl", prefix)  # the only T5 these architectures use (tiny tests shrink it)
    if any(k.startswith("encoder.layers.") for k in keys):  # HF CLIPTextModel (and NAI's old keys)
        width = _dim(sh, "final_layer_norm.weight", 0) or _dim(
            sh, "embeddings.token_embedding.weight", 1)
        layers = len(_blocks(keys, "encoder.layers"))
        style = "hf"
    elif any(k.startswith("transformer.resblocks.") for k in keys):  # OpenCLIP
        width = _dim(sh, "ln_final.weight", 0) or _dim(sh, "token_embedding.weight", 1)
        layers = len(_blocks(keys, "transformer.resblocks"))
        style = "openclip"
    else:
        return None
    name = CLIP_WIDTH.get(width) if width else None
    # Tiny test models keep the real names but shrink widths: fall back to where the encoder sits.
    name = name or PREFIX_TE.get(prefix) or CLIP_LAYERS.get(layers)
    if name is None and prefix in ("cond_stage_model.", "conditioner.embedders.0."):
        name = "clip_l" if style == "hf" else ("clip_h" if prefix == "cond_stage_model." else
                                               "clip_g")
    return (name, prefix) if name else None


def _classify_vae(g: dict) -> tuple[int | None, str]:
    """(latent channels, style 'ldm'|'diffusers') of a VAE group."""
    sh = {k.lstrip("."): v for k, v in g.items()}
    z = _dim(sh, "decoder.conv_in.weight", 1)
    if z is None:
        z = 4 if "post_quant_conv.weight" in sh else (16 if sh else None)
    style = "diffusers" if any(k.startswith("encoder.down_blocks.") for k in sh) else "ldm"
    return z, style


def _name_hint(label: str) -> str | None:
    name = Path(label).name.lower()
    if name in ("ae.safetensors", "ae.sft") or "flux" in name:
        return "flux"
    if re.search(r"sd3|sd_3|sd35|sd3\.5", name):
        return "sd3"
    if "xl" in name:
        return "sdxl"
    if re.search(r"sd2|v2-|sd_2", name):
        return "sd2"
    return None


def _with_diffusion(diffusion, tes, vae, shapes, notes, label) -> ModelInfo:
    found = _classify_diffusion(diffusion)
    if found is None:
        raise _unknown(label, shapes, "diffusion-model keys match no known architecture")
    arch, variant, style, dnotes = found
    notes = dnotes + notes
    te_names = [t[0] for t in tes if t]
    if arch == "sd15" and "clip_h" in te_names:
        arch = "sd2"
    if "clip_h" in te_names or "clip_l" in te_names:
        notes = [n for n in notes if not n.startswith("cross-attention width unknown")]
    if any(t is None for t in tes):
        notes.append("a text-encoder group has an unknown layout")
    roles = TE_ROLE[arch]
    components = {"unet"}
    for name in te_names:
        if name in roles:
            components.add(roles[name])
        else:
            notes.append(f"text encoder {name} does not belong to {arch}")
    prefixed = any(k.startswith("+") for k in diffusion)
    if vae is not None:
        z, _ = _classify_vae(vae)
        want = BY_ID[arch].latent_channels
        if z is not None and z != want:
            notes.append(f"VAE has {z} latent channels ({arch} uses {want})")
        components.add("vae")
    dit = arch in DIT_IDS
    kind = "checkpoint" if len(components) > 1 else ("transformer" if dit else "unet")
    if kind == "checkpoint":
        expected = {"unet", "vae", *roles.values()}
        if variant == "sdxl-refiner":  # the refiner has only the OpenCLIP-G encoder
            expected.discard("text_encoder")
        missing = sorted(expected - components)
        if missing:
            notes.append("not in the file: " + ", ".join(missing))
    if style == "diffusers":
        layout = "diffusers"
    elif arch in ("sd15", "sd2"):
        layout = "ldm"
    elif arch == "sdxl":
        layout = "sgm"
    elif prefixed:
        layout = "comfyui"
    else:
        layout = "bfl" if arch == "flux" else "sgm"
    return ModelInfo(arch, variant, kind, layout, frozenset(components), notes=tuple(notes),
                     archs=frozenset({arch}), key_count=len(shapes))


def _component_only(tes, vae, notes, label, n_keys) -> ModelInfo:
    hint = _name_hint(label)
    known = [t for t in tes if t]
    if vae is not None and not known:
        z, style = _classify_vae(vae)
        archs = tuple(a.id for a in RECORDS if a.latent_channels == z)
        if not archs:
            raise UnknownModelError(f"{label}: VAE with {z} latent channels; expected 4 (SD1/SD2/"
                                    "SDXL) or 16 (SD3/FLUX)")
        arch = hint if hint in archs else archs[0]
        notes.append(f"{z}-channel VAE: the same layout serves {', '.join(archs)}; "
                     f"{arch} chosen {'from the file name' if hint in archs else 'by default'}")
        prefixed = not any(k.startswith(".") for k in vae)
        layout = ("diffusers" if style == "diffusers" else "comfyui" if prefixed and arch == "flux"
                  else "bfl" if arch == "flux" else "sgm" if arch == "sdxl" and prefixed else "ldm")
        return ModelInfo(arch, None, "vae", layout, frozenset({"vae"}), notes=tuple(notes),
                         archs=frozenset(archs), key_count=n_keys)
    if not known:
        raise UnknownModelError(f"{label}: text-encoder-like keys in an unknown layout; {EXPECTED}")
    names = [t[0] for t in known]
    archs = set(ARCHS)
    for name in names:
        archs &= set(TE_FAMILY.get(name, ((),))[0])
    if not archs:
        raise UnknownModelError(f"{label}: text encoders {names} do not belong to one architecture")
    ordered = [a for a in ARCHS if a in archs]
    default = TE_FAMILY[names[0]][1]
    arch = hint if hint in archs else (default if default in archs else ordered[0])
    if len(ordered) > 1:
        notes.append(f"{'/'.join(names)} serves {', '.join(ordered)}; {arch} chosen "
                     f"{'from the file name' if hint in archs else 'by default'}")
    components = {TE_ROLE[arch][n] for n in names if n in TE_ROLE[arch]}
    kind = "text_encoder"
    if vae is not None:
        kind = "checkpoint"
        components.add("vae")
        notes.append("no diffusion model in the file (text encoder and VAE only)")
    prefix = known[0][1]
    layout = ("comfyui" if prefix.startswith("text_encoders.") else "ldm" if prefix.startswith(
        "cond_stage_model.") else "sgm" if prefix.startswith("conditioner.") else "diffusers")
    return ModelInfo(arch, names[0] if len(names) == 1 else None, kind, layout,
                     frozenset(components), notes=tuple(notes), archs=frozenset(ordered),
                     key_count=n_keys)
