"""Merge-search trials per minute against regenerating and re-scoring a full grid per trial.

    OMP_NUM_THREADS=1 python bench/merge_search.py            # tiny SD1.5, 4 trials each way
    python bench/merge_search.py --trials 6 --steps 4 --size 64

The search (workbench/kinds/merge_search.py) previews each trial's merge in memory into one loaded
pipeline and scores with one loaded CLIP. The baseline is what a user does without it: per trial,
write the merged checkpoint (`kind: merge`), then run a grid over it (`kind: grid`: load the model,
make every (prompt, seed) picture, load the scorer, score). Both make the same pictures per trial.
The search's per-trial time is measured by resuming: a run of N trials, then the same recipe with
2N (the journal keeps the first N), so the fixed costs (loading, the held-out check) cancel out.
Everything runs in this process on tiny models; ratios, not absolute times, are the result.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workbench.dispatch import run_recipe  # noqa: E402
from workbench.recipes.loader import load_recipe  # noqa: E402
from workbench.testing import build_tiny  # noqa: E402
from workbench.testing import clip as tiny_clip  # noqa: E402

PROMPTS = ["a lighthouse at dusk", "portrait of a knight"]
SEEDS = [1, 2]


def search_text(trials: int, steps: int, size: int) -> str:
    return f"""kind: merge_search
name: bench
inputs: {{A: a.safetensors, B: b.safetensors}}
references: {{dir: refs}}
prompts: {PROMPTS!r}
seeds: {{selection: {SEEDS}, evaluation: [101]}}
trials: {trials}
generation: {{sampler: Euler, steps: {steps}, width: {size}, height: {size}}}
scores: {{clip: {{model: tiny, weights: clip}}}}
memory: {{device: cpu}}
output: {{dir: search}}
"""


def baseline_trial(root: Path, i: int, alpha: float, steps: int, size: int) -> None:
    (root / f"m{i}.yaml").write_text(f"""kind: merge
name: m{i}
models: {{A: a.safetensors, B: b.safetensors}}
steps: [{{id: mix, method: weighted_sum, inputs: [A, B], alpha: {alpha}}}]
output: {{path: merged/m{i}.safetensors}}
""")
    run_recipe(load_recipe(root / f"m{i}.yaml"), progress=False)
    (root / f"g{i}.yaml").write_text(f"""kind: grid
name: g{i}
defaults: {{model: merged/m{i}.safetensors, sampler: Euler, steps: {steps}, width: {size}, height: {size}}}
x: {{axis: prompt, values: {PROMPTS!r}}}
seeds: {SEEDS}
scores: {{clip: {{model: tiny, weights: clip}}, style: {{reference_dir: refs}}}}
memory: {{device: cpu}}
output: {{dir: grids/g{i}}}
""")
    run_recipe(load_recipe(root / f"g{i}.yaml"), progress=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_tiny("sd15", root / "a.safetensors", seed=1)
        build_tiny("sd15", root / "b.safetensors", seed=2)
        tiny_clip.build(root / "clip", seed=4)
        from PIL import Image

        (root / "refs").mkdir()
        for i in range(4):
            Image.new("RGB", (64, 64), (50 * i, 90, 140)).save(root / "refs" / f"{i}.png")
        (root / "s.yaml").write_text(search_text(args.trials, args.steps, args.size))
        run_recipe(load_recipe(root / "s.yaml"), progress=False)  # N trials + fixed costs
        (root / "s.yaml").write_text(search_text(2 * args.trials, args.steps, args.size))
        started = time.perf_counter()
        run_recipe(load_recipe(root / "s.yaml"), progress=False)  # N more trials + fixed costs
        resumed = time.perf_counter() - started
        (root / "s0.yaml").write_text(search_text(2 * args.trials, args.steps, args.size))
        started = time.perf_counter()
        run_recipe(load_recipe(root / "s0.yaml"), progress=False)  # 0 trials: fixed costs only
        fixed = time.perf_counter() - started
        search_per_trial = max(1e-6, (resumed - fixed) / args.trials)

        rng = random.Random(0)
        started = time.perf_counter()
        for i in range(args.trials):
            baseline_trial(root, i, round(rng.random(), 3), args.steps, args.size)
        grid_per_trial = (time.perf_counter() - started) / args.trials
    cells = len(PROMPTS) * len(SEEDS)
    print(f"tiny SD1.5, {cells} pictures per trial ({args.size}px, {args.steps} steps), {args.trials} trials each")
    print(f"merge_search (in-memory preview, one pipeline, one scorer): {search_per_trial:.2f} s/trial "
          f"= {60 / search_per_trial:.1f} trials/min")
    print(f"write merge + full grid + re-score per trial:              {grid_per_trial:.2f} s/trial "
          f"= {60 / grid_per_trial:.1f} trials/min")
    print(f"ratio: merge_search is {grid_per_trial / search_per_trial:.1f}x faster per trial")
    return 0


if __name__ == "__main__":
    sys.exit(main())
