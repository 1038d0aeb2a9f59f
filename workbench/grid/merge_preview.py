"""The merge-parameter axis: a merge recipe's alpha (or beta) previewed without writing a checkpoint.

For each value the merge engine's own plan is built with that value (workbench.merge.build: same
methods, per-key policies and output dtype as a real `workbench run` of the recipe), every key is
evaluated in memory from memory-mapped inputs, and the resulting single-file state dict is converted
by diffusers' single-file converters and copied into the pipeline that is already loaded. The base
pipeline is loaded once (from the merge's first input, whose layout the output keeps); each value
costs one pass over the weights, no disk write and no second pipeline kept.

Supported for every architecture whose record says `merge_preview` (workbench/arch.py): SD1.5,
SDXL, SD3 and FLUX.1. Each component is rebuilt from the merged dict by the same conversion the
loader applies to a file, then copied into the loaded one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from workbench.arch import ARCHS, BY_ID
from workbench.errors import UnsupportedError, RecipeError, WorkbenchError
from workbench.merge.build import plan_merge
from workbench.merge.executor import compute_key, open_inputs
from workbench.formats import dit_keys
from workbench.formats.hashes import sha256_file
from workbench.formats.pipeline_config import config_dir
from workbench.merge.graph import leaf
from workbench.pipeline import streaming
from workbench.pipeline.generate import Model, load_model
from workbench.pipeline.load import LOAD_LOCK
from workbench.pipeline.load_dit import TRANSFORMER_PREFIX, load_t5
from workbench.recipes.loader import load_recipe
from workbench.recipes.merge import MERGE_METHOD_RULES, MergeRecipe

PREVIEW_ARCHS = tuple(a.id for a in ARCHS if a.merge_preview)  # workbench/arch.py


def load_merge_recipe(path: Path):
    """The merge recipe a merge axis names (a RecipeError names the grid field when it is not one)."""
    recipe = load_recipe(path)
    if not isinstance(recipe, MergeRecipe):
        raise RecipeError(f"merge axis recipe {path}: is a '{recipe.kind}' recipe; expected kind merge")
    return recipe


def steps_with(recipe, param: str, step: str | None) -> list[str]:
    """Ids of the steps whose `param` the axis sets: `step`, or every step whose method reads it."""
    ids = [s.id for s in recipe.steps]
    if step is not None:
        if step not in ids:
            raise RecipeError(f"merge axis: step {step!r} is not in {recipe.source_path} (steps: "
                              f"{', '.join(ids)})")
        return [step]
    found = []
    for s in recipe.steps:
        rule = MERGE_METHOD_RULES.get(s.method)
        reads = (rule.required + rule.optional) if rule else ()
        if param in reads and not (param == "alpha" and s.blocks is not None):
            found.append(s.id)
    if not found:
        raise RecipeError(f"merge axis: no step of {recipe.source_path} takes `{param}` (steps: "
                          + ", ".join(f"{s.id} ({s.method})" for s in recipe.steps) + ")")
    return found


def with_value(recipe, param: str, step: str | None, value: float):
    """A copy of the merge recipe with `param` = value on the axis' steps."""
    targets = set(steps_with(recipe, param, step))
    steps = [s.model_copy(update={param: float(value), **({"blocks": None} if param == "alpha" else {})})
             if s.id in targets else s for s in recipe.steps]
    return recipe.model_copy(update={"steps": steps})


def merge_identity(source) -> dict:
    """What decides a preview's weights: input hashes, the steps (with the value) and the dtype."""
    recipe = with_value(load_merge_recipe(source.path), source.merge_param, source.merge_step,
                        source.merge_value)
    return {"merge": {
        "inputs": {name: sha256_file(path) for name, path in recipe.models.items()},
        "steps": [s.model_dump(mode="json", by_alias=True) for s in recipe.steps],
        "final": recipe.final_step, "dtype": recipe.output.dtype,
        "prune": recipe.output.prune,
        "bake_vae": sha256_file(recipe.output.bake_vae) if recipe.output.bake_vae else None,
    }}


def identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def merged_state_dict(recipe) -> tuple[dict[str, torch.Tensor], str, Path]:
    """(state dict in the single-file layout, arch, path of the leaf input), computed in memory."""
    plan = plan_merge(recipe)
    with open_inputs(plan):
        # clone: values copied from an input are views of its memory map, closed on exit
        state = {k.name: compute_key(k).clone() for k in plan.keys}

    return state, plan.arch, leaf(plan.final).path


