"""Provenance: what made an output, so that it can be trusted, compared and re-run.

Every run writes `provenance.json` into its output folder: the recipe (text and path), the sha256 of
every input file, the versions of the libraries that did the work, the seeds and the timings.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator
from workbench import __version__
from workbench.formats.hashes import sha256_file
from workbench.formats.writer import atomic_write_text

PROVENANCE_FILE = "provenance.json"
LIBRARIES = ("torch", "diffusers", "transformers", "safetensors", "peft", "accelerate", "open_clip_torch")


def versions() -> dict[str, str]:
    """Versions of Python, the platform and the libraries that shape numeric results."""
    out = {"workbench": __version__, "python": sys.version.split()[0], "platform": platform.platform()}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = "not installed"
    return out


def input_record(path: str | Path) -> dict[str, Any]:
    """Identity of one input file: path, size, full sha256 and the A1111 short hash."""
    p = Path(path)
    if p.is_dir():
        return {"path": str(p), "kind": "folder"}
    digest = sha256_file(p)
    return {"path": str(p), "size": p.stat().st_size, "sha256": digest, "autov2": digest[:10]}


@dataclass
class Provenance:
    """Collects what a run did; `write` stores it next to the results."""

    kind: str
    name: str
    recipe_path: str | None = None
    recipe_text: str | None = None
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    seeds: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def add_input(self, label: str, path: str | Path) -> None:
        self.inputs[label] = input_record(path)

    @contextmanager
    def timed(self, label: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[label] = round(time.perf_counter() - start, 3)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "name": self.name,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "recipe": {"path": self.recipe_path, "text": self.recipe_text},
            "inputs": self.inputs, "seeds": self.seeds, "timings_s": self.timings,
            "outputs": self.outputs, "versions": versions(), **({"extra": self.extra} if self.extra else {}),
        }

    def write(self, out_dir: str | Path, filename: str = PROVENANCE_FILE) -> Path:
        """Write `provenance.json` atomically (a re-run replaces the previous record of the run).
        A single-file result (a merged checkpoint) gets `<stem>.provenance.json` beside it."""
        target = Path(out_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, json.dumps(self.to_dict(), indent=2, default=str) + "\n",
                          overwrite=True)
        return target


def default_output_dir(kind: str, name: str, root: str | Path = "outputs") -> Path:
    """`outputs/<kind>/<name>/`: where a run writes when its recipe names no output."""
    return Path(root) / kind / name
