"""What reads what: every file kind the user meets × every reader of the workbench (issue #15).

One parametrized test per cell of the matrix (file kind × generate, grid, train base, merge input,
models scan) on tiny files written by the tools that define each format (the `gguf` package's
writer and quantizers, bitsandbytes, our kohya exporter). A cell's test runs the reader's real
dry run (recipe -> `dispatch.build_plan`: detection, the memory plan from the header, the field
checks) or the scan; the full run of a cell (images, a trained LoRA, a written merge) is in the
test its `FULL` entry names, or in the slow tests at the end of this module. Unsupported cells
assert the refusal and its reason; "n/a" cells are combinations that do not exist (an LBW string
is not a file).

`WORKBENCH_MATRIX=path.md pytest tests/test_file_kinds.py` writes the matrix as a markdown table
with each cell's outcome in this run (README.md "Which files load where" holds a copy).
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from workbench.dispatch import build_plan, run_recipe
from workbench.formats.scan import scan_file
from workbench.recipes import parse_recipe

sys.path.insert(0, str(Path(__file__).parent))
from test_scaled_fp8 import write_scaled  # noqa: E402

from helpers.packed_training import packed_weights_watched  # noqa: E402

KINDS = {  # id -> what the table calls it
    "checkpoint": "checkpoint (.safetensors)",
    "gguf_q8_0": "GGUF Q8_0",
    "gguf_q4_k": "GGUF Q4_K",
    "nf4": "Forge NF4 (bitsandbytes)",
    "scaled_fp8": "ComfyUI scaled fp8",
    "lora": "LoRA (kohya)",
    "loha": "LoHa",
    "lokr": "LoKr",
    "dora": "DoRA",
    "lbw": "LoRA Block Weight string",
}
READERS = ("generate", "grid", "train base", "merge input", "models scan")
MODELS = ("checkpoint", "gguf_q8_0", "gguf_q4_k", "nf4", "scaled_fp8")
LORAS = ("lora", "loha", "lokr", "dora")

# What each cell is: yes (read), refused (with the reason the test asserts), n/a.
EXPECTED: dict[tuple[str, str], str] = {}
for _k in MODELS:
    EXPECTED.update({(_k, r): "yes" for r in READERS})
for _k in ("gguf_q8_0", "gguf_q4_k", "nf4"):
    EXPECTED[(_k, "merge input")] = "refused unless `output.allow_dequantized: true`, then read dequantized"
EXPECTED[("gguf_q8_0", "train base")] = EXPECTED[("gguf_q4_k", "train base")] = "yes (frozen base stays packed; a UNet/transformer-only file with `components:`)"
EXPECTED[("scaled_fp8", "merge input")] = "yes (scales multiplied out)"
for _k in LORAS:
    EXPECTED.update({(_k, "generate"): "yes (`loras:`)", (_k, "grid"): "yes (`lora` axis)",
                     (_k, "train base"): "refused: a LoRA is not a base model",
                     (_k, "merge input"): "yes (`add_lora` bake)", (_k, "models scan"): "yes"})
EXPECTED.update({("lbw", "generate"): "yes (`path:weight:INS`)", ("lbw", "grid"): "yes (`path:weight:INS`)",
                 ("lbw", "train base"): "n/a (not a file)", ("lbw", "merge input"): "yes (`blocks:` on `add_lora`)",
                 ("lbw", "models scan"): "n/a (not a file)"})

# The test that runs each supported cell end to end (images, training, merge written).
FULL = {
    ("checkpoint", "generate"): "test_generate.py::test_lora_at_generation_time_equals_the_baked_merge",
    ("checkpoint", "grid"): "test_grid_grid.py::test_grid_runs_each_model_once_and_writes_everything",
    ("checkpoint", "train base"): "test_train_loop.py::test_resume_equals_uninterrupted_and_outputs",
    ("checkpoint", "merge input"): "test_merge_engine.py::test_weighted_sum_equals_formula_in_fp32_cast_once",
    ("gguf_q8_0", "generate"): "test_gguf.py::test_flux_gguf_folder_generates_close_to_bf16_and_takes_a_lora",
    ("gguf_q8_0", "grid"): "test_gguf.py::test_grid_runs_a_gguf_folder_beside_its_source",
    ("gguf_q8_0", "train base"): "test_gguf.py::test_a_lora_trains_on_a_gguf_flux_base",
    ("gguf_q8_0", "merge input"): "test_gguf.py::test_merges_refuse_gguf_unless_allowed_then_merge_its_dequantized_values",
    ("gguf_q4_k", "generate"): "test_gguf.py::test_sdxl_gguf_checkpoint_q4_k_weights_equal_gguf_and_image_is_close",
    ("gguf_q4_k", "grid"): "test_file_kinds.py::test_q4_k_gguf_base_in_a_grid_with_a_lora",
    ("gguf_q4_k", "train base"): "test_file_kinds.py::test_a_lora_trains_on_a_gguf_q4_k_base",
    ("nf4", "generate"): "test_nf4_file.py::test_weights_equal_bitsandbytes_dequantization_and_the_image_is_close",
    ("nf4", "grid"): "test_file_kinds.py::test_forge_nf4_in_a_grid",
    ("nf4", "train base"): "test_nf4_file.py::test_a_lora_trains_on_a_forge_nf4_base",
    ("nf4", "merge input"): "test_nf4_file.py::test_merges_refuse_nf4_unless_allowed_then_merge_the_dequantized_weights",
    ("scaled_fp8", "generate"): "test_scaled_fp8.py::test_auto_plan_keeps_a_scaled_unet_in_fp8_with_its_own_values",
    ("scaled_fp8", "merge input"): "test_scaled_fp8.py::test_merge_and_extraction_read_a_scaled_file_as_its_multiplied_out_weights",
    **{(k, r): "test_lora_variants.py::test_trained_variant_bakes_and_previews_like_peft"
       for k in ("loha", "lokr", "dora") for r in ("generate", "merge input")},
    ("lora", "generate"): "test_generate.py::test_lora_at_generation_time_equals_the_baked_merge",
    ("lora", "grid"): "test_grid_cells.py::test_prompt_sr_lora_size_and_merge_axes",
    ("lora", "merge input"): "test_lora_merge.py::test_alpha_zero_or_missing_preview_equals_bake",
    ("lbw", "generate"): "test_lbw.py::test_block_weighted_preview_equals_block_weighted_bake",
    ("lbw", "merge input"): "test_lbw.py::test_block_weighted_preview_equals_block_weighted_bake",
}

OUTCOMES: dict[tuple[str, str], str] = {}


def _table() -> str:
    head = "| file kind | " + " | ".join(READERS) + " |\n|---|" + "---|" * len(READERS) + "\n"
    rows = []
    for kind, label in KINDS.items():
        cells = []
        for reader in READERS:
            outcome = OUTCOMES.get((kind, reader))
            text = EXPECTED[(kind, reader)]
            cells.append(text if outcome == "passed" else f"{text} (not run: {outcome or 'skipped'})")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


@pytest.fixture(scope="module", autouse=True)
def _write_matrix():
    yield
    target = os.environ.get("WORKBENCH_MATRIX")
    if target:
        Path(target).write_text(_table())


# ------------------------------------------------------------------------------------------ files

def _lora_file(base: Path, kind: str, folder: Path) -> Path:
    """A kohya-format LoRA/LoHa/LoKr/DoRA for `base` as our trainer exports it, with random
    (non-zero) weights; text encoder included."""
    from workbench.formats.safetensors_io import read_header
    from workbench.pipeline.load import load_pipeline
    from workbench.train.export import TrainFacts, save_kohya
    from workbench.train.network import inject, plan_network

    pipe = copy.deepcopy(load_pipeline(base, "sd15", torch.float32))
    plan = plan_network("sd15", read_header(base).shapes(), type=kind, rank=4, alpha=2.0, train_text_encoder=True)
    net = inject(pipe, plan)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.named_trainable().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    path = folder / f"tiny-{kind}.safetensors"
    save_kohya(net, path, TrainFacts(kind, "sd15", base), dtype="fp32")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model):
    """{kind: path} of tiny files of every kind (SD1.5 where the kind exists for it; NF4: FLUX)."""
    gguf = pytest.importorskip("gguf")  # noqa: F841
    from workbench.testing.gguf_files import build_gguf

    d = tmp_path_factory.mktemp("kinds")
    sd15 = tiny_model("sd15")
    out = {"checkpoint": sd15,
           "gguf_q8_0": build_gguf(sd15, d / "sd15-tiny-Q8_0.gguf", "sd15", "Q8_0", layout="checkpoint"),
           "gguf_q4_k": build_gguf(sd15, d / "sd15-tiny-Q4_K.gguf", "sd15", "Q4_K", layout="checkpoint")}
    write_scaled(str(sd15), d / "sd15-tiny_fp8_scaled.safetensors", d / "plain.safetensors",
                 prefix="model.diffusion_model.", layout="new")
    out["scaled_fp8"] = d / "sd15-tiny_fp8_scaled.safetensors"
    for kind in LORAS:
        out[kind] = _lora_file(sd15, kind, d)
    try:
        from workbench.testing.nf4_files import write_nf4

        out["nf4"] = write_nf4(tiny_model("flux"), d / "flux1-dev-bnb-nf4-v2.safetensors", nested=False)
    except ImportError:  # bitsandbytes not installed: the NF4 cells skip
        pass
    out["flux"] = tiny_model("flux")
    return out


def _file(files, kind: str) -> Path:
    if kind not in files:
        pytest.skip(f"{kind}: its writer's package is not installed")
    return files[kind]


def _recipe(tmp_path: Path, text: str):
    return parse_recipe(text, tmp_path / "r.yaml")


def _base_for(files, kind: str) -> Path:
    """A plain checkpoint of the same architecture as `kind`'s file."""
    return files["flux"] if kind == "nf4" else files["checkpoint"]


