"""The `workbench` command.

Every subcommand goes through the same recipe objects and `run_recipe` as the dashboard. User
errors (WorkbenchError) print `error: <message>` and exit with status 2; a traceback means a bug.

Each subcommand imports its engine inside its handler, the one exception to module-top imports in
this package: the engines load torch, diffusers, open_clip or streamlit (seconds on a laptop), and
`workbench --help`, `--version` and a mistyped option should answer at once. The same holds for
workbench/cli_pick.py.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from pathlib import Path
from typing import Sequence

from workbench import __version__, cli_pick
from workbench.errors import RecipeError, WorkbenchError

DESCRIPTION = """\
Merge checkpoints, train style LoRAs and compare them in scored A/B grids
(SD1.5, SDXL, SD3.5, FLUX.1). Work is described by recipe files (YAML) that you
keep, share and re-run; see the recipes/ folder for examples."""

EPILOG = """\
examples:
  workbench demo                                    try everything on tiny built-in models
  workbench run recipes/merge-demo.yaml --dry-run   show what a recipe would do
  workbench run recipes/merge-demo.yaml             do it
  workbench merge --list                            list the merge methods
  workbench models scan ~/models                    what is in a model folder
  workbench models scan --tool ~/stable-diffusion-webui-forge   an install's models by kind
  workbench convert old.ckpt                        a safetensors copy of a pickle checkpoint
  workbench app                                     open the dashboard in the browser

