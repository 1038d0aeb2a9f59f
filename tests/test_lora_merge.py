"""LoRA module tables, LoRA merging in the merge graph, and LoRA extraction, on tiny real-layout models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import formats_keys as fk
from helpers.kohya_keys import KOHYA_MODULES
from workbench.errors import UnsupportedError, WorkbenchError
from workbench.formats.blocks import block_of
from workbench.formats.lora_keys import kohya_modules, module_table
from workbench.formats.safetensors_io import read_header
from workbench.recipes import parse_recipe
from workbench.dispatch import run_recipe
from workbench.testing import ldm_keys

GOLDEN = KOHYA_MODULES
UNET = "model.diffusion_model."
SD15_TE = "cond_stage_model.transformer."


# ------------------------------------------------------------------------------------------ helpers

def kohya_lora(path: Path, base: dict[str, torch.Tensor], modules: dict[str, tuple[str, tuple | None]],
               rank: int = 4, alpha: float | None = 2.0, seed: int = 0, conv: set[str] = frozenset()):
    """Write a kohya LoRA; `modules`: name -> (checkpoint key, rows (start, stop) or None).
    Returns {checkpoint key: expected ΔW} computed here, independently of workbench.merge."""
    gen = torch.Generator().manual_seed(seed)
    sd, expected = {}, {}
    for name, (key, rows) in modules.items():
        w = base[key]
        out = (rows[1] - rows[0]) if rows else w.shape[0]
        if name in conv or w.ndim == 4:
            down = torch.randn(rank, *w.shape[1:], generator=gen) * 0.1
            up = torch.randn(out, rank, 1, 1, generator=gen) * 0.1
        else:
            down = torch.randn(rank, w.shape[1], generator=gen) * 0.1
            up = torch.randn(out, rank, generator=gen) * 0.1
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(alpha)
        scale = (alpha if alpha else rank) / rank
        d = (up.flatten(1) @ down.flatten(1)).reshape(out, *w.shape[1:]) * scale
        full = expected.setdefault(key, torch.zeros(w.shape))
        if rows:
            full[rows[0]:rows[1]] += d
        else:
            full += d
    save_file(sd, str(path))
    return expected


def merge(tmp_path: Path, models: dict[str, Path], steps: str, out="out.safetensors"):
    body = "kind: merge\nname: t\nmodels:\n" + "".join(f"  {k}: {v}\n" for k, v in models.items()) \
        + f"steps:\n{steps}\noutput:\n  path: {out}\n  dtype: fp32\n"
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(body)
    recipe = parse_recipe(body, recipe_path)
    run_recipe(recipe, progress=False)
    return load_file(recipe.output.path)


def assert_only_changed(out, base, expected, strength=1.0, weight_of=lambda key: 1.0):
    for key, w in base.items():
        if key in expected and weight_of(key) != 0:
            want = w.float() + strength * weight_of(key) * expected[key]
            assert torch.allclose(out[key], want, rtol=1e-5, atol=1e-6), key
            assert not torch.equal(out[key], w.float()), key
        elif w.is_floating_point():
            assert torch.equal(out[key], w.float()), key


def sd15_unet_names(base) -> dict[str, str]:
    """kohya SD1.5 names (diffusers paths) -> LDM keys, through the tiny builder's own key map."""
    from workbench.testing import sd15

    unet = sd15.build_models(0)["unet"]
    mapping = ldm_keys.unet_key_map(unet.state_dict().keys(), 2)
    return {"lora_unet_" + d[:-7].replace(".", "_"): UNET + o for d, o in mapping.items() if d.endswith(".weight")}


# ---------------------------------------------------------------------------------- module tables

@pytest.mark.parametrize("arch,shapes", [("sd15", fk.sd15_checkpoint), ("sdxl", fk.sdxl_checkpoint),
                                         ("flux", fk.flux_checkpoint)])