# ------------------------------------------------------------------------------------------ readers

def _generate(files, kind, tmp_path):
    common = "prompt: a red fox\nsteps: 2\nwidth: 64\nheight: 64\nmemory: {device: cpu}\n" \
             f"output: {{dir: {tmp_path / 'o'}}}\n"
    if kind in MODELS:
        plan = build_plan(_recipe(tmp_path, f"kind: generate\nmodel: {_file(files, kind)}\n{common}"))
        assert not plan.problems, plan.problems
        return plan.detail.decision("unet" if kind != "nf4" else "transformer").storage
    spec = f"{files['lora' if kind == 'lbw' else kind]}:0.8" + (":INS" if kind == "lbw" else "")
    plan = build_plan(_recipe(tmp_path, f"kind: generate\nmodel: {files['checkpoint']}\nloras: ['{spec}']\n{common}"))
    assert not plan.problems, plan.problems
    assert any(i.label == "loras[0]" and i.kind == "lora" for i in plan.inputs)


def _grid(files, kind, tmp_path):
    common = f"seeds: [1]\noutput: {{dir: {tmp_path / 'g'}}}\nmemory: {{device: cpu}}\n"
    if kind in MODELS:
        text = (f"kind: grid\ndefaults: {{steps: 2, width: 64, height: 64}}\n"
                f"x: {{axis: model, values: [{_file(files, kind)}, {_base_for(files, kind)}]}}\n{common}")
    else:
        spec = f"{files['lora' if kind == 'lbw' else kind]}:0.8" + (":INS" if kind == "lbw" else "")
        text = (f"kind: grid\ndefaults: {{model: {files['checkpoint']}, steps: 2, width: 64, height: 64}}\n"
                f"x: {{axis: lora, values: ['{spec}']}}\n{common}")
    plan = build_plan(_recipe(tmp_path, text))
    assert not plan.problems, plan.problems
    assert any("memory plan for" in ln for ln in plan.lines)


