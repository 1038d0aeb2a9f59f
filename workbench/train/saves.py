"""Every save of a training run checked before it starts and reported plainly when it fails.

A training run writes three kinds of things while it trains (`workbench/kinds/train.py` calls
them): the resumable state (`state/step-N/`, workbench/train/state.py), the step LoRA files
(`<name>-stepN.safetensors`, workbench/train/export.py) and the sample images (`samples/`).
Before each one `SaveGuard.save` compares the bytes it will need (the previous save of the same
kind when there was one, else an estimate from the tensor sizes) with the free space of its
folder (`shutil.disk_usage`, on every OS); when it is short the run stops with an error naming the
folder, the bytes needed and free, and how to resume. A write that fails anyway (a disk filling up
meanwhile: OSError, or torch's `RuntimeError: [enforce fail at inline_container.cc] ...` from
`torch.save`) becomes the same kind of error; the writers have removed their temp files by then.

`resume_hint` is the one sentence every stop of a training run ends with (Ctrl-C, a cancelled
job, a full disk): which state is kept and what to add to the recipe to continue from it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, TypeVar

from workbench.errors import WorkbenchError
from workbench.system import free_bytes
from workbench.train.state import list_states, state_root
from workbench.units import human_size

T = TypeVar("T")
# what the disk needs beyond the estimate: file headers, JSON side files, file-system blocks
SLACK_BYTES = 1 << 20
MARGIN = 1.1


class SaveError(WorkbenchError):
    """A save of a training run that could not be made (no room, or the write failed)."""


def tensor_bytes(tensors) -> int:
    """Bytes of the tensors in a (nested) state dict: what torch.save / safetensors write."""
    if hasattr(tensors, "element_size") and hasattr(tensors, "numel"):
        return int(tensors.numel()) * int(tensors.element_size())
    if isinstance(tensors, dict):
        return sum(tensor_bytes(v) for v in tensors.values())
    if isinstance(tensors, (list, tuple)):
        return sum(tensor_bytes(v) for v in tensors)
    return 0


def state_bytes(trainer) -> int:
    """The resumable state's size: the network in fp32, the optimizer's moments, the RNG states."""
    return tensor_bytes(trainer.net.state_dict()) + tensor_bytes(trainer.optimizer.state_dict()) \
        + SLACK_BYTES


def lora_bytes(trainer, dtype: str) -> int:
    """A step LoRA file's size: every trainable value in the save precision."""
    width = {"fp32": 4, "fp16": 2, "bf16": 2}.get(dtype, 4)
    return tensor_bytes(trainer.net.state_dict()) // 4 * width + SLACK_BYTES


def samples_bytes(width: int, height: int, n: int) -> int:
    """Sample PNGs, at most the raw RGB pixels each (PNG never stores more than that, plus chunks)."""
    return n * (width * height * 3 + 64 * 1024)


def path_bytes(paths) -> int:
    """Bytes on disk of files and folders (a state folder counts all its files)."""
    total = 0
    for p in map(Path, paths):
        if p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            total += p.stat().st_size
    return total


def resume_hint(out_dir: Path, recipe_path: Path | None, step: int, max_steps: int) -> str:
    """'Training stopped at step 7 of 20; the state of step 6 is kept in ...; to continue, add ...'"""
    out_dir = Path(out_dir)
    states = list_states(state_root(out_dir))
    command = f"workbench train {recipe_path}" if recipe_path else "workbench train RECIPE.yaml"
    head = f"training stopped at step {step} of {max_steps}"
    if not states:
        return (f"{head}; no state was saved yet (`output.save_every` sets how often it is), so "
                f"nothing can be resumed: run `{command} --overwrite` to start again")
    last = states[-1]
    saved = int(last.name.removeprefix("step-"))
    redo = "" if step <= saved else f" (step {step} is done again)" if step == saved + 1 else \
        f" (steps {saved + 1} to {step} are done again)"
    return (f"{head}; the state of step {saved} is kept in {last}; to continue from it{redo}, "
            f"add `resume: {out_dir}` to {recipe_path or 'the recipe'} and run `{command}` "
            "(on the dashboard's Train page: tick \"resume\" and submit again)")


class SaveGuard:
    """Checks the room before each save of one run and turns a failed write into a SaveError.

    `hint()` gives the resume sentence at the moment of the failure (the step the run is at)."""

    def __init__(self, hint: Callable[[], str]):
        self.hint = hint
        self.previous: dict[str, int] = {}  # what -> bytes its last save took

    def needed(self, what: str, estimate: int) -> int:
        return max(int(estimate), self.previous.get(what, 0))

    def check(self, what: str, folder: Path, estimate: int) -> None:
        """Stop before writing when `folder` has less room than the save needs."""
        needed = self.needed(what, estimate)
        free = free_bytes(folder)
        if free is not None and free < needed * MARGIN:
            raise SaveError(f"not enough disk space in {folder} to save the {what}: needs about "
                            f"{human_size(needed)} ({needed:,} bytes), {human_size(free)} "
                            f"({free:,} bytes) free; nothing was written. Free some space (or "
                            f"choose another output.dir); {self.hint()}")

    def save(self, what: str, folder: Path, estimate: int, write: Callable[[], T],
             written: Callable[[T], list] | None = None) -> T:
        """Check the room, run `write()`, remember the size of what it wrote for the next check.
        `written(result)` lists the files/folders it made (default: the result itself)."""
        folder = Path(folder)
        self.check(what, folder, estimate)
        try:
            result = write()
        except SaveError:
            raise
        except WorkbenchError as e:  # the writers' own plain message (disk full, file in use)
            raise SaveError(f"{e}; {self.hint()}") from e
        except (OSError, RuntimeError) as e:  # RuntimeError: torch.save's inline_container
            raise SaveError(f"saving the {what} in {folder} failed ({_said(e)}); "
                            f"{self.hint()}") from e
        paths = written(result) if written else (result if isinstance(result, list) else [result])
        self.previous[what] = path_bytes(paths)
        return result


def _said(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + (f": {e.filename}" if e.filename else "")
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def earlier_run(out_dir: Path, name: str) -> list[Path]:
    """What an earlier run of recipe `name` left in `out_dir` that a fresh run would replace:
    its state folders, step LoRA files and sample images (the final LoRA is checked apart)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = list_states(state_root(out_dir))
    found += sorted(out_dir.glob(f"{name}-step*.safetensors"))
    found += sorted((out_dir / "samples").glob("step-*.png"))
    return found


def clear_earlier_run(out_dir: Path, name: str) -> list[Path]:
    """Remove what `earlier_run` finds (a run with --overwrite and no `resume:` starts over: an
    old state of a later step would otherwise be what the next `resume:` picks up)."""
    removed = earlier_run(out_dir, name)
    for p in removed:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    return removed


def describe_earlier_run(found: list[Path]) -> str:
    """'state up to step 6, 3 step LoRA files, 4 samples' for the dry run's problem."""
    states = [p for p in found if p.is_dir()]
    loras = [p for p in found if p.suffix == ".safetensors"]
    pngs = [p for p in found if p.suffix == ".png"]
    bits = []
    if states:
        bits.append(f"state up to step {int(states[-1].name.removeprefix('step-'))}")
    if loras:
        bits.append(f"{len(loras)} step LoRA file{'s' * (len(loras) != 1)}")
    if pngs:
        bits.append(f"{len(pngs)} sample image{'s' * (len(pngs) != 1)}")
    return ", ".join(bits)
