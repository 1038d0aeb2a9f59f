"""The merge engine on tiny real-layout SD1.5 checkpoints, against the reference formulas."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from workbench.errors import OutputExistsError, WorkbenchError
from workbench.formats.blocks import block_of
from workbench.formats.hashes import sha256_file
from workbench.recipes import parse_recipe
from workbench.dispatch import run_recipe

POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


def merge(tmp_path: Path, body: str, **kw):
    """Write a recipe next to the inputs, run it, return (output tensors, output path)."""
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(body)
    recipe = parse_recipe(body, recipe_path)
    run_recipe(recipe, progress=False, **kw)
    out = Path(recipe.output.path)
    return load_file(out), out


def recipe_text(models: dict[str, Path], steps: str, output: str = "out.safetensors", extra: str = "") -> str:
    lines = ["kind: merge", "name: t", "models:"]
    lines += [f"  {k}: {v}" for k, v in models.items()]
    return "\n".join(lines) + f"\nsteps:\n{steps}\noutput:\n  path: {output}\n{extra}"


@pytest.mark.slow
def test_weighted_sum_equals_formula_in_fp32_cast_once(tmp_path, tiny_sd15):
    a, b = load_file(tiny_sd15["A"]), load_file(tiny_sd15["B"])
    out, _ = merge(tmp_path, recipe_text(tiny_sd15, "  - {id: m, method: weighted_sum, inputs: [A, B], alpha: 0.3}"))
    assert set(out) == set(a) and len(out) == 1131
    for key, ta in a.items():
        if not ta.is_floating_point():
            assert torch.equal(out[key], ta), key
            continue
        expected = ((1 - 0.3) * ta.float() + 0.3 * b[key].float()).to(ta.dtype)
        assert torch.equal(out[key], expected), key


@pytest.mark.slow
def test_add_difference_equals_formula(tmp_path, tiny_sd15):
    a, b, c = (load_file(tiny_sd15[n]) for n in "ABC")
    out, _ = merge(tmp_path, recipe_text(tiny_sd15, "  - {id: m, method: add_difference, inputs: [A, B, C], alpha: 0.7}",
                                         extra="  dtype: fp32\n"))
    for key, ta in a.items():
        if ta.is_floating_point():
            expected = ta.float() + 0.7 * (b[key].float() - c[key].float())
            assert out[key].dtype == torch.float32
            assert torch.equal(out[key], expected), key


@pytest.mark.slow
def test_chain_with_block_weights_follows_the_block_table(tmp_path, tiny_sd15):
    blocks = [0, 0.2, 0.4, 0.6, 0.8, 1, 1, 1, 1, 1, 1, 1, 1, 0.5, 1, 1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2, 0, 0.1]
    ids = ["BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12))]
    alpha = dict(zip(ids, blocks))
    steps = ("  - {id: tuned, method: add_difference, inputs: [A, B, C], alpha: 0.7}\n"
             f"  - {{id: final, method: block_weighted, inputs: [tuned, A], blocks: \"{','.join(map(str, blocks))}\"}}")
    out, _ = merge(tmp_path, recipe_text(tiny_sd15, steps, extra="  dtype: fp32\n"))
    a, b, c = (load_file(tiny_sd15[n]) for n in "ABC")
    for key, ta in a.items():
        if not ta.is_floating_point():
            continue
        tuned = ta.float() + 0.7 * (b[key].float() - c[key].float())
        w = alpha[block_of("sd15", key)]
        assert torch.equal(out[key], (1 - w) * tuned + w * ta.float()), key
    # supermerger's convention: time_embed in IN00 (0.2), out.* in OUT11 (0.1), encoders in BASE (0)
    assert block_of("sd15", "model.diffusion_model.time_embed.0.weight") == "IN00"
    assert block_of("sd15", "model.diffusion_model.out.2.weight") == "OUT11"


def test_alpha_per_component_keeps_text_encoder_and_vae(tmp_path, tiny_sd15):
    a = load_file(tiny_sd15["A"])
    out, _ = merge(tmp_path, recipe_text(tiny_sd15, "  - id: m\n    method: weighted_sum\n    inputs: [A, B]\n"
                                                    "    alpha: {unet: 0.5, text_encoder: 0, vae: 0}"))
    changed = {k for k in a if a[k].is_floating_point() and not torch.equal(out[k], a[k])}
    assert changed and all(k.startswith("model.diffusion_model.") for k in changed)
    assert all(torch.equal(out[k], a[k]) for k in a if k.startswith(("cond_stage_model.", "first_stage_model.")))


@pytest.mark.slow
def test_policies_missing_keys_inpainting_conv_in_and_markers(tmp_path, tiny_sd15):
    a = load_file(tiny_sd15["A"])
    b = load_file(tiny_sd15["B"])
    # A is an inpainting model: conv_in has 9 input channels; it also carries a v_pred marker
    inpaint = dict(a)
    extra = torch.randn(a[CONV_IN].shape[0], 5, *a[CONV_IN].shape[2:]).to(a[CONV_IN].dtype)
    inpaint[CONV_IN] = torch.cat([a[CONV_IN], extra], dim=1)
    inpaint["v_pred"] = torch.tensor([1.0])
    save_file(inpaint, tmp_path / "inpaint.safetensors")
    # B lacks its VAE
    save_file({k: v for k, v in b.items() if not k.startswith("first_stage_model.")}, tmp_path / "novae.safetensors")
    body = recipe_text({"A": tmp_path / "inpaint.safetensors", "B": tmp_path / "novae.safetensors"},
                       "  - {id: m, method: weighted_sum, inputs: [A, B], alpha: 0.5}")
    recipe = parse_recipe(body, tmp_path / "r.yaml")
    plan = run_recipe(recipe, dry_run=True)
    text = plan.plan.render()
    assert "248 missing in an input" in text and "1 conv_in channels differ" in text
    assert "marker key" in text and "non-float tensor" in text
    out, path = merge(tmp_path, body)
    assert len(out) == 1132
    for k in a:
        if k.startswith("first_stage_model."):
            assert torch.equal(out[k], a[k]), k  # kept from the first input
    common = ((0.5 * inpaint[CONV_IN][:, :4].float() + 0.5 * b[CONV_IN].float())).half()
    assert torch.equal(out[CONV_IN][:, :4], common)
    assert torch.equal(out[CONV_IN][:, 4:], extra)
    assert torch.equal(out["v_pred"], inpaint["v_pred"]) and torch.equal(out[POSITION_IDS], a[POSITION_IDS])
    meta = json.loads(_meta(path)["sd_merge_recipe"])
    assert meta["is_inpainting"] is True


def _meta(path):
    from workbench.formats.safetensors_io import read_header

    return read_header(path).metadata


def test_mixed_architectures_refused_before_any_read(tmp_path, tiny_sd15, tiny_model):
    body = recipe_text({"A": tiny_sd15["A"], "B": tiny_model("sdxl")},
                       "  - {id: m, method: weighted_sum, inputs: [A, B], alpha: 0.5}")
    with pytest.raises(WorkbenchError, match=r"A .*is sd15.*B .*is sdxl|different architectures"):
        merge(tmp_path, body)
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_input_gives_clear_error_and_no_output(tmp_path, tiny_sd15, damage):
    bad = tmp_path / "bad.safetensors"
    data = Path(tiny_sd15["B"]).read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64 + data[64:])
    body = recipe_text({"A": tiny_sd15["A"], "B": bad}, "  - {id: m, method: weighted_sum, inputs: [A, B], alpha: 0.5}")
    with pytest.raises(WorkbenchError, match="bad.safetensors"):
        merge(tmp_path, body)
    assert not (tmp_path / "out.safetensors").exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_cancel_midway_leaves_no_file(tmp_path, tiny_sd15):
    from workbench.kinds import merge as merge_kind
    from workbench.merge import executor

    body = recipe_text(tiny_sd15, "  - {id: m, method: weighted_sum, inputs: [A, B], alpha: 0.5}")
    recipe = parse_recipe(body, tmp_path / "r.yaml")
    cancel = threading.Event()
    seen = []
    original = executor.compute_key

    def compute(item):
        seen.append(item.name)
        if len(seen) == 200:
            cancel.set()
        return original(item)

    executor.compute_key = compute
    try:
        with pytest.raises(KeyboardInterrupt):
            merge_kind.run(merge_kind.describe(recipe), progress=False, cancel=cancel)
    finally:
        executor.compute_key = original
    assert 200 <= len(seen) < 1131
    assert not (tmp_path / "out.safetensors").exists() and not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
def test_existing_output_not_overwritten_without_flag(tmp_path, tiny_sd15):
    body = recipe_text(tiny_sd15, "  - {id: m, method: weighted_sum, inputs: [A, B], alpha: 0.5}")
    _, out = merge(tmp_path, body)
    before = out.read_bytes()
    with pytest.raises(OutputExistsError):
        merge(tmp_path, body.replace("alpha: 0.5", "alpha: 0.9"))
    assert out.read_bytes() == before
    merge(tmp_path, body.replace("alpha: 0.5", "alpha: 0.9"), overwrite=True)
    assert out.read_bytes() != before


def test_prune_bake_vae_and_dtype(tmp_path, tiny_sd15):
    a = load_file(tiny_sd15["A"])
    with_ema = dict(a)
    with_ema["model_ema.decay"] = torch.tensor(0.999)
    with_ema["alphas_cumprod"] = torch.linspace(1, 0, 10)
    save_file(with_ema, tmp_path / "ema.safetensors")
    c = load_file(tiny_sd15["C"])
    vae = {k.removeprefix("first_stage_model."): v for k, v in c.items() if k.startswith("first_stage_model.")}
    save_file(vae, tmp_path / "vae.safetensors")
    body = recipe_text({"A": tmp_path / "ema.safetensors", "B": tiny_sd15["B"]},
                       "  - {id: m, method: weighted_sum, inputs: [A, B], alpha: 0.5}",
                       extra=f"  dtype: bf16\n  prune: true\n  bake_vae: {tmp_path / 'vae.safetensors'}\n")
    out, path = merge(tmp_path, body)
    assert "model_ema.decay" not in out and "alphas_cumprod" not in out and len(out) == 1131
    for k, v in vae.items():
        assert torch.equal(out["first_stage_model." + k], v.to(torch.bfloat16))
    assert out["model.diffusion_model.out.2.weight"].dtype == torch.bfloat16
    assert out[POSITION_IDS].dtype == torch.int64


def test_metadata_is_a1111_compatible_and_carries_the_recipe(tmp_path, tiny_sd15):
    body = recipe_text(tiny_sd15, "  - {id: m, method: weighted_sum, inputs: [A, B], alpha: 0.25}", extra="  dtype: fp16\n")
    _, path = merge(tmp_path, body)
    meta = _meta(path)
    recipe = json.loads(meta["sd_merge_recipe"])
    assert recipe["primary_model_hash"] == sha256_file(tiny_sd15["A"])
    assert recipe["secondary_model_hash"] == sha256_file(tiny_sd15["B"])
    assert recipe["interp_method"] == "Weighted sum" and recipe["multiplier"] == 0.25
    assert recipe["save_as_half"] is True
    models = json.loads(meta["sd_merge_models"])
    assert set(models) == {sha256_file(tiny_sd15[n]) for n in "ABC"}
    # the model carries file names and hashes only; the full paths stay in the local provenance
    assert meta["workbench_recipe"] == recipe_text({n: p.name for n, p in tiny_sd15.items()},
                                                   "  - {id: m, method: weighted_sum, inputs: [A, B], alpha: 0.25}",
                                                   extra="  dtype: fp16\n")
    assert json.loads(meta["workbench_inputs"])["B"] == {"file": "B.safetensors",
                                                         "sha256": sha256_file(tiny_sd15["B"])}
    assert "workbench_recipe_path" not in meta and meta["format"] == "pt"
    assert str(tiny_sd15["A"].parent) not in json.dumps(meta) and str(tmp_path) not in json.dumps(meta)
    prov = json.loads((tmp_path / "out.provenance.json").read_text())
    assert prov["inputs"]["A"]["sha256"] == recipe["primary_model_hash"]
    assert prov["inputs"]["A"]["path"] == str(tiny_sd15["A"])
    assert prov["recipe"]["text"] == body


def test_dry_run_reports_policies_ram_size_and_time(tmp_path, tiny_sd15):
    body = recipe_text(tiny_sd15, "  - {id: m, method: weighted_sum, inputs: [A, B], alpha: 0.5}")
    result = run_recipe(parse_recipe(body, tmp_path / "r.yaml"), dry_run=True)
    text = result.plan.render()
    assert "architecture: sd15 (1131 output tensors)" in text
    assert "1130 merged" in text and "1 non-float tensor" in text
    assert "estimated peak RAM" in text and "output size" in text and "estimated time" in text
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.slow
def test_rerun_from_metadata_reproduces_and_checks_hashes(tmp_path, tiny_sd15, capsys):
    import shutil

    from workbench.cli import main

    models = {n: shutil.copy(tiny_sd15[n], tmp_path / f"{n}.safetensors") for n in "AB"}
    body = recipe_text(models, "  - {id: m, method: weighted_sum, inputs: [A, B], alpha: 0.4}")
    first, out = merge(tmp_path, body)
    again = tmp_path / "again.safetensors"
    assert main(["run", "--from-metadata", str(out), "--output", str(again), "--no-progress"]) == 0
    rerun = load_file(again)  # once: loading inside the loop below read the file once per key
    assert Path(again).read_bytes()[:8] and rerun.keys() == first.keys()
    assert all(torch.equal(rerun[k], v) for k, v in first.items())
    # replace input B by another model: the re-run refuses and says which input changed
    shutil.copy(tiny_sd15["C"], models["B"])
    capsys.readouterr()
    assert main(["run", "--from-metadata", str(out), "--output", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "input B" in err and "different file" in err
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.slow
def test_a_moved_merge_finds_its_inputs_by_name_and_hash(tmp_path, tiny_sd15, capsys):
    """Issue #14: a merged model shared or moved elsewhere (without its provenance file) finds
    its inputs by file name + sha256 in the model folders given (--models), and refuses a file of
    that name with another hash."""
    import shutil

    from workbench.cli import main

    made, shared, folder = tmp_path / "made", tmp_path / "elsewhere", tmp_path / "my-models" / "sd"
    for d in (made, shared, folder):
        d.mkdir(parents=True)
    models = {n: shutil.copy(tiny_sd15[n], made / f"{n}.safetensors") for n in "AB"}
    body = recipe_text(models, "  - {id: m, method: weighted_sum, inputs: [A, B], alpha: 0.4}")
    first, out = merge(made, body)
    moved = Path(shutil.move(out, shared / "m.safetensors"))
    for n in "AB":
        shutil.move(models[n], folder / f"{n}.safetensors")
    again = tmp_path / "again.safetensors"
    assert main(["run", "--from-metadata", str(moved), "--output", str(again), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"input A: no file A.safetensors with sha256 {sha256_file(tiny_sd15['A'])} found " \
           f"(looked in {shared})" in err
    assert main(["run", "--from-metadata", str(moved), "--output", str(again), "--no-progress",
                 "--models", str(tmp_path / "my-models")]) == 0
    rerun = load_file(again)
    assert all(torch.equal(rerun[k], v) for k, v in first.items())
    shutil.copy(tiny_sd15["C"], shared / "B.safetensors")  # same name, another file: skipped
    assert main(["run", "--from-metadata", str(moved), "--output", str(tmp_path / "y.safetensors"),
                 "--no-progress", "--models", str(tmp_path / "my-models")]) == 0
    assert all(torch.equal(load_file(tmp_path / "y.safetensors")[k], v) for k, v in first.items())


METHOD_CASES = {
    "weighted_sum": ("A, B", "alpha: 0.3", {"alpha": 0.3}),
    "add_difference": ("A, B, C", "alpha: 0.6", {"alpha": 0.6}),
    "triple_sum": ("A, B, C", "alpha: 0.2, beta: 0.3", {"alpha": 0.2, "beta": 0.3}),
    "sum_twice": ("A, B, C", "alpha: 0.2, beta: 0.3", {"alpha": 0.2, "beta": 0.3}),
    "train_difference": ("A, B, C", "alpha: 0.5", {"alpha": 0.5}),
    "add_cosine_a": ("A, B", "alpha: 0.2", {"alpha": 0.2}),
    "add_cosine_b": ("A, B", "alpha: 0.2", {"alpha": 0.2}),
    "ties": ("A, B, C", "k: 0.3, alpha: 0.8", {"k": 0.3, "alpha": 0.8}),
    "dare": ("A, B, C", "p: 0.4, alpha: 1.0, seed: 7", {"p": 0.4, "alpha": 1.0, "seed": 7}),
    "slerp": ("A, B", "alpha: 0.35", {"alpha": 0.35}),
    "model_stock": ("A, B, C", "", {}),
    "no_merge": ("A", "", {}),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHOD_CASES))
def test_every_method_through_the_engine_equals_the_method_on_each_key(tmp_path, tiny_sd15, method):
    inputs, params_yaml, params = METHOD_CASES[method]
    step = f"  - {{id: m, method: {method}, inputs: [{inputs}]{', ' + params_yaml if params_yaml else ''}}}"
    out, _ = merge(tmp_path, recipe_text(tiny_sd15, step, extra="  dtype: fp32\n"))
    tensors = {n: load_file(tiny_sd15[n]) for n in "ABC"}
    names = [n.strip() for n in inputs.split(",")]
    # the engine computes with one intra-op thread (reductions then sum in one fixed order, the
    # same on every machine); compute the expectation the same way
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _compare_every_key(method, params, names, tensors, out)
    finally:
        torch.set_num_threads(threads)


def _compare_every_key(method, params, names, tensors, out):
    from workbench.merge.graph import is_marker
    from workbench.merge.methods import METHODS

    checked = 0
    for key, ta in tensors["A"].items():
        if not ta.is_floating_point() or is_marker(key):
            assert torch.equal(out[key], ta), key
            continue
        expected = METHODS[method](*(tensors[n][key].float() for n in names), key=key, **params)
        assert torch.equal(out[key], expected), (method, key)
        checked += 1
    assert checked > 1100


@pytest.mark.slow
def test_flux_block_mapping_merge(tmp_path, tiny_model):
    a_path, b_path = tiny_model("flux", 1), tiny_model("flux", 2)
    body = recipe_text({"A": a_path, "B": b_path},
                       "  - {id: m, method: block_weighted, inputs: [A, B], blocks: {BASE: 0, D00: 1, S05: 0.5}}",
                       extra="  dtype: fp32\n")
    out, _ = merge(tmp_path, body)
    a, b = load_file(a_path), load_file(b_path)
    weights = {"D00": 1.0, "S05": 0.5}
    seen = set()
    for key, ta in a.items():
        if not ta.is_floating_point():
            continue
        w = weights.get(block_of("flux", key), 0.0)  # ids left out of the mapping keep A (0)
        seen.add(w)
        assert torch.equal(out[key], (1 - w) * ta.float() + w * b[key].float()), key
    assert seen == {0.0, 0.5, 1.0}


def test_fp8_output(tmp_path, tiny_sd15):
    out, _ = merge(tmp_path, recipe_text(tiny_sd15, "  - {id: m, method: weighted_sum, inputs: [A, B], alpha: 0.5}",
                                         extra="  dtype: fp8_e4m3fn\n"))
    a, b = load_file(tiny_sd15["A"]), load_file(tiny_sd15["B"])
    key = "model.diffusion_model.middle_block.1.proj_in.weight"
    assert out[key].dtype == torch.float8_e4m3fn
    assert torch.equal(out[key], (0.5 * a[key].float() + 0.5 * b[key].float()).to(torch.float8_e4m3fn))
    assert out[POSITION_IDS].dtype == torch.int64


def test_dry_run_shows_hashes_and_refuses_a_full_disk(tmp_path, tiny_sd15, monkeypatch):
    import shutil
    from collections import namedtuple

    body = recipe_text(tiny_sd15, "  - {id: m, method: weighted_sum, inputs: [A, B], alpha: 0.5}")
    recipe = parse_recipe(body, tmp_path / "r.yaml")
    text = run_recipe(recipe, dry_run=True).plan.render()
    assert sha256_file(tiny_sd15["A"])[:10] in text and sha256_file(tiny_sd15["B"])[:10] in text
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    plan = run_recipe(recipe, dry_run=True).plan
    assert any("not enough disk space" in p for p in plan.problems)
    with pytest.raises(WorkbenchError, match="not enough disk space"):
        run_recipe(recipe, progress=False)
    assert not (tmp_path / "out.safetensors").exists()
