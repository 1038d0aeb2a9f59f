"""Train page: a LoRA from a folder of captioned images: dataset check, parameters, and while a job
runs the loss curve (from the job's progress messages) and the sample images it writes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import streamlit as st

from workbench.app import forms, live, pickers
from workbench.app.views import pick_panel
from workbench.app.config import AppConfig
from workbench.errors import WorkbenchError
from workbench.recipes.train import LR_SCHEDULERS, NETWORK_TYPES, OPTIMIZERS
from workbench.train.check import check_dataset

P = "train"
S = st.session_state
PRECISIONS = ("auto", "no", "fp16", "bf16")


def k(name: str) -> str:
    return f"{P}.{name}"


def defaults(cfg: AppConfig) -> dict[str, Any]:
    return {"name": "my-style", "description": "", "base": "", "dataset": "", "trigger": "",
            "resolution": "512", "net.type": "lora", "net.rank": 16, "net.alpha": 8.0,
            "net.te": False, "max_steps": 1000, "batch_size": 1, "lr": 1e-4,
            "optimizer": "AdamW", "scheduler": "constant", "precision": "auto", "seed": 42,
            "samples.on": False, "samples.every": 250, "samples.steps": 20, "samples.prompts": "",
            "samples.seed": 1,
            "out.dir": cfg.show(cfg.roots["outputs"][0] / "loras" / "my-style"),
            "out.save_every": None, "out.overwrite": False, "out.resume": False}


def parse_resolution(text: str) -> Any:
    text = str(text or "").strip()
    if re.fullmatch(r"\d+", text):
        return int(text)
    m = re.fullmatch(r"(\d+)\s*[xX×]\s*(\d+)", text)
    return [int(m.group(1)), int(m.group(2))] if m else text


def to_data(get, cfg: AppConfig, problems: list) -> dict:
    data: dict[str, Any] = {"name": (get("name") or "").strip()}
    if (get("description") or "").strip():
        data["description"] = get("description").strip()
    data["base"] = forms.path_field(cfg, problems, "base", get("base"), ("models", "outputs"))
    data["dataset"] = forms.path_field(cfg, problems, "dataset", get("dataset"), ("datasets",))
    if (get("trigger") or "").strip():
        data["trigger"] = get("trigger").strip()
    data["resolution"] = parse_resolution(get("resolution"))
    data["network"] = {"type": get("net.type"), "rank": get("net.rank"), "alpha": get("net.alpha")}
    if get("net.te"):
        data["network"]["train_text_encoder"] = True
    data.update({"max_steps": get("max_steps"), "batch_size": get("batch_size"),
                 "learning_rate": get("lr"), "optimizer": get("optimizer"),
                 "lr_scheduler": get("scheduler"), "mixed_precision": get("precision"),
                 "seed": get("seed")})
    if get("samples.on"):
        prompts = [p.strip() for p in (get("samples.prompts") or "").splitlines() if p.strip()]
        data["samples"] = {"every": get("samples.every"), "prompts": prompts,
                           "seed": get("samples.seed"), "steps": get("samples.steps")}
    out: dict[str, Any] = {"dir": forms.path_field(cfg, problems, "output.dir", get("out.dir"),
                                                   ("outputs",))}
    if get("out.save_every"):
        out["save_every"] = get("out.save_every")
    if get("out.overwrite"):
        out["overwrite"] = True
    data["output"] = out
    if get("out.resume") and out["dir"]:  # the state an earlier (stopped) run left in that folder
        data["resume"] = out["dir"]
    return data


def from_data(data: dict, cfg: AppConfig) -> dict[str, Any]:
    pop = forms.pop_path
    res = pop(data, "resolution")
    state = {"name": pop(data, "name") or "", "description": pop(data, "description") or "",
             "base": cfg.show(pop(data, "base")), "dataset": cfg.show(pop(data, "dataset")),
             "trigger": pop(data, "trigger") or "",
             "resolution": "512" if res is None else (f"{res[0]}x{res[1]}" if isinstance(res, list)
                                                      else str(res))}
    for key, path in (("net.type", ("network", "type")), ("net.rank", ("network", "rank")),
                      ("net.alpha", ("network", "alpha")),
                      ("net.te", ("network", "train_text_encoder")),
                      ("max_steps", ("max_steps",)), ("batch_size", ("batch_size",)),
                      ("lr", ("learning_rate",)), ("optimizer", ("optimizer",)),
                      ("scheduler", ("lr_scheduler",)), ("precision", ("mixed_precision",)),
                      ("seed", ("seed",)), ("out.save_every", ("output", "save_every")),
                      ("out.overwrite", ("output", "overwrite"))):
        value = pop(data, *path)
        if value is not None:
            state[key] = float(value) if key == "net.alpha" else value
    state["out.dir"] = cfg.show(pop(data, "output", "dir"))
    state["out.resume"] = pop(data, "resume") is not None
    samples = data.get("samples")
    if isinstance(samples, dict):
        state["samples.on"] = True
        state["samples.every"] = pop(data, "samples", "every") or 250
        state["samples.steps"] = pop(data, "samples", "steps") or 20
        state["samples.prompts"] = "\n".join(pop(data, "samples", "prompts") or [])
        seed = pop(data, "samples", "seed")
        state["samples.seed"] = 1 if seed is None else seed
    return state


SPEC = forms.FormSpec("train", P, defaults, to_data, from_data)


def dataset_check(cfg: AppConfig) -> None:
    """The trainer's own dataset check (errors stop training; warnings are advice)."""
    try:
        path = cfg.check(S.get(k("dataset")) or "", ("datasets",))
        res = parse_resolution(S.get(k("resolution")))
        report = check_dataset(path, resolution=res if isinstance(res, (int, list)) else 512,
                               trigger=(S.get(k("trigger")) or None))
    except WorkbenchError as e:
        S[k("check")] = ("error", str(e), [])
        return
    rows = [{"severity": p.severity, "file": str(p.path), "kind": p.kind, "problem": p.message}
            for p in report.problems]
    S[k("check")] = ("ok" if report.ok else "error", report.render(), rows)