def _denoiser_from_state(pipe, state: dict[str, torch.Tensor], arch: str, folder: str):
    """The merged denoiser, converted the way the loader converts a file (pipeline/load.py for
    UNets, pipeline/load_dit.py for SD3 and FLUX: diffusers' single-file converters, and for FLUX
    the width-agnostic formats/dit_keys.flux_to_diffusers)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    a = BY_ID[arch]
    current = getattr(pipe, a.denoiser)
    common = {"config": folder, "subfolder": a.denoiser, "local_files_only": True,
              "torch_dtype": current.dtype}
    if a.denoiser == "unet":
        return UNet2DConditionModel.from_single_file(state, **common)
    if arch == "sd3":
        return SD3Transformer2DModel.from_single_file(state, **common)
    prefix = TRANSFORMER_PREFIX if any(k.startswith(TRANSFORMER_PREFIX + "double_blocks.") for k in state) else ""
    return FluxTransformer2DModel.from_single_file(dit_keys.flux_to_diffusers(state, prefix), **common)


def _text_encoder_from_state(current, state: dict[str, torch.Tensor], encoder, folder: str):
    """One merged text encoder: T5 as pipeline/load_dit.load_t5 builds it, CLIP by diffusers'
    single-file converter (what a pipeline's from_single_file calls for it)."""
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    if encoder.layout == "t5":
        tensors = {k[len(encoder.prefix):]: v for k, v in state.items() if k.startswith(encoder.prefix)}
        return load_t5(tensors, Path(folder), encoder.component, current.dtype)
    return create_diffusers_clip_model_from_ldm(type(current), state, subfolder=encoder.component,
                                                config=folder, local_files_only=True,
                                                torch_dtype=current.dtype)


def load_into_pipeline(pipe, state: dict[str, torch.Tensor], arch: str, leaf_path: Path) -> None:
    """Copy a single-file state dict into the loaded pipeline's components (same shapes)."""
    if arch not in PREVIEW_ARCHS:
        raise UnsupportedError(f"merge preview: {arch} is not supported in memory (only "
                                f"{', '.join(PREVIEW_ARCHS)}); write the merge with `workbench run` "
                                "and use a model axis instead")
    from diffusers import AutoencoderKL

    a = BY_ID[arch]
    folder = str(config_dir(leaf_path, arch))
    with LOAD_LOCK:  # diffusers' model construction is not thread-safe (see LOAD_LOCK)
        # built in the dtype of the component they replace: no transient fp32 copy of a fp16 model
        built = {
            a.denoiser: _denoiser_from_state(pipe, state, arch, folder),
            "vae": AutoencoderKL.from_single_file(state, config=folder, subfolder="vae",
                                                  local_files_only=True, torch_dtype=pipe.vae.dtype),
        }
        for encoder in a.text_encoders:
            current = getattr(pipe, encoder.component, None)
            if current is not None:
                built[encoder.component] = _text_encoder_from_state(current, state, encoder, folder)
    for name, module in built.items():
        target = getattr(pipe, name)
        missing, unexpected = target.load_state_dict(module.state_dict(), strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise WorkbenchError(f"merge preview: the merged {name} does not match the loaded one "
                                 f"({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. "
                                 f"{(missing + unexpected)[:2]})")
        del module


def _swap_weights(model, state, arch: str, leaf_path: Path) -> None:
    """Load the merged weights into a loaded Model; a GPU memory plan (offload, streaming, fp8
    storage) is undone first and applied again after, so no stale host copy survives."""
    applied = getattr(model, "offload", None)
    if applied is None:
        load_into_pipeline(model.pipe, state, arch, leaf_path)
        return

    applied.remove()
    try:
        load_into_pipeline(model.pipe, state, arch, leaf_path)
    finally:
        model.offload = streaming.apply_plan(model.pipe, model.memory_plan, model.device)


class MergePreviewer:
    """Keeps one pipeline for a merge recipe and swaps in the weights of each parameter value."""

    def __init__(self, device: str | None = None, load=None):
        self.device = device
        self._load = load  # load_model (tests may pass another)
        self._models: dict[Path, object] = {}  # leaf path -> Model

    def model_for(self, source):
        """A generation Model holding the merge at `source.merge_value`."""
        recipe = with_value(load_merge_recipe(source.path), source.merge_param, source.merge_step,
                            source.merge_value)
        digest = identity_hash(merge_identity(source))
        return self.model_for_recipe(recipe, name=f"{source.path.stem}-{source.merge_param}"
                                     f"{source.merge_value:g}", model_hash=digest[:10])

    def model_for_recipe(self, recipe, *, name: str, model_hash: str = ""):
        """A generation Model holding the merge a MergeRecipe (built in code or read) describes;
        the merge search (workbench/kinds/merge_search.py) calls this once per trial."""
        state, arch, leaf_path = merged_state_dict(recipe)
        base = self._models.get(leaf_path)
        if base is None:
            base = (self._load or load_model)(leaf_path, device=self.device)
            self._models = {leaf_path: base}  # one base pipeline at a time
        _swap_weights(base, state, arch, leaf_path)
        del state
        return Model.from_pipeline(base.pipe, base.arch, name=name, model_hash=model_hash,
                                   device=base.device)
