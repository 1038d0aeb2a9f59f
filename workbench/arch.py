"""One record per model architecture: every fact the workbench keeps about SD1.5, SD2, SDXL, SD3 and
FLUX.1, in one place.

Detection (workbench/formats/detect.py) names a file's architecture by id; everything that then
depends on the architecture (generation sizes and memory estimates, pipeline classes, block tables,
LoRA key names, merge/LoRA metadata, training and preview support, grid time estimates) reads it
from the record here, so adding an architecture means adding one record (and its builders), not a
hunt through a dozen tables. The per-module tables (`SIZE_MULTIPLE`, `COMPONENTS`, `BLOCK_IDS`, ...)
are derived from `ARCHS`; tests/test_arch.py checks that each record is accepted by every consumer
that claims it and that no module keeps its own table keyed by architecture ids.

This module is the ground floor: it imports nothing from the project.
"""

from __future__ import annotations

from dataclasses import dataclass

SAI_IMPL = "https://github.com/Stability-AI/generative-models"
BFL_IMPL = "https://github.com/black-forest-labs/flux"


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of an architecture, as its single file stores it and LoRAs name it."""

    model: str            # "clip_l" | "clip_h" | "clip_g" | "t5xxl" (detect's names)
    component: str        # diffusers pipeline attribute: "text_encoder", "text_encoder_2", ...
    prefix: str           # key prefix in the A1111/ComfyUI single file
    layout: str           # "hf_clip" | "open_clip" | "t5": how the weights under `prefix` are named
    lora_component: str   # kohya's numbering "te1" | "te2" | "te3" (FLUX's T5 is te3)
    kohya: tuple[str, ...]  # kohya LoRA prefixes; the first is what kohya writes


@dataclass(frozen=True)
class Arch:
    """What one architecture is and which workbench features take it."""

    id: str                        # the id detection gives and recipes/metadata use
    name: str                      # what the user reads
    family: str                    # "unet" | "dit"
    denoiser: str                  # diffusers pipeline attribute: "unet" | "transformer"
    text_encoders: tuple[TextEncoder, ...]
    latent_channels: int
    size_multiple: int             # VAE factor 8, times the DiT patch size 2 (SD3, FLUX)
    native_side: int               # training size; far from it, subjects repeat (a warning)
    activation_bytes_per_px: int   # one denoiser call, per latent pixel and image (pipeline/sizes.py)
    guidance_distilled: bool       # one image per denoiser call (no CFG pair), no negative prompt
    flow_matching: bool            # flow-matching schedulers (pipeline/samplers.py)
    pipeline_class: str            # diffusers pipeline class
    generation: bool               # a bundled pipeline config exists: loads and makes images
    modelspec_arch: str            # modelspec.architecture of a checkpoint (LoRA: + "/lora")
    modelspec_impl: str            # modelspec.implementation of a merged checkpoint
    lora_modelspec_impl: str | None  # modelspec.implementation of a trained LoRA (trainable only)
    kohya_base_model_version: str  # ss_base_model_version
    kohya_network_module: str      # ss_network_module of a plain LoRA
    kohya_unet_names: str          # which UNet/DiT paths kohya names modules by: diffusers|ldm|original
    sidecar_sd_version: str | None  # "sd version" of the A1111 LoRA sidecar .json
    block_ids: tuple[str, ...]     # merge-block ids, supermerger's order (formats/blocks.py)
    merge_preview: bool            # merge values previewed in memory in grids (grid/merge_preview.py)
    trainable: bool                # LoRA training (train/setup.py)
    text_encoder_trainable: bool   # LoRA training of the text encoder(s) too
    train_flow_shift: float | None  # σ shift of flow-matching LoRA training (train/loop.py flow_loss)
    t5_tokens: int | None          # T5 prompt length: the diffusers pipeline's default, which
                                   # generation uses and training encodes captions with
    tiny_vae: str | None           # the TAESD kind that decodes its latents (pipeline/tiny_vae.py)
    grid_speed: float              # sampling cost per step and megapixel relative to SD1.5
    tiny_builder: str | None       # module in workbench.testing that builds a tiny checkpoint
    # list lengths the LoRA Block Weight extension takes for this architecture ("17(1.X/2.X)",
    # "12(XL)", ...; workbench/formats/lbw.py); () where it has no form for it
    lbw_lengths: tuple[int, ...] = ()

    @property
    def components(self) -> tuple[str, ...]:
        """Pipeline components in load order: denoiser, text encoders, VAE."""
        return (self.denoiser, *(t.component for t in self.text_encoders), "vae")

    @property
    def images_per_call(self) -> int:
        """Images in one denoiser call per generated image: 2 with CFG, 1 when guidance-distilled."""
        return 1 if self.guidance_distilled else 2


def _numbered(head: str, n: int) -> list[str]:
    return [f"{head}{i:02d}" for i in range(n)]


# supermerger's block ids (BASE = text encoders + VAE); SD3 medium has J00..J23 only
SD1_BLOCKS = ("BASE", *_numbered("IN", 12), "M00", *_numbered("OUT", 12))
SDXL_BLOCKS = ("BASE", *_numbered("IN", 9), "M00", *_numbered("OUT", 9))
SD3_BLOCKS = ("BASE", "IN", *_numbered("J", 38), "OUT")
SD3_MEDIUM_JOINT_BLOCKS = 24  # SD3.5 medium: J00..J23 (large: 38)
FLUX_BLOCKS = ("BASE", "IN", *_numbered("D", 19), *_numbered("S", 38), "OUT")

_CLIP_L_SAI = TextEncoder("clip_l", "text_encoder", "text_encoders.clip_l.transformer.", "hf_clip", "te1",
                          ("lora_te1",))

SD15 = Arch(
    id="sd15", name="SD1.5", family="unet", denoiser="unet",
    text_encoders=(TextEncoder("clip_l", "text_encoder", "cond_stage_model.transformer.", "hf_clip", "te1",
                               ("lora_te", "lora_te1")),),
    latent_channels=4, size_multiple=8, native_side=512, activation_bytes_per_px=60_000,
    guidance_distilled=False, flow_matching=False, pipeline_class="StableDiffusionPipeline",
    generation=True, modelspec_arch="stable-diffusion-v1", modelspec_impl="sgm",
    lora_modelspec_impl="diffusers", kohya_base_model_version="sd_v1",
    kohya_network_module="networks.lora", kohya_unet_names="diffusers", sidecar_sd_version="SD1",
    block_ids=SD1_BLOCKS, merge_preview=True, trainable=True, text_encoder_trainable=True,
    train_flow_shift=None, t5_tokens=None, tiny_vae="taesd", grid_speed=1.0,
    tiny_builder="workbench.testing.sd15",
    lbw_lengths=(17, 26))

SD2 = Arch(
    id="sd2", name="SD2", family="unet", denoiser="unet",
    text_encoders=(TextEncoder("clip_h", "text_encoder", "cond_stage_model.model.", "open_clip", "te1",
                               ("lora_te", "lora_te1")),),
    latent_channels=4, size_multiple=8, native_side=768, activation_bytes_per_px=60_000,
    guidance_distilled=False, flow_matching=False, pipeline_class="StableDiffusionPipeline",
    generation=False, modelspec_arch="stable-diffusion-v2-768-v", modelspec_impl="sgm",
    lora_modelspec_impl=None, kohya_base_model_version="sd_v2",
    kohya_network_module="networks.lora", kohya_unet_names="diffusers", sidecar_sd_version="SD2",
    block_ids=SD1_BLOCKS, merge_preview=False, trainable=False, text_encoder_trainable=False,
    train_flow_shift=None, t5_tokens=None, tiny_vae=None, grid_speed=1.2, tiny_builder=None,
    lbw_lengths=(17, 26))

SDXL = Arch(
    id="sdxl", name="SDXL", family="unet", denoiser="unet",
    text_encoders=(
        TextEncoder("clip_l", "text_encoder", "conditioner.embedders.0.transformer.", "hf_clip", "te1",
                    ("lora_te1",)),
        TextEncoder("clip_g", "text_encoder_2", "conditioner.embedders.1.model.", "open_clip", "te2",
                    ("lora_te2",))),
    latent_channels=4, size_multiple=8, native_side=1024, activation_bytes_per_px=30_000,
    guidance_distilled=False, flow_matching=False, pipeline_class="StableDiffusionXLPipeline",
    generation=True, modelspec_arch="stable-diffusion-xl-v1-base", modelspec_impl="sgm",
    lora_modelspec_impl=SAI_IMPL, kohya_base_model_version="sdxl_base_v1-0",
    kohya_network_module="networks.lora", kohya_unet_names="ldm", sidecar_sd_version="SDXL",
    block_ids=SDXL_BLOCKS, merge_preview=True, trainable=True, text_encoder_trainable=True,
    train_flow_shift=None, t5_tokens=None, tiny_vae="taesdxl", grid_speed=3.0,
    tiny_builder="workbench.testing.sdxl",
    lbw_lengths=(12, 20, 17, 26))

SD3 = Arch(
    id="sd3", name="SD3", family="dit", denoiser="transformer",
    text_encoders=(
        _CLIP_L_SAI,
        TextEncoder("clip_g", "text_encoder_2", "text_encoders.clip_g.transformer.", "hf_clip", "te2",
                    ("lora_te2",)),
        TextEncoder("t5xxl", "text_encoder_3", "text_encoders.t5xxl.transformer.", "t5", "te3",
                    ("lora_te3",))),
    latent_channels=16, size_multiple=16, native_side=1024, activation_bytes_per_px=30_000,
    guidance_distilled=False, flow_matching=True, pipeline_class="StableDiffusion3Pipeline",
    generation=True, modelspec_arch="stable-diffusion-v3-medium", modelspec_impl="sgm",
    lora_modelspec_impl="diffusers", kohya_base_model_version="sd3",
    kohya_network_module="networks.lora_sd3", kohya_unet_names="original", sidecar_sd_version=None,
    block_ids=SD3_BLOCKS, merge_preview=True, trainable=True, text_encoder_trainable=False,
    # the shift of SD3.5's own scheduler (formats/data/sd3/*/scheduler); StableDiffusion3Pipeline's
    # max_sequence_length default
    train_flow_shift=3.0, t5_tokens=256, tiny_vae=None, grid_speed=4.0,
    tiny_builder="workbench.testing.sd3")

FLUX = Arch(
    id="flux", name="FLUX.1", family="dit", denoiser="transformer",
    text_encoders=(
        _CLIP_L_SAI,
        TextEncoder("t5xxl", "text_encoder_2", "text_encoders.t5xxl.transformer.", "t5", "te3",
                    ("lora_te3",))),
    latent_channels=16, size_multiple=16, native_side=1024, activation_bytes_per_px=40_000,
    guidance_distilled=True, flow_matching=True, pipeline_class="FluxPipeline",
    generation=True, modelspec_arch="flux-1-dev", modelspec_impl=BFL_IMPL,
    lora_modelspec_impl=BFL_IMPL, kohya_base_model_version="flux1",
    kohya_network_module="networks.lora_flux", kohya_unet_names="original", sidecar_sd_version="Flux",
    block_ids=FLUX_BLOCKS, merge_preview=True, trainable=True, text_encoder_trainable=False,
    # kohya's recommended `discrete_flow_shift` for FLUX.1 dev; FluxPipeline's max_sequence_length
    train_flow_shift=3.1582, t5_tokens=512, tiny_vae=None, grid_speed=10.0,
    tiny_builder="workbench.testing.flux",
    lbw_lengths=(61,))

ARCHS: tuple[Arch, ...] = (SD15, SD2, SDXL, SD3, FLUX)
BY_ID: dict[str, Arch] = {a.id: a for a in ARCHS}
IDS: tuple[str, ...] = tuple(BY_ID)
UNET_IDS: tuple[str, ...] = tuple(a.id for a in ARCHS if a.family == "unet")
DIT_IDS: tuple[str, ...] = tuple(a.id for a in ARCHS if a.family == "dit")
# the first architecture of each distinct block table (SD2 shares SD1.5's): the block editor's list
BLOCK_TABLES: tuple[str, ...] = tuple(a.id for i, a in enumerate(ARCHS)
                                      if all(b.block_ids != a.block_ids for b in ARCHS[:i]))
