"""Dashboard pages under Streamlit's AppTest: each page renders, shows the recipe validator's
messages next to the fields, refuses paths outside the configured folders, saves and loads recipe
files, and a submit creates a job in the store (no worker is started here)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from workbench.app.config import ENV, AppConfig  # noqa: E402
from workbench.jobs.store import JobStore  # noqa: E402
from workbench.recipes.loader import load_recipe, parse_recipe  # noqa: E402
from workbench.dispatch import register_handler  # noqa: E402

from helpers.app_pages import make_workspace, open_page  # noqa: E402

PAGES = {"models": "Models", "merge": "Merge", "train": "Train", "compare": "Compare",
         "generate": "Generate", "jobs": "Jobs"}


@pytest.fixture
def home(tmp_path, tiny_sd15, monkeypatch) -> Path:
    return make_workspace(tmp_path, tiny_sd15, monkeypatch)  # helpers/app_pages.py


@pytest.fixture
def fake_engines():
    """Train/generate/grid engines are other issues' work: the dry run must not depend on them."""
    for kind in ("train", "generate", "grid"):
        register_handler(kind, lambda recipe, **kw: [])
    yield
    for kind in ("train", "generate", "grid"):
        register_handler(kind, None)


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def jobs(home: Path) -> list:
    return JobStore(home / ".workbench" / "jobs.sqlite").list()


def dry_run_and_submit(at: AppTest, prefix: str) -> AppTest:
    at.button(key=f"{prefix}.dry").click().run()
    assert not at.exception, [e.value for e in at.exception]
    plan = "\n".join(c.value for c in at.code)
    assert "problems: none" in plan, plan + "\n" + "\n".join(errors(at))
    assert not at.button(key=f"{prefix}.submit").disabled
    at.button(key=f"{prefix}.submit").click().run()
    assert not at.exception
    return at


@pytest.mark.slow
@pytest.mark.parametrize("page", list(PAGES))
def test_every_page_renders(home, page):
    at = open_page(page)
    assert at.title[0].value == PAGES[page]
    assert not errors(at)  # nothing is flagged before the user acts
    if page not in ("models", "jobs"):
        prefix = "grid" if page == "compare" else page
        assert at.button(key=f"{prefix}.submit").disabled  # no dry run yet: no submit


def test_merge_errors_show_next_to_fields_and_nothing_is_submitted(home, tmp_path_factory):
    outside = tmp_path_factory.mktemp("elsewhere") / "x.safetensors"
    at = open_page("merge")
    at.text_input(key="merge.model0.path").set_value("models/A.safetensors")
    at.text_input(key="merge.model1.path").set_value(str(outside))
    at.text_input(key="merge.step0.inputs").set_value("A, Z")
    at.number_input(key="merge.step0.alpha").set_value(None)
    at.button(key="merge.dry").click().run()
    found = errors(at)
    assert any("is outside the dashboard's folders" in e and "--models" in e for e in found)
    assert any("unknown input 'Z'" in e for e in found)
    assert any("required by method weighted_sum" in e for e in found)
    assert at.button(key="merge.submit").disabled
    assert jobs(home) == []


@pytest.mark.slow
def test_merge_submit_creates_a_job_with_a_validated_recipe(home):
    at = open_page("merge")
    at.text_input(key="merge.name").set_value("half")
    at.text_input(key="merge.model0.path").set_value("models/A.safetensors")
    at.text_input(key="merge.model1.path").set_value("models/B.safetensors")
    at.number_input(key="merge.step0.alpha").set_value(0.25)
    at.text_input(key="merge.out.path").set_value("outputs/merges/half.safetensors")
    dry_run_and_submit(at, "merge")
    (job,) = jobs(home)
    assert job.kind == "merge" and job.status == "queued" and not job.gpu
    assert any(f"job #{job.id} queued" in s.value for s in at.success)
    recipe = parse_recipe(job.recipe)
    assert recipe.models["A"] == home / "models" / "A.safetensors"
    assert recipe.steps[0].alpha == 0.25
    assert recipe.output.path == home / "outputs" / "merges" / "half.safetensors"


