"""The one place that makes images: load a model, then turn (settings, seeds) into images.

Grids, training samples, the dashboard and `workbench generate` all call `generate`, so the same
(model, settings, seed) gives the same picture everywhere:

- initial noise (and an ancestral sampler's step noise) comes from one CPU `torch.Generator` per
  image, seeded with that image's seed, so neither the batch nor the device changes the noise
  (a batched call may still round the last bit of a pixel differently: matmuls over a batch of 2
  are not bit-identical to two of 1; grids generate one image per call for that reason);
- A1111 sampler names map to diffusers schedulers built from the model's own scheduler config;
- A1111's clip skip (1 = last layer) becomes diffusers' `clip_skip` (layers skipped, 0-based);
- LoRAs are attached for one call with their weights and detached afterwards, so the loaded model
  is left exactly as it was (grids switch LoRAs cell by cell without reloading the base).
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from workbench import system
from workbench.arch import ARCHS, BY_ID
from workbench.errors import WorkbenchError
from workbench.formats import scaled_fp8
from workbench.formats.detect import detect
from workbench.formats.hashes import addnet_hash, autov2, sha256_file
from workbench.formats.model_file import read_model_header
from workbench.pipeline import memory_plan, sizes, streaming
from workbench.pipeline.components import component_sizes, load_pipeline_with, sources
from workbench.pipeline.image_meta import format_parameters, lora_hashes_field, save_png
from workbench.pipeline.load import LOAD_LOCK, load_pipeline, quiet_diffusers
from workbench.pipeline.loras import attached_loras
from workbench.pipeline.model import GeneratedImage, ImageSettings, LoraUse, Model
from workbench.pipeline.precision import storage_dtype
from workbench.pipeline.samplers import make_scheduler
from workbench.pipeline.tiny_vae import load_tiny_vae, use_tiny_vae
from workbench.progress import task
from workbench.provenance import versions

# Latent pixels per side and the multiple a side must be: VAE factor 8, times the patch size 2 of
# the DiT models (SD3, FLUX pack 2x2 latent patches).
SIZE_MULTIPLE = {a.id: a.size_multiple for a in ARCHS}  # from workbench/arch.py
MIN_SIDE = 64
# Native training sizes: far from these, models repeat subjects or lose coherence (a warning only).
NATIVE_SIDE = {a.id: a.native_side for a in ARCHS}


@contextmanager
def clip_skip_compat(pipe, active: bool) -> Iterator[None]:
    """diffusers 0.42's SD1.5 clip skip reads `text_encoder.text_model.final_layer_norm`, which
    transformers 5 moved to `text_encoder.final_layer_norm`. Alias the old path for the call only
    (outside the module tree, so state_dict sees no cycle; LoRA loading must not see it either,
    because diffusers then takes the alias for the old key layout)."""
    te = getattr(pipe, "text_encoder", None)
    alias = active and te is not None and hasattr(te, "final_layer_norm") \
        and "text_model" not in te.__dict__ and "text_model" not in te._modules
    if alias:
        object.__setattr__(te, "text_model", te)
    try:
        yield
    finally:
        if alias:
            del te.__dict__["text_model"]


# ------------------------------------------------------------------------------------------- load

def pick_device(device: str | None = None) -> torch.device:
    """`device` if given, else the first CUDA GPU, else the CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_arch(path: Path) -> tuple[str, str | None]:
    """(arch, variant) of a checkpoint file, a split-FLUX folder or a diffusers folder."""
    if path.is_dir():
        index = path / "model_index.json"
        if index.is_file():
            import json

            cls = json.loads(index.read_text()).get("_class_name", "")
            for name, arch in (("StableDiffusionXL", "sdxl"), ("StableDiffusion3", "sd3"),
                               ("Flux", "flux"), ("StableDiffusion", "sd15")):
                if cls.startswith(name):
                    return arch, None
            raise WorkbenchError(f"{index}: pipeline class {cls!r} is not one the workbench runs; "
                                 "expected a StableDiffusion, StableDiffusionXL, StableDiffusion3 or "
                                 "Flux pipeline")
        return "flux", None  # split files: flux_parts() names what is missing
    header = read_model_header(path)  # GGUF and NF4 files too, with their logical shapes
    scaled_fp8.check_supported(scaled_fp8.layout_of(header), path)  # refused before any plan
    info = detect(header)
    if info.kind != "checkpoint" or info.arch not in BY_ID or not BY_ID[info.arch].generation:
        raise WorkbenchError(f"{path}: is a {info.arch} {info.kind}, not a checkpoint that can make "
                             "images; expected an SD1.5, SDXL, SD3.x or FLUX.1 checkpoint")
    return info.arch, info.variant


