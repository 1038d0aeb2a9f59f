"""Output metadata: A1111/supermerger-compatible merge records plus our full recipe.

A1111 and supermerger write `sd_merge_recipe` (JSON) and `sd_merge_models` (JSON keyed by each
input's sha256, merged with the inputs' own `sd_merge_models` so the family tree survives several
generations of merging); tools of the civitai era read these. We add the recipe text, each input's
sha256 by name and the tool version, so `workbench run --from-metadata MODEL.safetensors` can re-run
the merge and check that the inputs are the same files. `modelspec.*` names the architecture for
ComfyUI and SAI tools.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

from workbench import __version__
from workbench.arch import ARCHS
from workbench.formats.hashes import a1111_legacy_hash, sha256_file

MODELSPEC_ARCH = {a.id: a.modelspec_arch for a in ARCHS}  # from workbench/arch.py
MODELSPEC_IMPL = {a.id: a.modelspec_impl for a in ARCHS}
A1111_METHOD = {"weighted_sum": "Weighted sum", "add_difference": "Add difference",
                "no_merge": "No interpolation"}


def merge_metadata(recipe, plan, hashes: dict[str, str]) -> dict[str, str]:
    """All `__metadata__` strings of a merged checkpoint. `hashes`: input name -> sha256."""
    names = list(plan.inputs)
    last = recipe.steps[-1]
    alpha = last.alpha if isinstance(last.alpha, (int, float)) else None
    dtype = recipe.output.dtype
    conv_in = plan.inputs[names[0]].header.tensors.get("model.diffusion_model.input_blocks.0.0.weight")
    channels = conv_in.shape[1] if conv_in is not None and len(conv_in.shape) == 4 else 4
    a1111_recipe = {
        "type": "workbench",
        "primary_model_hash": hashes[names[0]],
        "secondary_model_hash": hashes[names[1]] if len(names) > 1 else None,
        "tertiary_model_hash": hashes[names[2]] if len(names) > 2 else None,
        "interp_method": A1111_METHOD.get(last.method, last.method),
        "multiplier": alpha,
        "save_as_half": dtype == "fp16",
        "custom_name": recipe.name,
        "config_source": 0,
        "bake_in_vae": str(recipe.output.bake_vae.name) if recipe.output.bake_vae else "None",
        "discard_weights": "model_ema" if recipe.output.prune else "",
        "is_inpainting": channels == 9,
        "is_instruct_pix2pix": channels == 8,
        "steps": [{"id": s.id, "method": s.method, "inputs": s.inputs,
                   **{k: (v.model_dump() if hasattr(v, "model_dump") else v)
                      for k, v in s.params().items()}} for s in recipe.steps],
    }
    models: dict[str, dict] = {}
    for name in names:
        inp = plan.inputs[name]
        own = inp.header.metadata
        try:
            models.update(json.loads(own.get("sd_merge_models", "{}")))
        except json.JSONDecodeError:
            pass
        parent_recipe = own.get("sd_merge_recipe")
        models[hashes[name]] = {
            "name": inp.path.name,
            "legacy_hash": a1111_legacy_hash(inp.path),
            "sd_merge_recipe": json.loads(parent_recipe) if _is_json(parent_recipe) else None,
        }
    policy_counts = {step: {p.name.lower(): len(keys) for p, keys in groups.items()}
                     for step, groups in plan.policies.items()}
    meta = {
        "format": "pt",
        "sd_merge_recipe": json.dumps(a1111_recipe),
        "sd_merge_models": json.dumps(models),
        "workbench_version": __version__,
        "workbench_recipe": recipe.source_text or "",
        "workbench_recipe_path": str(recipe.source_path or ""),
        "workbench_inputs": json.dumps({n: {"file": str(plan.inputs[n].path), "sha256": hashes[n]}
                                        for n in names}),
        "workbench_policies": json.dumps(policy_counts),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCH.get(plan.arch, plan.arch),
        "modelspec.implementation": MODELSPEC_IMPL.get(plan.arch, "diffusers"),
        "modelspec.title": recipe.name,
        "modelspec.date": _dt.date.today().isoformat(),
    }
    if plan.pruned:
        meta["workbench_pruned_keys"] = str(len(plan.pruned))
    return meta


def _is_json(text: str | None) -> bool:
    if not text:
        return False
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def input_hashes(plan) -> dict[str, str]:
    return {name: sha256_file(inp.path) for name, inp in plan.inputs.items()}


def rerun_recipe(model: str | Path, output: str | Path | None = None):
    """The merge recipe stored in `model`'s metadata, with every input checked against the sha256
    recorded when the model was made. `output` replaces the recipe's output path (by default the
    recipe would write over `model` itself, which needs --overwrite)."""
    from workbench.errors import WorkbenchError
    from workbench.recipes import parse_recipe

    text, recipe_path, inputs = recipe_from_metadata(model)
    origin = Path(recipe_path) if recipe_path else Path(model).with_name("recipe.yaml")
    recipe = parse_recipe(text, origin)
    problems = []
    for name, path in recipe.models.items():
        want = inputs.get(name, {}).get("sha256")
        if not Path(path).is_file():
            problems.append(f"input {name}: {path} not found (expected sha256 {want})")
        elif want and (found := sha256_file(path)) != want:
            problems.append(f"input {name}: {path} has sha256 {found}, but the merge "
                            f"was made from {want}: a different file")
    if problems:
        raise WorkbenchError(f"{model}: cannot re-run its merge:\n" + "\n".join(f"  - {p}" for p in problems))
    if output is not None:
        out = recipe.output.model_copy(update={"path": Path(output).absolute()})
        recipe = recipe.model_copy(update={"output": out})
    return recipe


def recipe_from_metadata(path: str | Path) -> tuple[str, str, dict[str, dict]]:
    """(recipe text, original recipe path, inputs by name) stored in a merged model's header."""
    from workbench.errors import WorkbenchError
    from workbench.formats.safetensors_io import read_header

    meta = read_header(path).metadata
    if not meta.get("workbench_recipe"):
        raise WorkbenchError(f"{path}: no workbench recipe in its metadata (field "
                             "'workbench_recipe'); only merges made by workbench can be re-run")
    return meta["workbench_recipe"], meta.get("workbench_recipe_path", ""), \
        json.loads(meta.get("workbench_inputs", "{}"))
