"""`workbench pick` (kind: pick): choose a trained LoRA's step and strength, checked on held-out data.

The planted optimum: a "training output folder" is constructed, not trained. One LoRA is extracted
(workbench/merge/extract.py) from the difference of two tiny SD1.5 checkpoints; the step files are
that LoRA with `lora_up` scaled by a per-step magnitude (steps 10, 30, 40: 0.3, 1.0, 2.5), written
with the metadata and file names `workbench train` writes, plus its provenance.json and A1111
sidecar. A LoRA's effect is linear in magnitude × strength, so with strengths 0.6 and 1.0 exactly
one candidate has the effective strength 1.0 of step 30's file at 1.0.

Why the dataset pictures come from `planted_image` and not from the tiny model: the tiny random
SD1.5 cannot carry a style. Measured on this machine (64 px, Euler a): images made with the
extracted LoRA at effective strengths 0 to 2.5 have the same mean colour and contrast to within
0.01, and the tiny CLIP's style similarity to pictures made at 1.0 falls monotonically with the
strength instead of peaking at 1.0 (0.9936 at 0.18 ... 0.9858 at 2.5); hand-made LoRAs on the
cross-attention values (up to ×30) and 8× stronger extracted ones did not change that. The cause
is the tiny VAE: its decoder ends in a GroupNorm with one channel per group (8 channels, 8 groups;
a real SD VAE has 4 per group), which removes every channel's mean, so no latent change reaches
the pictures' colours (a +3 shift of one latent channel moves the pixel mean by at most 0.01;
with 2 channels per group it moves it 0.2 to 0.5), and the tiny CLIP sees colour, not texture
(cosine 0.99 between any two tiny-model pictures). Only a file's VAE can grade colour, and a LoRA
has none. So
`planted_image` stands in for the generation core in the recovery test: a picture whose colours
follow the effective LoRA strength (read from the LoRA files' tensors) plus prompt- and
seed-dependent shapes and noise. Everything else is real: the grid engine, cell store, the tiny
open_clip scorer, the split, the statistics and the outputs. A second test runs the same pick with
real tiny-SD1.5 generation end to end (outputs, sidecar, --overwrite) and prints what it picked.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import numpy as np

import pytest
import yaml
from safetensors.torch import load_file, save_file

from PIL import Image

from workbench import system
from workbench.errors import OutputExistsError, WorkbenchError
from workbench.formats import sidecar
from workbench.grid import pareto
from workbench.provenance import Provenance
from workbench.recipes.choice import default_prompts
from workbench.recipes.pick import PickRecipe

NAME = "planted"
TRIGGER = "plnt"
MAGNITUDES = {10: 0.3, 30: 1.0, 40: 2.5}
PLANTED = 30
CAPTIONS = ["a lighthouse by the sea", "a small house on a hill", "a sailing boat", "a tree in a field",
            "a bridge over a river", "a windmill"]
PROMPTS = ["a red bicycle against a wall", "a bowl of lemons on a table"]
USER_SIDECAR = {"description": "my planted style", "activation text": "", "preferred weight": 0.0,
                "negative text": "blurry", "notes": "my own note\nsecond line", "sd version": "SD1",
                "civitai_id": 12345}


def _step_file(folder: Path, step: int) -> Path:
    last = max(MAGNITUDES)
    return folder / (f"{NAME}.safetensors" if step == last else f"{NAME}-step{step:08d}.safetensors")


@lru_cache(maxsize=None)
def _up_mean(path: Path) -> float:
    ups = [v.float().abs().mean().item() for k, v in load_file(str(path)).items()
           if k.endswith("lora_up.weight")]
    return sum(ups) / len(ups)


def planted_image(settings, seed: int, loras) -> Image.Image:
    """The stand-in picture (module docstring): colour from the effective LoRA strength, relative
    to step 30's file, a prompt-dependent block and seed-dependent noise."""
    unit = _up_mean(_step_file(PLANTED_FOLDER[0], PLANTED))
    e = sum(lu.weight * _up_mean(Path(lu.path)) for lu in loras) / unit
    rng = np.random.default_rng(seed * 7919 + zlib.crc32(settings.prompt.encode()))
    colour = np.clip(np.array([0.15 + 0.3 * e, 0.55 - 0.1 * e, 0.85 - 0.3 * e]), 0, 1)
    img = np.ones((settings.height, settings.width, 3)) * colour
    x, y = rng.integers(0, settings.width // 2, 2)
    img[y:y + settings.height // 3, x:x + settings.width // 3] = 1 - colour
    img += rng.normal(0, 0.06, img.shape)
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


def planted_generate(model, settings, seeds, *, loras=(), bar=False, batch_size=None, on_image=None):
    """`generate` with `planted_image` pictures, in the form the grid engine stores."""
    from workbench.pipeline.model import GeneratedImage

    return [GeneratedImage(planted_image(settings, s, loras), s, settings.prompt,
                           {"settings": asdict(settings), "planted": True}) for s in seeds]


PLANTED_FOLDER: list[Path] = []


def build_training_folder(root: Path, base: Path, tuned: Path, clip: Path) -> Path:
    """The constructed training output folder described in the module docstring."""
    from workbench.merge.extract import extract_lora
    from workbench.pipeline.model import ImageSettings, LoraUse

    folder = root / "train-out"
    folder.mkdir(parents=True)
    raw = extract_lora(tuned, base, root / "raw-lora.safetensors", rank=4, components=("unet",),
                       progress=False)
    tensors = load_file(str(raw))
    for step, m in MAGNITUDES.items():
        scaled = {k: (v.float() * m).to(v.dtype) if k.endswith("lora_up.weight") else v
                  for k, v in tensors.items()}
        meta = {"ss_output_name": NAME, "ss_steps": str(step), "ss_base_model_version": "sd_v1",
                "modelspec.architecture": "stable-diffusion-v1/lora",
                "modelspec.trigger_phrase": TRIGGER}
        save_file(scaled, str(_step_file(folder, step)), metadata=meta)
    PLANTED_FOLDER[:] = [folder]
    dataset = root / "dataset" / "10_plnt"
    dataset.mkdir(parents=True)
    planted = LoraUse(_step_file(folder, PLANTED), 1.0)
    for i, caption in enumerate(CAPTIONS):
        settings = ImageSettings(f"{TRIGGER}, {caption}", "", "Euler a", 1, 1.0, 64, 64)
        planted_image(settings, 1000 + i, (planted,)).save(dataset / f"{i:03d}.png")
        (dataset / f"{i:03d}.txt").write_text(caption)
    recipe = {"kind": "train", "name": NAME, "base": str(base), "dataset": str(dataset.parent),
              "trigger": TRIGGER, "resolution": 64, "max_steps": max(MAGNITUDES),
              "output": {"dir": str(folder), "save_every": 10}}
    prov = Provenance(kind="train", name=NAME, recipe_text=yaml.safe_dump(recipe, sort_keys=False))
    prov.add_input("base", base)
    prov.inputs["dataset"] = {"path": str(dataset.parent), "kind": "folder"}
    prov.extra = {"steps": max(MAGNITUDES)}
    prov.write(folder)
    (folder / f"{NAME}.json").write_text(json.dumps(USER_SIDECAR, indent=2))
    return folder


def pick_recipe(folder: Path, clip: Path, out: Path, **kw) -> PickRecipe:
    # 64 px, one sampling step, CFG 1 (one UNet pass per image): the machine running the tests is
    # slow and shared, and the planted step does not need more
    data = {"training": folder, "name": "planted-pick", "strengths": [0.6, 1.0], "prompts": PROMPTS,
            "seeds": {"selection": [1], "evaluation": [11, 12]}, "references": {"held_out_fraction": 0.34},
            "generation": {"steps": 1, "cfg": 1.0},
            # the tiny CLIP's adherence is noise; a wide margin leaves the choice to style
            "scores": {"clip": {"model": "tiny-open-clip", "weights": clip}, "adherence_margin": 100},
            "output": {"dir": out}}
    data.update(kw)
    return PickRecipe.model_validate(data)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from workbench.testing import build_tiny
    from workbench.testing import clip as tiny_clip

    root = tmp_path_factory.mktemp("pick")
    base = build_tiny("sd15", root / "base.safetensors", seed=1)
    tuned = build_tiny("sd15", root / "tuned.safetensors", seed=2)
    clip = tiny_clip.build(root / "clip", seed=4)
    return {"root": root, "folder": build_training_folder(root, base, tuned, clip), "clip": clip}


def read_a1111_user_metadata(lora: Path) -> dict:
    """What A1111's Lora page takes from a sidecar (extensions-builtin/Lora/
    ui_extra_networks_lora.py create_item and ui_edit_user_metadata.py put_values_into_components):
    the JSON at the LoRA's path without extension, "preferred weight" as a float (0 = the default
    multiplier), "activation text" appended to the prompt, "sd version" used only when it is an
    SdVersion name."""
    data = json.loads(lora.with_suffix(".json").read_text(encoding="utf-8"))
    weight = data.get("preferred weight", 0.0)
    return {"prompt": f"<lora:{lora.stem}:{weight if weight else 1}>"
                      + (f" {data['activation text']}" if data.get("activation text") else ""),
            "preferred weight": float(weight), "activation text": data.get("activation text", ""),
            "negative text": data.get("negative text", ""), "notes": data.get("notes", ""),
            "description": data.get("description", ""),
            "sd version": data["sd version"] if data.get("sd version") in sidecar.SD_VERSIONS else None,
            "raw": data}


# ---------------------------------------------------------------------------------- fast units


def test_pareto_front_and_rule():
    pts = [pareto.Candidate("base", 0.50, 30.0), pareto.Candidate("a", 0.70, 29.5),
           pareto.Candidate("b", 0.80, 25.0), pareto.Candidate("c", 0.45, 31.0),
           pareto.Candidate("d", 0.60, 29.0)]  # d is dominated by a
    assert pareto.pareto_front(pts) == [2, 1, 0, 3]
    best, rule = pareto.recommend(pts, 0, margin=1.0)
    assert pts[best].label == "a" and "no worse than base" in rule  # b gives up 5 points
    assert pts[pareto.recommend(pts, 0, margin=10.0)[0]].label == "b"
    assert pts[pareto.recommend(pts, 0, margin=0.0)[0]].label == "base"
    svg = pareto.scatter_svg(pts, pareto.pareto_front(pts), baseline=0, chosen=1, title="t")
    assert svg.startswith("<svg") and svg.count("<circle") == len(pts) + 1


def test_default_prompts_ship_and_recipe_defaults():
    prompts = default_prompts()
    assert len(prompts) >= 5 and not any(p.startswith("#") for p in prompts)
    r = PickRecipe(training=Path("x"))
    assert r.prompt_values() == prompts and 1.0 in r.strength_values()
    assert not set(r.seeds.values("selection")) & set(r.seeds.values("evaluation"))
    assert PickRecipe(training=Path("x"), strengths=[0.5, 0.8]).strength_values() == [0.5, 0.8, 1.0]


def test_sidecar_merge_keeps_user_fields(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps(USER_SIDECAR))
    out = sidecar.merged(sidecar.read_sidecar(path), preferred_weight=0.8, activation_text="plnt",
                         sd_version="SDXL", description="ignored: user has one", note="step 3")
    assert out["preferred weight"] == 0.8 and out["activation text"] == "plnt"
    assert out["sd version"] == "SD1" and out["description"] == "my planted style"
    assert out["civitai_id"] == 12345 and out["negative text"] == "blurry"
    assert out["notes"].splitlines() == ["my own note", "second line", "workbench pick: step 3"]
    again = sidecar.merged(out, preferred_weight=0.6, note="step 4")
    assert again["notes"].splitlines() == ["my own note", "second line", "workbench pick: step 4"]
    path.write_text("[1, 2]")
    with pytest.raises(WorkbenchError, match="x.json"):
        sidecar.read_sidecar(path)


def test_link_or_copy_links_copies_and_never_overwrites(tmp_path, monkeypatch):
    src = tmp_path / "a.safetensors"
    src.write_bytes(b"lora-bytes")
    dst = tmp_path / "out" / "b.safetensors"
    how = system.link_or_copy(src, dst)
    assert dst.read_bytes() == b"lora-bytes"
    if how == "hard link":
        assert os.path.samefile(src, dst)
        assert system.link_or_copy(src, dst) == "same file"  # already in place: nothing to do
    other = tmp_path / "c.safetensors"
    other.write_bytes(b"other")
    with pytest.raises(OutputExistsError, match="b.safetensors"):
        system.link_or_copy(other, dst)
    assert dst.read_bytes() == b"lora-bytes"

    def no_links(*a, **kw):  # a file system without hard links (FAT, another drive: EXDEV)
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    assert system.link_or_copy(other, dst, overwrite=True) == "copy"
    assert dst.read_bytes() == b"other" and not os.path.samefile(other, dst)
    assert [p.name for p in dst.parent.iterdir()] == ["b.safetensors"]  # no temp file left
    monkeypatch.delattr(os, "link")  # a platform without os.link at all
    assert system.link_or_copy(src, dst, overwrite=True) == "copy"
    assert dst.read_bytes() == b"lora-bytes"


def test_not_a_training_folder_is_a_clear_problem(tmp_path):
    from workbench.dispatch import build_plan

    plan = build_plan(PickRecipe(training=tmp_path))
    assert any("provenance.json" in p and str(tmp_path) in p for p in plan.problems)


# ---------------------------------------------------------------------------- on tiny SD1.5


@pytest.mark.slow
def test_dry_run_refuses_shared_seeds_and_caption_prompts(planted, tmp_path):
    from workbench.dispatch import build_plan

    with pytest.raises(ValueError, match=r"seeds\.evaluation: seed\(s\) \[2\] are also selection seeds"):
        pick_recipe(planted["folder"], planted["clip"], tmp_path / "p",
                    seeds={"selection": [1, 2], "evaluation": [2, 3]})
    r = pick_recipe(planted["folder"], planted["clip"], tmp_path / "p",
                    prompts=[PROMPTS[0], CAPTIONS[1]])
    plan = build_plan(r)
    assert any("prompts[1]" in p and "training caption" in p for p in plan.problems), plan.problems
    plan = build_plan(pick_recipe(planted["folder"], planted["clip"], tmp_path / "p"))
    assert plan.ok, plan.problems
    text = plan.render()
    assert "6 pictures" in text and "4 for choosing, 2 held out" in text
    assert "3 step(s) × 2 strength(s)" in text and "cells: 12" in text
    assert "estimated time" in text and "evaluation grid: up to 8 cells" in text


@pytest.mark.slow
def test_pick_recovers_the_planted_step(planted, tmp_path, monkeypatch, capsys):
    from workbench.dispatch import run_recipe
    from workbench.kinds import grid as grid_kind

    monkeypatch.setattr(grid_kind, "load_model", lambda *a, **kw: None)
    monkeypatch.setattr(grid_kind, "generate", planted_generate)
    out = tmp_path / "pick"
    result = run_recipe(pick_recipe(planted["folder"], planted["clip"], out), progress=False)
    facts = result.facts
    cands = {(c["step"], c["strength"]): c["style"] for c in facts["candidates"]}
    with capsys.disabled():
        print("\nplanted: step", PLANTED, "at 1.0 -> pick:", result.recommended, "; style by candidate:",
              {k: round(v, 4) for k, v in cands.items()})
        print("held-out check:", {m: (round(s["mean_diff"], 4), s["ci_low"], s["ci_high"], s["evidence"])
                                  for m, s in facts["evaluation_statistics"].items()})
        print(result.summary)
    assert result.recommended == (PLANTED, 1.0)
    assert max(cands, key=cands.get) == (PLANTED, 1.0)
    ev = facts["evaluation_statistics"]["style"]
    assert ev["a"] == "step 40 @ 1" and ev["b"] == "step 30 @ 1" and ev["mean_diff"] > 0
    assert (out / "planted.safetensors").read_bytes() == _step_file(planted["folder"], PLANTED).read_bytes()


@pytest.mark.slow
def test_pick_end_to_end_on_tiny_sd15(planted, tmp_path, capsys):
    """Real tiny-SD1.5 generation: every output, the sidecar as A1111 reads it, --overwrite."""
    from workbench.dispatch import run_recipe

    out = tmp_path / "pick"
    r = pick_recipe(planted["folder"], planted["clip"], out)
    result = run_recipe(r, progress=False)
    step, strength = result.recommended
    with capsys.disabled():
        print("\ntiny SD1.5 end to end:", result.summary)
    # outputs: report with the inline Pareto plot and verdict, CSV of all cells, provenance
    html = (out / "report.html").read_text()
    assert "<svg" in html and "Verdict" in html and f"Use step {step} at strength {strength:g}" in html
    assert "selection/grid" in html  # the selection grid image
    rows = (out / "scores.csv").read_text().splitlines()
    n_eval = 4 if (step, strength) == (40, 1.0) else 8
    assert len(rows) == 1 + 12 + n_eval and rows[0].startswith("phase,step,strength")
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["kind"] == "pick" and prov["extra"]["recommended"] == {"step": step, "strength": strength}
    assert not set(prov["seeds"]["selection"]) & set(prov["seeds"]["evaluation"])
    held = set(prov["extra"]["references"]["held_out"])
    assert len(held) == 2 and not held & set(prov["extra"]["references"]["selection"])
    # the chosen step under the LoRA's name, the sidecar as A1111 reads it, the user's fields kept
    lora = out / f"{NAME}.safetensors"
    assert lora.read_bytes() == _step_file(planted["folder"], step).read_bytes()
    meta = read_a1111_user_metadata(lora)
    assert meta["preferred weight"] == strength and meta["activation text"] == TRIGGER
    assert meta["prompt"] == f"<lora:{NAME}:{float(strength)}> {TRIGGER}"
    assert meta["sd version"] == "SD1" and meta["negative text"] == "blurry"
    assert meta["description"] == "my planted style" and meta["raw"]["civitai_id"] == 12345
    assert meta["notes"].startswith(f"my own note\nsecond line\nworkbench pick: step {step}")
    # never overwrite without --overwrite: the error names the file
    with pytest.raises(OutputExistsError, match=f"{NAME}.safetensors"):
        run_recipe(r, progress=False)
    again = run_recipe(r, progress=False, overwrite=True)  # every cell from the cell store
    assert again.recommended == (step, strength)
    assert read_a1111_user_metadata(lora)["notes"].count("workbench pick:") == 1


@pytest.mark.slow
def test_cli_builds_the_same_recipe_and_dry_runs(planted, tmp_path, capsys):
    from workbench import cli
    from workbench.cli_pick import recipe_from_args

    argv = ["pick", str(planted["folder"]), "--strengths", "0.6,1.0", "--selection-seeds", "1,2",
            "--evaluation-seeds", "11-13", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
            "--clip-model", "tiny-open-clip", "--clip-weights", str(planted["clip"]),
            "--out", str(tmp_path / "o"), "--sampling-steps", "1", "--cfg", "1", "--size", "64x64", "--dry-run"]
    args = cli.build_parser().parse_args(argv)
    r = recipe_from_args(args)
    assert isinstance(r, PickRecipe) and r.prompts == PROMPTS[:2]
    assert r.seeds.values("evaluation") == [11, 12, 13] and r.strength_values() == [0.6, 1.0]
    assert cli.main(argv) == 0
    assert "candidates: 3 step(s) × 2 strength(s)" in capsys.readouterr().out
    bad = argv[:argv.index("--evaluation-seeds") + 1] + ["2,3"] + argv[argv.index("--evaluation-seeds") + 2:]
    assert cli.main(bad) == 2  # refused as an invalid recipe, before any plan
    assert "seeds.evaluation: seed(s) [2] are also selection seeds" in capsys.readouterr().err


@pytest.mark.slow
def test_references_other_than_the_training_pictures(planted, tmp_path, capsys):
    """`--references DIR` (references.dir): the style is measured against those pictures, split
    the same way, instead of the training dataset; a folder with one picture is refused by name."""
    import shutil

    from workbench import cli

    refs = tmp_path / "my-pictures"
    refs.mkdir()
    for p in sorted((planted["root"] / "dataset" / "10_plnt").glob("*.png"))[:4]:
        shutil.copy(p, refs / f"mine-{p.name}")
    argv = ["pick", str(planted["folder"]), "--strengths", "1.0", "--references", str(refs),
            "--held-out-fraction", "0.5", "--clip-model", "tiny-open-clip", "--clip-weights",
            str(planted["clip"]), "--prompt", PROMPTS[0], "--out", str(tmp_path / "o"), "--size", "64x64",
            "--sampling-steps", "1", "--dry-run"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"references: 4 pictures in {refs}: 2 for choosing, 2 held out" in out, out
    for p in list(refs.iterdir())[1:]:
        p.unlink()
    assert cli.main(argv) == 1
    assert "references.dir:" in capsys.readouterr().out


@pytest.mark.slow
def test_train_page_panel_submits_a_pick_job(planted, monkeypatch):
    """The Train page's panel: the button runs the pick's dry run and queues a `pick` job whose
    recipe is the PickRecipe the panel describes (no worker is started here)."""
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    from workbench.app.config import ENV, AppConfig
    from workbench.jobs.store import JobStore
    from workbench.recipes.loader import parse_recipe

    root = planted["root"]
    cfg = AppConfig(home=root, roots={"models": [root], "outputs": [root]}, spawn_workers=False)
    monkeypatch.setenv(ENV, cfg.to_json())

    def page():
        from workbench.app.views import pick_panel

        pick_panel.render()

    at = AppTest.from_function(page, default_timeout=300).run()
    assert not at.exception, [e.value for e in at.exception]
    at.text_input(key="train.pick.training").set_value(str(planted["folder"]))
    at.text_input(key="train.pick.strengths").set_value("0.6, 1.0")
    at.text_input(key="train.pick.clip_model").set_value("tiny-open-clip")
    at.text_input(key="train.pick.clip").set_value(str(planted["clip"]))
    at.text_input(key="train.pick.selection").set_value("1")
    at.text_input(key="train.pick.evaluation").set_value("11-12")
    at.number_input(key="train.pick.size").set_value(64)
    at.button(key="train.pick.submit").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    jobs = JobStore(cfg.db).list(kind="pick")
    assert len(jobs) == 1
    recipe = parse_recipe(jobs[0].recipe, jobs[0].source)
    assert recipe.KIND == "pick" and recipe.training == planted["folder"]
    assert recipe.strength_values() == [0.6, 1.0] and recipe.scores.clip.weights == planted["clip"]
    # the fields both choosing panels share (app/views/choice_fields.py): empty ones keep the
    # recipe's defaults (shipped prompts, the training pictures), set ones are written as set
    assert recipe.seeds.values("evaluation") == [11, 12] and recipe.seeds.values("selection") == [1]
    assert recipe.generation.width == recipe.generation.height == 64
    assert recipe.prompts is None and recipe.references.dir is None


def test_pick_and_merge_search_share_one_shape_for_their_common_sections(tmp_path):
    """The sections both choosing recipes have are written the same way (workbench/recipes/
    choice.py): the same dict is valid in both and means the same thing."""
    from workbench.recipes.merge_search import MergeSearchRecipe

    common = {"prompts": ["a red bicycle"], "seeds": {"selection": "1-2", "evaluation": [7, 8]},
              "references": {"dir": str(tmp_path), "held_out_fraction": 0.25},
              "generation": {"sampler": "Euler", "steps": 3, "cfg": 2.0, "width": 64, "height": 64},
              "scores": {"clip": {"model": "tiny"}, "adherence_margin": 2.5}}
    pick = PickRecipe.model_validate({"training": "t", **common})
    search = MergeSearchRecipe.model_validate({"inputs": {"A": "a", "B": "b"}, "output": {"dir": "o"},
                                               **common})
    for section in ("seeds", "references", "generation"):
        assert getattr(pick, section).model_dump() == getattr(search, section).model_dump(), section
    assert pick.scores.clip == search.scores.clip and search.scores.adherence == "constraint"
    assert pick.scores.adherence_margin == search.scores.adherence_margin == 2.5
    assert pick.seeds.values("selection") == search.seeds.values("selection") == [1, 2]
    assert pick.prompt_values() == search.prompt_values() == ["a red bicycle"]
    for kind in (PickRecipe, MergeSearchRecipe):  # the old spellings are refused, not ignored
        with pytest.raises(ValueError, match="selection_seeds"):
            kind.model_validate({"training": "t", "inputs": {"A": "a", "B": "b"}, "output": {"dir": "o"},
                                 "selection_seeds": [1]} if kind is MergeSearchRecipe else
                                {"training": "t", "selection_seeds": [1]})


def test_prompts_file_is_read_like_the_shipped_set(tmp_path):
    """`--prompts-file`: one prompt per line, blank lines and # comments skipped, after any
    --prompt (recipes/choice.prompt_lines, as for workbench/data/pick_prompts.txt)."""
    from workbench import cli
    from workbench.cli_pick import recipe_from_args

    listed = tmp_path / "prompts.txt"
    listed.write_text("# my prompts\n  a red bicycle  \n\na bowl of lemons\n", encoding="utf-8")
    args = cli.build_parser().parse_args(["pick", str(tmp_path / "run"), "--prompt", "a kite",
                                          "--prompts-file", str(listed)])
    assert recipe_from_args(args).prompts == ["a kite", "a red bicycle", "a bowl of lemons"]
