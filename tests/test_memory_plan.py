"""The memory planner's decisions on sizes alone: budgets, weights options, refusals, headers."""

from __future__ import annotations

import pytest

from workbench.pipeline.memory_plan import DeviceInfo, plan_memory
from workbench.pipeline.sizes import (GB, MB, ComponentSize, activation_bytes, choose_resident,
                                      component_sizes_from_header)
from workbench.errors import UnsupportedError, WorkbenchError

H100 = DeviceInfo("cuda", "H100", 80 * GB, 79 * GB, bf16=True, fp8_matmul=True)
CARD = DeviceInfo("cuda", "12 GB card", 12_884_901_888, 12_500_000_000, bf16=True, fp8_matmul=True)
CPU = DeviceInfo("cpu", "cpu", bf16=False)  # an AVX2 CPU: bf16 only emulated


def flux_sizes(file_dtype: str = "BF16") -> list[ComponentSize]:
    """FLUX.1-dev proportions: 19 double blocks of ~339M and 38 single blocks of ~141.5M params."""
    blocks = tuple([339_000_000] * 19 + [141_500_000] * 38)
    return [ComponentSize("transformer", 11_901_408_320, 11_850_000_000, 11_850_000_000, blocks,
                          66_060_288, file_dtype),
            ComponentSize("text_encoder", 123_060_480, 85_000_000, 85_000_000, (7_000_000,) * 12, 2_400_000),
            ComponentSize("text_encoder_2", 4_762_310_656, 4_630_000_000, 4_630_000_000,
                          (192_900_000,) * 24, 41_943_040),
            ComponentSize("vae", 83_819_683, 83_000_000, 0, (), 2_400_000)]


@pytest.fixture(scope="module")
def sdxl_sizes():
    """Real SDXL sizes from a header built from the real layout (no tensor data)."""
    from workbench.formats.safetensors_io import SafetensorsHeader, TensorInfo
    from workbench.testing.full_size import real_layout

    tensors, offset = {}, 0
    for key, (dtype, shape) in real_layout("sdxl").items():
        n = 1
        for d in shape:
            n *= d
        size = n * (2 if dtype.is_floating_point else 8)
        tensors[key] = TensorInfo("F16" if dtype.is_floating_point else "I64", shape, offset, offset + size)
        offset += size
    from pathlib import Path

    return component_sizes_from_header(SafetensorsHeader(Path("sdxl_base.safetensors"), tensors))


def _fits(plan) -> None:
    for stage, peak in plan.stage_peaks.items():
        assert peak <= plan.budget_bytes, (stage, peak, plan.budget_bytes)


def test_flux_unlimited_is_all_resident_bf16():
    plan = plan_memory(flux_sizes(), device=H100, arch="flux", ram_free_bytes=64 * GB)
    assert plan.compute_dtype == "bf16"
    assert {d.placement for d in plan.decisions} == {"resident"}
    assert plan.decision("transformer").storage == "bf16"
    assert plan.decision("transformer").total_bytes == pytest.approx(23.8 * GB, rel=0.01)
    assert plan.ram_bytes == 0


def test_flux_at_12gb_offloads_text_encoders_then_fp8_then_streams():
    plan = plan_memory(flux_sizes(), device=CARD, arch="flux", vram_budget_mb=12000, ram_free_bytes=64 * GB)
    tr = plan.decision("transformer")
    assert plan.decision("text_encoder_2").placement == "offload"
    assert plan.decision("text_encoder_2").storage == "bf16"        # room after the evict: kept bf16
    assert tr.storage == "fp8_e4m3fn" and tr.placement == "partial"
    assert 0 < tr.resident_blocks < tr.blocks == 57
    assert tr.gpu_bytes + tr.streamed_bytes == tr.total_bytes
    assert tr.gpu_bytes > 0.6 * tr.total_bytes                      # most of it stays resident
    assert plan.budget_bytes == 12000 * MB
    _fits(plan)
    text = plan.render()
    assert "partial" in text and "text_encoder_2" in text and "fp8_e4m3fn" in text


def test_flux_at_12gb_nf4_is_resident():
    plan = plan_memory(flux_sizes(), device=CARD, arch="flux", vram_budget_mb=12000, weights="nf4")
    tr = plan.decision("transformer")
    assert (tr.storage, tr.placement) == ("nf4", "resident")
    assert tr.total_bytes < 7 * GB
    _fits(plan)


