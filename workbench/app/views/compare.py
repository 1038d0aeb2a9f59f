"""Compare page: build an X/Y(/Z) comparison grid (a grid recipe), then look at the grid with its
scores and the A/B statistics the grid engine wrote (scores.csv, scores.json, report.html)."""

from __future__ import annotations

import re
from typing import Any

import pandas as pd
import streamlit as st

from workbench.app import forms, grid_results, live, pickers
from workbench.app.config import AppConfig
from workbench.recipes.common import SAMPLERS, split_lora
from workbench.recipes.grid import AXIS_NAMES

P = "grid"
S = st.session_state
INT_AXES = ("seed", "steps", "clip_skip")
NUM_AXES = INT_AXES + ("cfg", "merge_alpha", "merge_beta")
PATH_AXES = ("model", "lora")
LETTERS = ("x", "y", "z")  # the grid's axes; y and z are optional (z needs y)
_PLAIN = re.compile(r"^\s*[-+]?\d+(\.\d*)?\s*$")


def k(name: str) -> str:
    return f"{P}.{name}"


def defaults(cfg: AppConfig) -> dict[str, Any]:
    return {"name": "my-grid", "model": "", "prompt": "", "negative": "", "sampler": "Euler a",
            "steps": 20, "cfg": 7.0, "width": 512, "height": 512,
            "x.axis": "model", "x.values": "", "x.recipe": "",
            "y.axis": "none", "y.values": "", "y.recipe": "",
            "z.axis": "none", "z.values": "", "z.recipe": "", "seeds": "1, 2, 3",
            "clip": True, "clip.weights": "", "aesthetic": False, "aesthetic.weights": "",
            "style": "", "out.dir": cfg.show(cfg.roots["outputs"][0] / "grids" / "my-grid")}


def axis_values(axis: str, text: str, cfg: AppConfig, problems: list, field: str) -> Any:
    """Widget text -> the recipe's `values`: lines for names and paths, numbers or range text."""
    if axis in NUM_AXES:
        items = [x for x in (text or "").split(",")]
        if items and all(_PLAIN.match(x) for x in items):
            return [int(x) if axis in INT_AXES else float(x) for x in items]
        return (text or "").strip()
    lines = [x.strip() for x in (text or "").splitlines() if x.strip()]
    if axis == "model":
        return [forms.path_field(cfg, problems, f"{field}[{i}]", x, ("models", "outputs"))
                for i, x in enumerate(lines)]
    if axis == "lora":
        out = []
        for i, line in enumerate(lines):
            try:
                path, weight = split_lora(line)
            except Exception:
                out.append(line)
                continue
            full = forms.path_field(cfg, problems, f"{field}[{i}]", path, ("models", "outputs"))
            out.append(f"{full}:{weight:g}")
        return out
    return lines


def show_values(axis: str, values: Any, cfg: AppConfig) -> str:
    if isinstance(values, str):
        return values
    if axis in NUM_AXES:
        return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
    if axis == "model":
        return "\n".join(cfg.show(v) for v in values)
    if axis == "lora":
        return "\n".join(f"{cfg.show(v['path'])}:{float(v.get('weight', 1)):g}"
                         if isinstance(v, dict) else str(v) for v in values)
    return "\n".join(str(v) for v in values)


def _axis(get, letter: str, cfg: AppConfig, problems: list) -> dict | None:
    axis = get(f"{letter}.axis")
    if not axis or axis == "none":
        return None
    out: dict[str, Any] = {"axis": axis, "values": axis_values(axis, get(f"{letter}.values"), cfg,
                                                               problems, f"{letter}.values")}
    if axis in ("merge_alpha", "merge_beta"):
        out["recipe"] = forms.path_field(cfg, problems, f"{letter}.recipe", get(f"{letter}.recipe"),
                                         ("recipes", "outputs"))
    return out