def draw(problems: forms.Problems, cfg: AppConfig) -> None:
    c1, c2 = st.columns([1, 2])
    c1.text_input("Name", key=k("name"), help="the LoRA file is <output dir>/<name>.safetensors")
    c2.text_input("Description", key=k("description"))
    problems.show("name", "description")
    c1, c2 = st.columns([3, 2])
    c1.text_input("Base model", key=k("base"), placeholder="models/sd15_base.safetensors")
    pickers.picker(k("base"), pickers.model_choices(cfg, pickers.MODEL_KINDS), cfg, "a model",
                   container=c2)
    problems.show("base")
    c1, c2 = st.columns([3, 2])
    c1.text_input("Dataset folder", key=k("dataset"),
                  help="kohya layout (10_mystyle/ repeats folders) or images with .txt captions")
    pickers.picker(k("dataset"), pickers.dataset_choices(cfg), cfg, "a dataset", container=c2)
    problems.show("dataset")
    c1, c2 = st.columns(2)
    c1.text_input("Trigger word", key=k("trigger"), help="prepended to every caption")
    c2.text_input("Resolution", key=k("resolution"), help="512, or WIDTHxHEIGHT")
    problems.show("trigger", "resolution")
    st.button("Check dataset", key=k("check_btn"), on_click=dataset_check, args=(cfg,))
    check = S.get(k("check"))
    if check:
        (st.success if check[0] == "ok" else st.error)(check[1].splitlines()[0])
        st.code(check[1], language=None)
        if check[2]:
            st.dataframe(check[2], hide_index=True, width="stretch")

    st.subheader("Network and schedule")
    c1, c2, c3, c4 = st.columns(4)
    c1.selectbox("Network", NETWORK_TYPES, key=k("net.type"))
    c2.number_input("Rank", min_value=1, step=1, key=k("net.rank"))
    c3.number_input("Alpha", min_value=0.0, step=1.0, key=k("net.alpha"))
    c4.checkbox("train text encoder", key=k("net.te"))
    problems.show("network")
    c1, c2, c3, c4 = st.columns(4)
    c1.number_input("Max steps", min_value=1, step=100, key=k("max_steps"))
    c2.number_input("Batch size", min_value=1, step=1, key=k("batch_size"))
    c3.number_input("Learning rate", min_value=0.0, step=1e-5, format="%.2e", key=k("lr"))
    c4.number_input("Seed", step=1, key=k("seed"))
    problems.show("max_steps", "batch_size", "learning_rate", "seed")
    c1, c2, c3 = st.columns(3)
    c1.selectbox("Optimizer", OPTIMIZERS, key=k("optimizer"))
    c2.selectbox("LR scheduler", LR_SCHEDULERS, key=k("scheduler"))
    c3.selectbox("Mixed precision", PRECISIONS, key=k("precision"))
    problems.show("optimizer", "lr_scheduler", "mixed_precision")

    st.subheader("Samples while training")
    st.checkbox("make sample images", key=k("samples.on"))
    if S[k("samples.on")]:
        c1, c2, c3 = st.columns(3)
        c1.number_input("every N steps", min_value=1, step=50, key=k("samples.every"),
                        help="a sample image per prompt after every N training steps (and at "
                             "the end)")
        c2.number_input("sampling steps", min_value=1, max_value=1000, step=1,
                        key=k("samples.steps"), help="denoising steps per sample image: fewer "
                        "is faster; on a CPU sampling can take longer than the training itself")
        c3.number_input("sample seed", step=1, key=k("samples.seed"))
        every, steps = S.get(k("samples.every")) or 1, S.get(k("samples.steps")) or 0
        n_prompts = len([p for p in (S.get(k("samples.prompts")) or "").splitlines() if p.strip()])
        runs = -(-int(S.get(k("max_steps")) or 0) // int(every))
        if n_prompts:
            st.caption(f"{runs} sample rounds × {n_prompts} prompt(s) × {steps} sampling steps = "
                       f"{runs * n_prompts * steps} denoising steps besides the training")
        st.text_area("Prompts (one per line)", key=k("samples.prompts"))
    problems.show("samples")

    st.subheader("Output")
    c1, c2, c3, c4 = st.columns([3, 1, 1, 1])
    c1.text_input("Output folder", key=k("out.dir"))
    c2.number_input("save every N steps", min_value=1, step=50, value=None,
                    key=k("out.save_every"))
    c3.checkbox("overwrite", key=k("out.overwrite"),
                help="start again: remove an earlier run's states, step files and samples there")
    c4.checkbox("resume", key=k("out.resume"),
                help="continue the run a stop or Ctrl-C left in the output folder, from its last "
                     "saved state (the recipe's `resume:`)")
    problems.show("output")


def live_view() -> None:
    """Loss curve and newest sample images of a train job."""
    job = forms.job_picker("train", "Training job")
    if job is None:
        return
    forms.job_progress(job)
    loss = forms.job_store().metrics(job.id).get("loss", [])
    if loss:
        st.line_chart({"step": [s for s, _ in loss], "loss": [v for _, v in loss]}, x="step",
                      y="loss")
    else:
        st.caption("no loss reported yet")
    recipe = forms.recipe_of(job)
    if recipe is not None:
        images = forms.image_files(Path(recipe.output.dir), limit=12)
        if images:
            st.image([str(p) for p in images], width=160, caption=[p.name for p in images])


def render() -> None:
    st.title("Train")
    st.caption("Train a style LoRA (kohya format); check the dataset first.")
    forms.render_form(SPEC, draw)
    st.divider()
    st.subheader("Progress")
    live.section("train", live_view, lambda: live.jobs_active("train"))
    pick_panel.render()


if __name__ == "__main__":
    render()
