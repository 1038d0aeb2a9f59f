"""What every form page shares: widget state <-> recipe data, validation shown next to the fields,
recipe files (load, save, download), the dry run and the job submission.

A page describes its form with a `FormSpec`: default widget values, `to_data` (widget values ->
recipe data, plus path problems) and `from_data` (recipe data -> widget values; what no widget
shows stays in the "more fields (YAML)" box, so every recipe file loads into its form and saves back
unchanged). The recipe is validated by the same `parse_recipe` the CLI uses, at the top of every
run, so each widget can show the validator's message right under itself. Nothing is submitted unless
the recipe validates and a fresh dry run (`build_plan`) has no problems.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import streamlit as st
import yaml

from workbench.app import drafts
from workbench.app.config import AppConfig, load_config
from workbench.app.jobs_ui import job_fraction, progress_text
from workbench.errors import RecipeError, WorkbenchError
from workbench.jobs.store import JobStore
from workbench.dispatch import build_plan
from workbench.errors import OutputExistsError
from workbench.formats.writer import atomic_write_text
from workbench.jobs.worker import ensure_workers
from workbench.recipes.loader import load_recipe, parse_recipe, recipe_to_yaml

Problem = tuple[str, str]  # (field path as the validator names it, message)
JOBS_PAGE = "views/jobs.py"


@st.cache_resource
def _store(db: str) -> JobStore:
    return JobStore(db)


def config() -> AppConfig:
    return load_config()


def job_store() -> JobStore:
    return _store(str(config().db))


# --------------------------------------------------------------------------------------------------
# problems shown next to fields


class Problems:
    """Validation problems by field; each widget shows (and claims) the ones for its field."""

    def __init__(self, problems: list[Problem], visible: bool) -> None:
        self.items = list(problems)
        self.visible = visible
        self.claimed: set[int] = set()

    def at(self, *fields: str) -> list[str]:
        out = []
        for i, (name, message) in enumerate(self.items):
            if i in self.claimed:
                continue
            for f in fields:
                if name == f or name.startswith(f + ".") or name.startswith(f + "["):
                    self.claimed.add(i)
                    sub = name[len(f):].lstrip(".")
                    out.append(f"{sub}: {message}" if sub else message)
                    break
        return out

    def show(self, *fields: str) -> None:
        """st.error under the widget just drawn, for each problem of these fields."""
        for message in self.at(*fields):
            if self.visible:
                st.error(message, icon=":material/error:")

    def show_rest(self) -> None:
        for i, (name, message) in enumerate(self.items):
            if i not in self.claimed and self.visible:
                st.error(f"{name}: {message}" if name else message, icon=":material/error:")

    @property
    def ok(self) -> bool:
        return not self.items


def validate(data: dict) -> tuple[Any, list[Problem]]:
    """(recipe or None, problems) from recipe data, with the recipe validator's messages."""
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    try:
        return parse_recipe(text, None), []
    except RecipeError as e:
        problems = getattr(e, "problems", None)
        if not problems:
            return None, [("", str(e))]
        return None, [(p.field, p.message) for p in problems]


def recipe_data(recipe) -> dict:
    """Recipe -> plain data with absolute paths (only the fields the recipe sets)."""
    data = recipe.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return {"kind": recipe.KIND, **{k: v for k, v in data.items() if k != "kind"}}


def path_field(cfg: AppConfig, problems: list[Problem], field: str, text: Any,
               kinds: tuple[str, ...], required: bool = True) -> str | None:
    """A path from a text widget, absolute, checked against the allowed folders."""
    text = str(text or "").strip()
    if not text:
        return None if not required else ""
    try:
        return str(cfg.check(text, kinds))
    except WorkbenchError as e:
        problems.append((field, str(e)))
        return str(cfg.resolve(text))


def pop_path(data: dict, *keys: str) -> Any:
    """Remove data[k1][k2]... and return it (None when absent); parents left empty are removed."""
    chain = [data]
    for k in keys[:-1]:
        node = chain[-1].get(k) if isinstance(chain[-1], dict) else None
        if not isinstance(node, dict):
            return None
        chain.append(node)
    value = chain[-1].pop(keys[-1], None)
    for parent, k in zip(reversed(chain[:-1]), reversed(keys[:-1])):
        if isinstance(parent.get(k), dict) and not parent[k]:
            del parent[k]
    return value


