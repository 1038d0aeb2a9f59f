"""Atomic streamed safetensors writer, atomic small-file writes, lazy reading, safe pickles."""

from __future__ import annotations

import errno
import os
import shutil
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from workbench import system
from workbench.cli import main as cli_main
from workbench.errors import FormatError, OutputExistsError, WorkbenchError
from workbench.formats import writer
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


@pytest.mark.slow
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


# ------------------------------------------------------------------ write errors (a full disk, #14)

@pytest.fixture
def disk_full(monkeypatch):
    """disk_full(match, after=0): from now on, writes into new files whose temp path matches fail
    with ENOSPC once `after` bytes went in, as a disk filling up mid-file does. Injected at the
    writers' only two OS calls (`_create`, `_write_all`), so every writer meets it."""
    armed = {"match": None, "after": 0}
    budgets: dict[int, list[int]] = {}
    real_create, real_write = writer._create, writer._write_all

    def create(path, flags=0):
        fd = real_create(path, flags)
        budgets.pop(fd, None)  # a reused descriptor number
        if armed["match"] is not None and armed["match"](Path(path)):
            budgets[fd] = [armed["after"]]
        return fd

    def write_all(fd, data):
        budget = budgets.get(fd)
        if budget is not None:
            with memoryview(data) as view:
                size = view.nbytes
            if size > budget[0]:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            budget[0] -= size
        real_write(fd, data)

    monkeypatch.setattr(writer, "_create", create)
    monkeypatch.setattr(writer, "_write_all", write_all)

    def arm(match=lambda path: True, after: int = 0) -> None:
        armed.update(match=match, after=after)

    return arm


def tmp_files(folder: Path) -> list[Path]:
    """Temp files (`*.tmp`) and temp folders (`*.tmp-<pid>`) anywhere under `folder`."""
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]


DISK_FULL = "the disk is full (No space left on device [ENOSPC])"


def test_disk_full_mid_stream_removes_the_temp_file_and_says_so(tmp_path, monkeypatch, disk_full):
    """Issue #14: the I/O thread's error used to pin a buffer, so closing it raised BufferError
    (twice), hid the ENOSPC and left the temp file. Small staging buffers put the failure in
    the middle of the file with more buffers queued behind it."""
    monkeypatch.setattr(writer._SequentialSink, "BUFFER", 64 * 1024)
    disk_full(after=3 * 64 * 1024)
    plan = {f"t{i}": ("F32", (64, 1024)) for i in range(8)}  # 2 MiB: 32 buffers
    path = tmp_path / "out.safetensors"
    with pytest.raises(WorkbenchError) as info:
        with SafetensorsWriter(path, plan) as w:
            for name in plan:
                w.write(name, torch.ones(64, 1024))
    text = str(info.value)
    needed = SafetensorsWriter(path, plan).size  # 2 MiB of tensors plus the header
    assert f"{DISK_FULL}: the file needs 2.1 MB ({needed:,} bytes) in {tmp_path}, which has" in text
    assert "nothing was saved" in text
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert leftovers(tmp_path) == []


def test_disk_full_on_the_last_buffer_and_for_small_files(tmp_path, disk_full):
    disk_full()
    with pytest.raises(WorkbenchError, match=r"needs 4\.\d KB \(4,\d{3} bytes\) in .*nothing was saved"):
        save_file_atomic({"x": torch.ones(1000)}, tmp_path / "small.safetensors")
    with pytest.raises(WorkbenchError, match=r"the disk is full .*: the file needs 8 bytes in"):
        atomic_write_bytes(tmp_path / "i.png", b"\x89PNG....")
    with pytest.raises(WorkbenchError, match="ENOSPC"):
        atomic_write_text(tmp_path / "r.json", "{}")
    assert leftovers(tmp_path) == []


def test_other_write_errors_are_said_plainly(tmp_path, monkeypatch):
    def broken(fd, data):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(writer, "_write_all", broken)
    with pytest.raises(WorkbenchError, match=r"writing in .* failed \(Input/output error \[EIO\]\)"):
        save_file_atomic({"x": torch.ones(10)}, tmp_path / "a.safetensors")
    with pytest.raises(WorkbenchError, match=r"\[EIO\]"):
        atomic_write_bytes(tmp_path / "b.json", b"{}")
    assert leftovers(tmp_path) == []


