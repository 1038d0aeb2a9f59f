"""`kind: merge_search`: the dry run and the run of a merge-weight search toward the user's pictures.

describe: check the inputs (same architecture, one whose merges preview in memory), split the
reference pictures into selection and held-out parts (grid/holdout.py; that selection and
evaluation seeds are disjoint the recipe itself checks, recipes/choice.py), build the search space, count the trials the journal already holds
and estimate the time from speeds measured on this machine (workbench/throughput.py).

run: optuna's TPE sampler (fixed seed) proposes points; each is merged in memory and scored on the
selection seeds against the selection pictures (grid/merge_trials.py). Trials live in an optuna
journal in the output folder (grid/search_store.py), so a stopped search continues to its budget.
The best trial is then checked against both inputs on the evaluation seeds and the held-out
pictures with paired statistics (grid/stats.py), and written as an ordinary merge recipe
(best.yaml) with trials.csv, grid.png, report.html (grid/search_report.py) and provenance.json.
"""

from __future__ import annotations

import statistics as pystats
import time
from dataclasses import dataclass
from pathlib import Path

from workbench import throughput
from workbench.arch import BY_ID
from workbench.errors import WorkbenchError
from workbench.formats.writer import atomic_write_text
from workbench.grid import search_report
from workbench.grid.holdout import ReferenceSplit, split_references
from workbench.grid.merge_trials import TrialScorer
from workbench.grid.scores import check_backbone, load_backbone
from workbench.grid.search_store import JOURNAL_FILE, open_storage
from workbench.grid.stats import compare_pairs, shown_better
from workbench.kinds.grid import ARCH_FACTOR, SECONDS_PER_STEP_MP, device_kind
from workbench.merge.search_space import SearchSpace, input_recipe, point_recipe
from workbench.pipeline.model import ImageSettings
from workbench.plan import RunPlan, RunResult, check_input
from workbench.progress import task
from workbench.provenance import Provenance
from workbench.recipes.grid import Scores
from workbench.recipes.loader import recipe_to_yaml
from workbench.recipes.merge_search import MergeSearchRecipe
from workbench.throughput import human_time
from workbench.formats.hashes import files_sha256, sha256_file

BEST_RECIPE = "best.yaml"
PREVIEW_UNIT = "seconds per merge preview"
ROUGH_PREVIEW_BYTES_PER_S = 200e6  # merged bytes per second before a preview was measured


@dataclass
class SearchPlan:
    """What the run does: the space, the reference split, the study and the trials left."""

    arch: str
    space: SearchSpace
    split: ReferenceSplit
    study_name: str
    finished: int
    to_run: int
    settings: ImageSettings


def settings_of(recipe: MergeSearchRecipe, arch: str) -> ImageSettings:
    """The recipe's `generation:`, an unset size being the architecture's native one."""
    g = recipe.generation
    side = BY_ID[arch].native_side
    return ImageSettings(prompt="", negative_prompt=g.negative_prompt, sampler=g.sampler, steps=g.steps,
                         cfg=g.cfg, width=g.width or side, height=g.height or side, clip_skip=g.clip_skip)


