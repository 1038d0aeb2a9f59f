"""fp8 storage with per-layer upcast on tiny real-layout models (CPU), fp8 files kept exact, NF4 gating."""

from __future__ import annotations

import pytest
import torch

from helpers.denoiser_inputs import flux_inputs

from workbench.pipeline.precision import (apply_storage, castable_layers, file_fp8_storage, nf4_available,
                                      storage_dtype, stored_bytes)
from workbench.errors import UnsupportedError


@pytest.fixture(scope="module")
def flux_pipe(tmp_path_factory):
    from workbench.pipeline.load import load_pipeline
    from workbench.testing import build_tiny

    path = build_tiny("flux", tmp_path_factory.mktemp("prec") / "flux.safetensors")
    return load_pipeline(path, "flux", torch_dtype=torch.float32)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("storage,tol", [("fp8_e4m3fn", 0.2), ("fp8_e5m2", 0.3), ("bf16", 0.02)])
def test_low_precision_storage_output_is_close_and_hooks_come_off(flux_pipe, storage, tol):
    model = flux_pipe.transformer
    inputs = flux_inputs(model)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    before = stored_bytes(model)
    with torch.no_grad():
        ref = model(**inputs)[0]
        handle = apply_storage(model, storage, torch.float32)
        try:
            dtype = storage_dtype(storage)
            assert all(layer.weight.dtype == dtype for layer in handle.layers)
            assert len(handle.layers) > 100
            first = next(n for n, _ in model.named_parameters()).rpartition(".")[0]
            assert model.get_submodule(first).weight.dtype == torch.float32  # model.dtype reads it
            assert model.proj_out.weight.dtype == torch.float32        # top-level output layer
            assert model.dtype == torch.float32                        # so inputs are not cast to fp8
            assert stored_bytes(model) < (0.5 if dtype.itemsize == 1 else 0.7) * before
            out = model(**inputs)[0]
            assert out.dtype == torch.float32
            assert all(layer.weight.dtype == dtype for layer in handle.layers)  # upcast copy dropped
        finally:
            handle.remove()
        hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
        model.load_state_dict(saved)
    assert hooks == 0
    rel = _rel(out, ref)
    assert rel < tol and (rel > 0) == storage.startswith("fp8")  # the tiny file is bf16-exact
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 1 - tol / 4
    # much closer than another model: the comparison could fail
    assert rel < 0.3 * _rel(ref, ref.roll(1, dims=1))


def test_fp8_is_closer_to_fp32_than_a_weight_perturbation_of_the_same_size(flux_pipe):
    """e4m3fn rounding (3 mantissa bits) must act like noise of <=~4% per weight, not like a bug."""
    model = flux_pipe.transformer
    inputs = flux_inputs(model, seed=1)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(**inputs)[0]
        handle = apply_storage(model, "fp8_e4m3fn", torch.float32)
        fp8 = model(**inputs)[0]
        handle.remove()
        model.load_state_dict(saved)
        g = torch.Generator().manual_seed(3)
        for _, layer in castable_layers(model):
            w = layer.weight
            w.mul_(1 + 0.08 * torch.randn(w.shape, generator=g))
        noisy = model(**inputs)[0]
        model.load_state_dict(saved)
    assert _rel(fp8, ref) < _rel(noisy, ref)


def test_t5_keeps_wo_and_runs_in_fp8(flux_pipe):
    t5 = flux_pipe.text_encoder_2
    names = [n for n, _ in castable_layers(t5)]
    assert names and not any(n.endswith(".wo") for n in names)
    assert any(n.endswith(".wi_0") or n.endswith(".wi") or n.endswith(".q") for n in names)
    ids = torch.arange(1, 9).unsqueeze(0)
    saved = {k: v.clone() for k, v in t5.state_dict().items()}
    with torch.no_grad():
        ref = t5(ids)[0]
        handle = apply_storage(t5, "fp8_e4m3fn", torch.float32)
        out = t5(ids)[0]
        handle.remove()
        t5.load_state_dict(saved)
    # a random tiny T5 (unscaled attention logits) is far more sensitive than a trained one
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and cos > 0.8


