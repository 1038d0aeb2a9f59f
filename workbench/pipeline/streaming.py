"""Partial residency with weights streamed ahead of use, offload between stages, and `apply_plan`.

A partially resident component is cut into *units* (transformer blocks, ResNet blocks: modules of at
most ~1/24 of the component, never a ModuleList). Units chosen by `memory_plan.choose_resident` stay
on the GPU; the others keep their tensors in pinned host memory. When a streamed unit starts, its
tensors are swapped in; after it finishes they are swapped back and the GPU copies are released.

Prefetch (the "async swap" pattern, written from its description): the first forward records the
order units run in. From then on, when a unit starts, the copy of the next streamed unit is queued
on a side CUDA stream and an event is recorded after it; the compute stream waits on that event
only when it reaches that unit. A finished unit's GPU copies are kept alive in a stash, with an
event recorded on the compute stream, until that event has completed, so the caching allocator
cannot hand their memory to the next copy while kernels still read it (no `record_stream`).

Offload between stages: a component that runs once per prompt or image waits in pinned RAM and is
copied to the GPU when it (or any direct child: `vae.decode` does not call `vae.forward`) is
entered; entering a component moves every other offloaded one back to RAM (weights are never
changed in inference, so "back" only rebinds the kept host copy).

Everything works with onload device == cpu (copies instead of transfers, no streams), which is how
the tests check that outputs are identical and that hooks come off cleanly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from workbench.pipeline.memory_plan import STREAM_DEPTH, MemoryPlan
from workbench.pipeline.precision import apply_storage, castable_layers, storage_dtype
from workbench.pipeline.sizes import DENOISERS, ComponentSize, choose_resident, module_size, stream_units

# ----------------------------------------------------------------------------------- tensor groups

Slot = tuple  # (owner module, attribute name, is_parameter)


def _slots(modules: Sequence[nn.Module], direct_only: bool = False, skip: set[int] = frozenset()) -> list[Slot]:
    """Parameter and buffer slots of `modules` (and their submodules unless `direct_only`), each
    tensor once (tied weights share a slot), leaving out tensors whose id is in `skip`."""
    out, seen = [], set(skip)
    for m in modules:
        for sub in ([m] if direct_only else list(m.modules())):
            for table, is_param in ((sub._parameters, True), (sub._buffers, False)):
                for name, t in table.items():
                    if t is not None and id(t) not in seen:
                        seen.add(id(t))
                        out.append((sub, name, is_param))
    return out


class _Group:
    """Tensors that move together: host copies kept, a device copy made when needed."""

    def __init__(self, slots: list[Slot]):
        self.slots = slots
        self.host: list[torch.Tensor] = [self.get(s) for s in slots]
        self.dev: list[torch.Tensor] | None = None
        self.ready = None  # CUDA event after a prefetch on the side stream

    @staticmethod
    def get(slot: Slot) -> torch.Tensor:
        owner, name, is_param = slot
        return owner._parameters[name].data if is_param else owner._buffers[name]

    def bind(self, tensors: Sequence[torch.Tensor]) -> None:
        for (owner, name, is_param), t in zip(self.slots, tensors):
            if is_param:
                owner._parameters[name].data = t
            else:
                owner._buffers[name] = t

    def to_host(self, pin: bool) -> None:
        """Host copies on the CPU (page-locked when `pin`), bound as the module's tensors."""
        self.host = [t.detach().to("cpu") for t in self.host]
        if pin:
            self.host = [t.pin_memory() for t in self.host]
        self.bind(self.host)

    def refresh(self, pin: bool) -> None:
        """Adopt tensors someone else bound meanwhile (e.g. a pipeline's `vae.to(float32)`)."""
        for i, slot in enumerate(self.slots):
            now = self.get(slot)
            if now is not self.host[i] and (self.dev is None or now is not self.dev[i]):
                t = now.detach().to("cpu")
                self.host[i] = t.pin_memory() if pin else t
                if self.dev is not None:
                    self.dev = None

    def copy(self, device: torch.device, stream=None) -> None:
        """Start the copy to `device` (on `stream` when given, with an event recorded after it)."""
        if device.type == "cpu":
            self.dev = [t.clone() for t in self.host]
        elif stream is None:
            self.dev = [t.to(device, non_blocking=True) for t in self.host]
        else:
            with torch.cuda.stream(stream):
                self.dev = [t.to(device, non_blocking=True) for t in self.host]
                self.ready = torch.cuda.Event()
                self.ready.record(stream)

    def settle(self, device: torch.device) -> None:
        """Make the compute stream wait for this group's prefetch, if one is in flight."""
        if self.ready is not None:
            torch.cuda.current_stream(device).wait_event(self.ready)
            self.ready = None

    def load(self, device: torch.device) -> None:
        if self.dev is None:
            self.copy(device)
        self.bind(self.dev)

    def unload(self) -> None:
        self.bind(self.host)
        self.dev = None

    def make_resident(self, device: torch.device) -> None:
        """Move to `device` for good, dropping the host copies."""
        self.copy(device)
        self.bind(self.dev)
        self.host, self.dev = list(self.dev), None

    @property
    def loaded(self) -> bool:
        return self.dev is not None