OUTPUT_FIELDS = ("output.path", "output.dir")  # what a job writes: must be under outputs


def recipe_paths(value: Any, where: str = "") -> list[tuple[str, Path]]:
    """Every path in a validated recipe with its field name ("models.A", "loras[0].path")."""
    from pydantic import BaseModel

    if isinstance(value, Path):
        return [(where, value)]
    found: list[tuple[str, Path]] = []
    if isinstance(value, BaseModel):
        for name, info in type(value).model_fields.items():
            sub = f"{where}.{info.alias or name}" if where else (info.alias or name)
            found += recipe_paths(getattr(value, name), sub)
    elif isinstance(value, dict):
        for k, v in value.items():
            found += recipe_paths(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found += recipe_paths(v, f"{where}[{i}]")
    return found


def path_problems_of(recipe, cfg: AppConfig, known: set[str]) -> list[Problem]:
    """Paths outside the configured folders, wherever they came from (widgets or the YAML box):
    outputs must be under the outputs folder, inputs under any configured folder."""
    problems = []
    for field, path in recipe_paths(recipe):
        if field in known:
            continue
        kinds = ("outputs",) if field in OUTPUT_FIELDS else tuple(cfg.roots)
        try:
            cfg.check(path, kinds)
        except WorkbenchError as e:
            problems.append((field, str(e)))
    return problems


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        both = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = deep_merge(out[k], v) if both else v
    return out


# --------------------------------------------------------------------------------------------------
# the form spec


@dataclass
class FormSpec:
    """One recipe kind's form: `prefix` names its widget keys ("merge.name", ...)."""

    kind: str
    prefix: str
    defaults: Callable[[AppConfig], dict[str, Any]]
    to_data: Callable[[Callable[[str], Any], AppConfig, list[Problem]], dict]
    from_data: Callable[[dict, AppConfig], dict[str, Any]]  # consumes what it shows from data

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}"


DRAFT = "_draft"  # state key: the draft text last read or written (drafts.py)


def init_state(spec: FormSpec, cfg: AppConfig) -> None:
    """A fresh session: the page's draft (the form as it was left, app/drafts.py) if there is
    one, else defaults for widgets that have no value yet."""
    if spec.key("_init") in st.session_state:
        return
    draft = drafts.read_draft(cfg, spec.prefix, spec.kind)
    if draft is not None:
        try:
            load_data_into_form(spec, copy.deepcopy(draft), cfg)
            st.session_state[spec.key(DRAFT)] = drafts.as_text(draft)
            return
        except Exception:  # noqa: BLE001 - an unreadable draft must not break the page
            pass
    for name, value in spec.defaults(cfg).items():
        st.session_state.setdefault(spec.key(name), value)
    st.session_state.setdefault(spec.key("extra"), "")
    st.session_state[spec.key(DRAFT)] = None  # defaults: nothing to keep until an edit
    st.session_state[spec.key("_init")] = True


def keep_draft(spec: FormSpec, data: dict, cfg: AppConfig) -> None:
    """Write the form's data as the page's draft when it changed since the last read/write."""
    text = drafts.as_text(data)
    last = st.session_state.get(spec.key(DRAFT))
    if last is None:  # the defaults a fresh session started from are not an edit
        st.session_state[spec.key(DRAFT)] = text
        return
    if text != last:
        try:
            drafts.write_draft(cfg, spec.prefix, text)
        except OSError:
            return  # a read-only data folder: the form still works, it is just not kept
        st.session_state[spec.key(DRAFT)] = text


def reset_form(spec: FormSpec) -> None:
    """Back to the defaults: the form's state and its draft go."""
    drafts.remove_draft(config(), spec.prefix)
    for k in [k for k in st.session_state if str(k).startswith(spec.prefix + ".")]:
        del st.session_state[k]


