"""The `train` recipe: a style LoRA from a folder of captioned images.

Field names and defaults follow kohya sd-scripts where a kohya user would look for them
(`optimizer`, `lr_scheduler`, `mixed_precision`, `caption_extension`, `shuffle_caption`,
`keep_tokens`, `network.alpha` default 1), so moving a kohya config over is mostly renaming.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BeforeValidator, Discriminator, Field, Tag

from workbench.recipes.common import (
    PixelSize,
    RecipeBase,
    RecipeName,
    RecipePath,
    SamplerName,
    StrictModel,
    yaml_bool_words,
)

NETWORK_TYPES = ("lora", "loha", "lokr", "dora")
OPTIMIZERS = ("AdamW", "AdamW8bit", "Adafactor", "Prodigy", "Lion", "SGD")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear",
                 "polynomial")

PositiveInt = Annotated[int, Field(gt=0)]
Resolution = Annotated[
    Union[Annotated[PixelSize, Tag("square")],
          Annotated[list[PixelSize], Field(min_length=2, max_length=2),
                    Tag("pair")]],
    Discriminator(lambda v: "pair" if isinstance(v, list) else "square"),
]
"""512 (square) or [width, height]."""


class NetworkSpec(StrictModel):
    """The adapter that is trained: its type and size."""

    type: Literal["lora", "loha", "lokr", "dora"] = "lora"
    rank: PositiveInt = 16
    alpha: Annotated[float, Field(gt=0)] = 1.0  # kohya's default; scale = alpha / rank
    dropout: Annotated[float, Field(ge=0, lt=1)] | None = None
    conv_rank: PositiveInt | None = None  # LoRA on 3x3 convs too (kohya "conv_dim")
    conv_alpha: Annotated[float, Field(gt=0)] | None = None
    train_text_encoder: bool = False
    # only modules inside these merge blocks (ids as in block weights: IN04, M00, OUT05; FLUX D00,
    # S10; SD3 J07); None: every module kohya trains
    blocks: list[str] | None = None


class SampleSpec(StrictModel):
    """Preview images made while training, to watch the style arrive."""

    every: PositiveInt
    prompts: list[str] = Field(min_length=1)
    seed: int = 1
    negative_prompt: str = ""
    sampler: SamplerName = "Euler a"
    steps: PositiveInt = 20
    cfg: Annotated[float, Field(ge=0)] = 7.0


class TrainOutput(StrictModel):
    """Where the LoRA, its checkpoints and the resumable state go."""

    dir: RecipePath
    save_every: PositiveInt | None = None
    save_precision: Literal["fp16", "bf16", "fp32"] = "fp16"
    keep_last: PositiveInt | None = None  # step checkpoints to keep (None: all)
    peft: bool = False  # also write a diffusers/peft-format copy (<name>.peft.safetensors)
    overwrite: bool = False


class TrainRecipe(RecipeBase):
    """kind: train: a LoRA (or LoHa/LoKr/DoRA) in kohya format."""

    KIND = "train"
    kind: Literal["train"] = "train"
    name: RecipeName
    description: str | None = None
    base: RecipePath
    # where the text encoders and VAE come from when `base` holds only the UNet/transformer (a GGUF
    # download): a checkpoint file of the same architecture (workbench/pipeline/components.py)
    components: RecipePath | None = None
    dataset: RecipePath
    trigger: str | None = None
    resolution: Resolution = 512
    network: NetworkSpec = Field(default_factory=NetworkSpec)
    max_steps: PositiveInt = 1000
    batch_size: PositiveInt = 1
    gradient_accumulation_steps: PositiveInt = 1
    learning_rate: Annotated[float, Field(gt=0)] = 1.0e-4
    unet_lr: Annotated[float, Field(gt=0)] | None = None
    text_encoder_lr: Annotated[float, Field(gt=0)] | None = None
    optimizer: Literal["AdamW", "AdamW8bit", "Adafactor", "Prodigy", "Lion", "SGD"] = "AdamW"
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "cosine_with_restarts",
                          "linear", "polynomial"] = "constant"
    lr_warmup_steps: Annotated[int, Field(ge=0)] = 0
    # auto: bf16 where the GPU supports it, else fp16 on a GPU, else no (fp32 on CPU)
    mixed_precision: Annotated[Literal["auto", "no", "fp16", "bf16"],
                               BeforeValidator(yaml_bool_words)] = "auto"
    gradient_checkpointing: bool = False
    seed: int = 42
    caption_extension: str | None = None  # None: ".txt", then ".caption"
    shuffle_caption: bool = False
    keep_tokens: Annotated[int, Field(ge=0)] = 1  # the trigger stays first when shuffling
    caption_dropout_rate: Annotated[float, Field(ge=0, le=1)] = 0.0
    bucketing: bool = True
    min_bucket_reso: PositiveInt = 256
    max_bucket_reso: PositiveInt = 1024
    cache_latents: bool = True
    # None: cache text-encoder outputs automatically when the encoders are frozen and captions are
    # not shuffled; true insists (refused where it conflicts), false never caches them
    cache_text_encoder_outputs: bool | None = None
    clip_skip: PositiveInt | None = None
    # the frozen base on the GPU: none (the mixed-precision dtype), fp8 storage, or nf4 (bitsandbytes)
    base_precision: Literal["none", "fp8", "nf4"] = "none"
    # None: the model's own (its scheduler config); v_prediction for v-models (SD2-768, NoobAI-v)
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    noise_offset: Annotated[float, Field(ge=0)] = 0.0
    min_snr_gamma: Annotated[float, Field(gt=0)] | None = None
    samples: SampleSpec | None = None
    resume: RecipePath | None = None  # a state folder written by an earlier run
    output: TrainOutput

    @property
    def lora_path(self):
        """The final LoRA file: `<output.dir>/<name>.safetensors`."""
        return self.output.dir / f"{self.name}.safetensors"

    def reference_errors(self) -> list[tuple[tuple[str | int, ...], str]]:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        if self.min_bucket_reso > self.max_bucket_reso:
            problems.append((("min_bucket_reso",), f"min_bucket_reso ({self.min_bucket_reso}) is "
                             f"larger than max_bucket_reso ({self.max_bucket_reso})"))
        if self.lr_warmup_steps >= self.max_steps:
            problems.append((("lr_warmup_steps",), f"lr_warmup_steps ({self.lr_warmup_steps}) "
                             f"must be smaller than max_steps ({self.max_steps})"))
        if self.caption_extension is not None and not self.caption_extension.startswith("."):
            problems.append((("caption_extension",), "expected an extension starting with a dot, "
                             f"e.g. '.txt' (got {self.caption_extension!r})"))
        return problems
