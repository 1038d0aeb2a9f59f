"""The shipped CLIP tokenizer data gives the same ids as open_clip's bundled BPE tokenizer."""

import open_clip
from transformers import CLIPTokenizer

from workbench.formats.clip_tokenizer import VOCAB_SIZE, write_tokenizer_dir


def test_shipped_vocab_matches_open_clip(tmp_path):
    tok = CLIPTokenizer.from_pretrained(write_tokenizer_dir(tmp_path / "tok"))
    assert len(tok) == VOCAB_SIZE
    reference = open_clip.get_tokenizer("ViT-L-14")
    for text in ["a lighthouse at dusk", "Portrait of a knight, oil painting!!", "wbstyle, 3 cats"]:
        ours = tok(text).input_ids
        theirs = reference([text])[0].tolist()[: len(ours)]
        assert ours == theirs, text


def test_pad_token_is_configurable(tmp_path):
    tok = CLIPTokenizer.from_pretrained(write_tokenizer_dir(tmp_path / "g", pad_token="!"))
    assert tok.pad_token == "!" and tok.pad_token_id == 0
    assert tok("x", padding="max_length", max_length=77).input_ids[-1] == 0
