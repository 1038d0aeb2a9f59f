"""Held-out splits (workbench/grid/holdout.py): stable, disjoint, refusing too few pictures."""

from pathlib import Path

import pytest
from PIL import Image

from workbench.errors import WorkbenchError
from workbench.grid.holdout import split_references
from workbench.recipes.choice import ChoiceSeeds


def _pictures(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (8, 8), (len(name) * 20 % 255, 0, 0)).save(folder / name)


def test_split_is_disjoint_complete_and_stable_when_a_picture_is_added(tmp_path):
    names = [f"p{i:02d}.png" for i in range(10)]
    _pictures(tmp_path / "refs", names)
    first = split_references(tmp_path / "refs", 0.3)
    assert len(first.held_out) == 3 and len(first.selection) == 7
    assert not set(first.held_out) & set(first.selection)
    assert {p.name for p in first.held_out + first.selection} == set(names)
    _pictures(tmp_path / "refs", ["p99.png"])
    second = split_references(tmp_path / "refs", 0.3)
    # a new picture moves at most itself and one boundary picture; the rest keep their side
    moved = {p.name for p in first.held_out} ^ {p.name for p in second.held_out}
    assert moved <= {"p99.png"} | {p.name for p in first.held_out + second.held_out}
    assert len({p.name for p in first.held_out} & {p.name for p in second.held_out}) >= 2


def test_too_few_pictures_names_the_field(tmp_path):
    _pictures(tmp_path / "refs", ["only.png"])
    with pytest.raises(WorkbenchError, match="reference_dir.*1 picture"):
        split_references(tmp_path / "refs")


def test_seeds_used_to_choose_and_to_check_are_refused():
    (where, message), = ChoiceSeeds(selection=[1, 2], evaluation="2-3").errors()
    assert where == ("seeds", "evaluation") and "[2]" in message
    assert ChoiceSeeds(selection=[1, 2], evaluation=[3, 4]).errors() == []
    assert "random" in ChoiceSeeds(selection=[-1], evaluation=[3]).errors()[0][1]
