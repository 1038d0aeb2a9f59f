"""LoRA module names <-> single-file checkpoint keys, for SD1.5, SD2, SDXL, SD3 and FLUX.

Why a table built from the checkpoint's own keys: a kohya module name is a module path with every
"." replaced by "_", which cannot be split back unambiguously (`to_q`, `proj_in`, `self_attn`...).
So we go the other way: for every weight of the checkpoint we derive each name a LoRA may use for
it, and look LoRA modules up in that table (the ComfyUI approach). The names are the ones kohya
sd-scripts writes (checked against its own output in tests/helpers/lora_kohya_keys.json) and the
ones diffusers writes and converts (`convert_state_dict_to_kohya`, `load_lora_weights`):

- kohya SD1.5/SD2 UNet: diffusers module paths (`lora_unet_down_blocks_0_attentions_0_...`); kohya
  SDXL UNet: LDM/SGM paths (`lora_unet_input_blocks_4_1_...`); both styles are accepted for both;
- kohya text encoders: HF CLIP paths (`lora_te_`/`lora_te1_text_model_encoder_layers_N_...`); SDXL's
  CLIP-G is OpenCLIP in the checkpoint, so `lora_te2_..._self_attn_{q,k,v}_proj` are ROW SLICES of
  `resblocks.N.attn.in_proj_weight`, `mlp_fc1/fc2` are `mlp.c_fc/c_proj`;
- kohya FLUX/SD3: BFL / SAI-MMDiT paths (`lora_unet_double_blocks_0_img_attn_qkv`), CLIP-L `lora_te1_`,
  CLIP-G `lora_te2_` (SD3), T5 `lora_te3_encoder_block_N_layer_0_SelfAttention_q`;
- diffusers/PEFT: dotted diffusers paths under `unet.`, `text_encoder.`, `text_encoder_2.`,
  `transformer.` (FLUX and SD3: `to_q/to_k/to_v` are row slices of the fused `qkv`/`linear1`), plus
  ComfyUI's `diffusion_model.<original path>` and OneTrainer's `lora_transformer_<diffusers path>`.
  `ModuleTable.diffusers` keeps, per checkpoint key, where that layer lives in a diffusers pipeline
  (used to hand kohya SD3 LoRAs to diffusers, whose SD3 loader reads diffusers names only, and to
  hook the LyCORIS types into a loaded pipeline: workbench/pipeline/loras.py).

A `Target` is one checkpoint weight (or a row slice of it) that one LoRA module changes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from workbench.arch import ARCHS, UNET_IDS
from workbench.formats import dit_keys

Shapes = Mapping[str, tuple[int, ...]]
DIFFUSION_PREFIX = "model.diffusion_model."
SD_UNET_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out.")
DIT_ROOTS = {"flux": ("double_blocks.", "single_blocks.", "img_in.", "txt_in.", "time_in.", "vector_in.",
                      "guidance_in.", "final_layer."),
             "sd3": ("joint_blocks.", "x_embedder.", "context_embedder.", "y_embedder.", "t_embedder.",
                     "final_layer.")}


@dataclass(frozen=True)
class Target:
    """The checkpoint weight a LoRA module changes.

    `rows` = (start, stop, of): the module owns rows [start*n/of, stop*n/of) of a fused weight with
    n rows (q/k/v of OpenCLIP `in_proj_weight` or FLUX `qkv`; FLUX `linear1` is q,k,v,mlp = 1,1,1,4).
    `component`: "unet" (any diffusion model), "te1", "te2", "te3". `default`: kohya trains this
    module at default settings; `conv`: only with conv_dim (ResNet convs/samplers, kohya C3Lier).
    """

    key: str
    shape: tuple[int, ...]
    component: str
    rows: tuple[int, int, int] | None = None
    default: bool = False
    conv_only: bool = False

    @property
    def is_conv(self) -> bool:
        return len(self.shape) == 4

    def row_range(self) -> tuple[int, int]:
        n = self.shape[0]
        if self.rows is None:
            return 0, n
        start, stop, of = self.rows
        return n * start // of, n * stop // of

    @property
    def out_features(self) -> int:
        a, b = self.row_range()
        return b - a

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.shape[2:])

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """The shape of this module's ΔW (the row slice of the checkpoint weight)."""
        return (self.out_features, *self.shape[1:])


# ---------------------------------------------------------------------------------------- SD UNet

UNET_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
            "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
            "input_blocks.0.0": "conv_in", "out.2": "conv_out"}
RESNET = {"in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.3": "conv2",
          "skip_connection": "conv_shortcut"}
