"""LoHa, LoKr, DoRA and Tucker LoCon: the bake's formulas against peft's layers (and, where peft has
no such layer, against the published LyCORIS formula written out here independently), then end to
end on tiny real-layout models: export -> bake -> preview, all equal to the trained peft adapter.

lycoris-lora is not installed; the two references written here from LyCORIS' published formulas
(lycoris/functional/general.py at f49d30d6) are LoCon-Tucker's ΔW[o,i,k,l] = Σ_mn up[o,m] mid[m,n,k,l]
down[n,i] and the DoRA-on-LoHa decomposition W' = m ⊙ (W + ΔW) / ‖W + ΔW‖ (per output row).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from workbench.formats.lora_keys import Target
from workbench.merge import lora as ml
from workbench.merge import lora_math

sys.path.insert(0, str(Path(__file__).parent))
from helpers.denoiser_inputs import denoiser_inputs

# ------------------------------------------------------------------- the formulas on tiny layers

def _merge_delta(tensors: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """ΔW as the bake computes it for a module whose tensors are `tensors` (suffix -> tensor),
    through the same parsing helpers (type, rank, shape check) and `module_delta`."""
    suffixes = {s: s for s in tensors}
    kind = ml._kind("test", "m", suffixes)
    keys = {ml.ROLES[s][1]: s for s in tensors}
    shapes = {r: tuple(tensors[s].shape) for r, s in keys.items()}
    target = Target("w", tuple(weight.shape), "unet")
    ml._check_shapes("test", "m", kind, shapes, target)
    module = ml.LoraModule("m", kind, keys, shapes, None, target, ml._rank(kind, shapes))
    return ml.module_delta(module, tensors.__getitem__)


def _peft_layer(config, layer: torch.nn.Module, seed: int = 0):
    import peft

    model = peft.inject_adapter_in_model(config, torch.nn.Sequential(layer))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "base_layer" not in n and p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    state = {k[2:]: v.detach().clone() for k, v in peft.get_peft_model_state_dict(model).items()}
    return model[0], state


LAYERS = {"linear": lambda: torch.nn.Linear(16, 24), "conv": lambda: torch.nn.Conv2d(32, 64, 3)}


@pytest.mark.parametrize("layer,tucker", [("linear", False), ("conv", False), ("conv", True)])
def test_loha_delta_equals_peft(layer, tucker):
    """Tucker/CP (`hada_t1/t2`) exists for k×k convolutions only."""
    import peft

    lyr, sd = _peft_layer(peft.LoHaConfig(r=3, alpha=5.0, target_modules=["0"], init_weights=False,
                                          use_effective_conv2d=tucker), LAYERS[layer]())
    assert ("hada_t1" in sd) == tucker
    sd = {f".{k}": v for k, v in sd.items()}
    sd[".alpha"] = torch.tensor(5.0)
    got = _merge_delta(sd, lyr.base_layer.weight)
    want = lyr.get_delta_weight("default")
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
    assert want.abs().max() > 0.1


@pytest.mark.parametrize("layer,cfg", [
    ("linear", {"r": 2}),                                           # w1 full, w2 = w2_a @ w2_b
    ("linear", {"r": 16}),                                          # both sides full: scale 1
    ("linear", {"r": 2, "decompose_both": True, "decompose_factor": 4}),
    ("conv", {"r": 2}),                                             # w2_b is [r, in·k·k]
    ("conv", {"r": 2, "use_effective_conv2d": True}),               # Tucker lokr_t2
])
def test_lokr_delta_equals_peft(layer, cfg):
    """peft scales every LoKr by alpha/r; LyCORIS-convention loaders use alpha/r only when a side
    is factored (scale 1 otherwise), so a file from a both-full layer carries alpha/r in lokr_w1,
    as workbench/train/export.py writes it."""
    import peft

    lyr, sd = _peft_layer(peft.LoKrConfig(alpha=3.0, target_modules=["0"], init_weights=False, **cfg),
                          LAYERS[layer]())
    r = cfg["r"]
    factored = any(k.endswith(("_a", "_b")) for k in sd)
    if not factored:
        sd["lokr_w1"] = sd["lokr_w1"] * (3.0 / r)
    assert ("lokr_t2" in sd) == bool(cfg.get("use_effective_conv2d") and factored)
    sd = {f".{k}": v for k, v in sd.items()}
    sd[".alpha"] = torch.tensor(3.0)
    got = _merge_delta(sd, lyr.base_layer.weight)
    want = lyr.get_delta_weight("default")
    assert torch.allclose(got, want, atol=1e-5)
    assert want.abs().max() > 0.01


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_dora_merge_equals_peft(layer):
    """W' = m ⊙ (W + ΔW)/‖W + ΔW‖ per output row, as peft merges a DoRA layer (its conv magnitude
    is stored [1, out, 1, 1], still per output)."""
    import peft

    lyr, sd = _peft_layer(peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0"], use_dora=True,
                                          init_lora_weights=False), LAYERS[layer]())
    w = lyr.base_layer.weight.detach().clone()
    sd = {f".{k}": v for k, v in sd.items()}
    mag = sd.pop(".lora_magnitude_vector")
    with torch.no_grad():
        mag.mul_(1.1)  # a trained magnitude, not the initial ‖W‖
        lyr.lora_magnitude_vector["default"].weight.copy_(mag)
    sd[".alpha"] = torch.tensor(6.0)
    delta = _merge_delta(sd, w)
    axis = lora_math.dora_axis(tuple(mag.shape), w.shape[0], w.shape[1], peft=True)
    assert axis == "out"
    got = lora_math.dora_apply(w, delta, mag, axis)
    lyr.merge()
    want = lyr.base_layer.weight
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(want, w + delta, atol=1e-3)


def test_locon_tucker_and_per_input_dora_follow_the_published_formulas():
    g = torch.Generator().manual_seed(3)
    up, mid, down = (torch.randn(8, 2, 1, 1, generator=g), torch.randn(2, 2, 3, 3, generator=g),
                     torch.randn(2, 5, 1, 1, generator=g))
    w = torch.randn(8, 5, 3, 3, generator=g)
    ref = torch.zeros(8, 5, 3, 3)
    for o in range(8):
        for i in range(5):
            for m in range(2):
                for n in range(2):
                    ref[o, i] += up[o, m, 0, 0] * mid[m, n] * down[n, i, 0, 0]
    got = _merge_delta({".lora_up.weight": up, ".lora_mid.weight": mid, ".lora_down.weight": down,
                        ".alpha": torch.tensor(1.0)}, w)
    assert torch.allclose(got, ref * 0.5, atol=1e-5)  # alpha 1 / rank 2
    # LyCORIS wd_on_out=False (older files): magnitude [1, in, 1, 1], norm per input channel
    mag = torch.rand(1, 5, 1, 1, generator=g) + 0.5
    assert lora_math.dora_axis(tuple(mag.shape), 8, 5) == "in"
    merged = w + got
    col = torch.stack([merged[:, i].norm() for i in range(5)]).reshape(1, 5, 1, 1)
    assert torch.allclose(lora_math.dora_apply(w, got, mag, "in"), merged * mag / col, atol=1e-5)


# ------------------------------------------------------------ end to end on tiny checkpoints

def _denoise(pipe, arch):
    torch.manual_seed(1)
    m = pipe.transformer if arch == "flux" else pipe.unet
    with torch.no_grad():
        return m(**denoiser_inputs(arch, m))[0]


def _bake(tmp_path, base, lora, name, extra=""):
    from workbench.recipes import parse_recipe
    from workbench.dispatch import run_recipe

    body = (f"kind: merge\nname: b\nmodels:\n  A: {base}\n  L: {lora}\nsteps:\n"
            f"  - {{id: m, method: add_lora, inputs: [A, L]{extra}}}\noutput:\n  path: {tmp_path / name}\n"
            "  dtype: fp32\n")
    run_recipe(parse_recipe(body, tmp_path / f"{name}.yaml"), progress=False)
    return tmp_path / name


@pytest.mark.slow
@pytest.mark.parametrize("arch,kind", [("sd15", "loha"), ("sd15", "lokr"), ("sd15", "dora"),
                                       ("sdxl", "dora"), ("flux", "loha")])
def test_trained_variant_bakes_and_previews_like_peft(tmp_path, tiny_model, arch, kind):
    """Our export of a (random, as if trained) peft LoHa/LoKr/DoRA adapter, baked with add_lora and
    previewed at generation time, equals peft's own forward; at strength 0.5 preview = bake.
    SD1.5 includes the text encoder and ResNet convs (conv_rank), SDXL CLIP-G's fused in_proj rows,
    FLUX the fused qkv/linear1 rows."""
    from workbench.pipeline.generate import LoraUse, load_model
    from workbench.pipeline.load import load_pipeline
    from workbench.pipeline.loras import attached_loras
    from workbench.formats.safetensors_io import read_header
    from workbench.train.export import TrainFacts, save_kohya
    from workbench.train.network import inject, plan_network

    path = tiny_model(arch)
    clean = load_pipeline(path, arch, torch.float32)
    trained = copy.deepcopy(clean)
    plan = plan_network(arch, read_header(path).shapes(), type=kind, rank=4, alpha=2.0,
                        train_text_encoder=arch != "flux", conv_rank=2 if arch == "sd15" else None)
    net = inject(trained, plan)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.named_trainable().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    lora = tmp_path / f"{kind}.safetensors"
    save_kohya(net, lora, TrainFacts(kind, arch, path), dtype="fp32")
    want = _denoise(trained, arch)
    assert (want - _denoise(clean, arch)).abs().max() > 0.1
    baked = load_pipeline(_bake(tmp_path, path, lora, "b1.safetensors"), arch, torch.float32)
    assert torch.allclose(_denoise(baked, arch), want, atol=5e-5)
    if arch != "flux":
        with torch.no_grad():
            ids = torch.arange(10)[None]
            assert torch.allclose(baked.text_encoder(ids)[0], trained.text_encoder(ids)[0], atol=5e-5)
    model = load_model(path, device="cpu")
    with attached_loras(model, [LoraUse(lora, 1.0)]):
        assert torch.allclose(_denoise(model.pipe, arch), want, atol=5e-5)
    half = load_pipeline(_bake(tmp_path, path, lora, "b05.safetensors", ", alpha: 0.5"), arch, torch.float32)
    with attached_loras(model, [LoraUse(lora, 0.5)]):
        assert torch.allclose(_denoise(model.pipe, arch), _denoise(half, arch), atol=5e-5)
    with attached_loras(model, []):  # detached: the plain model again
        assert torch.allclose(_denoise(model.pipe, arch), _denoise(clean, arch), atol=1e-6)
