"""`workbench demo`: the whole workbench on built-in tiny models, on CPU, in a few minutes.

It builds tiny real-layout checkpoints of every architecture, scans them like a model folder, runs
every example recipe in `recipes/` (capabilities not built yet say so and show their dry-run plan),
renders a preview image with each architecture through the offline loaders, and prints where each
result is. Re-running reuses the tiny models already built (`--fresh` rebuilds them).

Everything goes under the user's data folder (`<data>/demo`, workbench/userdirs.py) or the folder
given with `--out`, never into the checkout: the example recipes are copied there with their
`../outputs/demo/` paths pointing at that folder (`prepare_recipes`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from workbench.errors import UnsupportedError, WorkbenchError
from workbench.userdirs import data_root
from workbench.dispatch import run_recipe
from workbench.formats.scan import format_table, scan
from workbench.pipeline.generate import ImageSettings, generate, load_model, save_image
from workbench.recipes import load_recipe
from workbench.testing import build_tiny, clip as tiny_clip

REPO_ROOT = Path(__file__).resolve().parent.parent
# how the example recipes in recipes/ name the demo's folder and the bundled datasets
RECIPE_DEMO_PREFIX = "../outputs/demo/"
RECIPE_DATASETS_PREFIX = "../datasets/"
# file name -> (architecture, seed): three SD1.5 "personal" models to merge, one of each other arch.
DEMO_MODELS = {
    "sd15_a.safetensors": ("sd15", 1),
    "sd15_b.safetensors": ("sd15", 2),
    "sd15_base.safetensors": ("sd15", 3),
    "sdxl_tiny.safetensors": ("sdxl", 4),
    "sd3_tiny.safetensors": ("sd3", 5),
    "flux_tiny.safetensors": ("flux", 6),
}
PREVIEW_PROMPT = "wbstyle, a lighthouse at dusk"


def build_models(models_dir: Path, fresh: bool = False) -> dict[str, Path]:
    """Build (or reuse) the tiny checkpoints and the tiny CLIP scorer under `models_dir`."""
    models_dir.mkdir(parents=True, exist_ok=True)
    built: dict[str, Path] = {}
    for name, (arch, seed) in DEMO_MODELS.items():
        path = models_dir / name
        if fresh or not path.exists():
            print(f"  building tiny {arch:5s} -> {path}")
            build_tiny(arch, path, seed=seed)
        built[name] = path
    clip_dir = models_dir / "clip" / "tiny-open-clip"
    if fresh or not (clip_dir / "open_clip_model.safetensors").exists():
        tiny_clip.build(clip_dir)
    built["clip"] = clip_dir
    return built


# Recipes that make what later ones read: the extracted LoRA feeds merge-lora-demo, the merges and
# the trained LoRA can feed the grid.
_ORDER = {"extract-demo": 0, "merge-demo": 1, "merge-lora-demo": 2, "train-demo": 3,
          "generate-demo": 4, "grid-demo": 5,
          "pick-demo": 6, "merge-search-demo": 7}


def demo_root(out: str | Path | None = None) -> Path:
    """`--out` when given, else `<user data folder>/demo`; absolute, so the printed paths are."""
    return Path(out).expanduser().absolute() if out else data_root() / "demo"


def prepare_recipes(root: Path, source: Path = REPO_ROOT / "recipes") -> Path:
    """Copies of the example recipes in `root/recipes`, reading and writing under `root` (the
    bundled datasets are read where they are). Returns that folder."""
    target = root / "recipes"
    target.mkdir(parents=True, exist_ok=True)
    datasets = (REPO_ROOT / "datasets").as_posix() + "/"  # forward slashes work on every OS
    for path in sorted(source.glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        text = text.replace(RECIPE_DEMO_PREFIX, "../").replace(RECIPE_DATASETS_PREFIX, datasets)
        (target / path.name).write_text(text, encoding="utf-8")
    return target


def run_recipes(recipes_dir: Path) -> list[tuple[str, str]]:
    """Run every example recipe; returns (recipe, outcome) lines for the summary."""
    outcomes = []
    paths = sorted(recipes_dir.glob("*.yaml"), key=lambda p: (_ORDER.get(p.stem, 99), p.name))
    for path in paths:
        recipe = load_recipe(path)
        try:
            result = run_recipe(recipe, overwrite=True)
            outcomes.append((path.name, f"done: {result}"))
        except UnsupportedError as e:
            plan = run_recipe(recipe, dry_run=True, progress=False)
            print(f"\n--- {path.name}: dry run (the engine for '{recipe.kind}' is not built yet)")
            print(plan)
            outcomes.append((path.name, f"not yet: {e}"))
    return outcomes


def render_previews(models: dict[str, Path], out_dir: Path) -> list[tuple[str, Path]]:
    """One small image per architecture through the generation core, with its metadata."""
    written = []
    for name, (arch, _) in DEMO_MODELS.items():
        if name.startswith("sd15_") and name != "sd15_a.safetensors":
            continue
        t0 = time.perf_counter()
        model = load_model(models[name], device="cpu")
        loaded = time.perf_counter()
        sampler = "Euler" if arch in ("sd3", "flux") else "Euler a"
        settings = ImageSettings(PREVIEW_PROMPT, "", sampler, 2, 5.0, 64, 64)
        image = generate(model, settings, [1])[0]
        (out_dir / arch).mkdir(parents=True, exist_ok=True)
        target = save_image(image, out_dir / arch / "preview.png", overwrite=True)
        written.append((arch, target))
        print(f"  preview {arch:5s} -> {target}  ({loaded - t0:.1f}s load, "
              f"{time.perf_counter() - loaded:.1f}s generate)")
    return written


def main(args: argparse.Namespace | None = None) -> int:
    fresh = bool(getattr(args, "fresh", False))
    start = time.perf_counter()
    root = demo_root(getattr(args, "out", None))
    print(f"The demo writes everything under {root}")
    print("1/4 tiny real-layout models")
    models = build_models(root / "models", fresh=fresh)

    print("\n2/4 scanning the model folder")

    print(format_table(scan(root / "models")))

    recipes = prepare_recipes(root)
    print(f"\n3/4 example recipes (copies in {recipes})")
    outcomes = run_recipes(recipes)

    print("\n4/4 previews through the generation core")
    previews = render_previews(models, root / "previews")

    print(f"\nDemo finished in {time.perf_counter() - start:.0f} s. Results, all under {root}:")
    print(f"  tiny models:   {root / 'models'}")
    for arch, path in previews:
        print(f"  preview {arch:5s} {path}  (A1111 parameters + provenance in the PNG)")
    for recipe, outcome in outcomes:
        print(f"  {recipe:20s} {outcome}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except WorkbenchError as e:
        raise SystemExit(f"error: {e}")
