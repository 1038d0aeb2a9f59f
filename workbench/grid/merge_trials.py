"""Score one merge, previewed in memory, on fixed (prompt, seed) pictures: a merge-search trial.

Every trial of a search swaps its merged weights into the one loaded pipeline
(grid/merge_preview.py: no checkpoint is written) and makes the same pictures: one per (prompt,
seed), one image per call, the initial noise drawn from a CPU generator seeded with the seed
(pipeline/generate.py), so two trials differ only by their weights. Each picture gets a style score
(mean cosine to the reference pictures' CLIP embeddings, grid/scores.py) and a CLIP score against
its prompt (adherence); both come from one open_clip backbone loaded once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from workbench.grid.merge_preview import MergePreviewer
from workbench.grid.scores import ClipBackbone, GridScorer, load_images
from workbench.pipeline.generate import generate
from workbench.pipeline.model import ImageSettings


@dataclass
class Scored:
    """The pictures of one merge and their scores, in (prompt, seed) order."""

    prompts: list[str]
    seeds: list[int]
    style: list[float]
    clip: list[float]
    images: list = field(default_factory=list)  # PIL images (kept only when asked)
    merge_seconds: float = 0.0
    sample_seconds: float = 0.0

    @property
    def units(self) -> list[str]:
        """The pairing unit of each picture: its prompt (statistics average seeds within it)."""
        return list(self.prompts)

    @property
    def mean_style(self) -> float:
        return float(sum(self.style) / len(self.style))

    @property
    def mean_clip(self) -> float:
        return float(sum(self.clip) / len(self.clip))


class TrialScorer:
    """One pipeline (through the previewer) and one backbone; `score(recipe, seeds)` per merge."""

    def __init__(self, backbone: ClipBackbone, references: dict[str, Sequence[Path]],
                 settings: ImageSettings, prompts: Sequence[str], *, device: str | None = None,
                 previewer: MergePreviewer | None = None):
        self.backbone = backbone
        self.settings = settings
        self.prompts = list(prompts)
        self.previewer = previewer or MergePreviewer(device=device)
        # one style reference (mean of normalised embeddings) per named reference set
        self.scorers = {name: GridScorer.from_parts(backbone, clip=True,
                                                    style_reference=backbone.image_features(load_images(paths)))
                        for name, paths in references.items()}

    def images(self, recipe, seeds: Sequence[int], name: str = "trial") -> tuple[list, list, list, float, float]:
        """(images, prompts, seeds, merge seconds, sampling seconds) of one merge."""
        started = time.perf_counter()
        model = self.previewer.model_for_recipe(recipe, name=name)
        merged = time.perf_counter() - started
        images, prompts, order = [], [], []
        for prompt in self.prompts:
            settings = ImageSettings(**{**self.settings.__dict__, "prompt": prompt})
            made = generate(model, settings, list(seeds), batch_size=1)
            images += [g.image for g in made]
            prompts += [prompt] * len(made)
            order += [g.seed for g in made]
        return images, prompts, order, merged, time.perf_counter() - started - merged

    def score_images(self, images, prompts, seeds, reference: str) -> Scored:
        values = self.scorers[reference].score(images, prompts)
        return Scored(list(prompts), list(seeds), [v["style"] for v in values],
                      [v["clip"] for v in values])

    @torch.inference_mode()
    def score(self, recipe, seeds: Sequence[int], reference: str = "selection", *,
              keep_images: bool = False, name: str = "trial") -> Scored:
        images, prompts, order, merged, sampled = self.images(recipe, seeds, name)
        out = self.score_images(images, prompts, order, reference)
        out.merge_seconds, out.sample_seconds = merged, sampled
        if keep_images:
            out.images = images
        return out