def study_name(recipe: MergeSearchRecipe, split: ReferenceSplit) -> str:
    """What decides a trial's score: inputs, method, space, prompts, seeds, settings, references.
    A journal holding trials of another identity is not mixed in: they form another study."""
    import hashlib
    import json

    identity = {
        "inputs": {k: sha256_file(p) for k, p in recipe.inputs.model_dump().items() if p},
        "method": recipe.method, "space": recipe.space, "range": list(recipe.alpha_range),
        "prompts": recipe.prompt_values(), "selection": recipe.seeds.values("selection"),
        "generation": recipe.generation.model_dump(mode="json"),
        "scores": recipe.scores.model_dump(mode="json"), "references": files_sha256(split.selection),
        "sampler_seed": recipe.sampler_seed,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    return f"{recipe.name}-{digest[:12]}"


def finished_trials(study) -> list:
    from optuna.trial import TrialState  # heavy import

    return [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]


def _count_finished(out_dir: Path, name: str) -> int:
    """Finished trials of this study in the output folder's journal (0 when there is none)."""
    if not (out_dir / JOURNAL_FILE).is_file():
        return 0
    import optuna  # heavy import

    try:
        study = optuna.load_study(study_name=name, storage=open_storage(out_dir))
    except KeyError:  # the journal holds other studies only
        return 0
    return len(finished_trials(study))


def estimate_seconds(recipe: MergeSearchRecipe, arch: str, s: ImageSettings, to_run: int,
                     input_bytes: int) -> tuple[float, str]:
    """(seconds, how): trials x (one preview + its pictures of settings `s`) + the inputs and the
    held-out check."""
    dev = device_kind(recipe.memory.device)
    per_step = throughput.measured("grid", arch, dev)
    rate = per_step.value if per_step else SECONDS_PER_STEP_MP[dev] * ARCH_FACTOR.get(arch, 1.0)
    per_image = rate * s.steps * s.width * s.height / 1e6
    preview = throughput.measured("merge-preview", arch, dev)
    merge = preview.value if preview else input_bytes / ROUGH_PREVIEW_BYTES_PER_S
    n_prompts = len(recipe.prompt_values())
    images = (to_run * recipe.cells_per_trial() + 2 * recipe.cells_per_trial()
              + 3 * n_prompts * len(recipe.seeds.values("evaluation")))
    total = images * per_image + (to_run + 5) * merge
    how = ["sampling measured on this machine" if per_step else "sampling speed rough (nothing timed yet)",
           "merge preview measured" if preview else "merge preview rough"]
    return total, f"{images} pictures, {to_run + 5} merge previews; " + ", ".join(how)


def describe(recipe: MergeSearchRecipe, overwrite: bool = False) -> RunPlan:
    """Inputs, reference split, seeds, space, trials done / to run, time; `detail`: SearchPlan."""
    overwrite = overwrite or recipe.output.overwrite
    plan = RunPlan.for_recipe(recipe, overwrite)
    checks = [check_input(plan, f"inputs.{k}", p) for k, p in recipe.inputs.model_dump().items() if p]
    check_input(plan, "references.dir", recipe.references.dir, expect="images")
    if recipe.scores.clip.weights is not None:
        check_input(plan, "scores.clip.weights", recipe.scores.clip.weights, expect="any")
    backbone = check_backbone(Scores(clip=recipe.scores.clip))
    if backbone is not None:
        plan.lines += backbone.lines
        plan.problems += backbone.problems
    archs = {c.arch for c in checks if c.exists}
    if len(archs) > 1:
        plan.problems.append("inputs: the models are of different architectures ("
                             + ", ".join(f"{c.label} {c.arch}" for c in checks) + "); merge models of one")
    if plan.problems:
        return plan
    arch = checks[0].arch or ""
    if arch not in BY_ID or not BY_ID[arch].merge_preview:
        plan.problems.append(f"inputs.A: {arch or 'this model'} merges cannot be previewed in memory "
                             "(workbench/arch.py merge_preview), so a search cannot score them")
        return plan
    try:
        split = split_references(recipe.references.dir, recipe.references.held_out_fraction,
                                 field="references.dir")
        low, high = recipe.alpha_range
        space = SearchSpace.build(recipe.space, arch, recipe.inputs.A, low, high)
    except WorkbenchError as e:
        plan.problems.append(str(e))
        return plan
    out_dir = Path(recipe.output.dir)
    name = study_name(recipe, split)
    finished = 0 if overwrite else _count_finished(out_dir, name)
    to_run = max(0, recipe.trials - finished)
    settings = settings_of(recipe, arch)
    seconds, how = estimate_seconds(recipe, arch, settings, to_run, sum(c.size or 0 for c in checks[:2]))
    selection, evaluation = recipe.seeds.values("selection"), recipe.seeds.values("evaluation")
    n_prompts = len(recipe.prompt_values())
    plan.lines += [
        f"method: {recipe.method}; space: {recipe.space} ({len(space.names)} parameter"
        f"{'s' if len(space.names) != 1 else ''}: {', '.join(space.names[:8])}"
        f"{', ...' if len(space.names) > 8 else ''}) in [{space.low:g}, {space.high:g}]",
        f"references: {len(split.selection) + len(split.held_out)} pictures: {len(split.selection)} "
        f"for selection, {len(split.held_out)} held out for the check",
        f"seeds: selection {selection}, evaluation {evaluation}",
        f"trials: {recipe.trials} ({finished} finished in {out_dir / JOURNAL_FILE}, {to_run} to run)",
        f"cells per trial: {recipe.cells_per_trial()} ({n_prompts} prompt{'s' if n_prompts != 1 else ''}"
        f"{'' if recipe.prompts else ' (the shipped set)'} x {len(selection)} selection seeds, "
        f"{settings.width}x{settings.height}, {settings.steps} steps)",
        "objective: style similarity; adherence (CLIP score) "
        + (f"no worse than the better input by more than {recipe.scores.adherence_margin:g}"
           if recipe.scores.adherence == "constraint" else "as a second objective (Pareto front)"),
        f"estimated time: ~{human_time(seconds)} ({how})",
    ]
    if overwrite and (out_dir / JOURNAL_FILE).is_file():
        plan.lines.append(f"overwrite: the trials in {out_dir / JOURNAL_FILE} are discarded")
    plan.outputs.append(out_dir)
    plan.estimated_seconds = seconds
    plan.detail = SearchPlan(arch, space, split, name, finished, to_run, settings)
    return plan


# --------------------------------------------------------------------------------------------------
# the run


def _sampler(recipe: MergeSearchRecipe, n_params: int):
    """TPE with a fixed seed; adherence constraints are set per trial (Trial.set_constraint)."""
    import optuna  # heavy import

    startup = max(3, min(10, recipe.trials // 4))
    return optuna.samplers.TPESampler(seed=recipe.sampler_seed, n_startup_trials=startup,
                                      multivariate=n_params > 1)


def _choose(recipe: MergeSearchRecipe, trials: list, threshold: float):
    """The best finished trial: most stylish among those meeting the adherence bar (or, when
    none does, the most stylish overall; the report says so)."""
    feasible = [t for t in trials if t.user_attrs["clip"] >= threshold]
    pool = feasible or trials
    return max(pool, key=lambda t: (t.user_attrs["style"], -t.number)), bool(feasible)


def run(plan: RunPlan, *, progress: bool = True, scorer: TrialScorer | None = None) -> RunResult:
    """Run the trials the plan counted, then check the best on held-out seeds and pictures."""
    import optuna  # heavy import: only when a search runs

    recipe: MergeSearchRecipe = plan.recipe
    sp: SearchPlan = plan.detail
    started = time.perf_counter()
    out_dir = Path(recipe.output.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if plan.overwrite and (out_dir / JOURNAL_FILE).is_file():
        (out_dir / JOURNAL_FILE).unlink()
    if scorer is None:
        clip = recipe.scores.clip
        backbone = load_backbone(clip.model, clip.weights, clip.pretrained, recipe.memory.device)
        scorer = TrialScorer(backbone, {"selection": sp.split.selection, "held_out": sp.split.held_out},
                             sp.settings, recipe.prompt_values(), device=recipe.memory.device)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pareto = recipe.scores.adherence == "pareto"
    study = optuna.create_study(study_name=sp.study_name, storage=open_storage(out_dir),
                                sampler=_sampler(recipe, len(sp.space.names)), load_if_exists=True,
                                directions=["maximize", "maximize"] if pareto else ["maximize"])
    scratch = out_dir / "merged" / "preview.safetensors"  # never written: previews stay in memory
    selection = recipe.seeds.values("selection")
    baseline = study.user_attrs.get("baseline")
    if baseline is None:
        baseline = {}
        for which in ("A", "B"):
            s = scorer.score(input_recipe(recipe, which, scratch), selection, name=f"input {which}")
            baseline[which] = {"style": s.mean_style, "clip": s.mean_clip}
        study.set_user_attr("baseline", baseline)
    threshold = max(baseline["A"]["clip"], baseline["B"]["clip"]) - recipe.scores.adherence_margin
    merge_times: list[float] = []
    sample_rates: list[float] = []
    s = sp.settings

    def objective(trial):
        point = sp.space.suggest(trial)
        result = scorer.score(point_recipe(recipe, sp.space, point, recipe.name, scratch), selection,
                              name=f"trial {trial.number}")
        merge_times.append(result.merge_seconds)
        sample_rates.append(result.sample_seconds / max(1, len(result.style))
                            / (s.steps * s.width * s.height / 1e6))
        trial.set_user_attr("style", result.mean_style)
        trial.set_user_attr("clip", result.mean_clip)
        if not pareto:  # optuna: a value <= 0 is feasible
            trial.set_constraint("adherence", threshold - result.mean_clip)
        trial.set_user_attr("seconds", round(result.merge_seconds + result.sample_seconds, 3))
        return (result.mean_style, result.mean_clip) if pareto else result.mean_style

    to_run = max(0, recipe.trials - len(finished_trials(study)))
    if to_run:
        with task("merge search", to_run, "trial", bar=progress) as t:
            def advance(_study, frozen):
                t.advance(1, message=f"trial {frozen.number}: style {frozen.user_attrs.get('style', 0):.4f}")

            study.optimize(objective, n_trials=to_run, callbacks=[advance], catch=())
    trials = sorted(finished_trials(study), key=lambda t: t.number)
    if not trials:
        raise WorkbenchError(f"merge search '{recipe.name}': no trial finished")
    dev = device_kind(recipe.memory.device)
    if merge_times:
        throughput.record("merge-preview", sp.arch, dev, pystats.median(merge_times), PREVIEW_UNIT)
        throughput.record("grid", sp.arch, dev, pystats.median(sample_rates),
                          "seconds per step per megapixel")
    pool = list(study.best_trials) if pareto else trials  # the front holds finished trials only
    best, feasible = _choose(recipe, pool or trials, threshold)
    best_point = {n: float(best.params[n]) for n in sp.space.names}
    merged_path = out_dir / "merged" / f"{recipe.name}-best.safetensors"
    best_recipe = point_recipe(recipe, sp.space, best_point, f"{recipe.name}-best", merged_path)

    # the check: best against both inputs on evaluation seeds and held-out pictures
    evaluation = recipe.seeds.values("evaluation")
    checked = {
        "best": scorer.score(best_recipe, evaluation, "held_out", keep_images=True, name="best"),
        "A": scorer.score(input_recipe(recipe, "A", scratch), evaluation, "held_out", keep_images=True,
                          name="input A"),
        "B": scorer.score(input_recipe(recipe, "B", scratch), evaluation, "held_out", keep_images=True,
                          name="input B"),
    }
    comparisons = []
    for other in ("A", "B"):
        for metric in ("style", "clip"):
            a, b = getattr(checked[other], metric), getattr(checked["best"], metric)
            comparisons.append(compare_pairs(a, b, checked["best"].units, metric=metric, a_name=other,
                                             b_name="best", unit="prompt").to_dict())
    better = max(("A", "B"), key=lambda k: checked[k].mean_style)
    vs_better = next(c for c in comparisons if c["a"] == better and c["metric"] == "style")
    within_noise = not shown_better(vs_better)

    yaml_text = recipe_to_yaml(best_recipe, base_dir=out_dir)
    yaml_text = (f"# best of {len(trials)} trials of merge_search '{recipe.name}'; run it with\n"
                 f"#   workbench run {BEST_RECIPE}\n" + yaml_text)
    best_path = out_dir / BEST_RECIPE
    atomic_write_text(best_path, yaml_text, overwrite=True)
    csv_path = search_report.write_trials_csv(out_dir, trials, sp.space.names, threshold)
    grid_path = search_report.write_grid(out_dir, recipe, checked)
    elapsed = time.perf_counter() - started
    summary = (f"merge search '{recipe.name}': {len(trials)} trials ({to_run} run now), best "
               + ", ".join(f"{k} {v:.3g}" for k, v in best_point.items())
               + f" (selection style {best.user_attrs['style']:.4f}); held-out style best "
               f"{checked['best'].mean_style:.4f} vs A {checked['A'].mean_style:.4f}, B "
               f"{checked['B'].mean_style:.4f}" + ("; NOT SHOWN BETTER than the better input on the held-out check" if within_noise else "")
               + f"; {elapsed:.1f} s")
    info = {
        "name": recipe.name, "trials": len(trials), "run_now": to_run, "space": recipe.space,
        "best": {"trial": best.number, "params": best_point, "style": best.user_attrs["style"],
                 "clip": best.user_attrs["clip"], "meets_adherence": feasible},
        "baseline_selection": baseline, "adherence_threshold": threshold,
        "held_out": {k: {"style": v.mean_style, "clip": v.mean_clip} for k, v in checked.items()},
        "comparisons": comparisons, "within_noise": within_noise, "better_input": better,
        "references": {"selection": len(sp.split.selection), "held_out": len(sp.split.held_out)},
        "seeds": {"selection": selection, "evaluation": evaluation},
        "pareto_front": [t.number for t in study.best_trials] if pareto else None,
    }
    html = search_report.write_html(out_dir, recipe, trials, sp.space.names, info, grid_path, summary)
    prov = Provenance(kind="merge_search", name=recipe.name or "merge_search",
                      recipe_path=str(recipe.source_path) if recipe.source_path else None,
                      recipe_text=recipe.source_text)
    for check in plan.inputs:
        if check.exists and check.size is not None:
            prov.add_input(check.label, check.path)
    prov.seeds = {"selection": selection, "evaluation": evaluation}
    prov.timings["merge_search"] = round(elapsed, 3)
    outputs = [best_path, csv_path, grid_path, html]
    prov.outputs = [str(p) for p in outputs]
    prov.extra = {**info, "sampler": {"name": "TPESampler", "seed": recipe.sampler_seed},
                  "study": sp.study_name, "scorer": {"backbone": scorer.backbone.info}}
    prov_path = prov.write(out_dir)
    result = RunResult("merge_search", recipe.name, False, plan, outputs + [prov_path], summary=summary)
    result.info = info  # type: ignore[attr-defined]
    return result