def test_kohya_default_modules_equal_the_golden_lists_at_real_sizes(arch, shapes):
    table = module_table(arch, shapes())
    mods = kohya_modules(table)
    gold = GOLDEN[arch]
    assert set(mods) == set(gold) and len(gold) == {"sd15": 264, "sdxl": 986, "flux": 544}[arch]
    for name, (down, up) in gold.items():
        t = table.lookup(name)
        assert t is mods[name]
        # helpers/formats_keys writes SDXL proj_in/out as 1x1 convs (real files: Linear); both take [r, in]
        assert down[1] == t.in_features and (list(down[2:]) == list(t.kernel) or set(t.kernel) == {1}), name
        assert up[0] == t.out_features and up[1] == down[0], name
    if arch == "sdxl":  # CLIP-G q/k/v are row thirds of the fused OpenCLIP in_proj_weight
        q = table.lookup("lora_te2_text_model_encoder_layers_3_self_attn_k_proj")
        assert q.key == "conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight"
        assert q.row_range() == (1280, 2560)


@pytest.mark.parametrize("arch", ["sd15", "sdxl", "flux"])
def test_golden_modules_resolve_in_tiny_checkpoints(arch, tiny_model):
    header = read_header(tiny_model(arch, 0))
    table = module_table(arch, header.shapes())
    for name in GOLDEN[arch]:
        t = table.lookup(name)
        assert t is not None and header.tensors[t.key].shape == t.shape, name


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_diffusers_peft_names_map_like_the_tiny_builders(arch, tiny_model):
    """Every diffusers UNet/TE module -> the same LDM key the tiny builder writes it to."""
    import importlib

    mod = importlib.import_module(f"workbench.testing.{arch}")
    models = mod.build_models(0)
    header = read_header(tiny_model(arch, 0))
    table = module_table(arch, header.shapes())
    mapping = ldm_keys.unet_key_map(models["unet"].state_dict().keys(), 2)
    n = 0
    for dkey, okey in mapping.items():
        if dkey.endswith(".weight") and "norm" not in dkey and header.tensors[UNET + okey].shape.__len__() >= 2:
            t = table.lookup("unet." + dkey[:-7])
            assert t is not None and t.key == UNET + okey, dkey
            n += 1
    assert n > 100
    te_prefix = SD15_TE if arch == "sd15" else "conditioner.embedders.0.transformer."
    t = table.lookup("text_encoder.text_model.encoder.layers.11.mlp.fc2")
    assert t.key == te_prefix + "text_model.encoder.layers.11.mlp.fc2.weight"
    if arch == "sdxl":
        v = table.lookup("text_encoder_2.text_model.encoder.layers.31.self_attn.v_proj")
        assert v.key.endswith("resblocks.31.attn.in_proj_weight") and v.rows == (2, 3, 3)


# ------------------------------------------------------------------------------------ LoRA merging

@pytest.mark.slow
def test_kohya_lora_changes_exactly_the_targeted_keys(tmp_path, tiny_model):
    base_path = tiny_model("sd15", 1)
    base = load_file(base_path)
    names = sd15_unet_names(base)
    modules = {n: (k, None) for n, k in names.items() if n in GOLDEN["sd15"]}
    for n in list(modules)[::3]:
        del modules[n]  # a subset, so untouched attention keys exist too
    modules["lora_unet_down_blocks_0_resnets_0_conv1"] = (names["lora_unet_down_blocks_0_resnets_0_conv1"], None)
    for i in (0, 5):
        modules[f"lora_te_text_model_encoder_layers_{i}_self_attn_q_proj"] = (
            f"{SD15_TE}text_model.encoder.layers.{i}.self_attn.q_proj.weight", None)
    expected = kohya_lora(tmp_path / "l.safetensors", base, modules)
    out = merge(tmp_path, {"A": base_path, "L": tmp_path / "l.safetensors"},
                "  - {id: m, method: add_lora, inputs: [A, L], alpha: 0.8}")
    assert set(out) == set(base)
    assert_only_changed(out, base, expected, 0.8)


