"""`kind: extract_lora`: the dry run and the run of a LoRA extraction (the SVD is in
`workbench/merge/extract.py`).

`describe` plans from headers alone (modules, ranks, size); `run` refines that plan with one
identity pass (modules whose weights did not change are left out) and extracts.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.formats.hashes import sha256_file
from workbench.formats.safetensors_io import read_header
from workbench.merge.extract import DTYPES, ExtractPlan, extract_lora, plan_extraction
from workbench.plan import RunPlan, RunResult, check_input, check_output_file, disk_problem
from workbench.provenance import Provenance
from workbench.recipes.extract import ExtractLoraRecipe
from workbench.units import human_size


def describe(recipe: ExtractLoraRecipe, overwrite: bool = False) -> RunPlan:
    """Both models checked, then architecture, module counts per component and ranks (headers
    only); `detail` is the header-only ExtractPlan."""
    plan = RunPlan.for_recipe(recipe, overwrite)
    check_input(plan, "tuned", recipe.tuned)
    check_input(plan, "base", recipe.base)
    plan.lines.append(f"extract LoRA: rank {recipe.rank}"
                      + (f", conv rank {recipe.conv_rank}" if recipe.conv_rank else "")
                      + f", components {', '.join(recipe.components)}, {recipe.output.dtype}")
    check_output_file(plan, recipe.output.path, overwrite or recipe.output.overwrite,
                      "pass --overwrite or set `output.overwrite: true` to replace it")
    if plan.problems:
        return plan
    try:
        extract = plan_extraction(Path(recipe.tuned), Path(recipe.base), recipe.rank, recipe.conv_rank,
                                  tuple(recipe.components), check_identical=False)
    except WorkbenchError as e:
        plan.problems.append(str(e))
        return plan
    plan.detail = extract
    by_comp: dict[str, int] = {}
    for t, _ in extract.modules.values():
        by_comp[t.component] = by_comp.get(t.component, 0) + 1
    n_bytes = sum(math.prod(s) for _, s in extract.tensor_plan("F16").values()) \
        * DTYPES[recipe.output.dtype][0].itemsize
    plan.lines += [f"architecture: {extract.arch}; {len(extract.modules)} modules at most "
                   f"({', '.join(f'{c}: {n}' for c, n in sorted(by_comp.items()))}); modules whose "
                   "weights are identical in both files are left out",
                   f"rank {recipe.rank}" + (f", conv rank {recipe.conv_rank}" if recipe.conv_rank else "")
                   + f"; alpha = rank (scale 1); at most {human_size(n_bytes)} as {recipe.output.dtype}"]
    if extract.missing:
        plan.lines.append(f"  {len(extract.missing)} modules absent from the tuned model, e.g. "
                          f"{extract.missing[0]}")
    problem = disk_problem(Path(recipe.output.path), n_bytes)
    if problem:
        plan.problems.append(problem)
    return plan


def run(plan: RunPlan, *, progress: bool = True) -> RunResult:
    """Extract as planned, then write provenance (with the full local paths) next to the LoRA."""
    recipe: ExtractLoraRecipe = plan.recipe
    header_plan: ExtractPlan = plan.detail
    started = time.perf_counter()
    target = Path(recipe.output.path)
    extract_lora(recipe.tuned, recipe.base, target, recipe.rank, recipe.conv_rank, recipe.output.dtype,
                 tuple(recipe.components), plan.overwrite or recipe.output.overwrite, progress,
                 recipe.clamp_quantile, header_plan=header_plan)
    elapsed = time.perf_counter() - started
    prov = Provenance(kind="extract_lora", name=recipe.name,
                      recipe_path=str(recipe.source_path) if recipe.source_path else None,
                      recipe_text=recipe.source_text)
    for label in ("tuned", "base"):
        path = Path(getattr(recipe, label))
        prov.inputs[label] = {"path": str(path), "sha256": sha256_file(path)}
    prov.timings["extract"] = round(elapsed, 3)
    prov.outputs.append(str(target))
    prov_path = prov.write(target.parent, f"{target.stem}.provenance.json")
    n = len(read_header(target).tensors) // 3
    return RunResult("extract_lora", recipe.name, False, plan, [target, prov_path],
                     summary=f"extract_lora '{recipe.name}': wrote {target} ({n} modules, {elapsed:.1f} s)")
