"""`ModelInfo`: what a model file is, as detection reports it. Its own module so that
`formats/detect.py` and `formats/lora_detect.py` both use it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelInfo:
    """What a file is. `archs` lists every architecture the file can serve (a CLIP-L or a VAE is
    shared by several); `arch` is the single best guess (file-name hints, else the first listed)."""

    arch: str
    variant: str | None
    kind: str          # checkpoint | unet | transformer | vae | text_encoder | lora
    layout: str        # ldm | sgm | comfyui | bfl | diffusers | kohya | peft
    components: frozenset[str] = frozenset()
    lora_format: str | None = None   # lora | loha | lokr | full | oft (LoRAs only)
    rank: int | None = None
    notes: tuple[str, ...] = ()
    archs: frozenset[str] = frozenset()
    key_count: int = 0