@pytest.mark.slow
def test_block_weight_editor_fills_from_preset(home):
    at = open_page("merge")
    at.selectbox(key="merge.step0.method").set_value("block_weighted").run()
    at.selectbox(key="merge.step0.blocks_mode").set_value("per block").run()
    at.selectbox(key="merge.step0.fill").set_value("GRAD_V").run()
    assert at.number_input(key="merge.step0.b.IN00").value == 1.0  # GRAD_V starts at 1 on IN00
    at.number_input(key="merge.step0.b.OUT11").set_value(0.3).run()
    yaml_text = "\n".join(c.value for c in at.code if "kind: merge" in c.value)
    blocks = yaml.safe_load(yaml_text)["steps"][0]["blocks"]
    values = [float(v) for v in blocks.split(",")]
    assert len(values) == 26 and values[1] == 1.0 and values[-1] == 0.3
    at.selectbox(key="merge.step0.blocks_mode").set_value("preset").run()
    at.selectbox(key="merge.step0.blocks_preset").set_value("FLAT_25").run()
    assert "blocks: FLAT_25" in "\n".join(c.value for c in at.code)


@pytest.mark.slow
def test_recipe_file_loads_into_the_form_and_saves_back_unchanged(home):
    src = home / "recipes" / "two-step.yaml"
    src.write_text(
        "kind: merge\nname: two-step\ndescription: tuned then blocks\n"
        "models: {A: ../models/A.safetensors, B: ../models/B.safetensors}\n"
        "steps:\n"
        "  - {id: tuned, method: add_difference, inputs: [A, B, A], alpha: 0.7}\n"
        "  - {id: final, method: block_weighted, inputs: [tuned, A], blocks: GRAD_V}\n"
        "output: {path: ../outputs/merges/two.safetensors, dtype: fp16, prune: true}\n")
    at = open_page("merge")
    at.text_input(key="merge.file").set_value("recipes/two-step.yaml")
    at.button(key="merge.load").click().run()
    assert at.text_input(key="merge.step1.id").value == "final"
    assert at.selectbox(key="merge.step0.method").value == "add_difference"
    assert at.checkbox(key="merge.out.prune").value is True
    assert at.text_input(key="merge.model0.path").value == "models/A.safetensors"
    at.text_input(key="merge.file").set_value("recipes/copy.yaml")
    at.button(key="merge.save").click().run()
    assert any("saved" in s.value for s in at.success), errors(at)
    before, after = load_recipe(src), load_recipe(home / "recipes" / "copy.yaml")
    assert before.model_dump() == after.model_dump()
    # a recipe of another kind is refused with a message, the form stays as it was
    (home / "recipes" / "gen.yaml").write_text(
        "kind: generate\nmodel: ../models/A.safetensors\nprompt: x\noutput: {dir: ../outputs}\n")
    at.text_input(key="merge.file").set_value("recipes/gen.yaml")
    at.button(key="merge.load").click().run()
    assert any("is a generate recipe; this page edits merge recipes" in e for e in errors(at))
    assert at.text_input(key="merge.step1.id").value == "final"


@pytest.mark.slow
def test_train_page_checks_dataset_validates_and_submits(home, fake_engines):
    at = open_page("train")
    at.text_input(key="train.base").set_value("models/A.safetensors")
    at.text_input(key="train.dataset").set_value("datasets/style")
    at.button(key="train.check_btn").click().run()
    report = "\n".join(c.value for c in at.code)
    assert "2 usable images" in report
    at.text_input(key="train.resolution").set_value("500")
    at.button(key="train.dry").click().run()
    assert any("multiple of 8" in e for e in errors(at))
    at.text_input(key="train.resolution").set_value("64")
    at.number_input(key="train.max_steps").set_value(20)
    dry_run_and_submit(at, "train")
    (job,) = jobs(home)
    recipe = parse_recipe(job.recipe)
    assert job.kind == "train" and job.gpu and recipe.max_steps == 20
    assert recipe.dataset == home / "datasets" / "style"


@pytest.mark.slow
def test_generate_page_validates_and_submits(home, fake_engines):
    at = open_page("generate")
    at.text_input(key="generate.model").set_value("models/A.safetensors")
    at.text_area(key="generate.prompt").set_value("a lighthouse")
    at.text_area(key="generate.loras").set_value("models/B.safetensors:abc")
    at.button(key="generate.dry").click().run()
    assert any("bad LoRA weight 'abc'" in e for e in errors(at))
    at.text_area(key="generate.loras").set_value("")
    at.number_input(key="generate.count").set_value(2)
    dry_run_and_submit(at, "generate")
    (job,) = jobs(home)
    assert parse_recipe(job.recipe).count == 2 and job.kind == "generate"


