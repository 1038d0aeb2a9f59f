"""Issue #14: the demo writes under the user's data folder (or `--out`), never into the checkout.
Each way of finding the data folder is forced here on Linux (workbench/userdirs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from workbench import demo, userdirs
from workbench.cli import main as cli_main
from workbench.recipes.loader import load_recipe
from workbench.recipes.shareable import path_values

ENV = ("WORKBENCH_DATA", "LOCALAPPDATA", "XDG_DATA_HOME")


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty home folder and none of the variables set."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: home))
    return home


def test_data_root_by_capability(home, tmp_path, monkeypatch):
    assert userdirs.data_root() == home / ".local" / "share" / "workbench"  # the XDG default
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    assert userdirs.data_root() == home / ".local" / "share" / "workbench"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert userdirs.data_root() == tmp_path / "xdg" / "workbench"
    (home / "Library" / "Application Support").mkdir(parents=True)  # what macOS has
    assert userdirs.data_root() == home / "Library" / "Application Support" / "workbench"
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "AppData" / "Local"))  # what Windows has
    assert userdirs.data_root() == tmp_path / "AppData" / "Local" / "workbench"
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "mine"))
    assert userdirs.data_root() == tmp_path / "mine"


def test_demo_root_is_the_data_folder_or_out(home, tmp_path):
    assert demo.demo_root() == home / ".local" / "share" / "workbench" / "demo"
    assert demo.demo_root(tmp_path / "d") == tmp_path / "d"
    assert not demo.demo_root().is_relative_to(demo.REPO_ROOT)


def test_demo_recipes_read_and_write_under_the_demo_folder(tmp_path):
    """The copied example recipes name only the demo folder and the bundled datasets."""
    root = tmp_path / "demo"
    folder = demo.prepare_recipes(root)
    names = sorted(p.name for p in folder.glob("*.yaml"))
    assert names == sorted(p.name for p in (demo.REPO_ROOT / "recipes").glob("*.yaml")) and names
    datasets = demo.REPO_ROOT / "datasets"
    for path in folder.glob("*.yaml"):
        lines = [x for x in path.read_text().splitlines() if not x.lstrip().startswith("#")]
        assert not [x for x in lines if "outputs/demo" in x], path.name
        recipe = load_recipe(path)
        paths = path_values(recipe)
        assert paths, path
        for p in paths:
            p = p.resolve()
            assert p.is_relative_to(root.resolve()) or p.is_relative_to(datasets), (path.name, p)
    train = load_recipe(folder / "train-demo.yaml")
    assert train.dataset.resolve() == datasets / "sample-style" and train.dataset.is_dir()


def test_demo_prints_where_it_writes_and_keeps_out_of_the_checkout(tmp_path, monkeypatch, capsys):
    """`workbench demo --out DIR`: each step gets that folder (the steps themselves, minutes of
    tiny-model work, are covered by the recipe tests); the first line says where."""
    seen = {}
    monkeypatch.setattr(demo, "build_models", lambda d, fresh=False: seen.setdefault("models", d) and {})
    monkeypatch.setattr(demo, "run_recipes", lambda d: seen.setdefault("recipes", d) and [])
    monkeypatch.setattr(demo, "render_previews", lambda m, d: seen.setdefault("previews", d) and [])
    monkeypatch.setattr(demo, "scan", lambda d: [])
    monkeypatch.setattr(demo, "format_table", lambda rows: "")
    out = tmp_path / "my demo"
    assert cli_main(["demo", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"The demo writes everything under {out}\n")
    assert f"Results, all under {out}:" in text
    assert seen == {"models": out / "models", "recipes": out / "recipes", "previews": out / "previews"}
