"""Streamed, atomic safetensors writing and atomic small-file writes.

The full header is written first (offsets come from the plan), then each tensor's raw bytes in plan
order, so a merge can free every tensor right after writing it. Everything goes to
`<target>.<random>.tmp` in the target's folder (its blocks reserved up front); only after all
planned tensors are written, the file is fsynced, its header re-read and checked, it is renamed onto
the target (os.replace, atomic on one file system) and the folder is fsynced. Any exception or Ctrl-C deletes the temp file and leaves
the target untouched. A process killed with SIGKILL cannot clean up: a stale `*.tmp` may remain next
to the target, but the target itself is never half-written.

Portable by construction (docs/portability.md): bytes go out with plain sequential `os.write` from
one I/O thread (no `pwrite`), files are opened with `O_BINARY` where it exists (Windows would
otherwise translate newlines), `O_DIRECT` and `posix_fallocate` are used only where the OS has
them, free space is checked with `shutil.disk_usage` everywhere, and the rename retries while
another program holds the target open (workbench/system.py). A failed write (a full disk, a
vanished network drive) removes the temp file and says what the OS said, in a WorkbenchError.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import queue
import secrets
import struct
import threading
from collections.abc import Mapping
from pathlib import Path

from workbench import system
from workbench.errors import FormatError, OutputExistsError, WorkbenchError
from workbench.formats.safetensors_io import DTYPE_SIZES, TORCH_NAMES, read_header

TORCH_TO_ST = {torch_name: st for st, torch_name in TORCH_NAMES.items()}
O_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation; 0 (not needed) elsewhere
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}  # full disk, or quota used up


def st_dtype(tensor) -> str:
    """The safetensors dtype string of a torch tensor ('F16', 'BF16', 'F8_E4M3', ...)."""
    return st_dtype_of(tensor.dtype)


def st_dtype_of(dtype) -> str:
    """The safetensors dtype string of a torch dtype."""
    name = str(dtype).removeprefix("torch.")
    if name not in TORCH_TO_ST:
        raise WorkbenchError(f"cannot write dtype {name} to safetensors; supported: "
                             f"{', '.join(TORCH_TO_ST)}")
    return TORCH_TO_ST[name]


def _temp_path(target: Path) -> Path:
    return target.with_name(f"{target.name}.{secrets.token_hex(4)}.tmp")


def _size(n: int) -> str:
    """`8.6 MB` (decimal units, as the rest of the workbench prints sizes) plus the exact bytes."""
    value, unit = float(n), "bytes"
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            break
        value /= 1000
    return f"{n:,} bytes" if unit == "bytes" else f"{value:.1f} {unit} ({n:,} bytes)"


def _not_enough_space(target: Path, needed: int, free: int | None) -> WorkbenchError:
    have = f"{_size(free)} free" if free is not None else "its free space is unknown"
    return WorkbenchError(f"{target}: not enough disk space: the file needs {_size(needed)} in "
                          f"{target.parent}, which has {have}; nothing was saved")


def _write_error(target: Path, needed: int, e: OSError) -> WorkbenchError:
    """The OS error of a failed write, said plainly (what failed, where, how much was needed)."""
    said = e.strerror or str(e)
    code = errno.errorcode.get(e.errno, e.errno) if e.errno is not None else None
    said += f" [{code}]" if code is not None else ""
    if e.errno in _DISK_FULL:
        free = system.free_bytes(target.parent)
        have = f"has {_size(free)} free now" if free is not None else "reports no free space"
        return WorkbenchError(f"{target}: the disk is full ({said}): the file needs "
                              f"{_size(needed)} in {target.parent}, which {have}; nothing was "
                              "saved")
    return WorkbenchError(f"{target}: writing in {target.parent} failed ({said}); nothing was "
                          "saved")


def _create(path: Path, flags: int = 0) -> int:
    """A new file (never an existing one) open for writing, in binary mode on every OS."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_BINARY | flags, 0o666)


def _write_all(fd: int, data) -> None:
    """Write every byte of `data` at the file's current position. The only place the writers
    hand bytes to the OS (so tests inject a full disk here); the view is released even when the
    write fails, so a stored error never pins a buffer."""
    with memoryview(data) as view:
        done, total = 0, view.nbytes
        while done < total:
            done += os.write(fd, view[done:])