def to_data(get, cfg: AppConfig, problems: list) -> dict:
    data: dict[str, Any] = {"name": (get("name") or "").strip()}
    d: dict[str, Any] = {}
    if (get("model") or "").strip():
        d["model"] = forms.path_field(cfg, problems, "defaults.model", get("model"),
                                      ("models", "outputs"))
    d.update({"prompt": get("prompt") or "", "negative_prompt": get("negative") or "",
              "sampler": get("sampler"), "steps": get("steps"), "cfg": get("cfg"),
              "width": get("width"), "height": get("height")})
    data["defaults"] = d
    for letter in LETTERS:
        axis = _axis(get, letter, cfg, problems)
        if axis is not None:
            data[letter] = axis
    seeds = (get("seeds") or "").strip()
    if seeds:
        items = [x.strip() for x in seeds.split(",")]
        data["seeds"] = [int(x) if re.fullmatch(r"-?\d+", x) else x for x in items]
    scores: dict[str, Any] = {}
    if get("clip"):
        scores["clip"] = {}
        if (get("clip.weights") or "").strip():
            scores["clip"]["weights"] = forms.path_field(cfg, problems, "scores.clip.weights",
                                                         get("clip.weights"), ("models",))
    if get("aesthetic"):
        scores["aesthetic"] = {}
        if (get("aesthetic.weights") or "").strip():
            scores["aesthetic"]["weights"] = forms.path_field(
                cfg, problems, "scores.aesthetic.weights", get("aesthetic.weights"), ("models",))
    if (get("style") or "").strip():
        scores["style"] = {"reference_dir": forms.path_field(
            cfg, problems, "scores.style.reference_dir", get("style"), ("datasets", "outputs"))}
    if scores:
        data["scores"] = scores
    data["output"] = {"dir": forms.path_field(cfg, problems, "output.dir", get("out.dir"),
                                              ("outputs",))}
    return data


def from_data(data: dict, cfg: AppConfig) -> dict[str, Any]:
    pop = forms.pop_path
    state: dict[str, Any] = {"name": pop(data, "name") or "",
                             "model": cfg.show(pop(data, "defaults", "model")),
                             "prompt": pop(data, "defaults", "prompt") or "",
                             "negative": pop(data, "defaults", "negative_prompt") or "",
                             "out.dir": cfg.show(pop(data, "output", "dir"))}
    for key in ("sampler", "steps", "cfg", "width", "height"):
        value = pop(data, "defaults", key)
        if value is not None:
            state[key] = float(value) if key == "cfg" else value
    for letter in LETTERS:
        axis = data.get(letter)
        if not isinstance(axis, dict):
            state[f"{letter}.axis"] = "none"
            continue
        name = pop(data, letter, "axis")
        state[f"{letter}.axis"] = name
        state[f"{letter}.values"] = show_values(name, pop(data, letter, "values") or [], cfg)
        state[f"{letter}.recipe"] = cfg.show(pop(data, letter, "recipe"))
    seeds = pop(data, "seeds")
    state["seeds"] = ", ".join(str(s) for s in seeds) if seeds else ""
    scores = data.get("scores") or {}
    state["clip"] = "clip" in scores
    state["clip.weights"] = cfg.show(pop(data, "scores", "clip", "weights"))
    if "clip" in scores and not scores["clip"]:
        pop(data, "scores", "clip")
    state["aesthetic"] = "aesthetic" in scores
    state["aesthetic.weights"] = cfg.show(pop(data, "scores", "aesthetic", "weights"))
    if "aesthetic" in (data.get("scores") or {}) and not data["scores"]["aesthetic"]:
        pop(data, "scores", "aesthetic")
    state["style"] = cfg.show(pop(data, "scores", "style", "reference_dir"))
    return state


SPEC = forms.FormSpec("grid", P, defaults, to_data, from_data)


def axis_widgets(letter: str, problems: forms.Problems, optional: bool) -> None:
    c1, c2 = st.columns([1, 3])
    choices = (("none",) if optional else ()) + AXIS_NAMES
    c1.selectbox(f"{letter.upper()} axis", choices, key=k(f"{letter}.axis"))
    axis = S[k(f"{letter}.axis")]
    if axis != "none":
        hint = ("numbers or ranges: '1-10 (+2)', '0.2-1.0 [5]'" if axis in NUM_AXES else
                "one 'path:weight' per line" if axis == "lora" else "one value per line")
        c2.text_area(f"{letter.upper()} values", key=k(f"{letter}.values"), help=hint, height=80)
        if axis in ("merge_alpha", "merge_beta"):
            st.text_input(f"{letter.upper()}: merge recipe whose parameter varies",
                          key=k(f"{letter}.recipe"))
    problems.show(letter)