@pytest.mark.slow
def test_compare_page_validates_and_submits(home, fake_engines):
    at = open_page("compare")
    at.text_input(key="grid.model").set_value("models/A.safetensors")
    at.selectbox(key="grid.x.axis").set_value("cfg").run()
    at.text_area(key="grid.x.values").set_value("3-x")
    at.button(key="grid.dry").click().run()
    assert any("bad range '3-x'" in e for e in errors(at))
    at.text_area(key="grid.x.values").set_value("3-7 [3]")
    at.selectbox(key="grid.y.axis").set_value("prompt").run()
    at.text_area(key="grid.y.values").set_value("a house\na tree")
    at.checkbox(key="grid.clip").set_value(False)
    dry_run_and_submit(at, "grid")
    (job,) = jobs(home)
    recipe = parse_recipe(job.recipe)
    assert recipe.cell_count() == 3 * 2 * 3 and job.gpu


def test_compare_z_axis_recipe_loads_into_the_form_and_saves_back_unchanged(home):
    src = home / "recipes" / "xyz.yaml"
    src.write_text(
        "kind: grid\nname: xyz\ndefaults: {model: ../models/A.safetensors, prompt: a house}\n"
        "x: {axis: cfg, values: [3.0, 7.0]}\n"
        "y: {axis: sampler, values: [Euler a, DDIM]}\n"
        "z: {axis: steps, values: 10-20 (+5), label: Steps}\n"
        "seeds: [1, 2]\noutput: {dir: ../outputs/grids/xyz}\n")
    at = open_page("compare")
    at.text_input(key="grid.file").set_value("recipes/xyz.yaml")
    at.button(key="grid.load").click().run()
    assert any("loaded" in s.value for s in at.success), errors(at)
    assert at.selectbox(key="grid.z.axis").value == "steps"
    assert at.text_area(key="grid.z.values").value == "10-20 (+5)"
    assert yaml.safe_load(at.text_area(key="grid.extra").value) == {"z": {"label": "Steps"}}
    at.text_input(key="grid.file").set_value("recipes/xyz-copy.yaml")
    at.button(key="grid.save").click().run()
    assert any("saved" in s.value for s in at.success), errors(at)
    before, after = load_recipe(src), load_recipe(home / "recipes" / "xyz-copy.yaml")
    assert after.model_dump() == before.model_dump()
    assert after.cell_count() == 2 * 2 * 3 * 2


@pytest.mark.slow
def test_compare_z_axis_errors_show_under_the_z_axis(home, fake_engines):
    at = open_page("compare")
    at.text_input(key="grid.model").set_value("models/A.safetensors")
    at.selectbox(key="grid.x.axis").set_value("cfg").run()
    at.text_area(key="grid.x.values").set_value("3, 7")
    at.selectbox(key="grid.z.axis").set_value("steps").run()
    at.text_area(key="grid.z.values").set_value("10-x")
    at.button(key="grid.dry").click().run()
    found = errors(at)
    # claimed by the z widgets (unclaimed problems would be prefixed with the field name "z")
    assert any(e.startswith("values") and "bad range '10-x'" in e for e in found), found
    assert not any(e.startswith("z") for e in found), found
    assert at.button(key="grid.submit").disabled
    at.text_area(key="grid.z.values").set_value("10-20 (+5)")
    at.button(key="grid.dry").click().run()
    assert "a z axis needs a y axis" in errors(at), errors(at)
    assert at.button(key="grid.submit").disabled
    at.selectbox(key="grid.y.axis").set_value("prompt").run()
    at.text_area(key="grid.y.values").set_value("a house\na tree")
    at.checkbox(key="grid.clip").set_value(False)
    dry_run_and_submit(at, "grid")
    (job,) = jobs(home)
    recipe = parse_recipe(job.recipe)
    assert recipe.z.axis == "steps" and recipe.cell_count() == 2 * 2 * 3 * 3


@pytest.mark.slow
def test_jobs_page_shows_progress_log_results_and_cancels(home):
    store = JobStore(home / ".workbench" / "jobs.sqlite")
    done = store.submit("merge", "kind: merge", name="old")
    store.claim(pid=os.getpid())
    out = home / "outputs" / "old.safetensors"
    out.write_bytes(b"0" * 10)
    store.finish(done, "done", [str(out)])
    running = store.submit("merge", "kind: merge", name="busy")
    store.claim(pid=os.getpid())
    store.report(running, progress=0.4, eta_s=75, stage="merging")
    store.log(running, "read 120 of 300 tensors")
    at = open_page("jobs")
    assert at.selectbox(key="jobs.selected").value == running  # newest first
    bar = at.get("progress")[0]
    assert "merging: 40% · ETA 1 min 15 s" in bar.proto.text
    assert "read 120 of 300 tensors" in "\n".join(c.value for c in at.code)
    at.button(key=f"jobs.cancel.{running}").click().run()
    assert store.get(running).cancel_requested
    at.selectbox(key="jobs.selected").set_value(done).run()
    assert any(str(out) in m.value for m in at.markdown)


