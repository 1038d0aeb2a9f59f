"""Windows paths in recipes: double quotes turn backslashes into YAML escapes; each case gets a
message with the file, the line and the fix, and the forms that work load as written."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from workbench.errors import RecipeError
from workbench.recipes import load_recipe


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


GENERATE = """\
kind: generate
model: {model}
prompt: "a lighthouse\\nat dusk"
output: {{dir: outputs}}
"""


def test_an_escape_error_names_the_line_and_shows_both_fixes(tmp_path):
    path = write(tmp_path, GENERATE.format(model=r'"C:\Users\me\models\dream.safetensors"'))
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    message = str(e.value)
    assert f"{path}:2: YAML syntax error: in double quotes a backslash starts an escape sequence" in message
    assert r"single quotes ('C:\Users\me\models\dream.safetensors')" in message
    assert 'forward slashes ("C:/Users/me/models/dream.safetensors")' in message


def test_unknown_escape_in_a_lora_list(tmp_path):
    path = write(tmp_path, GENERATE.format(model="m.safetensors")
                 + 'loras: ["D:\\loras\\style.safetensors:0.8"]\n')
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert f"{path}:5:" in str(e.value) and "unknown escape character 'l'" in str(e.value)
    assert r"('D:\loras\style.safetensors:0.8')" in str(e.value)


def test_a_path_silently_mangled_by_escapes_is_refused(tmp_path):
    """"D:\\new\\art.safetensors" is valid YAML: D: newline ew bell rt.safetensors."""
    path = write(tmp_path, GENERATE.format(model=r'"D:\new\art.safetensors"')
                 + 'loras: ["models\\tiny.safetensors:0.5"]\n')
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    problems = e.value.problems
    assert [(p.line, p.field) for p in problems] == [(2, "model"), (5, "loras[0]")]
    assert "contains a newline (\\n)" in problems[0].message
    assert r"""single quotes ('D:\new\art.safetensors') or with forward slashes ("D:/new/art.safetensors")""" \
        in problems[0].message
    assert "contains a tab (\\t)" in problems[1].message


def test_mangled_paths_inside_mappings(tmp_path):
    path = write(tmp_path, """\
        kind: merge
        name: mix
        models: {A: a.safetensors, B: "D:\\new\\b.safetensors"}
        steps: [{id: mix, method: weighted_sum, inputs: [A, B], alpha: 0.5}]
        output: {path: "out\\\\x.safetensors"}
        """)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    (problem,) = e.value.problems
    assert (problem.line, problem.field) == (3, "models.B") and "newline" in problem.message


def test_prompts_may_hold_escapes(tmp_path):
    recipe = load_recipe(write(tmp_path, GENERATE.format(model="m.safetensors")))
    assert recipe.prompt == "a lighthouse\nat dusk"


@pytest.mark.parametrize("written, tail", [
    (r"'D:\new\art.safetensors'", r"D:\new\art.safetensors"),      # single quotes keep backslashes
    (r"D:\new\art.safetensors", r"D:\new\art.safetensors"),        # so does a plain scalar
    (r'"D:\\new\\art.safetensors"', r"D:\new\art.safetensors"),    # doubled inside double quotes
    ('"D:/new/art.safetensors"', "D:/new/art.safetensors"),        # forward slashes
])
def test_the_forms_that_work(tmp_path, written, tail):
    recipe = load_recipe(write(tmp_path, GENERATE.format(model=written)))
    assert str(recipe.model).endswith(tail)  # on POSIX "D:..." is relative, so it follows the folder


def test_forward_slashes_in_lora_references(tmp_path):
    recipe = load_recipe(write(tmp_path, GENERATE.format(model="m.safetensors")
                               + 'loras: ["C:/loras/style.safetensors:0.8", "C:/loras/plain.safetensors"]\n'))
    assert [(str(r.path).endswith(p), r.weight) for r, p in zip(recipe.loras, (
        "C:/loras/style.safetensors", "C:/loras/plain.safetensors"))] == [(True, 0.8), (True, 1.0)]
