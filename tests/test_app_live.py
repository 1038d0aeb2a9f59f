"""The dashboard keeps up (issue #14, item 3): job panels refresh by themselves while a job runs
and stop when none does, a failed job shows "failed" at the next refresh, one bar shows the whole
job with the phase beside it, the form survives a reload, pickers fill path fields, α is greyed
out under block weights, Compare shows grid + verdict + tables, and a stuck worker can be stopped
by force.

AppTest never fires `run_every` timers (streamlit/testing/v1: a run is always a full script run),
so a "refresh" here is one more `at.run()`, which runs the fragment's body the same way its timer
would; that the section was declared with `run_every` is read from the interval app/live.py
records per section.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from workbench import progress as wb_progress  # noqa: E402
from workbench.app import grid_results, live  # noqa: E402
from workbench.app.config import AppConfig  # noqa: E402
from workbench.app.views.merge import ALPHA_WITH_BLOCKS  # noqa: E402
from workbench.grid import report, stats  # noqa: E402
from workbench.jobs.store import JobStore  # noqa: E402
from workbench.jobs.worker import ProgressWriter  # noqa: E402

from helpers.app_pages import make_workspace, open_page  # noqa: E402


@pytest.fixture
def home(tmp_path, tiny_sd15, monkeypatch) -> Path:
    return make_workspace(tmp_path, tiny_sd15, monkeypatch)  # helpers/app_pages.py


def store_of(home: Path) -> JobStore:
    return JobStore(home / ".workbench" / "jobs.sqlite")


def bar(at: AppTest):
    """(value 0..100, text) of the page's first progress bar."""
    proto = at.get("progress")[0].proto
    return proto.value, proto.text


def declared(at: AppTest, name: str):
    return at.session_state[live.DECLARED][name]


def running_job(home: Path, kind: str, text: str = "", pid: int | None = None) -> int:
    store = store_of(home)
    job = store.submit(kind, text or f"kind: {kind}", name=f"my-{kind}")
    store.claim(pid=pid or os.getpid())
    return job


# --------------------------------------------------------------------------------------------------
# 1. refreshing by themselves


@pytest.mark.slow  # several AppTest runs: over 3 s on the shared 2-core machine
def test_train_progress_moves_without_a_click_and_the_timer_stops_when_done(home, monkeypatch):
    import streamlit

    asked = []  # run_every of every st.fragment the pages declare
    real_fragment = streamlit.fragment

    def fragment(func=None, *, run_every=None, **kw):
        asked.append(run_every)
        return real_fragment(func, run_every=run_every, **kw)

    monkeypatch.setattr(streamlit, "fragment", fragment)
    job = running_job(home, "train")
    store = store_of(home)
    store.report(job, progress=0.25, stage="training", overall=0.25)
    at = open_page("train")
    assert live.REFRESH_S in asked  # Streamlit itself was asked for the 2 s timer
    value, text = bar(at)
    assert value == 25 and text.startswith(f"#{job}: 25% of the job · training 25% · ETA")
    assert declared(at, "train") == live.REFRESH_S  # the live section has a 2 s timer
    store.report(job, progress=0.75, overall=0.75)  # the worker moves on; nobody clicks
    at.run()  # what the fragment's timer does
    assert bar(at)[0] == 75 and "75% of the job" in bar(at)[1]
    store.finish(job, "done")
    asked.clear()
    at.run()
    assert bar(at)[0] == 100 and "done" in bar(at)[1]
    assert declared(at, "train") is None and asked == [None]  # nothing runs: no timer


def test_a_failed_grid_shows_failed_and_its_error_at_the_next_refresh(home):
    job = running_job(home, "grid")
    at = open_page("compare")
    assert "running" in bar(at)[1] and declared(at, "compare") == live.REFRESH_S
    store_of(home).finish(job, "failed", error="CLIP weights not found: models/clip.safetensors")
    at.run()
    assert "failed" in bar(at)[1]
    assert any("CLIP weights not found" in e.value for e in at.error)
    assert declared(at, "compare") is None


@pytest.mark.slow
def test_a_job_whose_worker_died_is_failed_by_the_page_not_left_running(home):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a pid that no longer exists
    job = running_job(home, "merge", pid=proc.pid)
    at = open_page("merge")  # the Merge page's job status section
    assert store_of(home).get(job).status == "failed"
    assert "failed" in bar(at)[1]
    assert any(f"worker process {proc.pid} died" in e.value for e in at.error)


