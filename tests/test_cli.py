"""The `workbench` command: clean errors (status 2, no traceback), dry runs, help that explains."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from workbench import __version__
from workbench.cli import main
from workbench.recipes import KNOWN_MERGE_METHODS

GENERATE = """\
kind: generate
model: models/base
prompt: "a lighthouse at dusk"
steps: 4
output: {dir: outputs/images}
"""


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def make_model_folder(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "base"
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')


def test_bad_recipe_is_a_clean_error(tmp_path, capsys):
    path = write(tmp_path, GENERATE.replace("steps: 4", "stesp: 4"))
    assert main(["run", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"error: invalid recipe {path} (1 problem):\n")
    assert f"{path}:4: stesp: unknown field 'stesp'; did you mean 'steps'?" in err
    assert "Traceback" not in err


def test_missing_recipe_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "no such recipe file" in capsys.readouterr().err


def test_dry_run_prints_plan_and_problems(tmp_path, capsys):
    path = write(tmp_path, GENERATE)
    assert main(["run", "--dry-run", str(path)]) == 1  # problems: the model is missing
    out = capsys.readouterr().out
    assert out.startswith(f"plan: generate 'recipe' from {path}")
    assert f"model: not found: {tmp_path / 'models' / 'base'}" in out
    make_model_folder(tmp_path)
    assert main(["generate", "--dry-run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "problems: none" in out and "(folder, diffusers folder)" in out


def test_kind_subcommand_checks_kind(tmp_path, capsys):
    path = write(tmp_path, GENERATE)
    assert main(["merge", "--dry-run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "is a generate recipe, not a merge recipe" in err and "workbench generate" in err


def test_merge_list(capsys):
    assert main(["merge", "--list"]) == 0
    out = capsys.readouterr().out
    for name in KNOWN_MERGE_METHODS:
        assert name in out
    assert main(["merge"]) == 2
    assert "--list" in capsys.readouterr().err


def test_models_scan(tmp_path, capsys):
    assert main(["models", "scan", str(tmp_path), "--json", "--no-hash"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["models", "scan", str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_app_refuses_remote_host(capsys):
    assert main(["app", "--host", "0.0.0.0"]) == 2
    assert "--allow-remote" in capsys.readouterr().err


def test_demo_calls_demo_main(monkeypatch):
    import workbench.demo

    seen = []
    monkeypatch.setattr(workbench.demo, "main", lambda args: seen.append(args.fresh) or 0)
    assert main(["demo", "--fresh"]) == 0
    assert seen == [True]


def test_keyboard_interrupt_is_cancelled(tmp_path, capsys, monkeypatch):
    import workbench.cli

    def interrupted(args, kind):
        raise KeyboardInterrupt

    monkeypatch.setattr(workbench.cli, "_cmd_recipe", interrupted)
    assert main(["run", "x.yaml"]) == 130
    assert capsys.readouterr().err.strip() == "cancelled"


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"workbench {__version__}"


@pytest.mark.parametrize("argv, words", [
    ([], ["Merge checkpoints", "examples:", "workbench demo"]),
    (["run"], ["Run a recipe file of any kind", "--dry-run", "--overwrite"]),
    (["merge"], ["Merge checkpoints", "--list", "merge recipe"]),
    (["train"], ["style LoRA", "train recipe"]),
    (["grid"], ["X/Y(/Z) grid", "grid recipe"]),
    (["generate"], ["Generate images", "generate recipe"]),
    (["demo"], ["tiny real-layout models", "--fresh"]),
    (["models", "scan"], ["architecture", "--no-hash", "--json"]),
    (["app"], ["dashboard", "--allow-remote", "--port"]),
])
def test_help_explains_each_command(capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for word in words:
        assert word in out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
