"""`kind: generate`: the engine behind `workbench generate` and `workbench run` for generate recipes.

Images are numbered like A1111's output folder (`00012-<seed>.png`): the number continues after
the highest one already in the folder, so a second run never overwrites the first. Each PNG
carries A1111's "parameters" text and our provenance chunk; jpg/webp get a `.json` sidecar
with the same two records (those formats have no text chunks A1111 reads back).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from workbench.core.generate import (
    GeneratedImage,
    ImageSettings,
    LoraUse,
    generate,
    load_model,
    save_image,
)

_NUMBERED = re.compile(r"^(\d{5})-")


def settings_of(recipe) -> ImageSettings:
    return ImageSettings(recipe.prompt, recipe.negative_prompt, recipe.sampler, recipe.steps,
                         recipe.cfg, recipe.width, recipe.height, recipe.clip_skip)


def seeds_of(recipe) -> list[int]:
    """seed, seed+1, ... (A1111's batch convention); seed -1 draws one at random."""
    first = recipe.seed if recipe.seed != -1 else random.SystemRandom().randrange(2**32)
    return [first + i for i in range(recipe.count)]


def next_index(folder: Path) -> int:
    """One more than the highest `NNNNN-` number in `folder` (0 for an empty or new folder)."""
    if not folder.is_dir():
        return 0
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))]
    return max(numbers, default=-1) + 1


def _save(img: GeneratedImage, path: Path, fmt: str) -> Path:
    if fmt == "png":
        return save_image(img, path)
    import io

    from workbench.formats.writer import atomic_write_bytes, atomic_write_text

    buf = io.BytesIO()
    img.image.save(buf, format="JPEG" if fmt == "jpg" else "WEBP", quality=95)
    atomic_write_bytes(path, buf.getvalue())
    atomic_write_text(path.with_suffix(".json"),
                      json.dumps({"parameters": img.parameters, "workbench": img.provenance},
                                 indent=2, default=str))
    return path


def describe(recipe, overwrite: bool = False) -> tuple[list[str], list[str]]:
    """The memory plan for the recipe's model and budget, from the file header (nothing loaded)."""
    lines, problems = [], []
    if not Path(recipe.model).is_file():
        lines.append("memory plan: made when the folder is loaded (sizes come from its components)")
        return lines, problems
    from workbench.core.generate import plan_for_file
    from workbench.errors import WorkbenchError

    try:
        plan = plan_for_file(recipe.model, vram_budget_mb=recipe.memory.vram_budget_mb,
                             weights=recipe.memory.weights, device=recipe.memory.device,
                             width=recipe.width, height=recipe.height, batch=recipe.batch_size)
    except WorkbenchError as e:  # a plan that cannot fit is a problem of the dry run, not a crash
        problems.append(str(e))
        return lines, problems
    lines += ["memory plan:"] + ["  " + ln for ln in plan.render().splitlines()]
    return lines, problems


def run(recipe, *, overwrite: bool = False, progress: bool = True) -> Any:
    from workbench.recipes.loader import recipe_to_yaml
    from workbench.runner import RunResult

    settings = settings_of(recipe)
    seeds = seeds_of(recipe)
    model = load_model(recipe.model, device=recipe.memory.device, weights=recipe.memory.weights,
                       vram_budget_mb=recipe.memory.vram_budget_mb, tiny_vae=recipe.tiny_vae)
    loras = [LoraUse(Path(lr.path), lr.weight, lr.blocks) for lr in recipe.loras]
    out_dir = Path(recipe.output.dir)
    fmt = recipe.output.format
    written: list[Path] = []
    out_dir.mkdir(parents=True, exist_ok=True)

    recipe_text = recipe.source_text or recipe_to_yaml(recipe)

    def save(img: GeneratedImage) -> None:
        img.provenance["recipe"] = recipe_text
        index = next_index(out_dir)
        written.append(_save(img, out_dir / f"{index:05d}-{img.seed}.{fmt}", fmt))

    generate(model, settings, seeds, loras=loras, bar=progress, batch_size=recipe.batch_size,
             on_image=save)
    name = recipe.name or "generate"
    summary = (f"generate '{name}': {len(written)} image(s), seeds {seeds[0]}..{seeds[-1]}, in "
               f"{out_dir}")
    return RunResult("generate", name, False, None, written, summary)
