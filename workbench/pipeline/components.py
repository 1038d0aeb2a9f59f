"""A UNet/transformer-only file made whole with the text encoders and VAE of another model.

The common GGUF downloads (city96's `sdxl-...-Q8_0.gguf`, `sd3.5_large-Q4_K_S.gguf`,
`flux1-dev-Q8_0.gguf`) hold only the denoiser. A recipe's `components` field names where the rest
comes from: a checkpoint of the same architecture (its own UNet/transformer is not used) or a
diffusers folder (`model_index.json`). FLUX has a third way already, the split folder of Forge
(`pipeline/load_dit.flux_parts`): the GGUF beside ae, clip_l and t5xxl.

- `sources` says, from headers only, which component comes from which file (the dry run prints
  it) and refuses, naming the recipe field, a denoiser-only model without `components`, or
  `components` of another architecture or without text encoders and VAE;
- `component_sizes` feeds the memory planner: the denoiser from the model file's header (GGUF
  packed bytes included), the rest from the components file's header or the diffusers folder's
  component files;
- `load_pipeline_with` builds the denoiser from the model file (a GGUF one stays packed,
  `pipeline/load_gguf.py`) and loads the pipeline of `components` with it in place of its own.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.arch import BY_ID
from workbench.errors import WorkbenchError
from workbench.formats import gguf_file
from workbench.formats.detect import DIFFUSION_PREFIX, detect
from workbench.formats.model_file import read_model_header
from workbench.formats.pipeline_config import config_dir
from workbench.pipeline.load import LOAD_LOCK, load_pipeline, quiet_diffusers
from workbench.pipeline.load_gguf import gguf_denoiser
from workbench.pipeline.sizes import component_sizes_from_folder, component_sizes_from_header
from workbench.pipeline import load_dit

DENOISER_KINDS = ("unet", "transformer")
FIELD = "components"
# diffusers' pipeline class name prefixes -> architecture (as `pipeline.generate.model_arch` reads them)
PIPELINE_ARCHS = (("StableDiffusionXL", "sdxl"), ("StableDiffusion3", "sd3"), ("Flux", "flux"),
                  ("StableDiffusion", "sd15"))


@dataclass(frozen=True)
class Sources:
    """Where each pipeline component of a denoiser-only model comes from."""

    arch: str
    variant: str | None
    model: Path          # the UNet/transformer file
    components: Path     # the checkpoint file or diffusers folder with text encoders and VAE
    label: str           # "GGUF Q8_0" / "F16": what the model file stores

    @property
    def denoiser(self) -> str:
        return BY_ID[self.arch].denoiser

    def lines(self) -> list[str]:
        """What the dry run prints: one line per source."""
        rest = [c for c in BY_ID[self.arch].components if c != self.denoiser]
        return [f"  {self.denoiser}: {self.model.name} ({self.label})",
                f"  {', '.join(rest)}: {self.components.name} ({FIELD})"]


def denoiser_only(path: str | os.PathLike) -> tuple[str, str | None, str] | None:
    """(arch, variant, kind) when `path` is a file holding only a UNet/transformer of an
    architecture the workbench generates with, else None (checkpoints, folders, LoRAs...)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        info = detect(path)
    except WorkbenchError:
        return None
    if info.kind in DENOISER_KINDS and info.arch in BY_ID and BY_ID[info.arch].generation:
        return info.arch, info.variant, info.kind
    return None


def _an(name: str) -> str:
    """The article before an architecture's display name: "an SDXL", "a FLUX.1"."""
    return "an" if name.startswith("SD") else "a"


def _name(arch: str | None) -> str:
    return BY_ID[arch].name if arch in BY_ID else str(arch)


def _folder_arch(folder: Path) -> str:
    index = folder / "model_index.json"
    cls = json.loads(index.read_text()).get("_class_name", "")
    for prefix, arch in PIPELINE_ARCHS:
        if cls.startswith(prefix):
            return arch
    raise WorkbenchError(f"{FIELD}: {index}: pipeline class {cls!r} is not one the workbench runs")


