"""Scoring throughput (images/s) on CPU: our batched grid scorer against naive per-image scoring.

    .venv/bin/python bench/score_speed.py                 # ViT-B-32 (random weights), 64 images
    .venv/bin/python bench/score_speed.py --images 32 --model ViT-B-32 --size 512 --threads 2
    .venv/bin/python bench/score_speed.py --tiny          # tiny open_clip: a smoke test of this script

Both sides use the same open_clip model (random weights of the named architecture: the speed does not
depend on the values) and the same images (`--size` px, random pixels) and prompts (a grid: 8 unique
prompts, each used by images/8 cells). Measured in the same run:

- CLIP only: naive = for each image, preprocess, encode the image and encode its prompt (batch 1,
  what a per-cell `torchmetrics` call or a hand loop does); ours = `GridScorer.score` (images in
  batches of 32, each unique prompt encoded once).
- CLIP + aesthetic + style: naive = each scorer encodes the image itself and style compares against
  each reference image; ours = one image embedding shared by the three scorers, style against the
  mean reference embedding (same numbers, checked here).
Prints images/s and the ratio ours/naive (> 1 = faster), best of `--repeats` runs each.
"""

from __future__ import annotations

import argparse
import time

import torch
from PIL import Image


def _images(n: int, size: int) -> list[Image.Image]:
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy())
            for _ in range(n)]


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--refs", type=int, default=8, help="reference images for the style score")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()

    import open_clip

    from workbench.grid.scores import ClipBackbone, GridScorer, aesthetic_scores

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.tiny:
        from workbench.testing.clip import TINY_MODEL_CFG

        model = open_clip.CLIP(**TINY_MODEL_CFG)
        preprocess = open_clip.image_transform(TINY_MODEL_CFG["vision_cfg"]["image_size"], is_train=False)
        tokenizer = open_clip.get_tokenizer("ViT-B-32")
        name = "tiny"
    else:
        model, _, preprocess = open_clip.create_model_and_transforms(args.model, pretrained=None)
        tokenizer = open_clip.get_tokenizer(args.model)
        name = args.model
    model.eval()
    backbone = ClipBackbone(model, preprocess, tokenizer, {"backbone": name, "pretrained": "random"})
    dim = backbone.embed_dim
    mlp = [(torch.randn(64, dim) / dim ** 0.5, torch.zeros(64)), (torch.randn(1, 64) / 8, torch.zeros(1))]
    refs = _images(args.refs, args.size)
    ref_feats = backbone.image_features(refs)
    images = _images(args.images, args.size)
    prompts = [f"prompt number {i % 8}, a lighthouse at dusk" for i in range(args.images)]
    n = len(images)

    @torch.inference_mode()
    def naive(all_three: bool) -> list[dict]:
        out = []
        for img, prompt in zip(images, prompts):
            f = model.encode_image(preprocess(img)[None])
            f = f / f.norm(dim=-1, keepdim=True)
            t = model.encode_text(tokenizer([prompt]))
            t = t / t.norm(dim=-1, keepdim=True)
            row = {"clip": 100 * max((f * t).sum().item(), 0.0)}
            if all_three:
                fa = model.encode_image(preprocess(img)[None])
                row["aesthetic"] = aesthetic_scores(mlp, fa / fa.norm(dim=-1, keepdim=True)).item()
                fs = model.encode_image(preprocess(img)[None])
                fs = fs / fs.norm(dim=-1, keepdim=True)
                row["style"] = sum((fs * r).sum().item() for r in ref_feats) / len(ref_feats)
            out.append(row)
        return out

    clip_only = GridScorer.from_parts(backbone)
    all_scorers = GridScorer.from_parts(backbone, aesthetic=mlp, style_reference=ref_feats)
    naive(False)[:1]  # warm-up
    results = []
    for label, naive_fn, ours in (("CLIP score", lambda: naive(False), clip_only),
                                  ("CLIP + aesthetic + style", lambda: naive(True), all_scorers)):
        t_naive, ref = _best(naive_fn, args.repeats)
        t_ours, got = _best(lambda: ours.score(images, prompts), args.repeats)
        worst = max(abs(a[k] - b[k]) for a, b in zip(ref, got) for k in a)
        results.append((label, n / t_naive, n / t_ours, worst))
    print(f"{name}, {n} images {args.size}x{args.size}, {len(set(prompts))} prompts, "
          f"{args.threads} threads, torch {torch.__version__}")
    print(f"{'scorer':<26} {'naive img/s':>12} {'ours img/s':>11} {'ratio':>7}  max |diff|")
    for label, a, b, worst in results:
        print(f"{label:<26} {a:12.2f} {b:11.2f} {b / a:6.2f}x  {worst:.2e}")


if __name__ == "__main__":
    main()
