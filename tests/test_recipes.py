"""Recipes: the forms in docs/recipes.md validate exactly; every error names file, line, field,
expectation. Every ```yaml example in docs/recipes.md is loaded here with the project's loader."""

from __future__ import annotations

import re
import textwrap
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from workbench.errors import OutputExistsError, RecipeError, WorkbenchError
from workbench.recipes import (
    KNOWN_MERGE_METHODS,
    MERGE_METHOD_RULES,
    RECIPE_KINDS,
    GenerateRecipe,
    MergeRecipe,
    expand_range,
    load_recipe,
    parse_recipe,
    recipe_to_yaml,
    split_lora,
)
from workbench.dispatch import build_plan, register_handler, run_recipe
from workbench.plan import RunResult

REPO = Path(__file__).resolve().parent.parent

# ---- the first form of the recipe contract (docs/recipes.md), verbatim; it must keep loading ------
MERGE_MD = """\
kind: merge
name: dreamy-v2
models:                      # named inputs: single-file .safetensors (or diffusers folders)
  A: models/mine_v1.safetensors
  B: models/dreamshaper_8.safetensors
  C: models/sd15_base.safetensors
steps:                       # evaluated in order; each result is named by its id
  - id: tuned
    method: add_difference   # A + alpha * (B - C)
    inputs: [A, B, C]
    alpha: 0.7
  - id: final
    method: block_weighted   # per-block weighted sum of the first input toward the second
    inputs: [tuned, A]
    blocks: "0,0.2,0.4,0.6,0.8,1,1,1,1,1,1,1,1,0.5,1,1,1,1,1,1,0.8,0.6,0.4,0.2,0,0"
output:
  path: outputs/merges/dreamy-v2.safetensors   # the last step is written unless `from:` names another
  dtype: fp16                # fp16 | bf16 | fp32 (default: dtype of the first input)
"""

TRAIN_MD = """\
kind: train
name: my-style
base: models/sd15_base.safetensors
dataset: datasets/sample-style    # kohya layout ("10_mystyle/" repeats folders) or a flat folder of
                                  # images with same-named .txt (or .caption) files
trigger: mystyle                  # prepended to every caption
resolution: 512
network: {type: lora, rank: 16, alpha: 8}
max_steps: 1000
batch_size: 1
learning_rate: 1.0e-4
seed: 42
samples: {every: 250, prompts: ["mystyle, a lighthouse at dusk"], seed: 1}
output: {dir: outputs/loras/my-style, save_every: 250}
"""

GRID_MD = """\
kind: grid
name: v1-vs-v2
defaults: {model: models/mine_v1.safetensors, sampler: "Euler a", steps: 20, cfg: 7.0,
           width: 512, height: 512}
x: {axis: model, values: [models/mine_v1.safetensors, outputs/merges/dreamy-v2.safetensors]}
y: {axis: prompt, values: ["a lighthouse at dusk", "portrait of a knight"]}
seeds: [1, 2, 3]
scores:
  clip: {model: ViT-L-14, weights: models/clip/open_clip_vit_l14.safetensors}
output: {dir: outputs/grids/v1-vs-v2}
"""

GENERATE_MD = """\
kind: generate
model: models/mine_v1.safetensors
prompt: "a lighthouse at dusk"
negative_prompt: ""
sampler: "DPM++ 2M Karras"
steps: 20
cfg: 7.0
width: 512
height: 512
seed: 1
count: 4
loras: ["outputs/loras/my-style/my-style.safetensors:0.8"]
memory: {vram_budget_mb: 12000, weights: auto}   # auto | fp16 | bf16 | fp8 | nf4
output: {dir: outputs/images}
"""

EXAMPLES = {"merge": MERGE_MD, "train": TRAIN_MD, "grid": GRID_MD, "generate": GENERATE_MD}


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems_of(path: Path) -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    return str(e.value)


DOCS = REPO / "docs" / "recipes.md"
# A ```yaml block, optionally preceded by `<!-- invalid: TEXT -->`: such an example must be rejected
# with an error that contains TEXT; every other example must load.
_YAML_BLOCK = re.compile(r"(?:<!--\s*invalid:\s*(?P<why>.*?)\s*-->\s*\n)?```yaml\n(?P<text>.*?)```",
                         re.S)


