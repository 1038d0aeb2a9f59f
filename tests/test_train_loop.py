"""The training loop end to end on tiny models at 64 px (CPU): resume, loss, outputs, loss terms."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from workbench.formats.safetensors_io import read_header
from workbench.recipes.loader import load_recipe
from workbench.train.loop import NoiseSchedule, TrainSettings, sd_loss, step_generator
from workbench.kinds import train as train_kind
from workbench.train.setup import build_trainer



def run(recipe, **options):
    """The train kind's dry run, then that plan run (as `workbench train` does)."""
    return train_kind.run(train_kind.describe(recipe), **options)


def _recipe(tmp: Path, base: Path, data: Path, out: str, extra: str = "", **fields) -> object:
    body = {"max_steps": 4, "learning_rate": "1.0e-3", "seed": 5, **fields}
    text = (f"kind: train\nname: tiny\nbase: {base}\ndataset: {data}\ntrigger: wbstyle\nresolution: 64\n"
            + "".join(f"{k}: {v}\n" for k, v in body.items()) + extra
            + f"output: {{dir: {tmp / out}, save_every: 2, save_precision: fp32}}\n")
    path = tmp / f"{out}.yaml"
    path.write_text(text)
    return load_recipe(path)


NET = "network: {type: lora, rank: 4, alpha: 2, dropout: 0.1}\n"


@pytest.mark.slow
def test_resume_equals_uninterrupted_and_outputs(tmp_path, tiny_model, style_set):
    base = tiny_model("sd15")
    cache = tmp_path / "cache"
    samples = 'samples: {every: 2, prompts: ["wbstyle, a cat"], steps: 2, seed: 3}\n'
    a = _recipe(tmp_path, base, style_set, "a", NET + samples)
    run(a, progress=False, cache_root=cache)
    b = _recipe(tmp_path, base, style_set, "b", NET)
    stopped = run(b, progress=False, cache_root=cache, stop_at=2)
    assert "stopped at step 2" in stopped.summary and not b.lora_path.exists()
    b2 = _recipe(tmp_path, base, style_set, "b", NET, resume=str(tmp_path / "b"))
    run(b2, progress=False, cache_root=cache)
    wa, wb = load_file(str(a.lora_path)), load_file(str(b2.lora_path))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # bit for bit, samples in A notwithstanding
    assert any(k.endswith("lora_up.weight") and wa[k].abs().sum() > 0 for k in wa)
    rows_a = list(csv.DictReader(open(tmp_path / "a" / "loss.csv")))
    rows_b = list(csv.DictReader(open(tmp_path / "b" / "loss.csv")))
    assert [r["step"] for r in rows_b] == ["1", "2", "3", "4"]
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    # outputs of the uninterrupted run
    out = tmp_path / "a"
    assert (out / "tiny-step00000002.safetensors").exists() and (out / "tiny.json").exists()
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-00000002_00.png",
                                                                   "step-00000004_00.png"]
    assert [p.name for p in (out / "state").iterdir()] and json.loads((out / "loss.json").read_text())[-1]["step"] == 4
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["kind"] == "train" and "kind: train" in prov["recipe"]["text"]
    assert prov["inputs"]["base"]["sha256"] and prov["extra"]["steps"] == 4
    meta = read_header(a.lora_path).metadata
    assert meta["ss_steps"] == "4" and "name: tiny" in meta["workbench_recipe"]
    assert meta["ss_network_dropout"] == "0.1"
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW(weight_decay=0.01)"  # kohya's form


@pytest.mark.slow
def test_loss_falls_on_the_style_set(tmp_path, tiny_model, style_set):
    r = _recipe(tmp_path, tiny_model("sd15"), style_set, "c",
                "network: {type: lora, rank: 8, alpha: 8}\n", max_steps=12, learning_rate="5.0e-3")
    trainer = build_trainer(r, train_kind.describe(r).detail, out_dir=tmp_path / "c", cache_root=tmp_path / "cache")
    before = trainer.eval_loss(n=8)
    trainer.train(progress=False)
    after = trainer.eval_loss(n=8)
    assert after < before * 0.97, (before, after)


