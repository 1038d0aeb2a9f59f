"""Write the trained adapter as a kohya LoRA (+ A1111 sidecar), optionally in diffusers/PEFT form.

kohya layout (kohya sd-scripts `networks/lora.py`; the one format A1111, Forge, ComfyUI and
diffusers all load): per module `M.lora_down.weight`, `M.lora_up.weight`, `M.alpha` (the trained
alpha, so every loader's scale alpha/rank equals the trained scale); LoHa/LoKr
use LyCORIS names (`hada_w1_a`…, `lokr_w1`…), DoRA adds `M.dora_scale` (the magnitude vector, shape
[out, 1(,1,1)]). Fused FLUX modules stack the parts' output-side factors in the table's row order;
their input-side factor is shared in training (network.py), so this is exact.

Metadata: the `ss_*` and `modelspec.*` keys A1111/Forge read (Forge picks the model tab a LoRA shows
in from `ss_base_model_version` and `modelspec.architecture`), `sshs_model_hash` (sha256 of the
tensor bytes, what A1111 computes for the file), and the recipe (`workbench_recipe`, its paths
reduced to file names by recipes/shareable.py: a shared LoRA names no local folder).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from workbench.arch import ARCHS
from workbench.errors import WorkbenchError
from workbench.formats.writer import atomic_write_text, save_file_atomic
from workbench.formats.detect import detect
from workbench.formats.hashes import a1111_legacy_hash, sha256_file
from workbench.formats.lora_keys import SWAPPED, swap_halves
from workbench.merge.extract import BASE_MODEL_VERSION, DTYPES, NETWORK_MODULE
from workbench.recipes.shareable import shareable_text
from workbench.train.captions import tag_frequency, with_trigger
from workbench.train.check import bucket_info
from workbench.train.loop import optimizer_label
from workbench.train.network import ADAPTER, Network
from workbench import __version__

# from workbench/arch.py: a LoRA's modelspec architecture is its base's plus "/lora"
MODELSPEC_ARCH = {a.id: f"{a.modelspec_arch}/lora" for a in ARCHS if a.trainable}
MODELSPEC_IMPL = {a.id: a.lora_modelspec_impl for a in ARCHS if a.trainable}
SIDECAR_SD_VERSION = {a.id: a.sidecar_sd_version for a in ARCHS if a.sidecar_sd_version}
FLOW_ARCHS = tuple(a.id for a in ARCHS if a.flow_matching)
# tensors whose rows are the layer's output rows (what a row swap of the weight moves)
OUTPUT_SIDE = ("lora_up.weight", "dora_scale", "hada_w1_a", "hada_w2_a")


def modelspec_architecture(arch: str, variant: str | None) -> str:
    """`modelspec.architecture` of a trained LoRA. SD3.5 as sd-scripts writes it
    (library/sai_model_spec.py: "stable-diffusion-3" + "-" + the MMDiT's model type "5-medium" /
    "5-large", then "/lora"); the others: the base's architecture + "/lora"."""
    if arch == "sd3" and variant and variant.startswith("sd3.5-"):
        return f"stable-diffusion-3-5-{variant.removeprefix('sd3.5-')}/lora"
    return MODELSPEC_ARCH[arch]


def _factor(layer, attr: str) -> torch.Tensor | None:
    holder = getattr(layer, attr, None)
    if holder is None or ADAPTER not in holder:
        return None
    h = holder[ADAPTER]
    return (h.weight if isinstance(h, torch.nn.Module) else h).detach().float()


def _lokr_tensors(layer, alpha: float, rank: int) -> dict[str, torch.Tensor]:
    """LoKr factors; when neither side is low-rank, loaders use scale 1, so fold alpha/rank in."""
    out = {}
    for side in ("w1", "w2"):
        full = _factor(layer, f"lokr_{side}")
        if full is not None:
            out[f"lokr_{side}"] = full
        else:
            out[f"lokr_{side}_a"] = _factor(layer, f"lokr_{side}_a")
            out[f"lokr_{side}_b"] = _factor(layer, f"lokr_{side}_b")
    if "lokr_w1" in out and "lokr_w2" in out:
        out["lokr_w1"] = out["lokr_w1"] * (alpha / rank)
    return out


