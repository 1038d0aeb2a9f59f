"""Run a validated recipe: build its plan, then hand it to the engine for its kind.

Every kind can be dry-run: `build_plan` checks what will be read (exists? size? architecture?),
what will be written, and lists problems without doing any work. A real run refuses a plan with
problems. Engines live in their own packages and are imported only when a recipe of their kind runs
(merge #3, generation #4, training #5, grids #6); a missing engine is a NotAvailableError that names
its issue, not a crash.

Engine contract: `run(recipe, *, overwrite: bool, progress: bool) -> RunResult` (or an iterable of
written paths, which is wrapped into a RunResult); optionally `describe(recipe, overwrite=...) ->
(lines, problems)`, which the dry run adds to the plan once the inputs are all there.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from workbench.errors import NotAvailableError, OutputExistsError, RecipeError, WorkbenchError
from workbench.recipes.generate import GenerateRecipe
from workbench.recipes.grid import GridRecipe, LoraAxis, MergeAxis, ModelAxis
from workbench.recipes.loader import Recipe
from workbench.recipes.merge import MergeRecipe
from workbench.recipes.train import TrainRecipe

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass(frozen=True)
class Engine:
    """Where the engine for a kind lives, and the issue that builds it."""

    module: str
    function: str
    issue: int
    what: str


ENGINES: dict[str, Engine] = {
    "merge": Engine("workbench.merge.runner", "run", 3, "the merge engine"),
    "generate": Engine("workbench.core.runner", "run", 4, "the generation core"),
    "train": Engine("workbench.train.runner", "run", 5, "LoRA training"),
    "grid": Engine("workbench.compare.runner", "run", 6, "the grid engine"),
    "extract_lora": Engine("workbench.merge.extract", "run", 3, "LoRA extraction"),
}
_HANDLERS: dict[str, Callable[..., Any]] = {}  # set by register_handler (tests, plug-ins)


def register_handler(kind: str, handler: Callable[..., Any] | None) -> None:
    """Use `handler` for `kind` instead of importing its engine (None removes it)."""
    if handler is None:
        _HANDLERS.pop(kind, None)
    else:
        _HANDLERS[kind] = handler


def get_handler(kind: str) -> Callable[..., Any]:
    """The engine function for `kind`; NotAvailableError when it is not built yet."""
    if kind in _HANDLERS:
        return _HANDLERS[kind]
    engine = ENGINES.get(kind)
    if engine is None:
        raise WorkbenchError(f"unknown recipe kind {kind!r}; expected one of {', '.join(ENGINES)}")
    try:
        module = importlib.import_module(engine.module)
    except ModuleNotFoundError as e:
        # only the engine module itself (or its package) missing means "not built"; a missing
        # dependency inside a built engine is a real error and keeps its traceback
        if e.name and engine.module.startswith(e.name):
            raise NotAvailableError(
                f"kind '{kind}': {engine.what} is not built yet (issue #{engine.issue}); "
                "`--dry-run` shows what was validated") from None
        raise
    handler = getattr(module, engine.function, None)
    if handler is None:
        raise NotAvailableError(f"kind '{kind}': {engine.module} has no `{engine.function}` yet "
                                f"(issue #{engine.issue}); `--dry-run` shows what was validated")
    return handler


def get_describer(kind: str) -> Callable[..., Any] | None:
    """The engine's `describe` for the dry run, or None (engine not built, or handler overridden)."""
    engine = ENGINES.get(kind)
    if kind in _HANDLERS or engine is None:
        return None
    try:
        module = importlib.import_module(engine.module)
    except ModuleNotFoundError as e:
        if e.name and engine.module.startswith(e.name):
            return None
        raise
    return getattr(module, "describe", None)


# --------------------------------------------------------------------------------------------------
# the plan


@dataclass
class InputCheck:
    """One file or folder the run reads."""

    label: str
    path: Path
    exists: bool
    size: int | None = None  # bytes, files only
    detail: str = ""  # architecture, image count, ...
    arch: str | None = None  # detected architecture id (sd15, sdxl, sd3, flux, ...)


