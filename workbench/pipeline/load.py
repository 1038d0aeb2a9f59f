"""Load a diffusers pipeline from a single-file checkpoint, offline.

The config folder comes from `workbench.formats.pipeline_config.config_dir` (bundled real configs
sized from the file's header), and diffusers' own single-file converter maps the original key names,
so the same call works for full-size A1111/ComfyUI files and for our tiny test files. Nothing here may
reach the network: `local_files_only=True` plus a local config folder keeps diffusers off the Hub.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from workbench.arch import ARCHS
from workbench.errors import UnknownModelError
from workbench.formats import scaled_fp8
from workbench.formats.pipeline_config import config_dir
from workbench.formats.safetensors_io import read_header

# UNet architectures handled here; DiT architectures (sd3, flux) live in workbench.pipeline.load_dit.
# Only architectures with a bundled pipeline config (`generation` in workbench/arch.py) load.
UNET_PIPELINES = {a.id: a.pipeline_class for a in ARCHS if a.family == "unet" and a.generation}
DIT_ARCHS = tuple(a.id for a in ARCHS if a.family == "dit" and a.generation)

# Components the real model_index lists but that A1111-style use does not want.
_EXTRA_KWARGS: dict[str, dict[str, Any]] = {
    "sd15": {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
    "sdxl": {"add_watermarker": False},
}


def quiet_diffusers() -> None:
    """Our own progress bars and errors replace diffusers' per-component loading chatter."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# One model load at a time per process. diffusers builds models inside accelerate's
# `init_empty_weights`, which swaps `nn.Module.register_parameter` process-wide and puts the saved
# one back on exit: two loads overlapping in threads (Streamlit sessions, a thread pool) can leave
# the meta-device version installed for good, and every module made afterwards lands on `meta`.
LOAD_LOCK = threading.RLock()

# files being loaded right now whose scaled-fp8 layers the reader multiplies out: path -> dtypes
_SCALED_READS: dict[str, list[tuple[torch.dtype, dict[str, str]]]] = {}  # + header metadata
_SCALED_LOCK = threading.Lock()


def _install_scaled_reader() -> None:
    """Wrap diffusers' single-file reader once, for good. The wrapper returns what the original
    returns unless the file is registered in `_SCALED_READS`, so loads in other threads (dashboard
    workers) of other files, or of the same file outside `scaled_fp8_reading`, are untouched."""
    from diffusers.loaders import single_file, single_file_model

    with _SCALED_LOCK:
        if getattr(single_file.load_single_file_checkpoint, "workbench_scaled_reader", False):
            return
        original = single_file.load_single_file_checkpoint

        def reading(source, *args, **kwargs):
            checkpoint = original(source, *args, **kwargs)
            key = str(Path(str(source)).resolve())
            with _SCALED_LOCK:
                reads = _SCALED_READS.get(key)
                current = reads[-1] if reads else None
            if current is None:
                return checkpoint
            dtype, metadata = current
            return scaled_fp8.dequantize(checkpoint, dtype, path=source, metadata=metadata)

        reading.workbench_scaled_reader = True
        single_file.load_single_file_checkpoint = reading
        single_file_model.load_single_file_checkpoint = reading


@contextmanager
def scaled_fp8_reading(path: str | os.PathLike, dtype: torch.dtype) -> Iterator[None]:
    """While active, diffusers' single-file reader multiplies out ComfyUI scaled-fp8 layers of `path`.

    diffusers reads the file itself inside `from_single_file` and would load the fp8 values without
    their scales (a wrong model, no error). Only files whose header shows scales are registered;
    other files are read untouched.
    """
    path = Path(path)
    header = read_header(path) if path.is_file() else None
    layout = scaled_fp8.layout_of(header) if header is not None else None
    if layout is None:
        yield
        return
    scaled_fp8.check_supported(layout, path)
    _install_scaled_reader()
    key = str(path.resolve())
    with _SCALED_LOCK:
        _SCALED_READS.setdefault(key, []).append((dtype, header.metadata))
    try:
        yield
    finally:
        with _SCALED_LOCK:
            _SCALED_READS[key].pop()
            if not _SCALED_READS[key]:
                del _SCALED_READS[key]


def load_pipeline(path: str | os.PathLike, arch: str, torch_dtype: torch.dtype = torch.float32,
                  **kwargs: Any):
    """A diffusers pipeline for the single file at `path` (arch: "sd15", "sdxl", "sd3", "flux").

    Extra keyword arguments go to `from_single_file` (e.g. a replacement `scheduler=`). ComfyUI
    scaled-fp8 files are read with their scales applied (`scaled_fp8_reading`).
    """
    quiet_diffusers()
    with LOAD_LOCK:
        return _load_pipeline(path, arch, torch_dtype, **kwargs)


def _load_pipeline(path: str | os.PathLike, arch: str, torch_dtype: torch.dtype, **kwargs: Any):
    if arch in DIT_ARCHS:
        from workbench.pipeline import load_dit  # written separately; imported only when needed

        with scaled_fp8_reading(path, torch_dtype):
            return load_dit.load_pipeline(path, arch, torch_dtype=torch_dtype, **kwargs)
    if arch not in UNET_PIPELINES:
        known = ", ".join(sorted([*UNET_PIPELINES, *DIT_ARCHS]))
        raise UnknownModelError(f"{path}: cannot load architecture {arch!r}; expected one of {known}")
    import diffusers

    pipeline_class = getattr(diffusers, UNET_PIPELINES[arch])
    folder = config_dir(path, arch)
    options = {**_EXTRA_KWARGS[arch], **kwargs}
    with scaled_fp8_reading(path, torch_dtype):
        return pipeline_class.from_single_file(
            str(Path(path)), config=str(folder), local_files_only=True, torch_dtype=torch_dtype, **options)
