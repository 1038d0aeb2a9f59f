"""Everything up to the first training step: the typed `TrainSetup` the `kind: train` dry run
makes (architecture, adapter plan, the one dataset check, caching), and `build_trainer`, which turns
it into a pipeline with adapters, caches and a `Trainer` (`workbench/train/loop.py`).
The dry run and the run live in `workbench/kinds/train.py`; the folder layout of a run is there too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.arch import ARCHS, BY_ID
from workbench.errors import UnsupportedError, WorkbenchError
from workbench.formats.detect import detect
from workbench.pipeline.components import Sources, load_pipeline_with, sources
from workbench.pipeline.load import load_pipeline
from workbench.recipes.train import TrainRecipe
from workbench.train.buckets import BucketBatchSampler
from workbench.train.cache import (CachingPlan, LatentCache, cache_latents, cache_text,
                                   default_latent_cache, default_text_cache, module_identity,
                                   text_batch)
from workbench.train.captions import fixed_captions
from workbench.train.check import DatasetReport, check_dataset
from workbench.train.loop import (WEIGHT_DTYPE, DataSource, Trainer, TrainSettings, encode_text,
                                  make_accelerator)
from workbench.train.network import NetworkPlan, inject, quantize_base

SUPPORTED = tuple(a.id for a in ARCHS if a.trainable)  # from workbench/arch.py


@dataclass
class TrainSetup:
    """What the dry run found and the run uses as it is: the base's architecture, the adapter
    modules, the dataset check (scanned and hashed once) and where caches go."""

    arch: str
    network: NetworkPlan
    dataset: DatasetReport
    caching: CachingPlan
    sources: Sources | None = None  # a UNet/transformer-only base: where the rest comes from


def base_sources(recipe: TrainRecipe) -> Sources | None:
    """Where a UNet/transformer-only base (a GGUF download) takes its text encoders and VAE from
    (`components:`), or None for a whole checkpoint. Training reads the encoders' shapes from the
    components file's header, so a diffusers folder (fine for generation) is refused here."""
    src = sources(recipe.base, recipe.components, model_field="base")
    if src is not None and src.components.is_dir():
        raise UnsupportedError(f"components: {src.components} is a diffusers folder; training on a "
                               f"{BY_ID[src.arch].name} {src.denoiser}-only base takes its text encoders and "
                               "VAE from a checkpoint file of the same architecture")
    return src


def base_arch(base: Path) -> str:
    """The base checkpoint's architecture; refuses LoRAs and architectures training lacks."""
    info = detect(base)
    if info.kind == "lora":
        raise WorkbenchError(f"base: {base} is a LoRA; training needs a full checkpoint")
    if info.arch not in SUPPORTED:
        raise UnsupportedError(f"base: {base} is {info.arch}; LoRA training supports "
                               f"{', '.join(SUPPORTED)}")
    return info.arch


def check_recipe_dataset(recipe: TrainRecipe) -> DatasetReport:
    """The one dataset scan of a run (every image opened, hashed, bucketed)."""
    return check_dataset(recipe.dataset, resolution=recipe.resolution, bucketing=recipe.bucketing,
                         min_bucket_reso=recipe.min_bucket_reso, max_bucket_reso=recipe.max_bucket_reso,
                         caption_extension=recipe.caption_extension, trigger=recipe.trigger)


# --------------------------------------------------------------------------------------- setup

def _latent_encoder(vae, arch: str, device):
    sf = vae.config.scaling_factor
    shift = vae.config.get("shift_factor") or 0.0

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            lat = vae.encode(pixels.to(device, torch.float32)).latent_dist.mode()
        return ((lat - shift) * sf).float().cpu()

    return encode, f"mode;fp32;sf={sf};shift={shift}"


def build_trainer(recipe: TrainRecipe, setup: TrainSetup, *, out_dir: Path,
                  cache_root: Path | None = None, device: str | None = None) -> Trainer:
    """Everything up to the first step, from the dry run's setup (nothing is checked twice)."""
    base = Path(recipe.base)
    arch, report, caching, plan = setup.arch, setup.dataset, setup.caching, setup.network
    settings = TrainSettings.from_recipe(recipe).for_arch(arch)
    acc = make_accelerator(settings, device)
    dev = acc.device  # under `accelerate launch`, this process's own GPU
    weight_dtype = WEIGHT_DTYPE[settings.mixed_precision]
    if setup.sources is not None:  # a UNet/transformer-only base (a GGUF download)
        pipe = load_pipeline_with(setup.sources, weight_dtype)
    else:
        pipe = load_pipeline(base, arch, torch_dtype=weight_dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.to(dev, torch.float32)  # fp16 SDXL VAEs give NaNs; encoding happens once anyway
    denoiser = getattr(pipe, BY_ID[arch].denoiser)
    quantize_base(denoiser, recipe.base_precision, weight_dtype if weight_dtype != torch.float32 else torch.bfloat16)
    torch.manual_seed(recipe.seed)  # adapter init (peft's kaiming-uniform lora_A) from the seed
    net = inject(pipe, plan)
    for name in ("unet", "transformer", "text_encoder", "text_encoder_2"):
        m = getattr(pipe, name, None)
        if m is not None:
            m.to(dev)
    # latents: the disk cache (shared between runs) or a folder for this run only
    encode, extra = _latent_encoder(pipe.vae, arch, dev)
    vae_id = module_identity(pipe.vae, extra=extra)
    lc = default_latent_cache(vae_id, cache_root) if caching.latents else \
        LatentCache(out_dir / ".latents", vae_id)
    with acc.main_process_first():  # one process fills the shared caches, the others then read them
        cache_latents(report.examples, [report.buckets[i] for i in report.bucket_ids], lc, encode)
    text_fn = None
    if caching.text:
        te_mods = {n: getattr(pipe, n) for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None)}
        te_id = module_identity({f"{n}.{k}": v for n, m in te_mods.items() for k, v in m.state_dict().items()},
                                extra=f"{arch};clip_skip={settings.clip_skip};t5={settings.t5_max_length}")
        tc = default_text_cache(te_id, cache_root) if caching.latents else \
            default_text_cache(te_id, out_dir / ".text")

        def te_encode(caps: list[str]) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                return {k: v.float().cpu() for k, v in encode_text(pipe, arch, caps, settings, dev).items()}

        with acc.main_process_first():
            cache_text(fixed_captions([e.caption for e in report.examples], recipe.trigger,
                                      recipe.caption_dropout_rate), tc, te_encode)
        text_fn = lambda caps: text_batch(tc, caps)  # noqa: E731
    sampler = BucketBatchSampler(report.bucket_ids, [e.repeats for e in report.examples],
                                 recipe.batch_size, recipe.seed)
    data = DataSource(report, sampler, lc, settings, arch)
    trainer = Trainer(pipe, arch, net, data, settings, out_dir, accelerator=acc, text_cache=text_fn)
    torch.manual_seed(recipe.seed + 1)  # dropout draws: independent of what caching consumed
    return trainer