@dataclass
class Plan:
    """What a run will read and write, and what is wrong; `render()` is the dry-run text."""

    kind: str
    name: str
    source: Path | None = None
    inputs: list[InputCheck] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    existing_outputs: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        head = f"plan: {self.kind} '{self.name}'" + (f" from {self.source}" if self.source else "")
        out = [head]
        if self.inputs:
            out.append("inputs:")
            width = max(len(i.label) for i in self.inputs)
            for i in self.inputs:
                state = (f"{human_size(i.size)}" if i.size is not None else "folder") if i.exists \
                    else "MISSING"
                extra = f", {i.detail}" if i.detail else ""
                out.append(f"  {i.label:<{width}}  {i.path}  ({state}{extra})")
        out += self.lines
        if self.outputs:
            out.append("outputs:")
            out += [f"  {p}" for p in self.outputs]
        if self.problems:
            out.append(f"problems ({len(self.problems)}):")
            out += [f"  - {p}" for p in self.problems]
        else:
            out.append("problems: none")
        return "\n".join(out)

    __str__ = render


@dataclass
class RunResult:
    """What a run did (or, for a dry run, would do)."""

    kind: str
    name: str
    dry_run: bool
    plan: Plan | None = None
    outputs: list[Path] = field(default_factory=list)
    summary: str = ""

    def __str__(self) -> str:
        if self.dry_run and self.plan is not None:
            return self.plan.render()
        if self.summary:
            return self.summary
        return f"{self.kind} '{self.name}': wrote " + (", ".join(map(str, self.outputs)) or "nothing")


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def _detect(check: InputCheck) -> str | None:
    """Fill in the architecture of a .safetensors file; returns a problem or None. Degrades to
    nothing when the detection module is not there."""
    try:
        from workbench.formats.detect import detect
    except ImportError:
        return None
    try:
        info = detect(check.path)
    except WorkbenchError as e:
        check.detail = "unreadable"
        return str(e)
    check.arch = getattr(info, "arch", None)
    if check.arch is None:
        check.detail = str(info)
        return None
    bits = [check.arch + (f" {info.variant}" if getattr(info, "variant", None) else "")]
    if getattr(info, "kind", None):
        bits.append(info.kind)
    check.detail = " ".join(bits)
    return None


def _split_flux(folder: Path) -> bool:
    """Whether `folder` holds Forge-style split FLUX files (a transformer .safetensors or .gguf, ae,
    clip_l, t5xxl), which the generation core loads as one model."""
    from workbench.core.load_dit import flux_parts  # the loader's own rule (imports torch)

    try:
        flux_parts(folder)
    except WorkbenchError:
        return False
    return True


