"""The memory planner: from sizes and a VRAM/RAM budget, decide where each component's weights live.

Everything here is arithmetic on sizes, so a plan can be printed (`workbench generate --plan`) and
tested before anything is loaded. Sizes (workbench/pipeline/sizes.py) come from a safetensors header
(`component_sizes_from_header`) or from a loaded pipeline (`component_sizes_from_pipeline`, whose
blocks are exactly the units that `workbench.pipeline.streaming` streams).

Generation runs in three stages: *encode* (text encoders, once per prompt), *denoise* (the UNet or
transformer, every step) and *decode* (the VAE, once per image). A stage's VRAM peak is the weights on
the GPU during it plus its working memory (activations, streaming buffers, fp8 upcast scratch).

Policy, applied one rung at a time until every stage fits the budget (what a 12 GB user wants):
  0. everything resident in the compute dtype (fp16 for SD1.5/SDXL, bf16 for SD3/FLUX where the
     card computes bf16 natively, else fp16: workbench/hardware.py); a file already stored in fp8
     stays fp8 (`weights="auto"`): nothing is lost.
  1. text encoders are offloaded between stages, largest first: they run once per prompt, so
     moving them costs little; they wait in (pinned) RAM.
  2. `weights="auto"` only: the denoiser is stored in fp8 (e4m3fn), upcast per layer.
  3. the VAE is offloaded between stages; 4. the VAE decodes in tiles.
  5. the denoiser is partially resident: as many blocks as fit stay on the GPU, spread evenly over
     the execution order, and the rest is streamed from pinned RAM one block ahead of use.
  6. `weights="auto"` only: text encoders that still do not fit their stage are stored in fp8;
  7. then they are partially resident too (streamed once per prompt, cheap).
  8. the denoiser's GPU part is moved to RAM while the other stages run.
  9. otherwise refuse, naming the stage and component. The same happens when what must wait in
     RAM (offloaded and streamed weights) is more than the RAM free.
NF4 is only used when asked for (`weights="nf4"`), for the denoiser: it changes images more than
fp8 and needs bitsandbytes (a CUDA GPU, or its CPU backend); NF4 weights are resident or
offloaded, never streamed. Two file formats bring their own storage:
- a GGUF denoiser is stored as the file has it (`gguf`: Linear and conv weights packed, dequantized
  per layer by diffusers' GGUFLinear and `pipeline/gguf_layers.py`; sized from the header's bytes
  per quant type), whatever `weights`
  says; it is resident or offloaded, never streamed, like NF4;
- a bitsandbytes NF4 file (Forge's) is dequantized while loading; under `auto` its denoiser is
  packed to NF4 again where bitsandbytes runs on the device, else it takes the rungs above.

Units: MB = 10^6 bytes and GB = 10^9 bytes throughout (a "12 GB" card holds 12.9 GB).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from workbench import hardware
from workbench.arch import DIT_IDS
from workbench.errors import UnsupportedError, WorkbenchError
from workbench.formats.packed import BNB_4BIT

from workbench.pipeline.sizes import (
    DENOISERS,
    GB,
    MB,
    STORAGE_BYTES,
    ComponentSize,
    activation_bytes,
    choose_resident,
    vae_decode_bytes,
)
from workbench.pipeline.precision import nf4_available, require_nf4

DEFAULT_RESERVE_MB = 1024      # kept free for the CUDA context, cuDNN/cuBLAS workspaces and others
RAM_RESERVE = 2 * GB           # for Python, torch, the OS page cache we still want
TE_WORK = 256 * MB             # text-encoder activations (77-512 tokens): small next to weights
STREAM_DEPTH = 3               # streamed blocks alive at once: computing, prefetching, kept alive
WEIGHTS = ("auto", "fp32", "fp16", "bf16", "fp8", "fp8_e4m3fn", "fp8_e5m2", "nf4")
FILE_DTYPE_STORAGE = {"F8_E4M3": "fp8_e4m3fn", "F8_E5M2": "fp8_e5m2"}
NF4_FILE_DTYPES = BNB_4BIT  # bitsandbytes 4-bit files (formats.nf4_file)
STAGES = ("encode", "denoise", "decode")


# ------------------------------------------------------------------------------------- the device

@dataclass(frozen=True)
class DeviceInfo:
    """What the planner needs to know about the compute device (fake one freely in tests)."""

    kind: str = "cpu"             # cuda | cpu
    name: str = "cpu"
    total_vram: int = 0           # bytes
    free_vram: int = 0            # bytes, at probe time
    bf16: bool = False            # bf16 computed natively (workbench/hardware.py: not on Turing)
    fp8_matmul: bool = False      # sm >= 8.9 (Ada/Hopper): fp8 tensor cores; storage-only fp8 works anywhere
    pinned_ok: bool = True        # page-locked host memory may be used for offloaded weights
    index: int = 0


def probe_device(device: str | None = None) -> DeviceInfo:
    """Probe `device` ("cuda", "cuda:1", "cpu"; None: CUDA when available)."""
    import torch

    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type != "cuda":
        return DeviceInfo(kind="cpu", name=f"cpu ({torch.backends.cpu.get_cpu_capability()})",
                          bf16=hardware.cpu_has_native_bf16())
    if not torch.cuda.is_available():
        raise UnsupportedError(f"device {name!r} asked for, but torch sees no CUDA GPU "
                                f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    facts = hardware.probe(f"cuda:{index}")
    return DeviceInfo(kind="cuda", name=facts.name, total_vram=total, free_vram=free,
                      bf16=facts.bf16, fp8_matmul=facts.fp8_matmul,
                      pinned_ok=os.environ.get("WORKBENCH_NO_PIN") != "1", index=index)


# ------------------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Decision:
    """Where one component lives. placement: resident | partial | offload | cpu."""

    name: str
    storage: str
    placement: str
    total_bytes: int
    gpu_bytes: int = 0            # on the GPU during its stage (all of it unless partial)
    streamed_bytes: int = 0       # partial: copied from pinned RAM ahead of each use
    resident_blocks: int = 0      # partial: blocks kept on the GPU
    blocks: int = 0
    keep_between_stages: bool = True   # partial: GPU part stays while other stages run
    reason: str = ""
    estimated: bool = False

    @property
    def ram_bytes(self) -> int:
        """Bytes waiting in host RAM (pinned where allowed) while generating."""
        if self.placement in ("cpu", "offload"):
            return self.total_bytes
        if self.placement == "partial":
            return self.streamed_bytes + (0 if self.keep_between_stages else self.gpu_bytes)
        return 0


@dataclass(frozen=True)
class MemoryPlan:
    arch: str
    device: DeviceInfo
    compute_dtype: str
    budget_bytes: int
    ram_free_bytes: int | None
    decisions: tuple[Decision, ...]
    stage_peaks: dict[str, int] = field(default_factory=dict)
    vae_tiling: bool = False
    pinned: bool = True
    width: int = 1024
    height: int = 1024
    batch: int = 1
    notes: tuple[str, ...] = ()

    def decision(self, name: str) -> Decision:
        for d in self.decisions:
            if d.name == name:
                return d
        raise KeyError(f"no component {name!r} in the plan ({', '.join(self.names)})")

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.decisions]

    @property
    def ram_bytes(self) -> int:
        return sum(d.ram_bytes for d in self.decisions)

    def to_dict(self) -> dict:
        """JSON-able form (provenance, bench output)."""
        out = asdict(self)
        out["ram_bytes"] = self.ram_bytes
        return out

    def render(self) -> str:
        """A readable table for `workbench generate --plan`."""
        dev = self.device
        head = (f"memory plan: {self.arch} {self.width}x{self.height} batch {self.batch} on "
                f"{dev.name}" + (f" ({gb(dev.total_vram)} VRAM, {gb(dev.free_vram)} free)"
                                 if dev.kind == "cuda" else ""))
        lines = [head, f"  compute dtype {self.compute_dtype}; VRAM budget "
                 f"{gb(self.budget_bytes) if dev.kind == 'cuda' else '-'}; RAM free "
                 f"{gb(self.ram_free_bytes) if self.ram_free_bytes is not None else 'unknown'}"]
        rows = [("component", "storage", "placement", "weights", "on GPU", "in RAM", "why")]
        for d in self.decisions:
            place = d.placement
            if d.placement == "partial":
                place = f"partial {d.resident_blocks}/{d.blocks} blocks"
                place += "" if d.keep_between_stages else ", moved out between stages"
            rows.append((d.name + (" (assumed size)" if d.estimated else ""), d.storage, place,
                         gb(d.total_bytes), gb(d.gpu_bytes), gb(d.ram_bytes), d.reason))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        for r in rows:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        if dev.kind == "cuda":
            peaks = ", ".join(f"{s} {gb(self.stage_peaks[s])}" for s in STAGES if s in self.stage_peaks)
            lines.append(f"  estimated VRAM peak per stage: {peaks}")
        lines.append(f"  RAM for offloaded/streamed weights: {gb(self.ram_bytes)}"
                     + (" (pinned)" if self.pinned and dev.kind == "cuda" and self.ram_bytes else ""))
        if self.vae_tiling:
            lines.append("  VAE decodes in tiles")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def gb(n: int | float | None) -> str:
    return "-" if n is None else (f"{n / GB:.1f} GB" if abs(n) >= 0.1 * GB else f"{n / MB:.0f} MB")


# ---------------------------------------------------------------------------------- the planner

@dataclass
class _State:
    size: ComponentSize
    storage: str
    placement: str = "resident"
    resident_bytes: int = 0       # partial only
    keep: bool = True
    reason: str = "fits"

    @property
    def total(self) -> int:
        return self.size.bytes_at(self.storage)

    def gpu(self) -> int:
        return self.resident_bytes if self.placement == "partial" else self.total


def compute_dtype_for(arch: str, weights: str, device: DeviceInfo) -> str:
    """The dtype layers compute in. CPU: bf16 when asked for, or under `auto` the device's own
    (`hardware.compute_dtype`: bf16 where the CPU computes it natively, AVX512-BF16/AMX, about half
    the fp32 step); fp32 otherwise. GPU: the asked 16/32-bit dtype, else for the DiT models the
    device's own (bf16 where native: they prefer its range; fp16 on Turing and older, where
    diffusers clamps FLUX's activations and T5 keeps its fp32 layers) and fp16 for UNets."""
    if device.kind != "cuda":
        if weights == "bf16":
            return "bf16"
        return hardware.compute_dtype(device) if weights == "auto" else "fp32"
    if weights in ("fp32", "fp16", "bf16"):
        return weights
    return hardware.compute_dtype(device) if arch in DIT_IDS else "fp16"


