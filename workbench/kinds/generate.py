"""`kind: generate`: the engine behind `workbench generate` and `workbench run` for generate recipes.

`describe` checks the model and LoRAs and makes the memory plan for the recipe's own width, height
and batch from the file header (nothing loaded); `run` loads the model with that very plan.
Images are numbered like A1111's output folder (`00012-<seed>.png`): the number continues after
the highest one already in the folder, so a second run never overwrites the first. Each PNG
carries A1111's "parameters" text and our provenance chunk; jpg/webp get a `.json` sidecar
with the same two records (those formats have no text chunks A1111 reads back).
"""

from __future__ import annotations

import io
import json
import random
import re
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.formats.writer import atomic_write_bytes, atomic_write_text
from workbench.pipeline.generate import (
    GeneratedImage,
    ImageSettings,
    LoraUse,
    generate,
    load_model,
    plan_for_file,
    save_image,
)
from workbench.kinds.checks import check_lora_blocks, component_lines
from workbench.plan import RunPlan, RunResult, check_input, lora_problem, t5_tokenizer_problem
from workbench.provenance import Provenance
from workbench.recipes.generate import GenerateRecipe
from workbench.recipes.loader import recipe_to_yaml

_NUMBERED = re.compile(r"^(\d{5})-")


def settings_of(recipe: GenerateRecipe) -> ImageSettings:
    return ImageSettings(recipe.prompt, recipe.negative_prompt, recipe.sampler, recipe.steps,
                         recipe.cfg, recipe.width, recipe.height, recipe.clip_skip)


def seeds_of(recipe: GenerateRecipe) -> list[int]:
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
    buf = io.BytesIO()
    img.image.save(buf, format="JPEG" if fmt == "jpg" else "WEBP", quality=95)
    atomic_write_bytes(path, buf.getvalue())
    atomic_write_text(path.with_suffix(".json"),
                      json.dumps({"parameters": img.parameters, "workbench": img.provenance},
                                 indent=2, default=str))
    return path


def describe(recipe: GenerateRecipe, overwrite: bool = False) -> RunPlan:
    """Inputs, settings and the memory plan for this recipe's size and batch; `detail` is that
    memory plan (None for a diffusers folder: its sizes come from the loaded components)."""
    plan = RunPlan.for_recipe(recipe, overwrite)
    model = check_input(plan, "model", recipe.model)
    for i, lora in enumerate(recipe.loras):
        problem = lora_problem(check_input(plan, f"loras[{i}]", lora.path, expect="lora"),
                               "the model", model.arch)
        if problem:
            plan.problems.append(problem)
        check_lora_blocks(plan, f"loras[{i}]", model.arch, lora)
    problem = t5_tokenizer_problem("model", recipe.model, model.arch)
    if problem:
        plan.problems.append(problem)
    plan.lines += component_lines(plan, recipe.model, recipe.components)
    seed = "random" if recipe.seed == -1 else str(recipe.seed)
    plan.lines += [
        "generation:",
        f"  {recipe.count} image(s) {recipe.width}x{recipe.height}, {recipe.sampler}, "
        f"{recipe.steps} steps, cfg {recipe.cfg:g}, seed {seed}",
        f"  prompt: {recipe.prompt!r}",
        f"  memory: weights {recipe.memory.weights}, VRAM budget "
        + (f"{recipe.memory.vram_budget_mb} MB" if recipe.memory.vram_budget_mb else "auto"),
    ]
    plan.outputs.append(recipe.output.dir)
    if plan.problems:
        return plan
    if not Path(recipe.model).is_file():
        plan.lines.append("memory plan: made when the folder is loaded (sizes come from its components)")
        return plan
    try:
        memory = plan_for_file(recipe.model, vram_budget_mb=recipe.memory.vram_budget_mb,
                               weights=recipe.memory.weights, device=recipe.memory.device,
                               width=recipe.width, height=recipe.height, batch=recipe.batch_size,
                               components=recipe.components)
    except WorkbenchError as e:  # a plan that cannot fit is a problem of the dry run, not a crash
        plan.problems.append(str(e))
        return plan
    plan.detail = memory
    plan.lines += ["memory plan:"] + ["  " + ln for ln in memory.render().splitlines()]
    if recipe.tiny_vae is not None:
        plan.lines.append("  (made again after loading, with the tiny VAE's own size)")
    return plan


def run(plan: RunPlan, *, progress: bool = True) -> RunResult:
    """Load with the planned memory layout, generate, save numbered images and provenance."""
    recipe: GenerateRecipe = plan.recipe
    settings = settings_of(recipe)
    seeds = seeds_of(recipe)
    model = load_model(recipe.model, device=recipe.memory.device, weights=recipe.memory.weights,
                       vram_budget_mb=recipe.memory.vram_budget_mb, tiny_vae=recipe.tiny_vae,
                       width=recipe.width, height=recipe.height, batch=recipe.batch_size,
                       plan=plan.detail, components=recipe.components)
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

    prov = Provenance(kind="generate", name=recipe.name or "generate",
                      recipe_path=str(recipe.source_path) if recipe.source_path else None,
                      recipe_text=recipe_text)
    with prov.timed("generate"):
        generate(model, settings, seeds, loras=loras, bar=progress, batch_size=recipe.batch_size,
                 on_image=save)
    prov.add_input("model", recipe.model)
    if recipe.components is not None:
        prov.add_input("components", recipe.components)
    for i, lora in enumerate(recipe.loras):
        prov.add_input(f"loras[{i}]", lora.path)
    prov.seeds = {"images": seeds}
    prov.outputs = [str(p) for p in written]
    prov.extra = {"memory_plan": model.memory_plan.render() if model.memory_plan is not None else None}
    name = recipe.name or "generate"
    prov_path = prov.write(out_dir, f"provenance-{written[0].stem if written else 'none'}.json")
    summary = (f"generate '{name}': {len(written)} image(s), seeds {seeds[0]}..{seeds[-1]}, in "
               f"{out_dir}")
    return RunResult("generate", name, False, plan, [*written, prov_path], summary)