@pytest.mark.slow
def test_per_block_strengths(tmp_path, tiny_model):
    base_path = tiny_model("sd15", 1)
    base = load_file(base_path)
    names = sd15_unet_names(base)
    modules = {n: (k, None) for n, k in names.items() if "attentions" in n and n.endswith("to_k")}
    modules["lora_te_text_model_encoder_layers_1_mlp_fc1"] = (f"{SD15_TE}text_model.encoder.layers.1.mlp.fc1.weight", None)
    expected = kohya_lora(tmp_path / "l.safetensors", base, modules, alpha=None)
    weights = {"BASE": 0.0, "IN01": 1.0, "IN04": 0.5, "M00": 0.25, "OUT05": 1.0}
    out = merge(tmp_path, {"A": base_path, "L": tmp_path / "l.safetensors"},
                f"  - {{id: m, method: add_lora, inputs: [A, L], blocks: {json.dumps(weights)}}}")
    weight_of = lambda key: weights.get(block_of("sd15", key), 0.0)  # noqa: E731
    assert {block_of("sd15", k) for k in expected} >= {"BASE", "IN01", "IN04", "M00", "OUT05", "OUT10"}
    assert_only_changed(out, base, expected, 1.0, weight_of)


@pytest.mark.slow
def test_sdxl_lora_with_fused_clip_g_rows_and_ldm_names(tmp_path, tiny_model):
    base_path = tiny_model("sdxl", 1)
    base = load_file(base_path)
    g = "conditioner.embedders.1.model.transformer.resblocks."
    w = base[g + "2.attn.in_proj_weight"].shape[0] // 3
    modules = {
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k": (UNET + "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight", None),
        "lora_unet_middle_block_1_proj_in": (UNET + "middle_block.1.proj_in.weight", None),
        "lora_unet_output_blocks_5_1_transformer_blocks_0_ff_net_2": (UNET + "output_blocks.5.1.transformer_blocks.0.ff.net.2.weight", None),
        "lora_te1_text_model_encoder_layers_3_self_attn_v_proj": ("conditioner.embedders.0.transformer.text_model.encoder.layers.3.self_attn.v_proj.weight", None),
        "lora_te2_text_model_encoder_layers_2_self_attn_q_proj": (g + "2.attn.in_proj_weight", (0, w)),
        "lora_te2_text_model_encoder_layers_2_self_attn_v_proj": (g + "2.attn.in_proj_weight", (2 * w, 3 * w)),
        "lora_te2_text_model_encoder_layers_7_mlp_fc1": (g + "7.mlp.c_fc.weight", None),
        "lora_te2_text_model_encoder_layers_7_self_attn_out_proj": (g + "7.attn.out_proj.weight", None),
    }
    expected = kohya_lora(tmp_path / "l.safetensors", base, modules, rank=2, alpha=1.0)
    out = merge(tmp_path, {"A": base_path, "L": tmp_path / "l.safetensors"},
                "  - {id: m, method: add_lora, inputs: [A, L], alpha: 1.5}")
    assert_only_changed(out, base, expected, 1.5)
    k_rows = out[g + "2.attn.in_proj_weight"][w:2 * w]  # k rows untouched
    assert torch.equal(k_rows, base[g + "2.attn.in_proj_weight"][w:2 * w].float())


@pytest.mark.slow
def test_flux_kohya_and_diffusers_loras(tmp_path, tiny_model):
    base_path = tiny_model("flux", 1)
    base = load_file(base_path)
    qkv = UNET + "double_blocks.3.img_attn.qkv.weight"
    lin1 = UNET + "single_blocks.10.linear1.weight"
    h = base[qkv].shape[1]
    modules = {"lora_unet_double_blocks_3_img_attn_qkv": (qkv, None),
               "lora_unet_single_blocks_10_linear1": (lin1, None),
               "lora_te1_text_model_encoder_layers_0_mlp_fc1": ("text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight", None),
               "lora_te3_encoder_block_5_layer_1_DenseReluDense_wo": ("text_encoders.t5xxl.transformer.encoder.block.5.layer.1.DenseReluDense.wo.weight", None)}
    expected = kohya_lora(tmp_path / "k.safetensors", base, modules)
    out = merge(tmp_path, {"A": base_path, "L": tmp_path / "k.safetensors"},
                "  - {id: m, method: add_lora, inputs: [A, L], alpha: 1.0}")
    assert_only_changed(out, base, expected)
    # diffusers/PEFT names, no alpha (scale 1): to_k is the middle third of qkv; proj_mlp rows 3h..7h of linear1
    gen = torch.Generator().manual_seed(5)
    sd = {}
    for mod, out_rows in (("transformer.transformer_blocks.3.attn.to_k", h),
                          ("transformer.single_transformer_blocks.10.proj_mlp", 4 * h)):
        sd[mod + ".lora_A.weight"] = torch.randn(3, h, generator=gen)
        sd[mod + ".lora_B.weight"] = torch.randn(out_rows, 3, generator=gen)
    save_file(sd, str(tmp_path / "d.safetensors"))
    out = merge(tmp_path, {"A": base_path, "L": tmp_path / "d.safetensors"},
                "  - {id: m, method: add_lora, inputs: [A, L]}", out="out2.safetensors")
    d_k = sd["transformer.transformer_blocks.3.attn.to_k.lora_B.weight"] @ sd["transformer.transformer_blocks.3.attn.to_k.lora_A.weight"]
    want = base[qkv].float().clone()
    want[h:2 * h] += d_k
    assert torch.allclose(out[qkv], want, rtol=1e-5, atol=1e-6)
    d_mlp = sd["transformer.single_transformer_blocks.10.proj_mlp.lora_B.weight"] @ sd["transformer.single_transformer_blocks.10.proj_mlp.lora_A.weight"]
    want = base[lin1].float().clone()
    want[3 * h:] += d_mlp
    assert torch.allclose(out[lin1], want, rtol=1e-5, atol=1e-6)