def test_fp8_file_values_survive_16_bit_loading_bit_exactly(tmp_path):
    """An fp8 file loaded through bf16/fp16 and stored back in its own fp8 format is unchanged."""
    from safetensors.torch import save_file

    from workbench.formats.safetensors_io import read_header

    g = torch.Generator().manual_seed(0)
    for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        w8 = (torch.randn(64, 32, generator=g) * 3).to(fp8)
        for via in (torch.float16, torch.bfloat16):
            layer = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(32, 64))
            layer[1].weight.data = w8.to(via)                      # what a 16-bit loader gives
            name = "fp8_e4m3fn" if fp8 == torch.float8_e4m3fn else "fp8_e5m2"
            handle = apply_storage(layer, name, via)
            assert layer[1].weight.dtype == fp8
            assert torch.equal(layer[1].weight.view(torch.uint8), w8.view(torch.uint8))
            handle.remove()
        path = tmp_path / f"{fp8}.safetensors".replace("torch.", "")
        save_file({"a.weight": w8, "a.bias": torch.zeros(64, dtype=torch.bfloat16)}, str(path))
        assert file_fp8_storage(read_header(path)) == ("fp8_e4m3fn" if fp8 == torch.float8_e4m3fn
                                                       else "fp8_e5m2")
    save_file({"a.weight": torch.zeros(8, 8, dtype=torch.float16)}, str(tmp_path / "f16.safetensors"))
    assert file_fp8_storage(read_header(tmp_path / "f16.safetensors")) is None


def test_fp8_storage_scales_each_layer_so_small_weights_keep_their_bits():
    """Weights of real-model size (~0.01) sit below e4m3fn's smallest normal (2^-6) when rounded
    straight to fp8; one scale per layer keeps their mantissa bits (ComfyUI's scaled-fp8 scheme)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 256, generator=g) * 0.01
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(256, 256))
    model[1].weight.data = w.clone()
    x = torch.randn(8, 256, generator=g)
    with torch.no_grad():
        ref = model[1](x)
        plain = torch.nn.functional.linear(x, w.to(torch.float8_e4m3fn).float(), model[1].bias)
        handle = apply_storage(model, "fp8_e4m3fn", torch.float32)
        assert model[1].weight.dtype == torch.float8_e4m3fn
        assert model[1].fp8_scale == pytest.approx(float(w.abs().max()) / 448)
        out = model[1](x)
        handle.remove()
    assert model[1].weight.dtype == torch.float32 and "fp8_scale" not in model[1].__dict__
    assert _rel(out, ref) < 0.5 * _rel(plain, ref)
    assert _rel(model[1].weight.detach(), w) < 0.05  # taken back off: the weight, not the fp8 values


def test_nf4_needs_a_device_and_a_capable_bitsandbytes(monkeypatch):
    from workbench.pipeline import precision

    layer = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with pytest.raises(UnsupportedError, match="needs a device"):
        apply_storage(layer, "nf4", torch.float16)
    monkeypatch.setattr(precision, "nf4_available", lambda device_type: False)
    with pytest.raises(UnsupportedError, match="cannot quantize on cpu"):
        apply_storage(layer, "nf4", torch.float16, device="cpu")
    monkeypatch.setattr(precision, "bitsandbytes", lambda: (_ for _ in ()).throw(
        UnsupportedError("weights nf4 needs bitsandbytes, which is not installed: pip install bitsandbytes")))
    with pytest.raises(UnsupportedError, match="pip install bitsandbytes"):
        apply_storage(layer, "nf4", torch.float16, device="cpu")
    assert layer[1].weight.dtype == torch.float32                   # nothing changed


@pytest.mark.slow
@pytest.mark.skipif(not nf4_available("cpu"), reason="bitsandbytes with a CPU backend is not installed")
def test_nf4_storage_on_the_cpu_is_close_and_a_quarter_of_fp16(flux_pipe):
    """bitsandbytes >= 0.48 quantizes on the CPU too, so the NF4 path runs here as on a GPU."""
    import copy

    import bitsandbytes as bnb

    model = copy.deepcopy(flux_pipe.transformer)
    inputs = flux_inputs(model, seed=2)
    with torch.no_grad():
        ref = model(**inputs)[0]
        castable = sum(layer.weight.numel() for _, layer in castable_layers(model)
                       if isinstance(layer, torch.nn.Linear))
        before = stored_bytes(model)
        handle = apply_storage(model, "nf4", torch.float32, device="cpu")
        assert handle.layers and all(isinstance(q, bnb.nn.Linear4bit) for q in handle.layers)
        assert all(q.weight.bnb_quantized for q in handle.layers)
        # 4 bits a weight plus one absmax per 64: the Linear weights shrink about 7x from fp32
        assert before - stored_bytes(model) > 0.8 * castable * 4
        out = model(**inputs)[0]
    rel = _rel(out, ref)
    assert 0 < rel < 0.5 and rel < 0.6 * _rel(ref, ref.roll(1, dims=1))
