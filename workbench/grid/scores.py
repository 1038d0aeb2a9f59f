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

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from workbench.errors import UnsupportedError, WorkbenchError
from workbench.formats.hashes import files_sha256, sha256_file
from workbench.formats.lazy import load_pickle_safe
from workbench.formats.safetensors_io import read_header

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
    from huggingface_hub import constants

    cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    fetch = (f"Download it once with `hf download {repo} open_clip_model.safetensors` (it goes to the "
             "Hugging Face cache), or give" if repo else "Give")
    raise UnsupportedError(
        f"scores.clip: the weights of open_clip {name} ({tag}) are not on this machine: looked for "
        f"{repo or 'no hub repo'} in the Hugging Face cache ({cache}); workbench never downloads. "
        f"{fetch} `scores.clip.weights:` a local weights file (.safetensors) or "
        "an open_clip folder (open_clip_config.json + weights)")


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
            digest = files_sha256(files)
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
    except (RuntimeError, ValueError, KeyError, AssertionError) as e:  # "pos_embed width changed!"
        raise WorkbenchError(f"scores.clip: cannot load open_clip {arch!r} with weights "
                             f"{pretrained_arg}: {str(e).splitlines()[0][:300]}") from e
    net.eval()
    tokenizer = open_clip.get_tokenizer(arch if arch.startswith("local-dir:") else
                                        arch.replace("-quickgelu", ""))
    return ClipBackbone(net, preprocess, tokenizer, info, device)


# --------------------------------------------------------------------------------------------------
# the dry run's check of the backbone's weights (shapes only, nothing loaded)

# (what, key in the file, axis) -> what the open_clip model config says; read from the file header
_WIDTHS = (("text width", "positional_embedding", 1),
           ("embedding width", "text_projection", 1),
           ("image width", "visual.conv1.weight", 0),
           ("image patch size", "visual.conv1.weight", 2))


@dataclass
class BackboneCheck:
    """What the dry run found about the CLIP backbone's weights: the file it would load (None when
    there is none), lines for the plan, and problems, each saying how to fix it."""

    label: str
    model: str  # the open_clip model name, or "the config in FOLDER" for an open_clip folder
    weights: Path | None = None
    embed_dim: int | None = None
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _expected(cfg: dict) -> dict[str, int]:
    """{what: value} an open_clip model config implies for the state-dict shapes checked here.
    Widths come from open_clip's own config dataclasses (defaults included); towers built by timm
    or Hugging Face transformers have other key names and are not checked."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg  # heavy: only when a grid scores

    out: dict[str, int] = {}
    text = CLIPTextCfg(**cfg.get("text_cfg", {}))
    if not text.hf_model_name:
        out["text width"], out["text layers"] = text.width, text.layers
    out["embedding width"] = int(cfg["embed_dim"])
    vision = CLIPVisionCfg(**cfg.get("vision_cfg", {}))
    if not vision.timm_model_name and isinstance(vision.layers, int):
        out["image width"], out["image layers"] = vision.width, vision.layers
        out["image patch size"] = vision.patch_size
    return out


def _layers(shapes: dict, prefix: str) -> int | None:
    found = {k[len(prefix):].split(".", 1)[0] for k in shapes if k.startswith(prefix)}
    return len(found) or None


def _found(shapes: dict) -> dict[str, int]:
    """The same quantities read from a state dict's shapes (CLIP or CustomTextCLIP key names)."""
    if any(k.startswith("module.") for k in list(shapes)[:1]):
        shapes = {k[len("module."):]: v for k, v in shapes.items()}
    text = "" if "positional_embedding" in shapes else "text."
    out: dict[str, int] = {}
    for what, key, axis in _WIDTHS:
        shape = shapes.get(key if key.startswith("visual.") else text + key)
        if shape is not None and len(shape) > axis:
            out[what] = int(shape[axis])
    proj = shapes.get("text.text_projection.weight")  # a Linear: [embed_dim, width]
    if "embedding width" not in out and proj is not None:
        out["embedding width"] = int(proj[0])
    if "embedding width" not in out and "visual.proj" in shapes:
        out["embedding width"] = int(shapes["visual.proj"][1])
    for what, prefix in (("text layers", text + "transformer.resblocks."),
                         ("image layers", "visual.transformer.resblocks.")):
        n = _layers(shapes, prefix)
        if n:
            out[what] = n
    return out


