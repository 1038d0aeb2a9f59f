"""The training loop, written to be read top to bottom (nanoGPT style).

One optimizer step = `gradient_accumulation_steps` micro-batches. Each micro-batch: take the next
batch from the bucket sampler, build the captions, encode them (cached when the text encoders are
frozen), noise the cached latents at random timesteps, predict, weight the loss (min-SNR γ), backward.
Then clip, step, schedule, log the loss to `loss.csv` (flushed every step) and call the hooks that
export checkpoints, save the resumable state and draw samples.

Determinism (for bit-identical resume): the noise, timesteps and captions of step s come from
generators seeded by (seed, step, micro-batch), not from a running RNG, and the batch order from
the sampler's (seed, epoch, position). The global torch RNG (LoRA dropout) is saved with the state.

Prediction targets: ε (SD default), v (v-prediction models: `prediction_type: v_prediction`), and
flow matching for FLUX and SD3.5 (target noise − x0, σ from a shifted logit-normal, kohya's `shift`
sampling; the shift per architecture is in workbench/arch.py `train_flow_shift`).
"""

from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from workbench import hardware
from workbench.arch import BY_ID, UNET_IDS
from workbench.errors import RecipeError, UnsupportedError
from workbench.progress import task
from workbench.formats.writer import atomic_write_text
from workbench.pipeline.generate import clip_skip_compat
from workbench.train.cache import latent_batch
from workbench.train.captions import build_caption, caption_rng, with_trigger

LOSS_FIELDS = ("step", "loss", "lr", "epoch", "elapsed_s")


@dataclass
class TrainSettings:
    """What the loop needs from a `kind: train` recipe (defaults match the recipe's)."""

    max_steps: int = 1000
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    unet_lr: float | None = None
    text_encoder_lr: float | None = None
    optimizer: str = "AdamW"
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    seed: int = 42
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None
    prediction_type: str | None = None   # None: the model's own (scheduler config)
    max_grad_norm: float = 1.0
    trigger: str | None = None
    shuffle_caption: bool = False
    keep_tokens: int = 1
    caption_dropout_rate: float = 0.0
    clip_skip: int | None = None
    flow_shift: float = 3.1582           # kohya's recommended `discrete_flow_shift` for FLUX.1 dev
    guidance: float = 1.0                # FLUX guidance input while training (kohya: 1.0)
    t5_max_length: int = 512

    @classmethod
    def from_recipe(cls, r) -> "TrainSettings":
        names = set(cls.__dataclass_fields__)
        return cls(**{n: getattr(r, n) for n in names if hasattr(r, n)})

    def for_arch(self, arch: str) -> "TrainSettings":
        """The architecture's own flow shift and T5 prompt length (workbench/arch.py)."""
        rec = BY_ID[arch]
        if rec.train_flow_shift is not None:
            self.flow_shift = rec.train_flow_shift
        if rec.t5_tokens is not None:
            self.t5_max_length = rec.t5_tokens
        return self


# ----------------------------------------------------------------------------- precision, optim

def resolve_precision(mode: str, device: torch.device) -> str:
    """auto -> the device's own compute dtype (workbench/hardware.py, the rule generation uses too):
    bf16 on GPUs that compute it natively (Ampere and later), fp16 with loss scaling on older GPUs
    (Turing's bf16 is emulated), bf16 on CPUs with AVX512-BF16/AMX, no (fp32) on other CPUs."""
    if mode != "auto":
        if device.type == "cpu" and mode == "fp16":
            raise RecipeError("mixed_precision: fp16 needs a GPU; use bf16 or no on the CPU")
        return mode
    return hardware.training_precision(hardware.probe(str(device)))


WEIGHT_DTYPE = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_accelerator(settings: TrainSettings, device: str | None = None):
    """The run's Accelerator, made first: under `accelerate launch` it names this process's GPU
    (cuda:<local rank>), which everything is then placed on. Resolves `settings.mixed_precision`."""
    from accelerate import Accelerator

    cpu = (device or "").startswith("cpu") or (device is None and not torch.cuda.is_available())
    settings.mixed_precision = resolve_precision(settings.mixed_precision,
                                                 torch.device("cpu" if cpu else "cuda"))
    return Accelerator(mixed_precision=settings.mixed_precision, cpu=cpu)


# the keyword arguments each optimizer is made with (kohya's defaults for these recipes)
OPTIMIZER_ARGS: dict[str, dict[str, Any]] = {
    "AdamW": {"weight_decay": 0.01},
    "SGD": {"momentum": 0.9},
    "Adafactor": {"relative_step": False, "scale_parameter": False, "warmup_init": False},
}


