"""The `kind: train` engine: recipe -> checked dataset -> pipeline + adapter -> loop -> kohya LoRA.

Output folder (`output.dir`):
  <name>.safetensors (+ <name>.json A1111 sidecar)   the final LoRA, kohya format
  <name>-step00000250.safetensors                   checkpoints every `output.save_every` steps
  state/step-00000250/                              resumable state (same cadence, `keep_last`)
  samples/step-00000250_00.png                      previews every `samples.every` steps
  loss.csv (every step) and loss.json (at the end)  the loss curve
  provenance.json                                   recipe, input hashes, versions, seeds, timings

Recipe fields the current TrainRecipe does not have are read with getattr and a default, so they
work as soon as the recipe grows them: `network.blocks` (merge-block ids to train), `base_precision`
(none | fp8 | nf4), `prediction_type`, `output.peft` (also write `<name>.peft.safetensors`).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import torch

from workbench.errors import NotAvailableError, WorkbenchError

SUPPORTED = ("sd15", "sdxl", "flux")


def _arch(base: Path) -> str:
    from workbench.formats.detect import detect

    info = detect(base)
    if getattr(info, "kind", None) == "lora":
        raise WorkbenchError(f"base: {base} is a LoRA; training needs a full checkpoint")
    if info.arch not in SUPPORTED:
        raise NotAvailableError(f"base: {base} is {info.arch}; LoRA training supports "
                                f"{', '.join(SUPPORTED)}")
    return info.arch


def _check(recipe):
    from workbench.train.check import check_dataset

    return check_dataset(recipe.dataset, resolution=recipe.resolution, bucketing=recipe.bucketing,
                         min_bucket_reso=recipe.min_bucket_reso, max_bucket_reso=recipe.max_bucket_reso,
                         caption_extension=recipe.caption_extension, trigger=recipe.trigger)


def _resolution(recipe) -> tuple[int, int]:
    r = recipe.resolution
    return (r, r) if isinstance(r, int) else (r[0], r[1])


def describe(recipe, overwrite: bool = False) -> tuple[list[str], list[str]]:
    """Dry run: architecture, adapter modules and size, the dataset check, caching, resume point."""
    from workbench.train.cache import caching_plan
    from workbench.train.network import plan_for_base

    lines: list[str] = []
    problems: list[str] = []
    try:
        arch = _arch(Path(recipe.base))
        plan = plan_for_base(recipe.base, arch, recipe.network)
        counts = ", ".join(f"{c}: {n}" for c, n in sorted(plan.count().items()))
        lines.append(f"  {arch}: {len(plan.modules)} {plan.type} modules ({counts}), "
                     f"{plan.n_params() / 1e6:.2f} M trainable values")
    except WorkbenchError as e:
        problems.append(str(e))
    try:
        report = _check(recipe)
        lines += ["dataset check:"] + ["  " + x for x in report.render().splitlines()]
        problems += [f"dataset: {p.path}: {p.message}" for p in report.errors]
    except WorkbenchError as e:
        problems.append(f"dataset: {e}")
    try:
        cp = caching_plan(recipe)
        lines.append(f"  caching: latents {'on disk' if cp.latents else 'for this run only'}, text-encoder "
                     f"outputs {'cached' if cp.text else 'computed each step (' + cp.why_no_text + ')'}")
    except WorkbenchError as e:
        problems.append(str(e))
    if recipe.resume is not None:
        from workbench.train.state import find_state, read_state_info

        try:
            folder = find_state(recipe.resume)
            info = read_state_info(folder)
            lines.append(f"  resume from {folder} at step {info['step']} of {recipe.max_steps}")
        except WorkbenchError as e:
            problems.append(str(e))
    return lines, problems


# --------------------------------------------------------------------------------------- setup

def _latent_encoder(vae, arch: str, device):
    sf = vae.config.scaling_factor
    shift = vae.config.get("shift_factor") or 0.0

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            lat = vae.encode(pixels.to(device, torch.float32)).latent_dist.mode()
        return ((lat - shift) * sf).float().cpu()

    return encode, f"mode;fp32;sf={sf};shift={shift}"


def build_trainer(recipe, *, out_dir: Path, cache_root: Path | None = None, device: str | None = None):
    """Everything up to the first step: returns (trainer, context dict)."""
    from workbench.core.load import load_pipeline
    from workbench.train.buckets import BucketBatchSampler
    from workbench.train.cache import (LatentCache, cache_latents, cache_text, caching_plan,
                                       default_latent_cache, default_text_cache, module_identity,
                                       text_batch)
    from workbench.train.captions import fixed_captions
    from workbench.train.check import require_clean
    from workbench.train.loop import (DataSource, Trainer, TrainSettings, WEIGHT_DTYPE, encode_text,
                                      make_accelerator)
    from workbench.train.network import inject, plan_for_base, quantize_base

    base = Path(recipe.base)
    arch = _arch(base)
    report = require_clean(_check(recipe))
    caching = caching_plan(recipe)
    settings = TrainSettings.from_recipe(recipe)
    acc = make_accelerator(settings, device)
    dev = acc.device  # under `accelerate launch`, this process's own GPU
    weight_dtype = WEIGHT_DTYPE[settings.mixed_precision]
    plan = plan_for_base(base, arch, recipe.network)
    pipe = load_pipeline(base, arch, torch_dtype=weight_dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.to(dev, torch.float32)  # fp16 SDXL VAEs give NaNs; encoding happens once anyway
    denoiser = pipe.unet if arch != "flux" else pipe.transformer
    precision = getattr(recipe, "base_precision", "none") or "none"
    quantize_base(denoiser, precision, weight_dtype if weight_dtype != torch.float32 else torch.bfloat16)
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
    return trainer, {"arch": arch, "report": report, "plan": plan, "caching": caching,
                     "precision": precision}


# ---------------------------------------------------------------------------------------- run

def _facts(recipe, ctx, trainer, started: float, finished: float | None):
    from workbench.formats.hashes import a1111_legacy_hash, sha256_file
    from workbench.train.captions import tag_frequency, with_trigger
    from workbench.train.check import bucket_info
    from workbench.train.export import TrainFacts
    from workbench.train.loop import optimizer_label

    report, s = ctx["report"], trainer.s
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
           "fp8_base": ctx["precision"] == "fp8", "noise_offset": s.noise_offset,
           "min_snr_gamma": s.min_snr_gamma, "caption_dropout_rate": s.caption_dropout_rate,
           "shuffle_caption": s.shuffle_caption, "keep_tokens": s.keep_tokens,
           "clip_skip": s.clip_skip, "batch_size_per_device": recipe.batch_size,
           "enable_bucket": recipe.bucketing, "min_bucket_reso": recipe.min_bucket_reso,
           "max_bucket_reso": recipe.max_bucket_reso,
           "num_batches_per_epoch": trainer.data.sampler.batches_per_epoch}
    if ctx["arch"] == "flux":
        opt.update({"guidance_scale": s.guidance, "timestep_sampling": "shift",
                    "discrete_flow_shift": s.flow_shift})
    pred = "flow" if ctx["arch"] == "flux" else trainer.sched.prediction_type
    return TrainFacts(
        output_name=recipe.name, arch=ctx["arch"], base_path=base, base_sha256=sha256_file(base),
        base_legacy_hash=a1111_legacy_hash(base), steps=trainer.state.step,
        epoch=trainer.data.sampler.epoch, started_at=started, finished_at=finished,
        session_id=ctx["session"], resolution=_resolution(recipe), trigger=recipe.trigger,
        prediction_type=pred, num_train_images=len(report.examples),
        tag_frequency=tag_frequency(by_folder), dataset_dirs=dirs, bucket_info=bucket_info(report),
        training=opt, recipe_text=recipe.source_text or recipe.model_dump_json(exclude_none=True))


def run(recipe, *, overwrite: bool = False, progress: bool = True, device: str | None = None,
        cache_root: Path | None = None, stop_at: int | None = None):
    """Train, export and record; `stop_at` ends early after that step (tests of resume)."""
    from workbench.formats.writer import atomic_write_text
    from workbench.provenance import Provenance
    from workbench.runner import RunResult
    from workbench.train.export import save_kohya, save_peft
    from workbench.train.samples import make_samples
    from workbench.train.state import find_state, load_state, save_state

    out_dir = Path(recipe.output.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prov = Provenance(kind="train", name=recipe.name,
                      recipe_path=str(recipe.source_path) if recipe.source_path else None,
                      recipe_text=recipe.source_text)
    t0 = time.time()
    with prov.timed("setup"):
        trainer, ctx = build_trainer(recipe, out_dir=out_dir, cache_root=cache_root, device=device)
    ctx["session"] = uuid.uuid4().hex[:16]
    resumed_from = None
    if recipe.resume is not None:
        resumed_from = find_state(recipe.resume)
        load_state(resumed_from, trainer)
    written: list[Path] = []
    s, out = trainer.s, recipe.output
    w, h = _resolution(recipe)
    base_name = Path(recipe.base).stem

    def samples(step: int) -> None:
        if recipe.samples and trainer.acc.is_main_process:
            written.extend(make_samples(trainer.pipe, ctx["arch"], recipe.samples, step, out_dir,
                                        width=w, height=h, models=trainer.net.models,
                                        model_name=base_name, clip_skip=s.clip_skip))

    def on_step(step: int) -> None:
        if not trainer.acc.is_main_process:
            return
        if out.save_every and step % out.save_every == 0 and step < s.max_steps:
            ckpt = out_dir / f"{recipe.name}-step{step:08d}.safetensors"
            written.extend(save_kohya(trainer.net, ckpt, _facts(recipe, ctx, trainer, t0, None),
                                      dtype=out.save_precision, overwrite=True, write_sidecar=False))
            save_state(out_dir, trainer, out.keep_last)
        if recipe.samples and step % recipe.samples.every == 0:
            samples(step)

    from workbench.train.loop import Hooks

    with prov.timed("train"):
        state = trainer.train(Hooks(on_step=on_step), progress=progress, stop_at=stop_at)
    finished = state.step >= s.max_steps
    with prov.timed("export"):
        if trainer.acc.is_main_process:
            if out.save_every or not finished:
                save_state(out_dir, trainer, out.keep_last)
            if finished:
                facts = _facts(recipe, ctx, trainer, t0, time.time())
                written += save_kohya(trainer.net, recipe.lora_path, facts, dtype=out.save_precision,
                                      overwrite=True)
                if getattr(out, "peft", False) and trainer.net.plan.type in ("lora", "dora"):
                    written.append(save_peft(trainer.net, out_dir / f"{recipe.name}.peft.safetensors",
                                             dtype=out.save_precision, overwrite=True))
                if recipe.samples and state.step % recipe.samples.every != 0:
                    samples(state.step)
            atomic_write_text(out_dir / "loss.json", json.dumps(state.losses) + "\n", overwrite=True)
    prov.add_input("base", recipe.base)
    prov.inputs["dataset"] = {"path": str(recipe.dataset), "kind": "folder",
                              "images": {str(e.image_path): e.sha256 for e in ctx["report"].examples}}
    prov.seeds = {"train": s.seed, **({"samples": recipe.samples.seed} if recipe.samples else {})}
    prov.outputs = [str(p) for p in written] + [str(out_dir / "loss.csv")]
    prov.extra = {"steps": state.step, "final_loss": state.losses[-1]["loss"] if state.losses else None,
                  "resumed_from": str(resumed_from) if resumed_from else None,
                  "device": str(trainer.device), "mixed_precision": s.mixed_precision,
                  "network": {"type": trainer.net.plan.type, "rank": trainer.net.plan.rank,
                              "alpha": trainer.net.plan.alpha, "modules": len(trainer.net.plan.modules)}}
    last = state.losses[-1]["loss"] if state.losses else float("nan")
    if not trainer.acc.is_main_process:  # `accelerate launch`: the main process writes everything
        return RunResult("train", recipe.name, False, None, [],
                         summary=f"train '{recipe.name}': process {trainer.acc.process_index} of "
                                 f"{trainer.acc.num_processes} done ({state.step} steps)")
    prov_path = prov.write(out_dir)
    what = f"wrote {recipe.lora_path}" if finished else f"stopped at step {state.step} (state saved)"
    return RunResult("train", recipe.name, False, None, [*written, prov_path],
                     summary=f"train '{recipe.name}': {state.step}/{s.max_steps} steps, last loss "
                             f"{last:.4f}; {what}")