ATTN_TARGETS = ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
LAYERS_PER_BLOCK = 2  # SD1.5, SD2 and SDXL all have 2 ResBlocks per level (3 slots per level)


def ldm_unet_to_diffusers(path: str) -> str | None:
    """LDM/SGM UNet module path -> diffusers UNet2DConditionModel module path (None: no such module).

    Slots: input_blocks.{3b+j+1}.{0 resnet | 1 attention}, input_blocks.{3b+3}.0.op = downsampler b;
    output_blocks.{3b+j}.{0 resnet | 1 attention | 1-or-2 `conv` = upsampler b}; middle_block.0/1/2.
    """
    if path in UNET_TOP:
        return UNET_TOP[path]
    parts = path.split(".")
    step = LAYERS_PER_BLOCK + 1
    if parts[0] == "middle_block" and len(parts) > 2:
        slot, rest = int(parts[1]), ".".join(parts[2:])
        if slot == 1:
            return f"mid_block.attentions.0.{rest}"
        return _resnet(f"mid_block.resnets.{slot // 2}", rest)
    if parts[0] not in ("input_blocks", "output_blocks") or len(parts) < 4:
        return None
    n, slot, rest = int(parts[1]), int(parts[2]), ".".join(parts[3:])
    if parts[0] == "input_blocks":
        if n == 0:
            return None
        b, j = divmod(n - 1, step)
        if j == LAYERS_PER_BLOCK:
            return f"down_blocks.{b}.downsamplers.0.conv" if rest == "op" and slot == 0 else None
        if slot == 0:
            return _resnet(f"down_blocks.{b}.resnets.{j}", rest)
        return f"down_blocks.{b}.attentions.{j}.{rest}" if slot == 1 else None
    b, j = divmod(n, step)
    if rest == "conv" and slot in (1, 2):
        return f"up_blocks.{b}.upsamplers.0.conv"
    if slot == 0:
        return _resnet(f"up_blocks.{b}.resnets.{j}", rest)
    return f"up_blocks.{b}.attentions.{j}.{rest}" if slot == 1 else None


def _resnet(head: str, rest: str) -> str | None:
    return f"{head}.{RESNET[rest]}" if rest in RESNET else None


def _sd_unet_kind(diffusers_path: str) -> tuple[bool, bool]:
    """(kohya default target, conv_dim-only target) for a diffusers UNet module path."""
    if ".attentions." in diffusers_path:
        return diffusers_path.endswith(ATTN_TARGETS), False
    conv = (".resnets." in diffusers_path and diffusers_path.rsplit(".", 1)[1] in RESNET.values()) \
        or diffusers_path.endswith(("samplers.0.conv",))
    return False, conv


# ---------------------------------------------------------------------------------- text encoders

CLIP_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                "mlp.fc1", "mlp.fc2")
T5_TARGETS = ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o",
              "DenseReluDense.wi_0", "DenseReluDense.wi_1", "DenseReluDense.wo", "DenseReluDense.wi")
OPEN_CLIP = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


@dataclass(frozen=True)
class Section:
    """One part of a checkpoint: its key prefix, text-encoder family and the names LoRAs give it."""

    prefix: str
    family: str                 # "hf_clip" | "open_clip" | "t5"
    component: str              # "te1" | "te2" | "te3"
    kohya: tuple[str, ...]      # first = what kohya writes
    diffusers: tuple[str, ...]  # first = what diffusers writes


# from the text-encoder records in workbench/arch.py; diffusers/PEFT name a text encoder by its
# pipeline attribute
TE_SECTIONS: dict[str, tuple[Section, ...]] = {
    a.id: tuple(Section(t.prefix, t.layout, t.lora_component, t.kohya, (t.component,)) for t in a.text_encoders)
    for a in ARCHS}
KOHYA_UNET = {a.id: a.kohya_unet_names for a in ARCHS}


def _te_modules(section: Section, path: str) -> list[tuple[str, tuple[int, int, int] | None, bool]]:
    """(HF-style module path, rows, kohya default) for one text-encoder weight path."""
    if section.family == "open_clip":
        m = _RESBLOCK.fullmatch(path)
        if not m:
            return []
        layer, rest = m.groups()
        head = f"text_model.encoder.layers.{layer}."
        if rest == "attn.in_proj_weight":
            return [(head + f"self_attn.{p}_proj", (i, i + 1, 3), True) for i, p in enumerate("qkv")]
        if rest.endswith(".weight") and rest[:-7] in OPEN_CLIP:
            return [(head + OPEN_CLIP[rest[:-7]], None, True)]
        return []
    if not path.endswith(".weight"):
        return []
    module = path[:-7]
    if section.family == "t5":
        return [(module, None, module.startswith("encoder.block.") and module.endswith(T5_TARGETS))]
    if not module.startswith("text_model."):
        module = "text_model." + module  # NAI-era SD1 files without the `text_model.` level
    return [(module, None, ".encoder.layers." in module and module.endswith(CLIP_TARGETS))]