def make_optimizer(name: str, groups: list[dict]) -> torch.optim.Optimizer:
    """kohya's optimizer names; the 8-bit and extra ones only when their package is installed."""
    kwargs = OPTIMIZER_ARGS.get(name, {})
    if name == "AdamW":
        return torch.optim.AdamW(groups, **kwargs)
    if name == "SGD":
        return torch.optim.SGD(groups, **kwargs)
    if name == "Adafactor":
        from transformers.optimization import Adafactor  # kohya's fixed-LR Adafactor recipe
        return Adafactor(groups, **kwargs)
    packages = {"AdamW8bit": ("bitsandbytes", "bitsandbytes.optim", "AdamW8bit"),
                "Lion": ("lion-pytorch", "lion_pytorch", "Lion"),
                "Prodigy": ("prodigyopt", "prodigyopt", "Prodigy")}
    if name not in packages:
        raise RecipeError(f"optimizer: unknown {name!r}")
    pip, module, cls = packages[name]
    try:
        mod = __import__(module, fromlist=[cls])
    except ImportError:
        raise UnsupportedError(f"optimizer {name} needs the `{pip}` package (pip install {pip}); "
                                "AdamW and Adafactor need nothing extra") from None
    return getattr(mod, cls)(groups, **kwargs)


def optimizer_label(name: str, optimizer) -> str:
    """`ss_optimizer` as kohya writes it: the class's module path, then the arguments it was given,
    e.g. `bitsandbytes.optim.adamw.AdamW8bit` or `torch.optim.adamw.AdamW(weight_decay=0.01)`."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    cls = type(inner)
    args = ",".join(f"{k}={v}" for k, v in OPTIMIZER_ARGS.get(name, {}).items())
    return f"{cls.__module__}.{cls.__name__}" + (f"({args})" if args else "")


def make_scheduler(name: str, optimizer, warmup: int, total: int):
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)


# ---------------------------------------------------------------------------------- randomness

def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, micro-batch): same noise on any device
    and after a resume."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 64 + micro) % (2**63))


# ---------------------------------------------------------------------------------- text inputs

def encode_text(pipe, arch: str, captions: list[str], settings: TrainSettings,
                device: torch.device) -> dict[str, torch.Tensor]:
    """The conditioning tensors each architecture's denoiser takes, batch-first."""
    # A1111 numbering (1 = last layer) -> diffusers' (layers skipped), as the generation core does
    skip = settings.clip_skip - 1 if settings.clip_skip and settings.clip_skip > 1 else None
    if arch == "sdxl":
        emb, _, pooled, _ = pipe.encode_prompt(captions, device=device, num_images_per_prompt=1,
                                               do_classifier_free_guidance=False, clip_skip=skip)
        return {"prompt_embeds": emb, "pooled": pooled}
    if arch in UNET_IDS:  # the one-CLIP UNets (SD1.5, SD2)
        with clip_skip_compat(pipe, skip is not None):
            emb, _ = pipe.encode_prompt(captions, device, 1, False, clip_skip=skip)
        return {"prompt_embeds": emb}
    if arch == "sd3":  # CLIP-L + CLIP-G + T5, each fed the caption, as generation encodes it
        emb, _, pooled, _ = pipe.encode_prompt(captions, prompt_2=None, prompt_3=None, device=device,
                                               num_images_per_prompt=1, do_classifier_free_guidance=False,
                                               clip_skip=skip, max_sequence_length=settings.t5_max_length)
        return {"prompt_embeds": emb, "pooled": pooled}
    emb, pooled, _ = pipe.encode_prompt(captions, prompt_2=None, device=device,
                                        max_sequence_length=settings.t5_max_length)
    return {"prompt_embeds": emb, "pooled": pooled}


# ------------------------------------------------------------------------------------- the loss

@dataclass
class NoiseSchedule:
    """Discrete DDPM schedule of the SD models (alphas_cumprod) and their prediction type."""

    alphas_cumprod: torch.Tensor
    prediction_type: str
    num_timesteps: int


def noise_schedule(pipe, arch: str, prediction_type: str | None) -> NoiseSchedule | None:
    if BY_ID[arch].flow_matching:
        return None
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
    pred = prediction_type or pipe.scheduler.config.get("prediction_type", "epsilon")
    if pred not in ("epsilon", "v_prediction"):
        raise RecipeError(f"prediction_type: expected epsilon or v_prediction (got {pred!r})")
    return NoiseSchedule(ddpm.alphas_cumprod.float(), pred, ddpm.config.num_train_timesteps)


