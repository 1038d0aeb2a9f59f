"""Model folders by kind of an existing A1111 / Forge / ComfyUI install.

People who already run one of these tools keep their checkpoints, LoRAs, VAEs and text encoders
in that tool's folders. Given the install's root, `find_install` says which folder holds which
kind of model, so `workbench models scan --tool ROOT` and the dashboard (`workbench app --tool
ROOT`, config.py) list those files in place, and finished merges and LoRAs can be put where the
tool lists them (`publish`, never replacing a file).

Layouts (folders that do not exist are left out):
- A1111 / Forge: models/Stable-diffusion (checkpoints, also FLUX/UNet-only files in Forge),
  models/Lora and models/LyCORIS, models/VAE, models/text_encoder (Forge), embeddings/.
  Forge's one-click package keeps the install in a `webui/` subfolder.
- ComfyUI: models/checkpoints, models/diffusion_models and models/unet, models/loras, models/vae,
  models/text_encoders and models/clip, models/embeddings; the portable build keeps it in a
  `ComfyUI/` subfolder. Its `extra_model_paths.yaml` adds folders: top-level sections (any name),
  each with an optional `base_path` (`~` and environment variables expanded; relative to the YAML
  file's folder), an optional `is_default` (its folders come first, as ComfyUI lists them), and
  per-kind entries whose value is one folder or several, one per line (a YAML `|` block), each
  relative to `base_path` (or to the YAML file's folder when there is none). Kinds this project
  does not read (controlnet, upscale_models, custom_nodes, ...) are ignored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from workbench import system
from workbench.errors import OutputExistsError, WorkbenchError

# the kinds of model folders, in the order listings show them
KINDS = ("checkpoint", "diffusion_model", "lora", "vae", "text_encoder", "embedding")
KIND_TITLES = {"checkpoint": "checkpoints", "diffusion_model": "diffusion models (UNet/DiT only)",
               "lora": "LoRA / LyCORIS", "vae": "VAE", "text_encoder": "text encoders",
               "embedding": "embeddings"}

A1111 = "A1111/Forge"
COMFYUI = "ComfyUI"
LAYOUTS: dict[str, tuple[tuple[str, str], ...]] = {
    A1111: (("checkpoint", "models/Stable-diffusion"), ("lora", "models/Lora"),
            ("lora", "models/LyCORIS"), ("vae", "models/VAE"),
            ("text_encoder", "models/text_encoder"), ("embedding", "embeddings")),
    COMFYUI: (("checkpoint", "models/checkpoints"), ("diffusion_model", "models/diffusion_models"),
              ("diffusion_model", "models/unet"), ("lora", "models/loras"), ("vae", "models/vae"),
              ("text_encoder", "models/text_encoders"), ("text_encoder", "models/clip"),
              ("embedding", "models/embeddings")),
}
# how an install is recognised: a folder only that tool has
MARKERS = {A1111: "models/Stable-diffusion", COMFYUI: "models/checkpoints"}
SUBFOLDERS = ("webui", "ComfyUI", "stable-diffusion-webui")  # packaged installs keep it here
EXTRA_PATHS = "extra_model_paths.yaml"
# extra_model_paths.yaml keys -> our kinds (ComfyUI's old names `unet` and `clip` included)
EXTRA_KEYS = {"checkpoints": "checkpoint", "diffusion_models": "diffusion_model",
              "unet": "diffusion_model", "loras": "lora", "vae": "vae",
              "text_encoders": "text_encoder", "clip": "text_encoder", "embeddings": "embedding"}
# the folder kind a detected model kind (workbench.formats.detect) is listed under
MODEL_KIND_TO_FOLDER = {"checkpoint": "checkpoint", "unet": "diffusion_model",
                        "transformer": "diffusion_model", "lora": "lora", "vae": "vae",
                        "text_encoder": "text_encoder"}


@dataclass(frozen=True)
class ModelFolder:
    """One folder of one kind, and where we learned about it (shown to the user)."""

    kind: str
    path: Path
    source: str          # "A1111/Forge layout", "extra_model_paths.yaml [a111]", ...
    default: bool = False  # ComfyUI `is_default`: listed first, preferred for new files


@dataclass
class ModelFolders:
    """The model folders of one install, by kind (existing folders only)."""

    tool: str
    root: Path
    folders: list[ModelFolder] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # extra_model_paths entries not used

    def of(self, kind: str) -> list[Path]:
        """Folders of a kind, `is_default` ones first, each once."""
        if kind not in KINDS:
            raise ValueError(f"unknown model folder kind {kind!r}; expected one of {KINDS}")
        ordered = sorted((f for f in self.folders if f.kind == kind), key=lambda f: not f.default)
        return _unique(f.path for f in ordered)

    def paths(self) -> list[Path]:
        """Every folder once (the same folder listed under two kinds or twice is scanned once)."""
        return _unique(f.path for f in self.folders)

    def kind_of(self, path: str | Path) -> str | None:
        """The kind of the folder a file lies in (the innermost one when folders nest)."""
        real = Path(os.path.realpath(path))
        best: tuple[int, str] | None = None
        for f in self.folders:
            folder = Path(os.path.realpath(f.path))
            if folder in real.parents and (best is None or len(folder.parts) > best[0]):
                best = (len(folder.parts), f.kind)
        return best[1] if best else None

    def target(self, kind: str) -> Path | None:
        """Where a new file of this kind goes so that the tool lists it: the first folder of the
        kind; UNet/DiT-only files go to the checkpoint folder where there is no folder of their
        own (Forge lists them there)."""
        folders = self.of(kind) or (self.of("checkpoint") if kind == "diffusion_model" else [])
        return folders[0] if folders else None

    def describe(self) -> str:
        lines = [f"{self.tool} install at {self.root}"]
        for kind in KINDS:
            for path in self.of(kind):
                lines.append(f"  {KIND_TITLES[kind]}: {path}")
        if self.ignored:
            lines.append("  not used: " + ", ".join(self.ignored))
        return "\n".join(lines)


def _unique(paths) -> list[Path]:
    seen, out = set(), []
    for p in paths:
        key = os.path.normcase(os.path.realpath(p))
        if key not in seen:
            seen.add(key)
            out.append(Path(p))
    return out


def _tool_root(root: Path) -> tuple[str, Path] | None:
    """(tool, install root) for root, a packaged install's parent, or an install's models/."""
    candidates = [root, *(root / s for s in SUBFOLDERS)]
    if root.name.lower() == "models":
        candidates.append(root.parent)
    for base in candidates:
        for tool, marker in MARKERS.items():
            if (base / marker).is_dir():
                return tool, base
        if (base / EXTRA_PATHS).is_file():
            return COMFYUI, base
    return None


def find_install(root: str | Path) -> ModelFolders:
    """The model folders of the A1111/Forge/ComfyUI install at `root` (or of a ComfyUI
    extra_model_paths.yaml given directly). A WorkbenchError says what was looked for."""
    given = Path(os.path.expanduser(str(root)))
    if given.is_file():
        if given.suffix.lower() not in (".yaml", ".yml"):
            raise WorkbenchError(f"{given}: expected the folder of an A1111, Forge or ComfyUI "
                                 f"install, or a ComfyUI {EXTRA_PATHS}")
        folders = ModelFolders(COMFYUI, given.parent.resolve())
        read_extra_model_paths(given, folders)
        return folders
    if not given.is_dir():
        raise WorkbenchError(f"{given}: no such folder (expected the folder of an A1111, Forge or "
                             "ComfyUI install)")
    found = _tool_root(given.resolve())
    if found is None:
        raise WorkbenchError(
            f"{given}: not an A1111, Forge or ComfyUI install: expected "
            f"{MARKERS[A1111]}/ (A1111, Forge), {MARKERS[COMFYUI]}/ or {EXTRA_PATHS} (ComfyUI) "
            f"in it or in a {'/'.join(SUBFOLDERS)} subfolder; for any other folder use "
            "`workbench models scan DIR` or `--models DIR`")
    tool, base = found
    folders = ModelFolders(tool, base)
    for kind, rel in LAYOUTS[tool]:
        path = base / rel
        if path.is_dir():
            folders.folders.append(ModelFolder(kind, path, f"{tool} layout"))
    if tool == COMFYUI and (base / EXTRA_PATHS).is_file():
        read_extra_model_paths(base / EXTRA_PATHS, folders)
    return folders


def _expand(text: str) -> str:
    return os.path.expandvars(os.path.expanduser(text.strip()))


def read_extra_model_paths(path: str | Path, into: ModelFolders) -> ModelFolders:
    """Add the folders a ComfyUI extra_model_paths.yaml names (see the module docstring for the
    format) to `into`; folders that do not exist are noted in `into.ignored`."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise WorkbenchError(f"{path}: cannot read ({e})") from None
    except yaml.YAMLError as e:
        raise WorkbenchError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return into
    if not isinstance(data, dict):
        raise WorkbenchError(f"{path}: expected sections (e.g. `comfyui:`) each mapping "
                             "base_path and model kinds to folders")
    here = path.parent.resolve()
    for section, conf in data.items():
        if conf is None:
            continue
        where = f"{path}: section {section!r}"
        if not isinstance(conf, dict):
            raise WorkbenchError(f"{where}: expected base_path and kind: folder entries, got "
                                 f"{type(conf).__name__}")
        base = conf.get("base_path")
        if base is not None:
            if not isinstance(base, str):
                raise WorkbenchError(f"{where}: base_path must be a folder name, got "
                                     f"{type(base).__name__}")
            base_dir = Path(_expand(base))
            if not base_dir.is_absolute():
                base_dir = here / base_dir
        else:
            base_dir = here
        default = bool(conf.get("is_default", False))
        for key, value in conf.items():
            if key in ("base_path", "is_default"):
                continue
            kind = EXTRA_KEYS.get(str(key))
            if kind is None:
                into.ignored.append(f"{section}.{key}")
                continue
            if not isinstance(value, str):
                raise WorkbenchError(f"{where}: {key}: expected a folder, or several one per line "
                                     f"(a `|` block), got {type(value).__name__}")
            for line in value.splitlines():
                if not line.strip():
                    continue
                folder = Path(os.path.normpath(base_dir / _expand(line)))
                if folder.is_dir():
                    into.folders.append(ModelFolder(kind, folder, f"{EXTRA_PATHS} [{section}]",
                                                    default))
                else:
                    into.ignored.append(f"{section}.{key}: {folder} (missing)")
    return into


# --------------------------------------------------------------------------------------------------
# writing into the tool's folders


def publish(src: str | Path, folders: ModelFolders, kind: str) -> Path | None:
    """Put a finished model file where the tool lists files of `kind`; returns the new path, or
    None when the tool has no such folder or a file of that name is already there (never
    replaced). A hard link when source and folder share a volume (our writers replace files by
    rename, so the two names never see a half-written file), else a copy (system.link_or_copy)."""
    src = Path(src)
    folder = folders.target(kind)
    if folder is None:
        return None
    target = folder / src.name
    if target.exists():
        return None
    try:
        system.link_or_copy(src, target)
    except OutputExistsError:  # appeared meanwhile: left alone
        return None
    return target
