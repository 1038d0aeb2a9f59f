"""A recipe's text fit to travel inside a model file: every local path reduced to its file name.

Merged checkpoints (workbench/merge/metadata.py) and trained LoRAs (workbench/train/export.py) carry
the recipe that made them, so the result can be re-made. The paths in it name the user's folders
(`C:\\Users\\<name>\\...`), which must not leak when the file is shared. The full paths stay in the
local `provenance.json` beside the output; the model keeps file names (with the inputs' sha256
beside them), and `workbench run --from-metadata` finds the files again by name and hash
(`find_by_name_and_hash`).

Which strings are paths is decided by the parsed recipe, not by guessing: a string of the YAML is
reduced when it resolves (as the loader resolves it, workbench/recipes/common.py) to one of the
recipe's path fields. So prompts and names are never touched, and comments and layout are kept.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath, PureWindowsPath

import yaml
from pydantic import BaseModel

from workbench.formats.hashes import sha256_file
from workbench.recipes.common import resolve_path


def path_values(recipe) -> set[Path]:
    """Every path field's value in a parsed recipe (resolved, absolute when it came from a file)."""
    found: set[Path] = set()

    def walk(value) -> None:
        if isinstance(value, Path):
            found.add(value)
        elif isinstance(value, BaseModel):  # its fields as they are (a dump makes paths text)
            for name in type(value).model_fields:
                walk(getattr(value, name, None))
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(recipe)
    return found


def file_name(text: str) -> str:
    """The last part of a path written on any OS (`C:\\a\\b.safetensors` -> `b.safetensors`)."""
    return (PureWindowsPath(text) if "\\" in text else PurePosixPath(text)).name or text


def _strings(data) -> list[str]:
    if isinstance(data, str):
        return [data]
    if isinstance(data, dict):
        return [s for v in data.values() for s in _strings(v)]
    if isinstance(data, list):
        return [s for v in data for s in _strings(v)]
    return []


def _reduce(data, local: dict[str, str]):
    if isinstance(data, str):
        return local.get(data, data)
    if isinstance(data, dict):
        return {k: _reduce(v, local) for k, v in data.items()}
    if isinstance(data, list):
        return [_reduce(v, local) for v in data]
    return data


def shareable_text(recipe) -> str:
    """The recipe text (or, for a recipe built in code, its JSON) with local paths reduced to
    file names."""
    paths = path_values(recipe)
    if not recipe.source_text:
        data = json.loads(recipe.model_dump_json(exclude_none=True))
        local = {s: file_name(s) for s in _strings(data) if Path(s) in paths}
        return json.dumps(_reduce(data, local))
    text = recipe.source_text
    base_dir = Path(recipe.source_path).resolve().parent if recipe.source_path else Path.cwd()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    local = {}
    for s in _strings(data):
        try:
            if resolve_path(s, base_dir) in paths and file_name(s) != s:
                local[s] = file_name(s)
        except (OSError, ValueError):
            continue
    for raw in sorted(local, key=len, reverse=True):
        escaped = json.dumps(raw)[1:-1]  # as written inside "double quotes" (backslashes doubled)
        text = text.replace(raw, local[raw]).replace(escaped, local[raw])
    if any(raw in text for raw in local):  # written in a form not found above: re-dump the YAML
        text = yaml.safe_dump(_reduce(data, local), sort_keys=False, allow_unicode=True)
    return text


def find_by_name_and_hash(name: str, sha256: str | None, places: list[Path]) -> Path | None:
    """The first file called `name` in `places` (files are taken as they are, folders searched
    through) whose sha256 is `sha256` (any, when no hash was recorded)."""
    seen: set[Path] = set()
    for place in places:
        place = Path(place)
        if place.is_file():
            candidates = [place] if place.name == name else []
        elif place.is_dir():
            candidates = sorted(place.rglob(name))
        else:
            continue
        for c in candidates:
            if c in seen or not c.is_file():
                continue
            seen.add(c)
            if not sha256 or sha256_file(c) == sha256:
                return c
    return None
