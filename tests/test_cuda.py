"""What only a CUDA GPU can show: prefetch on a side stream, NF4 on the GPU, peak memory vs the plan.

The CPU tests (test_streaming.py, test_precision.py) run the same code with onload device "cpu",
where there are no streams, no pinned memory and no allocator to measure. Here the tiny real-layout
FLUX model runs on the GPU. Run with `pytest -m cuda` on a machine with a CUDA GPU; without one
every test here is skipped.
"""

from __future__ import annotations

import copy

import pytest
import torch

from helpers.denoiser_inputs import flux_inputs

from workbench.pipeline import streaming
from workbench.pipeline.memory_plan import plan_memory, probe_device
from workbench.pipeline.precision import apply_storage, castable_layers, nf4_available, stored_bytes
from workbench.pipeline.sizes import MB, component_sizes_from_pipeline, module_size
from workbench.pipeline.streaming import ComponentStreamer, apply_plan

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.slow,  # loads a tiny FLUX pipeline: several seconds even on a GPU
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CUDA = torch.device("cuda")
NO_WORK = {"encode": 0, "denoise": 0, "decode": 0}
# The caching allocator rounds every tensor up to a multiple of 512 bytes; the planner counts exact
# bytes. On a tiny model with hundreds of small tensors that rounding is a visible share.
ROUNDING = 512


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _rounding(*modules: torch.nn.Module) -> int:
    """Bytes the allocator adds to the modules' tensors by rounding each up to 512 bytes."""
    sizes = [t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()]]
    return sum(-n % ROUNDING for n in sizes)


