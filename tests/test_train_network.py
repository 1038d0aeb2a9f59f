"""Adapter planning and peft injection on tiny real-layout models (CPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers.denoiser_inputs import denoiser_inputs
from helpers.kohya_keys import KOHYA_MODULES, KOHYA_SD3

from workbench.errors import UnsupportedError, RecipeError
from workbench.formats.safetensors_io import read_header
from workbench.train.network import inject, plan_network, quantize_base



@pytest.fixture(scope="module")
def pipes(tiny_model):
    from workbench.pipeline.load import load_pipeline

    cache = {}

    def get(arch):
        if arch not in cache:
            path = tiny_model(arch)
            cache[arch] = (path, load_pipeline(path, arch, torch.float32))
        path, pipe = cache[arch]
        return path, copy.deepcopy(pipe)

    return get


def _shapes(path):
    return read_header(path).shapes()


@pytest.mark.parametrize("arch, te", [("sd15", True), ("sdxl", True), ("flux", False)])
def test_module_names_are_kohyas(tiny_model, arch, te):
    golden = set(KOHYA_MODULES[arch])
    plan = plan_network(arch, _shapes(tiny_model(arch)), rank=16, alpha=8, train_text_encoder=te)
    names = set(plan.modules)
    assert names <= golden, sorted(names - golden)[:5]
    if arch == "flux":  # golden FLUX list includes CLIP-L/T5 modules we do not train
        assert names == {n for n in golden if n.startswith("lora_unet_")}
    else:
        assert names == golden  # the tiny models have the real block structure


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["sd3.5-medium", "sd3.5-large"])
def test_sd3_module_names_and_shapes_are_kohyas(tiny_sd3, variant):
    """The SD3.5 modules are exactly those kohya's lora_sd3 makes (golden list from its own code),
    and every factor has kohya's shape relative to the model width (tiny: 32, real: 64 x depth)."""
    from workbench.testing.sd3 import TRANSFORMER

    golden = KOHYA_SD3[variant]
    plan = plan_network("sd3", _shapes(tiny_sd3(variant)), rank=16, alpha=8)
    assert set(plan.modules) == set(golden["modules"])
    tiny_w = TRANSFORMER["num_attention_heads"] * TRANSFORMER["attention_head_dim"]
    for name, ((rank, d_in), (d_out, _)) in golden["modules"].items():
        m = plan.modules[name]
        assert (m.rank, m.alpha, m.component) == (rank, 8.0, "transformer")
        out, inp = m.target.delta_shape
        assert (out * golden["hidden_size"], inp * golden["hidden_size"]) == (d_out * tiny_w, d_in * tiny_w), name
    dual = any("attn2" in n for n in plan.modules)
    assert dual == (variant == "sd3.5-medium")


def test_blocks_select_only_those_blocks(tiny_model):
    plan = plan_network("sdxl", _shapes(tiny_model("sdxl")), blocks=["M00"])
    assert plan.modules and all(n.startswith("lora_unet_middle_block_") for n in plan.modules)
    flux = plan_network("flux", _shapes(tiny_model("flux")), blocks=["S00"])
    assert set(flux.modules) == {"lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_0_linear2",
                                 "lora_unet_single_blocks_0_modulation_lin"}


def test_refusals(tiny_model):
    with pytest.raises(UnsupportedError, match="lokr"):
        plan_network("flux", _shapes(tiny_model("flux")), type="lokr")
    with pytest.raises(RecipeError, match="train_text_encoder"):
        plan_network("flux", _shapes(tiny_model("flux")), train_text_encoder=True)
    with pytest.raises(RecipeError, match="network.type"):
        plan_network("sd15", _shapes(tiny_model("sd15")), type="ia3")
    with pytest.raises(UnsupportedError, match="lokr.*SD3"):
        plan_network("sd3", _shapes(tiny_model("sd3")), type="lokr")
    with pytest.raises(RecipeError, match="train_text_encoder"):
        plan_network("sd3", _shapes(tiny_model("sd3")), train_text_encoder=True)


@pytest.mark.parametrize("arch, kind", [("sd15", "lora"), ("sd15", "loha"), ("sdxl", "dora"),
                                        ("flux", "lora"), ("flux", "loha"), ("sd3", "dora")])
@pytest.mark.slow
def test_inject_counts_freezes_and_starts_at_base(pipes, arch, kind):
    path, pipe = pipes(arch)
    den = "unet" if arch in ("sd15", "sdxl") else "transformer"
    ref = copy.deepcopy(getattr(pipe, den))
    plan = plan_network(arch, _shapes(path), type=kind, rank=4, alpha=2,
                        train_text_encoder=arch in ("sd15", "sdxl"), conv_rank=2 if arch == "sd15" else None)
    net = inject(pipe, plan)
    trainable = net.named_trainable()
    assert sum(p.numel() for p in trainable.values()) == plan.n_params()
    assert all(p.dtype == torch.float32 for p in trainable.values())
    model = getattr(pipe, den)
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and "base_layer" in n]
    assert not frozen
    # a fresh adapter is the identity: same output as the base model
    torch.manual_seed(0)
    kw = denoiser_inputs(arch, model)
    with torch.no_grad():
        assert torch.allclose(model(**kw)[0], ref(**kw)[0], atol=1e-5)


