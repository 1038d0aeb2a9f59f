"""The streaming executor: compute keys on a few threads, write each tensor as soon as it is ready.

Memory stays at a few tensors whatever the model size:
- inputs are memory-mapped (their pages are page cache the kernel can drop, not process memory);
- at most `max_in_flight` keys are being computed, and their estimated fp32 working sets together
  stay under `budget_bytes` (a single key larger than the budget runs alone);
- results are written in plan order and dropped right after writing (nothing keeps a reference:
  the future is popped from the window before its tensor is written).
Math is fp32 (graph.evaluate); the one cast to the output dtype happens here, once per key.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from workbench.formats.writer import SafetensorsWriter
from workbench.merge.graph import Node, evaluate

DEFAULT_BUDGET = 512 * 1024**2
# Elements per slice for element-wise keys: 4 fp32 operands of 1 MiB each stay in L2/L3 cache.
CHUNK = 256 * 1024


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


def _compute(item: OutputKey) -> torch.Tensor:
    numel = 1
    for d in item.shape:
        numel *= d
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
        tensor = fut.result()
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
                window.append((item, pool.submit(_compute, item)))
                in_flight += item.work_bytes
            while window:
                write_oldest()
        except BaseException:
            for _, fut in window:
                fut.cancel()
            window.clear()
            raise
