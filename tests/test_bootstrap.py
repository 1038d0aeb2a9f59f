"""run.py, the set-up at the repository root: its logic, without creating a venv or installing.

run.py is imported as a module by its path (it is not part of the package); its subprocess calls
and probes are replaced where a test walks through `main`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from workbench import torch_build

REPO = Path(__file__).resolve().parent.parent
CU130 = ("torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu130")


@pytest.fixture(scope="module")
def run():
    spec = importlib.util.spec_from_file_location("workbench_run_py", REPO / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def driver(cuda=(13, 0), name="NVIDIA GeForce RTX 2060") -> torch_build.DriverFacts:
    return torch_build.DriverFacts("581.57", cuda, (torch_build.SmiGpu(0, name, 12288, (7, 5)),))


# --------------------------------------------------------------------------------- the venv

def test_venv_python_is_chosen_by_what_exists(run, tmp_path):
    assert run.venv_python(tmp_path / ".venv") is None
    windows = tmp_path / "win" / "Scripts" / "python.exe"
    windows.parent.mkdir(parents=True)
    windows.write_bytes(b"")
    assert run.venv_python(tmp_path / "win") == windows
    posix = tmp_path / "posix" / "bin" / "python"
    posix.parent.mkdir(parents=True)
    posix.write_bytes(b"")
    assert run.venv_python(tmp_path / "posix") == posix


def test_python_is_shown_as_the_user_types_it():
    show = torch_build.display_python
    assert show("/home/me/wb/.venv/bin/python", "/home/me/wb") == ".venv/bin/python"
    assert show(r"C:\Users\me\wb\.venv\Scripts\python.exe", r"C:\Users\me\wb") == r".venv\Scripts\python"
    assert show("/srv/wb/.venv/Scripts/python.exe", "/srv/wb") == r".venv\Scripts\python"
    assert show(r"C:\Program Files\Python311\python.exe", r"D:\wb") == r'"C:\Program Files\Python311\python"'
    assert show("/usr/bin/python3", "/home/me") == "/usr/bin/python3"


def test_steps_are_stamped_and_a_changed_pyproject_reinstalls_the_package_only(run, tmp_path):
    root, venv = tmp_path / "repo", tmp_path / "repo" / ".venv"
    venv.mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    wanted = run.wanted_stamps(root, for_tests=True)
    assert list(wanted) == ["pip", "torch", "package", "test"]
    assert wanted["torch"] == "torch==2.14.1 torchvision==0.29.1"
    assert run.pending_steps(venv, wanted) == ["pip", "torch", "package", "test"]
    for step, value in wanted.items():
        run.stamp_path(venv, step).write_text(value + "\n")
    assert run.pending_steps(venv, wanted) == []
    assert run.pending_steps(venv, run.wanted_stamps(root, for_tests=False)) == []
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\nversion = '2'\n")
    assert run.pending_steps(venv, run.wanted_stamps(root, for_tests=True)) == ["package", "test"]
    assert run.pip_args("torch") == ["install", "torch==2.14.1", "torchvision==0.29.1"]
    assert run.pip_args("test") == ["install", "-e", ".[test]"]


# ----------------------------------------------------------------------------- the arguments

def test_arguments_pass_through(run, monkeypatch):
    demo = run.parse_command(["demo", "--cpu", "--fresh"])
    assert (demo.name, demo.args, demo.cpu) == ("demo", ("--fresh",), True)
    assert run.child_args(demo) == ["-m", "workbench", "demo", "--fresh"]
    test = run.parse_command(["test", "-x", "tests/test_cli.py", "-k", "help or version", "--cpu"])
    assert test.args == ("-x", "tests/test_cli.py", "-k", "help or version", "--cpu")
    monkeypatch.setattr(run.os, "cpu_count", lambda: 8)
    workers = ["-n", "2", "--dist", "loadfile"]
    assert run.child_args(test) == ["-m", "pytest", "-q", *workers, "-x", "tests/test_cli.py", "-k",
                                    "help or version", "--cpu"]
    assert run.child_args(run.parse_command(["test", "-v"])) == ["-m", "pytest", *workers, "-v"]
    assert run.child_args(run.parse_command(["test-fast", "tests/test_cli.py"])) == \
        ["-m", "pytest", "-q", "-m", "not slow", *workers, "tests/test_cli.py"]
    # `-n 0` asks for one process: no second -n; a single-core machine gets one worker
    assert run.child_args(run.parse_command(["test", "-n", "0"])) == ["-m", "pytest", "-q", "-n", "0"]
    monkeypatch.setattr(run.os, "cpu_count", lambda: 1)
    assert run.child_args(run.parse_command(["test"]))[-4:] == ["-n", "1", "--dist", "loadfile"]
    assert run.child_args(run.parse_command(["app", "--port", "8600"])) == \
        ["-m", "workbench", "app", "--port", "8600"]
    assert run.parse_command([]) is None and run.parse_command(["tests"]) is None


def test_child_environment_is_offline_and_utf8(run):
    env = run.child_env({"PATH": "/bin", "PYTHONIOENCODING": "latin-1"})
    assert env == {"PATH": "/bin", "PYTHONIOENCODING": "latin-1", "HF_HUB_OFFLINE": "1"}
    assert run.child_env({})["PYTHONIOENCODING"] == "utf-8"


# ---------------------------------------------------------------------------------- the GPU

def test_cpu_torch_on_an_nvidia_machine_gets_the_cuda_install_command(run):
    cpu_torch = run.TorchFacts("2.14.1+cpu", None, False)
    message = run.gpu_problem(driver(), cpu_torch, r".venv\Scripts\python")
    assert "CPU-only build" in message and "RTX 2060" in message
    assert message.endswith(r"run: .venv\Scripts\python -m pip install --force-reinstall " + CU130)
    assert run.gpu_problem(driver((12, 8)), cpu_torch, ".venv/bin/python").endswith(
        ".venv/bin/python -m pip install --force-reinstall torch==2.14.1 torchvision==0.29.1 "
        "--index-url https://download.pytorch.org/whl/cu128")
    old = run.gpu_problem(driver((12, 2)), cpu_torch, ".venv/bin/python")
    assert "update the NVIDIA driver (it runs CUDA up to 12.2" in old and old.endswith("/whl/cu126")


def test_no_message_without_a_card_or_when_torch_uses_it(run):
    cpu_torch = run.TorchFacts("2.14.1+cpu", None, False)
    assert run.gpu_problem(torch_build.DriverFacts(), cpu_torch, "python") is None
    assert run.gpu_problem(driver(), run.TorchFacts("2.14.1+cu130", "13.0", True), "python") is None
    assert run.gpu_problem(driver(), None, "python") is None


def test_cuda_torch_newer_than_the_driver(run):
    message = run.gpu_problem(driver((12, 6)), run.TorchFacts("2.14.1+cu130", "13.0", False),
                              ".venv/bin/python")
    assert "built for CUDA 13.0" in message and "runs CUDA up to 12.6" in message
    assert message.endswith("/whl/cu126")


def test_nvidia_smi_output_is_parsed():
    header = ("| NVIDIA-SMI 581.57                 Driver Version: 581.57         CUDA Version: 13.0     |")
    assert torch_build.parse_smi_header(header) == ("581.57", (13, 0))
    assert torch_build.parse_smi_header("") == (None, None)
    gpus = torch_build.parse_smi_query("NVIDIA GeForce RTX 2060, 12288, 7.5\nNVIDIA GeForce RTX 4090, 24564, 8.9\n")
    assert gpus == (torch_build.SmiGpu(0, "NVIDIA GeForce RTX 2060", 12288, (7, 5)),
                    torch_build.SmiGpu(1, "NVIDIA GeForce RTX 4090", 24564, (8, 9)))
    assert torch_build.parse_smi_query("Tesla K80, 11441\n") == (torch_build.SmiGpu(0, "Tesla K80", 11441),)


# ------------------------------------------------------------------------------- main, walked

@pytest.fixture
def ready_venv(run, tmp_path, monkeypatch):
    """A venv whose every step is stamped done, a fake 2060 whose torch is CPU-only, and a
    subprocess.call that records instead of running."""
    venv = tmp_path / ".venv"
    python = venv / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_bytes(b"")
    for step, value in run.wanted_stamps(run.ROOT, for_tests=True).items():
        run.stamp_path(venv, step).write_text(value)
    calls = []
    monkeypatch.setattr(run, "VENV", venv)
    monkeypatch.setattr(run.torch_build, "probe_driver", lambda: driver())
    monkeypatch.setattr(run, "probe_torch", lambda py: run.TorchFacts("2.14.1+cpu", None, False))
    monkeypatch.setattr(run.subprocess, "call", lambda args, **kw: calls.append((args, kw)) or 0)
    return python, calls


def test_demo_stops_on_an_unused_gpu_unless_cpu_is_asked(run, ready_venv, capsys):
    python, calls = ready_venv
    assert run.main(["demo"]) == 1
    out = capsys.readouterr().out
    assert "CPU-only build" in out and CU130 in out and "--cpu" in out
    assert calls == []
    assert run.main(["demo", "--cpu", "--fresh"]) == 0
    (args, kw), = calls
    assert args == [str(python), "-m", "workbench", "demo", "--fresh"]
    assert kw["env"]["HF_HUB_OFFLINE"] == "1" and kw["cwd"] == run.ROOT


def test_tests_run_on_regardless_and_missing_steps_install(run, ready_venv, capsys):
    python, calls = ready_venv
    run.stamp_path(run.VENV, "test").unlink()
    assert run.main(["test", "-x", "tests/test_cli.py"]) == 0
    assert "CPU-only build" in capsys.readouterr().out
    assert [c[0] for c in calls] == [[str(python), "-m", "pip", "install", "-e", ".[test]"],
                                     [str(python), "-m", "pytest", "-q", *run.child_args(
                                         run.parse_command(["test"]))[3:], "-x", "tests/test_cli.py"]]
    assert run.pending_steps(run.VENV, run.wanted_stamps(run.ROOT, True)) == []


def test_usage_and_old_python(run, monkeypatch, capsys):
    assert run.main([]) == 2
    assert "python run.py demo" in capsys.readouterr().out
    monkeypatch.setattr(sys, "version_info", (3, 9, 1))
    assert run.main(["demo"]) == 2
    assert "needs Python 3.10 or newer" in capsys.readouterr().out
