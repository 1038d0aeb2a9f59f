"""What a run will do, and what it did: the objects every recipe kind shares.

`describe(recipe)` in each `workbench/kinds/<kind>.py` returns a `RunPlan`: inputs checked on disk,
the lines the dry run prints, the outputs, the problems, and the kind's own plan object (`detail`:
the merge plan, the training setup, the memory plan, the grid's cells). `run(plan)` executes that
same object, so a real run does exactly what `--dry-run` printed and nothing is planned twice.
This module sits below every kind: it imports `errors`, `units`, `system`, `formats` and the
split-FLUX rule of `pipeline/load_dit.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench import system
from workbench.errors import WorkbenchError
from workbench.formats import pipeline_config
from workbench.formats import pipeline_configs_dit as dit_configs
from workbench.formats.detect import detect
from workbench.pipeline.load_dit import flux_parts
from workbench.units import human_size

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}


@dataclass
class InputCheck:
    """One file or folder the run reads."""

    label: str
    path: Path
    exists: bool
    size: int | None = None  # bytes, files only
    detail: str = ""  # architecture, image count, ...
    arch: str | None = None  # detected architecture id (sd15, sdxl, sd3, flux, ...)
    kind: str | None = None  # detected kind (checkpoint, lora, ...)
    archs: frozenset[str] = frozenset()  # every architecture the file serves (ModelInfo.archs)


@dataclass
class RunPlan:
    """What a run will read and write, and what is wrong; `render()` is the dry-run text.

    `recipe` and `overwrite` are what the plan was made for; `detail` is the kind's own plan,
    consumed by its `run` (None when the inputs were too broken to plan further)."""

    kind: str
    name: str
    source: Path | None = None
    inputs: list[InputCheck] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    existing_outputs: list[Path] = field(default_factory=list)
    estimated_seconds: float | None = None  # the time estimate the dry run printed, if any
    keep_on_cancel: list[Path] = field(default_factory=list)  # outputs a stopped run keeps (resumable state)
    recipe: Any = None
    overwrite: bool = False
    detail: Any = None

    @classmethod
    def for_recipe(cls, recipe: Any, overwrite: bool) -> "RunPlan":
        return cls(recipe.kind, recipe.name or recipe.kind, recipe.source_path, recipe=recipe,
                   overwrite=overwrite)

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        head = f"plan: {self.kind} '{self.name}'" + (f" from {self.source}" if self.source else "")
        out = [head]
        if self.inputs:
            out.append("inputs:")
            width = max(len(i.label) for i in self.inputs)
            for i in self.inputs:
                state = (f"{human_size(i.size)}" if i.size is not None else "folder") if i.exists \
                    else "MISSING"
                extra = f", {i.detail}" if i.detail else ""
                out.append(f"  {i.label:<{width}}  {i.path}  ({state}{extra})")
        out += self.lines
        if self.outputs:
            out.append("outputs:")
            out += [f"  {p}" for p in self.outputs]
        if self.problems:
            out.append(f"problems ({len(self.problems)}):")
            out += [f"  - {p}" for p in self.problems]
        else:
            out.append("problems: none")
        return "\n".join(out)

    __str__ = render


@dataclass
class RunResult:
    """What a run did (or, for a dry run, would do)."""

    kind: str
    name: str
    dry_run: bool
    plan: RunPlan | None = None
    outputs: list[Path] = field(default_factory=list)
    summary: str = ""

    def __str__(self) -> str:
        if self.dry_run and self.plan is not None:
            return self.plan.render()
        if self.summary:
            return self.summary
        return f"{self.kind} '{self.name}': wrote " + (", ".join(map(str, self.outputs)) or "nothing")


def _split_flux(folder: Path) -> bool:
    """Whether `folder` holds Forge-style split FLUX files (a transformer .safetensors or .gguf, ae,
    clip_l, t5xxl), which the generation core loads as one model (its own rule)."""
    try:
        flux_parts(folder)
    except WorkbenchError:
        return False
    return True


def _detect(check: InputCheck) -> str | None:
    """Fill in the architecture of a model file; returns a problem or None."""
    try:
        info = detect(check.path)
    except WorkbenchError as e:
        check.detail = "unreadable"
        return str(e)
    check.arch = info.arch
    check.kind = info.kind
    check.archs = frozenset(info.archs or ([info.arch] if info.arch else []))
    if check.arch is None:
        check.detail = str(info)
        return None
    bits = [check.arch + (f" {info.variant}" if info.variant else "")]
    if info.kind:
        bits.append(info.kind)
    check.detail = " ".join(bits)
    return None


def check_input(plan: RunPlan, label: str, path: Path, expect: str = "model") -> InputCheck:
    """Record one input: `expect` is 'model' (a .safetensors file or a diffusers folder), 'lora'
    (a .safetensors LoRA file, its architecture detected), 'file', 'any' (a file or folder), 'dir'
    or 'images' (a folder of images). Missing or unusable inputs become plan problems."""
    path = Path(path)
    check = InputCheck(label, path, path.exists())
    if not check.exists:
        plan.problems.append(f"{label}: not found: {path}")
    elif path.is_dir():
        if expect in ("file", "lora"):
            plan.problems.append(f"{label}: is a folder, expected a file: {path}")
        elif expect == "images":
            images = [p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
            captions = [p for p in path.rglob("*") if p.suffix.lower() in (".txt", ".caption")]
            check.detail = f"{len(images)} images, {len(captions)} captions"
            if not images:
                plan.problems.append(f"{label}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) "
                                     f"in {path}")
        elif expect == "model":
            if (path / "model_index.json").exists():
                check.detail = "diffusers folder"
            elif _split_flux(path):
                check.arch, check.detail = "flux", "split FLUX files (transformer, ae, clip_l, t5xxl)"
            else:
                plan.problems.append(f"{label}: folder without model_index.json; expected a "
                                     f"single .safetensors file or a diffusers folder: {path}")
    else:
        check.size = path.stat().st_size
        if expect in ("dir", "images"):
            plan.problems.append(f"{label}: is a file, expected a folder: {path}")
        elif expect == "model":
            if path.suffix.lower() in PICKLE_SUFFIXES:
                plan.problems.append(
                    f"{label}: {path.suffix} files are Python pickles, which can run code when "
                    f"loaded; convert it once with `workbench convert {path}` and use the "
                    f".safetensors copy")
            elif path.suffix.lower() not in (".safetensors", ".sft", ".gguf"):
                plan.problems.append(f"{label}: expected a .safetensors model file "
                                     f"(got {path.suffix or 'no suffix'}): {path}")
            else:
                problem = _detect(check)
                if problem:
                    plan.problems.append(f"{label}: {problem}")
        elif expect == "lora":
            problem = _detect(check) if path.suffix.lower() == ".safetensors" else \
                f"expected a .safetensors LoRA file (got {path.suffix or 'no suffix'}): {path}"
            if problem:
                plan.problems.append(f"{label}: {problem}")
            elif check.kind != "lora":
                plan.problems.append(f"{label}: {path.name} is {_an(check.arch or 'x')} {check.arch} {check.kind}, not a "
                                     "LoRA; give a LoRA file here")
    plan.inputs.append(check)
    return check


def lora_problem(lora: InputCheck, model_label: str, model_arch: str | None) -> str | None:
    """'...is a LoRA for sdxl, but the model is sd15...' when a detected LoRA cannot apply to a
    model of `model_arch` (what `pipeline/loras.py` refuses after the model has loaded)."""
    if lora.kind != "lora" or not lora.archs or model_arch is None or model_arch in lora.archs:
        return None
    made_for = ", ".join(sorted(lora.archs))
    return (f"{lora.label}: {lora.path.name} is a LoRA for {made_for}, but {model_label} is "
            f"{model_arch}; a LoRA only applies to the architecture it was trained on: use "
            f"{_an(model_arch)} {model_arch} LoRA here, or {_an(made_for)} {made_for} model")


def _an(arch_id: str) -> str:
    """The article an architecture id takes when read out ("an sdxl", "an sd15", "a flux")."""
    return "an" if arch_id[:1].lower() in "aefhilmnorsx" else "a"


def t5_tokenizer_problem(label: str, path: Path, arch: str | None) -> str | None:
    """The T5-XXL tokenizer an SD3.5/FLUX file needs, when this machine has none.

    Loading writes the model's config folder, T5 tokenizer included (formats/pipeline_config.py,
    pipeline_configs_dit.write_t5_tokenizer_dir); a full-size T5 needs the real SentencePiece
    vocabulary, which cannot be bundled. Nothing is needed when that folder was written before."""
    if arch not in ("sd3", "flux") or not Path(path).is_file():
        return None
    try:
        files = pipeline_config.config_files(path, arch)
    except WorkbenchError:
        return None  # the load reports what is wrong with the file itself
    vocabs = [spec.get("vocab_size") for spec in files.values()
              if str(spec.get("_writer", "")).endswith(":write_t5_tokenizer_dir")]
    if not any(v != dit_configs.TINY_T5_VOCAB for v in vocabs):
        return None
    done = pipeline_config.cache_root() / "configs" / f"{arch}-{pipeline_config.files_hash(files)}"
    if (done / ".complete").exists() or dit_configs.find_real_t5() is not None:
        return None
    return (f"{label}: this {arch} model's T5 text encoder needs the T5-XXL tokenizer, which is not "
            "bundled and was not found on this machine; set the environment variable "
            "WORKBENCH_T5_TOKENIZER to a folder holding tokenizer.json (or spiece.model), e.g. the "
            "tokenizer_2 folder of black-forest-labs/FLUX.1-dev, or put a snapshot of FLUX.1-dev, "
            "FLUX.1-schnell, SD3.5 or google/t5-v1_1-xxl (its tokenizer files) in the Hugging Face "
            f"cache ({hf_cache_dir()})")


def hf_cache_dir() -> Path:
    """Where the Hugging Face cache is on this machine (`$HF_HUB_CACHE`, `$HF_HOME/hub`, ...)."""
    from huggingface_hub import constants  # light, but only the T5 and CLIP checks need it

    return Path(constants.HF_HUB_CACHE)


def ram_problem(needed: int, what: str, fix: str = "close other programs to free RAM") -> str | None:
    """'not enough free RAM ...' when `needed` bytes exceed what the OS can give now."""
    free = system.ram_available()
    if free is None or needed <= free:
        return None
    return (f"not enough free RAM for {what}: needs about {human_size(needed)}, "
            f"{human_size(free)} free; {fix}")


def check_output_file(plan: RunPlan, path: Path, overwrite: bool, how: str) -> None:
    """Record an output file; an existing one is a problem unless the run may overwrite it."""
    plan.outputs.append(path)
    if path.exists() and not overwrite:
        plan.existing_outputs.append(path)
        plan.problems.append(f"output exists: {path} ({how})")


def disk_problem(target: Path, needed: int, margin: float = 1.05) -> str | None:
    """'not enough disk space ...' when the file system `target` goes to lacks room."""
    folder = system.existing_folder(target)
    free = system.free_bytes(folder)
    if free is None:
        return None
    if free < needed * margin:
        return (f"not enough disk space in {folder} for {target}: needs {human_size(needed)}, "
                f"{human_size(free)} free")
    return None
