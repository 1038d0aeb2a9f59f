"""CPU few-step image: our whole path vs a plain diffusers fp32 pipeline, same run, same file.

An SD1.5-size checkpoint with random weights (the real key set and shapes) is written once; both
sides then load it and make one 512² image in 4 LCM steps at guidance 1 (an LCM-LoRA setting: no
unconditional pass), from the same seed:

  plain   StableDiffusionPipeline.from_single_file(..., torch_dtype=float32), LCMScheduler
  ours    workbench.pipeline.generate.load_model(weights="auto") + generate() (fp32 on CPUs without
          native bf16, bf16 + channels_last with it), with and without a TAESD decoder of the real
          TAESD size (random weights); `--with-bf16` also times forced bf16

Timing is the whole call (text encoder, 4 UNet steps, decode), best of `--repeat`, after one
warm-up call; UNet step time is taken from the step callback. Prints a table with ratios and
writes JSON.

    python bench/cpu_fewstep.py                    # full SD1.5 size, 512², 4 steps (minutes)
    python bench/cpu_fewstep.py --scale tiny --size 64   # seconds: checks the script itself
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def model_file(scale: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"sd15_{scale}_random.safetensors"
    if path.exists():
        return path
    if scale == "full":
        from workbench.testing.full_size import write_random

        return write_random(path, "sd15", seed=0)
    from workbench.testing import build_tiny

    return build_tiny("sd15", path, seed=0)


def tiny_vae_file(scale: str, folder: Path) -> Path:
    from workbench.testing.taesd import build_tiny_taesd

    path = folder / f"taesd_{scale}.safetensors"
    if not path.exists():
        build_tiny_taesd(path, width=64 if scale == "full" else 8, seed=0)
    return path


def timed_calls(call, repeat: int) -> tuple[float, list[float]]:
    """(best whole-call seconds, UNet step seconds of the best call), after one warm-up."""
    call([])
    best, best_steps = float("inf"), []
    for _ in range(repeat):
        marks: list[float] = []
        t0 = time.perf_counter()
        call(marks)
        total = time.perf_counter() - t0
        if total < best:
            best = total
            best_steps = [b - a for a, b in zip([t0] + marks[:-1], marks)]
    return best, best_steps


def run_plain(path: Path, size: int, steps: int, repeat: int) -> dict:
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from workbench.formats.pipeline_config import config_dir

    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(config_dir(path, "sd15")), local_files_only=True,
        torch_dtype=torch.float32, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def call(marks):
        def cb(_p, _i, _t, kw):
            marks.append(time.perf_counter())
            return kw
        with torch.inference_mode():
            return pipe("a lighthouse at dusk", num_inference_steps=steps, guidance_scale=1.0,
                        width=size, height=size, generator=torch.Generator("cpu").manual_seed(1),
                        callback_on_step_end=cb).images[0]

    best, step_times = timed_calls(call, repeat)
    return {"seconds": best, "unet_step_s": step_times}


def run_ours(path: Path, size: int, steps: int, repeat: int, weights: str,
             tiny_vae: Path | None) -> dict:
    from workbench.pipeline import generate as core

    model = core.load_model(path, device="cpu", weights=weights, tiny_vae=tiny_vae)
    settings = core.ImageSettings("a lighthouse at dusk", "", "LCM", steps, 1.0, size, size)
    pipe = model.pipe
    original_call = type(pipe).__call__

    def call(marks):
        def cb(_p, _i, _t, kw):
            marks.append(time.perf_counter())
            return kw

        def patched(self, *a, **kw):  # add our timing callback beside generate()'s own
            inner = kw.get("callback_on_step_end")

            def both(p, i, t, k):
                k = inner(p, i, t, k) if inner else k
                return cb(p, i, t, k)
            kw["callback_on_step_end"] = both
            return original_call(self, *a, **kw)

        type(pipe).__call__ = patched
        try:
            return core.generate(model, settings, [1])[0].image
        finally:
            type(pipe).__call__ = original_call

    best, step_times = timed_calls(call, repeat)
    return {"seconds": best, "unet_step_s": step_times, "weights": weights,
            "tiny_vae": bool(tiny_vae), "dtype": str(model.dtype)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=["full", "tiny"], default="full")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--with-bf16", action="store_true",
                    help="also time weights: bf16 (slow where the CPU has no native bf16)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--work", type=Path, default=ROOT / "outputs" / "bench")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results_cpu_fewstep.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    path = model_file(args.scale, args.work)
    taesd = tiny_vae_file(args.scale, args.work)
    results: dict = {"scale": args.scale, "size": args.size, "steps": args.steps,
                     "threads": torch.get_num_threads(), "torch": torch.__version__,
                     "cpu_capability": torch.backends.cpu.get_cpu_capability(), "runs": {}}
    from workbench.hardware import cpu_has_native_bf16

    results["cpu_native_bf16"] = cpu_has_native_bf16()
    runs = {
        "plain diffusers fp32": lambda: run_plain(path, args.size, args.steps, args.repeat),
        "ours auto": lambda: run_ours(path, args.size, args.steps, args.repeat, "auto", None),
        "ours auto + TAESD": lambda: run_ours(path, args.size, args.steps, args.repeat, "auto", taesd),
    }
    if args.with_bf16:
        runs["ours bf16 + TAESD"] = lambda: run_ours(path, args.size, args.steps, args.repeat, "bf16",
                                                     taesd)
    for name, fn in runs.items():
        results["runs"][name] = fn()
        base = results["runs"]["plain diffusers fp32"]["seconds"]
        r = results["runs"][name]
        step = min(r["unet_step_s"]) if r["unet_step_s"] else float("nan")
        print(f"{name:24s} {r['seconds']:7.2f} s/image  {r['seconds'] / base:5.2f}x plain   "
              f"UNet step {step:6.2f} s", flush=True)
        args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