def kohya_state_dict(net: Network, dtype: str = "fp16") -> dict[str, torch.Tensor]:
    """name -> tensor in kohya/LyCORIS layout, cast to the save dtype (alpha included)."""
    if dtype not in DTYPES:
        raise WorkbenchError(f"save_precision must be one of {', '.join(DTYPES)} (got {dtype!r})")
    torch_dtype = DTYPES[dtype][0]
    kind = net.plan.type
    out: dict[str, torch.Tensor] = {}
    for name in sorted(net.plan.modules):
        m = net.plan.modules[name]
        layers = [net.layer(m.component, p) for p in net.paths[name]]
        first = layers[0]
        swapped = len(m.parts) == 1 and m.parts[0][1] == SWAPPED
        t: dict[str, torch.Tensor] = {}
        if kind in ("lora", "dora"):
            t["lora_down.weight"] = _factor(first, "lora_A")
            t["lora_up.weight"] = torch.cat([_factor(x, "lora_B") for x in layers], 0)
            if kind == "dora":
                mags = [_factor(x, "lora_magnitude_vector").reshape(-1) for x in layers]
                extra = (1,) * (t["lora_up.weight"].dim() - 1)
                t["dora_scale"] = torch.cat(mags).reshape(-1, *extra)
        elif kind == "loha":
            t["hada_w1_a"] = torch.cat([_factor(x, "hada_w1_a") for x in layers], 0)
            t["hada_w1_b"] = _factor(first, "hada_w1_b")
            t["hada_w2_a"] = torch.cat([_factor(x, "hada_w2_a") for x in layers], 0)
            t["hada_w2_b"] = _factor(first, "hada_w2_b")
        else:
            t.update(_lokr_tensors(first, m.alpha, m.rank))
        if swapped:  # the diffusers layer holds the checkpoint weight's row halves swapped
            for k in OUTPUT_SIDE:
                if k in t:
                    t[k] = swap_halves(t[k])
        for k, v in t.items():
            out[f"{name}.{k}"] = v.to(torch_dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(m.alpha, dtype=torch_dtype)
    return out


def payload_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the tensor bytes in file order = A1111's `sshs_model_hash` of the written file."""
    h = hashlib.sha256()
    for t in tensors.values():
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def legacy_hash(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """kohya's `sshs_legacy_hash`: the old 8-hex AddNet hash, sha256 of the 64 KiB at offset 1 MiB of
    the file safetensors would write with only the `ss_*` metadata (kohya's
    `precalculate_safetensors_hashes`)."""
    from safetensors.torch import save

    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=ss_only)
    return hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


@dataclass
class TrainFacts:
    """What the loop knows when it saves: filled by the runner, turned into metadata here."""

    output_name: str
    arch: str
    base_path: Path
    variant: str | None = None                   # detect()'s variant of the base (SD3.5 size)
    base_sha256: str = ""
    base_legacy_hash: str = ""
    steps: int = 0
    epoch: int = 0
    started_at: float = 0.0
    finished_at: float | None = None
    session_id: str = ""
    resolution: tuple[int, int] = (512, 512)
    trigger: str | None = None
    prediction_type: str = "epsilon"
    num_train_images: int = 0
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    dataset_dirs: dict[str, dict[str, int]] = field(default_factory=dict)
    bucket_info: dict[str, Any] | None = None
    training: dict[str, Any] = field(default_factory=dict)  # ss_<key> -> value (optimizer, lr, ...)
    recipe_text: str | None = None


def resolution_of(recipe) -> tuple[int, int]:
    """(width, height) of a train recipe's `resolution` (one side or two)."""
    r = recipe.resolution
    return (r, r) if isinstance(r, int) else (r[0], r[1])


def train_facts(recipe, setup, trainer, session_id: str, started: float,
                finished: float | None) -> TrainFacts:
    """The facts a saved LoRA carries, from the recipe, the dry run's setup and the trainer."""
    report, s = setup.dataset, trainer.s
    by_folder: dict[str, list[str]] = {}
    dirs: dict[str, dict[str, int]] = {}
    for e in report.examples:
        folder = e.image_path.parent.name
        by_folder.setdefault(folder, []).append(with_trigger(e.caption, recipe.trigger))
        d = dirs.setdefault(folder, {"n_repeats": e.repeats, "img_count": 0})
        d["img_count"] += 1
    base = Path(recipe.base)
    opt = {"learning_rate": s.learning_rate, "unet_lr": s.unet_lr, "text_encoder_lr": s.text_encoder_lr,
           "optimizer": optimizer_label(s.optimizer, trainer.optimizer), "lr_scheduler": s.lr_scheduler, "lr_warmup_steps": s.lr_warmup_steps,
           "max_train_steps": s.max_steps, "gradient_accumulation_steps": s.gradient_accumulation_steps,
           "gradient_checkpointing": s.gradient_checkpointing, "mixed_precision": s.mixed_precision,
           "max_grad_norm": s.max_grad_norm, "seed": s.seed, "cache_latents": recipe.cache_latents,
           "fp8_base": recipe.base_precision == "fp8", "noise_offset": s.noise_offset,
           "min_snr_gamma": s.min_snr_gamma, "caption_dropout_rate": s.caption_dropout_rate,
           "shuffle_caption": s.shuffle_caption, "keep_tokens": s.keep_tokens,
           "clip_skip": s.clip_skip, "batch_size_per_device": recipe.batch_size,
           "enable_bucket": recipe.bucketing, "min_bucket_reso": recipe.min_bucket_reso,
           "max_bucket_reso": recipe.max_bucket_reso,
           "num_batches_per_epoch": trainer.data.sampler.batches_per_epoch}
    if setup.arch == "flux":
        opt.update({"guidance_scale": s.guidance, "timestep_sampling": "shift",
                    "discrete_flow_shift": s.flow_shift})
    elif setup.arch == "sd3":  # sd-scripts' SD3 names for the same sampling (sd3_train_network.py)
        opt.update({"weighting_scheme": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0,
                    "training_shift": s.flow_shift})
    pred = "flow" if setup.arch in FLOW_ARCHS else trainer.sched.prediction_type
    return TrainFacts(
        output_name=recipe.name, arch=setup.arch, base_path=base, variant=detect(base).variant,
        base_sha256=sha256_file(base),
        base_legacy_hash=a1111_legacy_hash(base), steps=trainer.state.step,
        epoch=trainer.data.sampler.epoch, started_at=started, finished_at=finished,
        session_id=session_id, resolution=resolution_of(recipe), trigger=recipe.trigger,
        prediction_type=pred, num_train_images=len(report.examples),
        tag_frequency=tag_frequency(by_folder), dataset_dirs=dirs, bucket_info=bucket_info(report),
        training=opt, recipe_text=shareable_text(recipe))  # file names only, no local folders


def _network_module_and_args(net: Network) -> tuple[str, dict[str, str]]:
    plan = net.plan
    args: dict[str, str] = {}
    if plan.conv_rank:
        args["conv_dim"] = str(plan.conv_rank)
        args["conv_alpha"] = str(plan.conv_alpha if plan.conv_alpha is not None else plan.conv_rank)
    if plan.type == "lora":
        return NETWORK_MODULE.get(plan.arch, "networks.lora"), args
    args["algo"] = "lora" if plan.type == "dora" else plan.type
    if plan.type == "dora":
        args["dora_wd"] = "True"
    return "lycoris.kohya", args


def lora_metadata(net: Network, facts: TrainFacts, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """The ss_* / modelspec.* / sshs_* keys (all strings, kohya style) plus the recipe."""
    plan, arch = net.plan, facts.arch
    module, args = _network_module_and_args(net)
    w, h = facts.resolution
    meta: dict[str, Any] = {
        "ss_output_name": facts.output_name, "ss_session_id": facts.session_id,
        "ss_training_started_at": facts.started_at, "ss_training_finished_at": facts.finished_at,
        "ss_training_comment": f"trained by workbench {__version__}", "ss_steps": facts.steps,
        "ss_epoch": facts.epoch, "ss_sd_model_name": facts.base_path.name,
        "ss_sd_model_hash": facts.base_legacy_hash, "ss_new_sd_model_hash": facts.base_sha256,
        "ss_v2": arch == "sd2", "ss_base_model_version": BASE_MODEL_VERSION.get(arch, arch),
        "ss_network_module": module, "ss_network_dim": plan.rank, "ss_network_alpha": plan.alpha,
        "ss_network_dropout": plan.dropout, "ss_network_args": json.dumps(args) if args else None,
        "ss_resolution": f"({w}, {h})", "ss_num_train_images": facts.num_train_images,
        "ss_tag_frequency": json.dumps(facts.tag_frequency),
        "ss_dataset_dirs": json.dumps(facts.dataset_dirs),
        "ss_bucket_info": json.dumps(facts.bucket_info) if facts.bucket_info else None,
        "ss_v_parameterization": facts.prediction_type == "v_prediction",
    }
    if arch == "flux":
        meta["ss_model_type"] = "flux"
        meta["ss_model_prediction_type"] = "raw"
    for k, v in facts.training.items():
        meta[f"ss_{k}"] = v
    out = {k: ("None" if v is None else str(v)) for k, v in meta.items()}
    date = _dt.datetime.fromtimestamp(facts.finished_at or facts.started_at or 0).isoformat(timespec="seconds")
    out.update({
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": modelspec_architecture(arch, facts.variant),
        "modelspec.implementation": MODELSPEC_IMPL[arch],
        "modelspec.implementation_version": f"workbench/{__version__}",
        "modelspec.title": facts.output_name, "modelspec.resolution": f"{w}x{h}",
        "modelspec.date": date,
        "modelspec.prediction_type": "flow" if arch in FLOW_ARCHS else
        ("v" if facts.prediction_type == "v_prediction" else "epsilon"),
    })
    if facts.trigger:
        out["modelspec.trigger_phrase"] = facts.trigger
    if facts.training.get("clip_skip"):
        out["modelspec.encoder_layer"] = str(facts.training["clip_skip"])
    out["sshs_model_hash"] = payload_sha256(tensors)
    out["sshs_legacy_hash"] = legacy_hash(tensors, out)
    if facts.recipe_text:
        out["workbench_recipe"] = facts.recipe_text
    out["workbench_version"] = __version__
    return out


def sidecar(facts: TrainFacts, preferred_weight: float = 1.0) -> dict[str, Any]:
    """A1111/Forge user metadata (`<lora>.json`): one-click trigger and the right model tab."""
    return {"description": f"{facts.output_name}: style LoRA trained on "
                           f"{facts.num_train_images} images ({facts.steps} steps) by workbench",
            "sd version": SIDECAR_SD_VERSION.get(facts.arch, "Unknown"),
            "activation text": facts.trigger or "",
            "preferred weight": preferred_weight,
            "negative text": "",
            "notes": f"base: {facts.base_path.name}" + (f" (sha256 {facts.base_sha256[:10]})"
                                                       if facts.base_sha256 else "")}


def save_kohya(net: Network, path: str | Path, facts: TrainFacts, *, dtype: str = "fp16",
               overwrite: bool = False, write_sidecar: bool = True) -> list[Path]:
    """Write `path` (kohya LoRA) and `<stem>.json` next to it; both atomic. Returns the paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = kohya_state_dict(net, dtype)
    save_file_atomic(tensors, path, lora_metadata(net, facts, tensors), overwrite=overwrite)
    written = [path]
    if write_sidecar:
        side = path.with_suffix(".json")
        atomic_write_text(side, json.dumps(sidecar(facts), indent=2) + "\n", overwrite=True)
        written.append(side)
    return written


# ------------------------------------------------------------------------------- diffusers/PEFT

PEFT_PREFIX = {"unet": "unet", "transformer": "transformer", "text_encoder": "text_encoder",
               "text_encoder_2": "text_encoder_2"}
CLIP_ROOT = "text_model."


def peft_key(component: str, key: str, model: torch.nn.Module) -> str:
    """`<component>.<path>` in the established spelling: CLIP text-encoder paths always start with
    `text_model.` (transformers 5's CLIPTextModel has no such level, so peft names its layers
    `encoder.layers...`; ComfyUI maps only `text_encoder.text_model.encoder...`, and diffusers loads
    both spellings into either transformers version)."""
    if component.startswith("text_encoder") and _is_clip(model) and not key.startswith(CLIP_ROOT):
        key = CLIP_ROOT + key
    return f"{PEFT_PREFIX[component]}.{key}"


def _is_clip(model: torch.nn.Module) -> bool:
    return type(model).__name__.startswith("CLIPText")


def peft_state_dict(net: Network, dtype: str = "fp16") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """diffusers `save_lora_weights` layout: `<component>.<path>.lora_A.weight` + the PEFT config
    per component (so diffusers restores the trained alpha, unlike alpha-less PEFT files). The
    config's target_modules / rank_pattern / alpha_pattern keep the installed paths: peft matches
    them as suffixes, so they fit both transformers layouts."""
    if net.plan.type not in ("lora", "dora"):
        raise WorkbenchError(f"the diffusers/PEFT format holds LoRA and DoRA only (network is {net.plan.type})")
    from peft import get_peft_model_state_dict

    torch_dtype = DTYPES[dtype][0]
    tensors: dict[str, torch.Tensor] = {}
    config_meta: dict[str, Any] = {}
    for comp, model in net.models.items():
        prefix = PEFT_PREFIX[comp]
        sd = get_peft_model_state_dict(model, adapter_name=ADAPTER)
        for k in sorted(sd):
            tensors[peft_key(comp, k, model)] = sd[k].detach().to(torch_dtype).contiguous()
        cfg = model.peft_config[ADAPTER].to_dict()
        for k, v in cfg.items():
            config_meta[f"{prefix}.{k}"] = sorted(v) if isinstance(v, set) else v
    return tensors, config_meta


def peft_family_metadata(arch: str, variant: str | None = None) -> dict[str, str]:
    """What model family the peft copy is for, in the keys loaders and detection read (its
    diffusers names alone do not tell SD3.5 from FLUX at widths of neither)."""
    return {"ss_base_model_version": BASE_MODEL_VERSION.get(arch, arch),
            "modelspec.architecture": modelspec_architecture(arch, variant)}


def save_peft(net: Network, path: str | Path, *, dtype: str = "fp16", overwrite: bool = False,
              extra_metadata: dict[str, str] | None = None, variant: str | None = None) -> Path:
    """Write the diffusers/PEFT file (loads with `pipe.load_lora_weights(path)`)."""
    tensors, cfg = peft_state_dict(net, dtype)
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps(cfg, indent=2, sort_keys=True, default=str),
            **peft_family_metadata(net.plan.arch, variant)}
    meta.update(extra_metadata or {})
    return save_file_atomic(tensors, Path(path), meta, overwrite=overwrite)