# ------------------------------------------------------------------------------------------- table

def _under(path: str) -> str:
    return path.replace(".", "_")


def _diffusion_prefix(arch: str, shapes: Shapes) -> str | None:
    """"model.diffusion_model." or "" (UNet/transformer-only files with bare keys), None: none."""
    roots = SD_UNET_ROOTS if arch in UNET_IDS else DIT_ROOTS.get(arch, ())
    if any(k.startswith(DIFFUSION_PREFIX) for k in shapes):
        return DIFFUSION_PREFIX
    if any(k.startswith(roots) for k in shapes):
        return ""
    return None


def _flux_diffusers(bare_keys: list[str]) -> dict[str, list[tuple[str, tuple[int, int, int] | None]]]:
    """BFL weight path -> [(diffusers module path, rows)] from dit_keys' FLUX rules."""
    out: dict[str, list] = {}
    for rule in dit_keys.flux_rules_from_original(bare_keys):
        if not rule.original.endswith(".weight") or rule.op == "swap":
            continue
        parts = [p[:-7] for p in rule.parts]
        if rule.op == "copy":
            out[rule.original[:-7]] = [(parts[0], None)]
        elif len(parts) == 3:
            out[rule.original[:-7]] = [(p, (i, i + 1, 3)) for i, p in enumerate(parts)]
        else:  # single_blocks linear1 = q, k, v (hidden rows each), proj_mlp (4 x hidden)
            out[rule.original[:-7]] = [(p, (i, i + 1, 7)) for i, p in enumerate(parts[:3])] + [(parts[3], (3, 7, 7))]
    return out


def _sd3_diffusers(bare_keys: list[str]) -> dict[str, list[tuple[str, tuple[int, int, int] | None]]]:
    """SAI MMDiT weight path -> [(diffusers SD3Transformer2DModel module path, rows)], from
    dit_keys' SD3 table (the facts of diffusers' single-file converter): `joint_blocks.N.x_block.
    attn.qkv` = `transformer_blocks.N.attn.to_q/to_k/to_v` (thirds), `context_block.attn.qkv` =
    `attn.add_q_proj/add_k_proj/add_v_proj`, `x_block.attn.proj` = `attn.to_out.0`, `context_block.
    attn.proj` = `attn.to_add_out`, `mlp.fc1/fc2` = `ff(_context).net.0.proj/net.2`, adaLN =
    `norm1(_context).linear`; SD3.5 medium `attn2` likewise. Weights stored with swapped halves
    (the last context block's adaLN, final_layer) are marked SWAPPED: their diffusers layer holds
    the two row halves in the other order, which no single row range expresses, so they are kept out
    of the name lookup and only used to place a kohya module's change (`ModuleTable.diffusers`)."""
    keys = set(bare_keys)
    fake: set[str] = set()
    for i in dit_keys._block_ids(keys, "joint_blocks"):
        x = f"joint_blocks.{i}.x_block."
        fake.add(f"transformer_blocks.{i}.x")
        if x + "attn.ln_q.weight" in keys:
            fake.add(f"transformer_blocks.{i}.attn.norm_q.weight")
        if x + "attn2.qkv.weight" in keys:
            fake.add(f"transformer_blocks.{i}.attn2.to_q.weight")
            if x + "attn2.ln_q.weight" in keys:
                fake.add(f"transformer_blocks.{i}.attn2.norm_q.weight")
    out: dict[str, list] = {}
    if not fake:
        return out
    for rule in dit_keys.sd3_rules(fake):
        if not rule.original.endswith(".weight") or len(rule.parts) not in (1, 3):
            continue
        parts = [p[:-7] for p in rule.parts]
        if rule.op == "swap":
            out[rule.original[:-7]] = [(parts[0], SWAPPED)]
        elif rule.op == "copy":
            out[rule.original[:-7]] = [(parts[0], None)]
        else:
            out[rule.original[:-7]] = [(p, (i, i + 1, 3)) for i, p in enumerate(parts)]
    return out


SWAPPED = (1, 2, 2)  # marker rows: the diffusers layer stores halves (b, a) of original rows (a, b)


def swap_halves(t):
    """Rows (a, b) -> (b, a): a SWAPPED layer's change from the checkpoint weight's change."""
    n = t.shape[0] // 2
    return t.roll(-n, dims=0) if t.shape[0] % 2 == 0 else t