def _file_storage(c: ComponentSize, weights: str, device: DeviceInfo) -> tuple[str, str] | None:
    """The storage a GGUF or NF4 file brings for this component, or None."""
    if c.packed_params:
        ignored = "" if weights == "auto" else f" (weights: {weights} does not apply to GGUF)"
        return "gguf", f"GGUF {c.file_dtype} in the file: Linear and conv weights stay packed, dequantized per layer{ignored}"
    if c.file_dtype in NF4_FILE_DTYPES and c.name in DENOISERS and weights == "auto":
        # a GPU plan may be for another machine (checked at load, as for weights: nf4); the CPU
        # backend depends on the installed bitsandbytes, so it is tried
        here = importlib.util.find_spec("bitsandbytes") is not None if device.kind == "cuda" \
            else nf4_available("cpu")
        if here:
            return "nf4", "NF4 in the file: read, then packed to NF4 again with bitsandbytes"
    return None


def _initial_storage(c: ComponentSize, weights: str, compute: str) -> tuple[str, str]:
    if weights in ("fp32", "fp16", "bf16"):
        return weights, f"asked for {weights}"
    fp8 = {"fp8": "fp8_e4m3fn"}.get(weights, weights)
    if fp8.startswith("fp8") and c.name != "vae":
        return fp8, f"asked for {fp8}"
    if weights == "nf4" and c.name in DENOISERS:
        return "nf4", "asked for nf4"
    if weights == "auto" and c.file_dtype in FILE_DTYPE_STORAGE and c.name != "vae":
        return _file_fp8(c)
    return compute, "fits"