def sd_loss(unet, sched: NoiseSchedule, latents: torch.Tensor, cond: dict[str, torch.Tensor],
            extra: dict[str, Any], gen: torch.Generator, settings: TrainSettings) -> torch.Tensor:
    """ε or v loss at uniform timesteps, with noise offset and min-SNR γ weighting."""
    b, device = latents.shape[0], latents.device
    noise = torch.randn(latents.shape, generator=gen)
    if settings.noise_offset:
        noise = noise + settings.noise_offset * torch.randn((b, latents.shape[1], 1, 1), generator=gen)
    t = torch.randint(0, sched.num_timesteps, (b,), generator=gen)
    ac = sched.alphas_cumprod[t].view(b, 1, 1, 1)
    noise = noise.to(device)
    ac_d = ac.to(device)
    noisy = ac_d.sqrt() * latents + (1 - ac_d).sqrt() * noise
    if sched.prediction_type == "v_prediction":
        target = ac_d.sqrt() * noise - (1 - ac_d).sqrt() * latents
    else:
        target = noise
    kwargs = {}
    if "pooled" in cond:
        kwargs["added_cond_kwargs"] = {"text_embeds": cond["pooled"], "time_ids": extra["time_ids"]}
    pred = unet(noisy, t.to(device), encoder_hidden_states=cond["prompt_embeds"], **kwargs).sample
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if settings.min_snr_gamma:
        snr = (ac / (1 - ac)).view(b)
        clipped = torch.clamp(snr, max=settings.min_snr_gamma)
        weight = clipped / (snr + 1) if sched.prediction_type == "v_prediction" else clipped / snr
        loss = loss * weight.to(device)
    return loss.mean()


