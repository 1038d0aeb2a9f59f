"""Finished merges and LoRAs, also put where A1111/Forge/ComfyUI list them (opt-in).

With `output_to_tool_folders` (config.py), the running dashboard looks at the jobs that finish
and puts each result model into the matching folder of the configured installs: a merged
checkpoint into the checkpoint folder, a trained or extracted LoRA (with its A1111 sidecar
`<name>.json`, which carries the trigger words) into the LoRA folder, a UNet/DiT-only file into
the diffusion-model folder. Results stay in the outputs folder too; the tool's copy is a hard link
where possible (model_folders.publish) and an existing file there is never replaced. Step
checkpoints and peft copies of a training run are not put there: the tool would list every one.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.formats.detect import detect
from workbench.formats.model_folders import MODEL_KIND_TO_FOLDER, ModelFolders, publish
from workbench.formats.safetensors_io import read_header
from workbench.jobs.store import JobStore

KINDS = ("merge", "train", "extract_lora")  # recipe kinds whose results are models
_STEP = re.compile(r"-step\d+$")


def result_models(paths: list[str]) -> list[Path]:
    """The final model files among a job's results."""
    out = []
    for p in map(Path, paths):
        if p.suffix.lower() != ".safetensors" or p.name.endswith(".peft.safetensors"):
            continue
        if _STEP.search(p.stem) or not p.is_file():
            continue
        out.append(p)
    return out


def folder_kind(path: Path) -> str | None:
    """The install folder kind a model file belongs in, from its header (None: not a model)."""
    try:
        info = detect(read_header(path))
    except WorkbenchError:
        return None
    return MODEL_KIND_TO_FOLDER.get(info.kind)


def publish_result(path: Path, installs: list[ModelFolders]) -> list[str]:
    """Put one result into every install; returns lines saying what happened."""
    kind = folder_kind(path)
    if kind is None:
        return []
    lines = []
    for install in installs:
        target = publish(path, install, kind)
        if target is None:
            where = install.target(kind)
            why = (f"{where / path.name} already exists, not replaced" if where else
                   f"the {install.tool} install at {install.root} has no {kind} folder")
            lines.append(f"not put into {install.tool}: {why}")
            continue
        lines.append(f"put into {install.tool}: {target}")
        sidecar = path.with_suffix(".json")
        if kind == "lora" and sidecar.is_file():
            copied = publish(sidecar, install, kind)
            if copied is not None:
                lines.append(f"put into {install.tool}: {copied}")
    return lines


class ToolPublisher:
    """Publishes the models of jobs that finish from `since` on; `poll()` is called by the
    launcher's loop (workbench/app/__init__.py)."""

    def __init__(self, store: JobStore, installs: list[ModelFolders],
                 since: float | None = None) -> None:
        self.store, self.installs = store, installs
        self.since = time.time() if since is None else since
        self.handled: set[int] = set()

    def poll(self) -> list[str]:
        lines = []
        for job in self.store.list(statuses=("done",), limit=200):
            if job.id in self.handled or job.kind not in KINDS or (job.finished or 0) < self.since:
                continue
            self.handled.add(job.id)
            done = []
            for path in result_models(job.results):
                done += publish_result(path, self.installs)
            if done:
                self.store.log(job.id, *done)
                lines += [f"job #{job.id}: {line}" for line in done]
        return lines
