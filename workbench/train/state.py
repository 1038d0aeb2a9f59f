"""The resumable state folder: everything that decides the rest of a run, saved atomically.

Layout: `<output.dir>/state/step-00000250/` with
  network.safetensors   the trainable tensors (fp32, exact)
  optimizer.pt          optimizer state (moments, step counts) — torch.save, loaded weights_only
  scheduler.pt          LR scheduler (+ fp16 grad scaler) state
  rng.pt                global torch CPU/CUDA RNG states (LoRA dropout draws from them)
  train_state.json      step, sampler position (epoch, batch index), loss history, elapsed time,
                        and a fingerprint of the network so a changed recipe is refused.
A folder is written as `step-….tmp-<pid>` and renamed when complete, so a crash mid-save leaves the
previous state intact. Noise, timesteps and captions are pure functions of (seed, step), so these
files are all a resumed run needs to give bit-identical weights.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from workbench import system
from workbench.errors import WorkbenchError
from workbench.formats.writer import save_file_atomic

FORMAT = 1
STATE_FILE = "train_state.json"


def state_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "state"


def network_fingerprint(net) -> dict:
    p = net.plan
    return {"type": p.type, "rank": p.rank, "alpha": p.alpha, "conv_rank": p.conv_rank,
            "modules": len(p.modules), "arch": p.arch}


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "r+b") as fh:  # writable: Windows flushes only handles open for writing
            os.fsync(fh.fileno())
    system.fsync_dir(folder)  # POSIX only: Windows cannot open a folder (workbench/system.py)


def save_state(out_dir: str | Path, trainer, keep_last: int | None = None) -> Path:
    """Write the state after `trainer.state.step` steps; prune to the newest `keep_last`."""
    root = state_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    step = trainer.state.step
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file_atomic({k: v.contiguous() for k, v in trainer.net.state_dict().items()},
                         tmp / "network.safetensors")
        torch.save(trainer.optimizer.state_dict(), tmp / "optimizer.pt")
        sched = {"lr_scheduler": trainer.lr_scheduler.state_dict()}
        scaler = getattr(trainer.acc, "scaler", None)
        if scaler is not None:
            sched["scaler"] = scaler.state_dict()
        torch.save(sched, tmp / "scheduler.pt")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        info = {"format": FORMAT, "step": step, "epoch": trainer.data.sampler.epoch,
                "sampler": trainer.data.sampler.state_dict(), "elapsed_s": trainer.state.elapsed_s,
                "losses": trainer.state.losses, "network": network_fingerprint(trainer.net),
                "max_steps": trainer.s.max_steps, "seed": trainer.s.seed}
        (tmp / STATE_FILE).write_text(json.dumps(info, indent=1) + "\n")
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        system.replace_file(tmp, final)  # retried while another program holds it (Windows)
    except (OSError, RuntimeError) as e:
        # RuntimeError: torch.save reports a failed write as `[enforce fail at
        # inline_container.cc:...] ... file write failed`; said plainly, with the folder
        shutil.rmtree(tmp, ignore_errors=True)
        said = e.strerror if isinstance(e, OSError) and e.strerror else \
            (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise WorkbenchError(f"{final}: writing the training state in {root} failed ({said}); "
                             "the half-written folder was removed, earlier states are kept") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last:
        for old in list_states(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_states(root: Path) -> list[Path]:
    """Complete state folders under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
             and ".tmp-" not in p.name and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: p.name)


def find_state(path: str | Path) -> Path:
    """A state folder itself, or the newest one under an output folder or its `state/`."""
    path = Path(path)
    if (path / STATE_FILE).exists():
        return path
    for root in (path, state_root(path)):
        states = list_states(root)
        if states:
            return states[-1]
    raise WorkbenchError(f"resume: no saved training state in {path} (expected a folder with "
                         f"{STATE_FILE}, or an output folder with state/step-*/)")


def read_state_info(folder: Path) -> dict:
    try:
        info = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise WorkbenchError(f"resume: cannot read {folder / STATE_FILE}: {e}") from e
    if info.get("format") != FORMAT:
        raise WorkbenchError(f"resume: {folder} has state format {info.get('format')}, expected {FORMAT}")
    return info


def load_state(folder: str | Path, trainer) -> dict:
    """Put a saved state into a freshly built trainer (same recipe); returns the info dict."""
    folder = Path(folder)
    info = read_state_info(folder)
    mine = network_fingerprint(trainer.net)
    if info["network"] != mine:
        diff = {k: (info["network"].get(k), v) for k, v in mine.items() if info["network"].get(k) != v}
        raise WorkbenchError(f"resume: {folder} was saved for another network "
                             f"({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in diff.items())})")
    if info["step"] > trainer.s.max_steps:
        raise WorkbenchError(f"resume: {folder} is at step {info['step']}, past max_steps "
                             f"{trainer.s.max_steps}")
    trainer.net.load_state_dict(load_file(str(folder / "network.safetensors")))
    trainer.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    sched = torch.load(folder / "scheduler.pt", weights_only=True)
    trainer.lr_scheduler.load_state_dict(sched["lr_scheduler"])
    scaler = getattr(trainer.acc, "scaler", None)
    if scaler is not None and "scaler" in sched:
        scaler.load_state_dict(sched["scaler"])
    rng = torch.load(folder / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    trainer.data.sampler.load_state_dict(info["sampler"])
    trainer.state.step = info["step"]
    trainer.state.losses = list(info["losses"])
    trainer.state.elapsed_s = float(info.get("elapsed_s", 0.0))
    return info
