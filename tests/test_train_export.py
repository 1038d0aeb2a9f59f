"""kohya export: names, alpha, metadata, sidecar, and loading back through diffusers (CPU, tiny)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from helpers.denoiser_inputs import denoiser_inputs

from workbench.formats.hashes import addnet_hash
from workbench.formats.safetensors_io import read_header
from workbench.train.export import TrainFacts, kohya_state_dict, save_kohya, save_peft
from workbench.train.network import inject, plan_network, set_multiplier


@pytest.fixture(scope="module")
def loaded(tiny_model):
    from workbench.pipeline.load import load_pipeline

    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = load_pipeline(tiny_model(arch), arch, torch.float32)
            cache[arch].set_progress_bar_config(disable=True)
        return tiny_model(arch), cache[arch]

    return get


def _trained(loaded, arch, kind="lora", rank=4, alpha=2.0, te=True, blocks=None):
    """A pipeline with an adapter whose tensors are random (as if trained), plus a clean copy."""
    path, pipe = loaded(arch)
    pipe, clean = copy.deepcopy(pipe), copy.deepcopy(pipe)
    plan = plan_network(arch, read_header(path).shapes(), type=kind, rank=rank, alpha=alpha,
                        train_text_encoder=te and arch != "flux", blocks=blocks)
    net = inject(pipe, plan)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.named_trainable().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return path, pipe, clean, net


def _denoise(pipe, arch):
    torch.manual_seed(1)
    m = pipe.transformer if arch in ("flux", "sd3") else pipe.unet
    kw = denoiser_inputs(arch, m)
    with torch.no_grad():
        return m(**kw)[0]


def _te(pipe):
    with torch.no_grad():
        return pipe.text_encoder(torch.arange(10)[None])[0]


def _lora_layers(model) -> int:
    return sum(1 for _, m in model.named_modules() if hasattr(m, "lora_A") and "default_0" in m.lora_A)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_diffusers_loads_kohya_file_exactly(loaded, tmp_path, arch):
    path, pipe, clean, net = _trained(loaded, arch)
    out = tmp_path / "style.safetensors"
    written = save_kohya(net, out, TrainFacts("style", arch, path, trigger="wbstyle"), dtype="fp32")
    assert written == [out, tmp_path / "style.json"]
    base_out, base_te = _denoise(clean, arch), _te(clean)
    clean.load_lora_weights(str(out))  # raises on any key diffusers cannot map
    den = clean.unet
    n_unet = sum(1 for m in net.plan.modules.values() if m.component == "unet")
    assert _lora_layers(den) == n_unet
    assert _lora_layers(clean.text_encoder) == 72
    want = _denoise(pipe, arch)
    assert torch.allclose(_denoise(clean, arch), want, atol=1e-5)
    assert (want - base_out).abs().max() > 1e-2  # the LoRA does something
    assert torch.allclose(_te(clean), _te(pipe), atol=1e-5) and not torch.allclose(_te(clean), base_te)


@pytest.mark.slow
def test_alpha_metadata_sidecar_hash(loaded, tmp_path):
    path, pipe, clean, net = _trained(loaded, "sd15", rank=4, alpha=1.5)
    out = tmp_path / "a.safetensors"
    facts = TrainFacts("a", "sd15", path, steps=7, trigger="wbstyle", num_train_images=3,
                       recipe_text="kind: train\nname: a\n")
    save_kohya(net, out, facts, dtype="fp16")
    h = read_header(out)
    alphas = {k: v for k, v in h.tensors.items() if k.endswith(".alpha")}
    assert len(alphas) == len(net.plan.modules) and all(v.shape == () for v in alphas.values())
    from safetensors.torch import load_file

    sd = load_file(str(out))
    assert {float(sd[k]) for k in alphas} == {1.5}
    assert all(sd[f"{n}.lora_down.weight"].shape[0] == 4 for n in net.plan.modules)
    m = h.metadata
    assert m["ss_network_alpha"] == "1.5" and m["ss_network_dim"] == "4"
    assert m["ss_base_model_version"] == "sd_v1" and m["ss_v2"] == "False"
    assert m["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert m["modelspec.trigger_phrase"] == "wbstyle" and m["ss_output_name"] == "a"
    assert m["workbench_recipe"].startswith("kind: train")
    assert m["sshs_model_hash"] == addnet_hash(out, use_cache=False)
    assert len(m["sshs_legacy_hash"]) == 8
    side = json.loads((tmp_path / "a.json").read_text())
    assert side["activation text"] == "wbstyle" and side["sd version"] == "SD1"
    assert side["preferred weight"] == 1.0


@pytest.mark.slow
def test_flux_kohya_file_bakes_to_the_trained_model(loaded, tmp_path, tiny_model):
    """Apply the exported file by hand (W += alpha/rank · up@down on the BFL keys, fused qkv and
    linear1 included) to the checkpoint and compare with the adapter in training."""
    from safetensors.torch import load_file, save_file

    from workbench.pipeline.load import load_pipeline
    from workbench.formats.lora_keys import module_table

    path, pipe, clean, net = _trained(loaded, "flux", alpha=2.0, rank=4)
    out = tmp_path / "f.safetensors"
    save_kohya(net, out, TrainFacts("f", "flux", path), dtype="fp32")
    lora = load_file(str(out))
    base = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    table = module_table("flux", read_header(path).shapes())
    modules = {k.rsplit(".", 2)[0] for k in lora if k.endswith(".lora_down.weight")}
    assert modules == set(net.plan.modules)
    for name in modules:
        t = table.lookup(name)
        delta = lora[f"{name}.lora_up.weight"] @ lora[f"{name}.lora_down.weight"] * float(lora[f"{name}.alpha"]) / 4
        base[t.key] = base[t.key] + delta
    baked = tmp_path / "baked.safetensors"
    save_file(base, str(baked))
    bpipe = load_pipeline(baked, "flux", torch.float32)
    want = _denoise(pipe, "flux")
    assert torch.allclose(_denoise(bpipe, "flux"), want, atol=1e-4)
    assert (want - _denoise(clean, "flux")).abs().max() > 1e-2
    assert read_header(out).metadata["modelspec.architecture"] == "flux-1-dev/lora"


@pytest.mark.slow
def test_flux_double_blocks_load_in_diffusers(loaded, tmp_path):
    # diffusers hard-codes FLUX.1's real widths when splitting `linear1`, so tiny single blocks
    # cannot go through it; the fused qkv of the double blocks can.
    path, pipe, clean, net = _trained(loaded, "flux", blocks=[f"D{i:02d}" for i in range(19)])
    out = tmp_path / "d.safetensors"
    save_kohya(net, out, TrainFacts("d", "flux", path), dtype="fp32")
    clean.load_lora_weights(str(out))
    assert torch.allclose(_denoise(clean, "flux"), _denoise(pipe, "flux"), atol=1e-5)


def _bake(tmp_path, base, lora, name="baked.safetensors"):
    """Our own bake: a merge recipe `add_lora` of `lora` into `base` (fp32 output)."""
    from workbench.recipes import parse_recipe
    from workbench.dispatch import run_recipe

    body = (f"kind: merge\nname: bake\nmodels:\n  A: {base}\n  L: {lora}\nsteps:\n"
            f"  - {{id: m, method: add_lora, inputs: [A, L]}}\noutput:\n  path: {tmp_path / name}\n"
            "  dtype: fp32\n")
    recipe = parse_recipe(body, tmp_path / "bake.yaml")
    run_recipe(recipe, progress=False)
    return tmp_path / name


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_peft_format_with_text_encoder_loads_in_diffusers_like_our_bake(loaded, tmp_path, arch):
    """issue #15: the PEFT copy spells CLIP text-encoder keys `text_encoder.text_model.encoder...`
    (what ComfyUI maps); diffusers loads it, and its patched weights equal our own bake of it."""
    from safetensors.torch import load_file

    from workbench.pipeline.load import load_pipeline

    path, pipe, clean, net = _trained(loaded, arch, alpha=1.0, rank=4, te=True)
    out = save_peft(net, tmp_path / "p.safetensors", dtype="fp32")
    keys = list(load_file(str(out)))
    te_keys = [k for k in keys if k.startswith("text_encoder")]
    assert te_keys and all(k.startswith(("text_encoder.text_model.encoder.layers.",
                                         "text_encoder_2.text_model.encoder.layers.")) for k in te_keys)
    assert all(k.startswith(("unet.", "text_encoder.text_model.", "text_encoder_2.text_model."))
               for k in keys)
    clean.load_lora_weights(str(out))
    assert _lora_layers(clean.text_encoder) == 72  # every CLIP-L layer found under the new spelling
    assert torch.allclose(_denoise(clean, arch), _denoise(pipe, arch), atol=1e-5)
    assert torch.allclose(_te(clean), _te(pipe), atol=1e-5)
    comps = ["unet", "text_encoder"] + (["text_encoder_2"] if arch == "sdxl" else [])
    clean.fuse_lora(components=comps)
    clean.unload_lora_weights()
    baked = load_pipeline(_bake(tmp_path, path, out), arch, torch.float32)
    for comp in comps:
        got, want = getattr(clean, comp).state_dict(), getattr(baked, comp).state_dict()
        assert set(got) == set(want), comp
        changed = 0
        for k, v in want.items():
            assert torch.allclose(got[k], v, atol=2e-6), (comp, k)
            changed += not torch.equal(v, getattr(loaded(arch)[1], comp).state_dict()[k])
        assert changed > 10, comp  # the bake did change this component


@pytest.mark.slow
def test_multiplier_zero_is_base(loaded):
    path, pipe, clean, net = _trained(loaded, "sd15", te=False)
    set_multiplier(net, 0.0)
    assert torch.allclose(_denoise(pipe, "sd15"), _denoise(clean, "sd15"), atol=1e-6)
    set_multiplier(net, 1.0)
    assert not torch.allclose(_denoise(pipe, "sd15"), _denoise(clean, "sd15"), atol=1e-3)


def _peft_delta(layer) -> torch.Tensor:
    return layer.get_delta_weight("default").float()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["loha", "lokr", "dora"])
def test_lycoris_layouts_match_the_trained_delta(loaded, kind):
    """The LyCORIS formulas loaders use, applied to the exported tensors, give peft's ΔW."""
    path, pipe, clean, net = _trained(loaded, "sd15", kind=kind, rank=4, alpha=2.0, te=False)
    sd = kohya_state_dict(net, "fp32")
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    layer = net.layer("unet", net.paths[name][0])
    a = float(sd[f"{name}.alpha"])
    if kind == "loha":
        d = (sd[f"{name}.hada_w1_a"] @ sd[f"{name}.hada_w1_b"]) * (sd[f"{name}.hada_w2_a"] @ sd[f"{name}.hada_w2_b"])
        d = d * a / sd[f"{name}.hada_w1_b"].shape[0]
    elif kind == "lokr":
        w1 = sd.get(f"{name}.lokr_w1")
        w2 = sd.get(f"{name}.lokr_w2")
        dim = None
        if w1 is None:
            dim, w1 = sd[f"{name}.lokr_w1_b"].shape[0], sd[f"{name}.lokr_w1_a"] @ sd[f"{name}.lokr_w1_b"]
        if w2 is None:
            dim, w2 = sd[f"{name}.lokr_w2_b"].shape[0], sd[f"{name}.lokr_w2_a"] @ sd[f"{name}.lokr_w2_b"]
        d = torch.kron(w1, w2) * (a / dim if dim else 1.0)  # ComfyUI/A1111: no low-rank side -> scale 1
    else:
        assert sd[f"{name}.dora_scale"].shape == (sd[f"{name}.lora_up.weight"].shape[0], 1)
        d = sd[f"{name}.lora_up.weight"] @ sd[f"{name}.lora_down.weight"] * a / 4
    if kind == "dora":
        w = layer.base_layer.weight.float()
        merged = w + d
        merged = merged * (sd[f"{name}.dora_scale"] / merged.norm(dim=1, keepdim=True))
        x = torch.randn(3, w.shape[1])
        with torch.no_grad():
            want = layer(x)  # peft's DoRA forward
        assert torch.allclose(torch.nn.functional.linear(x, merged, layer.base_layer.bias), want, atol=1e-5)
    else:
        assert torch.allclose(d, _peft_delta(layer), atol=1e-6)


