"""Streamed, atomic safetensors writing and atomic small-file writes.

The full header is written first (offsets come from the plan), then each tensor's raw bytes in plan
order, so a merge can free every tensor right after writing it. Everything goes to
`<target>.<random>.tmp` in the target's folder; only after all planned tensors are written, the file
is fsynced, its header re-read and checked, it is renamed onto the target (os.replace, atomic on
one file system) and the folder is fsynced. Any exception or Ctrl-C deletes the temp file and leaves
the target untouched. A process killed with SIGKILL cannot clean up: a stale `*.tmp` may remain next
to the target, but the target itself is never half-written.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
from collections.abc import Mapping
from pathlib import Path

from workbench.errors import FormatError, OutputExistsError, WorkbenchError
from workbench.formats.safetensors_io import DTYPE_SIZES, read_header

TORCH_TO_ST = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}


def st_dtype(tensor) -> str:
    """The safetensors dtype string of a torch tensor ('F16', 'BF16', 'F8_E4M3', ...)."""
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in TORCH_TO_ST:
        raise WorkbenchError(f"cannot write dtype {name} to safetensors; supported: "
                             f"{', '.join(TORCH_TO_ST)}")
    return TORCH_TO_ST[name]


def _temp_path(target: Path) -> Path:
    return target.with_name(f"{target.name}.{secrets.token_hex(4)}.tmp")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform / file system
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target}: output already exists; choose another name or allow "
                                "overwriting (--overwrite)")
    if not target.parent.is_dir():
        raise WorkbenchError(f"{target}: output folder {target.parent} does not exist")


def _publish(tmp: Path, target: Path, overwrite: bool) -> None:
    if not overwrite and target.exists():
        raise OutputExistsError(f"{target}: output appeared while writing; not overwritten")
    os.replace(tmp, target)
    _fsync_dir(target.parent)


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor, atomically.

        plan = {"a": ("F16", (4, 4)), "b": ("F32", (3,))}
        with SafetensorsWriter(path, plan, {"format": "pt"}) as w:
            w.write("a", ta); w.write("b", tb)
    """

    def __init__(self, path: str | Path, plan: Mapping[str, tuple[str, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None, overwrite: bool = False):
        self.path = Path(path)
        self.overwrite = overwrite
        _check_target(self.path, overwrite)
        self.plan = {name: (dtype, tuple(int(d) for d in shape))
                     for name, (dtype, shape) in plan.items()}
        self.metadata = dict(metadata or {})
        for k, v in self.metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise WorkbenchError(f"{self.path}: metadata {k!r} must map a string to a string "
                                     f"(got {type(v).__name__})")
        self._header, self._offsets = self._build_header()
        self._order = list(self.plan)
        self._next = 0
        self._tmp: Path | None = None
        self._file = None

    def _build_header(self) -> tuple[bytes, dict[str, tuple[int, int]]]:
        entries: dict[str, object] = {}
        if self.metadata:
            entries["__metadata__"] = self.metadata
        offsets: dict[str, tuple[int, int]] = {}
        pos = 0
        for name, (dtype, shape) in self.plan.items():
            if dtype not in DTYPE_SIZES:
                raise WorkbenchError(f"{self.path}: tensor {name!r}: unknown dtype {dtype!r}; "
                                     f"expected one of {', '.join(DTYPE_SIZES)}")
            if any(d < 0 for d in shape):
                raise WorkbenchError(f"{self.path}: tensor {name!r}: negative shape {list(shape)}")
            n = DTYPE_SIZES[dtype]
            for d in shape:
                n *= d
            offsets[name] = (pos, pos + n)
            entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
            pos += n
        raw = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # safetensors pads the header with spaces to 8 bytes
        self.data_size = pos
        return raw, offsets

    def __enter__(self) -> "SafetensorsWriter":
        self._tmp = _temp_path(self.path)
        self._file = open(self._tmp, "xb")
        try:
            self._file.write(struct.pack("<Q", len(self._header)))
            self._file.write(self._header)
        except BaseException:
            self._abort()
            raise
        return self

    def write(self, name: str, tensor) -> None:
        """Append one tensor; it must be the next in plan order with the planned dtype/shape."""
        if self._file is None:
            raise RuntimeError(f"{self.path}: write() outside the writer's `with` block")
        if self._next >= len(self._order):
            raise WorkbenchError(f"{self.path}: tensor {name!r} is not in the plan (all "
                                 f"{len(self._order)} planned tensors are already written)")
        expected = self._order[self._next]
        if name != expected:
            why = "not in the plan" if name not in self.plan else "out of order"
            raise WorkbenchError(f"{self.path}: tensor {name!r} is {why}; expected {expected!r} "
                                 f"(tensor {self._next + 1} of {len(self._order)})")
        dtype, shape = self.plan[name]
        got_dtype, got_shape = st_dtype(tensor), tuple(tensor.shape)
        if (got_dtype, got_shape) != (dtype, shape):
            raise WorkbenchError(f"{self.path}: tensor {name!r} is {got_dtype} {list(got_shape)}, "
                                 f"the plan says {dtype} {list(shape)}")
        import torch

        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        if flat.numel():  # raw little-endian bytes, no copy: a uint8 view exposed as a buffer
            self._file.write(memoryview(flat.view(torch.uint8).numpy()))
        self._next += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abort()
            return
        try:
            if self._next != len(self._order):
                missing = self._order[self._next:]
                raise WorkbenchError(
                    f"{self.path}: only {self._next} of {len(self._order)} planned tensors were "
                    f"written (next missing: {missing[0]!r}); nothing was saved")
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._verify()
            _publish(self._tmp, self.path, self.overwrite)
            self._file = None
        except BaseException:
            self._abort()
            raise

    def _verify(self) -> None:
        header = read_header(self._tmp)
        expected = 8 + len(self._header) + self.data_size
        if header.file_size != expected:
            raise FormatError(f"{self.path}: written file has {header.file_size} bytes, expected "
                              f"{expected}")
        for name, (dtype, shape) in self.plan.items():
            info = header.tensors.get(name)
            if info is None or (info.dtype, info.shape) != (dtype, shape) or \
                    (info.begin, info.end) != self._offsets[name]:
                raise FormatError(f"{self.path}: verification failed for tensor {name!r}")

    def _abort(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        if self._tmp is not None:
            try:
                self._tmp.unlink()
            except FileNotFoundError:
                pass


def save_file_atomic(tensors: Mapping, path: str | Path, metadata: Mapping[str, str] | None = None,
                     overwrite: bool = False) -> Path:
    """Write a dict of tensors atomically (all in memory already; for streams use the writer)."""
    plan = {name: (st_dtype(t), tuple(t.shape)) for name, t in tensors.items()}
    with SafetensorsWriter(path, plan, metadata, overwrite=overwrite) as w:
        for name, t in tensors.items():
            w.write(name, t)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes, overwrite: bool = False) -> Path:
    """Write bytes through a temp file + fsync + rename (JSON, PNG, reports)."""
    target = Path(path)
    _check_target(target, overwrite)
    tmp = _temp_path(target)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, target, overwrite)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def atomic_write_text(path: str | Path, text: str, overwrite: bool = False,
                      encoding: str = "utf-8") -> Path:
    """atomic_write_bytes for text."""
    return atomic_write_bytes(path, text.encode(encoding), overwrite=overwrite)
