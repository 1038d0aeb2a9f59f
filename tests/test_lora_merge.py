"""LoRA module tables, LoRA merging in the merge graph, and LoRA extraction, on tiny real-layout models."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from workbench.errors import NotAvailableError, WorkbenchError
from workbench.formats.blocks import block_of
from workbench.formats.lora_keys import kohya_modules, module_table
from workbench.formats.safetensors_io import read_header
from workbench.recipes import parse_recipe
from workbench.runner import run_recipe
from workbench.testing import ldm_keys

sys.path.insert(0, str(Path(__file__).parent))
import _formats_keys as fk  # noqa: E402

GOLDEN = json.loads(Path("/work/shared/reference/lora_kohya_keys.json").read_text())["models"] \
    if Path("/work/shared/reference/lora_kohya_keys.json").exists() else None
needs_golden = pytest.mark.skipif(GOLDEN is None, reason="golden kohya key list not available")
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

@needs_golden
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
        # _formats_keys writes SDXL proj_in/out as 1x1 convs (real files: Linear); both take [r, in]
        assert down[1] == t.in_features and (list(down[2:]) == list(t.kernel) or set(t.kernel) == {1}), name
        assert up[0] == t.out_features and up[1] == down[0], name
    if arch == "sdxl":  # CLIP-G q/k/v are row thirds of the fused OpenCLIP in_proj_weight
        q = table.lookup("lora_te2_text_model_encoder_layers_3_self_attn_k_proj")
        assert q.key == "conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight"
        assert q.row_range() == (1280, 2560)


@needs_golden
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

def test_kohya_lora_changes_exactly_the_targeted_keys(tmp_path, tiny_model):
    base_path = tiny_model("sd15", 1)
    base = load_file(base_path)
    names = sd15_unet_names(base)
    modules = {n: (k, None) for n, k in names.items() if GOLDEN is None or n in GOLDEN["sd15"]}
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
    import workbench.merge.runner as mr

    monkeypatch.setattr(mr, "open_model", lambda *a, **k: pytest.fail("a tensor was read"))
    from workbench.merge.build import build_plan

    body = (f"kind: merge\nname: t\nmodels:\n  A: {tiny_model('sd15', 0)}\n  L: {tmp_path / 'xl.safetensors'}\n"
            "steps:\n  - {id: m, method: add_lora, inputs: [A, L]}\noutput:\n  path: o.safetensors\n")
    recipe = parse_recipe(body, tmp_path / "r.yaml")
    with pytest.raises(WorkbenchError, match=r"A \(sd15_0.safetensors\) is sd15, L \(xl.safetensors\) is sdxl LoRA"):
        build_plan(recipe)
    assert not (tmp_path / "o.safetensors").exists()


def test_loha_and_misused_lora_are_clear_errors(tmp_path, tiny_model):
    base_path = tiny_model("sd15", 0)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.hada_w1_a": torch.zeros(16, 2), f"{name}.hada_w1_b": torch.zeros(2, 16),
               f"{name}.hada_w2_a": torch.zeros(16, 2), f"{name}.hada_w2_b": torch.zeros(2, 16),
               f"{name}.alpha": torch.tensor(1.0)}, str(tmp_path / "h.safetensors"))
    from workbench.merge.build import build_plan

    def plan(step, lora="h.safetensors"):
        body = (f"kind: merge\nname: t\nmodels:\n  A: {base_path}\n  L: {tmp_path / lora}\n"
                f"steps:\n  - {step}\noutput:\n  path: {tmp_path / 'o.safetensors'}\n")
        return build_plan(parse_recipe(body, tmp_path / "r.yaml"))

    with pytest.raises(NotAvailableError, match="LoHa"):
        plan("{id: m, method: add_lora, inputs: [A, L]}")
    kohya_lora(tmp_path / "k.safetensors", load_file(base_path),
               {name: (UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", None)})
    with pytest.raises(WorkbenchError, match="add_lora"):
        plan("{id: m, method: weighted_sum, inputs: [A, L], alpha: 0.5}", "k.safetensors")


# -------------------------------------------------------------------------------------- extraction

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
    if GOLDEN is not None:
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

    # kohya's default quantile clamp bounds every value at the 0.99 quantile (a small, bounded error)
    clamped = load_file(extract_lora(tmp_path / "tuned.safetensors", base_path, tmp_path / "c.safetensors",
                                     rank=r, dtype="fp32", progress=False))
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    joined = torch.cat([clamped[f"{name}.lora_up.weight"].flatten(), clamped[f"{name}.lora_down.weight"].flatten()])
    free = torch.cat([lora[f"{name}.lora_up.weight"].flatten(), lora[f"{name}.lora_down.weight"].flatten()])
    assert joined.abs().max() < free.abs().max()

    # diffusers accepts the file with every module matched
    from workbench.core.load import load_pipeline

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
