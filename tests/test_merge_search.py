"""`kind: merge_search` on tiny SD1.5 models (64x64, few steps) and a tiny open_clip.

The planted optimum: the reference pictures are made by the merge at a known α* (or a known block
pattern) through the same in-memory preview path, on seeds the search never uses; the search must
find α* back. The tiny models and the tiny CLIP are random: two independently drawn models give
pictures whose style a random CLIP cannot tell apart (measured: the style score is flat in α), and
a difference planted in one direction only is biased toward extrapolation by the cosine to the
references' mean embedding (measured: the search then ends near α = 1). So the style is planted
*centred*: A and B are one base model with opposite offsets, A = base − α*·δ and B = base +
(1 − α*)·δ, in a layer the tiny CLIP sees (the VAE decoder's output bias: a colour grade, block
BASE; for the block search also one layer of IN, MID and OUT), so that the merge at α* is the
base itself and every other α adds a visible grade. The constructed single-seed case uses the
independent pair, where only noise separates the trials.
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import pytest
import torch

from workbench.dispatch import run_recipe
from workbench.errors import RecipeError
from workbench.grid import search_store
from workbench.grid.holdout import split_references
from workbench.grid.merge_trials import TrialScorer
from workbench.grid.scores import load_backbone
from workbench.merge.search_space import SearchSpace, block_groups
from workbench.pipeline.model import ImageSettings
from workbench.recipes.loader import load_recipe
from workbench.recipes.merge import MergeRecipe

ALPHA_STAR = 0.7
# one prompt: references of several prompts share one mean embedding, and with the random tiny CLIP
# the mixture moved the optimum of the other prompt's pictures (measured: 0.91 found for 0.7)
PROMPTS = ["a lighthouse at dusk"]
STEPS, SAMPLER = 3, "Euler"
REF_SEEDS = [201, 202, 203, 204, 205, 206, 207, 208]


# key -> per-channel offset δ between A and B; each key is in one block group (formats/blocks.py)
GRADE = {"first_stage_model.decoder.conv_out.bias": [1.0, 0.0, -1.0]}  # BASE: a colour grade
GROUP_OFFSETS = {
    "model.diffusion_model.input_blocks.0.0.bias": 0.6,             # IN (IN00)
    "model.diffusion_model.middle_block.2.out_layers.3.bias": 0.6,  # MID (M00)
    "model.diffusion_model.out.2.bias": 0.4,                        # OUT (OUT11)
}
GROUP_OF = {"first_stage_model.decoder.conv_out.bias": "BASE",
            "model.diffusion_model.input_blocks.0.0.bias": "IN",
            "model.diffusion_model.middle_block.2.out_layers.3.bias": "MID",
            "model.diffusion_model.out.2.bias": "OUT"}


def _planted_pair(base: Path, a: Path, b: Path, offsets: dict, planted) -> None:
    """A = base − α*·δ, B = base + (1 − α*)·δ per key (α* per block group, or one number), so
    that the weighted sum at the planted weights is the base model at those keys."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(base))
    sides = {a: dict(state), b: dict(state)}
    for key, shift in offsets.items():
        star = planted if isinstance(planted, float) else planted[GROUP_OF[key]]
        delta = torch.as_tensor(shift, dtype=torch.float32)
        t = state[key].float()
        sides[a][key] = (t - star * delta).to(state[key].dtype)
        sides[b][key] = (t + (1 - star) * delta).to(state[key].dtype)
    for path, sd in sides.items():
        save_file(sd, str(path))


def _recipe_text(root: Path, *, space="alpha", a="a.safetensors", b="b.safetensors", trials=20, selection=(1, 2, 3), evaluation=(101, 102),
                 refs="refs", prompts=PROMPTS, out="out", extra="", scores="") -> str:
    return f"""kind: merge_search
name: planted
inputs: {{A: {a}, B: {b}}}
method: weighted_sum
references: {{dir: {refs}, held_out_fraction: 0.25}}
prompts: {list(prompts)!r}
seeds: {{selection: {list(selection)}, evaluation: {list(evaluation)}}}
trials: {trials}
space: {space}
generation: {{sampler: {SAMPLER}, steps: {STEPS}, cfg: 7.0, width: 64, height: 64}}
scores: {{clip: {{model: tiny, weights: clip}}{scores}}}
memory: {{device: cpu}}
output: {{dir: {out}}}
{extra}"""


def _write(root: Path, text: str, name: str = "search.yaml") -> Path:
    path = root / name
    path.write_text(text, encoding="utf-8")
    return path