def _train(files, kind, tmp_path, style_set):
    if kind == "lbw":
        return  # n/a: a block-weight string weights a LoRA where it is used; a training base is a file
    text = (f"kind: train\nname: t\nbase: {files['lora'] if kind == 'lbw' else _file(files, kind)}\n"
            f"dataset: {style_set}\ntrigger: wbstyle\nresolution: 64\nmax_steps: 2\n"
            f"network: {{type: lora, rank: 4, alpha: 4}}\noutput: {{dir: {tmp_path / 't'}}}\n")
    plan = build_plan(_recipe(tmp_path, text))
    if kind in LORAS:
        assert any(p.startswith("base:") and "LoRA" in p for p in plan.problems), plan.problems
    else:
        assert not plan.problems, plan.problems


def _merge(files, kind, tmp_path):
    out = tmp_path / "m.safetensors"
    if kind in MODELS:
        text = (f"kind: merge\nname: m\nmodels: {{A: {_file(files, kind)}, B: {_base_for(files, kind)}}}\n"
                "steps:\n  - {id: m, method: weighted_sum, inputs: [A, B], alpha: 0.5}\n"
                f"output: {{path: {out}}}\n")
        plan = build_plan(_recipe(tmp_path, text))
        if kind in ("gguf_q8_0", "gguf_q4_k", "nf4"):
            assert any("model A:" in p and "output.allow_dequantized: true" in p for p in plan.problems), plan.problems
            allowed = build_plan(_recipe(tmp_path, text.replace(f"path: {out}", f"path: {out}, allow_dequantized: true")))
            assert not allowed.problems, allowed.problems
            assert any("read dequantized" in ln for ln in allowed.lines)
        else:
            assert not plan.problems, plan.problems
        return
    lora = files["lora" if kind == "lbw" else kind]
    blocks = ", blocks: INS" if kind == "lbw" else ""
    text = (f"kind: merge\nname: m\nmodels: {{A: {files['checkpoint']}, L: {lora}}}\n"
            f"steps:\n  - {{id: m, method: add_lora, inputs: [A, L]{blocks}}}\noutput: {{path: {out}}}\n")
    plan = build_plan(_recipe(tmp_path, text))
    assert not plan.problems, plan.problems