def doc_examples() -> list[tuple[int, str, str | None]]:
    """(line, YAML text, expected error or None) for each ```yaml block of docs/recipes.md."""
    md = DOCS.read_text(encoding="utf-8")
    return [(md.count("\n", 0, m.start("text")) + 1, m["text"], m["why"])
            for m in _YAML_BLOCK.finditer(md)]


def test_docs_hold_every_kind_and_the_original_forms():
    import yaml  # only to compare data: the contract forms may carry updated comments in the docs

    examples = doc_examples()
    assert len(examples) >= 10, "docs/recipes.md lost its examples"
    kinds = {yaml.safe_load(text)["kind"] for _, text, _ in examples}
    assert kinds == set(RECIPE_KINDS)
    in_docs = [yaml.safe_load(text) for _, text, why in examples if why is None]
    for kind, form in EXAMPLES.items():
        assert yaml.safe_load(form) in in_docs, f"the original {kind} form is missing from {DOCS}"
    assert any(why for _, _, why in examples), "no deliberately invalid example is checked"


@pytest.mark.parametrize("line,text,why", doc_examples(),
                         ids=[f"recipes.md:{line}" for line, _, _ in doc_examples()])
def test_docs_example(tmp_path, line, text, why):
    """Each example as a user would save it; a marked one must fail for the reason it gives."""
    path = write(tmp_path, text, f"example-{line}.yaml")
    if why is None:
        recipe = load_recipe(path)
        assert recipe.KIND == text.split("kind:", 1)[1].split()[0]
    else:
        assert why in problems_of(path), f"docs/recipes.md:{line} should fail with {why!r}"


def test_merge_example(tmp_path):
    r = load_recipe(write(tmp_path, MERGE_MD))
    assert isinstance(r, MergeRecipe) and r.name == "dreamy-v2"
    assert r.models["B"] == tmp_path / "models" / "dreamshaper_8.safetensors"
    assert [s.id for s in r.steps] == ["tuned", "final"]
    assert r.steps[0].alpha == 0.7 and r.steps[0].inputs == ["A", "B", "C"]
    assert r.steps[1].blocks.startswith("0,0.2,0.4")
    assert r.output.dtype == "fp16" and r.final_step == "final"
    assert r.output.path == tmp_path / "outputs" / "merges" / "dreamy-v2.safetensors"


def test_train_example(tmp_path):
    r = load_recipe(write(tmp_path, TRAIN_MD))
    assert r.dataset == tmp_path / "datasets" / "sample-style"
    assert (r.network.type, r.network.rank, r.network.alpha) == ("lora", 16, 8.0)
    assert r.learning_rate == pytest.approx(1e-4) and r.max_steps == 1000
    assert r.samples.every == 250 and r.samples.prompts == ["mystyle, a lighthouse at dusk"]
    assert r.lora_path == tmp_path / "outputs" / "loras" / "my-style" / "my-style.safetensors"
    assert r.optimizer == "AdamW" and r.lr_scheduler == "constant"  # kohya defaults


def test_grid_example(tmp_path):
    r = load_recipe(write(tmp_path, GRID_MD))
    assert r.x.axis == "model" and r.x.values[1] == tmp_path / "outputs/merges/dreamy-v2.safetensors"
    assert r.y.values == ["a lighthouse at dusk", "portrait of a knight"]
    assert r.defaults.sampler == "Euler a" and r.seeds == [1, 2, 3]
    assert r.scores.clip.weights == tmp_path / "models/clip/open_clip_vit_l14.safetensors"
    assert r.cell_count() == 12


def test_generate_example(tmp_path):
    r = load_recipe(write(tmp_path, GENERATE_MD, "lighthouse.yaml"))
    assert isinstance(r, GenerateRecipe)
    assert r.name == "lighthouse"  # defaults to the file name
    assert r.sampler == "DPM++ 2M Karras" and r.count == 4 and r.memory.vram_budget_mb == 12000
    assert r.loras[0].weight == 0.8
    assert r.loras[0].path == tmp_path / "outputs/loras/my-style/my-style.safetensors"