def load_data_into_form(spec: FormSpec, data: dict, cfg: AppConfig) -> None:
    """Replace the form's state with recipe data; fields no widget shows go to the YAML box."""
    data.pop("kind", None)
    state = spec.defaults(cfg)
    state.update(spec.from_data(data, cfg))
    for k in [k for k in st.session_state if str(k).startswith(spec.prefix + ".")]:
        if not str(k).endswith((".file", ".file_overwrite")):
            del st.session_state[k]
    for name, value in state.items():
        st.session_state[spec.key(name)] = value
    st.session_state[spec.key("extra")] = (
        yaml.safe_dump(data, sort_keys=False, allow_unicode=True) if data else "")
    st.session_state[spec.key("_init")] = True


def load_into_form(spec: FormSpec, recipe, cfg: AppConfig) -> None:
    """Replace the form's state with a recipe; fields no widget shows go to the YAML box."""
    draft = st.session_state.get(spec.key(DRAFT))
    load_data_into_form(spec, recipe_data(recipe), cfg)
    st.session_state[spec.key(DRAFT)] = draft or ""  # a loaded recipe is an edit to keep
    st.session_state[spec.key("touched")] = True


def form_recipe(spec: FormSpec, cfg: AppConfig) -> tuple[Any, dict, Problems]:
    """Build and validate the recipe from the current widget state."""
    get = lambda name: st.session_state.get(spec.key(name))  # noqa: E731
    path_problems: list[Problem] = []
    data = {"kind": spec.kind, **spec.to_data(get, cfg, path_problems)}
    extra_text = st.session_state.get(spec.key("extra")) or ""
    try:
        extra = yaml.safe_load(extra_text) if extra_text.strip() else {}
        if not isinstance(extra, dict):
            raise ValueError("expected a mapping of recipe fields (field: value)")
        data = deep_merge(data, extra)
    except (yaml.YAMLError, ValueError) as e:
        path_problems.append(("more fields", f"cannot read this YAML: {e}"))
    recipe, problems = validate(data)
    if recipe is not None:
        path_problems += path_problems_of(recipe, cfg, {f for f, _ in path_problems})
    if path_problems:
        recipe = None
    # a click on dry run / submit / save shows the problems in this very run, above the buttons
    if any(st.session_state.get(spec.key(b)) for b in ("dry", "submit", "save")):
        st.session_state[spec.key("touched")] = True
    visible = bool(st.session_state.get(spec.key("touched")))
    return recipe, data, Problems(path_problems + problems, visible)


# --------------------------------------------------------------------------------------------------
# recipe files


def _load_file(spec: FormSpec) -> None:
    cfg = config()
    msg_key = spec.key("file_msg")
    try:
        path = cfg.check(st.session_state.get(spec.key("file")) or "", ("recipes", "outputs",
                                                                          "models", "datasets"))
        recipe = load_recipe(path)
        if recipe.KIND != spec.kind:
            raise WorkbenchError(f"{path} is a {recipe.KIND} recipe; this page edits {spec.kind} "
                                 "recipes")
    except WorkbenchError as e:
        st.session_state[msg_key] = ("error", str(e))
        return
    load_into_form(spec, recipe, cfg)
    st.session_state[msg_key] = ("success", f"loaded {path}")


def _load_upload(spec: FormSpec) -> None:
    cfg = config()
    upload = st.session_state.get(spec.key("upload"))
    if upload is None:
        return
    try:
        recipe = parse_recipe(upload.getvalue().decode("utf-8"),
                              cfg.roots["recipes"][0] / upload.name)
        if recipe.KIND != spec.kind:
            raise WorkbenchError(f"{upload.name} is a {recipe.KIND} recipe; this page edits "
                                 f"{spec.kind} recipes")
    except (WorkbenchError, UnicodeDecodeError) as e:
        st.session_state[spec.key("file_msg")] = ("error", str(e))
        return
    load_into_form(spec, recipe, cfg)
    st.session_state[spec.key("file_msg")] = ("success", f"loaded {upload.name}")


