"""Offline diffusers config folders for single-file checkpoints, sized from the file's own header.

diffusers' `from_single_file(path, config=DIR, local_files_only=True)` needs a diffusers-format folder
(model_index.json, <component>/config.json, scheduler, tokenizers) and otherwise goes to the Hub. We
ship the real configs of each base model and adjust every width/depth to the shapes in the header, so
one code path loads full-size files and the tiny test files alike, with no network.

Registry: `CONFIG_BUILDERS[arch](shapes) -> files`, where `shapes` maps every tensor name of the
checkpoint to its shape and `files` maps a path relative to the folder to its content:
  * a path ending in `.json`  -> a JSON-able dict written to that file;
  * any other path (a folder) -> a dict with `"_writer": "module:function"` plus keyword arguments;
    the folder is produced by calling `function(folder_path, **kwargs)` (e.g. tokenizer folders via
    `workbench.formats.clip_tokenizer:write_tokenizer_dir`).
Everything in `files` is plain data, so its hash names the cache folder: the same inferred configs
always give the same folder, and a changed table gives a new one.

Modules in `BUILDER_MODULES` are imported on first use and call `register()`; a module that is not
there (yet) is skipped, so architectures can be added independently.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from workbench.errors import FormatError, UnknownModelError
from workbench.formats.hashes import cache_root
from workbench.formats.model_file import read_model_header
from workbench.formats.safetensors_io import SafetensorsHeader

Shapes = Mapping[str, tuple[int, ...]]
ConfigFiles = dict[str, dict[str, Any]]
ConfigBuilder = Callable[[Shapes], ConfigFiles]

CONFIG_BUILDERS: dict[str, ConfigBuilder] = {}

# Modules that register builders when imported; add yours here.
BUILDER_MODULES = (
    "workbench.formats.pipeline_configs_sd",   # sd15, sdxl
    "workbench.formats.pipeline_configs_dit",  # sd3, flux
)

# Bump when the folder layout written here changes, so old cache folders are not reused.
LAYOUT_VERSION = 1
_COMPLETE = ".complete"


def register(arch: str, builder: ConfigBuilder) -> ConfigBuilder:
    """Make `builder` the config builder of `arch` (last registration wins)."""
    CONFIG_BUILDERS[arch] = builder
    return builder


def _load_builders() -> None:
    for name in BUILDER_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # the module exists but one of its own imports failed: a real bug
                raise


def _shapes_of(path_or_header: str | os.PathLike | SafetensorsHeader | Shapes) -> tuple[Shapes, str]:
    if isinstance(path_or_header, SafetensorsHeader):
        return path_or_header.shapes(), str(path_or_header.path)
    if isinstance(path_or_header, (str, os.PathLike)):
        header = read_model_header(path_or_header)  # GGUF and NF4 files: logical shapes
        return header.shapes(), str(header.path)
    return {k: tuple(v) for k, v in path_or_header.items()}, "<shapes>"


def config_files(path_or_header: str | os.PathLike | SafetensorsHeader | Shapes, arch: str) -> ConfigFiles:
    """The inferred config files of one checkpoint (what `config_dir` writes), as data."""
    _load_builders()
    if arch not in CONFIG_BUILDERS:
        raise UnknownModelError(
            f"no pipeline config for architecture {arch!r}; known: {', '.join(sorted(CONFIG_BUILDERS))}")
    shapes, source = _shapes_of(path_or_header)
    try:
        return CONFIG_BUILDERS[arch](shapes)
    except FormatError as exc:
        raise FormatError(f"{source}: {exc}") from None


def files_hash(files: ConfigFiles) -> str:
    blob = json.dumps({"layout": LAYOUT_VERSION, "files": files}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _call_writer(spec: Mapping[str, Any], folder: Path) -> None:
    module, _, function = spec["_writer"].partition(":")
    writer = getattr(importlib.import_module(module), function)
    writer(folder, **{k: v for k, v in spec.items() if k != "_writer"})


def write_files(files: ConfigFiles, folder: str | os.PathLike) -> Path:
    """Materialise `files` under `folder` (created)."""
    root = Path(folder)
    for rel, content in sorted(files.items()):
        target = root / rel
        if rel.endswith(".json"):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        else:
            target.mkdir(parents=True, exist_ok=True)
            _call_writer(content, target)
    return root


def config_dir(path_or_header: str | os.PathLike | SafetensorsHeader | Shapes, arch: str,
               cache: str | os.PathLike | None = None) -> Path:
    """A diffusers config folder for this checkpoint, cached under `<cache>/configs/<hash>`.

    The folder is written to a temporary sibling and renamed into place, so a concurrent or
    interrupted call never leaves a half-written folder that a later call would trust.
    """
    files = config_files(path_or_header, arch)
    base = (Path(cache) if cache is not None else cache_root()) / "configs"
    final = base / f"{arch}-{files_hash(files)}"
    if (final / _COMPLETE).exists():
        return final
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=base))
    try:
        write_files(files, tmp)
        (tmp / _COMPLETE).write_text("")
        if final.exists():  # left by an interrupted older layout: replace it
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / _COMPLETE).exists():  # another process did not win the race either
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
