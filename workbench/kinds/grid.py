"""`kind: grid`: the dry run and the run of an X/Y/Z grid (`workbench grid RECIPE.yaml`).

describe: check every input, expand the recipe into keyed cells, count what the cell store
(output.dir/cells) already holds, make each model's memory plan for the largest cell it draws and
the grid's `memory:` settings, and estimate the time. run: generate the missing cells with those
plans, grouped by model (each checkpoint loaded once, each merge value computed once), score new
cells as they are made with scorers loaded once, re-score cached cells whose scores came from
another scorer, draw the grid pages and write the tables, the HTML report and provenance. A
cancelled or crashed run keeps every finished cell; running it again resumes. Progress: one task
over the cells still to make (count, ETA), fed to the terminal bar and any installed sink.
"""

from __future__ import annotations

import gc
import statistics as pystats
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from workbench import throughput
from workbench.arch import ARCHS
from workbench.errors import WorkbenchError
from workbench.formats.detect import detect
from workbench.grid import report
from workbench.grid.cache import CellCache, signature_hash
from workbench.grid.merge_preview import MergePreviewer, load_merge_recipe, steps_with
from workbench.grid.render import MAX_SIDE, render_pages
from workbench.grid.scores import GridScorer, aesthetic_input_width, check_backbone, load_images
from workbench.grid.cells import LETTERS, Cell, GridLayout, expand, layout, run_order, with_keys
from workbench.pipeline.generate import generate, load_model, plan_for_file
from workbench.pipeline.image_meta import format_parameters
from workbench.progress import task
from workbench.kinds.checks import check_lora_blocks, component_lines
from workbench.plan import RunPlan, RunResult, check_input, lora_problem, t5_tokenizer_problem
from workbench.provenance import Provenance
from workbench.recipes.grid import GridRecipe, LoraAxis, MergeAxis, ModelAxis
from workbench.throughput import human_time

# Rough sampling speed for the estimate before any cell was timed: seconds per step per megapixel
# (SD1.5 at 512x512 is 0.26 MP; SDXL costs about 3x SD1.5 at the same pixels).
SECONDS_PER_STEP_MP = {"cuda": 0.12, "cpu": 4.0}
ARCH_FACTOR = {a.id: a.grid_speed for a in ARCHS}  # from workbench/arch.py
LOAD_SECONDS = {"cuda": 8.0, "cpu": 12.0}
BARE_LABEL_AXES = {"model", "sampler", "prompt", "prompt_sr", "negative_prompt"}


def cells_dir(recipe) -> Path:
    return Path(recipe.output.dir) / "cells"


# --------------------------------------------------------------------------------------------------
# checks and the plan


def problems_of(recipe) -> list[str]:
    """What would make the grid fail part-way, found before any image is made."""
    problems = []
    d = recipe.defaults
    for letter, axis in recipe.axes():
        if axis.axis == "prompt_sr":
            search = axis.expanded_values()[0]
            if search not in d.prompt and search not in d.negative_prompt:
                problems.append(f"{letter}: prompt_sr searches for its first value {search!r}, which "
                                f"is not in defaults.prompt ({d.prompt!r}) or the negative prompt")
        if axis.axis == "seed" and -1 in axis.expanded_values():
            problems.append(f"{letter}: seed -1 (random) cannot be paired or cached; give fixed seeds")
        if axis.axis in ("merge_alpha", "merge_beta") and Path(axis.recipe).is_file():
            try:
                steps_with(load_merge_recipe(axis.recipe), axis.axis.split("_", 1)[1], axis.step)
            except WorkbenchError as e:
                problems.append(f"{letter}: {e}")
    if recipe.seeds and -1 in recipe.seeds:
        problems.append("seeds: -1 (random) cannot be paired or cached; give fixed seeds")
    s = recipe.scores
    if s is not None and s.aesthetic is not None and s.aesthetic.weights is None:
        problems.append("scores.aesthetic.weights: missing; give the predictor's local weights file")
    return problems


def _sec_per_image(cell: Cell, rate: float) -> float:
    mp = cell.settings.width * cell.settings.height / 1e6
    return rate * cell.settings.steps * mp