def test_peft_sd15_unet_lora_equals_kohya_equivalent(tmp_path, tiny_model):
    base_path = tiny_model("sd15", 1)
    base = load_file(base_path)
    key = UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, base[key].shape[1], generator=gen), torch.randn(base[key].shape[0], 2, generator=gen)
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": a,
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": b},
              str(tmp_path / "p.safetensors"))
    out = merge(tmp_path, {"A": base_path, "L": tmp_path / "p.safetensors"},
                "  - {id: m, method: add_lora, inputs: [A, L], alpha: 0.5}")
    assert_only_changed(out, base, {key: b @ a}, 0.5)


def test_lora_of_another_architecture_is_refused_before_any_read(tmp_path, tiny_model, monkeypatch):
    sdxl = load_file(tiny_model("sdxl", 0))
    kohya_lora(tmp_path / "xl.safetensors", sdxl,
               {"lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k":
                (UNET + "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight", None),
                "lora_te2_text_model_encoder_layers_2_mlp_fc1":
                ("conditioner.embedders.1.model.transformer.resblocks.2.mlp.c_fc.weight", None)})
    import workbench.merge.executor as mx

    monkeypatch.setattr(mx, "open_model", lambda *a, **k: pytest.fail("a tensor was read"))
    from workbench.merge.build import plan_merge

    body = (f"kind: merge\nname: t\nmodels:\n  A: {tiny_model('sd15', 0)}\n  L: {tmp_path / 'xl.safetensors'}\n"
            "steps:\n  - {id: m, method: add_lora, inputs: [A, L]}\noutput:\n  path: o.safetensors\n")
    recipe = parse_recipe(body, tmp_path / "r.yaml")
    with pytest.raises(WorkbenchError, match=r"A \(sd15_0.safetensors\) is sd15, L \(xl.safetensors\) is sdxl LoRA"):
        plan_merge(recipe)
    assert not (tmp_path / "o.safetensors").exists()


