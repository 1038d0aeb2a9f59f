"""Inventory of a models folder (A1111/Forge `models/...`, ComfyUI `models/...`, or any tree), or
of an install's model folders by kind (`scan_install`, folders from model_folders.py).

Every .safetensors file is identified from its header only (fast, no tensor data), optionally
hashed (AutoV2, cached), and summarised with its embedded metadata. Pickle files (.ckpt/.pt/.pth/
.bin) are listed but never opened (`workbench convert` makes a safetensors copy); GGUF files are
listed by name and size. A corrupt file is listed with its error; scanning goes on. Listings that
must not wait for hashing scan with `with_hash=False`, then fill hashes in with `hash_targets` /
`apply_hashes` and a HashFiller (workbench/formats/hash_fill.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.formats import scaled_fp8
from workbench.formats.detect import detect
from workbench.formats.hashes import autov2
from workbench.formats.lazy import PICKLE_SUFFIXES
from workbench.formats.model_file import quantization_of, read_model_header
from workbench.formats.model_folders import KINDS, ModelFolders
from workbench.units import human_size

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
GGUF_SUFFIXES = (".gguf",)
PICKLE_NOTE = "pickle: convert with `workbench convert`"


@dataclass
class ModelEntry:
    """One file found by `scan`."""

    path: str                  # relative to the scanned root (or absolute), forward slashes
    size: int
    arch: str | None = None
    variant: str | None = None
    kind: str | None = None
    layout: str | None = None
    dtype: str | None = None
    rank: int | None = None
    short_hash: str | None = None
    metadata: dict[str, object] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    error: str | None = None
    unsafe: bool = False       # a pickle file: listed, not read
    folder: str | None = None  # the kind of install folder it lies in (scan_install)


def summarize_metadata(meta: Mapping[str, str], top: int = 5) -> dict[str, object]:
    """The metadata worth showing: LoRA name/base, modelspec title, top tags, merge recipe."""
    out: dict[str, object] = {}
    for key, name in (("ss_output_name", "output_name"), ("ss_base_model_version", "base_model"),
                      ("modelspec.title", "title"), ("modelspec.architecture", "architecture"),
                      ("modelspec.trigger_phrase", "trigger_phrase")):
        if meta.get(key):
            out[name] = meta[key]
    tags = _top_tags(meta.get("ss_tag_frequency"), top)
    if tags:
        out["top_tags"] = tags
    if "sd_merge_recipe" in meta:
        out["merge_recipe"] = True
    return out


def _top_tags(raw: str | None, top: int) -> list[str]:
    """ss_tag_frequency is JSON {dataset folder: {tag: count}}; sum over folders."""
    if not raw:
        return []
    try:
        data = json.loads(raw)
    except ValueError:
        return []
    counts: dict[str, int] = {}
    if isinstance(data, dict):
        for folder in data.values():
            if isinstance(folder, dict):
                for tag, n in folder.items():
                    if isinstance(n, (int, float)):
                        counts[tag.strip()] = counts.get(tag.strip(), 0) + int(n)
    return [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]


def _walk(root: Path):
    """Files under root, following symlinked folders once, skipping hidden folders and *.tmp."""
    seen: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and not name.endswith(".tmp"):
                yield Path(folder) / name


def _shown(path: Path, root: Path) -> str:
    """Relative to root when inside it (folders of an extra_model_paths.yaml may lie elsewhere)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def scan_file(path: Path, root: Path, with_hash: bool = True) -> ModelEntry | None:
    """One entry, or None for files that are not models."""
    suffix = path.suffix.lower()
    if suffix not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES + GGUF_SUFFIXES:
        return None
    try:
        size = path.stat().st_size
    except OSError as e:
        return ModelEntry(_shown(path, root), 0, error=f"cannot stat: {e}")
    entry = ModelEntry(_shown(path, root), size)
    if suffix in PICKLE_SUFFIXES:
        entry.unsafe = True
        entry.notes = (f"{PICKLE_NOTE} {path.name} (pickles can run code when loaded; the "
                       "conversion reads tensors only)",)
        return entry
    try:
        header = read_model_header(path)  # GGUF and bitsandbytes 4-bit files: logical shapes
        entry.dtype = header.dtype_summary()
        entry.metadata = summarize_metadata(header.metadata)
        info = detect(header)
        entry.arch, entry.variant, entry.kind = info.arch, info.variant, info.kind
        entry.layout, entry.rank, entry.notes = info.layout, info.rank, info.notes
        quant = quantization_of(header)
        if quant is not None:  # what a dtype column alone would hide: the quant type
            unsupported = scaled_fp8.layout_of(header).unsupported() if quant.kind == "scaled_fp8" else {}
            if unsupported:
                entry.dtype = next(iter(unsupported.values()))
                entry.notes = (*entry.notes, f"{entry.dtype} weights: cannot be loaded; use the 16-bit "
                               "or fp8 release (weights: nf4 quantizes it when loading)")
            elif quant.kind == "scaled_fp8":
                entry.dtype = "scaled fp8" if entry.dtype.startswith("F8") else f"{entry.dtype} + scaled fp8"
                entry.notes = (*entry.notes, "ComfyUI scaled fp8: read with the scales applied (generation, "
                               "merges, LoRA extraction)")
            else:
                entry.dtype = quant.label
                entry.notes = (*entry.notes, f"{quant.label}: generation dequantizes it; merges only with "
                               "output.allow_dequantized")
        if with_hash:
            entry.short_hash = autov2(path)
    except WorkbenchError as e:
        entry.error = str(e)
    return entry


