"""Preview images while training: fixed prompts and seeds through the generation core.

The adapter is live in the pipeline being trained, so a sample shows exactly the current weights.
Sampling must not change the run: the global RNG is forked (LoRA dropout keeps its sequence, so a
run with samples trains the same weights as one without) and the models go back to train mode.
Files: `<output.dir>/samples/step-00000250_00.png` (prompt index after the underscore), each with
A1111 parameters and provenance, written atomically by `save_image`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from workbench.pipeline.generate import ImageSettings, Model, generate, save_image


def sample_paths(out_dir: Path, step: int, n_prompts: int) -> list[Path]:
    return [Path(out_dir) / "samples" / f"step-{step:08d}_{i:02d}.png" for i in range(n_prompts)]


def make_samples(pipe, arch: str, spec, step: int, out_dir: Path, *, width: int, height: int,
                 models: dict[str, torch.nn.Module], model_name: str = "", model_hash: str = "",
                 clip_skip: int | None = None) -> list[Path]:
    """One image per prompt of `spec` (a recipe `samples:` section) at `step`; returns the paths."""
    model = Model.from_pipeline(pipe, arch, name=model_name, model_hash=model_hash)
    scheduler = pipe.scheduler
    paths = sample_paths(out_dir, step, len(spec.prompts))
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    for m in models.values():
        m.eval()
    try:
        with torch.random.fork_rng(devices=devices):
            for prompt, path in zip(spec.prompts, paths):
                settings = ImageSettings(prompt=prompt, negative_prompt=spec.negative_prompt,
                                         sampler=spec.sampler, steps=spec.steps, cfg=spec.cfg,
                                         width=width, height=height, clip_skip=clip_skip)
                image = generate(model, settings, [spec.seed])[0]
                image.provenance["training_step"] = step
                save_image(image, path, overwrite=True)
    finally:
        pipe.scheduler = scheduler
        for m in models.values():
            m.train()
    return paths