@pytest.mark.slow  # several AppTest runs: over 3 s on the shared 2-core machine
def test_jobs_page_and_merge_page_refresh_only_while_something_runs(home):
    """Form pages refresh only while their kind runs; the Jobs page also looks every IDLE_S
    seconds while nothing does, so a job queued elsewhere shows up without a reload."""
    at = open_page("jobs")
    assert declared(at, "jobs") == live.IDLE_S  # no jobs: the slow look for new ones
    job = running_job(home, "merge")
    at.run()  # what the idle timer does: the job is listed and the fast timer declared
    assert declared(at, "jobs") == live.REFRESH_S
    store_of(home).report(job, progress=0.5, overall=0.5, stage="merging 10 tensors")
    at.run()
    assert bar(at)[0] == 50
    at = open_page("merge")
    assert declared(at, "merge") == live.REFRESH_S and bar(at)[0] == 50


# --------------------------------------------------------------------------------------------------
# 3. one bar for the whole job


def test_overall_fraction_folds_a_nested_phase_into_the_jobs_step(home, monkeypatch):
    """"sampling 90 %" at training step 4 of 12 is ~33 % of the job, not 90 %."""
    monkeypatch.setattr("workbench.jobs.worker.REPORT_EVERY_S", 0.0)  # every event is written
    events: list[wb_progress.ProgressEvent] = []
    job = running_job(home, "train")
    writer = ProgressWriter(store_of(home), job)

    def sink(event):
        events.append(event)
        writer(event)

    with wb_progress.sink(sink):
        with wb_progress.task("training", 12, "step", bar=False) as train:
            train.advance(3)  # steps 1-3 done; step 4's samples are drawn before it is counted
            with wb_progress.task("sampling", 20, "step", bar=False) as sampling:
                sampling.advance(18)
    last_sampling = [e for e in events if e.desc == "sampling"][-1]
    assert last_sampling.done / last_sampling.total == pytest.approx(0.9)
    assert last_sampling.overall == pytest.approx((3 + 0.9) / 12)
    stored = store_of(home).get(job)
    assert stored.progress == pytest.approx(0.9) and stored.overall == pytest.approx(0.325)
    at = open_page("train")
    value, text = bar(at)
    assert value == 32 and text.startswith(f"#{job}: 32% of the job · sampling 90%")


def test_overall_fraction_never_goes_back_for_a_phase_after_the_main_task(home, monkeypatch):
    monkeypatch.setattr("workbench.jobs.worker.REPORT_EVERY_S", 0.0)
    job = running_job(home, "train")
    writer = ProgressWriter(store_of(home), job)
    with wb_progress.sink(writer):
        with wb_progress.task("training", 4, "step", bar=False) as t:
            t.advance(4)
        with wb_progress.task("sampling", 10, "step", bar=False) as s:  # the last samples
            s.advance(2)
    stored = store_of(home).get(job)
    assert stored.overall == 1.0 and stored.progress == pytest.approx(0.2)


def test_grid_cells_fold_each_pictures_sampling():
    events = []
    with wb_progress.sink(events.append):
        with wb_progress.task("grid", 8, "cell", bar=False) as grid:
            grid.advance(2)
            with wb_progress.task("sampling", 10, "step", bar=False) as s:
                s.advance(5)
    assert events[-1].overall == pytest.approx((2 + 0.5) / 8)
    assert wb_progress._open_tasks() == []  # closed tasks leave the stack


# --------------------------------------------------------------------------------------------------
# 2. the form survives a reload


@pytest.mark.slow  # several AppTest runs: over 3 s on the shared 2-core machine
def test_merge_form_survives_a_reload(home):
    at = open_page("merge")
    at.text_input(key="merge.name").set_value("kept")
    at.text_input(key="merge.model0.path").set_value("models/A.safetensors")
    at.text_input(key="merge.model1.path").set_value("models/B.safetensors")
    at.number_input(key="merge.step0.alpha").set_value(0.3)
    at.text_area(key="merge.extra").set_value("description: from the YAML box")
    at.run()
    draft = home / ".workbench" / "drafts" / "merge.yaml"
    assert yaml.safe_load(draft.read_text())["name"] == "kept"
    again = open_page("merge")  # a new session: what a browser reload gets
    assert again.text_input(key="merge.name").value == "kept"
    assert again.text_input(key="merge.model1.path").value == "models/B.safetensors"
    assert again.number_input(key="merge.step0.alpha").value == 0.3
    assert again.text_input(key="merge.description").value == "from the YAML box"
    again.button(key="merge.reset").click().run()
    assert not draft.exists()
    assert again.text_input(key="merge.name").value == "my-merge"  # the default


@pytest.mark.slow  # several AppTest runs: over 3 s on the shared 2-core machine
def test_train_form_survives_a_reload_with_its_sample_settings(home):
    at = open_page("train")
    at.text_input(key="train.base").set_value("models/A.safetensors")
    at.checkbox(key="train.samples.on").check().run()
    at.number_input(key="train.samples.steps").set_value(6)
    at.number_input(key="train.samples.every").set_value(4)
    at.text_area(key="train.samples.prompts").set_value("a red house")
    at.number_input(key="train.max_steps").set_value(12).run()
    again = open_page("train")
    assert again.checkbox(key="train.samples.on").value is True
    assert again.number_input(key="train.samples.steps").value == 6
    assert again.number_input(key="train.samples.every").value == 4
    assert again.text_input(key="train.base").value == "models/A.safetensors"


