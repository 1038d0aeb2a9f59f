"""`kind: pick` (`workbench pick TRAINING_FOLDER`): choose a trained LoRA's step and strength.

describe: read the training folder (workbench/train/run_folder.py), split its pictures by name
hash into a selection part and a held-out part (workbench/grid/holdout.py), refuse prompts that
are training captions (seeds shared by selection and evaluation the recipe refuses,
workbench/recipes/choice.py), and plan the selection grid
step × strength × prompts × selection seeds through the grid kind's own dry run (cells cached or
to make, memory plans, the time estimate from workbench/throughput.py).

run: 1. the selection grid through workbench/kinds/grid.py (its cell store under
`<pick>/selection/cells` makes a stopped pick resume), scored for style against the selection
pictures only and for CLIP adherence on the prompts; 2. per candidate the mean scores, the Pareto
front and the recommendation by the rule in workbench/grid/pareto.py against the baseline, the last
step at strength 1.0; 3. the evaluation grid: the recommendation and the baseline on seeds never
used for choosing, style now against the held-out pictures, with paired bootstrap intervals
(workbench/grid/stats.py) — a warning when the gain is within noise; 4. outputs
(workbench/grid/pick_report.py), the chosen step file under the LoRA's name and the merged A1111
sidecar (workbench/formats/sidecar.py).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from workbench import system
from workbench.errors import OutputExistsError, WorkbenchError
from workbench.formats import sidecar
from workbench.grid import holdout, pareto, pick_report
from workbench.grid.stats import compare_pairs, evidence
from workbench.kinds import grid as grid_kind
from workbench.plan import RunPlan, RunResult, check_input, check_output_file
from workbench.provenance import Provenance
from workbench.recipes.common import LoraRef
from workbench.recipes.grid import GridDefaults, GridOutput, GridRecipe, LoraAxis, Scores, StyleScore, TextAxis
from workbench.recipes.pick import PickRecipe
from workbench.throughput import human_time
from workbench.train.captions import with_trigger
from workbench.train.export import SIDECAR_SD_VERSION
from workbench.train.run_folder import TrainingRun, caption_texts, read_training_run

METRICS = ("style", "clip")


@dataclass(frozen=True)
class Candidate:
    """One (step, strength) of the grid: the LoRA file of that step at that strength."""

    step: int
    strength: float
    path: Path

    @property
    def label(self) -> str:
        return f"step {self.step} @ {self.strength:g}"


@dataclass
class PickPlan:
    """What the run makes: the candidates, the baseline among them, prompts, seeds and places."""

    run: TrainingRun
    split: holdout.ReferenceSplit
    candidates: list[Candidate]
    baseline: int
    prompts: list[str]
    selection_seeds: list[int]
    evaluation_seeds: list[int]
    out_dir: Path
    lora_path: Path
    arch: str | None = None
    selection_cells: int = 0
    evaluation_cells: int = 0
    lines: list[str] = field(default_factory=list)


def reference_dir(recipe: PickRecipe, run: TrainingRun) -> tuple[Path, str]:
    """(the user's pictures the style is measured against, the field that names them): the
    recipe's `references.dir`, else the training dataset the LoRA learned from."""
    if recipe.references.dir is not None:
        return Path(recipe.references.dir), "references.dir"
    return run.dataset, "dataset (from the training's provenance.json)"


def out_dir_of(recipe: PickRecipe) -> Path:
    return Path(recipe.output.dir) if recipe.output.dir else Path(recipe.training) / "pick"


def grid_recipe(recipe: PickRecipe, run: TrainingRun, candidates: list[Candidate], prompts: list[str],
                seeds: list[int], references: Path, out_dir: Path, name: str) -> GridRecipe:
    """The grid of `candidates` × prompts × seeds, scored for style against `references`."""
    g = recipe.generation
    width = g.width or run.resolution[0]
    height = g.height or run.resolution[1]
    return GridRecipe(
        name=name,
        defaults=GridDefaults(model=run.base, prompt=prompts[0], negative_prompt=g.negative_prompt,
                              sampler=g.sampler, steps=g.steps, cfg=g.cfg, width=width, height=height,
                              clip_skip=g.clip_skip),
        x=LoraAxis(axis="lora", label="step @ strength",
                   values=[LoraRef(path=c.path, weight=c.strength) for c in candidates]),
        y=TextAxis(axis="prompt", values=prompts),
        seeds=seeds,
        scores=Scores(clip=recipe.scores.clip, style=StyleScore(reference_dir=references)),
        memory=recipe.memory,
        output=GridOutput(dir=out_dir))


def _candidates(recipe: PickRecipe, run: TrainingRun, plan: RunPlan) -> tuple[list[Candidate], int]:
    wanted = recipe.step_values()
    if wanted is None:
        steps = list(run.steps)
    else:
        missing = [s for s in wanted if s not in run.steps]
        if missing:
            plan.problems.append(f"steps: {missing} not in {run.folder} (it has steps "
                                 f"{', '.join(map(str, run.steps))})")
        steps = sorted(s for s in set(wanted) if s in run.steps)
        if run.last_step not in steps:  # the baseline is always compared
            steps.append(run.last_step)
    candidates = [Candidate(s, w, run.steps[s]) for s in steps for w in recipe.strength_values()]
    baseline = next(i for i, c in enumerate(candidates) if c.step == run.last_step and c.strength == 1.0)
    return candidates, baseline


def _check_prompts(recipe: PickRecipe, run: TrainingRun, plan: RunPlan) -> None:
    captions = caption_texts(run.dataset)
    for i, p in enumerate(recipe.prompt_values()):
        text = " ".join(p.split()).lower()
        if text in captions or " ".join(with_trigger(p, run.trigger).split()).lower() in captions:
            plan.problems.append(f"prompts[{i}]: {p!r} is a training caption; prompt adherence must "
                                 "be measured on prompts outside the training captions")


def describe(recipe: PickRecipe, overwrite: bool = False) -> RunPlan:
    """Inputs, the reference split, candidates, cells and the time estimate; `detail` is the
    PickPlan the run makes."""
    plan = RunPlan.for_recipe(recipe, overwrite)
    overwrite = overwrite or recipe.output.overwrite
    check_input(plan, "training", recipe.training, expect="dir")
    if plan.problems:
        return plan
    try:
        run = read_training_run(recipe.training)
    except WorkbenchError as e:
        plan.problems.append(str(e))
        return plan
    base = check_input(plan, "base (from the training's provenance.json)", run.base)
    check_input(plan, "dataset (from the training's provenance.json)", run.dataset, expect="images")
    for step, path in run.steps.items():
        check_input(plan, f"step {step}", path, expect="lora")
    sel_seeds, eval_seeds = recipe.seeds.values("selection"), recipe.seeds.values("evaluation")
    references, where = reference_dir(recipe, run)
    if recipe.references.dir is not None:
        check_input(plan, "references.dir", references, expect="images")
    split = None
    if references.is_dir():
        try:
            split = holdout.split_references(references, recipe.references.held_out_fraction, field=where)
        except WorkbenchError as e:
            plan.problems.append(str(e))
    if run.dataset.is_dir():
        _check_prompts(recipe, run, plan)
    candidates, baseline = _candidates(recipe, run, plan)
    out_dir = out_dir_of(recipe)
    lora_dir = Path(recipe.output.lora_dir) if recipe.output.lora_dir else out_dir
    lora_path = lora_dir / f"{run.name}.safetensors"
    if lora_dir.resolve() == run.folder.resolve():
        plan.problems.append(f"output.lora_dir: {lora_dir} is the training folder; the chosen step "
                             f"would replace its final {lora_path.name}, one of the candidates; "
                             "choose another folder (e.g. Forge's models/Lora)")
    try:
        sidecar.read_sidecar(sidecar.sidecar_path(lora_path))
    except WorkbenchError as e:
        plan.problems.append(str(e))
    prompts = [with_trigger(p, run.trigger) for p in recipe.prompt_values()]
    steps = sorted({c.step for c in candidates})
    strengths = recipe.strength_values()
    plan.lines += [
        f"training: {run.folder}: LoRA '{run.name}', {len(run.steps)} step file(s) (steps "
        f"{', '.join(map(str, run.steps))}), trigger {run.trigger!r}, base {run.base.name}",
        f"candidates: {len(steps)} step(s) × {len(strengths)} strength(s) "
        f"({', '.join(f'{s:g}' for s in strengths)}) = {len(candidates)}; baseline: step "
        f"{run.last_step} at strength 1.0",
        f"prompts: {len(prompts)} ({'from the recipe' if recipe.prompts else 'the shipped set'}), "
        f"trigger first; selection seeds {sel_seeds}, evaluation seeds {eval_seeds}",
        f"scores: style similarity and CLIP adherence ({recipe.scores.clip.model}); adherence "
        f"margin {recipe.scores.adherence_margin:g} CLIP points",
    ]
    if split is not None:
        plan.lines.append(f"references: {len(split.selection) + len(split.held_out)} pictures in "
                          f"{references}: {len(split.selection)} for choosing, {len(split.held_out)} "
                          f"held out for the check (held_out_fraction "
                          f"{recipe.references.held_out_fraction:g})")
    check_output_file(plan, lora_path, overwrite,
                      "the chosen step goes there under the LoRA's name; pass --overwrite")
    plan.lines.append(f"writes: report.html, scores.csv, provenance.json in {out_dir}; the chosen "
                      f"step as {lora_path} + {sidecar.sidecar_path(lora_path).name} (A1111 sidecar, "
                      "merged with an existing one)")
    plan.outputs.append(out_dir)
    if plan.problems:
        return plan
    # the split folders are made by the run; the dry run checks the scorer against the dataset
    selection = grid_kind.describe(grid_recipe(recipe, run, candidates, prompts, sel_seeds, references,
                                               out_dir / "selection", f"{recipe.name}-selection"),
                                   overwrite)
    plan.problems += selection.problems
    plan.lines.append("selection grid:")
    plan.lines += ["  " + ln for ln in selection.lines if not ln.startswith(("axes:", "  x:", "  y:"))]
    n_sel = len(candidates) * len(prompts) * len(sel_seeds)
    n_eval = 2 * len(prompts) * len(eval_seeds)
    sel_s = selection.estimated_seconds or 0.0
    todo = len(selection.detail.todo) if selection.detail is not None else n_sel
    eval_s = sel_s / max(todo, 1) * n_eval if todo else 0.0
    plan.estimated_seconds = sel_s + eval_s
    plan.lines.append(f"evaluation grid: up to {n_eval} cells (the recommendation and the baseline × "
                      f"{len(prompts)} prompts × {len(eval_seeds)} evaluation seeds), style against "
                      "the held-out pictures")
    plan.lines.append(f"estimated time: ~{human_time(plan.estimated_seconds)} (selection "
                      f"~{human_time(sel_s)}; evaluation ~{human_time(eval_s)} at the selection's "
                      "speed per cell)")
    if split is not None:
        plan.detail = PickPlan(run, split, candidates, baseline, prompts, sel_seeds, eval_seeds,
                               out_dir, lora_path, base.arch, n_sel, n_eval)
    return plan


# --------------------------------------------------------------------------------------------------
# the run


def _reference_folder(images: tuple[Path, ...], root: Path, folder: Path) -> Path:
    """A folder holding exactly `images` (hard links, else copies), for the grid's style scorer."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for p in images:
        system.link_or_copy(p, folder / p.relative_to(root).as_posix().replace("/", "__"))
    return folder


def _run_grid(recipe: GridRecipe, progress: bool) -> tuple[RunResult, dict[str, dict], list]:
    """Run a grid through the grid kind; (result, scores by cell key, cells)."""
    plan = grid_kind.describe(recipe, overwrite=True)
    if plan.problems:
        raise WorkbenchError(f"grid '{recipe.name}': " + "; ".join(plan.problems))
    result = grid_kind.run(plan, progress=progress)
    rows = json.loads((Path(recipe.output.dir) / "scores.json").read_text(encoding="utf-8"))["cells"]
    return result, {r["key"]: r for r in rows}, plan.detail.cells


def _means(cells, scores: dict[str, dict], n: int) -> list[dict[str, float]]:
    sums = [{m: [] for m in METRICS} for _ in range(n)]
    for cell in cells:
        for m in METRICS:
            sums[cell.index[0]][m].append(float(scores[cell.key][m]))
    return [{m: sum(v) / len(v) for m, v in s.items()} for s in sums]


def _paired(cells, scores, a: int, b: int, names: tuple[str, str]) -> dict[str, dict]:
    """Paired statistics of candidate b against a (x indices), per metric, units = prompts."""
    by = {(c.index[0], c.index[1], c.seed): scores[c.key] for c in cells}
    keys = sorted((y, s) for (x, y, s) in by if x == a and (b, y, s) in by)
    out = {}
    for m in METRICS:
        stats = compare_pairs([by[(a, y, s)][m] for y, s in keys], [by[(b, y, s)][m] for y, s in keys],
                              [y for y, _ in keys], metric=m, a_name=names[0], b_name=names[1])
        out[m] = {**stats.to_dict(), "evidence": evidence(stats.n_units, stats.ci_low, stats.ci_high)}
    return out


def _rows(phase: str, cells, scores, candidates: list[Candidate], prompts_raw: list[str],
          out_dir: Path, grid_dir: Path) -> list[dict]:
    rows = []
    for c in cells:
        cand, row = candidates[c.index[0]], scores[c.key]
        rows.append({"phase": phase, "step": cand.step, "strength": cand.strength,
                     "prompt": prompts_raw[c.index[1]], "seed": c.seed, "style": row["style"],
                     "clip": row["clip"], "image": (grid_dir / row["image"]).relative_to(out_dir).as_posix(),
                     "key": c.key})
    return rows


def run(plan: RunPlan, *, progress: bool = True) -> RunResult:
    """Selection grid, choice, held-out check, report, the chosen file and its sidecar."""
    recipe: PickRecipe = plan.recipe
    pp: PickPlan = plan.detail
    started = time.perf_counter()
    out = pp.out_dir
    out.mkdir(parents=True, exist_ok=True)
    overwrite = plan.overwrite or recipe.output.overwrite
    if pp.lora_path.exists() and not overwrite:  # appeared since the dry run: fail before the work
        raise OutputExistsError(f"{pp.lora_path}: output exists; pass --overwrite")
    refs = out / "references"
    sel_refs = _reference_folder(pp.split.selection, pp.split.folder, refs / "selection")
    held_refs = _reference_folder(pp.split.held_out, pp.split.folder, refs / "held-out")
    prompts_raw = recipe.prompt_values()

    sel_recipe = grid_recipe(recipe, pp.run, pp.candidates, pp.prompts, pp.selection_seeds, sel_refs,
                             out / "selection", f"{recipe.name}-selection")
    sel_result, sel_scores, sel_cells = _run_grid(sel_recipe, progress)
    means = _means(sel_cells, sel_scores, len(pp.candidates))
    points = [pareto.Candidate(c.label, m["style"], m["clip"]) for c, m in zip(pp.candidates, means)]
    front = pareto.pareto_front(points)
    chosen, rule = pareto.recommend(points, pp.baseline, recipe.scores.adherence_margin)
    base_c, best_c = pp.candidates[pp.baseline], pp.candidates[chosen]
    names = (base_c.label, best_c.label)
    sel_stats = _paired(sel_cells, sel_scores, pp.baseline, chosen, names) if chosen != pp.baseline else None

    pair = [base_c] if chosen == pp.baseline else [base_c, best_c]
    eval_recipe = grid_recipe(recipe, pp.run, pair, pp.prompts, pp.evaluation_seeds, held_refs,
                              out / "evaluation", f"{recipe.name}-evaluation")
    _, eval_scores, eval_cells = _run_grid(eval_recipe, progress)
    eval_stats = _paired(eval_cells, eval_scores, 0, 1, names) if len(pair) == 2 else None
    eval_means = _means(eval_cells, eval_scores, len(pair))

    verdict, within_noise = pick_report.verdict(pp, best_c, base_c, sel_stats, eval_stats, len(points),
                                                rule)
    rows = (_rows("selection", sel_cells, sel_scores, pp.candidates, prompts_raw, out, out / "selection")
            + _rows("evaluation", eval_cells, eval_scores, pair, prompts_raw, out, out / "evaluation"))
    csv_path = pick_report.write_csv(rows, out / "scores.csv")
    svg = pareto.scatter_svg(points, front, baseline=pp.baseline, chosen=chosen,
                             title=f"{pp.run.name}: style against prompt adherence "
                                   f"({len(points)} step × strength candidates)")
    summary_facts = {
        "lora": pp.run.name, "recommended": {"step": best_c.step, "strength": best_c.strength},
        "baseline": {"step": base_c.step, "strength": base_c.strength}, "rule": rule,
        "candidates": [{"step": c.step, "strength": c.strength, "style": m["style"], "clip": m["clip"],
                        "pareto": i in front} for i, (c, m) in enumerate(zip(pp.candidates, means))],
        "selection_statistics": sel_stats, "evaluation_statistics": eval_stats,
        "evaluation_means": [{"step": c.step, "strength": c.strength, **m} for c, m in zip(pair, eval_means)],
        "within_noise": within_noise,
        "references": {"selection": [p.name for p in pp.split.selection],
                       "held_out": [p.name for p in pp.split.held_out]},
        "seeds": {"selection": pp.selection_seeds, "evaluation": pp.evaluation_seeds},
        "cells": {"selection": len(sel_cells), "evaluation": len(eval_cells)},
    }

    how = system.link_or_copy(best_c.path, pp.lora_path, overwrite=overwrite)
    side_path = sidecar.sidecar_path(pp.lora_path)
    existing = sidecar.read_sidecar(side_path) if side_path.exists() else sidecar.read_sidecar(pp.run.sidecar)
    note = (f"step {best_c.step} of {pp.run.last_step} at strength {best_c.strength:g}, chosen among "
            f"{len(points)} candidates; {'within noise of' if within_noise else 'better than'} the "
            f"last step at 1.0 on held-out pictures (see {out.name}/report.html)")
    side = sidecar.merged(existing, preferred_weight=best_c.strength, activation_text=pp.run.trigger,
                          sd_version=SIDECAR_SD_VERSION.get(pp.arch or "", None),
                          description=f"{pp.run.name}: style LoRA, step {best_c.step} chosen by workbench pick",
                          note=note)
    sidecar.write_sidecar(side_path, side)

    elapsed = time.perf_counter() - started
    summary = (f"pick '{pp.run.name}': step {best_c.step} at strength {best_c.strength:g} "
               f"(baseline: step {base_c.step} at 1.0) from {len(points)} candidates, "
               f"{len(sel_cells)} selection + {len(eval_cells)} evaluation cells, {elapsed:.1f} s"
               + ("; WARNING: within noise of the baseline on the held-out check" if within_noise else "")
               + f"; wrote {pp.lora_path.name} ({how}) and {side_path.name}")
    html_path = pick_report.write_html(out, title=f"pick: {pp.run.name}", verdict=verdict, svg=svg,
                                       pages=[p.path for p in getattr(sel_result, "pages", [])],
                                       facts=summary_facts, summary=summary)
    prov = Provenance(kind="pick", name=recipe.name or "pick",
                      recipe_path=str(recipe.source_path) if recipe.source_path else None,
                      recipe_text=recipe.source_text or recipe.model_dump_json(exclude_none=True))
    for check in plan.inputs:
        if check.exists and check.size is not None:
            prov.add_input(check.label, check.path)
    prov.seeds = {"selection": pp.selection_seeds, "evaluation": pp.evaluation_seeds}
    prov.timings["pick"] = round(elapsed, 3)
    outputs = [html_path, csv_path, pp.lora_path, side_path]
    prov.outputs = [str(p) for p in outputs]
    prov.extra = {**summary_facts, "linked": how}
    prov_path = prov.write(out)
    result = RunResult("pick", recipe.name or "pick", False, plan, [*outputs, prov_path], summary=summary)
    result.recommended = (best_c.step, best_c.strength)  # type: ignore[attr-defined]
    result.facts = summary_facts  # type: ignore[attr-defined]
    return result