@pytest.mark.parametrize("kind", list(EXAMPLES))
def test_yaml_round_trip(tmp_path, kind):
    path = write(tmp_path, EXAMPLES[kind])
    r = load_recipe(path)
    text = recipe_to_yaml(r)
    assert str(tmp_path) not in text  # paths are written relative to the recipe's folder
    again = parse_recipe(text, path)
    assert again.model_dump() == r.model_dump()


def test_source_is_kept_for_provenance(tmp_path):
    path = write(tmp_path, MERGE_MD)
    r = load_recipe(path)
    assert r.source_path == path.resolve() and r.source_text == MERGE_MD


def test_paths_resolve_against_the_recipe_folder(tmp_path, monkeypatch):
    sub = tmp_path / "recipes"
    sub.mkdir()
    text = GENERATE_MD.replace("models/mine_v1.safetensors", "../models/x.safetensors")
    text = text.replace("dir: outputs/images", f"dir: {tmp_path / 'abs'}")
    monkeypatch.chdir(tmp_path / "recipes")  # the current folder must not matter
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    r = load_recipe(write(sub, text))
    assert r.model == tmp_path / "models" / "x.safetensors"
    assert r.output.dir == tmp_path / "abs"
    assert all(p.is_absolute() for p in (r.model, r.output.dir, r.loras[0].path))


def test_example_recipes_in_repo_validate():
    found = sorted((REPO / "recipes").glob("*.yaml"))
    kinds = {load_recipe(p).kind for p in found}
    assert kinds == {"merge", "train", "grid", "generate", "extract_lora", "pick", "merge_search"}


# ---- errors: file + line + field + expectation --------------------------------------------------


def test_unknown_field_did_you_mean(tmp_path):
    path = write(tmp_path, MERGE_MD.replace("    alpha: 0.7", "    alpah: 0.7"))
    msg = problems_of(path)
    assert f"{path}:11: steps[0].alpah: unknown field 'alpah'; did you mean 'alpha'?" in msg
    # the missing alpha is not reported twice: schema errors come first
    assert "Traceback" not in msg


def test_wrong_type_names_line_and_got(tmp_path):
    path = write(tmp_path, TRAIN_MD.replace("max_steps: 1000", "max_steps: lots"))
    assert f"{path}:9: max_steps: expected a whole number (got 'lots')" in problems_of(path)


def test_every_problem_is_collected_in_one_error(tmp_path):
    text = GENERATE_MD.replace("steps: 20", "steps: 0").replace("width: 512", "width: 500")
    text = text.replace('sampler: "DPM++ 2M Karras"', 'sampler: "Eular a"')
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    lines = str(e.value).splitlines()
    assert lines[0] == f"invalid recipe {path} (3 problems):"
    assert lines[1].startswith(f"{path}:5: sampler: unknown sampler 'Eular a'; did you mean 'Euler a'?")
    assert lines[2] == f"{path}:6: steps: expected a number greater than 0 (got 0)"
    assert lines[3] == f"{path}:8: width: expected a multiple of 8 pixels (got 500)"
    assert [p.line for p in e.value.problems] == [5, 6, 8]


def test_unknown_kind(tmp_path):
    path = write(tmp_path, MERGE_MD.replace("kind: merge", "kind: merg"))
    msg = problems_of(path)
    assert f"{path}:1: kind: unknown kind 'merg'; did you mean 'merge'?" in msg
    assert "merge, train, grid, generate" in msg


def test_missing_kind(tmp_path):
    path = write(tmp_path, "name: x\n")
    assert f"{path}:1: kind: missing" in problems_of(path)


def test_missing_required_field_points_at_its_parent(tmp_path):
    path = write(tmp_path, MERGE_MD.replace("  path: outputs/merges/dreamy-v2.safetensors", "  prune: true"))
    assert f"{path}:16: output.path: required field is missing" in problems_of(path)


