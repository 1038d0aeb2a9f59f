"""Training on a quantized base: watch the denoiser's packed (GGUF) weights around the training
loop, to show the frozen base stays packed and unchanged (tests/test_gguf.py, test_file_kinds.py,
test_components.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from workbench.formats.gguf_file import iter_packed
from workbench.train import loop


@contextmanager
def packed_weights_watched() -> Iterator[dict]:
    """While open, each `Trainer.train` records into the yielded dict: "before" (copies of the
    packed tensors), "after" (the tensors once trained) and "wrapped" (peft-wrapped GGUFLinear
    layers)."""
    seen: dict = {}
    real_train = loop.Trainer.train

    def train(self, *a, **kw):
        seen["before"] = {n: p.clone() for n, p in iter_packed(self.denoiser)}
        state = real_train(self, *a, **kw)
        seen["after"] = dict(iter_packed(self.denoiser))
        seen["wrapped"] = [n for n, m in self.denoiser.named_modules()
                           if type(m).__name__ == "GGUFLinear" and ".base_layer" in n]
        return state

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop.Trainer, "train", train)
        yield seen