def _measured_rate(cache: CellCache) -> float | None:
    """Seconds per step per megapixel measured by earlier runs into this cell store."""
    rates = []
    if cache.folder.is_dir():
        for path in list(cache.folder.glob("*.json"))[:200]:
            rec = cache.load(path.stem)
            t = (rec or {}).get("timing", {})
            if t.get("seconds") and t.get("steps") and t.get("megapixels"):
                rates.append(t["seconds"] / (t["steps"] * t["megapixels"]))
    return pystats.median(rates) if rates else None


def device_kind(device: str | None) -> str:
    """'cuda' or 'cpu': what the speed tables are keyed by."""
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return "cuda" if str(dev).startswith("cuda") else "cpu"


def estimate_seconds(todo: list[Cell], cache: CellCache, device: str | None = None) -> tuple[float, str]:
    """(seconds, how) for making `todo`: per architecture, the sampling speed and load time
    measured by earlier grids on this machine (workbench/throughput.py), else the speed measured
    in this grid's own cell store, else the rough constants above."""
    dev = device_kind(device)
    own = _measured_rate(cache)
    sources = {c.source for c in todo}
    archs = {s: _arch_of(s) for s in sources}
    total = 0.0
    for source in sources:
        load = throughput.measured("grid-load", archs[source], dev) if not source.is_merge else None
        total += load.value if load else LOAD_SECONDS[dev]
    measured, store, rough = set(), set(), set()
    rates: dict[str, float] = {}
    for arch in set(archs.values()):
        m = throughput.measured("grid", arch, dev)
        if m is not None:
            rates[arch] = m.value
            measured.add(f"{arch} {m.value:.3g} s per step per megapixel, median of the last "
                         f"{m.runs} grid{'s' if m.runs != 1 else ''}")
        elif own is not None:
            rates[arch] = own
            store.add(arch)
        else:
            rates[arch] = SECONDS_PER_STEP_MP[dev] * ARCH_FACTOR.get(arch, 1.0)
            rough.add(arch)
    for cell in todo:
        total += _sec_per_image(cell, rates[archs[cell.source]])
    how = []
    if measured:
        how.append(f"measured on this machine ({dev}): " + "; ".join(sorted(measured)))
    if store:
        how.append(f"{', '.join(sorted(store))}: speed of the cells already in this grid's store")
    if rough:
        how.append(f"rough for {', '.join(sorted(rough))}: no cell timed on this machine yet")
    return total, "; ".join(how) or "nothing to make"


def _arch_of(source) -> str:
    """The architecture of a source from file headers (sd15 when it cannot be told)."""
    try:
        path = source.path
        if source.is_merge:
            path = next(iter(load_merge_recipe(source.path).models.values()))
        return detect(path).arch or "sd15"
    except (WorkbenchError, OSError, StopIteration):
        return "sd15"


def plan_cells(recipe) -> tuple[list[Cell], GridLayout]:
    return with_keys(expand(recipe)), layout(recipe)


def _short(value: Any) -> str:
    if isinstance(value, Path):
        return value.name
    if hasattr(value, "path") and hasattr(value, "weight"):
        return f"{value.path.name}:{value.weight:g}"
    return str(value)


