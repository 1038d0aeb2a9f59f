"""`workbench pick TRAINING_FOLDER [options]`: the options become a `kind: pick` recipe.

The options are the recipe's fields (workbench/recipes/pick.py) under their own names, turned
into recipe data and validated by the recipe loader, so the command line, a recipe file run with
`workbench run` and the Train page's button all describe a pick the same way; `--print-recipe`
shows the recipe the options made (save it to re-run or edit). Like workbench/cli.py, it imports
the recipe loader and the dispatcher only when the command runs (they import torch).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

HELP = "choose a trained LoRA's step and strength by style and prompt adherence"
DESCRIPTION = (
    "Score every step file of a `workbench train` output folder at several strengths for style "
    "similarity to the training pictures and CLIP adherence to prompts outside the training "
    "captions; recommend a step and strength (Pareto front, checked against the last step at "
    "strength 1.0 on seeds and held-out pictures not used for choosing), and write the chosen "
    "step under the LoRA's name with its A1111 sidecar (`preferred weight`).")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pick", help=HELP, description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  workbench pick outputs/loras/my-style --dry-run\n"
                              "  workbench pick outputs/loras/my-style --strengths '0.5-1.0 [6]' "
                              "--lora-dir C:/forge/models/Lora")
    p.add_argument("training", metavar="TRAINING_FOLDER",
                   help="the output folder of `workbench train` (step files, provenance.json)")
    p.add_argument("--name", help="name of the pick (default: <lora name>-pick)")
    p.add_argument("--steps", help="training steps to try, e.g. '500,1000' or '250-1000 (+250)' "
                   "(default: every step file; the last step is always included)")
    p.add_argument("--strengths", help="LoRA strengths to try, e.g. '0.4-1.2 [5]' (the default) "
                   "or '0.6,0.8,1.0'; 1.0 is always included")
    p.add_argument("--prompt", action="append", dest="prompts", metavar="TEXT",
                   help="an adherence prompt (repeat for more; default: the shipped set)")
    p.add_argument("--prompts-file", metavar="FILE", help="adherence prompts, one per line")
    p.add_argument("--selection-seeds", help="seeds for choosing, e.g. '1,2' (the default) or "
                   "'1-4'")
    p.add_argument("--evaluation-seeds", help="seeds for the check, never among the selection "
                   "seeds (default '101,102,103')")
    p.add_argument("--references", metavar="DIR", help="the pictures whose style is wanted "
                   "(default: the training dataset)")
    p.add_argument("--held-out-fraction", type=float, help="share of those pictures held "
                   "out from choosing, for the check (default 0.3)")
    p.add_argument("--clip-model", help="open_clip model of both scores (default ViT-L-14)")
    p.add_argument("--clip-weights", metavar="PATH", help="its weights file or open_clip folder")
    p.add_argument("--clip-pretrained", metavar="TAG", help="open_clip tag in the HF cache")
    p.add_argument("--adherence-margin", type=float, help="CLIP points of adherence the choice "
                   "may give up against the last step at 1.0 (default 1.0)")
    p.add_argument("--sampler", help="sampler (default 'Euler a')")
    p.add_argument("--sampling-steps", type=int, help="sampling steps per image (default 20)")
    p.add_argument("--cfg", type=float, help="CFG scale (default 7)")
    p.add_argument("--size", metavar="WxH", help="image size (default: the training resolution)")
    p.add_argument("--out", metavar="DIR", help="the pick folder (default TRAINING_FOLDER/pick)")
    p.add_argument("--lora-dir", metavar="DIR", help="where <lora name>.safetensors and its "
                   "sidecar go, e.g. Forge's models/Lora (default: the pick folder)")
    p.add_argument("--print-recipe", action="store_true", help="print the recipe YAML and exit")
    p.add_argument("--dry-run", action="store_true", help="print the plan without generating; "
                   "exit status 1 when it has problems")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing <lora name>.safetensors in the LoRA folder")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _abs(path: str | None) -> str | None:
    return str(Path(path).expanduser().resolve()) if path else None


def recipe_from_args(args: argparse.Namespace):
    """The `kind: pick` recipe the options describe (validated by the recipe loader)."""
    from workbench.recipes.loader import parse_recipe  # imports torch: see the module docstring
    from workbench.recipes.choice import prompt_lines
    from workbench.recipes.pick import PickRecipe

    data: dict[str, Any] = {"kind": "pick", "training": _abs(args.training)}
    training = Path(args.training)
    data["name"] = args.name or f"{training.resolve().name}-pick"
    for key in ("steps", "strengths"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    seeds = {k: v for k, v in (("selection", args.selection_seeds),
                               ("evaluation", args.evaluation_seeds)) if v is not None}
    if seeds:
        data["seeds"] = seeds
    references = {k: v for k, v in (("dir", _abs(args.references)),
                                    ("held_out_fraction", args.held_out_fraction)) if v is not None}
    if references:
        data["references"] = references
    prompts = list(args.prompts or [])
    if args.prompts_file:
        text = Path(args.prompts_file).read_text(encoding="utf-8")
        prompts += prompt_lines(text)
    if prompts:
        data["prompts"] = prompts
    gen = {k: v for k, v in (("sampler", args.sampler), ("steps", args.sampling_steps),
                             ("cfg", args.cfg)) if v is not None}
    if args.size:
        w, _, h = args.size.lower().partition("x")
        gen.update(width=int(w) if w.isdigit() else w, height=int(h) if h.isdigit() else h)
    if gen:
        data["generation"] = gen
    clip = {k: v for k, v in (("model", args.clip_model), ("weights", _abs(args.clip_weights)),
                              ("pretrained", args.clip_pretrained)) if v is not None}
    scores: dict[str, Any] = {"clip": clip} if clip else {}
    if args.adherence_margin is not None:
        scores["adherence_margin"] = args.adherence_margin
    if scores:
        data["scores"] = scores
    output = {k: v for k, v in (("dir", _abs(args.out)), ("lora_dir", _abs(args.lora_dir))) if v}
    if output:
        data["output"] = output
    recipe = parse_recipe(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    assert isinstance(recipe, PickRecipe)
    return recipe


def command(args: argparse.Namespace) -> int:
    from workbench.dispatch import run_recipe  # imports torch: see the module docstring
    from workbench.recipes.loader import recipe_to_yaml

    recipe = recipe_from_args(args)
    if args.print_recipe:
        print(recipe_to_yaml(recipe), end="")
        return 0
    result = run_recipe(recipe, dry_run=args.dry_run, overwrite=args.overwrite, progress=args.progress)
    print(result)
    return 1 if args.dry_run and result.plan is not None and result.plan.problems else 0