def _file_fp8(c: ComponentSize) -> tuple[str, str]:
    """The storage and reason for a component the file already holds in fp8."""
    if c.scaled_fp8:
        return FILE_DTYPE_STORAGE[c.file_dtype], "scaled fp8 in the file (kept in fp8, one scale per layer)"
    return FILE_DTYPE_STORAGE[c.file_dtype], "stored so in the file (kept as is)"


class _Planner:
    def __init__(self, sizes, arch, weights, device, budget, compute, width, height, batch):
        self.arch, self.weights, self.device, self.budget = arch, weights, device, budget
        self.compute, self.width, self.height, self.batch = compute, width, height, batch
        self.comps = []
        for c in sizes:
            storage, why = _file_storage(c, weights, device) or _initial_storage(c, weights, compute)
            self.comps.append(_State(c, storage, reason=why))
        self.tiling = False
        self.compute_bytes = STORAGE_BYTES[compute]

    def work(self, stage: str) -> int:
        """Working memory of `stage`: activations, streaming buffers, fp8 upcast scratch."""
        if stage in self.work_override:
            base = self.work_override[stage]
        elif stage == "encode":
            base = TE_WORK
        elif stage == "decode":
            base = vae_decode_bytes(self.width, self.height, self.batch, self.tiling)
        else:
            base = activation_bytes(self.arch, self.width, self.height, self.batch)
        extra = 0
        for s in self.comps:
            if s.size.stage != stage:
                continue
            if s.placement == "partial":
                blocks = s.size.block_bytes(s.storage)
                keep = choose_resident(blocks, s.resident_bytes - s.size.rest_bytes(s.storage))
                extra += STREAM_DEPTH * max((b for b, k in zip(blocks, keep) if not k), default=0)
            if s.storage not in (self.compute, "nf4"):  # fp8 upcast / GGUF dequantization scratch
                extra += 2 * s.size.largest_layer * self.compute_bytes
        return base + extra

    def peak(self, stage: str) -> int:
        on = 0
        for s in self.comps:
            own = s.size.stage == stage
            if s.placement == "resident" or (s.placement == "partial" and (own or s.keep)) or \
                    (s.placement == "offload" and own):
                on += s.gpu()
        return on + self.work(stage)

    def failing(self) -> list[str]:
        used = {s.size.stage for s in self.comps}
        return [st for st in STAGES if st in used and self.peak(st) > self.budget]

    # -- rungs: each changes one thing and returns True, or returns False when it does not apply
    def offload(self, role: str) -> bool:
        for s in sorted(self.comps, key=lambda s: -s.total):
            if s.size.stage == role and s.placement == "resident":
                s.placement, s.reason = "offload", "runs once per " + (
                    "prompt" if role == "encode" else "image") + "; waits in RAM between stages"
                return True
        return False

    def fp8(self, stage: str) -> bool:
        if self.weights != "auto" or stage not in self.failing():
            return False
        for s in sorted(self.comps, key=lambda s: -s.total):
            if s.size.stage == stage and s.size.name != "vae" and s.storage in ("fp16", "bf16", "fp32") \
                    and s.size.cast_params:
                s.storage, s.reason = "fp8_e4m3fn", f"{self.compute} does not fit; fp8 storage, upcast per layer"
                if s.placement == "partial":
                    self.maximize(s)
                return True
        return False

    def tile(self) -> bool:
        if self.tiling or "decode" not in self.failing():
            return False
        self.tiling = True
        return True

    def maximize(self, s: _State) -> bool:
        """Make `s` partial with the most resident bytes its stage allows; False if none fit."""
        if s.storage in ("nf4", "gguf") or not s.size.blocks:
            return False
        old = (s.placement, s.resident_bytes, s.keep)
        s.keep = s.keep and s.placement != "offload"  # an offloaded one stays out between stages
        s.placement, rest = "partial", s.size.rest_bytes(s.storage)
        lo, hi = rest, s.total
        s.resident_bytes = lo
        if self.peak(s.size.stage) > self.budget:
            s.placement, s.resident_bytes, s.keep = old
            return False
        while hi - lo > MB:  # the stage peak grows with resident bytes (buffers shrink slower)
            mid = (lo + hi) // 2
            s.resident_bytes = mid
            if self.peak(s.size.stage) <= self.budget:
                lo = mid
            else:
                hi = mid
        s.resident_bytes = lo
        keep = choose_resident(s.size.block_bytes(s.storage), lo - rest)
        s.resident_bytes = rest + sum(b for b, k in zip(s.size.block_bytes(s.storage), keep) if k)
        s.reason = f"{gb(s.total)} does not fit; the rest is streamed ahead of use"
        return True

    def partial(self, stage: str) -> bool:
        if stage not in self.failing():
            return False
        for s in sorted(self.comps, key=lambda s: -s.total):
            if s.size.stage == stage and s.placement in ("resident", "offload") and self.maximize(s):
                return True
        return False

    def evict_denoiser(self) -> bool:
        if not set(self.failing()) - {"denoise"}:
            return False
        for s in self.comps:
            if s.size.stage == "denoise" and s.keep and s.placement in ("resident", "partial") \
                    and s.storage != "nf4":  # bitsandbytes weights stay where they were quantized
                if s.placement == "resident":
                    s.placement, s.reason = "offload", "moved to RAM while the other stages run"
                s.keep = False
                for t in self.comps:  # more room for the others now
                    if t.placement == "partial" and t is not s:
                        self.maximize(t)
                return True
        return False

    def run(self) -> None:
        # text encoders first, one at a time, as long as anything fails
        while self.failing() and self.offload("encode"):
            pass
        rungs = [lambda: self.fp8("denoise"),
                 lambda: bool(self.failing()) and self.offload("decode"),
                 self.tile,
                 lambda: self.partial("denoise"),
                 self.evict_denoiser,
                 lambda: self.fp8("encode"),
                 lambda: self.partial("encode")]
        while self.failing():
            if not any(r() for r in rungs):  # the first rung that applies, then check again
                break
        if self.tiling and not self.failing():  # a later rung may have made room: decode whole
            self.tiling = False
            self.tiling = bool(self.failing())

    def shrink_ram(self, ram_free: int) -> bool:
        """`auto`: store what waits in RAM in fp8 (largest first) until it fits; False if nothing left."""
        if self.weights != "auto":
            return False
        for s in sorted(self.comps, key=lambda s: -s.total):
            d = _decision(s)
            if d.ram_bytes and s.storage in ("fp16", "bf16", "fp32") and s.size.name != "vae" \
                    and s.size.cast_params:
                s.storage, s.reason = "fp8_e4m3fn", "fp8 storage so that it fits in RAM"
                if s.placement == "partial":
                    self.maximize(s)
                return True
        return False


