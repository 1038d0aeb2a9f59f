"""Output metadata: A1111/supermerger-compatible merge records plus our full recipe.

A1111 and supermerger write `sd_merge_recipe` (JSON) and `sd_merge_models` (JSON keyed by each
input's sha256, merged with the inputs' own `sd_merge_models` so the family tree survives several
generations of merging); tools of the civitai era read these. We add the recipe text, each input's
sha256 by name and the tool version, so `workbench run --from-metadata MODEL.safetensors` can re-run
the merge and check that the inputs are the same files. `modelspec.*` names the architecture for
ComfyUI and SAI tools. No local path goes into the file (recipes/shareable.py): inputs are found
again by file name and sha256 next to the model, at the paths of its local provenance file, or in
the model folders the user names.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

from workbench import __version__
from workbench.arch import ARCHS
from workbench.errors import WorkbenchError
from workbench.formats.hashes import a1111_legacy_hash, sha256_file
from workbench.formats.safetensors_io import read_header
from workbench.recipes.loader import parse_recipe
from workbench.recipes.shareable import find_by_name_and_hash, shareable_text

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
        # file names only (a shared file must not carry the user's folders); the full paths are
        # in the local `<stem>.provenance.json` beside the model (workbench/kinds/merge.py)
        "workbench_recipe": shareable_text(recipe) if recipe.source_text else "",
        "workbench_inputs": json.dumps({n: {"file": plan.inputs[n].path.name, "sha256": hashes[n]}
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


def rerun_recipe(model: str | Path, output: str | Path | None = None,
                 search: list[Path] | tuple[Path, ...] = ()):
    """The merge recipe stored in `model`'s metadata, each input found by its file name and the
    sha256 recorded when the model was made: next to the model, at the path its local
    `<stem>.provenance.json` recorded, or in the `search` folders (model folders). `output`
    replaces the recipe's output path (by default the recipe would write over `model` itself,
    which needs --overwrite)."""
    model = Path(model)
    text, recipe_path, inputs = recipe_from_metadata(model)
    # names resolve next to the model; an older file's absolute recipe path is kept as it was
    origin = Path(recipe_path) if recipe_path else model.with_name("recipe.yaml")
    recipe = parse_recipe(text, origin)
    recorded = _provenance_paths(model)
    problems, found = [], {}
    for name, path in recipe.models.items():
        want = inputs.get(name, {}).get("sha256")
        places = [Path(path), model.parent, *recorded.get(name, []),
                  *[Path(p) for p in [inputs.get(name, {}).get("file")] if p], *search]
        hit = find_by_name_and_hash(Path(path).name, want, places)
        if hit is not None:
            found[name] = hit
            continue
        where = ", ".join(dict.fromkeys(str(p) for p in [model.parent, *search]))
        if Path(path).is_file() and want:
            problems.append(f"input {name}: {path} has sha256 {sha256_file(path)}, but the merge "
                            f"was made from {want}: a different file")
        else:
            problems.append(f"input {name}: no file {Path(path).name} with sha256 {want} found "
                            f"(looked in {where}); put it next to the model or name its model "
                            "folder (--models DIR or --tool ROOT)")
    if problems:
        raise WorkbenchError(f"{model}: cannot re-run its merge:\n" + "\n".join(f"  - {p}" for p in problems))
    recipe = recipe.model_copy(update={"models": {**recipe.models, **found}})
    if output is not None:
        out = recipe.output.model_copy(update={"path": Path(output).absolute()})
        recipe = recipe.model_copy(update={"output": out})
    return recipe


def _provenance_paths(model: Path) -> dict[str, list[Path]]:
    """Input name -> the full path the local provenance file beside `model` recorded."""
    try:
        prov = json.loads(model.with_name(f"{model.stem}.provenance.json").read_text(encoding="utf-8"))
        return {n: [Path(rec["path"])] for n, rec in prov.get("inputs", {}).items()
                if isinstance(rec, dict) and rec.get("path")}
    except (OSError, ValueError, AttributeError):
        return {}


def recipe_from_metadata(path: str | Path) -> tuple[str, str, dict[str, dict]]:
    """(recipe text, original recipe path (files made before #14 only), inputs by name) stored
    in a merged model's header."""
    meta = read_header(path).metadata
    if not meta.get("workbench_recipe"):
        raise WorkbenchError(f"{path}: no workbench recipe in its metadata (field "
                             "'workbench_recipe'); only merges made by workbench can be re-run")
    return meta["workbench_recipe"], meta.get("workbench_recipe_path", ""), \
        json.loads(meta.get("workbench_inputs", "{}"))