def save_recipe(recipe, path: Path, overwrite: bool) -> Path:
    """Write the recipe's YAML atomically, paths relative to the file's folder."""
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise WorkbenchError(f"{path}: a recipe file name ends in .yaml")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; tick 'overwrite' to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    # temp file, fsync, rename retried while Windows has the file open; the temp file is removed
    # on every error (formats/writer.py)
    return atomic_write_text(path, recipe_to_yaml(recipe, base_dir=path.parent), overwrite=True)


def recipe_file_bar(spec: FormSpec, recipe, cfg: AppConfig) -> None:
    """Load a recipe file into the form, save the form as a recipe file, download or upload."""
    st.session_state.setdefault(spec.key("file"), f"recipes/{spec.kind}.yaml")
    with st.expander("Recipe file: load or save", expanded=False):
        st.text_input("Recipe file", key=spec.key("file"),
                      help="a .yaml recipe under the recipes (or outputs) folder; the same file "
                           "`workbench run` takes")
        c1, c2, c3 = st.columns(3)
        c1.button("Load into form", key=spec.key("load"), on_click=_load_file, args=(spec,))
        save = c2.button("Save form as recipe", key=spec.key("save"))
        c3.checkbox("overwrite", key=spec.key("file_overwrite"))
        if save:
            st.session_state[spec.key("touched")] = True
            try:
                if recipe is None:
                    raise WorkbenchError("the form has problems (shown next to the fields); fix "
                                         "them before saving")
                path = cfg.check(st.session_state[spec.key("file")], ("recipes", "outputs"))
                save_recipe(recipe, path, bool(st.session_state.get(spec.key("file_overwrite"))))
                st.session_state[spec.key("file_msg")] = ("success", f"saved {path}")
            except WorkbenchError as e:
                st.session_state[spec.key("file_msg")] = ("error", str(e))
        msg = st.session_state.get(spec.key("file_msg"))
        if msg:
            (st.success if msg[0] == "success" else st.error)(msg[1])
        st.file_uploader("or load a recipe from your computer", type=["yaml", "yml"],
                         key=spec.key("upload"), on_change=_load_upload, args=(spec,))
        if recipe is not None:
            st.download_button("Download recipe", recipe_to_yaml(recipe, base_dir=cfg.home),
                               file_name=f"{recipe.name or spec.kind}.yaml", mime="text/yaml",
                               key=spec.key("download"))


def extra_fields(spec: FormSpec, problems: Problems) -> None:
    """The YAML box for fields without a widget, with the problems no widget claimed."""
    with st.expander("More fields (YAML)", expanded=bool(st.session_state.get(spec.key("extra")))):
        st.text_area("Recipe fields not shown above, as YAML (merged over the form)",
                     key=spec.key("extra"), height=120)
    problems.show_rest()


# --------------------------------------------------------------------------------------------------
# dry run and submission


def submit_job(recipe, cfg: AppConfig) -> int:
    """Queue a validated recipe and make sure a worker will run it; returns the job id."""
    store = job_store()
    job_id = store.submit(recipe.KIND, recipe_to_yaml(recipe), name=recipe.name or recipe.KIND)
    if cfg.spawn_workers:
        ensure_workers(store, cfg.max_workers)
    return job_id


