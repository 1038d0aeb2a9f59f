"""Scorers against an independent open_clip computation on a tiny local open_clip model (offline)."""

import pytest
import torch
from PIL import Image

from workbench.grid import scores
from workbench.errors import UnsupportedError, WorkbenchError
from workbench.recipes.grid import AestheticScore, ClipScore, Scores, StyleScore
from workbench.testing import clip as tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip.build(tmp_path_factory.mktemp("clip") / "clip", seed=5)


def _images():
    g = torch.Generator().manual_seed(0)
    out = []
    for size in ((48, 48), (64, 40), (40, 72)):
        arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
        out.append(Image.fromarray(arr))
    return out


def _aesthetic_file(path, dim):
    torch.manual_seed(3)
    mlp = torch.nn.Sequential(torch.nn.Linear(dim, 32), torch.nn.Dropout(0.2), torch.nn.Linear(32, 8),
                              torch.nn.Dropout(0.2), torch.nn.Linear(8, 4), torch.nn.Dropout(0.1),
                              torch.nn.Linear(4, 2), torch.nn.Linear(2, 1)).eval()
    state = {f"layers.{k}": v for k, v in mlp.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return mlp


def test_clean_prompt_removes_a1111_syntax():
    assert scores.clean_prompt("a (red:1.3) car, <lora:style_e8:0.8>, [blurry] BREAK night") == \
        "a red car, blurry, night"
    assert scores.clean_prompt("((masterpiece:1.2)), cat") == "masterpiece, cat"
    assert scores.clean_prompt("a lighthouse at dusk") == "a lighthouse at dusk"


def test_scores_equal_independent_open_clip(tmp_path, clip_dir):
    import open_clip

    refs = tmp_path / "refs"
    refs.mkdir()
    for i, colour in enumerate(("red", "navy", "olive")):
        Image.new("RGB", (36, 36), colour).save(refs / f"r{i}.png")
    mlp = _aesthetic_file(tmp_path / "aes.safetensors", tiny_clip.TINY_MODEL_CFG["embed_dim"])
    cfg = Scores(clip=ClipScore(weights=clip_dir), aesthetic=AestheticScore(weights=tmp_path / "aes.safetensors"),
                 style=StyleScore(reference_dir=refs))
    scorer = scores.GridScorer(cfg, device="cpu")
    images = _images()
    prompts = ["a lighthouse at dusk", "portrait of a knight", "a lighthouse at dusk"]
    got = scorer.score(images, prompts)

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    tok = open_clip.get_tokenizer(f"local-dir:{clip_dir}")
    model.eval()
    with torch.no_grad():
        ref_f = torch.cat([model.encode_image(preprocess(Image.open(p).convert("RGB"))[None])
                           for p in sorted(refs.iterdir())])
        ref_f = ref_f / ref_f.norm(dim=-1, keepdim=True)
        for img, prompt, row in zip(images, prompts, got):
            f = model.encode_image(preprocess(img)[None])
            t = model.encode_text(tok([prompt]))
            f, t = f / f.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
            clip = 100 * max((f * t).sum().item(), 0.0)
            style = (f @ ref_f.T).mean().item()
            aes = mlp(f).item()
            assert row["clip"] == pytest.approx(clip, abs=1e-4)
            assert row["style"] == pytest.approx(style, abs=1e-5)
            assert row["aesthetic"] == pytest.approx(aes, abs=1e-5)
    assert scorer.metrics == ["clip", "aesthetic", "style"]
    sig = scorer.signature()
    assert len(sig["clip"]["sha256"]) == 64 and sig["style"]["references"] == 3
    assert sig["aesthetic"]["sha256"] == scores._file_sha256(tmp_path / "aes.safetensors")


def test_aesthetic_from_pth_and_bad_files(tmp_path):
    mlp = _aesthetic_file(tmp_path / "aes.pth", 16)
    layers = scores.load_aesthetic(tmp_path / "aes.pth")
    x = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    with torch.no_grad():
        assert torch.allclose(scores.aesthetic_scores(layers, x), mlp(x)[:, 0], atol=1e-6)
    torch.save({"w": torch.zeros(2, 2)}, tmp_path / "bad.pth")
    with pytest.raises(WorkbenchError, match="not a LAION aesthetic predictor"):
        scores.load_aesthetic(tmp_path / "bad.pth")


def test_aesthetic_dimension_mismatch_is_explained(tmp_path, clip_dir):
    _aesthetic_file(tmp_path / "aes768.safetensors", 768)
    cfg = Scores(clip=ClipScore(weights=clip_dir), aesthetic=AestheticScore(weights=tmp_path / "aes768.safetensors"))
    with pytest.raises(WorkbenchError, match="expects 768-d CLIP embeddings but the CLIP backbone gives 16-d"):
        scores.GridScorer(cfg, device="cpu")


def test_tag_not_in_hf_cache_is_refused_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf"))
    with pytest.raises(UnsupportedError, match=r"not on this machine: looked for "
                       r"timm/vit_base_patch32_clip_224.openai in the Hugging Face cache \(.*empty-hf\).*"
                       r"hf download timm/vit_base_patch32_clip_224.openai"):
        scores.load_backbone("ViT-B-32", None, "openai", device="cpu")
    with pytest.raises(WorkbenchError, match="no pretrained tag 'nope'"):
        scores.load_backbone("ViT-B-32", None, "nope", device="cpu")
