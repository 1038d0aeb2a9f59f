"""`workbench convert`: pickle checkpoints become safetensors copies through PyTorch's restricted
unpickler; a pickle that asks for code is refused, runs nothing and leaves no file."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from workbench.cli import main
from workbench.formats.convert import convert, load_state_dict
from workbench.formats.detect import detect
from workbench.formats.safetensors_io import read_header


class RunsAShellCommand:
    """What a malicious checkpoint carries: unpickling it would call os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.fixture
def a1111_ckpt(tmp_path, tiny_sd15):
    """A tiny SD1.5 checkpoint saved the way A1111/Lightning .ckpt files are: the weights under
    `state_dict`, next to training counters."""
    weights = load_file(tiny_sd15["A"])
    path = tmp_path / "old-model.ckpt"
    torch.save({"epoch": 6, "global_step": 840000, "state_dict": weights}, path)
    return path, weights


@pytest.mark.slow
def test_convert_a1111_ckpt_keeps_every_tensor(a1111_ckpt, capsys):
    src, weights = a1111_ckpt
    assert main(["convert", str(src)]) == 0
    out = src.with_suffix(".safetensors")
    assert f"wrote {out}" in capsys.readouterr().out
    converted = load_file(out)
    assert converted.keys() == weights.keys()
    for name, tensor in weights.items():
        assert converted[name].dtype == tensor.dtype and torch.equal(converted[name], tensor), name
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["workbench_converted_from"] == "old-model.ckpt"
    assert meta["workbench_source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert not any(str(src.parent) in v for v in meta.values())  # no local folder in the file
    info = detect(read_header(out))
    assert (info.arch, info.kind) == ("sd15", "checkpoint")


def test_convert_never_overwrites_without_the_flag(a1111_ckpt, tmp_path, capsys):
    src, _ = a1111_ckpt
    out = tmp_path / "copy.safetensors"
    out.write_bytes(b"keep me")
    assert main(["convert", str(src), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert main(["convert", str(src), "--out", str(out), "--overwrite"]) == 0
    assert len(load_file(out)) > 100
    assert main(["convert", str(src), "--out", str(tmp_path / "x.ckpt")]) == 2
    assert "expected a .safetensors file name" in capsys.readouterr().err


def test_nested_containers_are_flattened_and_counters_left_out(tmp_path):
    path = tmp_path / "emb.pt"
    torch.save({"string_to_param": {"*": torch.ones(2, 768)}, "name": "emb", "step": 3}, path)
    tensors, skipped = load_state_dict(path)
    assert list(tensors) == ["string_to_param.*"] and sorted(skipped) == ["name", "step"]
    result = convert(path)
    assert result.tensors == 1 and "left out 2 non-tensor entries" in str(result)


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "the-command-ran"
    src = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "callbacks": RunsAShellCommand(marker)}, src)
    before = set(os.listdir(tmp_path))
    assert main(["convert", str(src)]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and ".system" in err and "nothing was written" in err
    assert f"{os.system.__module__}.system" in err  # the global it wanted, by name
    assert not marker.exists()
    assert set(os.listdir(tmp_path)) == before  # no output, no temp file


def test_corrupt_and_wrong_inputs(tmp_path, capsys):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"this is not a checkpoint at all")
    assert main(["convert", str(junk)]) == 2
    assert "not a readable PyTorch checkpoint" in capsys.readouterr().err
    assert not junk.with_suffix(".safetensors").exists()
    st = tmp_path / "a.safetensors"
    st.write_bytes(b"")
    assert main(["convert", str(st)]) == 2
    assert "need no conversion" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing.ckpt")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_recipe_inputs_that_are_pickles_point_to_convert(tmp_path, tiny_sd15, capsys):
    ckpt = tmp_path / "old.ckpt"
    torch.save({"w": torch.ones(1)}, ckpt)
    recipe = tmp_path / "m.yaml"
    recipe.write_text(f"kind: merge\nname: m\nmodels: {{A: {tiny_sd15['A']}, B: old.ckpt}}\n"
                      "steps:\n  - {id: mix, method: weighted_sum, inputs: [A, B], alpha: 0.5}\n"
                      "output: {path: out.safetensors}\n")
    assert main(["merge", str(recipe), "--dry-run"]) == 1
    out = capsys.readouterr().out
    assert "can run code when loaded" in out and f"workbench convert {ckpt}" in out
