"""Partial residency, streaming hooks and offload between stages, run on the CPU (onload = cpu)."""

from __future__ import annotations

import pytest
import torch

from helpers.denoiser_inputs import flux_inputs

from workbench.pipeline.memory_plan import DeviceInfo, plan_memory
from workbench.pipeline.sizes import GB, MB, component_sizes_from_pipeline, module_size, stream_units
from workbench.pipeline.streaming import ComponentStreamer, apply_plan

FAKE_GPU = DeviceInfo("cuda", "fake", 80 * GB, 80 * GB, bf16=True)
NO_WORK = {"encode": 0, "denoise": 0, "decode": 0}


@pytest.fixture(scope="module")
def flux_pipe(tmp_path_factory):
    from workbench.pipeline.load import load_pipeline
    from workbench.testing import build_tiny

    path = build_tiny("flux", tmp_path_factory.mktemp("stream") / "flux.safetensors")
    return load_pipeline(path, "flux", torch_dtype=torch.float32)


@pytest.fixture(scope="module")
def flux_ref(flux_pipe):
    inputs = flux_inputs(flux_pipe.transformer)
    with torch.no_grad():
        return inputs, flux_pipe.transformer(**inputs)[0]


def _hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())


def test_units_are_blocks_and_never_containers(flux_pipe):
    model = flux_pipe.transformer
    names = [n for n, _ in stream_units(model)]
    assert "transformer_blocks.0" in names and "single_transformer_blocks.37" in names
    assert "transformer_blocks" not in names and "single_transformer_blocks" not in names
    first = next(n for n, _ in model.named_parameters()).rpartition(".")[0]
    assert first not in names                                        # model.device reads it
    assert len(set(names)) == len(names)
    assert not any(a.startswith(b + ".") for a in names for b in names)  # no unit inside another
    size = module_size("transformer", model)
    assert size.params == sum(size.blocks) + size.rest_bytes("fp32") // 4


def test_streamer_keeps_the_planned_blocks_and_output_is_identical(flux_pipe, flux_ref):
    inputs, ref = flux_ref
    model = flux_pipe.transformer
    size = module_size("transformer", model)
    budget = 0.5 * size.bytes_at("fp32")
    plan = plan_memory([size], device=FAKE_GPU, arch="flux", weights="fp32",
                       vram_budget_mb=budget / MB, work_bytes=NO_WORK)
    d = plan.decision("transformer")
    assert d.placement == "partial" and 0 < d.resident_blocks < d.blocks
    streamer = ComponentStreamer(model, "cpu", d.gpu_bytes, size=size, storage="fp32")
    assert len(streamer.resident) == d.resident_blocks
    assert len(streamer.streamed) == d.blocks - d.resident_blocks
    unit = model.get_submodule(streamer.streamed[1])
    weight = next(unit.parameters())
    host_ptr = weight.data_ptr()
    seen = []
    probe = unit.register_forward_pre_hook(lambda m, a: seen.append(next(m.parameters()).data_ptr()))
    try:
        with torch.no_grad():
            first = model(**inputs)[0]                                # traces the order
            second = model(**inputs)[0]                               # prefetches along it
    finally:
        probe.remove()
    assert torch.equal(first, ref) and torch.equal(second, ref)
    assert len(seen) == 2 and host_ptr not in seen                   # ran on a fresh copy
    assert weight.data_ptr() == host_ptr                             # and was swapped back
    assert streamer.order is not None and len(streamer.order) == len(streamer.streamed)
    assert streamer.next                                              # prefetch chain known
    streamer.remove()
    assert _hooks(model) == 0
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], ref)


def test_fp8_storage_and_streaming_compose(flux_pipe, flux_ref):
    from workbench.pipeline.precision import apply_storage

    inputs, _ = flux_ref
    model = flux_pipe.transformer
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    handle = apply_storage(model, "fp8_e4m3fn", torch.float32)
    try:
        with torch.no_grad():
            fp8 = model(**inputs)[0]
            streamer = ComponentStreamer(model, "cpu", 0, storage="fp8_e4m3fn")  # stream everything
            assert streamer.resident == [] and streamer.streamed
            streamed = model(**inputs)[0]
            streamer.remove()
    finally:
        handle.remove()
        model.load_state_dict(saved)
    assert torch.equal(fp8, streamed)
    assert _hooks(model) == 0


@pytest.mark.slow
def test_apply_plan_runs_the_pipeline_identically_and_comes_off(flux_pipe):
    pipe = flux_pipe
    sizes = component_sizes_from_pipeline(pipe)
    by = {s.name: s for s in sizes}
    # room for the transformer's rest + a third of its blocks, not for the text encoders beside it
    budget = by["transformer"].rest_bytes("fp32") + sum(by["transformer"].block_bytes("fp32")) // 3
    plan = plan_memory(sizes, device=FAKE_GPU, arch="flux", weights="fp32", vram_budget_mb=budget / MB,
                       work_bytes=NO_WORK)
    assert plan.decision("transformer").placement == "partial"
    assert plan.decision("text_encoder_2").placement in ("offload", "partial")
    assert plan.decision("vae").placement == "offload"

    def run():
        out = pipe("a cat", num_inference_steps=2, height=16, width=16, guidance_scale=3.5,
                   generator=torch.Generator().manual_seed(0), output_type="pt", max_sequence_length=8)
        return out.images

    ref = run()
    applied = apply_plan(pipe, plan, "cpu")
    try:
        assert set(applied.storage) == set(plan.names)
        streamer = applied.streamers["transformer"]
        assert len(streamer.resident) == plan.decision("transformer").resident_blocks
        planned = run()
        assert applied.switch is not None and applied.switch.current == "vae"  # decode entered last
    finally:
        applied.remove()
    for name in plan.names:
        assert _hooks(getattr(pipe, name)) == 0, name
    assert torch.equal(planned, ref)