def _check_inputs(recipe: GridRecipe, plan: RunPlan) -> None:
    d = recipe.defaults
    models: list[tuple[str, Path, str | None]] = []  # (label, file, arch) of every model a cell uses
    loras = []
    if d.model is not None:
        check = check_input(plan, "defaults.model", d.model)
        models.append((check.label, check.path, check.arch))
    for i, lora in enumerate(d.loras):
        loras.append(check_input(plan, f"defaults.loras[{i}]", lora.path, expect="lora"))
        check_lora_blocks(plan, f"defaults.loras[{i}]", models[0][2] if models else None, lora)
    plan.lines.append("axes:")
    for letter, axis in recipe.axes():
        values = axis.expanded_values()  # type: ignore[attr-defined]
        shown = ", ".join(_short(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")
        plan.lines.append(f"  {letter}: {axis.axis} ({len(values)}): {shown}")  # type: ignore
        if isinstance(axis, ModelAxis):
            for j, p in enumerate(axis.values):
                check = check_input(plan, f"{letter}.values[{j}]", p)
                models.append((check.label, check.path, check.arch))
        elif isinstance(axis, LoraAxis):
            for j, lora in enumerate(axis.values):
                loras.append(check_input(plan, f"{letter}.values[{j}]", lora.path, expect="lora"))
                check_lora_blocks(plan, f"{letter}.values[{j}]", models[0][2] if models else None,
                                  lora)
        elif isinstance(axis, MergeAxis):
            check = check_input(plan, f"{letter}.recipe", axis.recipe, expect="file")
            if check.exists and check.size is not None:
                models.append((f"the merge of {letter}.recipe", axis.recipe, _merge_arch(axis.recipe)))
    if d.model is not None and any(isinstance(a, (ModelAxis, MergeAxis)) for _, a in recipe.axes()):
        models = models[1:]  # an axis that sets the model replaces defaults.model in every cell
    for lora in loras:
        for label, _, arch in models:
            problem = lora_problem(lora, label, arch)
            if problem:
                plan.problems.append(problem)
    for label, path, arch in models:
        problem = t5_tokenizer_problem(label, path, arch)
        if problem:
            plan.problems.append(problem)
    if d.components is not None:
        check_input(plan, "defaults.components", d.components)
    for label, path, _ in models:
        if Path(path).suffix.lower() in (".safetensors", ".sft", ".gguf"):  # not a merge recipe
            plan.lines += component_lines(plan, path, d.components, model_field=label,
                                          field="defaults.components", check=False)
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
        _check_scorers(recipe, plan)
    plan.outputs.append(recipe.output.dir)


def _merge_arch(path: Path) -> str | None:
    """The architecture of a merge recipe's first model (None when it cannot be told yet)."""
    try:
        first = next(iter(load_merge_recipe(path).models.values()))
        return detect(first).arch
    except (WorkbenchError, OSError, StopIteration):
        return None


def _check_scorers(recipe: GridRecipe, plan: RunPlan) -> None:
    """The CLIP backbone's weights (present, of the stated architecture) and the aesthetic
    predictor's input width against it, from headers: what GridScorer would load after every
    image was made."""
    backbone = check_backbone(recipe.scores)
    if backbone is None:
        return
    plan.lines += backbone.lines
    plan.problems += backbone.problems
    aesthetic = recipe.scores.aesthetic
    if backbone.problems or aesthetic is None or aesthetic.weights is None \
            or not Path(aesthetic.weights).is_file() or backbone.embed_dim is None:
        return
    width = aesthetic_input_width(Path(aesthetic.weights))
    if width is not None and width != backbone.embed_dim:
        plan.problems.append(
            f"scores.aesthetic.weights: {Path(aesthetic.weights).name} expects {width}-d CLIP "
            f"embeddings but the CLIP backbone ({backbone.model}) gives {backbone.embed_dim}-d; use the "
            "backbone the predictor was trained on (ViT-L-14 for the LAION predictor)")


@dataclass
class GridPlan:
    """The cells, their layout, what the cell store lacks, and one memory plan per model file
    (made for the largest cell that model draws; merge previews plan when they load)."""

    cells: list[Cell]
    layout: GridLayout
    todo: list[Cell]
    memory: dict[Any, Any] = field(default_factory=dict)
    estimated_seconds: float | None = None


def _memory_plans(recipe: GridRecipe, todo: list[Cell], plan: RunPlan) -> dict[Any, Any]:
    largest: dict[Any, tuple[int, int]] = {}
    for cell in todo:
        w, h = largest.get(cell.source, (0, 0))
        largest[cell.source] = (max(w, cell.settings.width), max(h, cell.settings.height))
    plans = {}
    mem = recipe.memory
    for source, (w, h) in largest.items():
        if source.is_merge or not Path(source.path).is_file():
            continue
        try:
            plans[source] = plan_for_file(source.path, vram_budget_mb=mem.vram_budget_mb,
                                          weights=mem.weights, device=mem.device, width=w, height=h,
                                          components=source.components)
        except WorkbenchError as e:
            plan.problems.append(f"{source.label}: {e}")
            continue
        plan.lines.append(f"memory plan for {source.label} at {w}x{h}: "
                          + plans[source].render().splitlines()[0])
    return plans


def cells_report(recipe: GridRecipe) -> tuple[list[str], list[str], GridPlan | None]:
    """(lines, problems, plan) about the cells: how many, how many cached, the time estimate."""
    problems = problems_of(recipe)
    if problems:
        return [], problems, None
    try:
        cells, lay = plan_cells(recipe)
    except WorkbenchError as e:
        return [], [str(e)], None
    cache = CellCache(cells_dir(recipe))
    unique = {c.key: c for c in cells}
    todo = [c for k, c in unique.items() if not cache.has(k)]
    n_sources = len({c.source for c in todo})
    todo_keys = {c.key for c in todo}
    cached = sum(1 for c in cells if c.key not in todo_keys)
    seconds, how = estimate_seconds(todo, cache, recipe.memory.device)
    lines = [f"cells: {len(cells)} ({cached} cached, {len(todo)} to generate from {n_sources} "
             f"model{'s' if n_sources != 1 else ''})",
             f"estimated time: ~{human_time(seconds)} ({how})"]
    return lines, [], GridPlan(cells, lay, todo, estimated_seconds=seconds)


def describe(recipe: GridRecipe, overwrite: bool = False) -> RunPlan:
    """Inputs, axes, cells (cached / to make), memory plans and the time estimate; `detail` is
    the GridPlan the run makes."""
    plan = RunPlan.for_recipe(recipe, overwrite)
    _check_inputs(recipe, plan)
    if plan.problems:
        return plan
    lines, problems, grid = cells_report(recipe)
    plan.lines += lines
    plan.problems += problems
    if grid is not None:
        grid.memory = _memory_plans(recipe, grid.todo, plan)
        plan.detail = grid
        plan.estimated_seconds = grid.estimated_seconds
    return plan


# --------------------------------------------------------------------------------------------------
# the run


def _infotext(recipe, lay: GridLayout) -> str:
    d = recipe.defaults
    fields: dict[str, Any] = {"Script": "X/Y/Z plot"}
    for letter in LETTERS:
        if letter in lay.axes:
            name, _, labels = lay.axes[letter]
            fields[f"{letter.upper()} Type"] = name
            fields[f"{letter.upper()} Values"] = ", ".join(labels)
    if not lay.seed_axis:
        fields["Seeds"] = ", ".join(map(str, lay.seeds))
    fields.update({"Steps": d.steps, "Sampler": d.sampler, "CFG scale": f"{d.cfg:g}",
                   "Size": f"{d.width}x{d.height}"})
    return format_parameters(d.prompt, d.negative_prompt, **fields)


def _label(lay: GridLayout, letter: str, i: int) -> str:
    if letter not in lay.axes:
        return ""
    name, title, labels = lay.axes[letter]
    return labels[i] if name in BARE_LABEL_AXES else f"{title}: {labels[i]}"


def render_grid(recipe, cells: list[Cell], lay: GridLayout, cache: CellCache, scores, metrics,
                out_dir: Path, max_side: int | None = None) -> list:

    by_pos = {(c.index, c.seed): c.key for c in cells}
    seeds = lay.seeds
    nx, ny, nz = (lay.size(letter) for letter in LETTERS)
    columns = [(x, s) for x in range(nx) for s in seeds]
    col_labels = [_label(lay, "x", x) for x, _ in columns]
    sub_labels = [f"seed {s}" if len(seeds) > 1 else "" for _, s in columns]
    row_labels = [_label(lay, "y", y) for y in range(ny)]

    def image_of(key: str):
        with Image.open(cache.png_path(key)) as im:
            return im.convert("RGB")

    pages = []
    for z in range(nz):
        grid = [[by_pos.get(((x, y, z), s)) for x, s in columns] for y in range(ny)]
        stem = out_dir / (f"grid_z{z + 1}" if nz > 1 else "grid")
        pages += render_pages(title=recipe.name or "grid", z_label=_label(lay, "z", z),
                              column_labels=col_labels, sub_labels=sub_labels, row_labels=row_labels,
                              grid=grid, image_of=image_of, scores_of=lambda k: scores.get(k, {}),
                              metrics=metrics, out_stem=stem, fmt=recipe.output.format,
                              infotext=_infotext(recipe, lay), max_side=max_side or MAX_SIDE)
    return pages


def _load_source(source, previewer, memory, planned):
    """A cell source loaded with its planned memory layout (a merge value through the preview)."""
    if source.is_merge:
        return previewer.model_for(source)
    return load_model(source.path, device=memory.device, weights=memory.weights,
                      vram_budget_mb=memory.vram_budget_mb, plan=planned.get(source),
                      components=source.components)


def _generate_missing(todo: list[Cell], cache: CellCache, scorer, progress: bool, memory,
                      planned: dict, speeds: dict[tuple[str, str], list[float]] | None = None) -> int:
    """Make every cell in `todo` (model by model), scoring each group as it is made. `speeds`
    collects what was measured: ("grid", arch) -> seconds per step per megapixel of each group,
    ("grid-load", arch) -> seconds each model file took to load."""
    previewer = MergePreviewer(device=memory.device)
    speeds = {} if speeds is None else speeds
    made = 0
    with task("grid", len(todo), "cell", bar=progress) as t:
        for source, groups in run_order(todo):
            t.note(f"loading {source.label}")
            arch = _arch_of(source)
            loading = time.perf_counter()
            model = _load_source(source, previewer, memory, planned)
            if not source.is_merge:  # a merge preview's load includes merging
                speeds.setdefault(("grid-load", arch), []).append(time.perf_counter() - loading)
            t.note(f"generating with {source.label}")
            for group in groups:
                first = group[0]
                started = time.perf_counter()
                # one image per call: a cell is then bit-identical however the grid groups seeds
                images = generate(model, first.settings, [c.seed for c in group], loras=first.loras,
                                  batch_size=1)
                per_image = (time.perf_counter() - started) / len(group)
                work = first.settings.steps * first.settings.width * first.settings.height / 1e6
                speeds.setdefault(("grid", arch), []).append(per_image / work)
                values = scorer.score([g.image for g in images], [first.settings.prompt] * len(group)) \
                    if scorer is not None else [{} for _ in group]
                for cell, img, val in zip(group, images, values):
                    record = {"source": cell.source.label, "seed": cell.seed,
                              "settings": img.provenance.get("settings"),
                              "timing": {"seconds": round(per_image, 4), "steps": first.settings.steps,
                                         "megapixels": first.settings.width * first.settings.height / 1e6}}
                    if scorer is not None:
                        sig = scorer.signature()
                        record["scores"] = {signature_hash(sig): {"scorers": sig, "values": val}}
                    cache.save(cell.key, img, record)
                    made += 1
                    t.advance(1, message=f"{source.label} seed {cell.seed}")
            del model
            gc.collect()
    return made


UNITS = {"grid": "seconds per step per megapixel", "grid-load": "seconds per model load"}


def record_speeds(speeds: dict[tuple[str, str], list[float]], device: str | None) -> None:
    """Store this run's median speeds per architecture for the next dry run's estimate."""
    for (kind, arch), values in speeds.items():
        if values:
            throughput.record(kind, arch, device_kind(device), pystats.median(values), UNITS[kind])


def _measured_text(speeds: dict[tuple[str, str], list[float]], estimated: float | None) -> str:
    """' (sampling sd15: 0.52 s per step per megapixel; the dry run estimated ~3 min)'."""
    parts = [f"sampling {arch}: {pystats.median(v):.3g} s per step per megapixel"
             for (kind, arch), v in sorted(speeds.items()) if kind == "grid" and v]
    if estimated is not None:
        parts.append(f"the dry run estimated ~{human_time(estimated)}")
    return f" ({'; '.join(parts)})" if parts else ""


def _score_cached(cells: list[Cell], cache: CellCache, scorer) -> dict[str, dict[str, float]]:
    """Scores of every cell for this scorer; cells scored by another scorer are scored again."""
    scores: dict[str, dict[str, float]] = {}
    missing = []
    for cell in {c.key: c for c in cells}.values():
        record = cache.load(cell.key)
        if record is None:
            raise WorkbenchError(f"cell {cell.key[:12]} is missing from {cache.folder} after the run")
        if scorer is None:
            scores[cell.key] = {}
            continue
        found = cache.scores(record, scorer.signature())
        if found is None:
            missing.append((cell, record))
        else:
            scores[cell.key] = found
    for start in range(0, len(missing), 32):
        batch = missing[start:start + 32]
        images = load_images([cache.png_path(cell.key) for cell, _ in batch])
        for (cell, record), val in zip(batch, scorer.score(images, [c.settings.prompt for c, _ in batch])):
            cache.set_scores(record, scorer.signature(), val)
            scores[cell.key] = val
    return scores


def run(plan: RunPlan, *, progress: bool = True, max_side: int | None = None) -> RunResult:
    """Make, score and report the grid as planned; outputs: pages, tables, report, provenance."""
    recipe: GridRecipe = plan.recipe
    grid: GridPlan = plan.detail
    started = time.perf_counter()
    out_dir = Path(recipe.output.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = CellCache(cells_dir(recipe))
    cells, lay = grid.cells, grid.layout
    todo = [c for c in grid.todo if not cache.has(c.key)]  # another run may have made some since
    device = recipe.memory.device
    scorer = GridScorer(recipe.scores, device=device) if recipe.scores else None
    speeds: dict[tuple[str, str], list[float]] = {}
    made = _generate_missing(todo, cache, scorer, progress, recipe.memory, grid.memory,
                             speeds) if todo else 0
    record_speeds(speeds, recipe.memory.device)
    scores = _score_cached(cells, cache, scorer)
    metrics = scorer.metrics if scorer is not None else []
    pages = render_grid(recipe, cells, lay, cache, scores, metrics, out_dir, max_side)
    statistics = report.ab_statistics(cells, lay, scores, metrics)
    rows = report.score_rows(cells, lay, scores, out_dir, cache.png_path)
    elapsed = time.perf_counter() - started
    summary = (f"grid '{recipe.name}': {len(cells)} cells ({made} generated, {len(cells) - made} from "
               f"the cell store), {len(pages)} grid page{'s' if len(pages) != 1 else ''}, "
               f"{elapsed:.1f} s" + _measured_text(speeds, plan.estimated_seconds))
    extra = {"name": recipe.name, "axes": {k: {"axis": v[0], "title": v[1], "values": v[2]}
                                           for k, v in lay.axes.items()},
             "seeds": lay.seeds, "scorers": scorer.signature() if scorer else {},
             "verdict": report.verdict(statistics), "statistics": statistics, "generated": made}
    tables = report.write_tables(rows, out_dir, extra)
    html = report.write_html(out_dir, title=recipe.name or "grid", pages=pages, cells=cells, lay=lay,
                             scores=scores, metrics=metrics, statistics=statistics,
                             scorers=scorer.signature() if scorer else {}, summary=summary)
    prov = Provenance(kind="grid", name=recipe.name or "grid",
                      recipe_path=str(recipe.source_path) if recipe.source_path else None,
                      recipe_text=recipe.source_text)
    for check in plan.inputs:
        if check.exists and check.size is not None:
            prov.add_input(check.label, check.path)
    prov.seeds = {"cells": lay.seeds}
    prov.timings["grid"] = round(elapsed, 3)
    prov.outputs = [str(p.path) for p in pages] + [str(t) for t in tables] + [str(html)]
    prov.extra = {"cells": len(cells), "generated": made, "scorers": scorer.signature() if scorer else {}}
    prov_path = prov.write(out_dir)
    result = RunResult("grid", recipe.name, False, plan,
                       [p.path for p in pages] + tables + [html, prov_path], summary=summary)
    result.generated = made  # type: ignore[attr-defined]
    result.pages = pages  # type: ignore[attr-defined]
    return result