def test_flux_fp16_forced_is_streamed_not_fp8():
    plan = plan_memory(flux_sizes(), device=CARD, arch="flux", vram_budget_mb=12000, weights="bf16")
    assert plan.decision("transformer").storage == "bf16"
    assert plan.decision("transformer").placement == "partial"
    _fits(plan)


def test_sdxl_budgets(sdxl_sizes):
    names = [s.name for s in sdxl_sizes]
    assert names == ["unet", "text_encoder", "text_encoder_2", "vae"]
    unet = sdxl_sizes[0]
    assert unet.params == 2_567_463_684 and len(unet.blocks) == 9 + 1 + 9
    big = plan_memory(sdxl_sizes, device=H100, arch="sdxl")
    assert {d.placement for d in big.decisions} == {"resident"}
    assert big.compute_dtype == "fp16"
    at8 = plan_memory(sdxl_sizes, device=CARD, arch="sdxl", vram_budget_mb=8000)
    assert at8.decision("unet").placement == "resident" and at8.decision("unet").storage == "fp16"
    assert at8.decision("text_encoder_2").placement == "offload"
    at4 = plan_memory(sdxl_sizes, device=CARD, arch="sdxl", vram_budget_mb=4000)
    assert at4.decision("unet").storage == "fp8_e4m3fn"             # auto: fp8 before streaming
    _fits(at4)
    fp16 = plan_memory(sdxl_sizes, device=CARD, arch="sdxl", vram_budget_mb=4000, weights="fp16")
    u = fp16.decision("unet")
    assert (u.storage, u.placement) == ("fp16", "partial") and 0 < u.resident_blocks < u.blocks
    _fits(fp16)


def test_smaller_budget_keeps_fewer_blocks():
    counts = []
    for mb in (11000, 9000, 7000, 5000):
        plan = plan_memory(flux_sizes(), device=CARD, arch="flux", vram_budget_mb=mb)
        counts.append(plan.decision("transformer").resident_blocks)
        _fits(plan)
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]


def test_refuses_what_ram_cannot_hold():
    with pytest.raises(WorkbenchError, match=r"transformer .* RAM free is 8\.0 GB"):
        plan_memory(flux_sizes(), device=CARD, arch="flux", vram_budget_mb=12000, ram_free_bytes=8 * GB)


def test_ram_shortage_turns_waiting_weights_fp8_first():
    roomy = plan_memory(flux_sizes(), device=CARD, arch="flux", vram_budget_mb=12000, ram_free_bytes=64 * GB)
    tight = plan_memory(flux_sizes(), device=CARD, arch="flux", vram_budget_mb=12000,
                        ram_free_bytes=roomy.ram_bytes)  # less than need + reserve
    assert tight.decision("text_encoder_2").storage == "fp8_e4m3fn"
    assert tight.ram_bytes + 2 * GB <= roomy.ram_bytes


def test_refuses_a_budget_nothing_fits_in():
    with pytest.raises(WorkbenchError, match="stage needs .* of VRAM but the budget is 1.0 GB: flux "):
        plan_memory(flux_sizes(), device=CARD, arch="flux", vram_budget_mb=1000)


def test_fp8_file_is_kept_fp8_even_when_bf16_would_fit():
    plan = plan_memory(flux_sizes("F8_E4M3"), device=H100, arch="flux")
    assert plan.decision("transformer").storage == "fp8_e4m3fn"
    assert "kept as is" in plan.decision("transformer").reason
    assert plan.decision("text_encoder_2").storage == "bf16"


