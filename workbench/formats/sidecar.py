"""The A1111/Forge LoRA user-metadata sidecar (`<lora name>.json` beside the LoRA), read and merged.

A1111's Lora extension (extensions-builtin/Lora: ui_edit_user_metadata.py writes, and
ui_extra_networks_lora.py reads) keeps, per LoRA, a JSON object with the keys in `FIELDS`:
"preferred weight" (a number, 0 = use the default multiplier) is what a click on the LoRA card puts
in `<lora:name:WEIGHT>`, "activation text" is appended to the prompt, "sd version" (one of
`SD_VERSIONS`) decides which model tab lists it. Users edit these files in the UI, and other
extensions add their own keys, so a sidecar is merged, never rewritten: every key we do not set is
kept as it was, and the ones we set only where the user left them empty (except the weight, which
is the point of `workbench pick`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.formats.writer import atomic_write_text

FIELDS = ("description", "sd version", "activation text", "preferred weight", "negative text", "notes")
SD_VERSIONS = ("SD1", "SD2", "SDXL", "SD3", "Unknown")  # A1111's network.SdVersion names
PICK_NOTE = "workbench pick:"  # the notes line pick owns (replaced on a new pick, others kept)


def sidecar_path(lora: str | Path) -> Path:
    """`x.safetensors` -> `x.json` (A1111 puts the sidecar at the LoRA's path without extension)."""
    return Path(lora).with_suffix(".json")


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The sidecar's object ({} when there is none); an error naming the file when it is not JSON."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise WorkbenchError(f"{path}: cannot read the A1111 sidecar ({e}); expected a JSON object "
                             "with keys such as \"preferred weight\" and \"activation text\"") from e
    if not isinstance(data, dict):
        raise WorkbenchError(f"{path}: the A1111 sidecar holds {type(data).__name__}, expected a "
                             "JSON object")
    return data


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() in ("", "Unknown"))


def merged(existing: dict[str, Any], *, preferred_weight: float, activation_text: str | None = None,
           sd_version: str | None = None, description: str | None = None,
           note: str | None = None) -> dict[str, Any]:
    """`existing` with the pick written in: "preferred weight" set; "activation text", "sd version"
    and "description" filled only where empty; `note` replaces the previous `PICK_NOTE` line of
    "notes" (the user's other lines stay). Keys we do not know are kept."""
    out = dict(existing)
    out["preferred weight"] = round(float(preferred_weight), 4)
    for key, value in (("activation text", activation_text), ("sd version", sd_version),
                       ("description", description)):
        if value and _empty(out.get(key)):
            out[key] = value
    if note:
        lines = [ln for ln in str(out.get("notes") or "").splitlines() if not ln.startswith(PICK_NOTE)]
        out["notes"] = "\n".join([*lines, f"{PICK_NOTE} {note}"]).strip("\n")
    for key in FIELDS:  # A1111's editor expects every field; a missing one becomes its blank
        out.setdefault(key, 0.0 if key == "preferred weight" else "Unknown" if key == "sd version" else "")
    return out


def write_sidecar(path: str | Path, data: dict[str, Any]) -> Path:
    """Write the merged sidecar atomically (UTF-8, as A1111 reads it)."""
    return atomic_write_text(Path(path), json.dumps(data, indent=4, ensure_ascii=False) + "\n",
                             overwrite=True)