def plan_memory(sizes: Sequence[ComponentSize], *, device: DeviceInfo, arch: str,
                vram_budget_mb: int | None = None, ram_free_bytes: int | None = None,
                weights: str = "auto", width: int = 1024, height: int = 1024, batch: int = 1,
                reserve_mb: int = DEFAULT_RESERVE_MB,
                work_bytes: Mapping[str, int] | None = None) -> MemoryPlan:
    """Decide storage and placement of every component (see the module docstring for the policy).

    `vram_budget_mb`: what our weights and activations may use (MB = 10^6 B); None: free VRAM minus
    `reserve_mb`. `ram_free_bytes`: None skips the RAM check. `work_bytes`: working memory per stage
    (encode/denoise/decode) to use instead of the estimates, e.g. measured. Raises WorkbenchError
    naming what does not fit in VRAM + RAM.
    """
    if weights not in WEIGHTS:
        raise WorkbenchError(f"weights: expected one of {', '.join(WEIGHTS)} (got {weights!r})")
    if not sizes:
        raise WorkbenchError("nothing to plan: no components")
    notes: list[str] = [f"{c.name}: size assumed for the standard component (not in the file)"
                        for c in sizes if c.estimated]
    if weights == "nf4" and device.kind != "cuda":  # a GPU plan may be for another machine: checked at load

        require_nf4("cpu")
    compute = compute_dtype_for(arch, weights, device)
    if device.kind != "cuda":
        return _plan_cpu(sizes, arch, weights, device, compute, ram_free_bytes, width, height, batch, notes)
    if vram_budget_mb is None:
        budget = max(0, device.free_vram - reserve_mb * MB)
    else:
        budget = int(vram_budget_mb * MB)
        if device.free_vram and budget > device.free_vram:
            notes.append(f"budget {gb(budget)} is more than the {gb(device.free_vram)} free; "
                         "using what is free")
            budget = device.free_vram
    if weights in ("fp8", "fp8_e4m3fn", "fp8_e5m2") and device.fp8_matmul:
        notes.append("fp8 is storage only (upcast per layer); fp8 matmul is not used")
    p = _Planner(sizes, arch, weights, device, budget, compute, width, height, batch)
    p.work_override = dict(work_bytes or {})
    p.run()
    while True:
        if p.failing():
            raise WorkbenchError(_vram_message(p, arch))
        decisions = tuple(_decision(s) for s in p.comps)
        plan = MemoryPlan(arch, device, compute, budget, ram_free_bytes, decisions,
                          {st: p.peak(st) for st in STAGES if st in {s.size.stage for s in p.comps}},
                          p.tiling, device.pinned_ok, width, height, batch, tuple(notes))
        if ram_free_bytes is None or plan.ram_bytes + RAM_RESERVE <= ram_free_bytes \
                or not p.shrink_ram(ram_free_bytes):
            break
    _check_ram(plan, arch)
    return plan