# --------------------------------------------------------------------------------------------------
# 5. sample frequency and steps


def test_train_sample_frequency_and_steps_reach_the_recipe(home):
    at = open_page("train")
    at.checkbox(key="train.samples.on").check().run()
    at.number_input(key="train.max_steps").set_value(12)
    at.number_input(key="train.samples.every").set_value(5)
    at.number_input(key="train.samples.steps").set_value(4)
    at.text_area(key="train.samples.prompts").set_value("a red house\na tree").run()
    recipe = yaml.safe_load(next(c.value for c in at.code if "kind: train" in c.value))
    assert recipe["samples"]["every"] == 5 and recipe["samples"]["steps"] == 4
    # 12 steps, every 5: after 5, 10 and at the end = 3 rounds x 2 prompts x 4 steps
    assert any("3 sample rounds × 2 prompt(s) × 4 sampling steps = 24" in c.value
               for c in at.caption)


def test_train_resume_box_writes_resume_and_comes_back_from_the_recipe(home):
    """A training stopped from the dashboard (or by Ctrl-C) is told to continue with `resume:`;
    the Train page can say so too, and a recipe with `resume:` loads with the box ticked."""
    from workbench.app.views import train as train_view

    at = open_page("train")
    at.text_input(key="train.out.dir").set_value("outputs/loras/my-style").run()
    recipe = yaml.safe_load(next(c.value for c in at.code if "kind: train" in c.value))
    assert "resume" not in recipe
    at.checkbox(key="train.out.resume").check().run()
    recipe = yaml.safe_load(next(c.value for c in at.code if "kind: train" in c.value))
    assert recipe["resume"] == recipe["output"]["dir"] and recipe["resume"].endswith("my-style")
    cfg = AppConfig(home=home)
    state = train_view.from_data(dict(recipe, output=dict(recipe["output"])), cfg)
    assert state["out.resume"] is True
    assert train_view.from_data({k: v for k, v in recipe.items() if k != "resume"}, cfg)["out.resume"] is False


# --------------------------------------------------------------------------------------------------
# 4. pickers


@pytest.mark.slow
def test_pickers_fill_paths_and_show_the_architecture(home):
    at = open_page("train")
    pick = at.selectbox(key="train.base.pick")
    assert "models/A.safetensors · sd15 checkpoint" in pick.options, pick.options
    pick.set_value(str(home / "models" / "B.safetensors")).run()
    assert at.text_input(key="train.base").value == "models/B.safetensors"
    data = at.selectbox(key="train.dataset.pick")
    assert "datasets/style · 2 images" in data.options
    data.set_value(str(home / "datasets" / "style")).run()
    assert at.text_input(key="train.dataset").value == "datasets/style"
    at.text_input(key="train.base").set_value("models/A.safetensors").run()  # still free text
    assert at.text_input(key="train.base").value == "models/A.safetensors"
    at = open_page("merge")
    at.selectbox(key="merge.model1.path.pick").set_value(str(home / "models" / "A.safetensors"))
    at.run()
    assert at.text_input(key="merge.model1.path").value == "models/A.safetensors"


# --------------------------------------------------------------------------------------------------
# 6. alpha under block weights


@pytest.mark.slow  # several AppTest runs: over 3 s on the shared 2-core machine
def test_alpha_is_greyed_out_and_explained_when_block_weights_are_set(home):
    at = open_page("merge")
    assert not at.number_input(key="merge.step0.alpha").disabled
    assert ALPHA_WITH_BLOCKS not in [c.value for c in at.caption]
    at.selectbox(key="merge.step0.blocks_mode").set_value("preset").run()
    assert at.number_input(key="merge.step0.alpha").disabled
    assert ALPHA_WITH_BLOCKS in [c.value for c in at.caption]
    at.selectbox(key="merge.step0.blocks_mode").set_value("none").run()
    assert not at.number_input(key="merge.step0.alpha").disabled


# --------------------------------------------------------------------------------------------------
# 7. Compare results


