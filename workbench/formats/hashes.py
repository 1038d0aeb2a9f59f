"""File hashes the ecosystem uses, with a cache so multi-GB files are hashed once.

- sha256_file: full sha256 (A1111 "sha256", civitai's lookup key). AutoV2 = its first 10 hex.
- a1111_legacy_hash: A1111's old `model_hash`: sha256 of 0x10000 bytes at offset 0x100000, 8 hex.
- addnet_hash: sha256 of the bytes after the safetensors header (kohya `sshs_model_hash`,
  A1111's LoRA hash; A1111 shows the first 12 hex).
The cache lives in $WORKBENCH_CACHE (default ~/.cache/workbench)/hashes.json, keyed by absolute
path and invalidated by size or mtime_ns; a corrupt cache is ignored and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from workbench.errors import FormatError
from workbench.formats.writer import atomic_write_text

CHUNK = 4 * 1024 * 1024
CACHE_VERSION = 1


def cache_root() -> Path:
    """The one cache folder of the workbench: `$WORKBENCH_CACHE`, else `~/.cache/workbench` (on
    Windows `C:\\Users\\<you>\\.cache\\workbench`). Hashes, configs, latents and text caches live here."""
    env = os.environ.get("WORKBENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "workbench"


def _cache_file() -> Path:
    return cache_root() / "hashes.json"


def _load_cache() -> dict:
    try:
        data = json.loads(_cache_file().read_text(encoding="utf-8"))
        if isinstance(data, dict) and data.get("version") == CACHE_VERSION and \
                isinstance(data.get("entries"), dict):
            return data
    except (OSError, ValueError):
        pass
    return {"version": CACHE_VERSION, "entries": {}}


def _save_cache(data: dict) -> None:
    try:
        cache_root().mkdir(parents=True, exist_ok=True)
        atomic_write_text(_cache_file(), json.dumps(data, indent=0, sort_keys=True),
                          overwrite=True)
    except OSError:
        pass  # a read-only cache folder only costs speed


def _stat_key(path: Path) -> tuple[str, int, int]:
    try:
        st = path.stat()
    except OSError as e:
        raise FormatError(f"{path}: cannot read file ({e.strerror or e})") from e
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def _cached(path: Path, kind: str, compute) -> str:
    key, size, mtime = _stat_key(path)
    data = _load_cache()
    entry = data["entries"].get(key)
    if isinstance(entry, dict) and entry.get("size") == size and entry.get("mtime_ns") == mtime \
            and isinstance(entry.get(kind), str):
        return entry[kind]
    value = compute(path)
    data = _load_cache()  # re-read: another process may have added entries meanwhile
    entry = data["entries"].get(key)
    if not (isinstance(entry, dict) and entry.get("size") == size and
            entry.get("mtime_ns") == mtime):
        entry = {"size": size, "mtime_ns": mtime}
    entry[kind] = value
    data["entries"][key] = entry
    _save_cache(data)
    return value


def cached(paths, kind: str = "sha256") -> dict[Path, str]:
    """The still-valid cached hashes of these files, {path: hash}; nothing is read but the cache
    (read once): listings show what is known at once and hash the rest in the background
    (workbench/formats/hash_fill.py)."""
    entries = _load_cache()["entries"]
    out = {}
    for path in map(Path, paths):
        try:
            key, size, mtime = _stat_key(path)
        except FormatError:
            continue
        entry = entries.get(key)
        if isinstance(entry, dict) and entry.get("size") == size and \
                entry.get("mtime_ns") == mtime and isinstance(entry.get(kind), str):
            out[path] = entry[kind]
    return out


def _sha256_range(path: Path, offset: int = 0, length: int | None = None,
                  on_bytes=None) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            left = length
            while left is None or left > 0:
                chunk = f.read(CHUNK if left is None else min(CHUNK, left))
                if not chunk:
                    break
                h.update(chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk))
                if left is not None:
                    left -= len(chunk)
    except OSError as e:
        raise FormatError(f"{path}: cannot read file ({e.strerror or e})") from e
    return h.hexdigest()


def sha256_file(path: str | Path, use_cache: bool = True, on_bytes=None) -> str:
    """Full sha256 (64 hex), streamed in 4 MiB chunks, cached by (path, size, mtime_ns).
    `on_bytes(n)` is called after each chunk read (progress bars)."""
    path = Path(path)
    if not use_cache:
        return _sha256_range(path, on_bytes=on_bytes)
    return _cached(path, "sha256", lambda p: _sha256_range(p, on_bytes=on_bytes))


def files_sha256(paths) -> str:
    """One sha256 over the files' sha256s, in the given order: the identity of a set of files (a
    folder of reference pictures, an open_clip model folder)."""
    return hashlib.sha256("".join(sha256_file(p) for p in paths).encode()).hexdigest()


def autov2(path: str | Path, use_cache: bool = True) -> str:
    """A1111/civitai short hash: the first 10 hex of the sha256."""
    return sha256_file(path, use_cache)[:10]


def a1111_legacy_hash(path: str | Path) -> str:
    """A1111's old model hash: sha256 of 64 KiB at offset 1 MiB, first 8 hex (cheap, no cache)."""
    return _sha256_range(Path(path), 0x100000, 0x10000)[:8]


def _addnet(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
    except OSError as e:
        raise FormatError(f"{path}: cannot read file ({e.strerror or e})") from e
    if len(raw) < 8:
        raise FormatError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", raw)
    return _sha256_range(path, 8 + n)


def addnet_hash(path: str | Path, use_cache: bool = True) -> str:
    """sha256 of the tensor bytes after the safetensors header (metadata edits do not change it)."""
    path = Path(path)
    if not use_cache:
        return _addnet(path)
    return _cached(path, "addnet", _addnet)
