"""A finished (or stopped) `workbench train` output folder, read back: what `workbench pick` chooses from.

The folder is what workbench/kinds/train.py writes: `<name>-step00000250.safetensors` every
`output.save_every` steps, the final `<name>.safetensors` (+ its A1111 sidecar `<name>.json`,
workbench/train/export.py) and `provenance.json` (the recipe text, the base model and the dataset
folder as absolute paths). Each LoRA file's own `ss_steps` metadata (export.lora_metadata) says
which step it holds, so renamed or copied step files are still placed right; the file name is
the fallback.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from workbench.errors import WorkbenchError
from workbench.formats.safetensors_io import read_header
from workbench.provenance import PROVENANCE_FILE

_STEP_FILE = re.compile(r"^(?P<name>.+)-step(?P<step>\d+)\.safetensors$")


@dataclass
class TrainingRun:
    """The facts `pick` needs from a training output folder."""

    folder: Path
    name: str                      # the LoRA's name (recipe `name`, `ss_output_name`)
    base: Path                     # the base model it was trained on
    dataset: Path                  # the training pictures
    trigger: str | None
    resolution: tuple[int, int]
    steps: dict[int, Path] = field(default_factory=dict)  # step -> LoRA file, ascending
    recipe: dict[str, Any] = field(default_factory=dict)  # the train recipe as YAML data

    @property
    def last_step(self) -> int:
        return max(self.steps)

    @property
    def sidecar(self) -> Path:
        """The A1111 sidecar train wrote beside the final LoRA (may be absent or user-edited)."""
        return self.folder / f"{self.name}.json"


def _resolution(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    return 512, 512


def read_training_run(folder: str | Path) -> TrainingRun:
    """Read a training output folder; a clear error naming the file when it is not one."""
    folder = Path(folder)
    prov_path = folder / PROVENANCE_FILE
    if not folder.is_dir():
        raise WorkbenchError(f"training: {folder} is not a folder (expected a `workbench train` "
                             "output folder with its step files and provenance.json)")
    try:
        prov = json.loads(prov_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WorkbenchError(f"training: {prov_path} is missing; expected the output folder of "
                             "`workbench train` (it writes provenance.json at the end of a run)") from None
    except (OSError, ValueError) as e:
        raise WorkbenchError(f"training: cannot read {prov_path}: {e}") from e
    if prov.get("kind") != "train":
        raise WorkbenchError(f"training: {prov_path} records a {prov.get('kind')!r} run, not a "
                             "training run")
    inputs = prov.get("inputs", {})
    try:
        base, dataset = Path(inputs["base"]["path"]), Path(inputs["dataset"]["path"])
    except (KeyError, TypeError):
        raise WorkbenchError(f"training: {prov_path} lacks inputs.base.path or "
                             "inputs.dataset.path") from None
    try:
        recipe = yaml.safe_load((prov.get("recipe") or {}).get("text") or "") or {}
    except yaml.YAMLError:
        recipe = {}
    name = str(recipe.get("name") or prov.get("name") or "")
    if not name:
        raise WorkbenchError(f"training: {prov_path} does not name the LoRA")
    steps: dict[int, Path] = {}
    for path in sorted(folder.glob("*.safetensors")):
        m = _STEP_FILE.match(path.name)
        if path.name == f"{name}.safetensors" or (m and m["name"] == name):
            meta = read_header(path).metadata
            try:
                step = int(meta["ss_steps"])
            except (KeyError, ValueError):
                if not m:
                    continue
                step = int(m["step"])
            steps.setdefault(step, path)
    if not steps:
        raise WorkbenchError(f"training: no LoRA files of '{name}' in {folder} (expected "
                             f"{name}-stepNNNNNNNN.safetensors or {name}.safetensors)")
    trigger = recipe.get("trigger")
    if not trigger:
        final = steps[max(steps)]
        trigger = read_header(final).metadata.get("modelspec.trigger_phrase") or None
    return TrainingRun(folder=folder, name=name, base=base, dataset=dataset, trigger=trigger,
                       resolution=_resolution(recipe.get("resolution", 512)),
                       steps=dict(sorted(steps.items())), recipe=recipe)


def caption_texts(dataset: Path) -> set[str]:
    """Every caption in the dataset (the .txt/.caption beside each picture), lower-cased, for
    refusing adherence prompts the LoRA was trained on."""
    found = set()
    for path in Path(dataset).rglob("*"):
        if path.suffix.lower() in (".txt", ".caption") and path.is_file():
            try:
                found.add(" ".join(path.read_text(encoding="utf-8", errors="replace").split()).lower())
            except OSError:
                continue
    return found