def test_models_page_lists_models_and_lora_trigger_words(home):
    import torch
    from safetensors.torch import save_file

    tags = {"10_mystyle": {"mystyle": 10, "red house": 4, "tree": 2}}
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight":
               torch.zeros(4, 8)}, home / "models" / "style.safetensors",
              metadata={"ss_tag_frequency": json.dumps(tags), "ss_output_name": "mystyle"})
    at = open_page("models")
    table = at.dataframe[0].value
    assert {"A.safetensors", "B.safetensors", "style.safetensors"} <= set(table["name"])
    assert set(table[table["name"] == "A.safetensors"]["arch"]) == {"sd15"}
    at.selectbox(key="models.selected").set_value(str(home / "models" / "style.safetensors")).run()
    words = [m.value for m in at.markdown if "Trigger words" in m.value]
    assert words and "`mystyle`" in words[0] and "`red house`" in words[0]


def test_cli_app_flags_become_the_dashboard_config(tmp_path, monkeypatch):
    import workbench.app
    from workbench.cli import main
    from workbench.errors import WorkbenchError

    seen = []
    monkeypatch.setattr(workbench.app, "launch", lambda **kw: seen.append(kw) or 0)
    extra = tmp_path / "more-models"
    assert main(["app", "--home", str(tmp_path), "--models", str(extra), "--workers", "3",
                 "--no-browser", "--port", "8600"]) == 0
    (kw,) = seen
    cfg = kw["config"]
    assert kw["port"] == 8600 and kw["open_browser"] is False and cfg.max_workers == 3
    assert cfg.roots["models"] == [extra] and cfg.roots["outputs"] == [tmp_path / "outputs"]
    assert cfg.db == tmp_path / ".workbench" / "jobs.sqlite"
    assert cfg.check("models/../more-models/x.safetensors", ("models",)) == extra / "x.safetensors"
    with pytest.raises(WorkbenchError, match=r"outside the dashboard's folders \(models: .*"
                       r"more-models\); start `workbench app --models DIR`"):
        cfg.check("/etc/passwd", ("models",))
    # a small config file; flags still override it
    (tmp_path / "wb.yaml").write_text("home: .\nmodels: [a, b]\noutputs: out\nworkers: 1\n")
    assert main(["app", "--config", str(tmp_path / "wb.yaml"), "--outputs", str(extra)]) == 0
    cfg = seen[-1]["config"]
    assert cfg.roots["models"] == [tmp_path / "a", tmp_path / "b"]
    assert cfg.roots["outputs"] == [extra] and cfg.max_workers == 1
    (tmp_path / "bad.yaml").write_text("modles: [a]\n")
    assert main(["app", "--config", str(tmp_path / "bad.yaml")]) == 2


REPO = Path(__file__).resolve().parents[1]
DEMOS = {"merge-demo.yaml": ("merge", "merge"), "merge-lora-demo.yaml": ("merge", "merge"),
         "train-demo.yaml": ("train", "train"), "grid-demo.yaml": ("compare", "grid"),
         "generate-demo.yaml": ("generate", "generate")}


@pytest.mark.slow
@pytest.mark.parametrize("demo", list(DEMOS))
def test_every_demo_recipe_loads_into_its_form_and_saves_back_the_same(demo, tmp_path,
                                                                          monkeypatch):
    page, prefix = DEMOS[demo]
    roots = {k: [REPO] for k in ("models", "outputs", "datasets")}
    roots["recipes"] = [REPO / "recipes", tmp_path]
    monkeypatch.setenv(ENV, AppConfig(home=REPO, roots=roots, spawn_workers=False,
                                      db=tmp_path / "jobs.sqlite").to_json())
    at = open_page(page)
    at.text_input(key=f"{prefix}.file").set_value(f"recipes/{demo}")
    at.button(key=f"{prefix}.load").click().run()
    assert any("loaded" in s.value for s in at.success), errors(at)
    at.text_input(key=f"{prefix}.file").set_value(str(tmp_path / "copy.yaml"))
    at.button(key=f"{prefix}.save").click().run()
    assert any("saved" in s.value for s in at.success), errors(at)
    before, after = load_recipe(REPO / "recipes" / demo), load_recipe(tmp_path / "copy.yaml")
    assert after.model_dump() == before.model_dump()