def check_input(plan: Plan, label: str, path: Path, expect: str = "model") -> InputCheck:
    """Record one input: `expect` is 'model' (a .safetensors file or a diffusers folder), 'file',
    'dir' or 'images' (a folder of images). Missing or unusable inputs become plan problems."""
    check = InputCheck(label, path, path.exists())
    if not check.exists:
        plan.problems.append(f"{label}: not found: {path}")
    elif path.is_dir():
        if expect == "file":
            plan.problems.append(f"{label}: is a folder, expected a file: {path}")
        elif expect == "images":
            images = [p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
            captions = [p for p in path.rglob("*") if p.suffix.lower() in (".txt", ".caption")]
            check.detail = f"{len(images)} images, {len(captions)} captions"
            if not images:
                plan.problems.append(f"{label}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) "
                                     f"in {path}")
        elif expect == "model":
            if (path / "model_index.json").exists():
                check.detail = "diffusers folder"
            elif _split_flux(path):
                check.arch, check.detail = "flux", "split FLUX files (transformer, ae, clip_l, t5xxl)"
            else:
                plan.problems.append(f"{label}: folder without model_index.json; expected a "
                                     f"single .safetensors file or a diffusers folder: {path}")
    else:
        check.size = path.stat().st_size
        if expect in ("dir", "images"):
            plan.problems.append(f"{label}: is a file, expected a folder: {path}")
        elif expect == "model":
            if path.suffix.lower() in (".safetensors", ".sft", ".gguf"):  # GGUF: tensors only, like safetensors
                problem = _detect(check)
                if problem:
                    plan.problems.append(f"{label}: {problem}")
            else:
                plan.problems.append(f"{label}: only .safetensors and .gguf files are read "
                                     f"({path.suffix} files can run code when loaded): {path}")
    plan.inputs.append(check)
    return check


def _output_file(plan: Plan, path: Path, overwrite: bool, how: str) -> None:
    plan.outputs.append(path)
    if path.exists() and not overwrite:
        plan.existing_outputs.append(path)
        plan.problems.append(f"output exists: {path} ({how})")


# --------------------------------------------------------------------------------------------------
# per-kind plans


def _merge_plan(recipe: MergeRecipe, plan: Plan, overwrite: bool) -> None:
    archs: dict[str, str] = {}
    for label, path in recipe.models.items():
        check = check_input(plan, label, path)
        if check.arch:
            archs[label] = check.arch
    plan.lines.append("steps:")
    for n, step in enumerate(recipe.steps, 1):
        params = "  ".join(f"{k}={v}" for k, v in step.params().items())
        plan.lines.append(f"  {n}. {step.id} = {step.method}({', '.join(step.inputs)})  {params}"
                          .rstrip())
        seen = {archs[i] for i in step.inputs if i in archs}
        if len(seen) > 1:
            plan.problems.append(f"step {step.id}: inputs are different architectures "
                                 f"({', '.join(sorted(seen))})")
        if step.inputs and step.inputs[0] in archs:
            archs[step.id] = archs[step.inputs[0]]
        if step.blocks is not None and step.id in archs:
            _check_blocks(plan, step.id, archs[step.id], step.blocks)
    out = recipe.output
    plan.lines.append(f"writes step '{recipe.final_step}' as {out.dtype or 'the first input dtype'}"
                      + (", pruned" if out.prune else "")
                      + (f", VAE baked from {out.bake_vae}" if out.bake_vae else ""))
    if out.bake_vae is not None:
        check_input(plan, "bake_vae", out.bake_vae)
    _output_file(plan, out.path, overwrite or out.overwrite,
                 "pass --overwrite or set `output.overwrite: true` to replace it")


def _check_blocks(plan: Plan, step_id: str, arch: str, blocks: Any) -> None:
    """Block weights against the architecture the step works on (when block tables exist)."""
    try:
        from workbench.formats.blocks import parse_block_values
    except ImportError:
        return
    try:
        parse_block_values(arch, blocks, default=0.0 if isinstance(blocks, dict) else None)
    except WorkbenchError as e:
        plan.problems.append(f"step {step_id}: {e}")


def _train_plan(recipe: TrainRecipe, plan: Plan, overwrite: bool) -> None:
    check_input(plan, "base", recipe.base)
    check_input(plan, "dataset", recipe.dataset, expect="images")
    if recipe.resume is not None:
        check_input(plan, "resume", recipe.resume, expect="dir")
    net = recipe.network
    res = recipe.resolution
    plan.lines += [
        "training:",
        f"  network {net.type} rank {net.rank} alpha {net.alpha:g}"
        + (" + text encoder" if net.train_text_encoder else ""),
        f"  {recipe.max_steps} steps, batch {recipe.batch_size}, lr {recipe.learning_rate:g} "
        f"({recipe.optimizer}, {recipe.lr_scheduler}), resolution "
        f"{res if isinstance(res, int) else f'{res[0]}x{res[1]}'}, seed {recipe.seed}",
        f"  trigger: {recipe.trigger!r}" if recipe.trigger else "  no trigger word",
    ]
    if recipe.samples:
        plan.lines.append(f"  samples every {recipe.samples.every} steps: "
                          f"{len(recipe.samples.prompts)} prompt(s)")
    _output_file(plan, recipe.lora_path, overwrite or recipe.output.overwrite
                 or recipe.resume is not None,
                 "pass --overwrite, set `output.overwrite: true` or `resume:` to continue it")
    plan.outputs.append(recipe.output.dir)


def _grid_plan(recipe: GridRecipe, plan: Plan, overwrite: bool) -> None:
    d = recipe.defaults
    if d.model is not None:
        check_input(plan, "defaults.model", d.model)
    for i, lora in enumerate(d.loras):
        check_input(plan, f"defaults.loras[{i}]", lora.path, expect="file")
    plan.lines.append("axes:")
    for letter, axis in recipe.axes():
        values = axis.expanded_values()  # type: ignore[attr-defined]
        shown = ", ".join(_short(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")
        plan.lines.append(f"  {letter}: {axis.axis} ({len(values)}): {shown}")  # type: ignore
        if isinstance(axis, ModelAxis):
            for j, p in enumerate(axis.values):
                check_input(plan, f"{letter}.values[{j}]", p)
        elif isinstance(axis, LoraAxis):
            for j, lora in enumerate(axis.values):
                check_input(plan, f"{letter}.values[{j}]", lora.path, expect="file")
        elif isinstance(axis, MergeAxis):
            check_input(plan, f"{letter}.recipe", axis.recipe, expect="file")
    seeds = recipe.seeds or [1]
    plan.lines.append(f"seeds: {', '.join(map(str, seeds))}; {recipe.cell_count()} images")
    if recipe.scores:
        s = recipe.scores
        if s.clip:
            plan.lines.append(f"score: clip {s.clip.model}")
            if s.clip.weights:
                check_input(plan, "scores.clip.weights", s.clip.weights, expect="any")
        if s.aesthetic:
            plan.lines.append("score: aesthetic")
            if s.aesthetic.weights:
                check_input(plan, "scores.aesthetic.weights", s.aesthetic.weights, expect="any")
        if s.style:
            plan.lines.append("score: style similarity")
            check_input(plan, "scores.style.reference_dir", s.style.reference_dir, expect="images")
    plan.outputs.append(recipe.output.dir)


def _generate_plan(recipe: GenerateRecipe, plan: Plan, overwrite: bool) -> None:
    check_input(plan, "model", recipe.model)
    for i, lora in enumerate(recipe.loras):
        check_input(plan, f"loras[{i}]", lora.path, expect="file")
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


def _extract_plan(recipe, plan: Plan, overwrite: bool) -> None:
    """kind extract_lora: both models must exist; the engine's describe adds modules and ranks."""
    check_input(plan, "tuned", recipe.tuned)
    check_input(plan, "base", recipe.base)
    plan.lines.append(f"extract LoRA: rank {recipe.rank}"
                      + (f", conv rank {recipe.conv_rank}" if recipe.conv_rank else "")
                      + f", components {', '.join(recipe.components)}, {recipe.output.dtype}")
    _output_file(plan, recipe.output.path, overwrite or recipe.output.overwrite,
                 "pass --overwrite or set `output.overwrite: true` to replace it")


def _short(value: Any) -> str:
    if isinstance(value, Path):
        return value.name
    if hasattr(value, "path") and hasattr(value, "weight"):
        return f"{value.path.name}:{value.weight:g}"
    return str(value)


PLANNERS: dict[str, Callable[[Any, Plan, bool], None]] = {
    "merge": _merge_plan,
    "train": _train_plan,
    "grid": _grid_plan,
    "generate": _generate_plan,
    "extract_lora": _extract_plan,
}


def build_plan(recipe: Recipe, overwrite: bool = False) -> Plan:
    """Everything a dry run shows: inputs checked on disk, steps, outputs and problems."""
    plan = Plan(recipe.kind, recipe.name or recipe.kind, recipe.source_path)
    PLANNERS[recipe.kind](recipe, plan, overwrite)
    if plan.problems:  # the engine's own checks need readable inputs
        return plan
    describe = get_describer(recipe.kind)
    if describe is not None:
        lines, problems = describe(recipe, overwrite=overwrite)
        plan.lines += list(lines)
        plan.problems += list(problems)
    return plan


# --------------------------------------------------------------------------------------------------
# running


def run_recipe(recipe: Recipe, dry_run: bool = False, overwrite: bool = False,
               progress: bool = True) -> RunResult:
    """Dry run: the plan. Real run: refuse missing engines, problems and existing outputs, then
    call the kind's engine."""
    plan = build_plan(recipe, overwrite=overwrite)
    name = recipe.name or recipe.kind
    if dry_run:
        return RunResult(recipe.kind, name, True, plan, list(plan.outputs))
    handler = get_handler(recipe.kind)
    where = recipe.source_path or f"{recipe.kind} recipe '{name}'"
    other = [p for p in plan.problems if not p.startswith("output exists: ")]
    if other:
        n = len(other)
        raise RecipeError(f"cannot run {where}: {n} problem{'s' if n != 1 else ''} "
                          "(`--dry-run` shows the whole plan):\n" + "\n".join(f"  - {p}" for p in other))
    if plan.existing_outputs:
        raise OutputExistsError(f"{where}: output exists: {plan.existing_outputs[0]}; pass "
                                "--overwrite (or set `overwrite: true` in the recipe's output)")
    result = handler(recipe, overwrite=overwrite, progress=progress)
    if isinstance(result, RunResult):
        if result.plan is None:
            result.plan = plan
        return result
    return RunResult(recipe.kind, name, False, plan, [Path(p) for p in (result or [])])