def test_not_enough_space_is_found_before_writing(tmp_path, monkeypatch):
    """Free space is checked on every OS (shutil); posix_fallocate, where present, also reserves
    the blocks. Both report the folder and the bytes needed, and nothing is left behind."""
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=999))
    with pytest.raises(WorkbenchError, match=r"not enough disk space: the file needs 4\.\d KB \(4,\d{3} bytes\) in "
                                             r".*, which has 999 bytes free; nothing was saved"):
        save_file_atomic({"x": torch.ones(1000)}, tmp_path / "a.safetensors")
    assert leftovers(tmp_path) == []
    monkeypatch.setattr(shutil, "disk_usage", real)

    def no_room(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_room, raising=False)
    with pytest.raises(WorkbenchError, match=re.escape(DISK_FULL)):
        save_file_atomic({"x": torch.ones(1000)}, tmp_path / "a.safetensors")
    assert leftovers(tmp_path) == []


def test_rename_onto_a_file_in_use_retries_then_explains(tmp_path, monkeypatch):
    """Windows refuses to replace a file another program holds open (PermissionError): the
    writer retries, and when it never frees up says so and removes its temp file."""
    monkeypatch.setattr(system, "REPLACE_DELAYS_S", (0.01, 0.01, 0.01))
    real_replace, calls = os.replace, []

    def busy(src, dst, failures):
        calls.append(dst)
        if len(calls) <= failures:
            raise PermissionError(errno.EACCES, "The process cannot access the file because it "
                                  "is being used by another process", str(dst))
        real_replace(src, dst)

    target = tmp_path / "m.safetensors"
    target.write_bytes(b"loaded in another program")
    monkeypatch.setattr(os, "replace", lambda s, d: busy(s, d, 2))
    save_file_atomic({"x": torch.ones(2)}, target, overwrite=True)  # freed on the third try
    assert len(calls) == 3 and read_header(target).keys() == ["x"]
    calls.clear()
    target.write_bytes(b"loaded in another program")
    monkeypatch.setattr(os, "replace", lambda s, d: busy(s, d, 99))
    with pytest.raises(WorkbenchError, match=r"cannot be replaced .*tried 4 times.*Another program "
                                             r"probably has it open"):
        save_file_atomic({"x": torch.ones(2)}, target, overwrite=True)
    assert len(calls) == 4
    assert target.read_bytes() == b"loaded in another program"
    assert leftovers(tmp_path) == ["m.safetensors"]


def _disk_full_run(capsys, *argv) -> str:
    """Run the CLI; it must fail with status 2 (a WorkbenchError), not a traceback."""
    assert cli_main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "BufferError" not in err
    return err


@pytest.mark.slow
def test_disk_full_in_a_merge(tmp_path, tiny_sd15, disk_full, capsys):
    out = tmp_path / "out"
    out.mkdir()
    recipe = tmp_path / "merge.yaml"
    recipe.write_text(f"kind: merge\nname: m\nmodels: {{A: {tiny_sd15['A']}, B: {tiny_sd15['B']}}}\n"
                      "steps: [{id: out, method: weighted_sum, inputs: [A, B], alpha: 0.5}]\n"
                      f"output: {{path: {out / 'm.safetensors'}}}\n")
    disk_full(after=1 << 20)
    err = _disk_full_run(capsys, "merge", str(recipe))
    assert f"error: {out / 'm.safetensors'}: {DISK_FULL}: the file needs 8." in err
    assert f"in {out}, which has" in err
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_disk_full_in_a_lora_extraction(tmp_path, tiny_sd15, disk_full, capsys):
    out = tmp_path / "loras" / "x.safetensors"
    recipe = tmp_path / "extract.yaml"
    recipe.write_text(f"kind: extract_lora\nname: x\ntuned: {tiny_sd15['A']}\n"
                      f"base: {tiny_sd15['B']}\nrank: 4\noutput: {{path: {out}}}\n")
    disk_full(match=lambda p: p.name.startswith("x.safetensors."))
    err = _disk_full_run(capsys, "run", str(recipe))
    assert f"error: {out}: {DISK_FULL}" in err and f"in {out.parent}, which has" in err
    assert not out.exists() and tmp_files(tmp_path) == []