def test_step_input_must_be_a_model_or_earlier_step(tmp_path):
    path = write(tmp_path, MERGE_MD.replace("inputs: [tuned, A]", "inputs: [tunde, A]"))
    msg = problems_of(path)
    assert f"{path}:14: steps[1].inputs[0]: unknown input 'tunde'; did you mean 'tuned'?" in msg
    path = write(tmp_path, MERGE_MD.replace("inputs: [A, B, C]", "inputs: [A, B, final]"))
    assert f"{path}:10: steps[0].inputs[2]: input 'final' is a later step" in problems_of(path)


def test_method_checks(tmp_path):
    text = MERGE_MD.replace("method: add_difference", "method: add_diference")
    path = write(tmp_path, text)
    assert "steps[0].method: unknown merge method 'add_diference'; did you mean 'add_difference'?" \
        in problems_of(path)
    path = write(tmp_path, MERGE_MD.replace("inputs: [A, B, C]", "inputs: [A, B]"))
    assert f"{path}:10: steps[0].inputs: method add_difference takes 3 inputs (got 2)" in problems_of(path)
    path = write(tmp_path, MERGE_MD.replace("    alpha: 0.7", "    beta: 0.7"))
    msg = problems_of(path)
    assert "steps[0].alpha: required by method add_difference" in msg
    assert f"{path}:11: steps[0].beta: method add_difference does not use `beta`" in msg


def test_bad_block_weights(tmp_path):
    path = write(tmp_path, MERGE_MD.replace('"0,0.2,0.4,', '"0,0.2,'))
    assert f"{path}:15: steps[1].blocks: 25 values; expected 26 for SD1.5/SD2" in problems_of(path)
    path = write(tmp_path, MERGE_MD.replace('blocks: "0,0.2', 'blocks: "0,zero'))
    assert "value 2: 'zero' is not a number" in problems_of(path)
    ok = MERGE_MD.replace('blocks: "0,0.2,0.4,0.6,0.8,1,1,1,1,1,1,1,1,0.5,1,1,1,1,1,1,0.8,0.6,0.4,0.2,0,0"',
                          "blocks: {BASE: 0, D00: 1, S05: 0.5}")
    assert load_recipe(write(tmp_path, ok)).steps[1].blocks == {"BASE": 0, "D00": 1, "S05": 0.5}
    assert load_recipe(write(tmp_path, ok.replace("{BASE: 0, D00: 1, S05: 0.5}", "GRAD_V"))).steps[1].blocks == "GRAD_V"
    path = write(tmp_path, ok.replace("D00", "DOO"))
    assert "unknown block id 'DOO'" in problems_of(path)


def test_alpha_by_component(tmp_path):
    text = MERGE_MD.replace("alpha: 0.7", "alpha: {unet: 0.5, text_encoder: 0, vae: 0}")
    r = load_recipe(write(tmp_path, text))
    assert (r.steps[0].alpha.unet, r.steps[0].alpha.vae) == (0.5, 0)
    path = write(tmp_path, text.replace("vae: 0}", "vea: 0}"))
    assert f"{path}:11: steps[0].alpha.vea: unknown field 'vea'; did you mean 'vae'?" in problems_of(path)
    path = write(tmp_path, MERGE_MD.replace("alpha: 0.7", "alpha: [1, 2]"))
    assert "steps[0].alpha: expected a number (got a list)" in problems_of(path)


def test_output_from_must_name_a_step(tmp_path):
    path = write(tmp_path, MERGE_MD.replace("  dtype: fp16 ", "  from: tund\n  dtype: fp16 "))
    msg = problems_of(path)
    assert f"{path}:18: output.from: unknown step 'tund'; did you mean 'tuned'?" in msg


def test_yaml_syntax_error_has_line(tmp_path):
    path = write(tmp_path, MERGE_MD.replace("    alpha: 0.7", "    alpha: 0.7\n  bad: [unclosed"))
    msg = problems_of(path)
    assert re.search(rf"{re.escape(str(path))}:1[23]: YAML syntax error: ", msg), msg


def test_duplicate_key_and_non_mapping(tmp_path):
    path = write(tmp_path, "kind: generate\nprompt: a\nprompt: b\n")
    assert f"{path}:3: prompt: field given twice (first at line 2)" in problems_of(path)
    path = write(tmp_path, "- kind: merge\n")
    assert "expected a mapping of recipe fields" in problems_of(path)
    assert "got an empty file" in problems_of(write(tmp_path, "# nothing\n"))


