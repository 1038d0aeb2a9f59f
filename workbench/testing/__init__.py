"""Tiny models of every architecture in their real single-file key layouts, for tests and demos.

`build_tiny(arch, path)` writes a deterministic checkpoint of a few MB whose key names and block
structure equal the real A1111/ComfyUI files (see each builder module for what is kept).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from workbench.arch import ARCHS
from workbench.errors import UnsupportedError, UnknownModelError

# arch -> module with `build(path, seed=0, dtype=torch.float16) -> Path`
BUILDERS = {a.id: a.tiny_builder for a in ARCHS if a.tiny_builder}  # from workbench/arch.py


def builder_module(arch: str):
    """The builder module of `arch`, with a clear error when it is unknown or not written yet."""
    if arch not in BUILDERS:
        raise UnknownModelError(f"no tiny builder for architecture {arch!r}; known: {', '.join(BUILDERS)}")
    name = BUILDERS[arch]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        raise UnsupportedError(f"the tiny {arch} builder ({name}) is not available in this checkout") from None


def build_tiny(arch: str, path: str | Path, seed: int = 0, **kwargs) -> Path:
    """Write the tiny `arch` checkpoint to `path`; same seed -> byte-identical file."""
    return builder_module(arch).build(path, seed=seed, **kwargs)
