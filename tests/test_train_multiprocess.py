"""Training in two processes (`torchrun`, the launcher `accelerate launch` uses; gloo on the CPU):
the same LoRA as one process accumulating two micro-batches per step, text encoder included."""

from __future__ import annotations

import pytest

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from workbench.recipes.loader import load_recipe
from workbench.kinds import train as train_kind

ROOT = Path(__file__).resolve().parent.parent


def run(recipe, **options):
    """The train kind's dry run, then that plan run (as `workbench train` does)."""
    return train_kind.run(train_kind.describe(recipe), **options)


def _recipe(tmp: Path, base: Path, data: Path, name: str, accumulation: int) -> Path:
    # no LoRA dropout: its masks come from each process's own RNG stream
    text = (f"kind: train\nname: {name}\nbase: {base}\ndataset: {data}\ntrigger: wbstyle\nresolution: 64\n"
            f"max_steps: 3\nlearning_rate: 1.0e-3\nseed: 5\ngradient_accumulation_steps: {accumulation}\n"
            "network: {type: lora, rank: 4, alpha: 2, train_text_encoder: true}\n"
            f"output: {{dir: {tmp / name}, save_precision: fp32}}\n")
    path = tmp / f"{name}.yaml"
    path.write_text(text)
    return path


@pytest.mark.slow
def test_two_processes_train_the_same_lora_as_one_with_accumulation(tmp_path, tiny_model, style_set):
    base = tiny_model("sd15")
    cache = tmp_path / "cache"
    two = _recipe(tmp_path, base, style_set, "two", accumulation=1)
    env = {**os.environ, "WORKBENCH_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", "-m", "workbench", "train", str(two)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    one = load_recipe(_recipe(tmp_path, base, style_set, "one", accumulation=2))
    run(one, progress=False, cache_root=cache)
    single = load_recipe(_recipe(tmp_path, base, style_set, "half", accumulation=1))
    run(single, progress=False, cache_root=cache)

    w2 = load_file(str(tmp_path / "two" / "two.safetensors"))
    w1, wh = load_file(str(one.lora_path)), load_file(str(single.lora_path))
    assert w2.keys() == w1.keys() and any(k.startswith("lora_te_") for k in w2)
    for prefix in ("lora_unet_", "lora_te_"):  # DDP's all-reduce and our own for the text encoder
        keys = [k for k in w2 if k.startswith(prefix) and k.endswith("lora_up.weight")]
        a = torch.cat([w2[k].flatten() for k in keys])
        b = torch.cat([w1[k].flatten() for k in keys])
        h = torch.cat([wh[k].flatten() for k in keys])
        assert a.abs().sum() > 0
        assert float((a - b).norm() / b.norm()) < 1e-4, prefix   # same data, same mean gradient
        assert float((h - b).norm() / b.norm()) > 1e-2, prefix   # half the data: clearly different
    # only the main process wrote: one loss row per step, one provenance
    rows = (tmp_path / "two" / "loss.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3
    assert "process 1 of 2" not in done.stdout or (tmp_path / "two" / "provenance.json").exists()
