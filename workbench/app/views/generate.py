"""Generate page: images from one model and prompt, optionally with LoRAs, within a VRAM budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st

from workbench.app import forms, live, pickers
from workbench.app.config import AppConfig
from workbench.recipes.common import SAMPLERS, split_lora
from workbench.recipes.generate import WEIGHT_MODES

P = "generate"
S = st.session_state


def k(name: str) -> str:
    return f"{P}.{name}"


def defaults(cfg: AppConfig) -> dict[str, Any]:
    return {"name": "", "model": "", "prompt": "", "negative": "", "sampler": "Euler a",
            "steps": 20, "cfg": 7.0, "width": 512, "height": 512, "seed": -1, "count": 1,
            "loras": "", "weights": "auto", "vram": None,
            "out.dir": cfg.show(cfg.roots["outputs"][0] / "images")}


def lora_lines(cfg: AppConfig, problems: list, field: str, text: str) -> list[str]:
    """'path:weight' lines; each path must be inside the allowed folders."""
    out = []
    for i, line in enumerate(x.strip() for x in (text or "").splitlines() if x.strip()):
        try:
            path, weight = split_lora(line)
        except Exception:
            out.append(line)  # the validator says what is wrong with the weight
            continue
        full = forms.path_field(cfg, problems, f"{field}[{i}]", path, ("models", "outputs"))
        out.append(f"{full}:{weight:g}")
    return out


def show_lora(value: Any, cfg: AppConfig) -> str:
    if isinstance(value, dict):
        return f"{cfg.show(value.get('path'))}:{float(value.get('weight', 1.0)):g}"
    path, weight = split_lora(str(value))
    return f"{cfg.show(path)}:{weight:g}"


def to_data(get, cfg: AppConfig, problems: list) -> dict:
    data: dict[str, Any] = {}
    if (get("name") or "").strip():
        data["name"] = get("name").strip()
    data["model"] = forms.path_field(cfg, problems, "model", get("model"), ("models", "outputs"))
    data.update({"prompt": get("prompt") or "", "negative_prompt": get("negative") or "",
                 "sampler": get("sampler"), "steps": get("steps"), "cfg": get("cfg"),
                 "width": get("width"), "height": get("height"), "seed": get("seed"),
                 "count": get("count")})
    loras = lora_lines(cfg, problems, "loras", get("loras"))
    if loras:
        data["loras"] = loras
    memory: dict[str, Any] = {"weights": get("weights")}
    if get("vram"):
        memory["vram_budget_mb"] = get("vram")
    data["memory"] = memory
    data["output"] = {"dir": forms.path_field(cfg, problems, "output.dir", get("out.dir"),
                                              ("outputs",))}
    return data


def from_data(data: dict, cfg: AppConfig) -> dict[str, Any]:
    pop = forms.pop_path
    state: dict[str, Any] = {"name": pop(data, "name") or "", "model": cfg.show(pop(data, "model")),
                             "prompt": pop(data, "prompt") or "",
                             "negative": pop(data, "negative_prompt") or "",
                             "loras": "\n".join(show_lora(v, cfg)
                                                for v in pop(data, "loras") or []),
                             "out.dir": cfg.show(pop(data, "output", "dir"))}
    for key in ("sampler", "steps", "cfg", "width", "height", "seed", "count"):
        value = pop(data, key)
        if value is not None:
            state[key] = float(value) if key == "cfg" else value
    weights = pop(data, "memory", "weights")
    if weights:
        state["weights"] = weights
    state["vram"] = pop(data, "memory", "vram_budget_mb")
    return state


SPEC = forms.FormSpec("generate", P, defaults, to_data, from_data)


def draw(problems: forms.Problems, cfg: AppConfig) -> None:
    c1, c2, c3 = st.columns([1, 2, 2])
    c1.text_input("Name (optional)", key=k("name"))
    c2.text_input("Model", key=k("model"), placeholder="models/mine_v1.safetensors")
    pickers.picker(k("model"), pickers.model_choices(cfg, pickers.MODEL_KINDS), cfg, "a model",
                   container=c3)
    problems.show("name", "model")
    st.text_area("Prompt", key=k("prompt"), height=80)
    problems.show("prompt")
    st.text_input("Negative prompt", key=k("negative"))
    problems.show("negative_prompt")
    c1, c2, c3, c4 = st.columns(4)
    c1.selectbox("Sampler", SAMPLERS, key=k("sampler"))
    c2.number_input("Steps", min_value=1, max_value=1000, step=1, key=k("steps"))
    c3.number_input("CFG", min_value=0.0, step=0.5, key=k("cfg"))
    c4.number_input("Seed (-1: random)", min_value=-1, step=1, key=k("seed"))
    problems.show("sampler", "steps", "cfg", "seed")
    c1, c2, c3 = st.columns(3)
    c1.number_input("Width", min_value=64, step=64, key=k("width"))
    c2.number_input("Height", min_value=64, step=64, key=k("height"))
    c3.number_input("Images", min_value=1, step=1, key=k("count"))
    problems.show("width", "height", "count")
    st.text_area("LoRAs (one 'path:weight' per line)", key=k("loras"), height=68)
    pickers.picker(k("loras"), pickers.model_choices(cfg, pickers.LORA_KINDS), cfg, "a LoRA",
                   append=True, beside_label=False)
    problems.show("loras")
    c1, c2 = st.columns(2)
    c1.selectbox("Weights", WEIGHT_MODES, key=k("weights"),
                 help="how the model is stored on the GPU (auto: the planner decides)")
    c2.number_input("VRAM budget (MB, empty: measure the card)", min_value=256, step=256,
                    value=None, key=k("vram"))
    problems.show("memory")
    st.text_input("Output folder", key=k("out.dir"))
    problems.show("output")


def results() -> None:
    job = forms.job_picker("generate", "Images of job")
    if job is None:
        return
    forms.job_progress(job)
    images = [Path(p) for p in job.results if Path(p).suffix.lower() in (".png", ".jpg", ".jpeg",
                                                                          ".webp")]
    if images:
        st.image([str(p) for p in images if p.exists()], width=256,
                 caption=[p.name for p in images if p.exists()])


def render() -> None:
    st.title("Generate")
    forms.render_form(SPEC, draw)
    st.divider()
    live.section("generate", results, lambda: live.jobs_active("generate"))


if __name__ == "__main__":
    render()