def test_bad_range_syntax(tmp_path):
    text = GRID_MD.replace('y: {axis: prompt, values: ["a lighthouse at dusk", "portrait of a knight"]}',
                           'y: {axis: cfg, values: "3-9 (+0)"}')
    path = write(tmp_path, text)
    assert f"{path}:6: y.values: bad range '3-9 (+0)': the (step) must not be 0" in problems_of(path)
    r = load_recipe(write(tmp_path, text.replace("(+0)", "(+2)")))
    assert r.y.values == "3-9 (+2)"  # stored as written
    assert r.y.expanded_values() == [3.0, 5.0, 7.0, 9.0] and r.cell_count() == 24


def test_bad_axis_name(tmp_path):
    path = write(tmp_path, GRID_MD.replace("y: {axis: prompt", "y: {axis: promt"))
    assert f"{path}:6: y.axis: unknown axis 'promt'; did you mean 'prompt'?" in problems_of(path)
    path = write(tmp_path, GRID_MD.replace("y: {axis: prompt", "y: {axis: model"))
    assert f"{path}:6: y.axis: axis 'model' is already used by x" in problems_of(path)


def test_bad_lora_weight(tmp_path):
    path = write(tmp_path, GENERATE_MD.replace("safetensors:0.8", "safetensors:strong"))
    msg = problems_of(path)
    assert f"{path}:12: loras[0]: bad LoRA weight 'strong'" in msg and "'path:weight'" in msg


def test_yaml_no_is_not_false(tmp_path):
    r = load_recipe(write(tmp_path, TRAIN_MD + "mixed_precision: no\n"))
    assert r.mixed_precision == "no"


def test_direct_construction_checks_references():
    with pytest.raises(ValidationError, match="unknown input 'Z'"):
        MergeRecipe(name="x", models={"A": "a.safetensors", "B": "b.safetensors"},
                    steps=[{"id": "s", "method": "weighted_sum", "inputs": ["A", "Z"], "alpha": 0.5}],
                    output={"path": "out.safetensors"})


# ---- small parsers --------------------------------------------------------------------------------


@pytest.mark.parametrize("text, integer, expected", [
    ("1-10 (+2)", True, [1, 3, 5, 7, 9]),
    ("1-5", True, [1, 2, 3, 4, 5]),
    ("10-1 (-3)", True, [10, 7, 4, 1]),
    ("1, 5-7, 20", True, [1, 5, 6, 7, 20]),
    ("0.2-1.0 [5]", False, [0.2, 0.4, 0.6, 0.8, 1.0]),
    ("1-2 (+0.25)", False, [1.0, 1.25, 1.5, 1.75, 2.0]),
    ("1-10 [4]", True, [1, 4, 7, 10]),
    ("-1--3", True, [-1, -2, -3]),
])
def test_expand_range(text, integer, expected):
    assert expand_range(text, integer=integer) == expected


@pytest.mark.parametrize("text, why", [
    ("1-10 (-2)", "never goes from 1 to 10"),
    ("1-10 [0]", "at least 1"),
    ("one-ten", "cannot read 'one-ten'"),
    ("1,,2", "empty"),
    ("1.5-3", "not a whole number"),
])
def test_expand_range_errors(text, why):
    with pytest.raises(Exception, match=re.escape(why)):
        expand_range(text, integer=True)


@pytest.mark.parametrize("text, path, weight", [
    ("loras/style.safetensors:0.8", "loras/style.safetensors", 0.8),
    ("loras/style.safetensors", "loras/style.safetensors", 1.0),
    (r"C:\loras\style.safetensors:0.6", r"C:\loras\style.safetensors", 0.6),
    (r"C:\loras\style.safetensors", r"C:\loras\style.safetensors", 1.0),
    ("D:/loras/style.safetensors:-0.5", "D:/loras/style.safetensors", -0.5),
    ("style:1", "style", 1.0),
])
def test_split_lora(text, path, weight):
    assert split_lora(text) == (path, weight)


