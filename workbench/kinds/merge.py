"""`kind: merge`: the dry run and the run of a merge recipe.

`describe` checks the inputs, builds the merge plan from headers (refusing mixed architectures and
bad parameters before any tensor is read) and reports per-key policies, RAM, size, time and disk.
`run` streams that same plan's keys through the executor into the atomic writer with a progress bar
over bytes. Ctrl-C or any error leaves no output file behind.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from workbench import progress as progress_events
from workbench import throughput
from workbench.errors import WorkbenchError
from workbench.formats.blocks import parse_block_values
from workbench.formats.detect import detect
from workbench.formats.hashes import sha256_file
from workbench.formats.writer import SafetensorsWriter
from workbench.merge.build import MergePlan, output_plan, plan_merge
from workbench.merge.executor import DEFAULT_BUDGET, open_inputs, stream
from workbench.merge.graph import Policy
from workbench.merge.methods import ALPHA_B, METHODS
from workbench.merge.metadata import input_hashes, merge_metadata
from workbench.plan import (
    RunPlan,
    RunResult,
    check_input,
    check_output_file,
    disk_problem,
    lora_problem,
    ram_problem,
)
from workbench.provenance import Provenance
from workbench.recipes.merge import MergeRecipe
from workbench.throughput import human_time
from workbench.units import human_size

# Throughput assumed by the dry run's time estimate (bytes of output per second) until a merge has
# been measured on this machine (workbench/throughput.py); from the project's 2-core reference
# machine for fp16 SD1.5 weighted sums, so only a rough guide on other disks.
EST_OUTPUT_BYTES_PER_S = 400e6
THROUGHPUT_UNIT = "output bytes/s"
BASELINE_RAM = 400 * 1024**2  # Python + torch + libraries, measured after import


def estimated_peak_ram(plan: MergePlan, budget: int = DEFAULT_BUDGET) -> int:
    """Process memory the streaming merge should need: libraries + the in-flight budget (or the
    largest single key when it is bigger than the budget)."""
    largest = max((k.work_bytes for k in plan.keys), default=0)
    return BASELINE_RAM + max(budget, largest)


def _lora_fits(recipe: MergeRecipe, step, archs: dict[str, str]) -> bool:
    """add_lora of a LoRA that fits several families (text-encoder-only: CLIP-L is in SD1.5, SDXL,
    SD3 and FLUX; workbench/formats/lora_detect.py) onto a model of one of them."""
    if step.method != "add_lora" or len(step.inputs) != 2 or step.inputs[1] not in recipe.models:
        return False
    base, lora = step.inputs
    try:
        info = detect(recipe.models[lora])
    except WorkbenchError:
        return False
    return info.kind == "lora" and archs.get(base) in info.archs


def extrapolation_notes(step, blocks: dict[str, float] | None = None) -> list[str]:
    """Plan notes for shares outside 0..1 in methods whose alpha is the share of the second input
    (weighted_sum, block_weighted, slerp: ALPHA_B in merge/methods.py). Extrapolating is a
    legitimate tool (push past B, or away from it), so it is a note, not a problem. `blocks`: the
    per-block table once the architecture is known (without it only `alpha` is looked at)."""
    method = METHODS.get(step.method)
    if method is None or method.params.get("alpha") is not ALPHA_B:
        return []
    first, second = (step.inputs + ["A", "B"])[:2]
    if blocks is not None:
        outside = {b: v for b, v in blocks.items() if not 0.0 <= v <= 1.0}
        if not outside:
            return []
        shown = ", ".join(f"{b} {v:g}" for b, v in list(outside.items())[:6])
        return [f"note: block weights outside 0..1 ({shown}{', ...' if len(outside) > 6 else ''}) "
                f"extrapolate beyond {first} and {second} in those blocks: legitimate, but the "
                "further outside, the likelier artefacts"]
    alpha = step.alpha
    if alpha is None or step.blocks is not None:  # with blocks, the table decides every share
        return []
    values = {"alpha": alpha} if isinstance(alpha, (int, float)) else \
        {f"alpha.{k}": v for k, v in alpha.model_dump().items() if v is not None}
    notes = []
    for name, a in values.items():
        if a > 1.0:
            notes.append(f"note: {name} {a:g} is above 1: {step.method} extrapolates past {second} "
                         f"({first} + {a:g}·({second} − {first})), pushing further in {second}'s "
                         "direction; legitimate, but the further past 1, the likelier artefacts")
        elif a < 0.0:
            notes.append(f"note: {name} {a:g} is below 0: {step.method} extrapolates away from "
                         f"{second} ({first} − {-a:g}·({second} − {first})), moving {first} "
                         f"opposite to {second}; legitimate, but the further below 0, the likelier "
                         "artefacts")
    return notes


def describe(recipe: MergeRecipe, overwrite: bool = False) -> RunPlan:
    """Inputs, steps, per-policy counts, RAM, size, time and disk; `detail` is the MergePlan."""
    plan = RunPlan.for_recipe(recipe, overwrite)
    archs: dict[str, str] = {}
    checks = {}
    for label, path in recipe.models.items():
        check = checks[label] = check_input(plan, label, path)
        if check.arch:
            archs[label] = check.arch
    plan.lines.append("steps:")
    for n, step in enumerate(recipe.steps, 1):
        params = "  ".join(f"{k}={v}" for k, v in step.params().items())
        plan.lines.append(f"  {n}. {step.id} = {step.method}({', '.join(step.inputs)})  {params}"
                          .rstrip())
        seen = {archs[i] for i in step.inputs if i in archs}
        fits = _lora_fits(recipe, step, archs)
        lora_problems = [] if fits else [lora_problem(checks[i], f"{step.inputs[0]} (the step's first input)",
                                      archs.get(step.inputs[0]))
                         for i in step.inputs[1:] if i in checks and checks[i].kind == "lora"]
        if any(lora_problems):
            plan.problems += [f"step {step.id}: {p}" for p in lora_problems if p]
        elif len(seen) > 1 and not fits:
            plan.problems.append(f"step {step.id}: inputs are different architectures "
                                 f"({', '.join(sorted(seen))}); every input of a step must be "
                                 "the same architecture")
        plan.lines += [f"     {note}" for note in extrapolation_notes(step)]
        if step.inputs and step.inputs[0] in archs:
            archs[step.id] = archs[step.inputs[0]]
        if step.blocks is not None and step.id in archs:
            try:
                table = parse_block_values(archs[step.id], step.blocks,
                                           default=0.0 if isinstance(step.blocks, dict) else None)
            except WorkbenchError as e:
                plan.problems.append(f"step {step.id}: {e}")
            else:
                plan.lines += [f"     {note}" for note in extrapolation_notes(step, table)]
    out = recipe.output
    plan.lines.append(f"writes step '{recipe.final_step}' as {out.dtype or 'the first input dtype'}"
                      + (", pruned" if out.prune else "")
                      + (f", VAE baked from {out.bake_vae}" if out.bake_vae else ""))
    if out.bake_vae is not None:
        check_input(plan, "bake_vae", out.bake_vae)
    check_output_file(plan, out.path, overwrite or out.overwrite,
                      "pass --overwrite or set `output.overwrite: true` to replace it")
    if plan.problems:  # the merge plan needs readable inputs of one architecture
        return plan
    try:
        merge = plan_merge(recipe)
    except WorkbenchError as e:
        plan.problems.append(str(e))
        return plan
    plan.detail = merge
    _describe_merge(plan, recipe, merge)
    return plan


def _describe_merge(plan: RunPlan, recipe: MergeRecipe, merge: MergePlan) -> None:
    lines = [f"architecture: {merge.arch} ({len(merge.keys)} output tensors)", "input hashes (sha256):"]
    for name, inp in merge.inputs.items():
        lines.append(f"  {name}: {sha256_file(inp.path)[:10]}  {inp.info.arch} {inp.info.kind}"
                     + (f" ({inp.info.variant})" if inp.info.variant else ""))
    for step, groups in merge.policies.items():
        lines.append(f"  step {step}:")
        for policy in Policy:
            keys = groups.get(policy, [])
            if keys:
                example = "" if policy is Policy.MERGE else f"  e.g. {keys[0]}"
                lines.append(f"    {len(keys):5d} {policy.value}{example}")
    lines += [f"  {note}" for note in merge.notes]
    if merge.pruned:
        lines.append(f"  pruned: {len(merge.pruned)} EMA / training-only keys dropped")
    if merge.baked_vae:
        lines.append(f"  VAE baked in: {merge.baked_vae} tensors from {recipe.output.bake_vae}")
    out_bytes = merge.output_bytes
    peak = estimated_peak_ram(merge)
    seconds, how = estimate_seconds(merge)
    plan.estimated_seconds = seconds
    lines += [f"estimated peak RAM: {human_size(peak)} (inputs are memory-mapped)",
              f"output size: {human_size(out_bytes)}; estimated time: {human_time(seconds)} ({how})"]
    plan.lines += lines
    for problem in (disk_problem(Path(recipe.output.path), out_bytes),
                    ram_problem(peak, "this merge", "close other programs to free RAM (the merge "
                                "holds libraries and the tensors in flight; the inputs are read "
                                "from disk as needed)")):
        if problem:
            plan.problems.append(problem)


def estimate_seconds(merge: MergePlan) -> tuple[float, str]:
    """(seconds, how it was estimated): from the output bytes per second measured by earlier merges
    of this architecture on this machine, else the rough constant."""
    rate = throughput.measured("merge", merge.arch, "cpu")
    if rate is not None:
        return (max(1.0, merge.output_bytes / rate.value),
                f"measured on this machine: {human_size(rate.value)}/s, median of the last "
                f"{rate.runs} {merge.arch} merge{'s' if rate.runs != 1 else ''}")
    return (max(1.0, merge.output_bytes / EST_OUTPUT_BYTES_PER_S),
            f"rough: no {merge.arch} merge measured on this machine yet; assumes "
            f"{human_size(EST_OUTPUT_BYTES_PER_S)}/s")


def run(plan: RunPlan, *, progress: bool = True, cancel: threading.Event | None = None,
        threads: int | None = None) -> RunResult:
    """Merge as planned and write the output atomically, with provenance beside it."""
    recipe: MergeRecipe = plan.recipe
    merge: MergePlan = plan.detail
    started = time.perf_counter()
    target = Path(recipe.output.path)
    out_bytes = merge.output_bytes
    problem = disk_problem(target, out_bytes)  # the disk may have filled since the dry run
    if problem:
        raise WorkbenchError(problem)
    target.parent.mkdir(parents=True, exist_ok=True)
    hashes = input_hashes(merge)
    metadata = merge_metadata(recipe, merge, hashes)
    overwrite = plan.overwrite or recipe.output.overwrite
    cancel = cancel or progress_events.cancel_event()
    with open_inputs(merge), \
            progress_events.task(f"merging {len(merge.keys)} tensors", out_bytes, "B", bar=progress,
                                 unit_scale=True, unit_divisor=1024) as bar, \
            SafetensorsWriter(target, output_plan(merge), metadata, overwrite=overwrite) as writer:
        stream(merge.keys, writer, threads=threads, cancel=cancel,
               on_written=lambda k: bar.advance(k.nbytes, check=False))
    progress_events.check_cancelled()
    elapsed = time.perf_counter() - started
    rate = out_bytes / elapsed if elapsed > 0 else 0.0
    throughput.record("merge", merge.arch, "cpu", rate, THROUGHPUT_UNIT)
    prov = Provenance(kind="merge", name=recipe.name,
                      recipe_path=str(recipe.source_path) if recipe.source_path else None,
                      recipe_text=recipe.source_text)
    for name, inp in merge.inputs.items():
        prov.inputs[name] = {"path": str(inp.path), "sha256": hashes[name], "autov2": hashes[name][:10],
                             "size": inp.path.stat().st_size, "arch": inp.info.arch}
    prov.timings["merge"] = round(elapsed, 3)
    prov.outputs.append(str(target))
    prov.extra = {"policies": {s: {p.name.lower(): len(k) for p, k in g.items()}
                               for s, g in merge.policies.items()}, "notes": merge.notes}
    prov_path = prov.write(target.parent, f"{target.stem}.provenance.json")
    estimated = (f"; the dry run estimated {human_time(plan.estimated_seconds)}"
                 if plan.estimated_seconds is not None else "")
    return RunResult("merge", recipe.name, False, plan, [target, prov_path],
                     summary=f"merge '{recipe.name}': wrote {target} ({human_size(out_bytes)}, "
                             f"{len(merge.keys)} tensors, {elapsed:.1f} s at "
                             f"{human_size(rate)}/s{estimated})")