def grid_files(out: Path) -> list[Path]:
    """A small finished grid: model A vs B over 3 prompts, CLIP scores, real statistics."""
    from PIL import Image

    out.mkdir(parents=True)
    Image.new("RGB", (64, 32), "blue").save(out / "grid.png")
    a, b = [20.0, 21.0, 22.5], [22.0, 23.5, 23.0]
    pair = stats.compare_pairs(a, b, ["house", "tree", "boat"], metric="clip", a_name="A",
                               b_name="B", n_resamples=200).to_dict()
    statistics = [{"axis": "x", "axis_name": "model", "title": "model", "metric": "clip",
                   "pairs": [pair], "ranking": None}]
    lines = ["key,x,x_value,y,y_value,model_hash,clip"]
    for prompt, sa, sb in zip(("house", "tree", "boat"), a, b):
        lines.append(f"k{prompt}A,model,A,prompt,{prompt},{'ab' * 32},{sa}")
        lines.append(f"k{prompt}B,model,B,prompt,{prompt},{'cd' * 32},{sb}")
    (out / "scores.csv").write_text("\n".join(lines) + "\n")
    (out / "scores.json").write_text(json.dumps({"verdict": report.verdict(statistics),
                                                 "statistics": statistics, "cells": []}))
    (out / "report.html").write_text("<html></html>")
    return [out / n for n in ("grid.png", "scores.csv", "scores.json", "report.html")]


@pytest.mark.slow  # several AppTest runs: over 3 s on the shared 2-core machine
def test_compare_results_show_grid_and_verdict_first_then_tables_and_charts(home):
    files = grid_files(home / "outputs" / "grids" / "g")
    store = store_of(home)
    job = store.submit("grid", "kind: grid", name="g")
    store.claim(pid=os.getpid())
    store.finish(job, "done", [str(p) for p in files])
    at = open_page("compare")
    assert "grid.png" in str(at.get("image")[0].proto)
    sentence = report.verdict(json.loads(files[2].read_text())["statistics"])[0]
    assert sentence.startswith("B beats A on prompt adherence in 3 of 3 pairs")
    assert sentence in [i.value for i in at.info]
    assert not at.json  # no raw JSON tree
    scores, ab = at.dataframe[0].value, at.dataframe[1].value
    assert set(scores["model_hash"]) == {"ab" * 5, "cd" * 5}  # 10 characters, not 64
    assert list(ab["A"]) == ["A"] and list(ab["B"]) == ["B"] and list(ab["B − A"]) == ["+1.7"]
    assert list(ab["p (Wilcoxon)"]) == ["cannot reach 0.05 with 3 prompts"]
    assert at.get("arrow_vega_lite_chart") or at.get("vega_lite_chart")  # the mean-score chart


def test_grid_results_helpers_on_their_own(tmp_path):
    res = grid_results.read_results(grid_files(tmp_path / "g") + [tmp_path / "missing.png"])
    assert [p.name for p in res.images] == ["grid.png"] and res.metrics == ["clip"]
    assert grid_results.axes_of(res.rows) == [("x", "model"), ("y", "prompt")]
    means = grid_results.means_by_value(res.rows, "x", res.metrics)
    assert means["CLIP score"]["A"] == pytest.approx(21.1667, abs=1e-3)
    table = grid_results.short_rows(res.rows, res.metrics)
    assert list(table[0])[:4] == ["x_value", "y_value", "clip", "key"]  # scores up front
    assert table[0]["model_hash"] == "ab" * 5
    assert res.verdict() and res.verdict() == json.loads((tmp_path / "g/scores.json")
                                                         .read_text())["verdict"]


# --------------------------------------------------------------------------------------------------
# 8. force stop


@pytest.mark.slow
def test_force_stop_asks_first_then_stops_a_worker_that_ignores_its_cancel(home):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        job = running_job(home, "merge", pid=proc.pid)
        at = open_page("jobs")
        assert f"jobs.force.{job}" not in {b.key for b in at.button}  # only after a cancel
        at.button(key=f"jobs.cancel.{job}").click().run()
        at.button(key=f"jobs.force.{job}").click().run()
        assert any(f"Stop worker process {proc.pid} now?" in w.value for w in at.warning)
        at.button(key=f"jobs.force_no.{job}").click().run()  # changed my mind
        assert store_of(home).get(job).status == "running" and proc.poll() is None
        at.button(key=f"jobs.force.{job}").click().run()
        at.button(key=f"jobs.force_yes.{job}").click().run()
        assert proc.wait(timeout=120) is not None
        assert not psutil.pid_exists(proc.pid) or psutil.Process(proc.pid).status() == \
            psutil.STATUS_ZOMBIE
        stopped = store_of(home).get(job)
        assert stopped.status == "cancelled" and "by force" in stopped.error
        assert any(f"worker {proc.pid} stopped by force" in i.value for i in at.info)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_eta_of_the_whole_job_comes_from_its_overall_fraction(home):
    from workbench.app.jobs_ui import job_eta

    job_id = running_job(home, "train")
    store = store_of(home)
    store.report(job_id, progress=0.9, eta_s=2.0, overall=0.25, stage="sampling")
    job = store.get(job_id)
    job.started = time.time() - 30.0  # 30 s for a quarter: about 90 s left
    assert job_eta(job) == pytest.approx(90.0, abs=1.0)
