"""LoRA training step: s/step and peak memory. SDXL: ours against a plain diffusers+peft step.
FLUX.1: ours on an fp8 (and NF4) frozen base, against issue #5's "FLUX.1-size LoRA within 12 GB".

Random weights of the real sizes (bundled SDXL UNet config, `--scale full`) or the tiny test model
(`--scale tiny`, runs anywhere). Text-encoder outputs and latents are random tensors of the real
shapes, as with cached latents and text outputs (the recipe's 12 GB setup trains the UNet only).

Variants, all in the same process, one after another (peak memory is reset in between):
  plain      diffusers UNet + peft LoraConfig(r, alpha=r, to_q/to_k/to_v/to_out.0), bf16 weights,
             AdamW, no gradient checkpointing (the diffusers example script's step)
  ours       workbench.train: kohya's full target set from the fixed tables, same rank, fp32 adapter,
             bf16 base, AdamW, no checkpointing
  ours+ckpt  the same with gradient checkpointing (the 12 GB setting)
Targets (issue #5): ours+ckpt peak <= 10 GB at <= 1.2x the time of `ours` (no checkpointing).

`--arch flux`: a FluxTransformer2DModel of the FLUX.1-dev size (bundled config; `--scale tiny`: the
tiny test model) with random bf16 weights built on the device, the frozen base stored as fp8
(`quantize_base(..., "fp8")`) and, where bitsandbytes and CUDA are present, NF4; kohya's FLUX module
set at `--rank` from the fixed tables, fp32 adapter, gradient checkpointing, AdamW; random cached
inputs of the real shapes (1024²: 4096 image tokens of 64 channels, 512 T5 tokens of 4096, pooled
768, guidance 1). Target: peak allocated GPU memory <= 12e9 bytes. Peak memory is that of the
training steps (the resident base included); building the bf16 model first is not counted, as a
real run streams the weights into their low-bit storage.

    python bench/gpu_train.py --device cuda --scale full --size 1024 --rank 16 --steps 6
    python bench/gpu_train.py --arch sdxl,flux --device cuda --steps 4 --out results_gpu_train.json
    python bench/gpu_train.py --device cpu --scale tiny --size 64 --steps 2     (smoke test)
    python bench/gpu_train.py --arch flux --device cpu --scale tiny --size 64 --steps 2
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import types
from pathlib import Path

import torch


def build_unet(scale: str, dtype: torch.dtype, device: str, tiny_dir: Path):
    """(unet, checkpoint shapes for the LoRA tables)."""
    from diffusers import UNet2DConditionModel

    if scale == "tiny":
        from workbench.pipeline.load import load_pipeline
        from workbench.formats.safetensors_io import read_header
        from workbench.testing import build_tiny

        path = build_tiny("sdxl", tiny_dir / "sdxl_tiny.safetensors")
        unet = load_pipeline(path, "sdxl", torch_dtype=dtype).unet
        return unet.to(device), read_header(path).shapes()
    from workbench.testing.full_size import DATA, real_layout

    cfg = json.loads((DATA / "sdxl" / "unet" / "config.json").read_text())
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(cfg).to(dtype)
    return unet, {k: s for k, (_, s) in real_layout("sdxl").items()}


def inputs(unet, size: int, batch: int, device: str):
    c = unet.config
    lat = size // 8
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, c.in_channels, lat, lat, generator=g).to(device)
    emb = torch.randn(batch, 77, c.cross_attention_dim, generator=g).to(device)
    pooled = torch.randn(batch, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim,
                         generator=g).to(device)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=torch.float32).to(device)
    return latents, {"prompt_embeds": emb, "pooled": pooled}, {"time_ids": time_ids}


def plain_setup(unet, rank: int):
    import peft

    unet.requires_grad_(False)
    peft.inject_adapter_in_model(peft.LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                                 target_modules=["to_k", "to_q", "to_v", "to_out.0"]), unet)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def ours_setup(unet, shapes, rank: int):
    from workbench.train.network import inject, plan_network

    plan = plan_network("sdxl", shapes, rank=rank, alpha=rank)
    net = inject(types.SimpleNamespace(unet=unet), plan)
    return list(net.named_trainable().values())


FLUX_CONFIG = Path("flux") / "dev" / "transformer" / "config.json"


def build_flux(scale: str, dtype: torch.dtype, device: str, tiny_dir: Path):
    """(transformer, original-layout FLUX shapes for the LoRA tables). Full size: random weights
    created on `device` directly in `dtype` (no fp32 detour: 24 GB in bf16)."""
    from diffusers import FluxTransformer2DModel

    if scale == "tiny":
        from workbench.pipeline.load import load_pipeline
        from workbench.formats.safetensors_io import read_header
        from workbench.testing import build_tiny

        path = tiny_dir / "flux_tiny.safetensors"
        if not path.exists():
            build_tiny("flux", path)
        model = load_pipeline(path, "flux", torch_dtype=dtype).transformer
        return model.to(device).requires_grad_(False), read_header(path).shapes()
    from workbench.formats import dit_keys
    from workbench.testing.full_size import DATA

    cfg = {k: v for k, v in json.loads((DATA / FLUX_CONFIG).read_text()).items() if not k.startswith("_")}
    with torch.device("meta"):  # shapes only: diffusers names -> BFL names, as a real file has them
        sd = FluxTransformer2DModel(**cfg).state_dict()
    orig = dit_keys.to_original(sd, dit_keys.flux_rules(sd), prefix=dit_keys.FLUX_PREFIX)
    shapes = {k: tuple(v.shape) for k, v in orig.items()}
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**cfg)
    finally:
        torch.set_default_dtype(old)
    return model.requires_grad_(False), shapes


def flux_inputs(model, size: int, batch: int, t5_tokens: int, device: str):
    """Cached latents (16 channels at 1/8: 4096 packed 2x2 tokens of 64 at 1024²), T5 and CLIP outputs."""
    c = model.config
    lat = size // 8
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, c.in_channels // 4, lat, lat, generator=g).to(device)
    emb = torch.randn(batch, t5_tokens, c.joint_attention_dim, generator=g).to(device)
    pooled = torch.randn(batch, c.pooled_projection_dim, generator=g).to(device)
    return latents, {"prompt_embeds": emb, "pooled": pooled}


def flux_setup(model, shapes, rank: int, base: str, dtype: torch.dtype, device: str):
    """Low-bit frozen base first (as the trainer does), then the adapter; returns its parameters."""
    from workbench.train.network import inject, plan_network, quantize_base

    with torch.device(device):  # anything quantize_base allocates goes straight to the device
        n = quantize_base(model, base, dtype)
    if base == "nf4":
        model.to(device)  # bitsandbytes quantizes a Params4bit when it is moved to its device
    plan = plan_network("flux", shapes, rank=rank, alpha=rank)
    net = inject(types.SimpleNamespace(transformer=model), plan)
    print(f"flux base {base}: {n} Linear layers converted, {len(plan.modules)} LoRA modules", flush=True)
    return list(net.named_trainable().values())


def nf4_missing(device: str) -> str | None:
    """Why NF4 cannot run here, or None (bitsandbytes >= 0.48 also quantizes on the CPU)."""
    from workbench.pipeline.precision import nf4_available

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "bitsandbytes is not installed"
    kind = "cuda" if device.startswith("cuda") else "cpu"
    return None if nf4_available(kind) else f"this bitsandbytes cannot quantize on {kind}"


def measure(name: str, model, params, loss_fn, steps: int, device: str, ckpt: bool) -> dict:
    """Time `steps` optimizer steps after one warm-up; peak allocated memory of the steps."""
    if ckpt:
        model.enable_gradient_checkpointing()
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    cuda = device.startswith("cuda")
    autocast = torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16,
                              enabled=cuda)
    resident = None
    if cuda:
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 1):  # the first step warms up (kernels, allocator) and is not timed
        t0 = time.perf_counter()
        with autocast:
            loss = loss_fn(step)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t0)
    peak_bytes = torch.cuda.max_memory_allocated() if cuda else None
    peak = peak_bytes / 2**30 if cuda else None
    n = sum(p.numel() for p in params)
    row = {"variant": name, "s_per_step": sum(times) / len(times), "peak_gib": peak,
           "peak_bytes": peak_bytes, "resident_bytes": resident, "trainable_params": n,
           "loss": float(loss.detach())}
    print(f"{name:14s} {row['s_per_step']:.3f} s/step  peak "
          + (f"{peak:.2f} GiB ({peak_bytes / 1e9:.2f} GB)" if peak is not None else "n/a (cpu)")
          + f"  {n / 1e6:.2f} M trainable", flush=True)
    return row


def sdxl_loss(unet, size: int, batch: int, device: str):
    from workbench.train.loop import (
        NoiseSchedule,
        TrainSettings,
        sd_loss,
        step_generator,
    )

    ac = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)
    sched = NoiseSchedule(ac, "epsilon", 1000)
    latents, cond, extra = inputs(unet, size, batch, device)
    settings = TrainSettings()
    return lambda step: sd_loss(unet, sched, latents, cond, extra, step_generator(0, step, 0), settings)


def flux_loss_fn(model, size: int, batch: int, t5_tokens: int, device: str):
    from workbench.train.loop import TrainSettings, flux_loss, step_generator

    latents, cond = flux_inputs(model, size, batch, t5_tokens, device)
    settings = TrainSettings()  # guidance 1.0, kohya's flow shift
    return lambda step: flux_loss(model, latents, cond, step_generator(0, step, 0), settings)


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def write(summary: dict, out: Path | None) -> None:
    """Rewritten after every variant, so a run cut short still leaves its numbers."""
    if out:
        out.write_text(json.dumps(summary, indent=2) + "\n")


def run_sdxl(a, dtype: torch.dtype, summary: dict) -> None:
    rows = summary["sdxl"]["rows"]
    for variant in a.variants.split(","):
        unet, shapes = build_unet(a.scale, dtype, a.device, a.tmp)
        params = plain_setup(unet, a.rank) if variant == "plain" else ours_setup(unet, shapes, a.rank)
        rows.append(measure(variant, unet, params, sdxl_loss(unet, a.size, a.batch, a.device), a.steps,
                            a.device, ckpt=variant.endswith("+ckpt")))
        write(summary, a.out)
        del unet, params
        free(a.device)
    by = {r["variant"]: r for r in rows}
    if "ours" in by and "ours+ckpt" in by:
        ratio = by["ours+ckpt"]["s_per_step"] / by["ours"]["s_per_step"]
        summary["sdxl"]["ckpt_time_ratio"] = ratio
        peak = by["ours+ckpt"]["peak_gib"]
        ok = ratio <= 1.2 and (peak is None or peak <= 10)
        print(f"ours+ckpt / ours time: {ratio:.2f}x (target <= 1.2x); peak "
              + (f"{peak:.2f} GiB (target <= 10)" if peak is not None else "n/a") + ("  OK" if ok else "  MISSED"))
        write(summary, a.out)


def run_flux(a, dtype: torch.dtype, summary: dict) -> None:
    rows = summary["flux"]["rows"]
    for base in a.flux_bases.split(","):
        name = f"ours_{base}+ckpt"
        why = nf4_missing(a.device) if base == "nf4" else None
        if why:
            print(f"{name:14s} skipped: {why}", flush=True)
            rows.append({"variant": name, "skipped": why})
            write(summary, a.out)
            continue
        model, shapes = build_flux(a.scale, dtype, a.device, a.tmp)
        params = flux_setup(model, shapes, a.rank, base, dtype, a.device)
        row = measure(name, model, params, flux_loss_fn(model, a.size, a.batch, a.t5_tokens, a.device),
                      a.steps, a.device, ckpt=True)
        if row["peak_bytes"] is not None:
            row["fits_12gb"] = row["peak_bytes"] <= 12e9
            print(f"{name:14s} peak {row['peak_bytes'] / 1e9:.2f} GB, resident "
                  f"{row['resident_bytes'] / 1e9:.2f} GB: " + ("<= 12 GB OK" if row["fits_12gb"] else "> 12 GB MISSED"),
                  flush=True)
        rows.append(row)
        write(summary, a.out)
        del model, params
        free(a.device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sdxl", help="sdxl, flux or sdxl,flux")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--scale", choices=("full", "tiny"), default="full")
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant (after 1 warm-up)")
    ap.add_argument("--variants", default="plain,ours,ours+ckpt", help="SDXL variants")
    ap.add_argument("--flux-bases", default="fp8,nf4", help="FLUX frozen-base storage: fp8, nf4")
    ap.add_argument("--t5-tokens", type=int, default=512, help="FLUX text tokens (T5 max length)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--tmp", type=Path, default=Path("/tmp/wb-bench-train"))
    a = ap.parse_args()
    archs = a.arch.split(",")
    if set(archs) - {"sdxl", "flux"}:
        ap.error(f"--arch: expected sdxl, flux or both (got {a.arch!r})")
    a.tmp.mkdir(parents=True, exist_ok=True)
    if a.device == "cpu" and a.scale == "tiny":
        torch.set_num_threads(1)  # tiny matmuls: thread hand-offs cost more than they give (20x on 2 cores)
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    summary = {"device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
               "torch": torch.__version__, "scale": a.scale, "size": a.size, "batch": a.batch,
               "rank": a.rank, "steps": a.steps}
    for arch in archs:
        summary[arch] = {"rows": []}
    if "sdxl" in archs:
        run_sdxl(a, dtype, summary)
    if "flux" in archs:
        summary["flux"]["target_bytes"] = 12e9
        run_flux(a, dtype, summary)
    write(summary, a.out)


if __name__ == "__main__":
    main()