def _shapes(path: Path) -> dict[str, tuple]:
    """Tensor shapes of a weights file: the safetensors header, or a pickle read onto the meta
    device (no tensor data; open_clip loads with weights_only=True too, so a file that fails
    here fails there)."""
    if path.suffix.lower() == ".safetensors":
        return {k: tuple(v) for k, v in read_header(path).shapes().items()}
    state = torch.load(path, map_location="meta", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WorkbenchError(f"{path}: holds no state dict")
    return {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}


def _mismatch(found: dict[str, int], expected: dict[str, int]) -> list[tuple[str, int, int]]:
    return [(what, found[what], want) for what, want in expected.items()
            if what in found and found[what] != want]


def _models_fitting(found: dict[str, int]) -> list[str]:
    """open_clip model names whose config fits these shapes (plain names before -quickgelu etc.)."""
    import open_clip

    fits = []
    for name in open_clip.list_models():
        try:
            expected = _expected(open_clip.get_model_config(name) or {})
        except (TypeError, KeyError):
            continue
        # every quantity the file shows must be one the config defines (a config with a Hugging
        # Face text tower does not fit a file holding open_clip's own text transformer)
        if set(found) <= set(expected) and not _mismatch(found, expected):
            fits.append(name)
    return sorted(fits, key=lambda n: (n.count("-") + n.count("_"), len(n), n))


def check_backbone(scores) -> BackboneCheck | None:
    """The dry run's look at the weights a grid's scorers would load (None: nothing is scored).

    Mirrors `load_backbone`: an open_clip folder (its own config), a weights file checked against
    the config of `scores.clip.model`, or the pretrained tag's file in the Hugging Face cache.
    Compares the widths and depths in the file's header with open_clip's model config, so a file
    of another architecture is a problem with its fix here, not an AssertionError after the
    images were made."""
    if scores is None or not any((scores.clip, scores.aesthetic, scores.style)):
        return None
    import open_clip

    clip = scores.clip
    model = clip.model if clip else "ViT-L-14"
    weights = Path(clip.weights) if clip and clip.weights else None
    label = "scores.clip" if clip else "scores (the aesthetic and style scores use CLIP ViT-L-14)"
    check = BackboneCheck(label, model)
    cfg = None
    if weights is not None:
        if not weights.exists():
            return check  # check_input reports it
        if weights.is_dir():
            config = weights / "open_clip_config.json"
            try:
                cfg = json.loads(config.read_text(encoding="utf-8"))["model_cfg"]
            except (OSError, ValueError, KeyError, TypeError):
                check.problems.append(
                    f"{label}.weights: {weights} is a folder without a readable open_clip_config.json "
                    "(with a model_cfg); give an open_clip model folder or a weights file")
                return check
            files = [weights / n for n in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
                     if (weights / n).is_file()] or sorted(
                p for p in weights.iterdir() if p.suffix in (".safetensors", ".bin", ".pth"))
            if not files:
                check.problems.append(f"{label}.weights: the folder {weights} has no weights file "
                                      "(open_clip_model.safetensors)")
                return check
            model = check.model = f"the config in {weights.name}/"
            weights = files[0]
        else:
            cfg = open_clip.get_model_config(_quickgelu_name(model, weights))
    else:
        try:
            weights, _ = _hf_cached_weights(model, (clip.pretrained if clip else None) or DEFAULT_TAG)
        except WorkbenchError as e:
            check.problems.append(str(e))
            return check
        cfg = open_clip.get_model_config(model)
    if not cfg:
        close = ", ".join(n for n in open_clip.list_models() if model.lower()[:5] in n.lower())[:200]
        check.problems.append(f"{label}.model: open_clip has no model {model!r}"
                              + (f" (similar: {close})" if close else "")
                              + "; `python -c \"import open_clip; print(open_clip.list_models())\"` "
                              "lists them")
        return check
    check.weights = weights
    check.embed_dim = int(cfg["embed_dim"])
    try:
        found = _found(_shapes(weights))
    except (WorkbenchError, RuntimeError, OSError, ValueError, EOFError) as e:
        check.problems.append(f"{label}: cannot read the tensor shapes of {weights} "
                              f"({str(e).splitlines()[0][:200]}); open_clip could not load it either: "
                              "give a .safetensors file or an open_clip folder")
        return check
    expected = _expected(cfg)
    if not set(found) & {"text width", "image width"}:
        check.problems.append(f"{label}: {weights} is not an open_clip CLIP state dict (no "
                              "positional_embedding or visual.conv1.weight); give open_clip "
                              "weights (e.g. open_clip_model.safetensors from the model's hub page)")
        return check
    wrong = _mismatch(found, expected)
    if wrong:
        shown = ", ".join(f"{what} {have} ({model} has {want})" for what, have, want in wrong)
        desc = model if check.model.startswith("the config") else f"open_clip {model}"
        fits = _models_fitting(found)
        fix = (f"set `scores.clip.model: {fits[0]}`" + (f" (or {', '.join(fits[1:3])})" if len(fits) > 1 else "")
               + f", or give weights made for {model}") if fits else \
            f"give weights made for {model}, or the open_clip model these weights belong to"
        check.problems.append(f"{label}: the weights {weights.name} do not fit {desc}: {shown}; {fix}")
        return check
    check.embed_dim = found.get("embedding width", check.embed_dim)
    desc = model if check.model.startswith("the config") else f"open_clip {model}"
    check.lines.append(f"score backbone: {desc}, weights {weights} (shapes match)")
    return check


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


def aesthetic_input_width(weights: Path) -> int | None:
    """The embedding width the predictor's first Linear layer takes, from the file's shapes
    (None when the file does not look like a predictor: loading then says why)."""
    try:
        shapes = _shapes(Path(weights))
    except (WorkbenchError, RuntimeError, OSError, ValueError, EOFError):
        return None
    firsts = sorted((int(m[1]), shape) for key, shape in shapes.items()
                    if (m := re.fullmatch(r"(?:.*\.)?layers\.(\d+)\.weight", key)) and len(shape) == 2)
    return int(firsts[0][1][1]) if firsts else None


def aesthetic_scores(layers, features: torch.Tensor) -> torch.Tensor:
    x = features.float()
    for w, b in layers:
        x = x @ w.T + (b if b is not None else 0)
    return x[:, 0]


# --------------------------------------------------------------------------------------------------
# everything a grid asks for, loaded once


def load_images(paths: Sequence[Path]) -> list:
    """The pictures as RGB PIL images, each file closed once read."""
    from PIL import Image  # loaded with the scorer, not with the grid's planning

    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(im.convert("RGB"))
    return out


def reference_images(folder: Path) -> list[Path]:
    """Every picture under `folder` (recursive), sorted: the style references of a grid, and what
    workbench/grid/holdout.py splits for pick and merge_search."""
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
            refs = reference_images(scores.style.reference_dir)
            if not refs:
                raise WorkbenchError(f"scores.style.reference_dir: no images in {scores.style.reference_dir}")
            self.style_ref = self.backbone.image_features(load_images(refs)).mean(dim=0)
            digest = files_sha256(refs)
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
