"""The merge engine's entry points: `describe` for the dry run, `run` for the real thing.

`run` builds the plan from headers (refusing mixed architectures and bad parameters before any
tensor is read), checks the disk has room, then streams every key through the executor into the
atomic writer with a progress bar over bytes. Ctrl-C or any error leaves no output file behind.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.formats.model_file import open_model
from workbench.formats.writer import SafetensorsWriter
from workbench.merge.build import MergePlan, build_plan, output_plan
from workbench.merge.executor import DEFAULT_BUDGET, stream
from workbench.merge.graph import InputNode, Policy
from workbench.merge.metadata import input_hashes, merge_metadata

# Throughput assumed by the dry run's time estimate (bytes of output per second), measured on the
# project's 2-core reference machine for fp16 SD1.5 weighted sums; a rough guide, not a promise.
EST_OUTPUT_BYTES_PER_S = 400e6
BASELINE_RAM = 400 * 1024**2  # Python + torch + libraries, measured after import


def _gib(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.0f} MiB"


def estimated_peak_ram(plan: MergePlan, budget: int = DEFAULT_BUDGET) -> int:
    """Process memory the streaming merge should need: libraries + the in-flight budget (or the
    largest single key when it is bigger than the budget)."""
    largest = max((k.work_bytes for k in plan.keys), default=0)
    return BASELINE_RAM + max(budget, largest)


def describe(recipe, overwrite: bool = False) -> tuple[list[str], list[str]]:
    """(lines, problems) the dry run adds: architecture, per-policy counts, RAM, size, time, disk."""
    try:
        plan = build_plan(recipe)
    except WorkbenchError as e:
        return [], [str(e)]
    from workbench.formats.hashes import sha256_file

    lines = [f"architecture: {plan.arch} ({len(plan.keys)} output tensors)", "input hashes (sha256):"]
    for name, inp in plan.inputs.items():
        lines.append(f"  {name}: {sha256_file(inp.path)[:10]}  {inp.info.arch} {inp.info.kind}"
                     + (f" ({inp.info.variant})" if inp.info.variant else ""))
    for step, groups in plan.policies.items():
        lines.append(f"  step {step}:")
        for policy in Policy:
            keys = groups.get(policy, [])
            if keys:
                example = "" if policy is Policy.MERGE else f"  e.g. {keys[0]}"
                lines.append(f"    {len(keys):5d} {policy.value}{example}")
    if plan.pruned:
        lines.append(f"  pruned: {len(plan.pruned)} EMA / training-only keys dropped")
    if plan.baked_vae:
        lines.append(f"  VAE baked in: {plan.baked_vae} tensors from {recipe.output.bake_vae}")
    lines += [f"  {note}" for note in plan.notes]
    out_bytes = plan.output_bytes
    lines += [f"estimated peak RAM: {_gib(estimated_peak_ram(plan))} (inputs are memory-mapped)",
              f"output size: {_gib(out_bytes)}; estimated time: "
              f"{max(1.0, out_bytes / EST_OUTPUT_BYTES_PER_S):.0f} s"]
    problem = _disk_problem(Path(recipe.output.path), out_bytes)
    return lines, [problem] if problem else []


def _disk_problem(target: Path, needed: int) -> str | None:
    """'not enough disk space ...' when the output's file system lacks room (5 % margin)."""
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if free < needed * 1.05:
        return f"not enough disk space for {target}: needs {_gib(needed)}, {_gib(free)} free"
    return None


def run(recipe, *, overwrite: bool = False, progress: bool = True,
        cancel: threading.Event | None = None, threads: int | None = None):
    """Merge as the recipe says and write the output atomically; returns the RunResult."""
    from workbench.provenance import Provenance
    from workbench.runner import RunResult

    started = time.perf_counter()
    plan = build_plan(recipe)
    target = Path(recipe.output.path)
    out_bytes = plan.output_bytes
    problem = _disk_problem(target, out_bytes)
    if problem:
        raise WorkbenchError(problem)
    target.parent.mkdir(parents=True, exist_ok=True)
    hashes = input_hashes(plan)
    metadata = merge_metadata(recipe, plan, hashes)
    overwrite = overwrite or recipe.output.overwrite
    readers = []
    for node in _input_nodes(plan):
        lazy = open_model(node.path).__enter__()  # GGUF/NF4/scaled fp8: decoded
        readers.append(lazy)
        node.reader = lazy.view
    from workbench import progress as progress_events

    cancel = cancel or progress_events.cancel_event()
    try:
        with progress_events.task(f"merging {len(plan.keys)} tensors", out_bytes, "B", bar=progress,
                                  unit_scale=True, unit_divisor=1024) as bar, \
                SafetensorsWriter(target, output_plan(plan), metadata, overwrite=overwrite) as writer:
            stream(plan.keys, writer, threads=threads, cancel=cancel,
                   on_written=lambda k: bar.advance(k.nbytes, check=False))
        progress_events.check_cancelled()
    finally:
        for lazy in readers:
            lazy.close()
        for node in _input_nodes(plan):
            node.reader = None
    elapsed = time.perf_counter() - started
    prov = Provenance(kind="merge", name=recipe.name,
                      recipe_path=str(recipe.source_path) if recipe.source_path else None,
                      recipe_text=recipe.source_text)
    for name, inp in plan.inputs.items():
        prov.inputs[name] = {"path": str(inp.path), "sha256": hashes[name], "autov2": hashes[name][:10],
                             "size": inp.path.stat().st_size, "arch": inp.info.arch}
    prov.timings["merge"] = round(elapsed, 3)
    prov.outputs.append(str(target))
    prov.extra = {"policies": {s: {p.name.lower(): len(k) for p, k in g.items()}
                               for s, g in plan.policies.items()}, "notes": plan.notes}
    prov_path = prov.write(target.parent, f"{target.stem}.provenance.json")
    return RunResult("merge", recipe.name, False, None, [target, prov_path],
                     summary=f"merge '{recipe.name}': wrote {target} ({_gib(out_bytes)}, "
                             f"{len(plan.keys)} tensors, {elapsed:.1f} s)")


def _input_nodes(plan: MergePlan) -> list[InputNode]:
    nodes = {}
    for k in plan.keys:
        if isinstance(k.source, InputNode):
            nodes[id(k.source)] = k.source
    for step in plan.steps:
        for n in step.inputs:
            if isinstance(n, InputNode):
                nodes[id(n)] = n
    return list(nodes.values())