def test_legacy_hash_is_the_64k_at_1mib_of_the_ss_only_file():
    """kohya's sshs_legacy_hash (`precalculate_safetensors_hashes`) = sha256 of bytes
    [1 MiB, 1 MiB + 64 KiB) of the file safetensors writes with only the ss_* metadata; a LoRA above
    1 MiB so the window holds tensor bytes."""
    import hashlib

    from safetensors.torch import save_file

    from workbench.train.export import legacy_hash

    g = torch.Generator().manual_seed(0)
    tensors = {"lora_unet_x.lora_down.weight": torch.randn(64, 4096, generator=g).half(),
               "lora_unet_x.lora_up.weight": torch.randn(4096, 64, generator=g).half(),
               "lora_unet_x.alpha": torch.tensor(8.0).half()}
    meta = {"ss_network_dim": "64", "modelspec.title": "x", "sshs_model_hash": "abc"}
    got = legacy_hash(tensors, meta)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/ss_only.safetensors"
        save_file(tensors, path, metadata={"ss_network_dim": "64"})
        with open(path, "rb") as f:
            f.seek(0x100000)
            want = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    assert got == want
    assert legacy_hash(tensors, {**meta, "ss_training_comment": "a longer header"}) != got  # it moves


def _diffusers_key_report(monkeypatch) -> list:
    """Record what diffusers' LoRA loader found unmatched (it only logs it, and quietly here)."""
    import diffusers.loaders.peft as dpeft

    found: list = []
    real = dpeft._maybe_warn_for_unhandled_keys

    def spy(incompatible_keys, adapter_name):
        # diffusers' own filter: LoRA keys it could not place, LoRA keys of this adapter left empty
        found.extend(k for k in getattr(incompatible_keys, "unexpected_keys", None) or [] if ".lora_" in k)
        found.extend(k for k in getattr(incompatible_keys, "missing_keys", None) or []
                     if ".lora_" in k and adapter_name in k)
        return real(incompatible_keys, adapter_name)

    monkeypatch.setattr(dpeft, "_maybe_warn_for_unhandled_keys", spy)
    return found


