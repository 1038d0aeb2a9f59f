"""Load a diffusers pipeline from a single-file checkpoint, offline.

The config folder comes from `workbench.formats.pipeline_config.config_dir` (bundled real configs
sized from the file's header), and diffusers' own single-file converter maps the original key names,
so the same call works for full-size A1111/ComfyUI files and for our tiny test files. Nothing here may
reach the network: `local_files_only=True` plus a local config folder keeps diffusers off the Hub.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from workbench.arch import ARCHS
from workbench.pipeline.load_gguf import gguf_denoiser
from workbench.errors import UnknownModelError
from workbench.formats import gguf_file, nf4_file, scaled_fp8
from workbench.formats.model_file import quantization_of, read_model_header
from workbench.formats.pipeline_config import config_dir
from workbench.pipeline import load_dit

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

# files being loaded right now that diffusers' reader must not take as they are: path -> decoders
# (a decoder gets a function that reads the file diffusers' way and returns the real state dict)
_READS: dict[str, list[Callable[[Callable[[], dict]], dict]]] = {}
_READS_LOCK = threading.Lock()


def _install_reader() -> None:
    """Wrap diffusers' single-file reader once, for good. The wrapper returns what the original
    returns unless the file is registered in `_READS`, so loads in other threads (dashboard
    workers) of other files, or of the same file outside `file_reading`, are untouched."""
    from diffusers.loaders import single_file, single_file_model

    with _READS_LOCK:
        if getattr(single_file.load_single_file_checkpoint, "workbench_reader", False):
            return
        original = single_file.load_single_file_checkpoint

        def reading(source, *args, **kwargs):
            key = str(Path(str(source)).resolve())
            with _READS_LOCK:
                reads = _READS.get(key)
                decode = reads[-1] if reads else None
            if decode is None:
                return original(source, *args, **kwargs)
            return decode(lambda: original(source, *args, **kwargs))

        reading.workbench_reader = True
        single_file.load_single_file_checkpoint = reading
        single_file_model.load_single_file_checkpoint = reading


def _decoder(path: Path, dtype: torch.dtype):
    """How diffusers' reading of `path` must be corrected, or None when it reads the file right:
    GGUF files are read by us, dequantized (diffusers would hand quantized blocks to text encoders
    and the VAE; the denoiser is built separately, packed: `gguf_denoiser`); bitsandbytes 4-bit
    weights are dequantized with their quant states; ComfyUI scaled-fp8 layers get their scales."""
    header = read_model_header(path)
    quant = quantization_of(header)
    if quant is None:
        return None
    if quant.kind == "gguf":
        gguf_file.check_supported(header)
        return lambda _read: gguf_file.load_tensors(path, dtype)
    if quant.kind == "nf4":
        return lambda read: nf4_file.dequantize(read(), dtype, path=path)
    layout = scaled_fp8.layout_of(header)
    scaled_fp8.check_supported(layout, path)
    return lambda read: scaled_fp8.dequantize(read(), dtype, path=path, metadata=header.metadata)


@contextmanager
def file_reading(path: str | os.PathLike, dtype: torch.dtype) -> Iterator[None]:
    """While active, diffusers' single-file reader returns the real weights of `path` in `dtype`:
    GGUF dequantized, bitsandbytes 4-bit dequantized, ComfyUI scaled-fp8 layers multiplied out.

    diffusers reads the file itself inside `from_single_file` and would otherwise load fp8 values
    without their scales or packed bytes as weights (a wrong model, or a shape error deep in a
    converter). Only such files are registered; others are read untouched.
    """
    path = Path(path)
    decode = _decoder(path, dtype) if path.is_file() else None
    if decode is None:
        yield
        return
    _install_reader()
    key = str(path.resolve())
    with _READS_LOCK:
        _READS.setdefault(key, []).append(decode)
    try:
        yield
    finally:
        with _READS_LOCK:
            _READS[key].pop()
            if not _READS[key]:
                del _READS[key]


def load_pipeline(path: str | os.PathLike, arch: str, torch_dtype: torch.dtype = torch.float32,
                  **kwargs: Any):
    """A diffusers pipeline for the single file at `path` (arch: "sd15", "sdxl", "sd3", "flux").

    Extra keyword arguments go to `from_single_file` (e.g. a replacement `scheduler=`). GGUF,
    bitsandbytes 4-bit and ComfyUI scaled-fp8 files are read as their real weights (`file_reading`);
    a GGUF denoiser keeps its Linear weights packed (`gguf_denoiser`).
    """
    quiet_diffusers()
    with LOAD_LOCK:
        return _load_pipeline(path, arch, torch_dtype, **kwargs)


def _load_pipeline(path: str | os.PathLike, arch: str, torch_dtype: torch.dtype, **kwargs: Any):
    if arch in DIT_ARCHS:
        with file_reading(path, torch_dtype):
            return load_dit.load_pipeline(path, arch, torch_dtype=torch_dtype, **kwargs)
    if arch not in UNET_PIPELINES:
        known = ", ".join(sorted([*UNET_PIPELINES, *DIT_ARCHS]))
        raise UnknownModelError(f"{path}: cannot load architecture {arch!r}; expected one of {known}")
    import diffusers

    pipeline_class = getattr(diffusers, UNET_PIPELINES[arch])
    folder = config_dir(path, arch)
    options = {**_EXTRA_KWARGS[arch], **kwargs}
    if "unet" not in options and gguf_file.is_gguf(path):
        options["unet"] = gguf_denoiser(diffusers.UNet2DConditionModel, path, folder, "unet", torch_dtype)
    with file_reading(path, torch_dtype):
        return pipeline_class.from_single_file(
            str(Path(path)), config=str(folder), local_files_only=True, torch_dtype=torch_dtype, **options)
