"""The streaming executor: compute keys on a few threads, write each tensor as soon as it is ready.

Memory stays at a few tensors whatever the model size:
- inputs are memory-mapped views (page cache the kernel can drop, not process memory);
- element-wise keys are computed CHUNK elements at a time (fp32 operands stay in cache);
- at most `max_in_flight` keys are in progress, and their estimated working sets together stay
  under `budget_bytes` (a single key larger than the budget runs alone);
- results are written in plan order and dropped right after writing (the future is popped from
  the window before its tensor is written, so nothing keeps a reference).
Math is fp32 (graph.evaluate); the one cast to the output dtype happens here, once per key.
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
from collections import deque
from contextlib import ExitStack, contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from workbench.formats.model_file import open_model
from workbench.formats.writer import SafetensorsWriter
from workbench.merge.graph import InputNode, Node, evaluate

DEFAULT_BUDGET = 512 * 1024**2
# Elements per slice for element-wise keys: measured fastest on a 2-core machine (128K: 2.7 ns per
# element for a fp16 weighted sum; 1M: 7 ns).
CHUNK = 128 * 1024


@dataclass(frozen=True)
class OutputKey:
    """One tensor of the output file: where its value comes from and how it is stored."""

    name: str
    source: Node            # evaluated for `source_key`
    source_key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    work_bytes: int         # estimated peak memory while computing it
    sliced: bool = False    # element-wise all the way down: computed CHUNK elements at a time

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def compute_key(item: OutputKey) -> torch.Tensor:
    """The key's value in the output dtype and shape."""
    numel = item.numel
    if item.sliced and numel > CHUNK:
        out = torch.empty(numel, dtype=item.dtype)
        for start in range(0, numel, CHUNK):
            part = slice(start, min(start + CHUNK, numel))
            out[part].copy_(evaluate(item.source, item.source_key, chunk=part))
        return out.view(item.shape)
    value = evaluate(item.source, item.source_key)
    if value.dtype != item.dtype:
        value = value.to(item.dtype)
    return value


def _reuse_freed_memory() -> bool:
    """Let glibc keep and reuse freed large blocks instead of returning them to the kernel.

    By default every tensor over 32 MiB is its own mmap, so each key's output pays a page fault
    per 4 KiB again (measured on the reference VM: 100 allocations of 40 MB took 3.7 s, 0.6 s with
    this). The in-flight budget bounds what is kept. Returns whether it applied: a no-op where
    glibc is absent (Windows, macOS, musl), whose allocators need no such tuning to be correct.
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt(-3, 1 << 30)       # M_MMAP_THRESHOLD: serve blocks up to 1 GiB from the heap
    libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD: do not trim the heap back
    return True


def _glibc():
    """glibc, loaded by its soname, if this process has it and it has `mallopt`; else None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def stream(keys: list[OutputKey], writer: SafetensorsWriter, threads: int | None = None,
           budget_bytes: int = DEFAULT_BUDGET, max_in_flight: int | None = None,
           on_written: Callable[[OutputKey], None] | None = None,
           cancel: threading.Event | None = None) -> None:
    """Compute every key on a thread pool and write them in order through `writer`."""
    threads = threads or min(4, os.cpu_count() or 1)
    max_in_flight = max_in_flight or 2 * threads
    # parallelism comes from the worker threads; torch's intra-op threads would oversubscribe the
    # cores and, on cache-sized slices, cost more in synchronisation than they compute
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _reuse_freed_memory()
    try:
        _stream(keys, writer, threads, budget_bytes, max_in_flight, on_written, cancel)
    finally:
        torch.set_num_threads(torch_threads)


def _stream(keys, writer, threads, budget_bytes, max_in_flight, on_written, cancel) -> None:
    window: deque[tuple[OutputKey, Future]] = deque()
    in_flight = 0

    def write_oldest() -> None:
        nonlocal in_flight
        item, fut = window.popleft()
        tensor = fut.result()  # re-raises a worker's exception here
        del fut
        writer.write(item.name, tensor)
        del tensor
        in_flight -= item.work_bytes
        if on_written:
            on_written(item)

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="merge") as pool:
        try:
            for item in keys:
                if cancel is not None and cancel.is_set():
                    raise KeyboardInterrupt("merge cancelled")
                while window and (len(window) >= max_in_flight
                                  or in_flight + item.work_bytes > budget_bytes):
                    write_oldest()
                window.append((item, pool.submit(compute_key, item)))
                in_flight += item.work_bytes
            while window:
                write_oldest()
        except BaseException:
            for _, fut in window:
                fut.cancel()
            window.clear()
            raise


def input_nodes(plan: Any) -> list[InputNode]:
    """Every input node a `merge.build.MergePlan` reads, once each (typed loosely: the plan module
    imports this one)."""
    nodes: dict[int, InputNode] = {}
    for k in plan.keys:
        if isinstance(k.source, InputNode):
            nodes[id(k.source)] = k.source
    for step in plan.steps:
        for n in step.inputs:
            if isinstance(n, InputNode):
                nodes[id(n)] = n
    return list(nodes.values())


@contextmanager
def open_inputs(plan: Any) -> Iterator[None]:
    """Open every input of the plan (memory maps) and bind it to its node for the block; closed
    and unbound on the way out, error or not. Values read inside are views of the maps: clone
    what must outlive the block."""
    nodes = input_nodes(plan)
    with ExitStack() as stack:
        try:
            for node in nodes:
                node.reader = stack.enter_context(open_model(node.path)).view  # GGUF/NF4/fp8: decoded
            yield
        finally:
            for node in nodes:
                node.reader = None
