"""CLIP BPE tokenizer files, shipped so that text encoders load with no hub access.

SD1.5, SDXL, SD3 and FLUX all use OpenAI CLIP's byte-level BPE (49408 tokens). open_clip bundles the
merge list; `build_files` turns it into the `vocab.json` + `merges.txt` pair that transformers'
CLIPTokenizer reads. The result ships in `data/clip_tokenizer/`; `write_tokenizer_dir` adds the
per-model `tokenizer_config.json` (the pad token differs: SD1.5/CLIP-L pad with <|endoftext|>,
SDXL's second tokenizer and SD3's CLIP-G pad with "!").
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data" / "clip_tokenizer"
VOCAB_SIZE = 49408
N_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table (printable bytes map to themselves)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_files(bpe_gz: str | Path, out_dir: str | Path) -> None:
    """Write vocab.json and merges.txt from open_clip's `bpe_simple_vocab_16e6.txt.gz`."""
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:N_MERGES + 1]]
    base = list(_bytes_to_unicode().values())
    tokens = base + [t + "</w>" for t in base] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == VOCAB_SIZE, len(tokens)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def write_tokenizer_dir(out_dir: str | Path, pad_token: str = "<|endoftext|>",
                        max_length: int = 77) -> Path:
    """Materialise a transformers-loadable CLIPTokenizer folder (vocab, merges, config)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(DATA_DIR / name, out / name)
    config = {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": pad_token, "errors": "replace", "add_prefix_space": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=2))
    return out


if __name__ == "__main__":  # regenerate the shipped files: python -m workbench.formats.clip_tokenizer
    import open_clip.tokenizer as oct_mod

    build_files(Path(oct_mod.__file__).parent / "bpe_simple_vocab_16e6.txt.gz", DATA_DIR)
    print(f"wrote {DATA_DIR}")