def test_oft_and_misused_lora_are_clear_errors(tmp_path, tiny_model):
    base_path = tiny_model("sd15", 0)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.oft_blocks": torch.zeros(4, 8, 8), f"{name}.alpha": torch.tensor(1.0)},
              str(tmp_path / "h.safetensors"))
    from workbench.merge.build import plan_merge

    def plan(step, lora="h.safetensors"):
        body = (f"kind: merge\nname: t\nmodels:\n  A: {base_path}\n  L: {tmp_path / lora}\n"
                f"steps:\n  - {step}\noutput:\n  path: {tmp_path / 'o.safetensors'}\n")
        return plan_merge(parse_recipe(body, tmp_path / "r.yaml"))

    with pytest.raises(UnsupportedError, match="OFT"):
        plan("{id: m, method: add_lora, inputs: [A, L]}")
    kohya_lora(tmp_path / "k.safetensors", load_file(base_path),
               {name: (UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", None)})
    with pytest.raises(WorkbenchError, match="add_lora"):
        plan("{id: m, method: weighted_sum, inputs: [A, L], alpha: 0.5}", "k.safetensors")


# -------------------------------------------------------------------------------------- extraction

@pytest.mark.slow
def test_extraction_round_trip_and_diffusers_loads_it(tmp_path):
    from workbench.merge.extract import extract_lora
    from workbench.testing import build_tiny

    base_path = build_tiny("sd15", tmp_path / "base.safetensors", seed=4, dtype=torch.float32)
    base = load_file(base_path)
    table = module_table("sd15", {k: tuple(v.shape) for k, v in base.items()})
    targets = kohya_modules(table)
    gen = torch.Generator().manual_seed(0)
    r = 4
    tuned, deltas = dict(base), {}
    for name, t in targets.items():
        if t.component == "te1" and int(name.split("_layers_")[1].split("_")[0]) % 2:
            continue  # odd text-encoder layers stay identical: those modules must be left out
        up = torch.randn(t.out_features, r, generator=gen)
        down = torch.randn(r, t.in_features * (t.kernel[0] * t.kernel[1] if t.kernel else 1), generator=gen)
        deltas[name] = (up @ down * 0.01).reshape(t.delta_shape)
        tuned[t.key] = base[t.key] + deltas[name]
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    out = extract_lora(tmp_path / "tuned.safetensors", base_path, tmp_path / "x.safetensors", rank=r,
                       dtype="fp32", progress=False, clamp_quantile=None)
    lora = load_file(out)
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in lora}
    assert names == set(deltas)
    assert names <= set(GOLDEN["sd15"])
    for name, delta in deltas.items():
        up, down, alpha = lora[f"{name}.lora_up.weight"], lora[f"{name}.lora_down.weight"], lora[f"{name}.alpha"]
        assert alpha.item() == r and down.shape[0] == r
        approx = (up.flatten(1) @ down.flatten(1)).reshape(delta.shape) * (alpha / r)
        assert (approx - delta).norm() / delta.norm() < 1e-3, name
    meta = read_header(out).metadata
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == str(r)
    assert meta["ss_base_model_version"] == "sd_v1"
    src = json.loads(meta["workbench_extracted_from"])
    from workbench.formats.hashes import sha256_file
    assert src["base"]["sha256"] == sha256_file(base_path)
    # a shared LoRA names its sources by file name only: no local folder leaks into the file
    assert src["base"]["file"] == Path(base_path).name
    assert str(tmp_path) not in json.dumps(meta) and str(Path(base_path).parent) not in json.dumps(meta)

    # kohya's default quantile clamp bounds every value at the 0.99 quantile (a small, bounded error)
    clamped = load_file(extract_lora(tmp_path / "tuned.safetensors", base_path, tmp_path / "c.safetensors",
                                     rank=r, dtype="fp32", progress=False))
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    joined = torch.cat([clamped[f"{name}.lora_up.weight"].flatten(), clamped[f"{name}.lora_down.weight"].flatten()])
    free = torch.cat([lora[f"{name}.lora_up.weight"].flatten(), lora[f"{name}.lora_down.weight"].flatten()])
    assert joined.abs().max() < free.abs().max()

    # diffusers accepts the file with every module matched
    from workbench.pipeline.load import load_pipeline

    pipe = load_pipeline(base_path, "sd15")
    unet = pipe.unet
    x = torch.randn(1, 4, 8, 8, generator=gen)
    ctx = torch.randn(1, 77, 32, generator=gen)
    with torch.no_grad():
        before = unet(x, 10, encoder_hidden_states=ctx).sample
    pipe.load_lora_weights(str(out))
    with torch.no_grad():
        after = unet(x, 10, encoder_hidden_states=ctx).sample
    assert not torch.allclose(before, after)
    unet_mods = [n for n, m in unet.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)]
    te_mods = [n for n, m in pipe.text_encoder.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)]
    assert len(unet_mods) == sum(1 for n in names if n.startswith("lora_unet_"))
    assert len(te_mods) == sum(1 for n in names if n.startswith("lora_te_"))


