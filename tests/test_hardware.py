"""One precision rule (workbench/hardware.py) for generation and training, from device facts.

The cards are faked: an RTX 2060 (Turing, compute capability 7.5, where torch's
`is_bf16_supported()` says True because it counts emulated bf16), an RTX 3060 (8.6) and an
RTX 4090 (8.9). The probes are faked at torch's own functions, so the code that reads them runs.
"""

from __future__ import annotations

import pytest
import torch

from workbench import hardware
from workbench.pipeline import memory_plan
from workbench.pipeline.memory_plan import DeviceInfo, compute_dtype_for
from workbench.pipeline.sizes import GB
from workbench.errors import RecipeError
from workbench.hardware import DeviceFacts, compute_dtype, training_precision
from workbench.train.loop import resolve_precision

RTX_2060 = DeviceFacts("cuda", "NVIDIA GeForce RTX 2060", (7, 5))
RTX_3060 = DeviceFacts("cuda", "NVIDIA GeForce RTX 3060", (8, 6))
RTX_4090 = DeviceFacts("cuda", "NVIDIA GeForce RTX 4090", (8, 9))
AVX2_CPU = DeviceFacts("cpu", "cpu (AVX2)", cpu_bf16=False)
AMX_CPU = DeviceFacts("cpu", "cpu (AMX)", cpu_bf16=True)


@pytest.mark.parametrize("device, dtype, training", [
    (RTX_2060, "fp16", "fp16"),
    (RTX_3060, "bf16", "bf16"),
    (RTX_4090, "bf16", "bf16"),
    (AVX2_CPU, "fp32", "no"),
    (AMX_CPU, "bf16", "bf16"),
    (DeviceFacts("cuda", "AMD Radeon", None, rocm=True), "bf16", "bf16"),
])
def test_compute_dtype_follows_native_support(device, dtype, training):
    assert compute_dtype(device) == dtype
    assert training_precision(device) == training


def test_fp8_matmul_only_from_ada():
    assert not RTX_2060.fp8_matmul and not RTX_3060.fp8_matmul and RTX_4090.fp8_matmul
    assert not AMX_CPU.fp8_matmul and not AMX_CPU.fp16


def test_generation_uses_the_same_rule():
    """DiT models compute in the device's own dtype; UNets in fp16 on every GPU; asked dtypes win."""
    def info(facts: DeviceFacts) -> DeviceInfo:
        return DeviceInfo(facts.kind, facts.name, 12 * GB, 12 * GB, bf16=facts.bf16,
                          fp8_matmul=facts.fp8_matmul)

    assert compute_dtype_for("flux", "auto", info(RTX_2060)) == "fp16"
    assert compute_dtype_for("sd3", "fp8", info(RTX_2060)) == "fp16"
    assert compute_dtype_for("flux", "auto", info(RTX_3060)) == "bf16"
    assert compute_dtype_for("sdxl", "auto", info(RTX_4090)) == "fp16"
    assert compute_dtype_for("flux", "bf16", info(RTX_2060)) == "bf16"  # asked for: honoured
    assert compute_dtype_for("sd15", "auto", info(AVX2_CPU)) == "fp32"
    assert compute_dtype_for("sd15", "auto", info(AMX_CPU)) == "bf16"
    assert compute_dtype_for("sd15", "fp16", info(AMX_CPU)) == "fp32"


@pytest.fixture
def fake_gpu(monkeypatch):
    """Make torch report one CUDA card with the given compute capability; is_bf16_supported says
    True whatever the card, as torch does on Turing (emulated bf16 counts there)."""
    def install(name: str, capability: tuple[int, int]) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (11 * GB, 12 * GB))
        monkeypatch.setattr(torch.version, "hip", None)
    return install


def test_probes_ignore_emulated_bf16_on_turing(fake_gpu):
    fake_gpu("NVIDIA GeForce RTX 2060", (7, 5))
    facts = hardware.probe("cuda")
    assert facts == DeviceFacts("cuda", "NVIDIA GeForce RTX 2060", (7, 5))
    info = memory_plan.probe_device("cuda")
    assert info.bf16 is False and info.fp8_matmul is False and info.total_vram == 12 * GB
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"


def test_probes_on_ampere_and_ada(fake_gpu):
    fake_gpu("NVIDIA GeForce RTX 3060", (8, 6))
    assert memory_plan.probe_device("cuda").bf16 is True
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    fake_gpu("NVIDIA GeForce RTX 4090", (8, 9))
    assert memory_plan.probe_device("cuda:0").fp8_matmul is True


@pytest.mark.parametrize("native, expected", [(False, "no"), (True, "bf16")])
def test_training_on_the_cpu_follows_the_cpu(monkeypatch, native, expected):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert memory_plan.probe_device("cpu").bf16 is native


def test_asked_training_precision_is_kept_and_fp16_on_cpu_refused():
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert resolve_precision("no", torch.device("cpu")) == "no"
    with pytest.raises(RecipeError, match="fp16 needs a GPU"):
        resolve_precision("fp16", torch.device("cpu"))


def test_why_names_the_reason():
    assert "emulated" in hardware.why(RTX_2060) and hardware.why(RTX_2060).startswith("fp16")
    assert hardware.why(RTX_3060).startswith("bf16 (native at compute capability 8.6)")
    assert hardware.why(AVX2_CPU).startswith("fp32")