# ------------------------------------------------------------------------------------ streaming

class ComponentStreamer:
    """Partial residency of one component: chosen units (and all tensors outside units) on
    `device`, the other units streamed from host memory ahead of use."""

    def __init__(self, root: nn.Module, device: torch.device | str, resident_bytes: int, *,
                 size: ComponentSize | None = None, storage: str | None = None, pin: bool = True,
                 evictable: bool = False):
        self.root, self.device = root, torch.device(device)
        cuda = self.device.type == "cuda"
        self.pin, self.evictable = pin and cuda, evictable
        units = stream_units(root)
        size = size or module_size("component", root)
        storage = storage or _storage_name(root)
        keep = choose_resident(size.block_bytes(storage), resident_bytes - size.rest_bytes(storage))
        self.resident = [n for (n, _), k in zip(units, keep) if k]
        self.streamed = [n for (n, _), k in zip(units, keep) if not k]
        streamed_mods = [m for (_, m), k in zip(units, keep) if not k]
        self.groups = [_Group(_slots([m])) for m in streamed_mods]
        in_streamed = {id((o._parameters if is_p else o._buffers)[n])
                       for g in self.groups for o, n, is_p in g.slots}
        self.fixed = _Group(_slots([root], skip=in_streamed))  # resident units + everything else
        for g in self.groups:
            g.to_host(self.pin)
        if evictable:
            self.fixed.to_host(self.pin)
        else:
            self.fixed.make_resident(self.device)
        self.side = torch.cuda.Stream(self.device) if cuda else None
        self.order: list[int] | None = None
        self.trace: list[int] | None = None
        self.next: dict[int, int] = {}
        self.stash: list = []   # (event on the compute stream, device tensors kept alive)
        self.hooks = []
        for i, m in enumerate(streamed_mods):
            self.hooks.append(m.register_forward_pre_hook(self._pre(i), prepend=True))
            self.hooks.append(m.register_forward_hook(self._post(i), always_call=True))
        self.hooks.append(root.register_forward_pre_hook(self._root_pre, prepend=True))
        self.hooks.append(root.register_forward_hook(self._root_post, always_call=True))

    @property
    def streamed_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for g in self.groups for t in g.host)

    def _root_pre(self, module, args) -> None:
        if self.evictable:
            self.fixed.load(self.device)
        if self.order is None and self.trace is None:
            self.trace = []
        elif self.order:
            self._prefetch(self.order[0])

    def _root_post(self, module, args, output) -> None:
        if self.trace is not None:
            seen = list(dict.fromkeys(self.trace))
            self.order, self.trace = seen, None
            self.next = dict(zip(seen, seen[1:]))

    def _prefetch(self, i: int) -> None:
        if self.groups[i].dev is None:
            self.groups[i].copy(self.device, self.side)

    def _pre(self, i: int):
        def hook(module, args):
            g = self.groups[i]
            if g.dev is None:
                g.copy(self.device)  # not prefetched: copy on the compute stream
            g.settle(self.device)
            g.bind(g.dev)
            if self.trace is not None:
                self.trace.append(i)
            elif i in self.next:
                self._prefetch(self.next[i])
        return hook

    def _post(self, i: int):
        def hook(module, args, output):
            g = self.groups[i]
            if g.dev is not None and self.device.type == "cuda":
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(self.device))
                self.stash.append((done, g.dev))
            g.unload()
            self.stash = [(e, t) for e, t in self.stash if not e.query()]
            while len(self.stash) > STREAM_DEPTH - 2:  # bound the memory: wait for the oldest
                self.stash.pop(0)[0].synchronize()
        return hook

    def remove(self) -> None:
        """Take the hooks off; streamed units stay bound to their host copies."""
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        for g in self.groups:
            g.unload()
        self.stash.clear()


