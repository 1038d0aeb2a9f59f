"""`kind: train`: the dry run and the run of a LoRA training recipe.

Output folder (`output.dir`):
  <name>.safetensors (+ <name>.json A1111 sidecar)   the final LoRA, kohya format
  <name>-step00000250.safetensors                   checkpoints every `output.save_every` steps
  state/step-00000250/                              resumable state (same cadence, `keep_last`)
  samples/step-00000250_00.png                      previews every `samples.every` steps
  loss.csv (every step) and loss.json (at the end)  the loss curve
  provenance.json                                   recipe, input hashes, versions, seeds, timings

`describe` checks the base, the adapter plan, the dataset (the one scan of the run: every image
opened and hashed) and the caching; its `TrainSetup` is what `run` trains with. It refuses a
folder holding an earlier run unless `resume:` or --overwrite says what to do with it; `run`
checks the room before every save and, when stopped, says how to resume (workbench/train/saves.py).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.progress import Cancelled
from workbench.formats.writer import atomic_write_text
from workbench.plan import RunPlan, RunResult, check_input, check_output_file
from workbench.provenance import Provenance
from workbench.recipes.train import TrainRecipe
from workbench.train.cache import caching_plan
from workbench.train.check import require_clean
from workbench.train.export import resolution_of, save_kohya, save_peft, train_facts
from workbench.train.loop import Hooks
from workbench.train.network import plan_for_base
from workbench.train.saves import (SaveGuard, clear_earlier_run, describe_earlier_run, earlier_run,
                                   lora_bytes, resume_hint, samples_bytes, state_bytes)
from workbench.train.samples import make_samples
from workbench.train.setup import (
    TrainSetup,
    base_arch,
    base_sources,
    build_trainer,
    check_recipe_dataset,
)
from workbench.train.state import find_state, load_state, read_state_info, save_state


def describe(recipe: TrainRecipe, overwrite: bool = False) -> RunPlan:
    """Inputs, settings, adapter modules, the dataset check, caching and the resume point;
    `detail` is the TrainSetup (None when something could not be planned)."""
    plan = RunPlan.for_recipe(recipe, overwrite)
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
    check_output_file(plan, recipe.lora_path, overwrite or recipe.output.overwrite
                      or recipe.resume is not None,
                      "pass --overwrite, set `output.overwrite: true` or `resume:` to continue it")
    fresh = overwrite or recipe.output.overwrite
    left = earlier_run(recipe.output.dir, recipe.name) if recipe.resume is None else []
    if left and not fresh:
        plan.existing_outputs += left
        plan.problems.append(
            f"output.dir {recipe.output.dir} holds an earlier run of '{recipe.name}' "
            f"({describe_earlier_run(left)}); add `resume: {recipe.output.dir}` to the recipe to "
            "continue it, or pass --overwrite (or set `output.overwrite: true`) to start again "
            "and replace it")
    elif left:
        plan.lines.append(f"  starting again: the earlier run's {describe_earlier_run(left)} in "
                          f"{recipe.output.dir} will be removed (--overwrite)")
    plan.outputs.append(recipe.output.dir)
    # a stopped run keeps its resumable state (and the step files), even as a cancelled job
    plan.keep_on_cancel.append(recipe.output.dir)
    if plan.problems:
        return plan
    arch = network = dataset = caching = src = None
    try:
        src = base_sources(recipe)
        if src is not None:
            plan.lines += ["components:"] + src.lines()
        arch = base_arch(Path(recipe.base))  # UNet/transformer-only files too
        network = plan_for_base(recipe.base, arch, recipe.network, sources=src)
        counts = ", ".join(f"{c}: {n}" for c, n in sorted(network.count().items()))
        plan.lines.append(f"  {arch}: {len(network.modules)} {network.type} modules ({counts}), "
                          f"{network.n_params() / 1e6:.2f} M trainable values")
    except WorkbenchError as e:
        plan.problems.append(str(e))
    try:
        dataset = check_recipe_dataset(recipe)
        plan.lines += ["dataset check:"] + ["  " + x for x in dataset.render().splitlines()]
        plan.problems += [f"dataset: {p.path}: {p.message}" for p in dataset.errors]
    except WorkbenchError as e:
        plan.problems.append(f"dataset: {e}")
    try:
        caching = caching_plan(recipe)
        plan.lines.append(f"  caching: latents {'on disk' if caching.latents else 'for this run only'}, "
                          "text-encoder outputs " + ("cached" if caching.text else
                                                     "computed each step (" + caching.why_no_text + ")"))
    except WorkbenchError as e:
        plan.problems.append(str(e))
    if recipe.resume is not None:
        try:
            folder = find_state(recipe.resume)
            info = read_state_info(folder)
            plan.lines.append(f"  resume from {folder} at step {info['step']} of {recipe.max_steps}")
        except WorkbenchError as e:
            plan.problems.append(str(e))
    if None not in (arch, network, dataset, caching):
        plan.detail = TrainSetup(arch, network, dataset, caching, src)
    return plan


def run(plan: RunPlan, *, progress: bool = True, device: str | None = None,
        cache_root: Path | None = None, stop_at: int | None = None) -> RunResult:
    """Train with the dry run's setup, export and record; `stop_at` ends early after that step
    (tests of resume)."""
    recipe: TrainRecipe = plan.recipe
    setup: TrainSetup = plan.detail
    require_clean(setup.dataset)
    out_dir = Path(recipe.output.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prov = Provenance(kind="train", name=recipe.name,
                      recipe_path=str(recipe.source_path) if recipe.source_path else None,
                      recipe_text=recipe.source_text)
    t0 = time.time()
    with prov.timed("setup"):
        trainer = build_trainer(recipe, setup, out_dir=out_dir, cache_root=cache_root, device=device)
    if recipe.resume is None and trainer.acc.is_main_process:
        clear_earlier_run(out_dir, recipe.name)  # the dry run refused it unless told to replace it
    session = uuid.uuid4().hex[:16]
    resumed_from = None
    if recipe.resume is not None:
        resumed_from = find_state(recipe.resume)
        load_state(resumed_from, trainer)
    written: list[Path] = []
    s, out = trainer.s, recipe.output
    w, h = resolution_of(recipe)
    base_name = Path(recipe.base).stem

    guard = SaveGuard(lambda: resume_hint(out_dir, recipe.source_path, trainer.state.step,
                                          s.max_steps))

    def save_lora(path: Path, finished_at: float | None, sidecar: bool) -> list[Path]:
        return guard.save("LoRA file", path.parent, lora_bytes(trainer, out.save_precision),
                          lambda: save_kohya(trainer.net, path, facts(finished_at),
                                             dtype=out.save_precision, overwrite=True,
                                             write_sidecar=sidecar))

    def save_resumable() -> Path:
        return guard.save("training state", out_dir / "state", state_bytes(trainer),
                          lambda: save_state(out_dir, trainer, out.keep_last))

    def facts(finished_at: float | None):
        return train_facts(recipe, setup, trainer, session, t0, finished_at)

    def samples(step: int) -> None:
        if recipe.samples and trainer.acc.is_main_process:
            written.extend(guard.save(
                "sample images", out_dir / "samples", samples_bytes(w, h, len(recipe.samples.prompts)),
                lambda: make_samples(trainer.pipe, setup.arch, recipe.samples, step, out_dir,
                                     width=w, height=h, models=trainer.net.models,
                                     model_name=base_name, clip_skip=s.clip_skip)))

    def on_step(step: int) -> None:
        if not trainer.acc.is_main_process:
            return
        if out.save_every and step % out.save_every == 0 and step < s.max_steps:
            ckpt = out_dir / f"{recipe.name}-step{step:08d}.safetensors"
            written.extend(save_lora(ckpt, None, False))
            save_resumable()
        # the last step samples too (the finished LoRA's pictures), inside the training task, so
        # the job's bar is still short of 100 % while they are made (workbench/progress.py)
        if recipe.samples and (step % recipe.samples.every == 0 or step == s.max_steps):
            samples(step)

    try:
        with prov.timed("train"):
            state = trainer.train(Hooks(on_step=on_step), progress=progress, stop_at=stop_at)
        finished = state.step >= s.max_steps
        with prov.timed("export"):
            if trainer.acc.is_main_process:
                if out.save_every or not finished:
                    save_resumable()
                if finished:
                    written += save_lora(recipe.lora_path, time.time(), True)
                    if out.peft and trainer.net.plan.type in ("lora", "dora"):
                        written.append(guard.save(
                            "diffusers LoRA file", out_dir, lora_bytes(trainer, out.save_precision),
                            lambda: save_peft(trainer.net, out_dir / f"{recipe.name}.peft.safetensors",
                                              dtype=out.save_precision, overwrite=True,
                                              variant=facts(time.time()).variant)))
                atomic_write_text(out_dir / "loss.json", json.dumps(state.losses) + "\n", overwrite=True)
    except KeyboardInterrupt as e:  # Ctrl-C (or a job's hard stop): say what is kept, how to go on
        raise KeyboardInterrupt(guard.hint()) from e
    except Cancelled as e:  # a cancelled dashboard job
        raise Cancelled(f"cancelled by request: {guard.hint()}") from e
    prov.add_input("base", recipe.base)
    if recipe.components is not None:
        prov.add_input("components", recipe.components)
    prov.inputs["dataset"] = {"path": str(recipe.dataset), "kind": "folder",
                              "images": {str(e.image_path): e.sha256 for e in setup.dataset.examples}}
    prov.seeds = {"train": s.seed, **({"samples": recipe.samples.seed} if recipe.samples else {})}
    prov.outputs = [str(p) for p in written] + [str(out_dir / "loss.csv")]
    prov.extra = {"steps": state.step, "final_loss": state.losses[-1]["loss"] if state.losses else None,
                  "resumed_from": str(resumed_from) if resumed_from else None,
                  "device": str(trainer.device), "mixed_precision": s.mixed_precision,
                  "network": {"type": trainer.net.plan.type, "rank": trainer.net.plan.rank,
                              "alpha": trainer.net.plan.alpha, "modules": len(trainer.net.plan.modules)}}
    last = state.losses[-1]["loss"] if state.losses else float("nan")
    if not trainer.acc.is_main_process:  # `accelerate launch`: the main process writes everything
        return RunResult("train", recipe.name, False, plan, [],
                         summary=f"train '{recipe.name}': process {trainer.acc.process_index} of "
                                 f"{trainer.acc.num_processes} done ({state.step} steps)")
    prov_path = prov.write(out_dir)
    what = f"wrote {recipe.lora_path}" if finished else f"stopped at step {state.step} (state saved)"
    return RunResult("train", recipe.name, False, plan, [*written, prov_path],
                     summary=f"train '{recipe.name}': {state.step}/{s.max_steps} steps, last loss "
                             f"{last:.4f}; {what}")
