"""Automatic image scores for grid cells: CLIP score, LAION-style aesthetic score, style similarity.

All three share one open_clip backbone, loaded once per grid, and one image embedding per image:
- CLIP score (as torchmetrics defines it, but per image): 100 * max(cos(E_image, E_text), 0), with
  L2-normalised open_clip features; the prompt is cleaned of A1111 syntax (`<lora:...>`, `(word:1.2)`,
  BREAK) first, since CLIP would read those as words.
- aesthetic: the LAION improved-aesthetic-predictor MLP (Linear layers only, dropout is inert at
  inference) on the L2-normalised image embedding; weights from a local .safetensors/.pth file.
- style: mean cosine between the image and each reference image (= cosine-weighted dot product with
  the mean of the normalised reference embeddings), reference embeddings computed once.

Loading is offline by construction: a weights file or an open_clip `local-dir` folder is read
directly, and a pretrained tag is looked up in the Hugging Face cache only (never downloaded).
Every result carries `signature()`: backbone, tag, and the sha256 of each weights file, so a score is
reproducible and a changed scorer invalidates cached scores.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from workbench.errors import UnsupportedError, WorkbenchError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_TAG = "openai"
BATCH = 32

_LORA_TAG = re.compile(r"<[^<>]*>")
_WEIGHTED = re.compile(r"\(([^():]*?):\s*-?[\d.]+\s*\)")
_BRACKETS = re.compile(r"(?<!\\)[()\[\]]")


def clean_prompt(prompt: str) -> str:
    """The prompt as CLIP should read it: no LoRA tags, weights, brackets or BREAK."""
    text = _LORA_TAG.sub(" ", prompt)
    previous = None
    while previous != text:  # nested "((word:1.2))"
        previous, text = text, _WEIGHTED.sub(r"\1", text)
    text = _BRACKETS.sub("", text).replace("\\(", "(").replace("\\)", ")")
    text = re.sub(r"\bBREAK\b", ",", text)
    text = re.sub(r"\s*,[\s,]*", ", ", text)
    return re.sub(r"\s+", " ", text).strip(" ,")


def _file_sha256(path: Path) -> str:
    from workbench.formats.hashes import sha256_file

    return sha256_file(path)


# --------------------------------------------------------------------------------------------------
# the open_clip backbone


@dataclass
class ClipBackbone:
    """An open_clip model, its eval preprocessing and tokenizer; features are L2-normalised."""

    model: torch.nn.Module
    preprocess: object
    tokenizer: object
    info: dict
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @torch.inference_mode()
    def image_features(self, images: Sequence, batch: int = BATCH) -> torch.Tensor:
        out = []
        for start in range(0, len(images), batch):
            pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in images[start:start + batch]])
            f = self.model.encode_image(pixels.to(self.device)).float()
            out.append(torch.nn.functional.normalize(f, dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0)

    @torch.inference_mode()
    def text_features(self, texts: Sequence[str], batch: int = BATCH) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), batch):
            tokens = self.tokenizer(list(texts[start:start + batch])).to(self.device)
            f = self.model.encode_text(tokens).float()
            out.append(torch.nn.functional.normalize(f, dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0)

    @property
    def embed_dim(self) -> int:
        return int(self.text_features(["a"]).shape[-1])


def _quickgelu_name(name: str, weights: Path) -> str:
    """OpenAI CLIP weights need QuickGELU; open_clip does not apply it when weights come from a file
    path, so a file whose name says 'openai' gets the '-quickgelu' config when one exists."""
    import open_clip

    if "openai" in weights.name.lower() and not name.endswith("-quickgelu") \
            and f"{name}-quickgelu" in open_clip.list_models():
        return f"{name}-quickgelu"
    return name


def _hf_cached_weights(name: str, tag: str) -> tuple[Path, dict]:
    """The weights file of an open_clip (name, tag) in the local HF cache; never downloads."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        tags = ", ".join(t for m, t in open_clip.list_pretrained() if m == name) or "none"
        raise WorkbenchError(f"scores.clip: open_clip has no pretrained tag {tag!r} for model {name!r} "
                             f"(tags for it: {tags}); or give `weights:` a local file")
    repo = (cfg.get("hf_hub") or "").strip("/")
    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        if repo:
            found = try_to_load_from_cache(repo, filename, cache_dir=os.environ.get("HF_HUB_CACHE"))
            if isinstance(found, str):
                return Path(found), cfg
    raise UnsupportedError(
        f"scores.clip: the weights of {name}/{tag} are not in the local Hugging Face cache "
        f"({repo or 'no hub repo'}); downloads are off. Give `scores.clip.weights:` a local weights "
        "file (.safetensors/.pt) or an open_clip folder (open_clip_config.json + weights)")


