"""Held-out splits for choosing by score: reference pictures and seeds that selection never sees.

`workbench pick` and `kind: merge_search` both choose among candidates by a style score against the
user's own pictures. A choice made and judged on the same pictures and seeds rewards noise, so each
reference set is split once into a *selection* part (scored while choosing) and a *held-out* part
(scored only to check the choice), and the seeds used to check never appear among the seeds used to
choose (workbench/recipes/choice.py ChoiceSeeds refuses a recipe that shares them). The split depends only on the file names' hashes, so it is the same on every run and every
machine, and adding a picture does not reshuffle the others.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.grid.scores import reference_images


@dataclass(frozen=True)
class ReferenceSplit:
    """The user's reference pictures, split by name hash into selection and held-out parts."""

    selection: tuple[Path, ...]
    held_out: tuple[Path, ...]
    folder: Path  # the folder split (the pictures' names are relative to it)


def _rank(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


def split_references(folder: Path, held_out_fraction: float = 0.3, *, field: str = "reference_dir",
                     minimum: int = 1) -> ReferenceSplit:
    """Split `folder`'s pictures: the `held_out_fraction` with the smallest name hashes are held out.

    At least `minimum` pictures go to each side; fewer than 2 * minimum pictures is an error naming
    `field`, since a check on pictures that selection also saw would not be a check.
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise WorkbenchError(f"{field}: held_out_fraction must be between 0 and 1 (exclusive), "
                             f"got {held_out_fraction}")
    folder = Path(folder)
    images = reference_images(folder)
    if len(images) < 2 * minimum:
        raise WorkbenchError(f"{field}: {folder} has {len(images)} picture(s); at least {2 * minimum} are "
                             "needed so that some are held out from selection (png, jpg, webp, bmp)")
    ranked = sorted(images, key=lambda p: _rank(p.relative_to(folder).as_posix()))
    n_held = min(max(minimum, round(len(images) * held_out_fraction)), len(images) - minimum)
    held = set(ranked[:n_held])
    return ReferenceSplit(selection=tuple(p for p in images if p not in held),
                          held_out=tuple(p for p in images if p in held), folder=folder)
