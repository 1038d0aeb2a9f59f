"""SDXL LoRA training step: s/step and peak memory, ours against a plain diffusers+peft step.

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

    python bench/gpu_train.py --device cuda --scale full --size 1024 --rank 16 --steps 6
    python bench/gpu_train.py --device cpu --scale tiny --size 64 --steps 2     (smoke test)
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
        from workbench.core.load import load_pipeline
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


def measure(name: str, unet, params, size: int, batch: int, steps: int, device: str, ckpt: bool) -> dict:
    from workbench.train.loop import NoiseSchedule, TrainSettings, sd_loss, step_generator

    if ckpt:
        unet.enable_gradient_checkpointing()
    unet.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    ac = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)
    sched = NoiseSchedule(ac, "epsilon", 1000)
    latents, cond, extra = inputs(unet, size, batch, device)
    settings = TrainSettings()
    cuda = device.startswith("cuda")
    autocast = torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16,
                              enabled=cuda)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 1):  # the first step warms up (kernels, allocator) and is not timed
        t0 = time.perf_counter()
        with autocast:
            loss = sd_loss(unet, sched, latents, cond, extra, step_generator(0, step, 0), settings)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    n = sum(p.numel() for p in params)
    row = {"variant": name, "s_per_step": sum(times) / len(times), "peak_gib": peak,
           "trainable_params": n, "loss": float(loss.detach())}
    print(f"{name:10s} {row['s_per_step']:.3f} s/step  peak "
          + (f"{peak:.2f} GiB" if peak is not None else "n/a (cpu)") + f"  {n / 1e6:.2f} M trainable")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--scale", choices=("full", "tiny"), default="full")
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant (after 1 warm-up)")
    ap.add_argument("--variants", default="plain,ours,ours+ckpt")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--tmp", type=Path, default=Path("/tmp/wb-bench-train"))
    a = ap.parse_args()
    a.tmp.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    rows = []
    for variant in a.variants.split(","):
        unet, shapes = build_unet(a.scale, dtype, a.device, a.tmp)
        params = plain_setup(unet, a.rank) if variant == "plain" else ours_setup(unet, shapes, a.rank)
        rows.append(measure(variant, unet, params, a.size, a.batch, a.steps, a.device,
                            ckpt=variant.endswith("+ckpt")))
        del unet, params
        gc.collect()
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
    by = {r["variant"]: r for r in rows}
    summary = {"device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
               "scale": a.scale, "size": a.size, "batch": a.batch, "rank": a.rank, "rows": rows}
    if "ours" in by and "ours+ckpt" in by:
        ratio = by["ours+ckpt"]["s_per_step"] / by["ours"]["s_per_step"]
        summary["ckpt_time_ratio"] = ratio
        peak = by["ours+ckpt"]["peak_gib"]
        ok = ratio <= 1.2 and (peak is None or peak <= 10)
        print(f"ours+ckpt / ours time: {ratio:.2f}x (target <= 1.2x); peak "
              + (f"{peak:.2f} GiB (target <= 10)" if peak is not None else "n/a") + ("  OK" if ok else "  MISSED"))
    if a.out:
        a.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