def _storage_name(root: nn.Module) -> str:
    cast = castable_layers(root)
    dtype = cast[0][1].weight.dtype if cast else next(root.parameters()).dtype
    names = {torch.float8_e4m3fn: "fp8_e4m3fn", torch.float8_e5m2: "fp8_e5m2", torch.bfloat16: "bf16",
             torch.float32: "fp32"}
    return names.get(dtype, "fp16")


# ------------------------------------------------------------------------ offload between stages

class StageSwitch:
    """Components offloaded between stages: entering one (its forward or a direct child's) moves
    every other offloaded component back to host memory and this one to the device."""

    def __init__(self, device: torch.device, pin: bool):
        self.device, self.pin = device, pin
        self.parts: dict[str, tuple[str, object]] = {}   # name -> ("group", _Group) | ("streamer", s)
        self.current: str | None = None
        self.hooks = []

    def add_offloaded(self, name: str, root: nn.Module) -> None:
        group = _Group(_slots([root]))
        group.to_host(self.pin)
        self.parts[name] = ("group", group)

    def add_streamer(self, name: str, streamer: ComponentStreamer) -> None:
        self.parts[name] = ("streamer", streamer)

    def watch(self, name: str, root: nn.Module) -> None:
        """Enter `name` whenever `root` or one of its direct children runs."""
        def hook(module, args):
            self.enter(name)
        for m in [root, *root.children()]:
            self.hooks.append(m.register_forward_pre_hook(hook, prepend=True))

    def enter(self, name: str) -> None:
        if self.current == name:
            return
        for other, (kind, part) in self.parts.items():
            if other != name:
                part.unload() if kind == "group" else part.fixed.unload()
        if name in self.parts:
            kind, part = self.parts[name]
            group = part if kind == "group" else part.fixed
            group.refresh(self.pin)
            group.load(self.device)
        self.current = name

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        for kind, part in self.parts.values():
            if kind == "group":
                part.unload()


# ----------------------------------------------------------------------------------- apply a plan

@dataclass
class AppliedPlan:
    """The hooks and moves `apply_plan` made; `remove()` undoes them (resident parts stay on the
    device, offloaded and streamed ones end on the CPU, fp8 weights are upcast back)."""

    plan: MemoryPlan
    device: torch.device
    storage: dict = field(default_factory=dict)
    streamers: dict = field(default_factory=dict)
    switch: StageSwitch | None = None

    def remove(self) -> None:
        if self.switch is not None:
            self.switch.remove()
        for s in self.streamers.values():
            s.remove()
            s.fixed.unload() if s.evictable else None
        for h in self.storage.values():
            h.remove()
        self.streamers.clear()
        self.storage.clear()


def apply_plan(pipe, plan: MemoryPlan, device: torch.device | str) -> AppliedPlan:
    """Apply every decision of `plan` to the components of a diffusers pipeline (as loaded, on the
    CPU, in the plan's compute dtype): storage precision, then placement. Components not in the
    plan are left alone. Do not call `pipe.to()` afterwards; `remove()` first."""
    device = torch.device(device)
    compute = storage_dtype(plan.compute_dtype)
    applied = AppliedPlan(plan, device)
    pin = plan.pinned and device.type == "cuda"
    switch = StageSwitch(device, pin)
    for d in plan.decisions:
        module = getattr(pipe, d.name, None)
        if not isinstance(module, nn.Module):
            continue
        size = module_size(d.name, module)
        if d.storage in ("fp16", "bf16", "fp32") and d.storage != plan.compute_dtype:
            module.to(dtype=compute)  # stored as loaded would waste memory: upcast per layer
        applied.storage[d.name] = apply_storage(module, d.storage, compute, device=device)
        if d.placement in ("resident", "cpu"):
            module.to(device if d.placement == "resident" else torch.device("cpu"))
        elif d.placement == "offload":
            switch.add_offloaded(d.name, module)
        elif d.placement == "partial":
            s = ComponentStreamer(module, device, d.gpu_bytes, size=size, storage=d.storage, pin=pin,
                                  evictable=not d.keep_between_stages)
            applied.streamers[d.name] = s
            if s.evictable:
                switch.add_streamer(d.name, s)
        switch.watch(d.name, module)
    if switch.parts:
        applied.switch = switch
        first = next((d.name for d in plan.decisions if d.name in DENOISERS), None)
        switch.enter(first or plan.decisions[0].name)  # something on the device: pipe.device
    else:
        switch.remove()
    return applied
