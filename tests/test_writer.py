"""Atomic streamed safetensors writer, atomic small-file writes, lazy reading, safe pickles."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from workbench.errors import FormatError, OutputExistsError, WorkbenchError
from workbench.formats.lazy import load_pickle_safe, open_lazy
from workbench.formats.safetensors_io import read_header
from workbench.formats.writer import (SafetensorsWriter, atomic_write_bytes, atomic_write_text,
                                      save_file_atomic)


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.f16": torch.randn(3, 5, generator=g).half(),
        "b.bf16": torch.randn(7, generator=g).bfloat16(),
        "c.f32": torch.randn(2, 2, 2, generator=g),
        "d.e4m3": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
        "e.e5m2": torch.randn(9, generator=g).to(torch.float8_e5m2),
        "f.i64": torch.arange(77).reshape(1, 77),
        "g.scalar": torch.tensor(8.0),
        "h.empty": torch.zeros(0, 3),
    }


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_roundtrip_all_dtypes(tmp_path):
    tensors = sample_tensors()
    out = save_file_atomic(tensors, tmp_path / "m.safetensors", {"format": "pt", "x": "1"})
    assert leftovers(tmp_path) == ["m.safetensors"]  # no temp file left behind
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "x": "1"}
        assert set(f.keys()) == set(tensors)
        for k, t in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
    raw = out.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0 and raw[8 + n - 1:8 + n] in (b"}", b" ")  # space-padded to 8 bytes


def test_streamed_writer_and_lazy_reader(tmp_path):
    tensors = sample_tensors()
    plan = {k: (dt, tuple(t.shape)) for k, t, dt in
            ((k, t, {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
                     torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
                     torch.int64: "I64"}[t.dtype]) for k, t in tensors.items())}
    path = tmp_path / "s.safetensors"
    with SafetensorsWriter(path, plan, {}) as w:
        for k in plan:
            w.write(k, tensors[k])
    with open_lazy(path) as f:
        assert f.keys() == list(plan)
        assert f.info("c.f32").shape == (2, 2, 2)
        assert torch.equal(f.get("c.f32"), tensors["c.f32"])
        assert torch.equal(f.get("f.i64"), tensors["f.i64"])


def test_wrong_dtype_shape_order_or_missing(tmp_path):
    plan = {"x": ("F16", (2,)), "y": ("F32", (3,))}
    path = tmp_path / "bad.safetensors"
    for name, tensor, match in (("x", torch.zeros(2), "plan says F16"),
                                ("x", torch.zeros(3).half(), r"plan says F16 \[2\]"),
                                ("y", torch.zeros(3), "out of order"),
                                ("z", torch.zeros(3), "not in the plan")):
        with pytest.raises(WorkbenchError, match=match):
            with SafetensorsWriter(path, plan) as w:
                w.write(name, tensor)
        assert leftovers(tmp_path) == []
    with pytest.raises(WorkbenchError, match="only 1 of 2 planned tensors"):
        with SafetensorsWriter(path, plan) as w:
            w.write("x", torch.zeros(2).half())
    assert leftovers(tmp_path) == []
    with pytest.raises(WorkbenchError, match="unknown dtype"):
        SafetensorsWriter(path, {"x": ("F17", (1,))})


def test_exception_and_ctrl_c_leave_nothing(tmp_path):
    path = tmp_path / "out.safetensors"
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with SafetensorsWriter(path, {"x": ("F32", (1024,)), "y": ("F32", (4,))}) as w:
                w.write("x", torch.ones(1024))
                raise exc
        assert leftovers(tmp_path) == []


def test_no_overwrite_without_flag(tmp_path):
    path = tmp_path / "keep.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="keep.safetensors"):
        save_file_atomic({"x": torch.ones(2)}, path)
    assert path.read_bytes() == b"precious" and leftovers(tmp_path) == ["keep.safetensors"]
    save_file_atomic({"x": torch.ones(2)}, path, overwrite=True)
    assert read_header(path).keys() == ["x"]
    with pytest.raises(OutputExistsError):
        atomic_write_text(path, "{}")
    atomic_write_text(tmp_path / "r.json", '{"a": 1}')
    atomic_write_bytes(tmp_path / "i.png", b"\x89PNG")
    assert (tmp_path / "r.json").read_text() == '{"a": 1}'
    assert (tmp_path / "i.png").read_bytes() == b"\x89PNG"


KILLED_WRITER = textwrap.dedent("""
    import sys, time, torch
    from workbench.formats.writer import SafetensorsWriter
    plan = {f"t{i}": ("F32", (256, 1024)) for i in range(16)}   # 16 MiB in all
    with SafetensorsWriter(sys.argv[1], plan) as w:
        for i, name in enumerate(plan):
            w.write(name, torch.full((256, 1024), float(i)))
            if i == 3:
                print("WRITING", flush=True)
                time.sleep(600)  # killed long before; only a stuck test waits
""")


def test_sigkill_mid_file_leaves_no_target(tmp_path):
    """SIGKILL cannot be cleaned up after: a stale *.tmp may stay, the target never appears."""
    target = tmp_path / "big.safetensors"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)],
                            stdout=subprocess.PIPE, text=True, env={**os.environ})
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        tmp_files = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        assert len(tmp_files) == 1 and tmp_files[0].name.startswith("big.safetensors.")
        assert tmp_files[0].stat().st_size > 4 * 1024 * 1024
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=120)
    assert not target.exists()


def test_open_lazy_rejects_truncated_before_reading(tmp_path):
    path = save_file_atomic({"x": torch.ones(1000)}, tmp_path / "t.safetensors")
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    with pytest.raises(FormatError, match="truncated"):
        open_lazy(path)


def test_load_pickle_safe(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 5}, good)
    assert torch.equal(load_pickle_safe(good)["w"], torch.ones(2))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "bad.ckpt"
    torch.save({"w": torch.ones(1), "callback": Evil()}, bad)
    with pytest.raises(FormatError, match="refused to load"):
        load_pickle_safe(bad)