class _ZeroUNet(torch.nn.Module):
    def forward(self, x, t, encoder_hidden_states=None, **kw):
        return type("O", (), {"sample": torch.zeros_like(x)})()


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_min_snr_and_v_prediction_terms(pred):
    """With a model that predicts 0 the loss is E[target²]·weight; recompute it by hand."""
    ac = torch.linspace(0.99, 0.01, 1000)
    sched = NoiseSchedule(ac, pred, 1000)
    s = TrainSettings(min_snr_gamma=5.0, noise_offset=0.1)
    lat = torch.randn(2, 4, 8, 8)
    got = sd_loss(_ZeroUNet(), sched, lat, {"prompt_embeds": torch.zeros(2, 3, 8)}, {}, step_generator(1, 2, 0), s)
    g = step_generator(1, 2, 0)
    noise = torch.randn(lat.shape, generator=g)
    noise = noise + 0.1 * torch.randn((2, 4, 1, 1), generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    a = ac[t].view(2, 1, 1, 1)
    target = noise if pred == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * lat
    snr = (ac[t] / (1 - ac[t]))
    w = snr.clamp(max=5.0) / (snr if pred == "epsilon" else snr + 1)
    want = ((target ** 2).mean(dim=(1, 2, 3)) * w).mean()
    assert torch.allclose(got, want, rtol=1e-5)


def test_sd3_loss_is_kohyas_preconditioned_x0_loss_and_flux_keeps_velocity():
    """SD3: kohya's sd3_train_network.py loss, recomputed by hand from the same draws:
    x̂0 = pred·(−σ) + x_σ against the clean latents (weighting `none`), which is σ²·|pred − v|²;
    a plain velocity loss would differ. FLUX: the velocity loss of kohya's `raw` prediction."""
    from workbench.train.loop import flux_loss, sd3_loss

    class FixedPrediction(torch.nn.Module):
        def __init__(self, pred, guidance=False):
            super().__init__()
            self.pred, self.config = pred, type("C", (), {"guidance_embeds": guidance})()

        def forward(self, hidden_states, **kw):
            return type("Out", (), {"sample": self.pred.reshape(hidden_states.shape)})()

    s = TrainSettings(flow_shift=3.0)
    lat = torch.randn(2, 16, 8, 8)
    pred = torch.randn(2, 16, 8, 8)
    cond = {"prompt_embeds": torch.zeros(2, 3, 8), "pooled": torch.zeros(2, 8)}
    got = sd3_loss(FixedPrediction(pred), lat, cond, step_generator(1, 2, 0), s)
    g = step_generator(1, 2, 0)  # the draws of workbench/train/loop.py flow_noise, in order
    noise = torch.randn(lat.shape, generator=g)
    u = torch.sigmoid(torch.randn((2,), generator=g))
    sigma = (3.0 * u / (1 + 2.0 * u)).view(2, 1, 1, 1)
    noisy = (1 - sigma) * lat + sigma * noise
    kohya = ((pred * (-sigma) + noisy - lat) ** 2).mean()
    velocity = ((pred - (noise - lat)) ** 2).mean()
    assert torch.allclose(got, kohya, rtol=1e-5)
    assert torch.allclose(kohya, (sigma ** 2 * (pred - (noise - lat)) ** 2).mean(), rtol=1e-4)
    assert not torch.allclose(got, velocity, rtol=1e-2)
    packed = pred.view(2, 16, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 16, 64)
    flux = flux_loss(FixedPrediction(packed), lat, cond, step_generator(1, 2, 0), s)
    assert torch.allclose(flux, velocity, rtol=1e-5)


@pytest.mark.slow
def test_flux_lora_trains_and_exports(tmp_path, tiny_model, style_set):
    r = _recipe(tmp_path, tiny_model("flux"), style_set, "f", "network: {type: lora, rank: 4, alpha: 4}\n",
                max_steps=2)
    result = run(r, progress=False, cache_root=tmp_path / "cache")
    assert "2/2 steps" in result.summary
    h = read_header(r.lora_path)
    assert h.metadata["ss_base_model_version"] == "flux1"
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in h.tensors
    w = load_file(str(r.lora_path))
    assert all(torch.isfinite(v).all() for v in w.values())
    assert w["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].abs().sum() > 0


@pytest.mark.slow
def test_lora_trains_on_an_nf4_base(tmp_path, tiny_model, style_set):
    """base_precision: nf4 (bitsandbytes; its CPU backend here): the frozen UNet is 4-bit, the LoRA
    learns, and the file loads into diffusers."""
    from workbench.pipeline.precision import nf4_available

    if not nf4_available("cpu"):
        pytest.skip("bitsandbytes with a CPU backend is not installed")
    from diffusers import StableDiffusionPipeline

    from workbench.formats.pipeline_config import config_dir

    base = tiny_model("sd15")
    r = _recipe(tmp_path, base, style_set, "q", "network: {type: lora, rank: 4, alpha: 2}\n",
                base_precision="nf4", max_steps=3)
    result = run(r, progress=False, cache_root=tmp_path / "cache")
    assert "3/3 steps" in result.summary
    rows = list(csv.DictReader(open(tmp_path / "q" / "loss.csv")))
    assert len(rows) == 3 and all(float(row["loss"]) == float(row["loss"]) for row in rows)  # finite
    w = load_file(str(r.lora_path))
    assert any(k.endswith("lora_up.weight") and w[k].abs().sum() > 0 for k in w)
    assert read_header(r.lora_path).metadata["ss_network_module"] == "networks.lora"
    pipe = StableDiffusionPipeline.from_single_file(str(base), config=str(config_dir(base, "sd15")),
                                                    local_files_only=True, safety_checker=None,
                                                    requires_safety_checker=False)
    pipe.load_lora_weights(str(r.lora_path), adapter_name="nf4")
    assert "nf4" in pipe.get_active_adapters()


@pytest.mark.slow
def test_adamw8bit_trains_and_resumes_bit_exactly(tmp_path, tiny_model, style_set):
    """kohya's favourite optimizer (bitsandbytes AdamW8bit; its CPU backend here): 8-bit moments for
    tensors of 4096+ values, and its state goes through the resume folder like AdamW's."""
    pytest.importorskip("bitsandbytes")
    from workbench.train.loop import make_optimizer

    big = torch.nn.Parameter(torch.randn(64, 128))
    opt = make_optimizer("AdamW8bit", [{"params": [big], "lr": 1e-3}])
    big.grad = torch.randn_like(big)
    opt.step()
    assert opt.state[big]["state1"].dtype == torch.uint8  # the 8-bit moment

    base, cache = tiny_model("sd15"), tmp_path / "cache"
    net = "network: {type: lora, rank: 4, alpha: 2}\n"
    a = _recipe(tmp_path, base, style_set, "a8", net, optimizer="AdamW8bit")
    run(a, progress=False, cache_root=cache)
    b = _recipe(tmp_path, base, style_set, "b8", net, optimizer="AdamW8bit")
    run(b, progress=False, cache_root=cache, stop_at=2)
    b2 = _recipe(tmp_path, base, style_set, "b8", net, optimizer="AdamW8bit", resume=str(tmp_path / "b8"))
    run(b2, progress=False, cache_root=cache)
    wa, wb = load_file(str(a.lora_path)), load_file(str(b2.lora_path))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(k.endswith("lora_up.weight") and wa[k].abs().sum() > 0 for k in wa)
    assert read_header(a.lora_path).metadata["ss_optimizer"] == "bitsandbytes.optim.adamw.AdamW8bit"


@pytest.mark.slow
def test_sd3_lora_resumes_bit_exactly_is_detected_and_generates(tmp_path, tiny_model, style_set):
    """SD3.5 medium: a resumed run equals the uninterrupted one bit for bit; the file is detected
    as an SD3.5 LoRA and changes the tiny SD3 model's image at generation time."""
    import numpy as np

    from helpers.kohya_keys import KOHYA_SD3

    from workbench.formats.detect import detect
    from workbench.pipeline.generate import generate, load_model
    from workbench.pipeline.model import ImageSettings, LoraUse

    base, cache = tiny_model("sd3"), tmp_path / "cache"
    a = _recipe(tmp_path, base, style_set, "a3", NET)
    result = run(a, progress=False, cache_root=cache)
    assert "4/4 steps" in result.summary
    b = _recipe(tmp_path, base, style_set, "b3", NET)
    run(b, progress=False, cache_root=cache, stop_at=2)
    b2 = _recipe(tmp_path, base, style_set, "b3", NET, resume=str(tmp_path / "b3"))
    run(b2, progress=False, cache_root=cache)
    wa, wb = load_file(str(a.lora_path)), load_file(str(b2.lora_path))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert {k.rsplit(".", 2)[0] for k in wa if k.endswith(".lora_down.weight")} == set(KOHYA_SD3["sd3.5-medium"]["modules"])
    assert wa["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"].abs().sum() > 0
    assert all(torch.isfinite(v).all() for v in wa.values())
    rows_a = list(csv.DictReader(open(tmp_path / "a3" / "loss.csv")))
    rows_b = list(csv.DictReader(open(tmp_path / "b3" / "loss.csv")))
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b] and len(rows_a) == 4
    meta = read_header(a.lora_path).metadata
    assert meta["ss_base_model_version"] == "sd3" and meta["modelspec.prediction_type"] == "flow"
    assert meta["ss_training_shift"] == "3.0" and meta["ss_weighting_scheme"] == "logit_normal"
    info = detect(a.lora_path)
    assert (info.kind, info.arch, info.variant) == ("lora", "sd3", "sd3.5-medium")
    model = load_model(base, device="cpu")
    s = ImageSettings("wbstyle, a cat", "", "Euler", 2, 4.0, 64, 64)
    plain = np.asarray(generate(model, s, [3])[0].image, dtype=np.int16)
    with_lora = generate(model, s, [3], loras=[LoraUse(a.lora_path, 1.0)])[0]
    assert np.abs(np.asarray(with_lora.image, dtype=np.int16) - plain).max() > 0
    assert f"<lora:{a.lora_path.stem}:1" in with_lora.parameters


@pytest.mark.slow
def test_sd3_large_lora_trains_with_kohyas_modules(tmp_path, tiny_sd3, style_set):
    from helpers.kohya_keys import KOHYA_SD3

    from workbench.formats.detect import detect

    r = _recipe(tmp_path, tiny_sd3("sd3.5-large"), style_set, "l3", "network: {type: lora, rank: 4, alpha: 4}\n",
                max_steps=2)
    assert "2/2 steps" in run(r, progress=False, cache_root=tmp_path / "cache").summary
    w = load_file(str(r.lora_path))
    assert {k.rsplit(".", 2)[0] for k in w if k.endswith(".lora_down.weight")} == set(KOHYA_SD3["sd3.5-large"]["modules"])
    assert w["lora_unet_joint_blocks_37_context_block_attn_qkv.lora_up.weight"].abs().sum() > 0
    info = detect(r.lora_path)
    assert (info.arch, info.variant) == ("sd3", "sd3.5-large")
    assert read_header(r.lora_path).metadata["modelspec.architecture"] == "stable-diffusion-3-5-large/lora"


@pytest.mark.slow
def test_the_job_bar_never_goes_back_and_ends_with_the_last_samples(tmp_path, tiny_model, style_set):
    """max_steps 3 with samples every 2: the last step's samples (an extra round) are made inside
    the training task, so the job's one bar (overall) only grows and stays short of 100 % until
    they are done; no sampling phase of its own restarts the bar at 0."""
    from workbench import progress

    samples = 'samples: {every: 2, prompts: ["wbstyle, a cat"], steps: 2, seed: 3}\n'
    recipe = _recipe(tmp_path, tiny_model("sd15"), style_set, "bar", NET + samples, max_steps=3)
    events = []
    with progress.sink(events.append):
        run(recipe, progress=False, cache_root=tmp_path / "cache")
    overall = [e.overall for e in events if e.overall is not None]
    assert overall == sorted(overall), overall  # never goes back
    sampling = [e for e in events if e.desc == "sampling"]
    assert sampling and all(e.overall < 1.0 for e in sampling if e.done < e.total)
    assert {e.desc for e in events} >= {"training", "sampling"}
    assert sorted(p.name for p in (tmp_path / "bar" / "samples").iterdir()) == [
        "step-00000002_00.png", "step-00000003_00.png"]