def _train_recipe(tmp_path: Path, base: Path, data: Path) -> Path:
    recipe = tmp_path / "train.yaml"
    recipe.write_text(f"kind: train\nname: tiny\nbase: {base}\ndataset: {data}\ntrigger: wbstyle\n"
                      "resolution: 64\nnetwork: {type: lora, rank: 4, alpha: 2}\nmax_steps: 4\n"
                      "seed: 5\nlearning_rate: 1.0e-3\n"
                      f"output: {{dir: {tmp_path / 'run'}, save_every: 2}}\n")
    return recipe


@pytest.mark.slow
def test_disk_full_in_a_lora_export(tmp_path, tiny_model, style_set, disk_full, capsys):
    """The step-2 LoRA (save_kohya) fails: the run stops with the OS error, no temp file."""
    recipe = _train_recipe(tmp_path, tiny_model("sd15"), style_set)
    disk_full(match=lambda p: p.name.startswith("tiny-step00000002.safetensors."))
    err = _disk_full_run(capsys, "train", str(recipe))
    assert f"tiny-step00000002.safetensors: {DISK_FULL}" in err
    assert tmp_files(tmp_path) == [] and not (tmp_path / "run" / "tiny.safetensors").exists()


@pytest.mark.slow
def test_disk_full_in_the_training_state(tmp_path, tiny_model, style_set, disk_full, capsys):
    """The resumable state's network file fails: the half-written state folder goes too."""
    recipe = _train_recipe(tmp_path, tiny_model("sd15"), style_set)
    disk_full(match=lambda p: "state" in p.parts)
    err = _disk_full_run(capsys, "train", str(recipe))
    assert f"network.safetensors: {DISK_FULL}" in err
    assert tmp_files(tmp_path) == []
    assert not any((tmp_path / "run" / "state").iterdir())


def test_disk_full_in_grid_cells_and_images(tmp_path, disk_full):
    """Grid cells (PNG + record) and grid pages go through atomic_write_bytes."""
    from PIL import Image

    from workbench.grid.cache import CellCache
    from workbench.grid.render import _save

    class Cell:
        image = Image.new("RGB", (8, 8), "red")
        parameters = "a cat\nSteps: 2"
        provenance = {"kind": "grid"}

    disk_full(match=lambda p: p.suffix == ".tmp" and ".png." in p.name)
    cache = CellCache(tmp_path / "cells")
    with pytest.raises(WorkbenchError, match=r"abc\.png: the disk is full .*bytes in .*cells"):
        cache.save("abc", Cell(), {"scores": {}})
    with pytest.raises(WorkbenchError, match=r"grid\.png: the disk is full"):
        _save(Cell.image, tmp_path / "grid.png", "png", "a cat")
    assert tmp_files(tmp_path) == [] and not cache.has("abc")
    assert list((tmp_path / "cells").iterdir()) == []


def test_dashboard_recipe_save_is_atomic_and_retries_a_file_in_use(tmp_path, monkeypatch):
    """The Merge/Train/Grid pages' "save recipe" (app/forms.save_recipe) writes through the same
    temp-file + retried rename: a recipe file open in an editor on Windows is retried, then
    explained, and neither a temp file nor a half-written recipe is left."""
    from workbench.app.forms import save_recipe
    from workbench.recipes.merge import MergeRecipe

    recipe = MergeRecipe.model_validate({"name": "m", "models": {"A": "a.safetensors", "B": "b.safetensors"},
                                         "steps": [{"id": "s", "method": "weighted_sum",
                                                    "inputs": ["A", "B"], "alpha": 0.3}],
                                         "output": {"path": "m.safetensors"}})
    target = tmp_path / "recipes" / "m.yaml"
    save_recipe(recipe, target, overwrite=False)
    first = target.read_text(encoding="utf-8")
    assert "alpha: 0.3" in first
    monkeypatch.setattr(system, "REPLACE_DELAYS_S", (0.01,))

    def busy(src, dst):
        raise PermissionError(errno.EACCES, "being used by another process", str(dst))

    monkeypatch.setattr(os, "replace", busy)
    with pytest.raises(WorkbenchError, match="cannot be replaced"):
        save_recipe(recipe.model_copy(update={"name": "other"}), target, overwrite=True)
    assert target.read_text(encoding="utf-8") == first
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.yaml"]