def _on_cuda(inputs: dict) -> dict:
    return {k: v.to(CUDA) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


@pytest.fixture(scope="module")
def flux_file(tmp_path_factory):
    from workbench.testing import build_tiny

    return build_tiny("flux", tmp_path_factory.mktemp("cuda") / "flux.safetensors")


@pytest.fixture(scope="module")
def flux_pipe(flux_file):
    """Loaded once on the CPU in fp32; tests take deep copies of what they change."""
    from workbench.pipeline.load import load_pipeline

    return load_pipeline(flux_file, "flux", torch_dtype=torch.float32)


def test_streamed_output_equals_resident_output_with_prefetch_on_a_side_stream(flux_pipe,
                                                                                monkeypatch):
    """The copy of the next streamed block runs on a side stream while the compute stream works;
    a missing wait (or a block's memory reused while a kernel still reads it) changes the output."""
    inputs = _on_cuda(flux_inputs(flux_pipe.transformer, seed=3))
    resident = copy.deepcopy(flux_pipe.transformer).to(CUDA)
    with torch.no_grad():
        ref = resident(**inputs)[0]
    del resident
    torch.cuda.synchronize()
    torch.cuda.empty_cache()

    model = copy.deepcopy(flux_pipe.transformer)  # on the CPU, as apply_plan receives it
    size = module_size("transformer", model)
    plan = plan_memory([size], device=probe_device("cuda"), arch="flux", weights="fp32",
                       vram_budget_mb=0.5 * size.bytes_at("fp32") / MB, work_bytes=NO_WORK)
    d = plan.decision("transformer")
    assert d.placement == "partial" and 0 < d.resident_blocks < d.blocks

    copies = []  # (streamed on a side stream?) for every copy of a streamed block
    original_copy = streaming._Group.copy

    def recording_copy(group, device, stream=None):
        copies.append(stream is not None)
        return original_copy(group, device, stream)

    before = torch.cuda.memory_allocated()
    streamer = ComponentStreamer(model, CUDA, d.gpu_bytes, size=size, storage="fp32")
    placed = torch.cuda.memory_allocated() - before
    # only the resident part went to the GPU; the streamed blocks wait in pinned host memory
    assert placed <= d.gpu_bytes + _rounding(model)
    assert placed < 0.75 * size.bytes_at("fp32")
    assert streamer.side is not None
    unit = model.get_submodule(streamer.streamed[len(streamer.streamed) // 2])
    weight = next(unit.parameters())
    assert weight.device.type == "cpu" and weight.is_pinned()
    seen = []
    probe = unit.register_forward_pre_hook(lambda m, a: seen.append(next(m.parameters()).device))
    monkeypatch.setattr(streaming._Group, "copy", recording_copy)
    try:
        with torch.no_grad():
            first = model(**inputs)[0]                   # traces the order of the streamed blocks
            copies_first = list(copies)
            second = model(**inputs)[0]                  # prefetches along it on the side stream
            third = model(**inputs)[0]
        torch.cuda.synchronize()
    finally:
        probe.remove()
        streamer.remove()
    assert copies_first and not any(copies_first)          # first call: copies on the compute stream
    assert sum(copies[len(copies_first):]) >= len(streamer.streamed)  # later: prefetched on the side
    assert [dev.type for dev in seen] == ["cuda"] * 3       # the block ran on its GPU copy
    assert weight.device.type == "cpu"                     # and was swapped back afterwards
    for out in (first, second, third):
        assert torch.equal(out, ref), f"max |diff| {(out - ref).abs().max().item():.3g}"


@pytest.mark.skipif(torch.cuda.is_available() and not nf4_available("cuda"),
                    reason="the installed bitsandbytes cannot quantize NF4 on this GPU")
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_nf4_on_cuda_is_close_and_stores_a_fraction(flux_pipe, compute):
    import bitsandbytes as bnb

    model = copy.deepcopy(flux_pipe.transformer).to(CUDA, dtype=compute)
    inputs = _on_cuda(flux_inputs(model, seed=2))
    inputs = {k: v.to(compute) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in inputs.items()}
    linear = sum(layer.weight.numel() for _, layer in castable_layers(model)
                 if isinstance(layer, torch.nn.Linear))
    with torch.no_grad():
        ref = model(**inputs)[0]
        before_bytes, before_alloc = stored_bytes(model), torch.cuda.memory_allocated()
        handle = apply_storage(model, "nf4", compute, device=CUDA)
        torch.cuda.synchronize()
        assert handle.layers and all(isinstance(q, bnb.nn.Linear4bit) for q in handle.layers)
        assert all(q.weight.bnb_quantized and q.weight.device.type == "cuda" for q in handle.layers)
        # 4 bits a weight plus small per-block statistics, instead of 16 or 32 bits
        saved = before_bytes - stored_bytes(model)
        assert saved > 0.7 * linear * (torch.finfo(compute).bits / 8 - 0.5)
        assert before_alloc - torch.cuda.memory_allocated() > 0.5 * saved  # freed on the GPU too
        out = model(**inputs)[0]
    assert out.dtype == ref.dtype and torch.isfinite(out).all()
    rel = _rel(out, ref)
    # close to the full-precision output, far closer than an unrelated output would be
    assert 0 < rel < 0.5 and rel < 0.6 * _rel(ref, ref.roll(1, dims=1))


def test_peak_memory_stays_within_the_planned_budget(flux_file):
    """Generate with text encoders offloaded and the transformer partly streamed, and compare the
    allocator's peak with the plan. The activations are measured first, on a resident run, and
    given to the planner (`work_bytes`), so what is checked is the planner's weight accounting
    (resident parts, offloaded components entering their stage, streaming buffers)."""
    from workbench.pipeline.load import load_pipeline

    pipe = load_pipeline(flux_file, "flux", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    components = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]

    def run():
        out = pipe("a cat", num_inference_steps=2, height=16, width=16, guidance_scale=3.5,
                   generator=torch.Generator().manual_seed(0), output_type="pt",
                   max_sequence_length=8)
        torch.cuda.synchronize()
        return out.images

    pipe.to(CUDA)
    run()  # warm-up: cuBLAS workspaces and other one-time allocations stay allocated after it
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ref = run()
    work = torch.cuda.max_memory_allocated() - base  # everything but the (already placed) weights
    pipe.to("cpu")
    torch.cuda.empty_cache()

    sizes = component_sizes_from_pipeline(pipe)
    by = {s.name: s for s in sizes}
    t = by["transformer"]
    # room for the transformer's rest and a third of its blocks beside the work: the text
    # encoders must wait in RAM and most blocks be streamed
    budget = work + t.rest_bytes("fp32") + sum(t.block_bytes("fp32")) // 3
    plan = plan_memory(sizes, device=probe_device("cuda"), arch="flux", weights="fp32",
                       vram_budget_mb=budget / MB, width=16, height=16,
                       work_bytes={"encode": work, "denoise": work, "decode": work})
    assert plan.decision("transformer").placement == "partial"
    assert plan.decision("text_encoder_2").placement in ("offload", "partial")
    planned_peak = max(plan.stage_peaks.values())
    assert planned_peak <= plan.budget_bytes

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    applied = apply_plan(pipe, plan, CUDA)
    try:
        images = run()
        peak = torch.cuda.max_memory_allocated() - base
    finally:
        applied.remove()
    slack = _rounding(*components)
    assert peak <= planned_peak + slack, (
        f"measured peak {peak / MB:.1f} MB > planned {planned_peak / MB:.1f} MB "
        f"(+{slack / MB:.2f} MB rounding); stage peaks {plan.stage_peaks}")
    assert peak <= plan.budget_bytes + slack
    torch.testing.assert_close(images.cpu(), ref.cpu(), rtol=1e-4, atol=1e-4)