def test_extract_recipe_dry_run_and_run(tmp_path, tiny_model):
    base_path = tiny_model("sd15", 0)
    base = load_file(base_path)
    key = UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"
    tuned = dict(base)
    tuned[key] = (base[key].float() + 0.5).to(base[key].dtype)
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    body = (f"kind: extract_lora\nname: x\ntuned: tuned.safetensors\nbase: {base_path}\nrank: 2\n"
            "output:\n  path: out/x.safetensors\n")
    (tmp_path / "r.yaml").write_text(body)
    recipe = parse_recipe(body, tmp_path / "r.yaml")
    dry = run_recipe(recipe, dry_run=True)
    text = str(dry)
    assert "architecture: sd15" in text and "problems: none" in text and "rank 2" in text
    assert not (tmp_path / "out/x.safetensors").exists()
    res = run_recipe(recipe, progress=False)
    lora = load_file(tmp_path / "out/x.safetensors")
    assert set(lora) == {f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v.{s}"
                         for s in ("alpha", "lora_down.weight", "lora_up.weight")}
    assert lora["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v.lora_up.weight"].dtype == torch.float16
    assert any(p.name.endswith("provenance.json") for p in res.outputs)


# ------------------------------------------------------------------------------- the alpha rule

@pytest.mark.slow
def test_alpha_zero_or_missing_preview_equals_bake(tmp_path, tiny_model):
    """issue #15: alpha 0 or no alpha means alpha = rank (kohya's rule) in the bake AND at
    generation time (diffusers alone would apply alpha 0 as scale 0 and give alpha-less modules
    the most common alpha of the others); both warn naming the file."""
    from helpers.denoiser_inputs import denoiser_inputs

    from workbench.pipeline.generate import LoraUse, load_model
    from workbench.pipeline.load import load_pipeline
    from workbench.pipeline.loras import attached_loras
    from workbench.formats.lora_alpha import LoraAlphaWarning

    base_path = tiny_model("sd15", 1)
    base = load_file(base_path)
    names = sd15_unet_names(base)
    modules = {n: (k, None) for n, k in names.items() if "attentions" in n and n.endswith(("to_q", "to_v"))}
    modules["lora_te_text_model_encoder_layers_2_mlp_fc1"] = (f"{SD15_TE}text_model.encoder.layers.2.mlp.fc1.weight", None)
    lora_path = tmp_path / "odd_alpha.safetensors"
    expected = kohya_lora(lora_path, base, modules, rank=4, alpha=0.0)  # alpha 0 -> scale 1
    sd = load_file(lora_path)
    mods = sorted(modules)
    for n in mods[::3]:
        del sd[f"{n}.alpha"]          # no alpha: scale 1 as well
    for n in mods[1::3]:
        sd[f"{n}.alpha"] = torch.tensor(2.0)  # an ordinary alpha: scale 0.5
        expected[modules[n][0]] *= 0.5
    save_file(sd, str(lora_path))
    with pytest.warns(LoraAlphaWarning, match="odd_alpha.safetensors"):
        out = merge(tmp_path, {"A": base_path, "L": lora_path},
                    "  - {id: m, method: add_lora, inputs: [A, L]}")
    assert_only_changed(out, base, expected)
    save_file(out, str(tmp_path / "baked.safetensors"))
    baked = load_pipeline(tmp_path / "baked.safetensors", "sd15", torch.float32)

    def den(pipe):
        torch.manual_seed(1)
        with torch.no_grad():
            return pipe.unet(**denoiser_inputs("sd15", pipe.unet))[0]

    def te(pipe):
        with torch.no_grad():
            return pipe.text_encoder(torch.arange(10)[None])[0]

    model = load_model(base_path, device="cpu")
    plain = den(model.pipe)
    with pytest.warns(LoraAlphaWarning, match="odd_alpha.safetensors"):
        with attached_loras(model, [LoraUse(lora_path, 1.0)]):
            preview, preview_te = den(model.pipe), te(model.pipe)
    assert (preview - plain).abs().max() > 1e-2
    assert torch.allclose(preview, den(baked), atol=2e-5)
    assert torch.allclose(preview_te, te(baked), atol=2e-5)


# ------------------------------------------------------------------ text-encoder-only LoRAs

