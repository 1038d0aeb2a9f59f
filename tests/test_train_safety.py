"""Issue #14, nothing lost or overwritten in training: free space checked before each save, failed
writes said plainly, Ctrl-C says how to resume, a re-run never replaces an earlier run unasked."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from workbench.cli import main as cli_main
from workbench.kinds import train as train_kind
from workbench.recipes.loader import load_recipe
from workbench.train import saves
from workbench.train.loop import Trainer
from workbench.train.saves import SaveError, SaveGuard, resume_hint
from workbench.train.state import STATE_FILE

INLINE_CONTAINER = ("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed "
                    "writing file data/0: file write failed")


def _fake_state(out: Path, step: int) -> Path:
    folder = out / "state" / f"step-{step:08d}"
    folder.mkdir(parents=True)
    (folder / STATE_FILE).write_text("{}")
    return folder


def test_guard_stops_before_a_save_that_does_not_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(saves, "free_bytes", lambda folder: 1_000)
    wrote = []
    guard = SaveGuard(lambda: "HINT")
    with pytest.raises(SaveError) as info:
        guard.save("training state", tmp_path / "state", 5_000, lambda: wrote.append(1))
    text = str(info.value)
    assert f"not enough disk space in {tmp_path / 'state'} to save the training state" in text
    assert "(5,000 bytes)" in text and "(1,000 bytes) free" in text and text.endswith("; HINT")
    assert wrote == []


def test_guard_uses_the_previous_save_as_the_estimate(tmp_path, monkeypatch):
    """The estimate can be low (a small guess); a save as big as the last one must fit."""
    monkeypatch.setattr(saves, "free_bytes", lambda folder: 10**9)
    guard = SaveGuard(lambda: "HINT")
    target = tmp_path / "a.bin"
    guard.save("LoRA file", tmp_path, 10, lambda: target.write_bytes(b"x" * 20_000) and target)
    assert guard.previous["LoRA file"] == 20_000
    monkeypatch.setattr(saves, "free_bytes", lambda folder: 15_000)
    with pytest.raises(SaveError, match=r"needs about .*\(20,000 bytes\), .*\(15,000 bytes\) free"):
        guard.save("LoRA file", tmp_path, 10, lambda: target)


@pytest.mark.parametrize("error, said", [
    (RuntimeError(INLINE_CONTAINER), "[enforce fail at inline_container.cc:672]"),
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "No space left on device"),
])
def test_guard_says_a_failed_write_plainly(tmp_path, monkeypatch, error, said):
    monkeypatch.setattr(saves, "free_bytes", lambda folder: 10**9)

    def write():
        raise error

    with pytest.raises(SaveError) as info:
        SaveGuard(lambda: "HINT").save("training state", tmp_path / "state", 1, write)
    assert f"saving the training state in {tmp_path / 'state'} failed ({said}" in str(info.value)
    assert str(info.value).endswith("; HINT") and info.value.__cause__ is error


def test_resume_hint_names_the_kept_state_and_the_recipe_field(tmp_path):
    out, recipe = tmp_path / "run", tmp_path / "train.yaml"
    out.mkdir()
    none = resume_hint(out, recipe, 1, 6)
    assert none.startswith("training stopped at step 1 of 6; no state was saved yet")
    assert f"`workbench train {recipe} --overwrite`" in none
    _fake_state(out, 2)
    _fake_state(out, 4)
    hint = resume_hint(out, recipe, 5, 6)
    assert hint == (f"training stopped at step 5 of 6; the state of step 4 is kept in "
                    f"{out / 'state' / 'step-00000004'}; to continue from it (step 5 is done "
                    f"again), add `resume: {out}` to {recipe} and run `workbench train {recipe}` (on the "
                    'dashboard\'s Train page: tick "resume" and submit again)')


def test_earlier_run_lists_state_step_files_and_samples(tmp_path):
    out = tmp_path / "run"
    assert saves.earlier_run(out, "tiny") == []
    _fake_state(out, 2)
    (out / "tiny-step00000002.safetensors").write_bytes(b"x")
    (out / "other-step00000002.safetensors").write_bytes(b"x")  # another recipe's: not ours
    (out / "samples").mkdir()
    (out / "samples" / "step-00000002_00.png").write_bytes(b"x")
    (out / "loss.csv").write_text("step\n")
    found = saves.earlier_run(out, "tiny")
    assert saves.describe_earlier_run(found) == "state up to step 2, 1 step LoRA file, 1 sample image"
    assert saves.clear_earlier_run(out, "tiny") == found
    assert saves.earlier_run(out, "tiny") == [] and (out / "other-step00000002.safetensors").exists()


# ------------------------------------------------------------------------------- end to end

def _recipe_file(tmp: Path, base: Path, data: Path, out: str, extra: str = "") -> Path:
    path = tmp / f"{out}.yaml"
    path.write_text(f"kind: train\nname: tiny\nbase: {base}\ndataset: {data}\ntrigger: wbstyle\n"
                    "resolution: 64\nnetwork: {type: lora, rank: 4, alpha: 2}\nmax_steps: 6\n"
                    f"seed: 5\nlearning_rate: 1.0e-3\n{extra}"
                    f"output: {{dir: {tmp / out}, save_every: 2, save_precision: fp32}}\n")
    return path


def tmp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]


@pytest.mark.slow
def test_ctrl_c_keeps_the_state_and_a_rerun_resumes_or_refuses(tmp_path, tiny_model, style_set,
                                                               monkeypatch, capsys):
    """Ctrl-C in step 4: the step-2 state stays, the message names `resume:` and the command;
    the same recipe again is refused in the dry run; with `resume:` it finishes; --overwrite
    starts over and removes the earlier run's files."""
    recipe = _recipe_file(tmp_path, tiny_model("sd15"), style_set, "run")
    out = tmp_path / "run"
    real_step = Trainer.train_step

    def interrupted(self, step):
        if step == 3:
            raise KeyboardInterrupt
        return real_step(self, step)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    assert cli_main(["train", str(recipe), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert (f"cancelled: training stopped at step 3 of 6; the state of step 2 is kept in "
            f"{out / 'state' / 'step-00000002'}; to continue from it (step 3 is done again), add "
            f"`resume: {out}` to {recipe} and run `workbench train {recipe}`") in err
    assert (out / "state" / "step-00000002" / STATE_FILE).exists() and tmp_files(out) == []
    monkeypatch.setattr(Trainer, "train_step", real_step)

    # the same recipe again, without resume: refused in the dry run already
    assert cli_main(["train", str(recipe), "--dry-run", "--no-progress"]) == 1
    text = capsys.readouterr().out
    assert (f"output.dir {out} holds an earlier run of 'tiny' (state up to step 2, 1 step LoRA "
            f"file); add `resume: {out}` to the recipe to continue it, or pass --overwrite") in text
    plan = train_kind.describe(load_recipe(recipe), overwrite=True)
    assert plan.ok and "will be removed (--overwrite)" in plan.render()

    # with resume: it continues from step 2 and finishes
    resumed = _recipe_file(tmp_path, tiny_model("sd15"), style_set, "run", f"resume: {out}\n")
    assert cli_main(["train", str(resumed), "--no-progress"]) == 0
    assert "train 'tiny': 6/6 steps" in capsys.readouterr().out
    assert (out / "tiny.safetensors").exists()


@pytest.mark.slow
def test_no_room_for_a_save_stops_cleanly_and_says_how_to_resume(tmp_path, tiny_model, style_set,
                                                                  monkeypatch):
    """The saves of step 2 fit; the disk is then too full for step 4's LoRA file: the run stops
    before writing it, naming the folder and the bytes; the step-2 state is kept."""
    recipe = load_recipe(_recipe_file(tmp_path, tiny_model("sd15"), style_set, "full"))
    out = tmp_path / "full"
    calls = []

    def free(folder):
        calls.append(Path(folder))
        return 10**12 if len(calls) <= 2 else 4096  # step 2: LoRA file, state; then full

    monkeypatch.setattr(saves, "free_bytes", free)
    with pytest.raises(SaveError) as info:
        train_kind.run(train_kind.describe(recipe), progress=False)
    text = str(info.value)
    assert text.startswith(f"not enough disk space in {out} to save the LoRA file: needs about ")
    assert "(4,096 bytes) free; nothing was written" in text
    assert f"the state of step 2 is kept in {out / 'state' / 'step-00000002'}" in text
    assert f"add `resume: {out}` to {recipe.source_path}" in text
    assert calls == [out, out / "state", out]
    assert not (out / "tiny-step00000004.safetensors").exists() and tmp_files(out) == []


@pytest.mark.slow
def test_a_failed_state_write_is_said_plainly(tmp_path, tiny_model, style_set, monkeypatch, capsys):
    """torch.save on a full disk raises RuntimeError from its inline_container: the CLI prints a
    plain error naming the state folder, and the half-written state folder is gone."""
    recipe = _recipe_file(tmp_path, tiny_model("sd15"), style_set, "broken")
    out = tmp_path / "broken"
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "state" in Path(f).parts and Path(f).name == "optimizer.pt":
            raise RuntimeError(INLINE_CONTAINER)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    assert cli_main(["train", str(recipe), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (f"error: {out / 'state' / 'step-00000002'}: writing the training state in "
            f"{out / 'state'} failed ([enforce fail at inline_container.cc:672]") in err
    assert "training stopped at step 2 of 6; no state was saved yet" in err
    assert tmp_files(out) == [] and list((out / "state").iterdir()) == []


@pytest.mark.slow
def test_a_cancelled_training_job_keeps_its_state_and_says_how_to_resume(tmp_path, tiny_model,
                                                                         style_set, monkeypatch):
    """A dashboard cancel at step 3: the job ends cancelled, its step-2 state and step file stay
    (a cancelled job removes the new outputs of other kinds), and its error says how to resume."""
    from workbench import progress
    from workbench.jobs.store import JobStore
    from workbench.jobs.worker import run_job

    recipe = _recipe_file(tmp_path, tiny_model("sd15"), style_set, "job")
    out = tmp_path / "job"
    store = JobStore(tmp_path / "jobs.sqlite")
    job_id = store.submit("train", recipe.read_text(), name="tiny", source=recipe)
    real_step = Trainer.train_step

    def cancel_at_step_3(self, step):
        if step == 3:
            store.request_cancel(job_id)
            progress.request_cancel()  # what the worker's watchdog does on the cancel flag
        return real_step(self, step)

    monkeypatch.setattr(Trainer, "train_step", cancel_at_step_3)
    job = store.claim()
    assert job is not None and job.id == job_id
    assert run_job(store, job) == "cancelled"
    done = store.get(job_id)
    assert done.error.startswith("cancelled by request: training stopped at step "), \
        "\n".join(store.log_tail(job_id))
    assert f"add `resume: {out}` to {recipe}" in done.error
    assert (out / "state" / "step-00000002" / STATE_FILE).exists()
    assert (out / "tiny-step00000002.safetensors").exists() and tmp_files(out) == []