@pytest.mark.slow
def test_fused_flux_modules_share_the_input_factor(pipes):
    path, pipe = pipes("flux")
    net = inject(pipe, plan_network("flux", _shapes(path), rank=4, alpha=4))
    paths = net.paths["lora_unet_single_blocks_0_linear1"]
    assert [p.rsplit(".", 1)[-1] for p in paths] == ["to_q", "to_k", "to_v", "proj_mlp"]
    downs = {id(net.layer("transformer", p).lora_A["default"].weight) for p in paths}
    ups = {id(net.layer("transformer", p).lora_B["default"].weight) for p in paths}
    assert len(downs) == 1 and len(ups) == 4


@pytest.mark.slow
def test_sd3_fused_qkv_shares_the_input_factor_and_swapped_adaln_exports_back(pipes):
    """kohya's fused `attn_qkv` = diffusers to_q/to_k/to_v with one lora_down; the last block's
    context adaLN lives in diffusers' norm1_context.linear with its row halves swapped, so its
    exported lora_up is the adapter's lora_B with the halves swapped back (the ΔW of the SAI key)."""
    from workbench.train.export import kohya_state_dict

    path, pipe = pipes("sd3")
    net = inject(pipe, plan_network("sd3", _shapes(path), rank=4, alpha=4))
    paths = net.paths["lora_unet_joint_blocks_0_context_block_attn_qkv"]
    assert [p.rsplit(".", 1)[-1] for p in paths] == ["add_q_proj", "add_k_proj", "add_v_proj"]
    downs = {id(net.layer("transformer", p).lora_A["default"].weight) for p in paths}
    assert len(downs) == 1
    assert net.paths["lora_unet_joint_blocks_0_x_block_attn2_qkv"][0].endswith("attn2.to_q")
    last = "lora_unet_joint_blocks_23_context_block_adaLN_modulation_1"
    assert net.paths[last] == ["transformer_blocks.23.norm1_context.linear"]
    layer = net.layer("transformer", net.paths[last][0])
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(torch.arange(layer.lora_B["default"].weight.numel(),
                                                          dtype=torch.float32).view_as(layer.lora_B["default"].weight))
    up = kohya_state_dict(net, "fp32")[f"{last}.lora_up.weight"]
    b = layer.lora_B["default"].weight
    n = b.shape[0] // 2
    assert torch.equal(up, torch.cat([b[n:], b[:n]]))


@pytest.mark.slow
def test_fp8_base_stores_fp8_and_trains_fp32(pipes):
    path, pipe = pipes("sd15")
    x = torch.randn(2, 32)
    lin = next(m for m in pipe.unet.modules() if type(m) is torch.nn.Linear and m.in_features == 32)
    want = lin(x).detach()
    from workbench.pipeline.precision import apply_storage

    # generation's fp8 storage of the same layer: a LoRA is previewed on the base it trained on
    preview = torch.nn.Sequential(torch.nn.Linear(1, 1), copy.deepcopy(lin))
    apply_storage(preview, "fp8_e4m3fn", torch.float32)
    n = quantize_base(pipe.unet, "fp8", torch.bfloat16)
    assert n > 0 and lin.weight.dtype == torch.float8_e4m3fn and lin.fp8_scale != 1.0
    got = lin(x).detach()
    assert not torch.equal(got, want) and torch.allclose(got, want, rtol=0.1, atol=0.1)
    assert torch.equal(lin.weight.view(torch.uint8), preview[1].weight.view(torch.uint8))
    assert torch.equal(got, preview[1](x).detach())
    net = inject(pipe, plan_network("sd15", _shapes(path), rank=2, alpha=1))
    assert all(p.dtype == torch.float32 for p in net.named_trainable().values())
    if not _has_bnb():
        with pytest.raises(UnsupportedError, match="pip install bitsandbytes"):
            quantize_base(copy.deepcopy(pipe.text_encoder), "nf4", torch.bfloat16)


def _has_bnb() -> bool:
    try:
        import bitsandbytes  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.skipif(not _has_bnb(), reason="bitsandbytes is not installed")
def test_nf4_base_quantizes_where_it_is_placed_and_trains(pipes):
    """bitsandbytes packs the weights when the model reaches its device (here its CPU backend);
    the LoRA on top still gets gradients."""
    import bitsandbytes as bnb

    from workbench.pipeline.precision import nf4_available

    if not nf4_available("cpu"):
        pytest.skip("this bitsandbytes has no CPU backend")
    path, pipe = pipes("sd15")
    te = copy.deepcopy(pipe.text_encoder)
    ids = torch.arange(1, 9).unsqueeze(0)
    with torch.no_grad():
        want = te(ids)[0]
    n = quantize_base(te, "nf4", torch.float32)
    te.to("cpu")
    layers = [m for m in te.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert n == len(layers) > 0 and all(q.weight.bnb_quantized for q in layers)
    with torch.no_grad():
        got = te(ids)[0]
    cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
    assert not torch.equal(got, want) and cos > 0.9