def test_known_merge_methods():
    assert sorted(KNOWN_MERGE_METHODS) == sorted([
        "weighted_sum", "add_difference", "block_weighted", "triple_sum", "sum_twice",
        "train_difference", "add_cosine_a", "add_cosine_b", "ties", "dare", "slerp", "model_stock",
        "no_merge", "add_lora"])
    assert set(MERGE_METHOD_RULES) == set(KNOWN_MERGE_METHODS)


def test_method_rules_come_from_the_engine_registry():
    from workbench.merge.methods import METHODS

    assert set(MERGE_METHOD_RULES) == set(METHODS)
    assert MERGE_METHOD_RULES["block_weighted"].required == ("blocks",)
    assert MERGE_METHOD_RULES["ties"].max_inputs is None
    assert MERGE_METHOD_RULES["add_difference"].required == ("alpha",)
    assert "blocks" in MERGE_METHOD_RULES["weighted_sum"].optional


# ---- dry run and runner ---------------------------------------------------------------------------


def test_dry_run_lists_missing_files_as_problems(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mine_v1.safetensors").write_bytes(b"not a safetensors file at all")
    r = load_recipe(write(tmp_path, MERGE_MD))
    result = run_recipe(r, dry_run=True)
    assert isinstance(result, RunResult) and result.dry_run
    plan = result.plan
    text = plan.render()
    missing = tmp_path / "models" / "dreamshaper_8.safetensors"
    assert f"B: not found: {missing}" in plan.problems
    assert f"  C  {tmp_path / 'models' / 'sd15_base.safetensors'}  (MISSING)" in text
    assert any(p.startswith("A: ") for p in plan.problems)  # unreadable header is a problem too
    assert "2. final = block_weighted(tuned, A)" in text
    assert plan.outputs == [tmp_path / "outputs/merges/dreamy-v2.safetensors"]
    assert str(result) == text


@pytest.mark.slow
def test_real_run_refuses_problems_and_existing_outputs(tmp_path, tiny_model):
    model_dir = tmp_path / "models" / "mine_v1.safetensors"  # a diffusers folder stands in
    model_dir.mkdir(parents=True)
    (model_dir / "model_index.json").write_text("{}")
    calls = []
    register_handler("generate", lambda recipe, **kw: calls.append((recipe, kw)) or [tmp_path / "x.png"])
    try:
        r = load_recipe(write(tmp_path, GENERATE_MD))
        with pytest.raises(RecipeError, match=r"loras\[0\]: not found: .*my-style.safetensors"):
            run_recipe(r)
        assert calls == []
        ok = load_recipe(write(tmp_path, GENERATE_MD.replace(
            'loras: ["outputs/loras/my-style/my-style.safetensors:0.8"]', "loras: []")))
        result = run_recipe(ok, progress=False)
        assert result.outputs == [tmp_path / "x.png"] and not result.dry_run
        assert calls[0][1] == {"overwrite": False, "progress": False}
    finally:
        register_handler("generate", None)

    (tmp_path / "outputs/merges").mkdir(parents=True)
    out = tmp_path / "outputs/merges/dreamy-v2.safetensors"
    out.write_bytes(b"old")
    shutil.copy(tiny_model("sd15", 0), tmp_path / "models" / "tiny.safetensors")
    m = load_recipe(write(tmp_path, MERGE_MD.replace("inputs: [A, B, C]", "inputs: [A, A, A]")
                          .replace("A: models/mine_v1.safetensors", "A: models/tiny.safetensors")
                          .replace("  B: models/dreamshaper_8.safetensors\n", "")
                          .replace("  C: models/sd15_base.safetensors\n", "")))
    plan = build_plan(m)
    assert plan.existing_outputs == [out]
    register_handler("merge", lambda recipe, **kw: [out])
    try:
        with pytest.raises(OutputExistsError, match="--overwrite"):
            run_recipe(m)
        assert run_recipe(m, overwrite=True).outputs == [out]
    finally:
        register_handler("merge", None)


def test_unknown_kind_is_refused_by_the_dispatcher(tmp_path):
    r = load_recipe(write(tmp_path, GRID_MD))
    with pytest.raises(WorkbenchError, match="unknown recipe kind 'nope'"):
        build_plan(r.model_copy(update={"kind": "nope"}))