def _scan(files, kind, tmp_path):
    if kind == "lbw":
        return  # n/a: not a file
    path = _file(files, kind)
    entry = scan_file(path, path.parent, with_hash=False)
    assert entry is not None and entry.error is None, entry
    if kind in LORAS:
        assert (entry.arch, entry.kind) == ("sd15", "lora"), entry
        return
    want = {"checkpoint": None, "gguf_q8_0": "GGUF Q8_0", "gguf_q4_k": "GGUF Q4_K", "nf4": "bitsandbytes nf4"}.get(kind)
    assert entry.kind == "checkpoint" and entry.arch == ("flux" if kind == "nf4" else "sd15"), entry
    if want:
        assert entry.dtype.startswith(want), entry.dtype


@pytest.mark.slow
@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_cell(kind, reader, files, tmp_path, style_set):
    """One cell: the reader's real dry run (or scan) on the tiny file; see FULL for the full run."""
    OUTCOMES[(kind, reader)] = "failed"
    if reader == "generate":
        _generate(files, kind, tmp_path)
    elif reader == "grid":
        _grid(files, kind, tmp_path)
    elif reader == "train base":
        _train(files, kind, tmp_path, style_set)
    elif reader == "merge input":
        _merge(files, kind, tmp_path)
    else:
        _scan(files, kind, tmp_path)
    OUTCOMES[(kind, reader)] = "passed"


def test_every_cell_has_a_status_and_the_full_tests_named_exist():
    """Every cell is listed; every model file kind's generate, grid and merge cells (where the
    file is read for real) name a full test, and every named test exists."""
    assert set(EXPECTED) == {(k, r) for k in KINDS for r in READERS}
    untested = [c for c, s in EXPECTED.items() if s.startswith("yes") and c[0] in MODELS and c[1] != "models scan"
                and c not in FULL and c[0] != "scaled_fp8"]
    assert not untested, untested
    here = Path(__file__).parent
    for cell, target in FULL.items():
        module, _, name = target.partition("::")
        assert (here / module).is_file(), (cell, target)
        assert f"def {name}(" in (here / module).read_text(), (cell, target)


# ------------------------------------------------------------------------ full runs not tested elsewhere

def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def _grid_cells(out: Path) -> dict[tuple[str, str], np.ndarray]:
    """{(model name, LoRA weight text or ""): pixels} from the cells' A1111 parameters."""
    import re

    found = {}
    for p in sorted((out / "cells").glob("*.png")):
        text = Image.open(p).info["parameters"]
        model = re.search(r"Model: ([^,\n]+)", text).group(1)
        lora = re.search(r"<lora:[^:>]+:([\d.]+)>", text)
        found[(model, lora.group(1) if lora else "")] = np.asarray(Image.open(p), dtype=np.int16)
    return found