def load_model(path: str | os.PathLike, *, device: str | None = None, weights: str = "auto",
               vram_budget_mb: int | None = None, arch: str | None = None,
               tiny_vae: str | os.PathLike | None = None, width: int | None = None,
               height: int | None = None, batch: int = 1, plan=None,
               components: str | os.PathLike | None = None) -> Model:
    """Load a checkpoint for generation on `device` within the memory plan for `vram_budget_mb`.

    The plan comes first (from the file header: nothing is read that will not fit); the pipeline
    is then loaded on the CPU in the plan's compute dtype and `apply_plan` stores and places each
    component (resident, fp8/nf4, partially resident + streamed, offloaded between stages).
    Offline always: configs and CLIP tokenizers ship with the package (see workbench.pipeline.load).
    `tiny_vae` swaps in a TAESD decoder (workbench.pipeline.tiny_vae) for fast CPU previews.
    `width`/`height`/`batch` size the activation estimate (default: the architecture's native
    size, one image). `plan` is a memory plan already made from this file's header (the dry run's,
    `plan_for_file`): it is applied as it is, not made again. `components`: the checkpoint or
    diffusers folder that gives the text encoders and VAE when `path` holds only the
    UNet/transformer (`pipeline/components.py`); not used otherwise.
    """
    path = Path(path)
    if not path.exists():
        raise WorkbenchError(f"{path}: model not found")
    dev = pick_device(device)
    variant = None
    src = sources(path, components)
    if src is not None:
        arch, variant = src.arch, src.variant
    elif arch is None:
        arch, variant = model_arch(path)
    info = memory_plan.probe_device(str(dev))
    folder = path.is_dir() and (path / "model_index.json").is_file()
    if plan is None and not folder:
        found = component_sizes(src) if src is not None else sizes.component_sizes_from_header(path, arch)
        plan = plan_memory_for(found, arch, info, weights, vram_budget_mb, width, height, batch)
    compute = plan.compute_dtype if plan is not None else memory_plan.compute_dtype_for(arch, weights, info)
    dtype = storage_dtype(compute)

    quiet_diffusers()
    if src is not None:
        pipe = load_pipeline_with(src, dtype)
    else:
        pipe = _load_diffusers_folder(path, dtype) if folder else load_pipeline(path, arch, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    if tiny_vae is not None:
        use_tiny_vae(pipe, load_tiny_vae(tiny_vae, arch, dtype))
    if plan is None or tiny_vae is not None:  # sizes of what was actually loaded
        plan = plan_memory_for(sizes.component_sizes_from_pipeline(pipe), arch, info, weights,
                               vram_budget_mb, width, height, batch)
    model = Model(pipe, arch, path, variant, dev, dtype, _model_hash(path), path.stem)
    _place(model, plan)
    return model


def _ram_available() -> int | None:
    """Free RAM from psutil on every OS (None where unknown: the RAM check is skipped)."""
    return system.ram_available()


def plan_memory_for(sizes, arch: str, info, weights: str, vram_budget_mb: int | None,
                    width: int | None, height: int | None, batch: int = 1):
    """The one call that makes a memory plan, for `--plan`, the dry run and the load alike."""
    side = NATIVE_SIDE.get(arch, 1024)
    return memory_plan.plan_memory(sizes, device=info, arch=arch, vram_budget_mb=vram_budget_mb,
                                   ram_free_bytes=_ram_available(), weights=weights,
                                   width=width or side, height=height or side, batch=batch)


def _load_diffusers_folder(path: Path, dtype: torch.dtype):
    import diffusers

    try:
        with LOAD_LOCK:  # see LOAD_LOCK: one load at a time per process
            return diffusers.DiffusionPipeline.from_pretrained(str(path), dtype=dtype,
                                                               local_files_only=True)
    except (OSError, ValueError) as e:
        raise WorkbenchError(f"{path}: cannot load this diffusers folder offline: {e}") from e


def _model_hash(path: Path) -> str:
    return autov2(path) if path.is_file() else ""


def plan_for_file(path: str | os.PathLike, *, vram_budget_mb: int | None = None,
                  weights: str = "auto", device: str | None = None, width: int | None = None,
                  height: int | None = None, batch: int = 1,
                  components: str | os.PathLike | None = None):
    """The memory plan for a checkpoint, from its header alone (what `--plan` prints); a
    UNet/transformer-only file with the text encoders and VAE of `components`."""
    path = Path(path)
    if not path.exists():
        raise WorkbenchError(f"{path}: model not found")
    src = sources(path, components)
    arch = src.arch if src is not None else model_arch(path)[0]
    found = component_sizes(src) if src is not None else sizes.component_sizes_from_header(path, arch)
    info = memory_plan.probe_device(str(pick_device(device)))
    return plan_memory_for(found, arch, info, weights, vram_budget_mb, width, height, batch)


def _place(model: Model, plan) -> None:
    """Store and place every component as the plan says (CPU plans too: fp8 storage on a CPU
    saves RAM; bf16 compute on a CPU wants channels_last for oneDNN's convolutions)."""
    model.memory_plan = plan
    model.offload = streaming.apply_plan(model.pipe, plan, model.device)
    if getattr(plan, "vae_tiling", False) and hasattr(model.pipe.vae, "enable_tiling"):
        model.pipe.vae.enable_tiling()
    if model.device.type == "cpu" and model.dtype == torch.bfloat16:
        for m in (getattr(model.pipe, "unet", None), getattr(model.pipe, "vae", None)):
            if m is not None:
                m.to(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------- generate

def check_settings(arch: str, settings: ImageSettings) -> None:
    """Refuse sizes and options the architecture cannot take, before any work."""
    m = SIZE_MULTIPLE.get(arch, 8)
    for side in ("width", "height"):
        v = getattr(settings, side)
        if v < MIN_SIDE or v % m:
            raise WorkbenchError(f"{side}: {arch} needs a multiple of {m} of at least {MIN_SIDE} "
                                 f"pixels (got {v})")
    if settings.steps < 1:
        raise WorkbenchError(f"steps: expected at least 1 (got {settings.steps})")
    if settings.clip_skip is not None and settings.clip_skip > 1 and arch == "flux":
        raise WorkbenchError("clip_skip: FLUX.1 takes no clip skip (its CLIP gives only the pooled "
                             "vector); leave it unset")
    if arch == "flux" and settings.negative_prompt:
        raise WorkbenchError("negative_prompt: FLUX.1 is guidance-distilled and ignores negative "
                             "prompts; leave it empty")


def _call_kwargs(model: Model, settings: ImageSettings) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "prompt": settings.prompt, "num_inference_steps": settings.steps,
        "guidance_scale": settings.cfg, "width": settings.width, "height": settings.height,
    }
    if model.arch != "flux":
        kw["negative_prompt"] = settings.negative_prompt or None
    if settings.clip_skip and settings.clip_skip > 1:
        kw["clip_skip"] = settings.clip_skip - 1
    return kw


def infotext(model: Model, settings: ImageSettings, seed: int, loras: Sequence[LoraUse] = (),
             lora_hashes: dict[str, str] | None = None) -> str:
    """A1111's "parameters" text for one image (A1111 appends <lora:name:w> to the prompt)."""
    prompt = settings.prompt + "".join(f" {lu.prompt_tag}" for lu in loras)
    return format_parameters(
        prompt, settings.negative_prompt, Steps=settings.steps, Sampler=settings.sampler,
        **{"CFG scale": f"{settings.cfg:g}"}, Seed=seed, Size=f"{settings.width}x{settings.height}",
        **{"Model hash": model.model_hash or None, "Model": model.model_name or None,
           "Clip skip": settings.clip_skip if settings.clip_skip and settings.clip_skip > 1 else None,
           "Lora hashes": lora_hashes_field(lora_hashes or {})})


def lora_hash(path: Path) -> str:
    """A1111's short LoRA hash: the first 12 hex digits of the addnet hash of a .safetensors."""
    path = Path(path)
    return (addnet_hash(path) if path.suffix == ".safetensors" else sha256_file(path))[:12]


def generate(model: Model, settings: ImageSettings, seeds: Sequence[int], *,
             loras: Sequence[LoraUse] = (), bar: bool = False,
             batch_size: int | None = None,
             on_image: Callable[[GeneratedImage], None] | None = None) -> list[GeneratedImage]:
    """One image per seed, `batch_size` at a time (default: all); same seed -> same image.

    `on_image` is called with each image as soon as its batch is done (so a caller can save it
    before the next batch starts: an interrupted run keeps what it finished).
    """
    check_settings(model.arch, settings)
    pipe = model.pipe
    pipe.scheduler = make_scheduler(settings.sampler, pipe.scheduler.config, model.arch)
    seeds = [int(s) for s in seeds]
    batch = batch_size or len(seeds) or 1
    hashes = {lu.name: lora_hash(lu.path) for lu in loras}
    out: list[GeneratedImage] = []
    with task("sampling", settings.steps * len(seeds), "step", bar=bar) as progress, \
            attached_loras(model, loras):
        def on_step(_pipe, _i, _t, kwargs):
            progress.advance(len(chunk))
            return kwargs

        for start in range(0, len(seeds), batch):
            chunk = seeds[start:start + batch]
            generators = [torch.Generator("cpu").manual_seed(s) for s in chunk]
            if hasattr(pipe.scheduler, "noise_sampler_seed"):  # DPM++ SDE: a Brownian tree per image
                pipe.scheduler.noise_sampler_seed = list(chunk) if len(chunk) > 1 else chunk[0]
            kwargs = _call_kwargs(model, settings)
            kwargs["prompt"] = [settings.prompt] * len(chunk)
            if "negative_prompt" in kwargs and kwargs["negative_prompt"] is not None:
                kwargs["negative_prompt"] = [settings.negative_prompt] * len(chunk)
            with torch.inference_mode(), clip_skip_compat(pipe, "clip_skip" in kwargs):
                result = pipe(**kwargs, generator=generators, callback_on_step_end=on_step,
                              output_type="pil")
            for seed, image in zip(chunk, result.images):
                prov = {
                    "model": {"path": str(model.path) if model.path else None,
                              "name": model.model_name, "autov2": model.model_hash,
                              "arch": model.arch},
                    "loras": [{"path": str(lu.path), "weight": lu.weight, "hash": hashes[lu.name],
                               **({"blocks": lu.blocks} if lu.blocks else {})} for lu in loras],
                    "settings": dataclasses.asdict(settings), "seed": seed,
                    "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
                    "versions": versions(),
                }
                done = GeneratedImage(image, seed, infotext(model, settings, seed, loras, hashes),
                                      prov)
                out.append(done)
                if on_image is not None:
                    on_image(done)
    return out


def save_image(img: GeneratedImage, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """PNG with A1111 parameters and our provenance chunk, written atomically."""
    return save_png(img.image, path, img.parameters, img.provenance, overwrite=overwrite)