def load_backbone(model: str = "ViT-L-14", weights: Path | None = None, pretrained: str | None = None,
                  device: str | torch.device | None = None) -> ClipBackbone:
    """open_clip from a folder (`local-dir`), a weights file, or a tag found in the HF cache."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import open_clip

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kwargs: dict = {}
    if weights is not None:
        weights = Path(weights)
        if not weights.exists():
            raise WorkbenchError(f"scores.clip.weights: not found: {weights}")
        if weights.is_dir():
            if not (weights / "open_clip_config.json").exists():
                raise WorkbenchError(f"scores.clip.weights: {weights} is a folder without "
                                     "open_clip_config.json; expected an open_clip model folder or a "
                                     "weights file")
            arch, pretrained_arg = f"local-dir:{weights}", None
            files = sorted(p for p in weights.iterdir() if p.is_file())
            digest = hashlib.sha256("".join(_file_sha256(p) for p in files).encode()).hexdigest()
            info = {"backbone": f"local-dir:{weights.name}", "pretrained": weights.name,
                    "sha256": digest}
        else:
            arch, pretrained_arg = _quickgelu_name(model, weights), str(weights)
            info = {"backbone": arch, "pretrained": weights.name, "sha256": _file_sha256(weights)}
    else:
        tag = pretrained or DEFAULT_TAG
        path, cfg = _hf_cached_weights(model, tag)
        arch = f"{model}-quickgelu" if cfg.get("quick_gelu") and not model.endswith("-quickgelu") \
            and f"{model}-quickgelu" in open_clip.list_models() else model
        pretrained_arg = str(path)
        kwargs = {k2: cfg[k1] for k1, k2 in (("mean", "image_mean"), ("std", "image_std"),
                                             ("interpolation", "image_interpolation"),
                                             ("resize_mode", "image_resize_mode")) if cfg.get(k1)}
        info = {"backbone": arch, "pretrained": tag, "sha256": _file_sha256(path)}
    try:
        net, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained_arg,
                                                                   device=device, **kwargs)
    except (RuntimeError, ValueError, KeyError) as e:
        raise WorkbenchError(f"scores.clip: cannot load open_clip {arch!r} with weights "
                             f"{pretrained_arg}: {str(e).splitlines()[0][:300]}") from e
    net.eval()
    tokenizer = open_clip.get_tokenizer(arch if arch.startswith("local-dir:") else
                                        arch.replace("-quickgelu", ""))
    return ClipBackbone(net, preprocess, tokenizer, info, device)


# --------------------------------------------------------------------------------------------------
# the aesthetic MLP


def load_aesthetic(weights: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The predictor's Linear layers [(W, b), ...] in order (keys `layers.N.weight/bias`)."""
    weights = Path(weights)
    if not weights.is_file():
        raise WorkbenchError(f"scores.aesthetic.weights: not found: {weights}")
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(weights))
    else:
        from workbench.formats.lazy import load_pickle_safe

        state = load_pickle_safe(weights)
    found = {}
    for key, value in state.items():
        m = re.fullmatch(r"(?:.*\.)?layers\.(\d+)\.(weight|bias)", key)
        if m:
            found.setdefault(int(m[1]), {})[m[2]] = value.float()
    layers = [(found[i]["weight"], found[i].get("bias")) for i in sorted(found)]
    if not layers or any(w.ndim != 2 for w, _ in layers) or layers[-1][0].shape[0] != 1:
        raise WorkbenchError(f"scores.aesthetic.weights: {weights} is not a LAION aesthetic predictor "
                             "(expected Linear layers `layers.N.weight`/`bias` ending in one output)")
    for (w1, _), (w2, _) in zip(layers, layers[1:]):
        if w2.shape[1] != w1.shape[0]:
            raise WorkbenchError(f"scores.aesthetic.weights: {weights}: layer sizes do not chain")
    return layers


def aesthetic_scores(layers, features: torch.Tensor) -> torch.Tensor:
    x = features.float()
    for w, b in layers:
        x = x @ w.T + (b if b is not None else 0)
    return x[:, 0]


# --------------------------------------------------------------------------------------------------
# everything a grid asks for, loaded once