def _decision(s: _State) -> Decision:
    blocks = s.size.block_bytes(s.storage)
    if s.placement == "partial":
        keep = choose_resident(blocks, s.resident_bytes - s.size.rest_bytes(s.storage))
        return Decision(s.size.name, s.storage, "partial", s.total, s.resident_bytes,
                        s.total - s.resident_bytes, sum(keep), len(blocks), s.keep, s.reason,
                        s.size.estimated)
    return Decision(s.size.name, s.storage, s.placement, s.total, s.total, 0, len(blocks), len(blocks),
                    s.keep, s.reason, s.size.estimated)


def _plan_cpu(sizes, arch, weights, device, compute, ram_free, width, height, batch, notes) -> MemoryPlan:
    """CPU: everything in RAM. `auto` keeps what the file stores in fp8 as fp8 (bit-exact, half the
    RAM), stores the rest in the compute dtype and falls back to bf16, then fp8 storage, to fit the
    RAM; the VAE always stays in the compute dtype."""
    choices = {"auto": list(dict.fromkeys([compute, "bf16", "fp8_e4m3fn"])),
               "fp8": ["fp8_e4m3fn"]}.get(weights, [weights])
    for storage in choices:
        decisions = []
        for c in sizes:
            chosen, why = storage, "no CUDA GPU: runs on the CPU"
            if (from_file := _file_storage(c, weights, device)) is not None:
                chosen, why = from_file
            elif c.name == "vae" and storage.startswith("fp8"):
                chosen = compute
            elif storage == "nf4" and c.name not in DENOISERS:
                chosen, why = compute, "no CUDA GPU: runs on the CPU (nf4 is for the denoiser)"
            elif weights == "auto" and c.name != "vae" and c.file_dtype in FILE_DTYPE_STORAGE:
                chosen, why = _file_fp8(c)
            decisions.append(Decision(c.name, chosen, "cpu", c.bytes_at(chosen), reason=why,
                                      estimated=c.estimated))
        plan = MemoryPlan(arch, device, compute, 0, ram_free, tuple(decisions), {}, False, False,
                          width, height, batch, tuple(notes))
        if ram_free is None or plan.ram_bytes + RAM_RESERVE <= ram_free:
            return plan
    _check_ram(plan, arch)
    return plan


