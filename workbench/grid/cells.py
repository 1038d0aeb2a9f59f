"""A grid recipe expanded into cells: what each image is, its cache key, and the order to make them.

A cell is one image: a model source (a checkpoint file, or a merge recipe at one parameter value),
LoRAs, generation settings and a seed, plus its place in the grid (x, y, z indices). Its key is the
sha256 of everything that decides the pixels (model file hash or merge inputs' hashes and parameters,
LoRA hashes and weights, prompt, negative prompt, sampler, steps, CFG, size, clip skip, seed), so a
finished cell is found again whatever grid asks for it.

Fairness: the seed list is shared by every (x, y, z) position, and the generation core draws each
image's initial noise from a CPU generator seeded with the cell's seed, so cells that share
(prompt, seed, size) start from identical noise. Order: cells are grouped by model source (each
checkpoint loaded, each merge value computed, once), then by everything except the seed, so one
`generate` call makes all the seeds of a group.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from workbench.pipeline.components import denoiser_only
from workbench.pipeline.generate import ImageSettings, LoraUse
from workbench.recipes.common import parse_size
from workbench.recipes.grid import GridRecipe
from workbench.formats.hashes import sha256_file
from workbench.grid.merge_preview import merge_identity as preview_identity

KEY_VERSION = 1
LETTERS = ("x", "y", "z")


@dataclass(frozen=True)
class Source:
    """The model a cell runs on: a checkpoint file, or a merge recipe with one parameter set."""

    path: Path
    merge_param: str | None = None   # "alpha" / "beta" for a merge preview
    merge_step: str | None = None    # the step whose parameter varies (None: every step that has it)
    merge_value: float | None = None
    components: Path | None = None   # defaults.components (used when `path` is UNet/transformer-only)

    @property
    def is_merge(self) -> bool:
        return self.merge_param is not None

    @property
    def label(self) -> str:
        if self.is_merge:
            return f"{self.path.stem} {self.merge_param}={self.merge_value:g}"
        return self.path.stem


@dataclass(frozen=True)
class Cell:
    source: Source
    loras: tuple[LoraUse, ...]
    settings: ImageSettings
    seed: int
    index: tuple[int, int, int]          # (x, y, z) value indices; 0 for an unused axis
    labels: tuple[tuple[str, str], ...]  # ((letter, label), ...) of the used axes
    key: str = ""

    def label(self, letter: str) -> str:
        return dict(self.labels).get(letter, "")

    def group(self) -> tuple:
        """Cells with equal groups differ only in the seed: one `generate` call makes them."""
        return (self.source, self.loras, self.settings)


@dataclass
class GridLayout:
    """The axes as the grid shows them: per letter the axis name, its title and value labels."""

    axes: dict[str, tuple[str, str, list[str]]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)
    seed_axis: str | None = None  # the letter of the seed axis, when seed is an axis

    def size(self, letter: str) -> int:
        return len(self.axes[letter][2]) if letter in self.axes else 1


# --------------------------------------------------------------------------------------------------
# applying axis values


def value_label(axis_name: str, value) -> str:
    """The text a grid shows for a value (A1111: bare values for models, samplers and prompt S/R)."""
    if axis_name == "model":
        return Path(value).stem
    if axis_name == "lora":
        return f"{Path(value.path).stem}:{value.weight:g}" + (f":{value.blocks}" if value.blocks else "")
    if axis_name == "size":
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def axis_title(axis) -> str:
    return axis.label or {"merge_alpha": "alpha", "merge_beta": "beta", "cfg": "CFG"}.get(axis.axis, axis.axis)


def _apply(state: dict, axis, value) -> None:
    """Set one axis value on the cell being built (a dict of its fields)."""
    name = axis.axis
    if name == "model":
        state["source"] = Source(Path(value))
    elif name in ("merge_alpha", "merge_beta"):
        state["source"] = Source(Path(axis.recipe), name.split("_", 1)[1], axis.step, float(value))
    elif name == "lora":
        state["loras"] = state["loras"] + (LoraUse(Path(value.path), float(value.weight), value.blocks),)
    elif name == "prompt_sr":
        search = axis.expanded_values()[0]
        state["prompt"] = state["prompt"].replace(search, value)
        state["negative_prompt"] = state["negative_prompt"].replace(search, value)
    elif name == "size":
        state["width"], state["height"] = parse_size(value)
    elif name == "cfg":
        state["cfg"] = float(value)
    else:  # prompt, negative_prompt, seed, steps, clip_skip, sampler
        state[name] = value


def layout(recipe: GridRecipe) -> GridLayout:
    out = GridLayout()
    for letter, axis in recipe.axes():
        values = axis.expanded_values()  # type: ignore[attr-defined]
        out.axes[letter] = (axis.axis, axis_title(axis), [value_label(axis.axis, v) for v in values])  # type: ignore
        if axis.axis == "seed":  # type: ignore[attr-defined]
            out.seed_axis = letter
    out.seeds = [0] if out.seed_axis else list(recipe.seeds or [1])
    return out


def expand(recipe: GridRecipe) -> list[Cell]:
    """Every cell of the grid (keys not yet filled in: see `with_keys`), z-major, then y, x, seed."""
    d = recipe.defaults
    axes = recipe.axes()
    values = {letter: axis.expanded_values() for letter, axis in axes}  # type: ignore[attr-defined]
    lay = layout(recipe)
    seeds = lay.seeds
    ranges = [range(len(values[letter])) if letter in values else range(1) for letter in LETTERS]
    cells = []
    for zi, yi, xi in itertools.product(ranges[2], ranges[1], ranges[0]):
        for seed in seeds:
            state = {"source": Source(Path(d.model)) if d.model else None,
                     "loras": tuple(LoraUse(Path(lr.path), float(lr.weight), lr.blocks) for lr in d.loras),
                     "prompt": d.prompt, "negative_prompt": d.negative_prompt, "sampler": d.sampler,
                     "steps": d.steps, "cfg": float(d.cfg), "width": d.width, "height": d.height,
                     "clip_skip": d.clip_skip, "seed": seed}
            index = {"x": xi, "y": yi, "z": zi}
            labels = []
            for letter, axis in axes:
                value = values[letter][index[letter]]
                _apply(state, axis, value)
                labels.append((letter, lay.axes[letter][2][index[letter]]))
            if d.components is not None and state["source"] is not None and not state["source"].is_merge:
                state["source"] = replace(state["source"], components=Path(d.components))
            settings = ImageSettings(state["prompt"], state["negative_prompt"], state["sampler"],
                                     int(state["steps"]), float(state["cfg"]), int(state["width"]),
                                     int(state["height"]), state["clip_skip"])
            cells.append(Cell(state["source"], state["loras"], settings, int(state["seed"]),
                              (xi, yi, zi), tuple(labels)))
    return cells


# --------------------------------------------------------------------------------------------------
# keys


def _sha256(path: Path) -> str:
    return sha256_file(path)


def source_identity(source: Source, merge_identity=None) -> dict:
    """What identifies a model source: the file's sha256, or the merge inputs' hashes and steps."""
    if source.is_merge:
        return (merge_identity or preview_identity)(source)
    path = Path(source.path)
    if path.is_dir():  # split FLUX files (e.g. a GGUF transformer beside ae, clip_l, t5xxl) or diffusers
        return {"files": {p.relative_to(path).as_posix(): _sha256(p) for p in sorted(path.rglob("*"))
                          if p.is_file() and p.suffix.lower() in (".safetensors", ".gguf", ".json", ".bin")}}
    identity = {"sha256": _sha256(path)}
    if source.components is not None and denoiser_only(path):  # its text encoders and VAE
        identity["components"] = source_identity(Source(source.components))
    return identity


def cell_key(cell: Cell, source_id: dict, lora_ids: dict[Path, str]) -> str:
    """sha256 (hex) of everything that decides the cell's pixels."""
    record = {
        "v": KEY_VERSION,
        "model": source_id,
        "loras": [[lora_ids[lu.path], round(float(lu.weight), 6), *([lu.blocks] if lu.blocks else [])]
                  for lu in cell.loras],  # block weights change the pixels; none keeps old keys
        "settings": asdict(cell.settings),
        "seed": cell.seed,
    }
    text = json.dumps(record, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def with_keys(cells: list[Cell], merge_identity=None) -> list[Cell]:
    """The cells with `key` filled in (each model and LoRA file hashed once, hashes cached)."""
    sources: dict[Source, dict] = {}
    loras: dict[Path, str] = {}
    out = []
    for cell in cells:
        if cell.source not in sources:
            sources[cell.source] = source_identity(cell.source, merge_identity)
        for lu in cell.loras:
            if lu.path not in loras:
                loras[lu.path] = _sha256(lu.path)
        out.append(replace(cell, key=cell_key(cell, sources[cell.source], loras)))
    return out


# --------------------------------------------------------------------------------------------------
# run order


def run_order(cells: list[Cell]) -> list[tuple[Source, list[list[Cell]]]]:
    """[(source, [group of cells differing only in seed, ...]), ...]: each source once, in the order
    the grid first uses it; merge values of one recipe ascending, so the preview walks the parameter."""
    by_source: dict[Source, dict[tuple, list[Cell]]] = {}
    for cell in cells:
        by_source.setdefault(cell.source, {}).setdefault(cell.group(), []).append(cell)
    first = {s: i for i, s in enumerate(by_source)}
    order = sorted(by_source, key=lambda s: (first[_family(s, first)], s.merge_value or 0.0, first[s]))
    return [(s, list(by_source[s].values())) for s in order]


def _family(source: Source, first: dict[Source, int]) -> Source:
    """The first-used source with the same merge recipe (or the source itself)."""
    if not source.is_merge:
        return source
    return min((s for s in first if s.is_merge and s.path == source.path), key=first.__getitem__)


def paired_unit(cell: Cell, axis_name: str) -> str:
    """The resampling unit for A/B statistics: the prompt, unless the prompt is what is compared."""
    if axis_name in ("prompt", "prompt_sr"):
        return f"seed {cell.seed}"
    return cell.settings.prompt