def _lora_layer_count(model) -> int:
    return sum(1 for _, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A))


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["sd3.5-medium", "sd3.5-large"])
def test_sd3_export_is_kohyas_loads_in_diffusers_and_equals_our_bake(tiny_sd3, tmp_path, monkeypatch, variant):
    """issue #15: an SD3.5 LoRA as trained (adapter tensors random, as if trained) is written with
    exactly kohya's module names and tensors (golden list from sd-scripts' own lora_sd3), goes into
    diffusers' SD3 pipeline with no leftover key (kohya names mapped to diffusers' by
    pipeline/loras.py, since diffusers 0.42 reads no kohya SD3 names; the peft copy directly, in
    diffusers' own names), and both give the trained transformer's output, as does our bake."""
    from helpers.kohya_keys import KOHYA_SD3
    from safetensors.torch import load_file

    from workbench.formats.detect import detect
    from workbench.pipeline.load import load_pipeline
    from workbench.pipeline.loras import for_diffusers

    path = tiny_sd3(variant)
    pipe = load_pipeline(path, "sd3", torch.float32)
    pipe.set_progress_bar_config(disable=True)
    clean = copy.deepcopy(pipe)
    plan = plan_network("sd3", read_header(path).shapes(), rank=4, alpha=2.0)
    net = inject(pipe, plan)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.named_trainable().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    out = tmp_path / "sd3.safetensors"
    save_kohya(net, out, TrainFacts("sd3", "sd3", path, variant=variant), dtype="fp32")
    # (a) kohya's names, three tensors per module, kohya's shapes at the tiny width (32)
    lora = load_file(str(out))
    golden = KOHYA_SD3[variant]["modules"]
    assert set(lora) == {f"{m}.{t}" for m in golden for t in ("lora_down.weight", "lora_up.weight", "alpha")}
    for name, ((_, d_in), (d_out, _)) in golden.items():
        w = KOHYA_SD3[variant]["hidden_size"] // 32
        assert lora[f"{name}.lora_down.weight"].shape == (4, d_in // w), name
        assert lora[f"{name}.lora_up.weight"].shape == (d_out // w, 4), name
        assert float(lora[f"{name}.alpha"]) == 2.0
    info = detect(out)
    assert (info.kind, info.arch, info.variant, info.layout) == ("lora", "sd3", variant, "kohya")
    meta = read_header(out).metadata
    assert meta["ss_base_model_version"] == "sd3" and meta["ss_network_module"] == "networks.lora_sd3"
    assert meta["modelspec.architecture"] == f"stable-diffusion-3-{variant.split('.')[1]}/lora"
    want, base = _denoise(pipe, "sd3"), _denoise(clean, "sd3")
    assert (want - base).abs().max() > 1e-2  # the LoRA does something
    n_layers = sum(len(p) for p in net.paths.values())
    # (b) diffusers: the kohya file (mapped to diffusers names), then the peft copy as it is
    unmatched = _diffusers_key_report(monkeypatch)
    via_kohya = copy.deepcopy(clean)
    via_kohya.load_lora_weights(for_diffusers(out, "sd3", path))
    assert unmatched == [] and _lora_layer_count(via_kohya.transformer) == n_layers
    assert torch.allclose(_denoise(via_kohya, "sd3"), want, atol=1e-5)
    peft_copy = save_peft(net, tmp_path / "sd3.peft.safetensors", dtype="fp32", variant=variant)
    keys = list(load_file(str(peft_copy)))
    assert (detect(peft_copy).arch, detect(peft_copy).layout) == ("sd3", "peft")
    assert keys and all(k.startswith("transformer.transformer_blocks.") for k in keys)
    assert any(".attn.to_q.lora_A." in k for k in keys) and not any("joint_blocks" in k for k in keys)
    via_peft = copy.deepcopy(clean)
    via_peft.load_lora_weights(str(peft_copy))
    assert unmatched == [] and _lora_layer_count(via_peft.transformer) == n_layers
    assert torch.allclose(_denoise(via_peft, "sd3"), want, atol=1e-5)
    # our bake (merge add_lora on the SAI keys, fused qkv and swapped adaLN included)
    baked = load_pipeline(_bake(tmp_path, path, out), "sd3", torch.float32)
    assert torch.allclose(_denoise(baked, "sd3"), want, atol=1e-4)