def scan(root: str | Path, with_hash: bool = True) -> list[ModelEntry]:
    """All model files under `root`, sorted by relative path; errors are per entry, not raised."""
    root = Path(root)
    if not root.is_dir():
        raise WorkbenchError(f"{root}: not a folder (expected a models folder to scan)")
    entries = []
    for path in _walk(root):
        entry = scan_file(path, root, with_hash)
        if entry is not None:
            entries.append(entry)
    return entries


def scan_install(folders: ModelFolders, with_hash: bool = True) -> list[ModelEntry]:
    """Every model file in an install's model folders (model_folders.find_install), each with the
    kind of folder it lies in; paths relative to the install root where inside it. A file reached
    through two listed folders (nested, or named twice) is listed once."""
    entries: list[ModelEntry] = []
    seen: set[str] = set()
    for folder in folders.paths():
        for path in _walk(folder):
            real = os.path.normcase(os.path.realpath(path))
            if real in seen:
                continue
            seen.add(real)
            entry = scan_file(path, folders.root, with_hash)
            if entry is not None:
                entry.folder = folders.kind_of(path)
                entries.append(entry)
    order = {k: i for i, k in enumerate(KINDS)}
    entries.sort(key=lambda e: (order.get(e.folder or "", len(order)), e.path.lower()))
    return entries


def hash_targets(entries: list[ModelEntry], root: Path) -> list[Path]:
    """The files of a listing that get a hash (readable safetensors files without one yet)."""
    return [Path(root) / e.path for e in entries
            if e.short_hash is None and e.error is None and not e.unsafe and e.dtype != "GGUF"]


def apply_hashes(entries: list[ModelEntry], root: Path, hashes: Mapping[Path, str],
                 errors: Mapping[Path, str] | None = None) -> int:
    """Put known sha256s (and hashing errors) into a listing; returns how many hashes are still
    missing."""
    missing = 0
    for e in entries:
        path = Path(root) / e.path
        if e.short_hash is None and path in hashes:
            e.short_hash = hashes[path][:10]
        elif errors and path in errors and e.error is None:
            e.error = errors[path]
        if e.short_hash is None and e.error is None and not e.unsafe and e.dtype != "GGUF":
            missing += 1
    return missing


def format_table(entries: list[ModelEntry]) -> str:
    """A plain-text table for `workbench models scan`; errors are shown in the last column."""
    folders = any(e.folder for e in entries)
    headers = ["path", "kind", "arch", "variant", "dtype", "size", "hash", "info"]
    if folders:
        headers.insert(0, "folder")
    rows = []
    for e in entries:
        if e.error:
            info = "ERROR: " + e.error.replace("\n", " ")
        elif e.unsafe:
            info = PICKLE_NOTE
        elif e.dtype == "GGUF":
            info = e.notes[0] if e.notes else ""
        else:
            bits = []
            if e.rank:
                bits.append(f"rank {e.rank}")
            for k in ("output_name", "title", "base_model"):
                if k in e.metadata:
                    bits.append(f"{k}={e.metadata[k]}")
            if e.metadata.get("top_tags"):
                bits.append("tags: " + ", ".join(e.metadata["top_tags"][:3]))
            if e.metadata.get("merge_recipe"):
                bits.append("merge recipe")
            info = "; ".join(bits)
        rows.append([e.path, e.kind or "-", e.arch or "-", e.variant or "-", e.dtype or "-",
                     human_size(e.size), e.short_hash or "-", info])
        if folders:
            rows[-1].insert(0, e.folder or "-")
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    widths[-1] = len(headers[-1])  # the last column is not padded
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    lines.append(f"{len(entries)} files, {sum(1 for e in entries if e.error)} with problems, "
                 f"{sum(1 for e in entries if e.unsafe)} pickles not read (`workbench convert` "
                 "makes a safetensors copy)")
    return "\n".join(lines)