def _vram_message(p: _Planner, arch: str) -> str:
    stage = p.failing()[0]
    worst = max((s for s in p.comps if s.size.stage == stage), key=lambda s: s.gpu(), default=None)
    what = f"{arch} {worst.size.name} ({gb(worst.total)} in {worst.storage}, " \
           f"{gb(worst.gpu())} of it on the GPU)" if worst else "it"
    if worst is not None and worst.storage in ("gguf", "nf4"):  # never streamed (see module doc)
        return (f"the {stage} stage needs {gb(p.peak(stage))} of VRAM but the budget is {gb(p.budget)}: "
                f"{what} plus {gb(p.work(stage))} of working memory at {p.width}x{p.height} do not fit, "
                f"and {worst.storage} weights are kept whole on the GPU (not streamed); use a smaller "
                "file (e.g. GGUF Q5_K_S or Q4_K_S instead of Q8_0), lower the resolution or raise the budget")
    return (f"the {stage} stage needs {gb(p.peak(stage))} of VRAM but the budget is {gb(p.budget)}: "
            f"{what} plus {gb(p.work(stage))} of working memory at {p.width}x{p.height} do not fit "
            "even when streamed block by block; lower the resolution or batch, raise the budget"
            + (", or use --weights auto/fp8/nf4" if p.weights not in ("auto", "nf4") else ""))


def _check_ram(plan: MemoryPlan, arch: str) -> None:
    if plan.ram_free_bytes is None:
        return
    need = plan.ram_bytes + RAM_RESERVE
    if need <= plan.ram_free_bytes:
        return
    parts = ", ".join(f"{d.name} {gb(d.ram_bytes)} in {d.storage}" for d in
                      sorted(plan.decisions, key=lambda d: -d.ram_bytes) if d.ram_bytes)
    gpu = ", ".join(f"{d.name} {gb(d.gpu_bytes)}" for d in plan.decisions if d.gpu_bytes and
                    d.placement != "cpu")
    where = (f"VRAM budget {gb(plan.budget_bytes)} holds {gpu}; " if plan.device.kind == "cuda" and gpu
             else "")
    raise WorkbenchError(
        f"{arch} does not fit in VRAM + RAM: {where}the rest ({parts}) needs {gb(plan.ram_bytes)} "
        f"of RAM plus {gb(RAM_RESERVE)} reserve, but RAM free is {gb(plan.ram_free_bytes)}; "
        "close other programs, use a smaller model file (fp8/nf4) or a larger VRAM budget")