def _reserve(fd: int, target: Path, size: int) -> None:
    """Fail now, before any work, when `size` bytes do not fit: free space from shutil (every
    OS), and the blocks reserved with posix_fallocate where the OS has it (so a disk filling up
    meanwhile cannot make the write fail halfway)."""
    free = system.free_bytes(target.parent)
    if free is not None and free < size:
        raise _not_enough_space(target, size, free)
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:
        return
    try:
        fallocate(fd, 0, max(size, 1))
    except OSError as e:
        if e.errno in _DISK_FULL:  # the caller removes the temp file, then reports it
            raise
        # EOPNOTSUPP/EINVAL: a file system without preallocation; the write itself will tell


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target}: output already exists; choose another name or allow "
                                "overwriting (--overwrite)")
    if not target.parent.is_dir():
        raise WorkbenchError(f"{target}: output folder {target.parent} does not exist")


def _publish(tmp: Path, target: Path, overwrite: bool) -> None:
    if not overwrite and target.exists():
        raise OutputExistsError(f"{target}: output appeared while writing; not overwritten")
    system.replace_file(tmp, target)
    system.fsync_dir(target.parent)


class _SequentialSink:
    """Writes one file front to back through a few page-aligned staging buffers.

    Why: a durable multi-GB write costs seconds of disk time. Through the page cache it also costs
    the CPU a page allocation and copy per 4 KiB and an fsync at the end; with O_DIRECT (where the
    file system allows it) the staging buffers go to the disk by DMA from a side thread while the
    caller computes the next tensors, nothing is left to flush at the end, and the user's page
    cache (their models!) is not evicted by our output. Buffers are whole multiples of 4 KiB at
    4 KiB-aligned offsets, as O_DIRECT requires; the tail is padded and the file truncated to size.
    """

    BUFFER = 32 * 1024 * 1024
    COUNT = 3

    def __init__(self, fd: int, direct: bool):
        import torch  # heavy: only a writer that streams tensors needs it

        self.fd, self.direct = fd, direct
        self._maps = [mmap.mmap(-1, self.BUFFER) for _ in range(self.COUNT)]
        self._free: queue.Queue = queue.Queue()
        for i in range(self.COUNT):
            self._free.put(i)
        self._io: queue.Queue = queue.Queue()
        self._views = [torch.frombuffer(m, dtype=torch.uint8) for m in self._maps]
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._write_loop, name="writer-io", daemon=True)
        self._thread.start()
        self._cur = self._free.get()
        self._fill = 0

    def _write_loop(self) -> None:
        # one thread takes the buffers in submission order, so plain sequential writes put each
        # at its place in the file (no pwrite, which Windows lacks)
        while True:
            job = self._io.get()
            if job is None:
                return
            index, length = job
            if self._error is None:
                try:
                    with memoryview(self._maps[index]) as whole, whole[:length] as part:
                        _write_all(self.fd, part)
                except BaseException as e:  # reported to the producer on its next call
                    self._error = e
            self._free.put(index)

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _submit(self, length: int) -> None:
        self._io.put((self._cur, length))
        self._cur = self._free.get()
        self._fill = 0
        self._check()

    def append(self, data) -> None:
        """Append the bytes of `data` (a uint8 torch tensor, flat)."""
        self._check()
        pos, total = 0, data.numel()
        while pos < total:
            n = min(self.BUFFER - self._fill, total - pos)
            self._views[self._cur][self._fill:self._fill + n].copy_(data[pos:pos + n])
            self._fill += n
            pos += n
            if self._fill == self.BUFFER:
                self._submit(self.BUFFER)

    def finish(self, size: int) -> None:
        """Write the tail, wait for the side thread, truncate to `size` and make it durable."""
        if self._fill:
            padded = -(-self._fill // 4096) * 4096
            self._views[self._cur][self._fill:padded].zero_()
            self._submit(padded)
        self.close()
        self._check()
        os.ftruncate(self.fd, size)
        os.fsync(self.fd)

    def close(self) -> None:
        if self._thread.is_alive():
            self._io.put(None)
            self._thread.join()
        self._views = []
        for m in self._maps:
            try:
                m.close()
            except BufferError:  # a view still alive somewhere: the map goes when it is collected
                pass
        self._maps = []


def _open_sequential(path: Path) -> tuple[int, bool]:
    """(fd, direct): a new binary file opened with O_DIRECT where the OS and the file system
    support it, else a buffered one."""
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            return _create(path, direct), True
        except OSError:  # tmpfs and some network file systems refuse O_DIRECT
            if path.exists():
                path.unlink()
    return _create(path), False


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor, atomically.

        plan = {"a": ("F16", (4, 4)), "b": ("F32", (3,))}
        with SafetensorsWriter(path, plan, {"format": "pt"}) as w:
            w.write("a", ta); w.write("b", tb)

    The file is written front to back (header, then tensors in plan order), so each tensor can be
    freed right after `write` returns; see `_SequentialSink` for how the bytes reach the disk.
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
        self._fd: int | None = None
        self._sink: _SequentialSink | None = None

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

    @property
    def direct_io(self) -> bool:
        """Whether the bytes bypass the page cache (O_DIRECT)."""
        return bool(self._sink and self._sink.direct)

    def __enter__(self) -> "SafetensorsWriter":
        import torch

        self._tmp = _temp_path(self.path)
        try:
            self._fd, direct = _open_sequential(self._tmp)
            _reserve(self._fd, self.path, self.size)
            self._sink = _SequentialSink(self._fd, direct)
            head = struct.pack("<Q", len(self._header)) + self._header
            self._sink.append(torch.frombuffer(bytearray(head), dtype=torch.uint8))
        except OSError as e:
            raise self._failed(e) from e
        except BaseException:
            self._abort()
            raise
        return self

    @property
    def size(self) -> int:
        """Bytes of the finished file."""
        return 8 + len(self._header) + self.data_size

    def _failed(self, e: OSError) -> WorkbenchError:
        """Clean up after an OS error and say it plainly (the temp file is gone first, so the
        free space reported is what the user really has)."""
        self._abort()
        return _write_error(self.path, self.size, e)

    def write(self, name: str, tensor) -> None:
        """Append one tensor; it must be the next in plan order with the planned dtype/shape."""
        if self._sink is None:
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
        if flat.numel():  # raw little-endian bytes: a uint8 view, no conversion
            try:
                self._sink.append(flat.view(torch.uint8))
            except OSError as e:  # from the I/O thread: the disk filled up, a drive went away
                raise self._failed(e) from e
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
            self._sink.finish(self.size)
            self._sink = None
            os.close(self._fd)
            self._fd = None
            self._verify()
            _publish(self._tmp, self.path, self.overwrite)
        except OSError as e:
            raise self._failed(e) from e
        except BaseException:
            self._abort()
            raise

    def _verify(self) -> None:
        header = read_header(self._tmp)
        expected = self.size
        if header.file_size != expected:
            raise FormatError(f"{self.path}: written file has {header.file_size} bytes, expected "
                              f"{expected}")
        for name, (dtype, shape) in self.plan.items():
            info = header.tensors.get(name)
            if info is None or (info.dtype, info.shape) != (dtype, shape) or \
                    (info.begin, info.end) != self._offsets[name]:
                raise FormatError(f"{self.path}: verification failed for tensor {name!r}")

    def _abort(self) -> None:
        """Stop the I/O thread, close the file, delete the temp file (in that order: Windows
        cannot delete a file that is still open); the temp file goes even if a step fails."""
        try:
            if self._sink is not None:
                sink, self._sink = self._sink, None
                sink.close()
        finally:
            if self._fd is not None:
                try:
                    os.close(self._fd)
                except OSError:
                    pass
                self._fd = None
            if self._tmp is not None:
                self._tmp.unlink(missing_ok=True)


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
        try:
            fd = _create(tmp)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            _publish(tmp, target, overwrite)
        except OSError as e:
            tmp.unlink(missing_ok=True)  # first, so the free space reported is the real one
            raise _write_error(target, len(data), e) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def atomic_write_text(path: str | Path, text: str, overwrite: bool = False,
                      encoding: str = "utf-8") -> Path:
    """atomic_write_bytes for text."""
    return atomic_write_bytes(path, text.encode(encoding), overwrite=overwrite)
