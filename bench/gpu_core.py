"""Generation-core memory techniques on one GPU: s/step and peak VRAM per VRAM budget, against
diffusers' own techniques in the same run.

    python bench/gpu_core.py --arch sdxl,flux --scale full --budgets 0,12000,8000,4000 --steps 4 \
        --out results_gpu_core.json                      # on a CUDA machine (< 8 min on an H100)
    python bench/gpu_core.py --device cpu --scale tiny --out /tmp/gpu_core_tiny.json   # smoke test

The denoiser (SDXL UNet with CFG batch 2, FLUX.1 transformer with guidance) is built from the bundled
real configs (workbench/formats/data) with random weights, directly on the device, then kept as a host
master copy; each method runs on a fresh copy. A denoiser step = one forward at --size² (1024²).

Methods: `resident` (the reference: weights in the compute dtype on the GPU), `ours` (plan_memory +
apply_plan at each budget: fp8 storage and/or partial residency with streaming), `ours_nf4`
(weights="nf4"), and diffusers' techniques: `model_offload` (accelerate's cpu_offload_with_hook, what
enable_model_cpu_offload puts on each component), `group_leaf_stream` (enable_group_offload
leaf_level + use_stream), `layerwise_fp8` (enable_layerwise_casting e4m3fn), `bnb_nf4` (bitsandbytes
Linear4bit, what diffusers' BitsAndBytesConfig swaps in). Diffusers' techniques have no budget knob:
each runs once, and fits a budget when its peak does. Ours runs under
torch.cuda.set_per_process_memory_fraction(budget), so a plan that does not hold its budget fails
with OOM. Peak = torch.cuda.max_memory_allocated (what the budget counts; the CUDA context is extra).

--scale tiny builds the tiny test configs and scales every budget by tiny/full weight bytes, on a
simulated CUDA device description, so the CPU smoke test makes the same decisions (fp8, partial).
The JSON is rewritten after every run; ratios are s/step over the resident s/step of the same run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workbench.pipeline.memory_plan import DeviceInfo, plan_memory, probe_device  # noqa: E402
from workbench.pipeline.sizes import GB, MB, activation_bytes, module_size  # noqa: E402
from workbench.pipeline.streaming import apply_plan  # noqa: E402

DATA = ROOT / "workbench" / "formats" / "data"
BASELINES = ("model_offload", "group_leaf_stream", "layerwise_fp8", "bnb_nf4")
TARGETS = [("flux", 12000, "ours_nf4", 1.15), ("flux", 12000, "ours", 1.4), ("sdxl", 4000, "ours", 1.5)]


def log(msg: str) -> None:
    print(msg, flush=True)


def _config(arch: str, scale: str) -> dict:
    if scale == "tiny":
        if arch == "sdxl":
            from workbench.testing.sdxl import UNET_CONFIG
            return dict(UNET_CONFIG)
        from workbench.testing.flux import TRANSFORMER
        return dict(TRANSFORMER, guidance_embeds=True)
    path = DATA / ("sdxl/unet" if arch == "sdxl" else "flux/dev/transformer") / "config.json"
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def _cls(arch: str):
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel
    return UNet2DConditionModel if arch == "sdxl" else FluxTransformer2DModel


def build(arch: str, scale: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Random weights of the real architecture, created on `device` in `dtype` (no fp32 detour)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = _cls(arch)(**_config(arch, scale))
    finally:
        torch.set_default_dtype(old)
    return model.eval().requires_grad_(False)


def full_bytes(arch: str, dtype: torch.dtype) -> int:
    with torch.device("meta"):
        m = _cls(arch)(**_config(arch, "full"))
    return sum(p.numel() for p in m.parameters()) * torch.tensor([], dtype=dtype).element_size()


def inputs(arch: str, model, size: int, device, dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    lat = size // 8
    c = model.config

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)
    if arch == "sdxl":
        b = 2  # classifier-free guidance batch
        return dict(sample=r(b, c.in_channels, lat, lat), timestep=torch.tensor([500.0] * b, device=device),
                    encoder_hidden_states=r(b, 77, c.cross_attention_dim),
                    added_cond_kwargs=dict(text_embeds=r(b, c.projection_class_embeddings_input_dim
                                                         - 6 * c.addition_time_embed_dim),
                                           time_ids=r(b, 6)))
    tokens, txt = (lat // 2) ** 2, 512 if size >= 512 else 8
    return dict(hidden_states=r(1, tokens, c.in_channels), encoder_hidden_states=r(1, txt, c.joint_attention_dim),
                pooled_projections=r(1, c.pooled_projection_dim), timestep=torch.tensor([0.5], device=device),
                img_ids=torch.zeros(tokens, 3, device=device), txt_ids=torch.zeros(txt, 3, device=device),
                guidance=torch.tensor([3.5], device=device))


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, inp, steps: int, device) -> float:
    with torch.no_grad():
        model(**inp)  # warm-up; our streamer records the block order here
        sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            model(**inp)
        sync(device)
    return (time.perf_counter() - t) / steps


def run_method(method, arch, master, args, device, dtype, budget_mb, sim) -> dict:
    """One method on a fresh copy of `master` (host) -> result row."""
    rec = {"arch": arch, "method": method, "budget_mb": budget_mb}
    model = copy.deepcopy(master)
    handle = None
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        frac = 1.0 if not budget_mb or not method.startswith("ours") else min(1.0, budget_mb * MB / total)
        torch.cuda.set_per_process_memory_fraction(frac, device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        if method == "resident":
            model.to(device)
        elif method.startswith("ours"):
            dev_info = sim or probe_device(str(device))
            scale = args.ratio
            size = module_size("unet" if arch == "sdxl" else "transformer", model)
            unlimited = dev_info.free_vram / MB if sim else None
            plan = plan_memory([size], device=dev_info, arch=arch,
                               vram_budget_mb=(budget_mb * scale if budget_mb else unlimited),
                               weights="nf4" if method == "ours_nf4" else "auto",
                               width=args.size, height=args.size,
                               work_bytes={"denoise": int(activation_bytes(arch, args.full_size, args.full_size)
                                                          * scale)} if sim else None)
            if device.type == "cpu":  # the simulated GPU plans fp16/bf16 compute; the CPU runs fp32
                plan = dataclasses.replace(plan, compute_dtype="fp32")
            d = plan.decisions[0]
            rec["plan"] = {"storage": d.storage, "placement": d.placement, "gpu_gb": d.gpu_bytes / GB,
                           "streamed_gb": d.streamed_bytes / GB, "resident_blocks": d.resident_blocks,
                           "blocks": d.blocks, "est_peak_gb": plan.stage_peaks.get("denoise", 0) / GB}

            class _Pipe:  # apply_plan works on pipeline attributes
                pass
            pipe = _Pipe()
            setattr(pipe, d.name, model)
            handle = apply_plan(pipe, plan, device)
        elif method == "model_offload":
            from accelerate import cpu_offload_with_hook
            model, hook = cpu_offload_with_hook(model, device)
            handle = hook
        elif method == "group_leaf_stream":
            model.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                       offload_type="leaf_level", use_stream=cuda)
        elif method == "layerwise_fp8":  # rounded on the GPU (the CPU is slow at it)
            model.to(device)
            model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
        elif method == "bnb_nf4":
            from workbench.pipeline.precision import apply_storage
            apply_storage(model, "nf4", dtype, device=device)
            model.to(device)
        rec["setup_s"] = round(time.perf_counter() - t0, 2)
        if cuda:  # the peak that matters is while denoising, not while loading
            rec["setup_peak_gb"] = torch.cuda.max_memory_allocated(device) / GB
            torch.cuda.reset_peak_memory_stats(device)
        inp = inputs(arch, model, args.size, device, dtype)
        rec["s_per_step"] = time_steps(model, inp, args.steps, device)
        rec["status"] = "ok"
    except torch.cuda.OutOfMemoryError as e:
        rec["status"], rec["error"] = "oom", str(e).splitlines()[0][:300]
    except Exception as e:  # noqa: BLE001 - a method failing is a result, not a crash
        rec["status"], rec["error"] = "error", f"{type(e).__name__}: {e}"[:300]
    if cuda:
        rec["peak_gb"] = torch.cuda.max_memory_allocated(device) / GB
        rec["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / GB
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    if handle is not None and hasattr(handle, "remove"):
        handle.remove()
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return rec


def summarize(rows: list[dict]) -> dict:
    ref = {r["arch"]: r["s_per_step"] for r in rows if r["method"] == "resident" and r["status"] == "ok"}
    for r in rows:
        if r.get("status") == "ok" and r["arch"] in ref:
            r["ratio"] = round(r["s_per_step"] / ref[r["arch"]], 3)
    out = {}
    for arch, budget, method, limit in TARGETS:
        hit = next((r for r in rows if (r["arch"], r["budget_mb"], r["method"]) == (arch, budget, method)), None)
        best = [r for r in rows if r["arch"] == arch and r["method"] in BASELINES and r.get("ratio")
                and (r.get("peak_gb") is None or r["peak_gb"] * GB <= budget * MB)]
        best_r = min(best, key=lambda r: r["ratio"], default=None)
        out[f"{arch}@{budget}MB {method} <= {limit}x"] = {
            "ratio": hit.get("ratio") if hit else None, "met": bool(hit and hit.get("ratio") and hit["ratio"] <= limit),
            "diffusers_best_fitting": (best_r["method"], best_r["ratio"]) if best_r else None}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="sdxl,flux")
    ap.add_argument("--scale", choices=("tiny", "full"), default="full")
    ap.add_argument("--budgets", default="0,12000,8000,4000", help="MB (10^6 B); 0 = unlimited")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=None, help="image side (default 1024 full, 64 tiny)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--methods", default="resident,ours,ours_nf4," + ",".join(BASELINES))
    ap.add_argument("--out", default="results_gpu_core.json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    args.size = args.size or (1024 if args.scale == "full" else 64)
    args.full_size = 1024 if args.scale == "tiny" else args.size
    budgets = [int(b) for b in args.budgets.split(",")]
    methods = args.methods.split(",")
    result = {"meta": {"argv": sys.argv[1:], "torch": torch.__version__, "python": platform.python_version(),
                       "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"},
              "runs": []}
    try:
        import diffusers
        result["meta"]["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    started = time.perf_counter()

    def save():
        result["targets"] = summarize(result["runs"])
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, args.out)

    for arch in args.arch.split(","):
        dtype = torch.float32 if device.type == "cpu" else (torch.float16 if arch == "sdxl" else torch.bfloat16)
        t = time.perf_counter()
        master = build(arch, args.scale, device, dtype).to("cpu")
        tiny_bytes = sum(p.numel() * p.element_size() for p in master.parameters())
        args.ratio = tiny_bytes / full_bytes(arch, dtype) if args.scale == "tiny" else 1.0
        sim = None
        if args.scale == "tiny" or device.type == "cpu":  # describe a GPU, scaled to the tiny model
            sim = DeviceInfo("cuda", f"simulated on {device.type}", int(80 * GB * args.ratio),
                             int(80 * GB * args.ratio), bf16=True, fp8_matmul=True, pinned_ok=False)
        log(f"{arch}: built {tiny_bytes / GB:.2f} GB in {time.perf_counter() - t:.1f}s")
        plan_rows = [("resident", 0)] if "resident" in methods else []
        plan_rows += [(m, b) for b in budgets for m in ("ours", "ours_nf4") if m in methods]
        plan_rows += [(m, 0) for m in BASELINES if m in methods]
        for method, budget in plan_rows:
            rec = run_method(method, arch, master, args, device, dtype, budget, sim)
            result["runs"].append(rec)
            save()
            log(f"{arch} {method:18s} budget {budget or '-':>6} MB: {rec['status']:5s} "
                f"s/step {rec.get('s_per_step', float('nan')):.4f} peak {rec.get('peak_gb', float('nan')):.2f} GB "
                f"{rec.get('plan', '')} {rec.get('error', '')} [{time.perf_counter() - started:.0f}s]")
        del master
        gc.collect()
    save()
    log(json.dumps(result["targets"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