`workbench COMMAND --help` explains each command."""

KIND_HELP = {
    "merge": ("merge checkpoints as a merge recipe describes",
              "Merge checkpoints: named input models, ordered merge steps (weighted sum, add "
              "difference, block weights, TIES, DARE, ...) and one output file."),
    "train": ("train a style LoRA as a train recipe describes",
              "Train a style LoRA (kohya format) from a folder of captioned images."),
    "grid": ("make a scored X/Y comparison grid from a grid recipe",
             "Compare models, LoRAs, prompts or settings in an X/Y(/Z) grid of images with the "
             "same seeds, scored by CLIP, aesthetic and style similarity."),
    "generate": ("generate images as a generate recipe describes",
                 "Generate images from one model and prompt (with optional LoRAs) within a VRAM "
                 "budget."),
}


def _add_recipe_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("recipe", metavar="RECIPE.yaml", nargs="?" if optional else None,
                   help="the recipe file; relative paths inside it are relative to its folder")
    p.add_argument("--dry-run", action="store_true",
                   help="validate and print the plan (inputs, steps, outputs, problems) without "
                        "doing the work; exit status 1 when the plan has problems")
    p.add_argument("--overwrite", action="store_true",
                   help="replace outputs that already exist (refused otherwise)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars (for logs)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="workbench", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"workbench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="try the whole workbench on tiny built-in models (CPU, minutes)",
                       description="Build tiny real-layout models of every architecture, scan "
                       "them, run every example recipe in recipes/ and render a preview image per "
                       "architecture. Results go to the demo folder in your user data folder "
                       "(%LOCALAPPDATA%\\workbench, ~/Library/Application Support/workbench or "
                       "~/.local/share/workbench; $WORKBENCH_DATA overrides) or to --out.",
                       formatter_class=fmt)
    p.add_argument("--fresh", action="store_true", help="rebuild the tiny models even if present")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="write the demo's models and results here instead of the user data folder")

    p = sub.add_parser("run", help="run any recipe (merge, train, grid, generate)",
                       description="Run a recipe file of any kind. With --dry-run, print the "
                       "plan and its problems instead.", formatter_class=fmt,
                       epilog="examples:\n  workbench run recipes/merge-demo.yaml --dry-run\n"
                       "  workbench run recipes/train-demo.yaml\n"
                       "  workbench run --from-metadata merged.safetensors --output again.safetensors")
    _add_recipe_args(p, optional=True)
    p.add_argument("--from-metadata", metavar="MODEL.safetensors", default=None,
                   help="re-run the merge recorded in a merged model's metadata, after checking "
                        "that every input is the same file (sha256) as when it was made")
    p.add_argument("--output", metavar="PATH", default=None,
                   help="with --from-metadata: write the result here instead of the recorded path")
    p.add_argument("--models", metavar="DIR", action="append", default=[],
                   help="with --from-metadata: a folder to look for the inputs in (by file name "
                        "and sha256; next to the model is always searched); may be repeated")
    p.add_argument("--tool", metavar="ROOT", action="append", default=[],
                   help="with --from-metadata: an A1111, Forge or ComfyUI install whose model "
                        "folders are searched for the inputs; may be repeated")

    for kind, (short, long) in KIND_HELP.items():
        p = sub.add_parser(kind, help=short, description=long + f" Same as `workbench run`, but "
                           f"checks that the recipe is a {kind} recipe.", formatter_class=fmt,
                           epilog=f"example:\n  workbench {kind} recipes/{kind}-demo.yaml --dry-run")
        _add_recipe_args(p, optional=(kind == "merge"))
        if kind == "merge":
            p.add_argument("--list", action="store_true", help="list the merge methods and exit")
        if kind == "generate":
            p.add_argument("--plan", action="store_true",
                           help="print the memory plan (what stays on the GPU, what is stored in "
                                "fp8/nf4, what is streamed or offloaded) from the file header "
                                "without loading anything; exit status 1 when it cannot fit")

    cli_pick.add_parser(sub)

    p = sub.add_parser("models", help="inspect model files (architecture, precision, hashes)",
                       description="Inspect model files.", formatter_class=fmt)
    msub = p.add_subparsers(dest="models_command", metavar="ACTION")
    s = msub.add_parser("scan", help="list the models in a folder: architecture, dtype, size, hash",
                        description="List every model file under a folder with its architecture "
                        "(from the file header, nothing is loaded), precision, size and A1111 "
                        "short hash.", formatter_class=fmt,
                        epilog="examples:\n  workbench models scan ~/stable-diffusion-webui/models\n"
                        "  workbench models scan --tool C:\\ComfyUI_windows_portable")
    s.add_argument("dir", metavar="DIR", nargs="?", default=None,
                   help="the folder to scan (recursively)")
    s.add_argument("--tool", metavar="ROOT", default=None,
                   help="an A1111, Forge or ComfyUI install (or a ComfyUI extra_model_paths.yaml):"
                        " list its checkpoint, LoRA, VAE, text-encoder and UNet folders by kind")
    s.add_argument("--no-hash", action="store_true", help="skip hashing (fast on large folders)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("convert", help="write a .safetensors copy of a .ckpt/.pt/.bin checkpoint",
                       description="Read a pickle checkpoint with PyTorch's restricted unpickler "
                       "(tensors only; a file that asks for other Python objects is refused with "
                       "their names and nothing is written) and write a .safetensors copy.",
                       formatter_class=fmt, epilog="example:\n  workbench convert "
                       "models/Stable-diffusion/old.ckpt")
    p.add_argument("src", metavar="FILE.ckpt", help="the pickle checkpoint (.ckpt/.pt/.pth/.bin)")
    p.add_argument("--out", metavar="FILE.safetensors", default=None,
                   help="where to write (default: beside the source, .safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = sub.add_parser("app", help="open the dashboard (Streamlit) in the browser",
                       description="Start the dashboard: edit recipes, run them as jobs, watch "
                       "progress and compare results. It listens on 127.0.0.1 only unless "
                       "--allow-remote is given.", formatter_class=fmt)
    p.add_argument("--port", type=int, default=8501, help="port to listen on (default 8501)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-local --host: anyone who can reach it can run jobs")
    p.add_argument("--home", metavar="DIR", default=None,
                   help="workspace folder: models/, outputs/, datasets/, recipes/ and the job "
                        "store .workbench/jobs.sqlite are found here (default: current folder)")
    p.add_argument("--models", metavar="DIR", action="append", default=None,
                   help="a folder of input models the dashboard may read (repeatable; default "
                        "HOME/models)")
    p.add_argument("--outputs", metavar="DIR", default=None,
                   help="the folder results are written to (default HOME/outputs)")
    p.add_argument("--datasets", metavar="DIR", action="append", default=None,
                   help="a folder of training datasets (repeatable; default HOME/datasets)")
    p.add_argument("--recipes", metavar="DIR", default=None,
                   help="where forms are saved as recipes (default HOME/recipes)")
    p.add_argument("--tool", metavar="ROOT", action="append", default=None,
                   help="an A1111, Forge or ComfyUI install whose model folders the dashboard "
                        "lists and reads (repeatable)")
    p.add_argument("--output-to-tool-folders", action="store_true", default=None,
                   help="also put finished merges and trained LoRAs into the --tool install's "
                        "checkpoint and LoRA folders (an existing file there is never replaced)")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="a YAML file with home, models, outputs, datasets, recipes, db, workers "
                        "(flags given here override it)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes that run jobs at once (default 2; GPU jobs still run "
                        "one at a time)")
    p.add_argument("--no-browser", dest="browser", action="store_false",
                   help="do not open a browser tab")

    p = sub.add_parser("doctor", help="check this machine: GPU, torch build, precision, RAM, disk, "
                       "tokenizers, model folders", description="Report what this machine has for "
                       "workbench and give one fix for each problem found; exit status 1 when "
                       "something must be fixed.", formatter_class=fmt)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--home", metavar="DIR", default=None,
                   help="the dashboard's workspace folder whose models/ and outputs/ are checked "
                        "(default: current folder)")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="the dashboard's YAML config whose folders are checked")
    return parser


# --------------------------------------------------------------------------------------------------
# commands


def _cmd_demo(args: argparse.Namespace) -> int:
    from workbench import demo

    result = demo.main(args)
    return int(result or 0)


def _cmd_recipe(args: argparse.Namespace, kind: str | None) -> int:
    from workbench.recipes import load_recipe
    from workbench.dispatch import run_recipe

    if getattr(args, "from_metadata", None):
        if args.recipe:
            raise WorkbenchError("give either RECIPE.yaml or --from-metadata MODEL, not both")
        from workbench.merge.metadata import rerun_recipe
        from workbench.formats.model_folders import find_install

        search = [Path(d) for d in args.models]
        for root in args.tool:
            search += find_install(root).paths()
        recipe = rerun_recipe(args.from_metadata, args.output, search)
    elif not args.recipe:
        raise WorkbenchError(f"workbench {kind or 'run'}: give a RECIPE.yaml"
                             + ("" if kind else " (or --from-metadata MODEL.safetensors)"))
    else:
        recipe = load_recipe(args.recipe)
    if kind is not None and recipe.kind != kind:
        raise RecipeError(f"{args.recipe}: is a {recipe.kind} recipe, not a {kind} recipe; use "
                          f"`workbench {recipe.kind} {args.recipe}` or `workbench run {args.recipe}`")
    if getattr(args, "plan", False):
        args.dry_run = True
    result = run_recipe(recipe, dry_run=args.dry_run, overwrite=args.overwrite,
                        progress=args.progress)
    print(result)
    if args.dry_run and result.plan is not None and result.plan.problems:
        return 1
    return 0


def merge_methods_text() -> str:
    """The method list for `workbench merge --list`: every registered method, formula, parameters."""
    from workbench.merge.methods import describe_methods

    return describe_methods().rstrip() + "\n"


def _cmd_merge(args: argparse.Namespace) -> int:
    if args.list:
        print(merge_methods_text(), end="")
        return 0
    if not args.recipe:
        raise WorkbenchError("workbench merge: give a RECIPE.yaml (or --list to list the methods)")
    return _cmd_recipe(args, "merge")


def _cmd_models(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.models_command != "scan":
        parser.parse_args(["models", "--help"])
        return 2
    from workbench.formats.hash_fill import HashFiller
    from workbench.formats.model_folders import find_install
    from workbench.formats.scan import (apply_hashes, format_table, hash_targets, scan,
                                        scan_install)

    if (args.dir is None) == (args.tool is None):
        raise WorkbenchError("workbench models scan: give a folder DIR or --tool ROOT (one of "
                             "them)")
    if args.tool:
        folders = find_install(args.tool)
        print(folders.describe(), file=sys.stderr)
        root, entries = folders.root, scan_install(folders, with_hash=False)
    else:
        root = Path(args.dir)
        entries = scan(root, with_hash=False)  # names, architectures, sizes: no file is hashed yet
    filler, shown_early = HashFiller(), False
    if not args.no_hash:
        targets = hash_targets(entries, root)
        apply_hashes(entries, root, filler.known(targets))
        if filler.add(targets):
            if sys.stdout.isatty() and not args.json:  # a person is watching: the list first
                print(format_table(entries), flush=True)
                shown_early = True
            from tqdm import tqdm

            with tqdm(total=filler.total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=f"hashing {filler.pending} files", disable=None) as bar:
                filler.run(on_bytes=bar.update)
            apply_hashes(entries, root, filler.hashes, filler.errors)
    if args.json:
        print(json.dumps([_jsonable(e) for e in entries], indent=2, default=str))
    elif shown_early:  # the hashes the table above did not have yet
        for e in entries:
            path = root / e.path
            if path in filler.hashes or path in filler.errors:
                print(f"{e.short_hash or 'ERROR':10}  {e.path}"
                      + (f"  {filler.errors[path]}" if path in filler.errors else ""))
    else:
        print(format_table(entries))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from workbench.formats.convert import convert

    print(convert(args.src, args.out, overwrite=args.overwrite))
    return 0


def _jsonable(entry: object) -> object:
    import dataclasses

    if dataclasses.is_dataclass(entry) and not isinstance(entry, type):
        return dataclasses.asdict(entry)
    return getattr(entry, "__dict__", str(entry))


def _cmd_app(args: argparse.Namespace) -> int:
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback and not args.allow_remote:
        raise WorkbenchError(f"--host {args.host} lets other machines reach the dashboard and run "
                             "jobs; add --allow-remote if that is what you want")
    from workbench.app import launch  # streamlit and the app load only for this command
    from workbench.app.config import AppConfig

    roots = {"models": args.models, "outputs": [args.outputs] if args.outputs else None,
             "datasets": args.datasets, "recipes": [args.recipes] if args.recipes else None}
    if args.config:
        config = AppConfig.from_file(args.config, home=args.home, roots=roots,
                                     max_workers=args.workers, tools=args.tool,
                                     output_to_tool_folders=args.output_to_tool_folders)
    else:
        config = AppConfig(home=Path(args.home or "."), roots={k: v for k, v in roots.items() if v},
                           max_workers=args.workers or 2, tools=args.tool or [],
                           output_to_tool_folders=bool(args.output_to_tool_folders))
    if config.max_workers < 1:
        raise WorkbenchError(f"--workers {config.max_workers}: expected at least 1")
    return int(launch(host=args.host, port=args.port, config=config,
                      open_browser=args.browser) or 0)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from workbench import doctor
    from workbench.app.config import AppConfig

    config = (AppConfig.from_file(args.config, home=args.home) if args.config else
              AppConfig(home=Path(args.home)) if args.home else None)
    return doctor.main(as_json=args.json, config=config)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `workbench` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command is None:
            parser.print_help()
            return 2
        if args.command == "demo":
            return _cmd_demo(args)
        if args.command == "run":
            return _cmd_recipe(args, None)
        if args.command == "merge":
            return _cmd_merge(args)
        if args.command in KIND_HELP:
            return _cmd_recipe(args, args.command)
        if args.command == "pick":
            return cli_pick.command(args)
        if args.command == "models":
            return _cmd_models(args, parser)
        if args.command == "convert":
            return _cmd_convert(args)
        if args.command == "app":
            return _cmd_app(args)
        if args.command == "doctor":
            return _cmd_doctor(args)
        parser.error(f"unknown command {args.command}")
    except WorkbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a training adds which state is kept and how to resume
        print("cancelled" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
