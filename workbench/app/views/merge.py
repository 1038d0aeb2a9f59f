"""Merge page: named input models, ordered steps (method, inputs, alpha or block weights), output.

The block-weight editor writes what a recipe accepts: a preset name, a comma list in supermerger's
order (SD1.5 26 values, SDXL 20) or a mapping for SD3/FLUX block ids; presets fill the editor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st

from workbench.app import forms, live, pickers
from workbench.app.config import AppConfig
from workbench.app.views.merge_search_panel import render_panel
from workbench.arch import BLOCK_TABLES
from workbench.formats.blocks import BLOCK_IDS, parse_block_values, preset_name, presets
from workbench.recipes.merge import KNOWN_MERGE_METHODS, MERGE_METHOD_RULES
from workbench.units import human_size

P = "merge"
NUM_PARAMS = ("beta", "k", "p", "sim_min", "sim_max")
DTYPES = ("first input", "fp16", "bf16", "fp32", "fp8_e4m3fn")
BLOCK_MODES = ("none", "preset", "per block")
ARCHS = BLOCK_TABLES  # one per block table (workbench/arch.py)
S = st.session_state
ALPHA_WITH_BLOCKS = ("α does not apply while block weights are set: each block's weight is its "
                     "alpha, and BASE is the alpha of the text encoder and VAE.")


def k(name: str) -> str:
    return f"{P}.{name}"


def defaults(cfg: AppConfig) -> dict[str, Any]:
    out = cfg.roots["outputs"][0]
    return {"name": "my-merge", "description": "", "n_models": 2,
            "model0.name": "A", "model0.path": "", "model1.name": "B", "model1.path": "",
            "n_steps": 1, **step_defaults(0, "merged", "weighted_sum", "A, B"),
            "out.path": cfg.show(out / "merges" / "my-merge.safetensors"),
            "out.dtype": "first input", "out.from": "", "out.prune": False, "out.bake_vae": "",
            "out.overwrite": False}


def step_defaults(i: int, sid: str, method: str, inputs: str) -> dict[str, Any]:
    d = {f"step{i}.id": sid, f"step{i}.method": method, f"step{i}.inputs": inputs,
         f"step{i}.alpha_mode": "one value", f"step{i}.alpha": 0.5, f"step{i}.seed": None,
         f"step{i}.blocks_mode": "none", f"step{i}.blocks_preset": "GRAD_V",
         f"step{i}.blocks_arch": "sd15", f"step{i}.b_listed": None}
    for name in NUM_PARAMS + ("alpha_unet", "alpha_te", "alpha_vae"):
        d[f"step{i}.{name}"] = None
    return d


# --------------------------------------------------------------------------------------------------
# widget state <-> recipe data


def _blocks_data(get, i: int) -> Any:
    mode = get(f"step{i}.blocks_mode")
    if mode == "preset":
        return get(f"step{i}.blocks_preset")
    if mode != "per block":
        return None
    arch = get(f"step{i}.blocks_arch") or "sd15"
    values = {bid: float(get(f"step{i}.b.{bid}") or 0.0) for bid in BLOCK_IDS[arch]}
    listed = get(f"step{i}.b_listed")
    if listed is None and arch in ("sd15", "sdxl"):
        return ",".join(f"{v:g}" for v in values.values())
    # a mapping: the ids the loaded recipe listed plus every non-zero one (ids left out are 0)
    keep = set(listed or ())
    return {bid: v for bid, v in values.items() if bid in keep or v != 0.0 or listed is None}


def to_data(get, cfg: AppConfig, problems: list) -> dict:
    data: dict[str, Any] = {"name": (get("name") or "").strip()}
    if (get("description") or "").strip():
        data["description"] = get("description").strip()
    models = {}
    for i in range(get("n_models") or 0):
        name = (get(f"model{i}.name") or "").strip()
        if not name:
            problems.append((f"models[{i}]", f"model {i + 1} needs a name (e.g. A)"))
            continue
        models[name] = forms.path_field(cfg, problems, f"models.{name}", get(f"model{i}.path"),
                                        ("models", "outputs"))
    data["models"] = models
    steps = []
    for i in range(get("n_steps") or 0):
        method = get(f"step{i}.method")
        rule = MERGE_METHOD_RULES.get(method)
        uses = (rule.required + rule.optional) if rule else ()
        step: dict[str, Any] = {"id": (get(f"step{i}.id") or "").strip(), "method": method,
                                "inputs": [s.strip() for s in (get(f"step{i}.inputs") or "")
                                           .split(",") if s.strip()]}
        if "alpha" in uses:
            if get(f"step{i}.alpha_mode") == "per component":
                comp = {c: get(f"step{i}.alpha_{w}") for c, w in
                        (("unet", "unet"), ("text_encoder", "te"), ("vae", "vae"))}
                step["alpha"] = {c: v for c, v in comp.items() if v is not None}
            elif get(f"step{i}.alpha") is not None:
                step["alpha"] = get(f"step{i}.alpha")
        for name in NUM_PARAMS + ("seed",):
            if name in uses and get(f"step{i}.{name}") is not None:
                step[name] = get(f"step{i}.{name}")
        if "blocks" in uses:
            blocks = _blocks_data(get, i)
            if blocks is not None:
                step["blocks"] = blocks
        steps.append(step)
    data["steps"] = steps
    out: dict[str, Any] = {"path": forms.path_field(cfg, problems, "output.path",
                                                    get("out.path"), ("outputs",))}
    if get("out.dtype") not in (None, "first input"):
        out["dtype"] = get("out.dtype")
    if (get("out.from") or "").strip():
        out["from"] = get("out.from").strip()
    if get("out.prune"):
        out["prune"] = True
    if (get("out.bake_vae") or "").strip():
        out["bake_vae"] = forms.path_field(cfg, problems, "output.bake_vae", get("out.bake_vae"),
                                           ("models", "outputs"))
    if get("out.overwrite"):
        out["overwrite"] = True
    data["output"] = out
    return data


def _blocks_state(i: int, blocks: Any) -> dict[str, Any]:
    if blocks is None:
        return {}
    if isinstance(blocks, str) and preset_name(blocks):
        name = preset_name(blocks)
        return {f"step{i}.blocks_mode": "preset", f"step{i}.blocks_preset": name}
    if isinstance(blocks, dict):
        ids = [str(b).upper() for b in blocks]
        arch = ("flux" if any(b[0] in "DS" and b[1:].isdigit() for b in ids) else
                "sd3" if any(b[0] == "J" for b in ids) else "sd15")
        values = {str(b).upper(): float(v) for b, v in blocks.items()}
    else:
        nums = [float(v) for v in str(blocks).split(",")]
        arch = "sdxl" if len(nums) == len(BLOCK_IDS["sdxl"]) else "sd15"
        values = dict(zip(BLOCK_IDS[arch], nums))
    state = {f"step{i}.blocks_mode": "per block", f"step{i}.blocks_arch": arch,
             f"step{i}.b_listed": list(values) if isinstance(blocks, dict) else None}
    for bid in BLOCK_IDS[arch]:
        state[f"step{i}.b.{bid}"] = values.get(bid, 0.0)  # missing ids: 0, as the dry run reads
    return state


def from_data(data: dict, cfg: AppConfig) -> dict[str, Any]:
    state: dict[str, Any] = {"name": data.pop("name", ""),
                             "description": data.pop("description", "") or ""}
    models = data.pop("models", {}) or {}
    state["n_models"] = len(models)
    for i, (name, path) in enumerate(models.items()):
        state[f"model{i}.name"], state[f"model{i}.path"] = name, cfg.show(path)
    steps = data.pop("steps", []) or []
    state["n_steps"] = len(steps)
    for i, step in enumerate(steps):
        state.update(step_defaults(i, step.get("id", ""), step.get("method", "weighted_sum"),
                                   ", ".join(step.get("inputs", []))))
        alpha = step.get("alpha")
        if isinstance(alpha, dict):
            state[f"step{i}.alpha_mode"] = "per component"
            for c, w in (("unet", "unet"), ("text_encoder", "te"), ("vae", "vae")):
                state[f"step{i}.alpha_{w}"] = alpha.get(c)
        else:
            state[f"step{i}.alpha"] = alpha
        for name in NUM_PARAMS + ("seed",):
            state[f"step{i}.{name}"] = step.get(name)
        state.update(_blocks_state(i, step.get("blocks")))
    out = data.pop("output", {}) or {}
    state.update({"out.path": cfg.show(out.get("path")), "out.dtype": out.get("dtype") or
                  "first input", "out.from": out.get("from") or "",
                  "out.prune": bool(out.get("prune")),
                  "out.bake_vae": cfg.show(out.get("bake_vae")),
                  "out.overwrite": bool(out.get("overwrite"))})
    return state


SPEC = forms.FormSpec("merge", P, defaults, to_data, from_data)


# --------------------------------------------------------------------------------------------------
# widgets


def _add_model() -> None:
    i = S[k("n_models")]
    S[k(f"model{i}.name")] = "ABCDEFGHIJ"[i] if i < 10 else f"M{i}"
    S[k(f"model{i}.path")] = ""
    S[k("n_models")] = i + 1


def _remove(count: str) -> None:
    if S[k(count)] > 1:
        S[k(count)] -= 1


def _add_step() -> None:
    i = S[k("n_steps")]
    prev = S.get(k(f"step{i - 1}.id"), "A")
    for name, value in step_defaults(i, f"step{i + 1}", "weighted_sum", f"{prev}, A").items():
        S[k(name)] = value
    S[k("n_steps")] = i + 1


def _fill_preset(i: int) -> None:
    """Fill the per-block editor from the chosen preset (for the chosen architecture)."""
    arch, name = S[k(f"step{i}.blocks_arch")], S[k(f"step{i}.fill")]
    if not name:
        return
    try:
        values = parse_block_values(arch, name)
    except Exception as e:  # a preset that does not fit this architecture
        S[k(f"step{i}.fill_msg")] = str(e)
        return
    S[k(f"step{i}.fill_msg")] = ""
    for bid, v in values.items():
        S[k(f"step{i}.b.{bid}")] = float(v)


def block_editor(i: int, problems: forms.Problems) -> None:
    st.selectbox("Block weights", BLOCK_MODES, key=k(f"step{i}.blocks_mode"),
                 help="alpha per UNet/DiT block (supermerger's order); BASE = text encoder + VAE")
    mode = S[k(f"step{i}.blocks_mode")]
    if mode == "preset":
        st.selectbox("Preset", list(presets()), key=k(f"step{i}.blocks_preset"))
    elif mode == "per block":
        c1, c2 = st.columns(2)
        c1.selectbox("Architecture", ARCHS, key=k(f"step{i}.blocks_arch"))
        c2.selectbox("Fill from preset", [""] + list(presets()), key=k(f"step{i}.fill"),
                     on_change=_fill_preset, args=(i,))
        if S.get(k(f"step{i}.fill_msg")):
            st.warning(S[k(f"step{i}.fill_msg")])
        if S.get(k(f"step{i}.b_listed")) is not None:
            st.caption("written as a mapping, as the recipe had it: blocks not listed are 0")
        ids = BLOCK_IDS[S[k(f"step{i}.blocks_arch")]]
        per_row = 7
        for start in range(0, len(ids), per_row):
            cols = st.columns(per_row)
            for col, bid in zip(cols, ids[start:start + per_row]):
                S.setdefault(k(f"step{i}.b.{bid}"), 0.5)
                col.number_input(bid, min_value=0.0, max_value=1.0, step=0.05,
                                 key=k(f"step{i}.b.{bid}"), format="%.2f")
    problems.show(f"steps[{i}].blocks")


def step_widgets(i: int, problems: forms.Problems) -> None:
    c1, c2, c3 = st.columns([1, 1.3, 1.5])
    c1.text_input("Step id", key=k(f"step{i}.id"))
    c2.selectbox("Method", list(KNOWN_MERGE_METHODS), key=k(f"step{i}.method"),
                 help=KNOWN_MERGE_METHODS.get(S.get(k(f"step{i}.method")), ""))
    c3.text_input("Inputs (in order, comma-separated)", key=k(f"step{i}.inputs"),
                  help="model names or earlier step ids, e.g. A, B")
    problems.show(f"steps[{i}].id", f"steps[{i}].method", f"steps[{i}].inputs")
    method = S[k(f"step{i}.method")]
    st.caption(KNOWN_MERGE_METHODS.get(method, ""))
    rule = MERGE_METHOD_RULES.get(method)
    uses = (rule.required + rule.optional) if rule else ()
    # block weights give alpha per block (BASE: text encoder and VAE), so the alpha box would
    # change nothing in the file: it is greyed out with a line that says so
    blocks_set = "blocks" in uses and S.get(k(f"step{i}.blocks_mode"), "none") != "none"
    if "alpha" in uses:
        st.radio("Alpha", ("one value", "per component"), key=k(f"step{i}.alpha_mode"),
                 horizontal=True, disabled=blocks_set)
        if S[k(f"step{i}.alpha_mode")] == "per component":
            cols = st.columns(3)
            for col, (w, label) in zip(cols, (("unet", "UNet"), ("te", "text encoder"),
                                              ("vae", "VAE"))):
                col.number_input(f"alpha {label}", value=None, step=0.05,
                                 key=k(f"step{i}.alpha_{w}"), disabled=blocks_set)
        else:
            st.number_input("alpha (share of the second input)", value=None, step=0.05,
                            format="%.3f", key=k(f"step{i}.alpha"), disabled=blocks_set)
        if blocks_set:
            st.caption(ALPHA_WITH_BLOCKS)
        problems.show(f"steps[{i}].alpha")
    shown = [n for n in NUM_PARAMS + ("seed",) if n in uses]
    if shown:
        cols = st.columns(len(shown))
        for col, name in zip(cols, shown):
            if name == "seed":
                col.number_input("seed", value=None, step=1, key=k(f"step{i}.seed"))
            else:
                col.number_input(name, value=None, step=0.05, format="%.3f",
                                 key=k(f"step{i}.{name}"))
        for name in shown:
            problems.show(f"steps[{i}].{name}")
    if "blocks" in uses:
        block_editor(i, problems)
    problems.show(f"steps[{i}]")


def draw(problems: forms.Problems, cfg: AppConfig) -> None:
    c1, c2 = st.columns([1, 2])
    c1.text_input("Name", key=k("name"))
    c2.text_input("Description", key=k("description"))
    problems.show("name", "description")

    st.subheader("Input models")
    choices = pickers.model_choices(cfg, pickers.MODEL_KINDS + pickers.LORA_KINDS)
    for i in range(S[k("n_models")]):
        c1, c2, c3 = st.columns([1, 3, 2])
        c1.text_input("Name", key=k(f"model{i}.name"), label_visibility="collapsed")
        c2.text_input(f"Model {i + 1} path", key=k(f"model{i}.path"),
                      placeholder=".safetensors file under the models or outputs folder",
                      label_visibility="collapsed")
        pickers.picker(k(f"model{i}.path"), choices, cfg, "a model or LoRA", container=c3,
                       beside_label=False)
        problems.show(f"models.{S.get(k(f'model{i}.name'), '')}", f"models[{i}]")
    problems.show("models")
    c1, c2 = st.columns(2)
    c1.button("Add model", key=k("add_model"), on_click=_add_model)
    c2.button("Remove last model", key=k("rm_model"), on_click=_remove, args=("n_models",))

    st.subheader("Steps")
    for i in range(S[k("n_steps")]):
        with st.container(border=True):
            step_widgets(i, problems)
    problems.show("steps")
    c1, c2 = st.columns(2)
    c1.button("Add step", key=k("add_step"), on_click=_add_step)
    c2.button("Remove last step", key=k("rm_step"), on_click=_remove, args=("n_steps",))

    st.subheader("Output")
    st.text_input("Output file", key=k("out.path"), help="a .safetensors file under outputs")
    problems.show("output.path")
    c1, c2, c3, c4 = st.columns(4)
    c1.selectbox("dtype", DTYPES, key=k("out.dtype"))
    c2.text_input("Write step (default: last)", key=k("out.from"))
    c3.checkbox("prune EMA keys", key=k("out.prune"))
    c4.checkbox("overwrite", key=k("out.overwrite"))
    st.text_input("Bake VAE from (optional)", key=k("out.bake_vae"))
    problems.show("output")


def job_status() -> None:
    """The chosen merge job: one bar for the job, its error if it failed, the file it wrote."""
    job = forms.job_picker("merge", "Merge job")
    if job is None:
        st.caption("no merge jobs yet")
        return
    forms.job_progress(job)
    for raw in job.results:
        path = Path(raw)
        if path.suffix == ".safetensors":
            size = human_size(path.stat().st_size) if path.exists() else "missing"
            st.markdown(f"wrote `{path}` ({size})")


def render() -> None:
    st.title("Merge")
    st.caption("Merge checkpoints as a merge recipe describes; the dry run shows the plan before "
               "anything is written.")
    forms.render_form(SPEC, draw)
    st.divider()
    st.subheader("Progress")
    live.section("merge", job_status, lambda: live.jobs_active("merge"))
    render_panel()


if __name__ == "__main__":
    render()