def sources(model: str | os.PathLike, components: str | os.PathLike | None, *,
            model_field: str = "model", field: str = FIELD) -> Sources | None:
    """Which file gives which component, or None when `model` is not denoiser-only (then
    `components` is not used). WorkbenchError naming `field` when it is missing or unusable."""
    model = Path(model)
    found = denoiser_only(model)
    if found is None:
        return None
    arch, variant, kind = found
    name = BY_ID[arch].name
    if components is None:
        raise WorkbenchError(
            f"{model_field}: {model.name} holds only the {name} {kind} (no text encoders, no VAE); "
            f"set `{field}:` to {_an(name)} {name} checkpoint or diffusers folder to take them from"
            + (", or put the file in a folder beside ae, clip_l and t5xxl" if arch == "flux" else ""))
    components = Path(components)
    if not components.exists():
        raise WorkbenchError(f"{field}: not found: {components}")
    if components.is_dir():
        if not (components / "model_index.json").is_file():
            raise WorkbenchError(f"{field}: {components} is a folder without model_index.json; expected "
                                 f"{_an(name)} {name} checkpoint file or a diffusers folder")
        have = _folder_arch(components)
    else:
        try:
            info = detect(components)
        except WorkbenchError as e:
            raise WorkbenchError(f"{field}: {e}") from None
        if info.kind != "checkpoint":
            raise WorkbenchError(f"{field}: {components.name} is {_an(_name(info.arch))} {_name(info.arch)} {info.kind}, "
                                 f"not a checkpoint with text encoders and a VAE; expected {_an(name)} {name} "
                                 "checkpoint or a diffusers folder")
        have = info.arch
    if have != arch:
        raise WorkbenchError(f"{field}: {components.name} is {_an(_name(have))} {_name(have)} "
                             f"model but {model_field} ({model.name}) is {_an(name)} {name} {kind}; "
                             f"expected {_an(name)} {name} checkpoint or diffusers folder")
    header = read_model_header(model)
    label = header.quant_label() if isinstance(header, gguf_file.GGUFHeader) else header_dtype(header)
    return Sources(arch, variant, model, components, label)


def header_dtype(header) -> str:
    """The dominant stored dtype of a plain safetensors header, by parameters."""
    by: dict[str, int] = {}
    for t in header.tensors.values():
        by[t.dtype] = by.get(t.dtype, 0) + t.numel
    return max(by, key=by.get) if by else "-"


def component_sizes(src: Sources) -> list:
    """Component sizes for the memory planner: the denoiser from the model file, the text
    encoders and VAE from the components file or the diffusers folder's component files (where
    a folder lacks safetensors files for one: the architecture's standard size)."""
    own = [s for s in component_sizes_from_header(src.model, src.arch) if s.name == src.denoiser]
    if src.components.is_dir():
        names = [c for c in BY_ID[src.arch].components if c != src.denoiser]
        rest = component_sizes_from_folder(src.components, names)
        have = {s.name for s in rest}
        rest += [s for s in component_sizes_from_header(src.model, src.arch)
                 if s.name != src.denoiser and s.name not in have]
    else:
        rest = [s for s in component_sizes_from_header(src.components, src.arch) if s.name != src.denoiser]
    return own + rest


def combined_shapes(src: Sources) -> dict[str, tuple]:
    """The all-in-one checkpoint's header shapes with the model file's denoiser in place of the
    components file's own (what the config inference reads)."""
    model = read_model_header(src.model).shapes()
    bare = not any(k.startswith(DIFFUSION_PREFIX) for k in model)
    shapes = {k: v for k, v in read_model_header(src.components).shapes().items()
              if not k.startswith(DIFFUSION_PREFIX)}
    shapes.update({(DIFFUSION_PREFIX + k if bare else k): v for k, v in model.items()})
    return shapes


def _denoiser(src: Sources, folder: Path, dtype: torch.dtype):
    """The denoiser module from the model file, configured from `folder`."""
    import diffusers

    if src.arch == "flux":
        return load_dit.load_flux_transformer(src.model, folder, dtype)
    cls = diffusers.UNet2DConditionModel if src.denoiser == "unet" else diffusers.SD3Transformer2DModel
    if gguf_file.is_gguf(src.model):
        return gguf_denoiser(cls, src.model, folder, src.denoiser, dtype)
    keys = read_model_header(src.model).tensors
    prefix = DIFFUSION_PREFIX if any(k.startswith(DIFFUSION_PREFIX) for k in keys) else ""
    tensors = {DIFFUSION_PREFIX + k: v for k, v in load_dit.read_tensors(src.model, prefix, dtype).items()}
    return cls.from_single_file(tensors, config=str(folder), subfolder=src.denoiser, local_files_only=True,
                                torch_dtype=dtype)


def load_pipeline_with(src: Sources, dtype: torch.dtype):
    """The pipeline of `src.components` with the denoiser of `src.model` in place of its own."""
    quiet_diffusers()
    with LOAD_LOCK:  # see pipeline/load.LOAD_LOCK: one load at a time per process
        if src.components.is_dir():
            import diffusers

            denoiser = _denoiser(src, src.components, dtype)
            try:
                return diffusers.DiffusionPipeline.from_pretrained(
                    str(src.components), dtype=dtype, local_files_only=True, **{src.denoiser: denoiser})
            except (OSError, ValueError) as e:
                raise WorkbenchError(f"{FIELD}: cannot load the diffusers folder {src.components} offline: {e}") from e
        denoiser = _denoiser(src, config_dir(combined_shapes(src), src.arch), dtype)
        return load_pipeline(src.components, src.arch, torch_dtype=dtype, **{src.denoiser: denoiser})