def test_cpu_plans_fp32_in_ram_and_nf4_only_where_bitsandbytes_can(monkeypatch):
    from workbench.pipeline import precision

    plan = plan_memory(flux_sizes(), device=CPU, arch="flux", ram_free_bytes=128 * GB)
    assert plan.compute_dtype == "fp32"
    assert {(d.placement, d.storage) for d in plan.decisions} == {("cpu", "fp32")}
    small = plan_memory(flux_sizes(), device=CPU, arch="flux", ram_free_bytes=40 * GB)
    assert small.decision("transformer").storage == "bf16"
    with pytest.raises(WorkbenchError, match="RAM free is 10.0 GB"):
        plan_memory(flux_sizes(), device=CPU, arch="flux", ram_free_bytes=10 * GB)
    monkeypatch.setattr(precision, "nf4_available", lambda device_type: True)
    nf4 = plan_memory(flux_sizes(), device=CPU, arch="flux", weights="nf4", ram_free_bytes=128 * GB)
    assert nf4.decision("transformer").storage == "nf4"          # the denoiser only
    assert {d.storage for d in nf4.decisions if d.name != "transformer"} == {"fp32"}
    assert nf4.decision("transformer").total_bytes < 0.3 * plan.decision("transformer").total_bytes
    monkeypatch.setattr(precision, "nf4_available", lambda device_type: False)
    with pytest.raises(UnsupportedError, match="cannot quantize on cpu.*bitsandbytes >= 0.48"):
        plan_memory(flux_sizes(), device=CPU, arch="flux", weights="nf4")


def test_cpu_with_native_bf16_computes_in_bf16_under_auto():
    """AVX512-BF16/AMX CPUs run bf16 in hardware (about half an fp32 step); others emulate it
    (about 5x slower), so `auto` follows the probed capability and `fp32` always wins when asked."""
    native = DeviceInfo(kind="cpu", name="cpu (AMX)", bf16=True)
    plan = plan_memory(flux_sizes(), device=native, arch="flux", ram_free_bytes=128 * GB)
    assert plan.compute_dtype == "bf16"
    assert {d.storage for d in plan.decisions} == {"bf16"}
    asked = plan_memory(flux_sizes(), device=native, arch="flux", weights="fp32")
    assert asked.compute_dtype == "fp32"


def test_choose_resident_spreads_within_budget():
    blocks = [10] * 10
    keep = choose_resident(blocks, 50)
    assert sum(keep) == 5 and keep != [True] * 5 + [False] * 5       # interleaved
    assert all(not (a and b and c) for a, b, c in zip(keep, keep[1:], keep[2:]))
    assert choose_resident(blocks, 0) == [False] * 10
    assert choose_resident(blocks, 1000) == [True] * 10
    mixed = [30, 5, 5, 30, 5, 5]
    assert sum(b for b, k in zip(mixed, choose_resident(mixed, 40)) if k) <= 40


def test_activation_estimate_grows_with_pixels_and_cfg():
    assert activation_bytes("sdxl", 1024, 1024) > 3 * activation_bytes("sdxl", 512, 512) - 1 * GB
    assert activation_bytes("sdxl", 1024, 1024, batch=2) > activation_bytes("sdxl", 1024, 1024)
    assert 0.3 * GB < activation_bytes("flux", 1024, 1024) < 2 * GB


@pytest.mark.slow
def test_sizes_from_tiny_flux_header_match_the_loaded_pipeline(tiny_model):
    import torch

    from workbench.pipeline.load import load_pipeline
    from workbench.pipeline.sizes import component_sizes_from_pipeline

    path = tiny_model("flux")
    from_header = {s.name: s for s in component_sizes_from_header(path)}
    assert set(from_header) == {"transformer", "text_encoder", "text_encoder_2", "vae"}
    assert not any(s.estimated for s in from_header.values())
    assert len(from_header["transformer"].blocks) == 19 + 38
    pipe = load_pipeline(path, "flux", torch_dtype=torch.bfloat16)
    loaded = {s.name: s for s in component_sizes_from_pipeline(pipe)}
    assert loaded["transformer"].params == from_header["transformer"].params
    assert loaded["vae"].params == from_header["vae"].params


def test_transformer_only_file_assumes_standard_text_encoders(tmp_path):
    from workbench.testing.flux import build_transformer

    path = build_transformer(tmp_path / "flux1-dev.safetensors")
    sizes = {s.name: s for s in component_sizes_from_header(path, "flux")}
    assert not sizes["transformer"].estimated
    assert sizes["text_encoder_2"].estimated and sizes["text_encoder_2"].params == 4_762_310_656
    plan = plan_memory(list(sizes.values()), device=CARD, arch="flux", vram_budget_mb=12000)
    assert "assumed size" in plan.render()
