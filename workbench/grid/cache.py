"""The cell store: one PNG and one JSON record per cell, named by the cell's key.

A cell is finished when its record exists: the PNG is written first (atomically), then the record
(atomically), so an interrupted grid leaves only whole cells and the next run resumes after them.
Re-running or extending a grid looks each cell up by key and generates only the missing ones.
Scores live in the record under the scorer signature's hash; a changed scorer (other backbone,
weights or reference set) re-scores the saved PNG without generating it again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from workbench.formats.writer import atomic_write_text
from workbench.pipeline.image_meta import save_png

RECORD_VERSION = 1


def signature_hash(signature: dict) -> str:
    return hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:16]


class CellCache:
    """`<folder>/<key>.png` + `<key>.json` for every finished cell."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def png_path(self, key: str) -> Path:
        return self.folder / f"{key}.png"

    def record_path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def load(self, key: str) -> dict[str, Any] | None:
        """The cell's record when the cell is finished (record and PNG present, key matching)."""
        path = self.record_path(key)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if record.get("key") != key or record.get("version") != RECORD_VERSION \
                or not self.png_path(key).is_file():
            return None
        return record

    def has(self, key: str) -> bool:
        return self.load(key) is not None

    def save(self, key: str, generated, record: dict[str, Any]) -> dict[str, Any]:
        """Write the cell's PNG (A1111 parameters + provenance) and then its record."""
        self.folder.mkdir(parents=True, exist_ok=True)
        save_png(generated.image, self.png_path(key), generated.parameters,
                 {**generated.provenance, "cell_key": key}, overwrite=True)
        record = {"version": RECORD_VERSION, "key": key, **record}
        self._write(key, record)
        return record

    def scores(self, record: dict[str, Any], signature: dict) -> dict[str, float] | None:
        """The record's scores for this scorer signature, or None when they must be computed."""
        entry = (record.get("scores") or {}).get(signature_hash(signature))
        return dict(entry["values"]) if entry else None

    def set_scores(self, record: dict[str, Any], signature: dict, values: dict[str, float]) -> None:
        record.setdefault("scores", {})[signature_hash(signature)] = {"scorers": signature,
                                                                     "values": values}
        self._write(record["key"], record)

    def _write(self, key: str, record: dict[str, Any]) -> None:
        atomic_write_text(self.record_path(key), json.dumps(record, indent=1, sort_keys=True,
                                                            default=str), overwrite=True)