@pytest.mark.slow
def test_train_page_shows_loss_curve_and_samples_of_a_running_job(home):
    from PIL import Image

    out = home / "outputs" / "loras" / "my-style"
    (out / "samples").mkdir(parents=True)
    Image.new("RGB", (32, 32), "red").save(out / "samples" / "step-10.png")
    text = (f"kind: train\nname: my-style\nbase: {home}/models/A.safetensors\n"
            f"dataset: {home}/datasets/style\noutput: {{dir: {out}}}\n")
    store = JobStore(home / ".workbench" / "jobs.sqlite")
    job = store.submit("train", text, name="my-style")
    store.claim(pid=os.getpid())
    store.report(job, progress=0.5, eta_s=30, stage="training")
    for step, loss in ((1, 0.9), (2, 0.7), (3, 0.6)):
        store.add_metrics(job, step, {"loss": loss})
    at = open_page("train")
    assert at.selectbox(key="train.results_job").value == job
    assert "training: 50% · ETA 30 s" in at.get("progress")[0].proto.text
    charts = at.get("vega_lite_chart")
    assert charts, [e.type for e in at.main]
    images = at.get("image")
    assert images and "step-10.png" in str(images[0].proto)


@pytest.mark.slow
def test_compare_page_shows_grid_scores_and_statistics(home):
    from PIL import Image

    out = home / "outputs" / "grids" / "g"
    out.mkdir(parents=True)
    Image.new("RGB", (64, 32), "blue").save(out / "grid.png")
    (out / "scores.csv").write_text("x,y,seed,clip\nA,house,1,21.5\nB,house,1,23.0\n")
    (out / "scores.json").write_text(json.dumps({"statistics": {"x": {"A vs B": {
        "mean_diff": 1.5, "win_rate": 1.0}}}, "cells": []}))
    store = JobStore(home / ".workbench" / "jobs.sqlite")
    job = store.submit("grid", "kind: grid", name="g")
    store.claim(pid=os.getpid())
    store.finish(job, "done", [str(out / "grid.png"), str(out / "scores.csv"),
                               str(out / "scores.json")])
    at = open_page("compare")
    assert at.selectbox(key="grid.results_job").value == job
    table = at.dataframe[0].value
    assert list(table["clip"]) == ["21.5", "23.0"]
    # statistics in a shape this page does not know: no raw JSON tree, a plain line instead
    assert not at.json
    assert any("no statistics" in c.value for c in at.caption)
    assert "grid.png" in str(at.get("image")[0].proto)


def test_paths_from_the_yaml_box_are_checked_too(home, tmp_path_factory):
    outside = tmp_path_factory.mktemp("elsewhere")
    at = open_page("merge")
    at.text_input(key="merge.model0.path").set_value("models/A.safetensors")
    at.text_input(key="merge.model1.path").set_value("models/B.safetensors")
    at.text_area(key="merge.extra").set_value(f"output: {{path: {outside}/x.safetensors}}")
    at.button(key="merge.dry").click().run()
    # shown under the output widget, though the path came from the YAML box
    assert any(e.startswith(f"{outside}/x.safetensors is outside the dashboard's folders")
               and "--outputs" in e for e in errors(at)), errors(at)
    assert at.button(key="merge.submit").disabled


def test_jobs_page_deletes_finished_jobs_but_not_running_ones(home):
    store = JobStore(home / ".workbench" / "jobs.sqlite")
    done = store.submit("merge", "kind: merge", name="old")
    store.claim(pid=os.getpid())
    out = home / "outputs" / "old.safetensors"
    out.write_bytes(b"0" * 10)
    store.log(done, "wrote old.safetensors")
    store.finish(done, "done", [str(out)])
    running = store.submit("merge", "kind: merge", name="busy")
    store.claim(pid=os.getpid())
    at = open_page("jobs")
    assert at.selectbox(key="jobs.selected").value == running
    keys = {b.key for b in at.button}
    assert f"jobs.delete.{running}" not in keys and f"jobs.cancel.{running}" in keys
    at.selectbox(key="jobs.selected").set_value(done).run()
    assert f"jobs.cancel.{done}" not in {b.key for b in at.button}
    at.button(key=f"jobs.delete.{done}").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert [j.id for j in jobs(home)] == [running]
    assert list(at.dataframe[0].value["id"]) == [running]
    assert any(f"job #{done} deleted" in i.value for i in at.info)
    assert store.log_tail(done) == [] and out.exists()  # the log goes, the output file stays
    assert at.selectbox(key="jobs.selected").value == running