@pytest.mark.slow
def test_q4_k_gguf_base_in_a_grid_with_a_lora(files, tmp_path):
    """A GGUF Q4_K checkpoint as a grid model beside its source, with a kohya LoRA on both: the
    Q4_K cells are close to the source's, and the LoRA changes the GGUF base's picture as it
    changes the source's (the LoRA applies on a packed base)."""
    q4, source, lora = files["gguf_q4_k"], files["checkpoint"], files["lora"]
    text = (f"kind: grid\nname: q4\ndefaults: {{steps: 2, width: 64, height: 64, sampler: Euler}}\n"
            f"x: {{axis: model, values: [{q4}, {source}]}}\ny: {{axis: lora, values: ['{lora}:0', '{lora}:1']}}\n"
            f"seeds: [3]\nmemory: {{device: cpu}}\noutput: {{dir: {tmp_path / 'out'}}}\n")
    run_recipe(_recipe(tmp_path, text), progress=False)
    cells = _grid_cells(tmp_path / "out")
    assert len(cells) == 4 and (tmp_path / "out" / "grid.png").is_file()
    q, s = q4.stem, source.stem
    plain_gap = _diff(cells[(q, "0")], cells[(s, "0")])
    lora_gap = _diff(cells[(q, "1")], cells[(s, "1")])
    effect = _diff(cells[(s, "1")], cells[(s, "0")])
    effect_q = _diff(cells[(q, "1")], cells[(q, "0")])
    # measured (mean |diff| of 255): Q4_K vs source 5.3 without the LoRA, 5.7 with it; the LoRA
    # changes the source's picture by 5.4 and the Q4_K base's by 4.9
    assert plain_gap <= 10 and lora_gap <= 10, (plain_gap, lora_gap)
    assert effect > 3 and effect_q > 3, (effect, effect_q)


@pytest.mark.slow
def test_forge_nf4_in_a_grid(files, tmp_path):
    """A Forge NF4 FLUX checkpoint as a grid model beside its bf16 source: different files, nearly
    one picture."""
    nf4, source = _file(files, "nf4"), files["flux"]
    text = (f"kind: grid\nname: nf4\ndefaults: {{steps: 2, cfg: 3.5, width: 64, height: 64, sampler: Euler}}\n"
            f"x: {{axis: model, values: [{nf4}, {source}]}}\nseeds: [3]\nmemory: {{device: cpu}}\n"
            f"output: {{dir: {tmp_path / 'out'}}}\n")
    run_recipe(_recipe(tmp_path, text), progress=False)
    cells = _grid_cells(tmp_path / "out")
    assert len(cells) == 2
    gap = _diff(cells[(nf4.stem, "")], cells[(source.stem, "")])
    assert 0 < gap <= 16  # NF4 (4-bit) against bf16 on the tiny FLUX: measured 11.0 (test_nf4_file: 11.9)


@pytest.mark.slow
def test_a_lora_trains_on_a_gguf_q4_k_base(files, style_set, tmp_path):
    """Two steps on a GGUF Q4_K SD1.5 base: the LoRA learns (non-zero, finite), the base's packed
    weights are unchanged."""
    from safetensors.torch import load_file

    from workbench.dispatch import run_plan

    text = (f"kind: train\nname: q4\nbase: {files['gguf_q4_k']}\ndataset: {style_set}\ntrigger: wbstyle\n"
            "resolution: 64\nmax_steps: 2\nlearning_rate: 1.0e-3\nseed: 5\nnetwork: {type: lora, rank: 4, alpha: 4}\n"
            f"output: {{dir: {tmp_path / 'f'}, save_every: 2, save_precision: fp32}}\n")
    recipe = _recipe(tmp_path, text)
    with packed_weights_watched() as seen:
        result = run_plan(build_plan(recipe), progress=False, cache_root=tmp_path / "cache")
    assert "2/2 steps" in result.summary
    assert len(seen["before"]) > 20
    assert all(torch.equal(seen["before"][n], seen["after"][n]) for n in seen["before"])
    w = load_file(str(recipe.lora_path))
    assert all(torch.isfinite(v).all() for v in w.values())
    ups = [v for k, v in w.items() if k.startswith("lora_unet_") and k.endswith("lora_up.weight")]
    assert ups and any(v.abs().sum() > 0 for v in ups)