def test_text_encoder_only_loras_by_encoder_width():
    from workbench.formats.detect import detect_keys

    def keys(mods, prefix_from=None, prefix_to=None):
        out = {}
        for m, (down, up) in mods.items():
            if prefix_from:
                m = m.replace(prefix_from, prefix_to, 1)
            out.update({f"{m}.lora_down.weight": tuple(down), f"{m}.lora_up.weight": tuple(up), f"{m}.alpha": ()})
        return out

    te1 = {m: v for m, v in GOLDEN["sdxl"].items() if m.startswith("lora_te1_")}
    te2 = {m: v for m, v in GOLDEN["sdxl"].items() if m.startswith("lora_te2_")}
    t5 = {m: v for m, v in GOLDEN["flux"].items() if m.startswith("lora_te3_")}
    sd15 = {m: v for m, v in GOLDEN["sd15"].items() if m.startswith("lora_te_")}
    info = detect_keys(keys(sd15), {}, "x")
    assert (info.arch, info.archs) == ("sd15", {"sd15"})   # lora_te_: the SD1.x name only
    info = detect_keys(keys(te1), {}, "x")                  # CLIP-L alone: any CLIP-L family
    assert info.arch == "sd15" and info.archs == {"sd15", "sdxl", "sd3", "flux"}
    assert "text-encoder-only" in " ".join(info.notes)
    assert detect_keys(keys(te1), {"ss_base_model_version": "flux1"}, "x").arch == "flux"
    info = detect_keys(keys(te1) | keys(te2), {}, "x")      # CLIP-L 768 + CLIP-G 1280
    assert (info.arch, info.archs) == ("sdxl", {"sdxl", "sd3"})
    assert detect_keys(keys(te1) | keys(te2), {"modelspec.architecture": "stable-diffusion-3-medium/lora"},
                       "x").arch == "sd3"
    info = detect_keys(keys(te1) | keys(te2) | keys(t5), {}, "x")  # + T5: SD3
    assert (info.arch, info.archs) == ("sd3", {"sd3"})
    assert detect_keys(keys(te1) | keys(t5), {}, "x").archs == {"flux"}
    sd2 = {m: ([d[0], 1024] + d[2:], [1024 if u[0] == 768 else u[0]] + u[1:]) for m, (d, u) in sd15.items()}
    assert detect_keys(keys(sd2), {}, "x").archs == {"sd2"}
    # diffusers FLUX: CLIP-L is text_encoder, T5 is text_encoder_2
    fx = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": (4, 768),
          "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": (768, 4),
          "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": (4, 4096),
          "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight": (4096, 4)}
    assert detect_keys(fx, {}, "x").archs == {"flux"}


@pytest.mark.slow
def test_clip_l_only_lora_merges_into_sdxl_and_flux(tmp_path, tiny_model):
    """A `lora_te1_` CLIP-L-only LoRA fits SD1.5, SDXL, SD3 and FLUX; a merge takes it into each."""
    for arch, prefix in (("sdxl", "conditioner.embedders.0.transformer."),
                         ("flux", "text_encoders.clip_l.transformer.")):
        base_path = tiny_model(arch, 1)
        base = load_file(base_path)
        modules = {f"lora_te1_text_model_encoder_layers_{i}_self_attn_q_proj":
                   (f"{prefix}text_model.encoder.layers.{i}.self_attn.q_proj.weight", None) for i in (0, 1)}
        lora = tmp_path / f"te_{arch}.safetensors"
        expected = kohya_lora(lora, base, modules)
        out = merge(tmp_path, {"A": base_path, "L": lora},
                    "  - {id: m, method: add_lora, inputs: [A, L]}", out=f"o_{arch}.safetensors")
        assert_only_changed(out, base, expected)


# -------------------------------------------------------------------------------------- SD3

from workbench.formats.lora_keys import SWAPPED  # noqa: E402


def _sd3_kohya(path: Path, ckpt: Path) -> dict[str, torch.Tensor]:
    table = module_table("sd3", read_header(ckpt).shapes())
    g = torch.Generator().manual_seed(11)
    sd = {}
    for name, t in kohya_modules(table).items():
        if t.component == "te3":
            continue
        sd.update({f"{name}.lora_down.weight": torch.randn(4, t.in_features, generator=g) * 0.2,
                   f"{name}.lora_up.weight": torch.randn(t.out_features, 4, generator=g) * 0.2,
                   f"{name}.alpha": torch.tensor(2.0)})
    save_file(sd, str(path))
    return sd


