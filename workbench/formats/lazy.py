"""Lazy, memory-mapped tensor reading, and the only way we open pickle checkpoints.

`open_lazy` validates the header with `read_header` first, so a truncated download fails with a
FormatError naming the file before any tensor is touched; tensors are then served one at a time,
memory-mapped through `safetensors.safe_open`, so a merge holds only the tensors it is working on.
"""

from __future__ import annotations

import mmap
import pickle
import warnings
from pathlib import Path

from workbench.errors import FormatError
from workbench.formats.safetensors_io import SafetensorsHeader, TensorInfo, read_header, torch_dtype

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class LazySafetensors:
    """An open safetensors file: header up front, tensors on demand. Use as a context manager."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.header: SafetensorsHeader = read_header(self.path)
        self._handle = None
        self._map: mmap.mmap | None = None
        self._populated: set[str] = set()

    def __enter__(self) -> "LazySafetensors":
        from safetensors import safe_open

        try:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise FormatError(f"{self.path}: cannot open as safetensors ({e})") from e
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the memory maps (tensors from `get` stay valid; views from `view` must be
        dropped before closing)."""
        self._handle = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view is still alive; the map goes when it is collected
                pass
            self._map = None

    def keys(self) -> list[str]:
        return self.header.keys()

    def __contains__(self, key: object) -> bool:
        return key in self.header.tensors

    def __len__(self) -> int:
        return len(self.header.tensors)

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    def info(self, key: str) -> TensorInfo:
        """dtype, shape and byte range of one tensor, from the header (no data read)."""
        try:
            return self.header.tensors[key]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {key!r}") from None

    def get(self, key: str):
        """One tensor as a torch.Tensor backed by the memory map (copy it before writing to it)."""
        self.info(key)
        if self._handle is None:
            raise RuntimeError(f"{self.path}: LazySafetensors.get() outside its `with` block")
        try:
            return self._handle.get_tensor(key)
        except Exception as e:
            raise FormatError(f"{self.path}: cannot read tensor {key!r} ({e})") from e


    def view(self, key: str):
        """One tensor as a zero-copy, read-only view into the file's memory map.

        Unlike `get`, nothing is copied: the bytes stay page cache (file-backed memory the kernel
        can drop) instead of becoming process memory. This is what lets a merge stream a 7 GB
        model with a few hundred MB of RAM. Never write to the view.
        """
        import torch

        info = self.info(key)
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        dtype = torch_dtype(info.dtype)
        if info.numel == 0:
            return torch.empty(info.shape, dtype=dtype)
        if key not in self._populated:  # the executor asks once per slice of a large tensor
            self._populated.add(key)
            self._populate(self.header.data_offset + info.begin, info.nbytes)
        with warnings.catch_warnings():  # the map is read-only by design
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self._map, dtype=dtype, count=info.numel,
                                    offset=self.header.data_offset + info.begin)
        # (views are not cached: keeping ~1000 of them alive measurably raised anonymous memory)
        return flat.view(info.shape)


    def _populate(self, offset: int, length: int) -> None:
        """Map a large tensor's pages in one call (Linux MADV_POPULATE_READ) rather than by one
        page fault per few KiB as the computation touches them; for a file not yet in the page
        cache this is also the read. Small tensors, and systems whose maps have no `madvise`
        (Windows) or whose kernel refuses the advice (macOS, Linux < 5.14), use plain faults:
        the same bytes, read on first touch."""
        if length < (1 << 20) or MADV_POPULATE_READ is None:
            return
        advise = getattr(self._map, "madvise", None)
        if advise is None:
            return
        start = offset - offset % mmap.PAGESIZE
        try:
            advise(MADV_POPULATE_READ, start, offset + length - start)
        except (OSError, ValueError):
            pass


# Linux >= 5.14; Python 3.11 does not name it, hence the number (another kernel answers EINVAL).
# None turns the advice off (tests/test_portability.py forces that fallback).
MADV_POPULATE_READ: int | None = getattr(mmap, "MADV_POPULATE_READ", 22)


def open_lazy(path: str | Path) -> LazySafetensors:
    """Validate the header of `path` (FormatError if corrupt/truncated), then open it lazily.

    Usage: `with open_lazy(p) as f: t = f.get(name)`.
    """
    return LazySafetensors(path)


def load_pickle_safe(path: str | Path) -> dict:
    """Load a .ckpt/.pt/.pth state dict with `torch.load(weights_only=True)` only.

    Pickles can run arbitrary code; weights_only refuses every object that is not a tensor or a
    plain container. Files that need more (e.g. Lightning callbacks) are refused with a clear
    FormatError instead of being unpickled. A top-level {"state_dict": ...} wrapper is unwrapped.
    """
    import torch

    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise FormatError(f"{path}: file not found") from e
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FormatError(
            f"{path}: refused to load this pickle checkpoint safely ({first[:300]}). It needs "
            "arbitrary Python objects or is corrupt; only plain tensors are loaded "
            "(torch.load weights_only=True); `workbench convert FILE` names the objects it "
            "asks for."
        ) from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: expected a state dict (name -> tensor), got "
                          f"{type(obj).__name__}")
    return obj