def _reference_images(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


class GridScorer:
    """The scorers a grid's `scores:` section asks for, loaded once; `score()` per batch of cells."""

    def __init__(self, scores, device: str | torch.device | None = None):
        self.cfg = scores
        self.backbone: ClipBackbone | None = None
        self.aesthetic = None
        self.style_ref: torch.Tensor | None = None
        self._info: dict = {}
        if scores is None or not any((scores.clip, scores.aesthetic, scores.style)):
            return
        clip = scores.clip
        self.backbone = load_backbone(getattr(clip, "model", "ViT-L-14") if clip else "ViT-L-14",
                                      getattr(clip, "weights", None) if clip else None,
                                      getattr(clip, "pretrained", None) if clip else None, device)
        dim = self.backbone.embed_dim
        if clip:
            self._info["clip"] = {**self.backbone.info, "scale": "100*max(cos,0)"}
        if scores.aesthetic:
            if scores.aesthetic.weights is None:
                raise WorkbenchError("scores.aesthetic.weights: missing; give the predictor's local "
                                     "weights file (e.g. sac+logos+ava1-l14-linearMSE.pth)")
            self.aesthetic = load_aesthetic(scores.aesthetic.weights)
            if self.aesthetic[0][0].shape[1] != dim:
                raise WorkbenchError(
                    f"scores.aesthetic.weights: {scores.aesthetic.weights} expects {self.aesthetic[0][0].shape[1]}"
                    f"-d CLIP embeddings but the CLIP backbone gives {dim}-d; use the backbone the "
                    "predictor was trained on (ViT-L-14 for the LAION predictor)")
            self._info["aesthetic"] = {"backbone": self.backbone.info, "weights": Path(scores.aesthetic.weights).name,
                                       "sha256": _file_sha256(Path(scores.aesthetic.weights))}
        if scores.style:
            refs = _reference_images(scores.style.reference_dir)
            if not refs:
                raise WorkbenchError(f"scores.style.reference_dir: no images in {scores.style.reference_dir}")
            from PIL import Image

            images = []
            for p in refs:
                with Image.open(p) as im:
                    images.append(im.convert("RGB"))
            self.style_ref = self.backbone.image_features(images).mean(dim=0)
            digest = hashlib.sha256("".join(_file_sha256(p) for p in refs).encode()).hexdigest()
            self._info["style"] = {"backbone": self.backbone.info, "references": len(refs),
                                   "sha256": digest, "scale": "mean cosine"}

    @classmethod
    def from_parts(cls, backbone: ClipBackbone, *, clip: bool = True, aesthetic=None,
                   style_reference: torch.Tensor | None = None) -> "GridScorer":
        """A scorer around an already-built backbone (benchmarks, the dashboard's warm cache)."""
        self = cls(None)
        self.backbone, self.aesthetic = backbone, aesthetic
        if clip:
            self._info["clip"] = {**backbone.info, "scale": "100*max(cos,0)"}
        if aesthetic is not None:
            self._info["aesthetic"] = {"backbone": backbone.info}
        if style_reference is not None:
            self.style_ref = torch.nn.functional.normalize(style_reference.float(), dim=-1).mean(dim=0)
            self._info["style"] = {"backbone": backbone.info, "references": len(style_reference)}
        return self

    @property
    def metrics(self) -> list[str]:
        return list(self._info)

    def signature(self) -> dict:
        """What identifies these scores (backbones, tags, weight hashes), for the cell cache."""
        return json.loads(json.dumps(self._info, sort_keys=True))

    def score(self, images: Sequence, prompts: Sequence[str]) -> list[dict[str, float]]:
        """Scores of each image (one dict per image, keyed by metric)."""
        out: list[dict[str, float]] = [{} for _ in images]
        if self.backbone is None or not images:
            return out
        feats = self.backbone.image_features(list(images))
        if "clip" in self._info:
            texts = [clean_prompt(p) for p in prompts]
            unique = list(dict.fromkeys(texts))
            tfeats = self.backbone.text_features(unique)
            index = {t: i for i, t in enumerate(unique)}
            cos = (feats * tfeats[[index[t] for t in texts]]).sum(-1)
            for row, c in zip(out, cos.tolist()):
                row["clip"] = 100.0 * max(c, 0.0)
        if self.aesthetic is not None:
            for row, a in zip(out, aesthetic_scores(self.aesthetic, feats).tolist()):
                row["aesthetic"] = float(a)
        if self.style_ref is not None:
            # mean_j cos(f, r_j) = f . mean_j r_j for unit vectors f, r_j
            for row, s in zip(out, (feats @ self.style_ref).tolist()):
                row["style"] = float(s)
        return out
