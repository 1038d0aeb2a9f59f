"""Load a diffusers pipeline from a single-file checkpoint, offline.

The config folder comes from `workbench.formats.pipeline_config.config_dir` (bundled real configs
sized from the file's header), and diffusers' own single-file converter maps the original key names,
so the same call works for full-size A1111/ComfyUI files and for our tiny test files. Nothing here may
reach the network: `local_files_only=True` plus a local config folder keeps diffusers off the Hub.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from workbench.errors import UnknownModelError
from workbench.formats.pipeline_config import config_dir

# UNet architectures handled here; DiT architectures (sd3, flux) live in workbench.core.load_dit.
UNET_PIPELINES = {
    "sd15": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
}
DIT_ARCHS = ("sd3", "flux")

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


def load_pipeline(path: str | os.PathLike, arch: str, torch_dtype: torch.dtype = torch.float32,
                  **kwargs: Any):
    """A diffusers pipeline for the single file at `path` (arch: "sd15", "sdxl", "sd3", "flux").

    Extra keyword arguments go to `from_single_file` (e.g. a replacement `scheduler=`).
    """
    quiet_diffusers()
    if arch in DIT_ARCHS:
        from workbench.core import load_dit  # written separately; imported only when needed

        return load_dit.load_pipeline(path, arch, torch_dtype=torch_dtype, **kwargs)
    if arch not in UNET_PIPELINES:
        known = ", ".join(sorted([*UNET_PIPELINES, *DIT_ARCHS]))
        raise UnknownModelError(f"{path}: cannot load architecture {arch!r}; expected one of {known}")
    import diffusers

    pipeline_class = getattr(diffusers, UNET_PIPELINES[arch])
    folder = config_dir(path, arch)
    options = {**_EXTRA_KWARGS[arch], **kwargs}
    return pipeline_class.from_single_file(
        str(Path(path)), config=str(folder), local_files_only=True, torch_dtype=torch_dtype, **options)
