"""What the compute device does natively, and the one rule for the dtype layers compute in.

`torch.cuda.is_bf16_supported()` answers True on Turing cards (RTX 20xx, compute capability 7.5)
because torch counts bf16 that it *emulates*: no bf16 tensor cores there, so a bf16 matmul runs far
slower than fp16. Generation (`compute_dtype_for` in workbench/pipeline/memory_plan.py) and training
(`resolve_precision` in workbench/train/loop.py) both used that answer, so an RTX 2060 got bf16.
Both now ask `compute_dtype` here, from facts about the hardware, and `workbench doctor`
(workbench/doctor.py) reports the same answer:

- NVIDIA: bf16 only where native (compute capability 8.0 and later: Ampere, Ada, Hopper, Blackwell);
  fp16 otherwise (training then uses fp16 with loss scaling: accelerate's GradScaler).
- AMD (ROCm builds of torch): bf16, as torch reports it.
- CPU: bf16 where the CPU has it in hardware (AVX512-BF16 or AMX; without them oneDNN emulates
  bf16 and a step is ~5x slower than fp32, measured in bench/cpu_fewstep.py); fp32 otherwise.
  fp16 is never chosen on a CPU (no fast fp16 matmuls there).

fp8 is storage only (upcast per layer, workbench/pipeline/precision.py), which works on every device;
fp8 *matmuls* need compute capability 8.9 (Ada/Hopper) and are reported, not used.

torch is imported inside the probes only: the memory planner (which imports this module) prints
plans from file headers without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

NATIVE_BF16 = (8, 0)      # Ampere: bf16 tensor cores
FP16_TENSOR_CORES = (7, 0)  # Volta
FP8_MATMUL = (8, 9)       # Ada / Hopper: fp8 tensor cores


@dataclass(frozen=True)
class DeviceFacts:
    """The compute device as far as precision goes (fake one freely in tests).

    kind is "cuda" (NVIDIA, or AMD through a ROCm build, which torch also calls cuda) or "cpu".
    """

    kind: str = "cpu"
    name: str = "cpu"
    capability: tuple[int, int] | None = None   # CUDA compute capability (NVIDIA)
    rocm: bool = False
    cpu_bf16: bool = False                     # the CPU computes bf16 in hardware

    @property
    def bf16(self) -> bool:
        """bf16 computed natively (not emulated)."""
        if self.kind == "cuda":
            return self.rocm or (self.capability is not None and tuple(self.capability) >= NATIVE_BF16)
        return self.cpu_bf16

    @property
    def fp16(self) -> bool:
        """fp16 compute that is fast: GPUs only (tensor cores from compute capability 7.0)."""
        return self.kind == "cuda"

    @property
    def fp8_matmul(self) -> bool:
        return self.kind == "cuda" and not self.rocm and self.capability is not None \
            and tuple(self.capability) >= FP8_MATMUL


class HasPrecision(Protocol):
    """Anything with a device kind and a native-bf16 answer: DeviceFacts, or the memory planner's
    DeviceInfo (whose `bf16` is filled from DeviceFacts by probe_device)."""

    kind: str

    @property
    def bf16(self) -> bool: ...


def compute_dtype(device: HasPrecision) -> str:
    """The half precision this device computes fastest: "bf16", "fp16" or "fp32" (see the module
    docstring for the rule)."""
    if device.bf16:
        return "bf16"
    return "fp16" if device.kind == "cuda" else "fp32"


def training_precision(device: HasPrecision) -> str:
    """`compute_dtype` in accelerate's words for `mixed_precision`: fp32 is "no"."""
    dtype = compute_dtype(device)
    return "no" if dtype == "fp32" else dtype


def why(device: DeviceFacts) -> str:
    """One line on the choice, for `workbench doctor` and plans."""
    chosen = compute_dtype(device)
    if device.kind == "cuda" and device.capability is not None:
        cc = f"compute capability {device.capability[0]}.{device.capability[1]}"
        if chosen == "fp16":
            return f"fp16 (bf16 is only emulated at {cc}: much slower; training uses fp16 with loss scaling)"
        return f"bf16 (native at {cc})"
    if device.kind == "cuda":
        return f"{chosen} (as torch reports this GPU)"
    if chosen == "bf16":
        return "bf16 (the CPU has AVX512-BF16/AMX)"
    return "fp32 (this CPU has no bf16 in hardware; emulated bf16 is ~5x slower)"


# ------------------------------------------------------------------------------------- probing

def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls/convolutions run in hardware. Without them oneDNN emulates
    bf16 and a SD1.5 UNet step is ~5x slower than fp32 (measured on an AVX2 EPYC: 45.7 s vs 8.6 s;
    bench/cpu_fewstep.py), so the CPU path only picks bf16 where the hardware has it."""
    import torch  # heavy; see the module docstring

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # private probes moved: be safe, fp32 is never slow
        return False


def probe(device: str | None = None) -> DeviceFacts:
    """Facts about `device` ("cuda", "cuda:1", "cpu"; None: the first CUDA GPU when torch sees one).
    A CUDA device that torch cannot use is reported as the CPU it will fall back to."""
    import torch  # heavy; see the module docstring

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type != "cuda" or not torch.cuda.is_available():
        return DeviceFacts("cpu", f"cpu ({torch.backends.cpu.get_cpu_capability()})",
                           cpu_bf16=cpu_has_native_bf16())
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return DeviceFacts("cuda", torch.cuda.get_device_name(index),
                       tuple(torch.cuda.get_device_capability(index)), rocm=bool(torch.version.hip))