def flow_noise(latents: torch.Tensor, gen: torch.Generator,
               settings: TrainSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_σ, target, σ) of flow matching: x_σ = (1−σ)·x0 + σ·ε, target ε − x0, σ = the shifted
    sigmoid of a standard normal (kohya's `logit_normal` sampling with a `shift`)."""
    b, device = latents.shape[0], latents.device
    noise = torch.randn(latents.shape, generator=gen).to(device)
    u = torch.sigmoid(torch.randn((b,), generator=gen))
    sigma = (settings.flow_shift * u / (1 + (settings.flow_shift - 1) * u)).to(device)
    s = sigma.view(b, 1, 1, 1)
    return (1 - s) * latents + s * noise, noise - latents, sigma


def sd3_loss(transformer, latents: torch.Tensor, cond: dict[str, torch.Tensor],
             gen: torch.Generator, settings: TrainSettings) -> torch.Tensor:
    """Flow matching for SD3/SD3.5: the MMDiT patchifies the latents itself and takes the
    timestep as σ·1000, the scale of the FlowMatchEulerDiscreteScheduler timesteps the SD3 pipeline
    passes it at generation.

    The loss is on the clean latents the prediction implies, x̂0 = x_σ − σ·v̂ ("preconditioned
    outputs"), as kohya's sd3_train_network.py always computes it (weighting scheme `none`) and
    diffusers' SD3 LoRA script does by default: σ²·|v̂ − v|², so high-noise steps count more than
    in a plain velocity loss. (FLUX keeps the velocity loss: kohya's recommended
    `model_prediction_type raw`, flux_loss below.)"""
    noisy, _, sigma = flow_noise(latents, gen, settings)
    pred = transformer(hidden_states=noisy, encoder_hidden_states=cond["prompt_embeds"],
                       pooled_projections=cond["pooled"], timestep=sigma * 1000).sample
    x0 = noisy.float() - sigma.view(-1, 1, 1, 1).float() * pred.float()
    return F.mse_loss(x0, latents.float())


def flux_loss(transformer, latents: torch.Tensor, cond: dict[str, torch.Tensor],
              gen: torch.Generator, settings: TrainSettings) -> torch.Tensor:
    """Flow matching on packed 2×2 latent patches: x_σ = (1−σ)·x0 + σ·ε, target ε − x0."""
    b, c, h, w = latents.shape
    device = latents.device
    noisy, target, sigma = flow_noise(latents, gen, settings)
    packed = noisy.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
    target = target.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(packed.shape)
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    emb = cond["prompt_embeds"]
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.full((b,), settings.guidance, device=device)
    pred = transformer(hidden_states=packed, encoder_hidden_states=emb,
                       pooled_projections=cond["pooled"], timestep=sigma, guidance=guidance,
                       img_ids=ids.reshape(-1, 3).to(device, packed.dtype),
                       txt_ids=torch.zeros(emb.shape[1], 3, device=device, dtype=packed.dtype)).sample
    return F.mse_loss(pred.float(), target.float())


# ----------------------------------------------------------------------------------- the data

@dataclass
class Batch:
    latents: torch.Tensor
    captions: list[str]
    time_ids: torch.Tensor | None


class DataSource:
    """Batches for the loop: cached latents, built captions, SDXL size conditioning."""

    def __init__(self, report, sampler, latent_cache, settings: TrainSettings, arch: str):
        self.report, self.sampler, self.cache, self.settings, self.arch = (report, sampler, latent_cache,
                                                                           settings, arch)

    def next(self, step: int) -> Batch:
        ex, ids, s = self.report.examples, self.report.bucket_ids, self.settings
        idx = self.sampler.next_batch()
        bucket = self.report.buckets[ids[idx[0]]]
        latents, crops, sizes = latent_batch(self.cache, [ex[i] for i in idx], bucket)
        caps = [build_caption(ex[i].caption, trigger=s.trigger, shuffle=s.shuffle_caption,
                              keep_tokens=s.keep_tokens, dropout_rate=s.caption_dropout_rate,
                              rng=caption_rng(s.seed, step, slot)) for slot, i in enumerate(idx)]
        time_ids = None
        if self.arch == "sdxl":  # original (h, w) + crop (top, left) + target (h, w)
            time_ids = torch.tensor([[*o, *c, bucket[1], bucket[0]] for o, c in zip(sizes, crops)],
                                    dtype=torch.float32)
        return Batch(latents, caps, time_ids)


# ----------------------------------------------------------------------------------- the run

@dataclass
class LoopState:
    """What changes while training and is saved for resume."""

    step: int = 0
    losses: list[dict[str, float]] = field(default_factory=list)
    elapsed_s: float = 0.0


@dataclass
class Hooks:
    """Called by the loop after an optimizer step (`step` is the number of steps done)."""

    on_step: Callable[[int], None] | None = None        # save checkpoint / state / samples


class Trainer:
    """Holds the pipeline, network, optimizer and data of one run; `train()` runs the loop."""

    def __init__(self, pipe, arch: str, net, data: DataSource, settings: TrainSettings,
                 out_dir: Path, accelerator, text_cache=None):
        self.pipe, self.arch, self.net, self.data, self.s = pipe, arch, net, data, settings
        self.out_dir = Path(out_dir)
        self.acc = accelerator  # from make_accelerator, before anything was placed on a device
        self.device = self.acc.device
        self.denoiser = getattr(pipe, BY_ID[arch].denoiser)
        self.sched = noise_schedule(pipe, arch, settings.prediction_type)
        groups = net.param_groups(settings.learning_rate, settings.unet_lr, settings.text_encoder_lr)
        self.optimizer = make_optimizer(settings.optimizer, groups)
        self.lr_scheduler = make_scheduler(settings.lr_scheduler, self.optimizer, settings.lr_warmup_steps,
                                           settings.max_steps)
        self.train_te = any(c.startswith("text_encoder") for c in net.models)
        self.text_cache = text_cache  # caption -> conditioning (frozen text encoders only)
        if settings.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
            for c, m in net.models.items():
                if c.startswith("text_encoder") and hasattr(m, "gradient_checkpointing_enable"):
                    m.gradient_checkpointing_enable()
        if self.acc.num_processes > 1:
            _ddp_syncs_only_trainable(self.denoiser)
        self.model, self.optimizer = self.acc.prepare(self.denoiser, self.optimizer)
        # trainable parameters DDP does not wrap (text-encoder LoRA): their gradients are averaged
        # across processes by hand in train_step
        wrapped = {id(p) for p in self.denoiser.parameters()}
        self.unwrapped_params = [p for g in self.optimizer.param_groups for p in g["params"]
                                 if id(p) not in wrapped]
        self.state = LoopState()

    # -- one micro-batch
    def conditioning(self, captions: list[str]) -> dict[str, torch.Tensor]:
        if self.train_te:
            with self.acc.autocast():
                return encode_text(self.pipe, self.arch, captions, self.s, self.device)
        if self.text_cache is not None:
            return self.text_cache(captions)
        with torch.no_grad():
            return encode_text(self.pipe, self.arch, captions, self.s, self.device)

    def micro_loss(self, batch: Batch, gen: torch.Generator) -> torch.Tensor:
        latents = batch.latents.to(self.device)
        cond = {k: v.to(self.device) for k, v in self.conditioning(batch.captions).items()}
        with self.acc.autocast():
            if self.arch == "flux":
                return flux_loss(self.model, latents, cond, gen, self.s)
            if self.arch == "sd3":
                return sd3_loss(self.model, latents, cond, gen, self.s)
            extra = {"time_ids": batch.time_ids.to(self.device) if batch.time_ids is not None else None}
            return sd_loss(self.model, self.sched, latents, cond, extra, gen, self.s)

    # -- one optimizer step
    def train_step(self, step: int) -> float:
        accum = self.s.gradient_accumulation_steps
        total = 0.0
        rank, world = self.acc.process_index, self.acc.num_processes
        for micro in range(accum):
            # every process advances the sampler alike and trains its own share of the batches
            batches = [self.data.next(step) for _ in range(world)]
            loss = self.micro_loss(batches[rank], step_generator(self.s.seed, step, micro * world + rank))
            self.acc.backward(loss / accum)
            total += loss.detach().float().item() / accum
        if world > 1:
            for p in self.unwrapped_params:
                if p.grad is not None:
                    p.grad = self.acc.reduce(p.grad, "mean")
            total = float(self.acc.reduce(torch.tensor([total], device=self.device), "mean")[0])
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.s.max_grad_norm and self.s.max_grad_norm > 0:
            self.acc.clip_grad_norm_(params, self.s.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    # -- the loop
    def train(self, hooks: Hooks | None = None, progress: bool = True, stop_at: int | None = None) -> LoopState:
        """Train from `state.step` to max_steps (or `stop_at`, for tests of resume)."""
        hooks = hooks or Hooks()
        end = min(self.s.max_steps, stop_at or self.s.max_steps)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        main = self.acc.is_main_process
        curve = self.out_dir / "loss.csv"
        if main:
            write_curve(curve, self.state.losses)
        for m in self.net.models.values():
            m.train()
        start = time.perf_counter() - self.state.elapsed_s
        with task("training", self.s.max_steps, "step", bar=progress and main) as bar, \
                open(curve if main else os.devnull, "a", newline="") as f:
            bar.advance(self.state.step)
            writer = csv.DictWriter(f, LOSS_FIELDS)
            while self.state.step < end:
                step = self.state.step
                loss = self.train_step(step)
                if not math.isfinite(loss):
                    raise RecipeError(f"the loss became {loss} at step {step + 1}; lower the "
                                      "learning_rate or use mixed_precision bf16/no")
                self.state.step = step + 1
                self.state.elapsed_s = time.perf_counter() - start
                row = {"step": step + 1, "loss": loss, "lr": self.lr_scheduler.get_last_lr()[0],
                       "epoch": self.data.sampler.epoch, "elapsed_s": round(self.state.elapsed_s, 3)}
                self.state.losses.append(row)
                if main:
                    writer.writerow(row)
                    f.flush()
                if hooks.on_step:
                    hooks.on_step(self.state.step)
                bar.advance(1, message=f"loss {loss:.4f}",
                            metrics={"loss": loss, "lr": row["lr"],
                                     "s/it": self.state.elapsed_s / max(1, self.state.step)})
        return self.state

    @torch.no_grad()
    def eval_loss(self, n: int = 8, seed: int = 12345) -> float:
        """Mean loss over a fixed set of (example, noise, timestep): comparable across steps."""
        rep, total = self.data.report, 0.0
        for m in self.net.models.values():
            m.eval()
        for i in range(n):
            j = i % len(rep.examples)
            ex = rep.examples[j]
            lat, crops, sizes = latent_batch(self.data.cache, [ex], rep.buckets[rep.bucket_ids[j]])
            b = rep.buckets[rep.bucket_ids[j]]
            tid = torch.tensor([[*sizes[0], *crops[0], b[1], b[0]]], dtype=torch.float32)
            batch = Batch(lat, [with_trigger(ex.caption, self.s.trigger)], tid)
            total += self.micro_loss(batch, step_generator(seed, i, 0)).float().item()
        for m in self.net.models.values():
            m.train()
        return total / n


def _ddp_syncs_only_trainable(model: torch.nn.Module) -> None:
    """DDP broadcasts every parameter and buffer from process 0 when it wraps a model, and buffers
    again at each forward. The frozen base is the same file in every process, so only the LoRA
    needs it: skipping the base avoids sending gigabytes at start (and fp8 tensors, which the
    collective backends may not take)."""
    from torch.nn.parallel import DistributedDataParallel

    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    frozen += [n for n, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)


def write_curve(path: Path, rows: list[dict[str, float]]) -> None:
    """(Re)write the loss CSV up to the current step: a resumed run continues a clean curve."""
    lines = [",".join(LOSS_FIELDS)] + [",".join(str(r[k]) for k in LOSS_FIELDS) for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n", overwrite=True)