def _dit_default(arch: str, path: str) -> bool:
    if arch == "flux":
        return path.startswith(("double_blocks.", "single_blocks."))
    return path.startswith("joint_blocks.")


@dataclass
class ModuleTable:
    """Every LoRA module name (all accepted spellings) -> its Target, for one checkpoint layout.

    `canonical` lists, per target, the one name kohya itself writes for this architecture (what
    extraction writes)."""

    arch: str
    targets: dict[str, Target]
    canonical: dict[str, Target]
    # checkpoint key -> [(diffusers module "component.path", rows)]: where the layer lives in a
    # diffusers pipeline (CLIP paths spelled with `text_model.`; transformers 5 drops that level;
    # rows SWAPPED: the layer holds the weight's two row halves swapped, see `swap_halves`)
    diffusers: dict[str, list[tuple[str, tuple[int, int, int] | None]]] = field(default_factory=dict)

    def lookup(self, module: str) -> Target | None:
        """The target of a LoRA module name (kohya underscores or dotted diffusers/PEFT paths)."""
        module = module.removeprefix("base_model.model.")
        return self.targets.get(module) or self.targets.get(_under(module))

    @property
    def components(self) -> set[str]:
        return {t.component for t in self.canonical.values()}


def module_table(arch: str, shapes: Shapes) -> ModuleTable:
    """Build the name table for a checkpoint (or diffusion-model-only file) of `arch`."""
    targets: dict[str, Target] = {}
    canonical: dict[str, Target] = {}
    diffusers: dict[str, list] = {}

    def add(names: list[str], target: Target) -> None:
        canonical[names[0]] = target
        for n in names:
            targets.setdefault(n, target)
            if "." in n:
                targets.setdefault(_under(n), target)

    prefix = _diffusion_prefix(arch, shapes)
    if prefix is not None:
        bare = [k[len(prefix):] for k in shapes if k.startswith(prefix) and k.endswith(".weight")]
        bare_all = [k[len(prefix):] for k in shapes if k.startswith(prefix)]
        flux = _flux_diffusers(bare_all) if arch == "flux" else _sd3_diffusers(bare_all) if arch == "sd3" else {}
        for path in (b[:-7] for b in bare):
            key = f"{prefix}{path}.weight"
            shape = tuple(shapes[key])
            if len(shape) < 2:
                continue
            if arch in UNET_IDS:
                d = ldm_unet_to_diffusers(path)
                if d is None:
                    continue
                default, conv = _sd_unet_kind(d)
                t = Target(key, shape, "unet", None, default, conv)
                ldm_name, diff_name = "lora_unet_" + _under(path), "lora_unet_" + _under(d)
                first = diff_name if KOHYA_UNET[arch] == "diffusers" else ldm_name
                add([first, ldm_name, diff_name, "unet." + d, d, "diffusion_model." + path], t)
                diffusers[key] = [("unet." + d, None)]
                continue
            t = Target(key, shape, "unet", None, _dit_default(arch, path))
            add(["lora_unet_" + _under(path), "diffusion_model." + path, "transformer." + path], t)
            for dpath, rows in flux.get(path, []):
                diffusers.setdefault(key, []).append(("transformer." + dpath, rows))
                if rows is SWAPPED:
                    continue
                part = Target(key, shape, "unet", rows, False)
                for n in ("transformer." + dpath, "lora_transformer_" + _under(dpath), dpath):
                    targets.setdefault(n, part)
                    targets.setdefault(_under(n), part)
    for section in TE_SECTIONS.get(arch, ()):
        for key, shape in shapes.items():
            if not key.startswith(section.prefix) or len(shape) < 2:
                continue
            for path, rows, default in _te_modules(section, key[len(section.prefix):]):
                t = Target(key, tuple(shape), section.component, rows, default)
                names = [f"{kp}_{_under(path)}" for kp in section.kohya]
                names += [f"{dp}.{p}" for dp in section.diffusers
                          for p in (path, path.removeprefix("text_model."))]
                add(names, t)
                diffusers.setdefault(key, []).append((f"{section.diffusers[0]}.{path}", rows))
    return ModuleTable(arch, targets, canonical, diffusers)


def kohya_modules(table: ModuleTable, components: set[str] | None = None,
                  conv: bool = False) -> dict[str, Target]:
    """The modules kohya trains (default targets, plus ResNet convs when `conv`), canonical names.

    `components`: "unet" and/or "text_encoder" (every text encoder); None = all."""
    out = {}
    for name, t in table.canonical.items():
        comp = "unet" if t.component == "unet" else "text_encoder"
        if components is not None and comp not in components:
            continue
        if t.default or (conv and t.conv_only):
            out[name] = t
    return out
