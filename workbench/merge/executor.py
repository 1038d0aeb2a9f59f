"""The streaming executor: compute keys on a few threads, straight into the output file.

Memory stays at a few tensors whatever the model size:
- inputs are memory-mapped views (page cache the kernel can drop, not process memory);
- each output tensor is computed directly into its place in the memory-mapped output file
  (`SafetensorsWriter.slot`), so no merged tensor is ever held in process memory;
- element-wise keys are computed CHUNK elements at a time (fp32 operands stay in cache);
- at most `max_in_flight` keys are in progress, and their estimated working sets together stay
  under `budget_bytes` (a single key larger than the budget runs alone).
Math is fp32 (graph.evaluate); the one cast to the output dtype is the copy into the slot.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable

import torch

from workbench.formats.writer import SafetensorsWriter
from workbench.merge.graph import Node, evaluate

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


def _compute(item: OutputKey, dest: torch.Tensor) -> None:
    """Fill `dest` (the output slot, already of the output dtype and shape) with the key's value."""
    numel = dest.numel()
    if item.sliced and numel > CHUNK:
        flat = dest.view(-1)
        for start in range(0, numel, CHUNK):
            part = slice(start, min(start + CHUNK, numel))
            flat[part].copy_(evaluate(item.source, item.source_key, chunk=part))
    elif numel:
        dest.copy_(evaluate(item.source, item.source_key))


def _task(item: OutputKey, writer: SafetensorsWriter) -> OutputKey:
    dest = writer.slot(item.name)
    _compute(item, dest)
    del dest
    writer.done(item.name)
    return item


def stream(keys: list[OutputKey], writer: SafetensorsWriter, threads: int | None = None,
           budget_bytes: int = DEFAULT_BUDGET, max_in_flight: int | None = None,
           on_written: Callable[[OutputKey], None] | None = None,
           cancel: threading.Event | None = None) -> None:
    """Compute every key on a thread pool into `writer`'s slots."""
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
    pending: set[Future] = set()
    in_flight = 0

    def collect(block_until_one: bool) -> None:
        nonlocal pending, in_flight
        finished, pending = wait(pending, return_when=FIRST_COMPLETED) if block_until_one \
            else (set(f for f in pending if f.done()), set(f for f in pending if not f.done()))
        for fut in finished:
            item = fut.result()  # re-raises a worker's exception here
            in_flight -= item.work_bytes
            if on_written:
                on_written(item)

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="merge") as pool:
        try:
            for item in keys:
                if cancel is not None and cancel.is_set():
                    raise KeyboardInterrupt("merge cancelled")
                while pending and (len(pending) >= max_in_flight
                                   or in_flight + item.work_bytes > budget_bytes):
                    collect(block_until_one=True)
                pending.add(pool.submit(_task, item, writer))
                in_flight += item.work_bytes
            while pending:
                collect(block_until_one=True)
        except BaseException:
            for fut in pending:
                fut.cancel()
            wait(pending)
            raise