@pytest.mark.slow
def test_sd3_kohya_and_diffusers_names_bake_the_same(tmp_path, tiny_model):
    """kohya `lora_unet_joint_blocks_N_x_block_attn_qkv` = diffusers `transformer.transformer_blocks.N.
    attn.to_q/to_k/to_v` (row thirds), `context_block.attn.qkv` = `attn.add_{q,k,v}_proj`, mlp fc1/fc2
    = ff(.context).net.0.proj/net.2 (diffusers' SD3 single-file converter, dit_keys.sd3_rules)."""
    ckpt = tiny_model("sd3", 1)
    table = module_table("sd3", read_header(ckpt).shapes())
    sd = _sd3_kohya(tmp_path / "k.safetensors", ckpt)
    assert any(k.startswith("lora_unet_joint_blocks_0_context_block_attn_qkv") for k in sd)
    diff, swapped = {}, set()
    for key, tensor in sd.items():
        name, suffix = key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0], \
            key.split(".", 1)[1]
        if suffix == "alpha":
            continue
        t = table.lookup(name)
        parts = table.diffusers[t.key]
        up, down, alpha = sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"], sd[f"{name}.alpha"]
        if suffix != "lora_down.weight":
            continue
        n = up.shape[0]
        for dname, rows in parts:
            if rows == SWAPPED:  # the last context block's adaLN: diffusers swaps its halves
                swapped.add(t.key)
                continue
            a, b = (0, n) if rows is None else (n * rows[0] // rows[2], n * rows[1] // rows[2])
            diff[f"{dname}.lora_A.weight"] = down.clone()
            diff[f"{dname}.lora_B.weight"] = up[a:b] * (float(alpha) / 4)
    assert "transformer.transformer_blocks.0.attn.add_k_proj.lora_B.weight" in diff
    save_file(diff, str(tmp_path / "d.safetensors"))
    k_out = merge(tmp_path, {"A": ckpt, "L": tmp_path / "k.safetensors"},
                  "  - {id: m, method: add_lora, inputs: [A, L]}", out="k_out.safetensors")
    d_out = merge(tmp_path, {"A": ckpt, "L": tmp_path / "d.safetensors"},
                  "  - {id: m, method: add_lora, inputs: [A, L]}", out="d_out.safetensors")
    base = load_file(ckpt)
    changed = [k for k in base if not torch.equal(k_out[k], base[k].float()) and k not in swapped]
    assert len(changed) > 20 and len(swapped) == 1
    for k in changed:
        assert torch.allclose(k_out[k], d_out[k], atol=1e-6), k


@pytest.mark.slow
def test_sd3_kohya_lora_preview_equals_bake(tmp_path, tiny_model):
    """diffusers' SD3 loader reads no kohya names (a kohya SD3 LoRA would do nothing); the preview
    hands them over under diffusers names and matches the bake."""
    from workbench.pipeline.generate import LoraUse, load_model
    from workbench.pipeline.load import load_pipeline
    from workbench.pipeline.loras import attached_loras

    ckpt = tiny_model("sd3", 1)
    _sd3_kohya(tmp_path / "k.safetensors", ckpt)
    out = merge(tmp_path, {"A": ckpt, "L": tmp_path / "k.safetensors"},
                "  - {id: m, method: add_lora, inputs: [A, L], alpha: 0.7}")
    save_file(out, str(tmp_path / "baked.safetensors"))
    baked = load_pipeline(tmp_path / "baked.safetensors", "sd3", torch.float32)

    def run(pipe):
        m = pipe.transformer
        c = m.config
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            den = m(hidden_states=torch.randn(1, c.in_channels, 8, 8, generator=g),
                    encoder_hidden_states=torch.randn(1, 5, c.joint_attention_dim, generator=g),
                    pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g),
                    timestep=torch.tensor([500.0]))[0]
            te = pipe.text_encoder(torch.arange(10)[None])[0]
            te2 = pipe.text_encoder_2(torch.arange(10)[None])[0]
        return den, te, te2

    model = load_model(ckpt, device="cpu")
    plain = run(model.pipe)
    with attached_loras(model, [LoraUse(tmp_path / "k.safetensors", 0.7)]):
        got = run(model.pipe)
    want = run(baked)
    for g_, w_, p_ in zip(got, want, plain):
        assert torch.allclose(g_, w_, atol=3e-5) and not torch.allclose(g_, p_, atol=1e-4)