def dry_run_and_submit(spec: FormSpec, recipe, problems: Problems, cfg: AppConfig) -> int | None:
    """'Dry run' shows the plan; 'Submit job' is enabled once the plan of exactly this recipe has
    no problems. Returns the new job id on submit."""
    text = recipe_to_yaml(recipe) if recipe is not None else None
    c1, c2 = st.columns(2)
    if c1.button("Dry run", key=spec.key("dry"), type="secondary"):
        st.session_state[spec.key("touched")] = True
        problems.visible = True
        if recipe is None:
            st.session_state[spec.key("plan")] = None
            st.error("the form has problems (shown next to the fields)")
        else:
            try:
                plan = build_plan(recipe)
                st.session_state[spec.key("plan")] = (text, plan.render(), plan.ok)
            except WorkbenchError as e:
                st.session_state[spec.key("plan")] = (text, str(e), False)
    saved = st.session_state.get(spec.key("plan"))
    fresh = bool(saved) and text is not None and saved[0] == text
    if fresh:
        st.code(saved[1], language=None)
        if not saved[2]:
            st.error("the dry run found problems (listed in the plan); fix them to submit")
    elif recipe is not None:
        st.caption("Run the dry run to see the plan; submitting needs a plan without problems.")
    clicked = c2.button("Submit job", key=spec.key("submit"), type="primary",
                        disabled=not (fresh and saved[2]))
    if clicked and recipe is not None:
        plan = build_plan(recipe)  # files may have changed since the dry run
        if not plan.ok:
            st.error("the plan has problems now:\n" + "\n".join(plan.problems))
            return None
        job_id = submit_job(recipe, cfg)
        st.session_state["jobs.selected"] = job_id
        st.session_state[spec.key("last_job")] = job_id
        st.session_state[spec.key("plan")] = None
        st.success(f"job #{job_id} queued: {recipe.KIND} '{recipe.name or recipe.KIND}'")
        st.page_link(JOBS_PAGE, label=f"Watch job #{job_id} on the Jobs page",
                     icon=":material/schedule:")
        return job_id
    return None


def yaml_preview(recipe, data: dict, cfg: AppConfig) -> None:
    with st.expander("Recipe YAML", expanded=False):
        text = (recipe_to_yaml(recipe, base_dir=cfg.home) if recipe is not None
                else yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
        st.code(text, language="yaml")


def copy_data(data: dict) -> dict:
    return copy.deepcopy(data)


def render_form(spec: FormSpec,
                draw: Callable[[Problems, AppConfig], None]) -> tuple[Any, int | None]:
    """The whole form page: file bar, the page's widgets, the YAML box, preview, dry run, submit."""
    cfg = config()
    init_state(spec, cfg)
    recipe, data, problems = form_recipe(spec, cfg)
    keep_draft(spec, data, cfg)
    c1, c2 = st.columns([5, 1])
    c1.caption(f"Your edits are kept in `{drafts.draft_path(cfg, spec.prefix)}` and come back "
               "after a reload.")
    c2.button("Reset form", key=spec.key("reset"), on_click=reset_form, args=(spec,),
              help="back to the defaults; the kept edits are removed")
    recipe_file_bar(spec, recipe, cfg)
    draw(problems, cfg)
    extra_fields(spec, problems)
    yaml_preview(recipe, data, cfg)
    job_id = dry_run_and_submit(spec, recipe, problems, cfg)
    return recipe, job_id


# --------------------------------------------------------------------------------------------------
# results of this page's jobs


def job_picker(kind: str, label: str = "Results of job") -> Any:
    """Choose one of the jobs of `kind` (newest first; the one just submitted preselected)."""
    jobs = job_store().list(kind=kind, limit=50)
    if not jobs:
        return None
    ids = [j.id for j in jobs]
    key = f"{kind}.results_job"
    last = st.session_state.get(f"{kind}.last_job")
    if last in ids and st.session_state.get(f"{kind}.results_for") != last:
        st.session_state[key] = last
        st.session_state[f"{kind}.results_for"] = last
    if st.session_state.get(key) not in ids:
        st.session_state[key] = ids[0]
    by_id = {j.id: j for j in jobs}
    st.selectbox(label, ids, key=key,
                 format_func=lambda i: f"#{i} '{by_id[i].name}': {by_id[i].status}")
    return by_id[st.session_state[key]]


def job_progress(job) -> None:
    """One progress bar for the whole job, the phase beside it (the Jobs page has the full
    view); a failed job shows its error under it."""
    st.progress(job_fraction(job), text=f"#{job.id}: " + progress_text(job, job_store().gpu_holder()))
    if job.error:
        (st.warning if job.status == "cancelled" else st.error)(job.error)


def image_files(folder: Path, limit: int = 24) -> list[Path]:
    """Newest images under a folder (previews, samples, grid cells)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)[:limit]


def recipe_of(job) -> Any:
    try:
        return parse_recipe(job.recipe, job.source)
    except WorkbenchError:
        return None