def _plant(root: Path, folder: str, blocks: dict[str, float] | None, alpha: float | None,
           seeds=REF_SEEDS, prompts=PROMPTS, a="a.safetensors", b="b.safetensors") -> Path:
    """Reference pictures made by the merge at the planted weights, through the preview path."""
    recipe = MergeRecipe.model_validate({
        "name": "plant", "models": {"A": str(root / a), "B": str(root / b)},
        "steps": [{"id": "mix", "method": "weighted_sum" if blocks is None else "block_weighted",
                   "inputs": ["A", "B"], **({"alpha": alpha} if blocks is None else {"blocks": blocks})}],
        "output": {"path": str(root / "unused.safetensors")}})
    backbone = load_backbone(weights=root / "clip", device="cpu")
    scorer = TrialScorer(backbone, {}, ImageSettings("", sampler=SAMPLER, steps=STEPS, width=64, height=64),
                         prompts, device="cpu")
    images, ps, ss, _, _ = scorer.images(recipe, seeds)
    out = root / folder
    out.mkdir()
    for img, p, s in zip(images, ps, ss):
        img.save(out / f"ref-{prompts.index(p)}-{s}.png")
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model):
    from workbench.testing import clip as tiny_clip
    import shutil

    root = tmp_path_factory.mktemp("msearch")
    _planted_pair(tiny_model("sd15", 1), root / "a.safetensors", root / "b.safetensors", GRADE, ALPHA_STAR)
    shutil.copy(tiny_model("sd15", 1), root / "a_random.safetensors")
    shutil.copy(tiny_model("sd15", 2), root / "b_random.safetensors")
    tiny_clip.build(root / "clip", seed=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORKBENCH_CACHE", str(root / "wb-cache"))
        _plant(root, "refs", None, ALPHA_STAR)
    return root


# -------------------------------------------------------------------------------- fast: recipe, plan


def test_recipe_rejects_shared_seeds_and_missing_c(tmp_path):
    text = _recipe_text(tmp_path, selection=(1, 2), evaluation=(2, 3))
    with pytest.raises(RecipeError, match="also selection seeds"):
        load_recipe(_write(tmp_path, text))
    text = _recipe_text(tmp_path).replace("method: weighted_sum", "method: add_difference")
    with pytest.raises(RecipeError, match="needs input C"):
        load_recipe(_write(tmp_path, text))


def test_block_groups_cover_every_block_once():
    from workbench.arch import ARCHS

    for arch in ARCHS:
        groups = block_groups(arch.id)
        flat = [b for ids in groups.values() for b in ids]
        assert sorted(flat) == sorted(arch.block_ids), arch.id
        assert list(groups) == ["BASE", "IN", "MID", "OUT"], arch.id
    assert block_groups("sd15")["MID"] == ["M00"]
    assert block_groups("flux")["IN"][0] == "IN" and block_groups("flux")["OUT"][-1] == "OUT"


def test_journal_lock_falls_back_without_symlinks(tmp_path, monkeypatch):
    """Where symlinks are refused (Windows without Developer Mode) the open-file lock is used,
    and trials are stored and read back through it."""
    import optuna
    from optuna.storages.journal import JournalFileOpenLock, JournalFileSymlinkLock

    assert isinstance(search_store.journal_lock(tmp_path / "j"), JournalFileSymlinkLock)

    def refuse(*a, **k):
        raise OSError(1314, "A required privilege is not held by the client")

    monkeypatch.setattr(os, "symlink", refuse)
    assert not search_store.symlinks_work(tmp_path)
    assert isinstance(search_store.journal_lock(tmp_path / "j"), JournalFileOpenLock)
    study = optuna.create_study(study_name="s", storage=search_store.open_storage(tmp_path))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    again = optuna.load_study(study_name="s", storage=search_store.open_storage(tmp_path))
    assert len(again.trials) == 3 and not list(tmp_path.glob("*.lock"))


@pytest.mark.slow
def test_dry_run_counts_trials_cells_and_split(base):
    plan = run_recipe(load_recipe(_write(base, _recipe_text(base, out="dry"))), dry_run=True).plan
    assert plan.ok, plan.problems
    text = plan.render()
    assert "trials: 20 (0 finished" in text and "20 to run" in text
    assert "cells per trial: 3 (1 prompt x 3 selection seeds" in text
    split = split_references(base / "refs", 0.25)
    assert f"{len(split.selection)} for selection, {len(split.held_out)} held out" in text
    assert "estimated time: ~" in text
    assert isinstance(plan.detail.space, SearchSpace) and plan.detail.to_run == 20


# -------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_alpha_search_recovers_planted_alpha(base):
    # the random tiny CLIP's adherence score means nothing: the constraint is opened (margin 100),
    # else trials near alpha* can be ruled out by noise in a score that does not measure adherence
    started = time.perf_counter()
    text = _recipe_text(base, scores=", adherence: constraint, adherence_margin: 100")
    result = run_recipe(load_recipe(_write(base, text)), progress=False)
    wall = time.perf_counter() - started
    found = result.info["best"]["params"]["alpha"]
    print(f"\nplanted alpha {ALPHA_STAR}: found {found:.3f} in 20 trials, {wall:.0f} s wall")
    assert abs(found - ALPHA_STAR) <= 0.1, f"found alpha {found:.3f}, planted {ALPHA_STAR}"
    out = base / "out"
    rows = list(csv.DictReader((out / "trials.csv").open(encoding="utf-8")))
    assert len(rows) == 20 and {"trial", "alpha", "style", "clip"} <= set(rows[0])
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "<svg" in html and "20 trials" in html and "best vs A" in html and "best vs B" in html
    # the style-against-adherence scatter: a dot per trial and per input, the best ringed; margin
    # 100 puts the adherence bar far left of every point, which the plot says in words
    assert html.count('class="plot pareto"') == 1 and html.count('<circle class="dot') == 20 + 2
    assert html.count('<circle class="chosen"') == 1 and "lies left of the plot: every point meets it" in html
    assert (out / "grid.png").is_file() and (out / "provenance.json").is_file()
    assert not (out / "merged").exists()  # no checkpoint written by the search
    # best.yaml is an ordinary merge recipe whose dry run passes
    best = load_recipe(out / "best.yaml")
    assert isinstance(best, MergeRecipe) and best.steps[0].alpha == pytest.approx(found, abs=1e-5)
    dry = run_recipe(best, dry_run=True)
    assert dry.plan.ok, dry.plan.problems


@pytest.mark.slow
def test_pareto_mode_chooses_from_the_front_and_plots_it(base):
    """adherence: pareto: optuna keeps the front of (style, adherence); the best is its most
    stylish member within the margin, and the report's scatter marks exactly that front."""
    short = dict(selection=(1,), evaluation=(101,), prompts=PROMPTS[:1], out="pareto", trials=6)
    text = _recipe_text(base, scores=", adherence: pareto, adherence_margin: 100", **short)
    info = run_recipe(load_recipe(_write(base, text, "pareto.yaml")), progress=False).info
    rows = {int(r["trial"]): (float(r["style"]), float(r["clip"]))
            for r in csv.DictReader((base / "pareto" / "trials.csv").open(encoding="utf-8"))}
    assert len(rows) == 6

    def dominated(i):
        s, c = rows[i]
        return any(s2 >= s and c2 >= c and (s2, c2) != (s, c) for s2, c2 in rows.values())

    front = set(info["pareto_front"])
    assert front == {i for i in rows if not dominated(i)}  # optuna's front is the true one
    best = info["best"]["trial"]
    assert best in front and rows[best][0] == max(rows[i][0] for i in front)
    html = (base / "pareto" / "report.html").read_text(encoding="utf-8")
    assert html.count('<circle class="dot front') == len(front)
    assert html.count('<circle class="chosen"') == 1


@pytest.mark.slow
def test_search_resumes_without_repeating_trials(base, monkeypatch):
    calls = []
    real = TrialScorer.score

    def counted(self, recipe, seeds, reference="selection", **kw):
        calls.append(kw.get("name", ""))
        return real(self, recipe, seeds, reference, **kw)

    monkeypatch.setattr(TrialScorer, "score", counted)
    short = dict(selection=(1,), evaluation=(101,), prompts=PROMPTS[:1], out="resume")
    path = _write(base, _recipe_text(base, trials=3, **short), "resume.yaml")
    first = run_recipe(load_recipe(path), progress=False)
    trials_first = [c for c in calls if c.startswith("trial")]
    assert len(trials_first) == 3 and first.info["trials"] == 3
    rows_first = list(csv.DictReader((base / "resume" / "trials.csv").open()))

    path = _write(base, _recipe_text(base, trials=5, **short), "resume.yaml")
    plan = run_recipe(load_recipe(path), dry_run=True).plan
    assert "trials: 5 (3 finished" in plan.render() and plan.detail.to_run == 2
    calls.clear()
    second = run_recipe(load_recipe(path), progress=False)
    assert len([c for c in calls if c.startswith("trial")]) == 2  # only the missing trials ran
    assert not [c for c in calls if c.startswith("input")][:0]
    assert second.info["trials"] == 5 and second.info["run_now"] == 2
    rows = list(csv.DictReader((base / "resume" / "trials.csv").open()))
    assert rows[:3] == rows_first  # finished trials kept as they were


@pytest.mark.slow
def test_block_groups_search_recovers_planted_pattern(base):
    """References made with a different α per block group; the search over the four groups must
    find the pattern back. Honest tolerance on this tiny setup: BASE (the colour grade the tiny
    CLIP sees) within 0.15; IN, MID and OUT are not identifiable here (measured with 24 trials:
    found IN 0.09 / MID 0.24 / OUT 0.84 for 0.2 / 0.5 / 0.6: their offsets barely move the
    pictures of a random 2-step UNet: the tiny VAE decoder's last GroupNorm, one channel per group,
    removes what a UNet change does to colour, and colour is what the tiny CLIP sees; see
    tests/test_pick.py), so only their presence in best.yaml is checked."""
    planted = {"BASE": 0.8, "IN": 0.2, "MID": 0.5, "OUT": 0.6}
    groups = block_groups("sd15")
    blocks = {b: planted[g] for g, ids in groups.items() for b in ids}
    _planted_pair(base / "a_random.safetensors", base / "a_blocks.safetensors", base / "b_blocks.safetensors",
                  {**GRADE, **GROUP_OFFSETS}, planted)
    _plant(base, "refs_blocks", blocks, None, a="a_blocks.safetensors", b="b_blocks.safetensors")
    text = _recipe_text(base, space="block_groups", a="a_blocks.safetensors", b="b_blocks.safetensors",
                        trials=24, refs="refs_blocks", out="out_blocks",
                        scores=", adherence: constraint, adherence_margin: 100")
    started = time.perf_counter()
    result = run_recipe(load_recipe(_write(base, text, "blocks.yaml")), progress=False)
    found = result.info["best"]["params"]
    print(f"\nplanted {planted}: found " + ", ".join(f"{k} {v:.2f}" for k, v in found.items())
          + f" ({time.perf_counter() - started:.0f} s)")
    assert set(found) == set(planted)
    assert abs(found["BASE"] - planted["BASE"]) <= 0.15
    best = load_recipe(base / "out_blocks" / "best.yaml")
    assert set(best.steps[0].blocks) == set(block_groups("sd15")["BASE"] + block_groups("sd15")["IN"]
                                            + ["M00"] + block_groups("sd15")["OUT"])


@pytest.mark.slow
def test_single_seed_search_looks_better_than_the_held_out_check(base):
    """Constructed case: the held-out pictures are planted at alpha* = 0.7 on other seeds, but the
    selection part of the folder holds look-alikes of the single selection seed's own picture at
    alpha = 0.3 (pictures that happen to match one seed's composition). A search on that one seed
    is drawn to them; the held-out check (other seeds, held-out pictures) shows less gain than the
    selection claimed, and the choice is off alpha*."""
    import shutil

    from workbench.grid.holdout import split_references

    refs = base / "refs_lookalike"
    shutil.copytree(base / "refs", refs)
    look = _plant(base, "lookalike_src", None, 0.3, seeds=[1])
    source = next(look.glob("*.png"))
    for path in split_references(refs, 0.25).selection:  # same names: the split does not move
        shutil.copy(source, path)
    text = _recipe_text(base, trials=10, selection=(1,), evaluation=(101, 102, 103), refs="refs_lookalike",
                        out="out_single", scores=", adherence: constraint, adherence_margin: 100")
    result = run_recipe(load_recipe(_write(base, text, "single.yaml")), progress=False)
    info = result.info
    sel = info["baseline_selection"]
    selection_gain = info["best"]["style"] - max(sel["A"]["style"], sel["B"]["style"])
    held = info["held_out"]
    held_gain = held["best"]["style"] - max(held["A"]["style"], held["B"]["style"])
    found = info["best"]["params"]["alpha"]
    print(f"\nsingle seed: found alpha {found:.3f}, selection gain {selection_gain:+.4f}, held-out gain "
          f"{held_gain:+.4f}, within noise: {info['within_noise']}")
    # the planted merge, scored the way the check scores (evaluation seeds, held-out pictures)
    recipe = load_recipe(base / "out_single" / "best.yaml").model_copy()
    recipe.steps[0].alpha = ALPHA_STAR
    backbone = load_backbone(weights=base / "clip", device="cpu")
    check = TrialScorer(backbone, {"held_out": split_references(refs, 0.25).held_out},
                        ImageSettings("", sampler=SAMPLER, steps=STEPS, width=64, height=64), PROMPTS,
                        device="cpu").score(recipe, [101, 102, 103], "held_out")
    print(f"held-out style: single-seed pick {held['best']['style']:.4f}, alpha* {check.mean_style:.4f}")
    assert selection_gain > 0  # the one seed said the pick beats both inputs
    assert abs(found - ALPHA_STAR) > 0.1  # it picked off the planted optimum
    assert check.mean_style > held["best"]["style"]  # which the held-out check shows to be worse
    assert info["within_noise"]  # and the report warns that the pick is not shown better


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_dit_preview_equals_the_merged_file(tiny_model, tmp_path, arch):
    """The in-memory preview of a merge makes the same picture as the merged file written by
    `workbench run` and loaded from disk (same seed)."""
    import numpy as np

    from workbench.grid.merge_preview import MergePreviewer
    from workbench.pipeline.generate import generate, load_model

    a, b = tiny_model(arch, 1), tiny_model(arch, 2)
    (tmp_path / "mix.yaml").write_text(f"""kind: merge
name: mix
models: {{A: {a}, B: {b}}}
steps:
  - {{id: mix, method: weighted_sum, inputs: [A, B], alpha: 0.35}}
output: {{path: {tmp_path / 'mix.safetensors'}, dtype: fp32}}
""")
    recipe = load_recipe(tmp_path / "mix.yaml")
    run_recipe(recipe, progress=False)
    settings = ImageSettings("a lighthouse", sampler="Euler", steps=2, cfg=3.0, width=64, height=64)
    from_file = generate(load_model(tmp_path / "mix.safetensors", device="cpu", weights="fp32"),
                         settings, [5], batch_size=1)[0].image
    previewer = MergePreviewer(load=lambda p, device=None: load_model(p, device="cpu", weights="fp32"))
    preview = generate(previewer.model_for_recipe(recipe, name="mix"), settings, [5], batch_size=1)[0].image
    unmerged = generate(load_model(a, device="cpu", weights="fp32"), settings, [5], batch_size=1)[0].image
    got, want, other = (np.asarray(im).astype(int) for im in (preview, from_file, unmerged))
    assert np.abs(got - want).max() <= 2, f"{arch}: preview differs from the merged file"
    assert np.abs(got - other).mean() > 1, f"{arch}: the preview did not change the weights"


@pytest.mark.slow
def test_merge_page_submits_a_search_job(tmp_path, tiny_sd15, monkeypatch):
    """The Merge page's search mode validates, dry-runs and queues a merge_search job."""
    pytest.importorskip("streamlit")
    from PIL import Image
    from streamlit.testing.v1 import AppTest

    from workbench.app.config import ENV, AppConfig
    from workbench.jobs.store import JobStore
    from workbench.recipes.loader import parse_recipe
    from workbench.testing import clip as tiny_clip

    for d in ("models", "outputs", "datasets/pictures"):
        (tmp_path / d).mkdir(parents=True)
    for name in ("A", "B"):
        (tmp_path / "models" / f"{name}.safetensors").symlink_to(tiny_sd15[name])
    tiny_clip.build(tmp_path / "models" / "clip", seed=4)
    for i in range(4):
        Image.new("RGB", (64, 64), (60 * i, 80, 120)).save(tmp_path / "datasets" / "pictures" / f"{i}.png")
    cfg = AppConfig(home=tmp_path, spawn_workers=False)
    monkeypatch.setenv(ENV, cfg.to_json())
    main = Path(__file__).resolve().parents[1] / "workbench" / "app" / "main.py"
    at = AppTest.from_file(str(main), default_timeout=180).run()
    at.switch_page("views/merge.py").run()
    assert not at.exception, [e.value for e in at.exception]
    values = {"A": "models/A.safetensors", "B": "models/B.safetensors", "refs": "datasets/pictures",
              "clip": "models/clip", "clip_model": "tiny", "out": "outputs/searches/s1",
              "selection": "1, 2", "evaluation": "7"}
    for name, value in values.items():
        at.text_input(key=f"msearch.{name}").set_value(value)
    at.number_input(key="msearch.trials").set_value(5).run()
    assert not at.error, [e.value for e in at.error]
    at.button(key="msearch.dry").click().run()
    assert not at.exception, [e.value for e in at.exception]
    plan_text = "\n".join(c.value for c in at.code if "plan: merge_search" in c.value)
    assert "trials: 5 (0 finished" in plan_text, plan_text
    at.button(key="msearch.submit").click().run()
    (job,) = JobStore(str(cfg.db)).list(kind="merge_search")
    recipe = parse_recipe(job.recipe)
    assert recipe.trials == 5 and recipe.inputs.A == tmp_path / "models" / "A.safetensors"
    assert recipe.seeds.evaluation == [7]
