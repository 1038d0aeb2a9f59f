"""Image metadata: A1111's "parameters" text and our provenance, in PNG text chunks.

A1111, Forge, ComfyUI's readers and civitai all read the `parameters` chunk, so every image we save
carries it in A1111's exact form:

    a lighthouse at dusk
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: 1a2b3c4d5e, ...

Values that contain a comma, colon or quote are written as JSON strings (A1111's quoting), so
`parse_parameters` reads back exactly what `format_parameters` wrote. The full provenance (recipe,
input hashes, versions) goes into a second chunk, `workbench`, as JSON.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any, Mapping
from workbench.formats.writer import atomic_write_bytes

PARAMETERS_KEY = "parameters"
PROVENANCE_KEY = "workbench"
_PAIR = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:"\n') else text


def format_parameters(prompt: str, negative_prompt: str = "", **fields: Any) -> str:
    """A1111 infotext. `fields` are written in the given order as `Key: value` with A1111's key
    names, e.g. Steps=20, Sampler="Euler a", **{"CFG scale": 7, "Model hash": "..."}; None skips."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    pairs = [f"{key}: {_quote(value)}" for key, value in fields.items() if value is not None]
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def lora_hashes_field(hashes: Mapping[str, str]) -> str | None:
    """A1111's `Lora hashes` value: 'name: hash, name2: hash2' (None when there are no LoRAs)."""
    return ", ".join(f"{name}: {h}" for name, h in hashes.items()) or None


def parse_parameters(text: str) -> dict[str, Any]:
    """Read A1111 infotext back: {'prompt', 'negative_prompt', <field>: str, ...}."""
    lines = text.strip("\n").split("\n")
    last = lines[-1] if lines else ""
    fields: dict[str, Any] = {}
    if len(_PAIR.findall(last)) >= 3:  # A1111's own heuristic: the last line holds the settings
        lines = lines[:-1]
        for key, value in _PAIR.findall(last):
            value = value.strip()
            if value.startswith('"') and value.endswith('"'):
                value = json.loads(value)
            fields[key.strip()] = value
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    return {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative), **fields}


def png_bytes(image, parameters: str, provenance: Mapping[str, Any] | None = None) -> bytes:
    """The PNG encoding of `image` with the `parameters` (and provenance JSON) text chunks."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PARAMETERS_KEY, parameters)
    if provenance is not None:
        info.add_text(PROVENANCE_KEY, json.dumps(provenance, default=str))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(image, path: str | Path, parameters: str, provenance: Mapping[str, Any] | None = None,
             overwrite: bool = False) -> Path:
    """Write the PNG atomically (temp file, fsync, rename); never replaces a file unless asked."""
    return atomic_write_bytes(path, png_bytes(image, parameters, provenance), overwrite=overwrite)


def read_png_metadata(path: str | Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(parsed A1111 parameters, provenance dict or None) of a PNG written by `save_png` or A1111."""
    from PIL import Image

    with Image.open(path) as img:
        text = img.text if hasattr(img, "text") else img.info
        params = parse_parameters(text.get(PARAMETERS_KEY, ""))
        prov = text.get(PROVENANCE_KEY)
    return params, (json.loads(prov) if prov else None)
