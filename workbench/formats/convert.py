"""`workbench convert`: a safetensors copy of a pickle checkpoint (.ckpt/.pt/.pth/.bin).

Pickle files can run any code when loaded, so everything else in this project refuses them; this
is the one door in. The file is read with PyTorch's restricted unpickler (`torch.load(...,
weights_only=True)`), which builds tensors and plain containers only and refuses any other global
the pickle asks for; the refusal is reported with the globals it wanted, and nothing is written.
A1111/Lightning checkpoints keep the weights under `state_dict`; that level is unwrapped, nested
containers are flattened with dots, and non-tensor values (epoch, global_step) are left out and
listed. The copy is written through the atomic writer (workbench/formats/writer.py) with metadata
saying what it was converted from (the source's file name and sha256, never its folder).
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from workbench import __version__
from workbench.errors import FormatError, OutputExistsError, WorkbenchError
from workbench.formats.hashes import sha256_file
from workbench.formats.lazy import PICKLE_SUFFIXES
from workbench.formats.writer import save_file_atomic

_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


@dataclass
class Converted:
    """What `convert` wrote."""

    source: Path
    output: Path
    tensors: int
    skipped: list[str] = field(default_factory=list)  # non-tensor entries left out
    sha256: str = ""                                    # of the source file

    def __str__(self) -> str:
        text = f"wrote {self.output} ({self.tensors} tensors from {self.source.name})"
        if self.skipped:
            shown = ", ".join(self.skipped[:8]) + (" ..." if len(self.skipped) > 8 else "")
            text += f"; left out {len(self.skipped)} non-tensor entries: {shown}"
        return text


def default_output(src: Path) -> Path:
    return src.with_suffix(".safetensors")


def _unsafe_globals(path: Path, error: Exception) -> list[str]:
    """The globals the pickle wanted: all of them from the archive when PyTorch can list them
    without loading (zip checkpoints), else the one named in the refusal message."""
    import torch  # heavy: imported only when a conversion runs

    listing = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if listing is not None and zipfile.is_zipfile(path):
        try:
            names = listing(str(path))
            if names:
                return sorted(set(names))
        except Exception:  # a damaged archive: fall back to the message
            pass
    return sorted(set(_GLOBAL_RE.findall(str(error))))


def load_state_dict(path: str | Path) -> tuple[dict, list[str]]:
    """(name -> tensor, skipped entry names) from a pickle checkpoint, weights_only; a FormatError
    names the refused globals."""
    import torch  # heavy: imported only when a conversion runs

    path = Path(path)
    try:
        # zip checkpoints (torch.save since 1.6) are memory-mapped: no second copy in RAM
        obj = torch.load(path, map_location="cpu", weights_only=True,
                         mmap=zipfile.is_zipfile(path))
    except FileNotFoundError:
        raise FormatError(f"{path}: file not found") from None
    except pickle.UnpicklingError as e:
        wanted = _unsafe_globals(path, e)
        if not wanted:  # refused for another reason: a damaged or non-pickle file
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip() and not
                     ln.startswith(("Weights only load failed", "Check the documentation"))]
            raise FormatError(f"{path}: not a readable PyTorch checkpoint "
                              f"({(lines[-1] if lines else type(e).__name__)[:300]})") from None
        raise FormatError(
            f"{path}: refused: loading this pickle needs {', '.join(wanted)}, Python objects "
            "beyond tensors (a file like this can run code when loaded), so it is not converted "
            "and nothing was written. Look for a .safetensors release of this model.") from None
    except Exception as e:  # damaged bytes: the unpickler fails with whatever it tripped on
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise FormatError(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise FormatError(f"{path}: expected a state dict (name -> tensor), got "
                          f"{type(obj).__name__}")
    tensors: dict = {}
    skipped: list[str] = []

    def walk(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor):
            tensors[prefix] = value
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            skipped.append(prefix)

    walk("", obj)
    return tensors, skipped


def convert(src: str | Path, out: str | Path | None = None, overwrite: bool = False) -> Converted:
    """Write a safetensors copy of a pickle checkpoint; refuses to replace a file unless asked."""
    src = Path(src)
    if src.suffix.lower() not in PICKLE_SUFFIXES:
        raise WorkbenchError(f"{src}: expected a pickle checkpoint ({', '.join(PICKLE_SUFFIXES)}); "
                             ".safetensors files need no conversion")
    if not src.is_file():
        raise FormatError(f"{src}: file not found")
    target = Path(out) if out is not None else default_output(src)
    if target.suffix.lower() != ".safetensors":
        raise WorkbenchError(f"--out {target}: expected a .safetensors file name")
    if target.resolve() == src.resolve():
        raise WorkbenchError(f"--out {target}: is the source file")
    if target.exists() and not overwrite:  # before reading a multi-GB pickle
        raise OutputExistsError(f"{target}: already exists; choose another --out or pass "
                                "--overwrite")
    if not target.parent.is_dir():
        raise WorkbenchError(f"{target}: output folder {target.parent} does not exist")
    tensors, skipped = load_state_dict(src)
    if not tensors:
        raise FormatError(f"{src}: no tensors found (entries: {', '.join(skipped[:10]) or 'none'})")
    digest = sha256_file(src)
    metadata = {"format": "pt", "workbench_converted_from": src.name,
                "workbench_source_sha256": digest,
                "workbench_converted_by": f"workbench {__version__} convert (weights_only)"}
    save_file_atomic(tensors, target, metadata, overwrite=overwrite)
    return Converted(src, target, len(tensors), skipped, digest)