def draw(problems: forms.Problems, cfg: AppConfig) -> None:
    st.text_input("Name", key=k("name"))
    problems.show("name")
    st.subheader("Settings every cell shares")
    c1, c2 = st.columns([3, 2])
    c1.text_input("Model (unless an axis varies it)", key=k("model"))
    pickers.picker(k("model"), pickers.model_choices(cfg, pickers.MODEL_KINDS), cfg, "a model",
                   container=c2)
    st.text_area("Prompt", key=k("prompt"), height=68)
    st.text_input("Negative prompt", key=k("negative"))
    c1, c2, c3, c4, c5 = st.columns(5)
    c1.selectbox("Sampler", SAMPLERS, key=k("sampler"))
    c2.number_input("Steps", min_value=1, step=1, key=k("steps"))
    c3.number_input("CFG", min_value=0.0, step=0.5, key=k("cfg"))
    c4.number_input("Width", min_value=64, step=64, key=k("width"))
    c5.number_input("Height", min_value=64, step=64, key=k("height"))
    problems.show("defaults")
    st.subheader("Axes")
    axis_widgets("x", problems, optional=False)
    axis_widgets("y", problems, optional=True)
    axis_widgets("z", problems, optional=True)
    st.text_input("Seeds (the same for every cell: pairs the A/B comparison)", key=k("seeds"))
    problems.show("seeds")
    st.subheader("Scores")
    c1, c2 = st.columns([1, 3])
    c1.checkbox("CLIP score", key=k("clip"))
    c2.text_input("CLIP weights (.safetensors)", key=k("clip.weights"))
    c1, c2 = st.columns([1, 3])
    c1.checkbox("Aesthetic", key=k("aesthetic"))
    c2.text_input("Aesthetic weights", key=k("aesthetic.weights"))
    st.text_input("Style reference folder (optional)", key=k("style"))
    problems.show("scores")
    st.text_input("Output folder", key=k("out.dir"))
    problems.show("output")


def results() -> None:
    """The chosen grid job: its bar (or its error), then the grid image and the verdict at the
    top, the scores as tables and charts, the A/B statistics as a table (app/grid_results.py)."""
    job = forms.job_picker("grid", "Grid of job")
    if job is None:
        return
    forms.job_progress(job)
    res = grid_results.read_results(job.results)
    if not (res.images or res.rows):
        if job.status == "done":
            st.caption("this job wrote no grid image or scores")
        return
    left, right = st.columns([3, 2])
    with left:
        for p in res.images[:1]:
            st.image(str(p), caption=p.name)
    with right:
        st.markdown("**Verdict**")
        sentences = res.verdict()
        for sentence in sentences:
            st.info(sentence)
        if not sentences:
            st.caption("no verdict: it needs an axis with two or more values and a score")
        if res.report is not None:
            st.caption(f"full report: `{res.report}`")
    tab_scores, tab_ab, tab_pages = st.tabs(["Scores", "A/B statistics", "All grid pages"])
    with tab_scores:
        metrics = res.metrics
        for letter, name in grid_results.axes_of(res.rows):
            means = grid_results.means_by_value(res.rows, letter, metrics)
            if means:
                st.markdown(f"Mean score per {name} value ({letter.upper()} axis)")
                st.bar_chart(pd.DataFrame(means), stack=False, height=220)
        if res.rows:
            st.dataframe(grid_results.short_rows(res.rows, metrics), hide_index=True, width="stretch")
        else:
            st.caption("no scores yet")
    with tab_ab:
        table = grid_results.ab_table(res.statistics)
        if table:
            st.dataframe(table, hide_index=True, width="stretch")
            st.caption("B − A: mean paired difference (B scored higher when positive); interval: "
                       "bootstrap over prompts (over seeds when the grid has one prompt).")
        else:
            st.caption("no statistics (they need two values on an axis and scores)")
    with tab_pages:
        for p in res.images:
            st.image(str(p), caption=p.name)


def render() -> None:
    st.title("Compare")
    st.caption("Build a comparison grid: the same seeds for every cell, so models, LoRAs or "
               "settings are compared on equal terms and scored.")
    forms.render_form(SPEC, draw)
    st.divider()
    live.section("compare", results, lambda: live.jobs_active("grid"))


if __name__ == "__main__":
    render()
