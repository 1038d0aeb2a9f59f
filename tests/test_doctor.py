"""`workbench doctor`: the diagnosis on faked machines, and the real collection on this one."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from workbench import cli, doctor, torch_build
from workbench.app.config import AppConfig
from workbench.doctor import Facts, Finding, Folder, Gpu, diagnose, report_json, report_text

GB = 10**9
CU130 = ("-m pip install --force-reinstall torch==2.14.1 torchvision==0.29.1 "
         "--index-url https://download.pytorch.org/whl/cu130")


def machine(**changes) -> Facts:
    """A healthy Windows PC with an RTX 2060 12 GB and a CUDA build of torch (the user we build
    for); each test changes what it is about."""
    base = Facts(
        os="Windows", os_release="10", python="3.11.9", python_cmd=r".venv\Scripts\python",
        torch="2.14.1+cu130", torch_cuda="13.0", torch_archs=["sm_75", "sm_80", "sm_86", "sm_90",
                                                               "sm_100", "sm_120"],
        cuda_available=True, driver="581.57", driver_cuda=(13, 0),
        gpus=[Gpu("NVIDIA GeForce RTX 2060", 12 * 2**30, (7, 5), seen_by_torch=True)],
        cpu="AMD64 (AVX2)", bitsandbytes="0.50.2", nf4_usable=True,
        ram_total=32 * GB, ram_available=20 * GB,
        folders=[Folder("models", r"D:\sd\models", True, 400 * GB, 12),
                 Folder("outputs", r"D:\sd\outputs", True, 400 * GB),
                 Folder("cache", r"C:\Users\me\.cache\workbench", True, 100 * GB)],
        t5_tokenizer=r"D:\sd\t5", clip_weights=r"D:\sd\clip\vit-l-14.safetensors",
        hf_cache=r"C:\Users\me\.cache\huggingface\hub")
    return dataclasses.replace(base, **changes)


def card(name: str, capability: tuple[int, int], vram_gb: int = 12) -> list[Gpu]:
    return [Gpu(name, vram_gb * 2**30, capability, seen_by_torch=True)]


RTX_2060 = machine()
LINUX = dict(os="Linux", os_release="6.8.0", python_cmd=".venv/bin/python", cpu="x86_64 (AVX2)")
RTX_3060 = machine(**LINUX,
                   gpus=card("NVIDIA GeForce RTX 3060", (8, 6)))
RTX_4090 = machine(**LINUX,
                   gpus=card("NVIDIA GeForce RTX 4090", (8, 9), 24))
NO_GPU = machine(**LINUX, cuda_available=False, torch_archs=[], driver=None, driver_cuda=None, gpus=[])
CPU_TORCH_ON_2060 = machine(torch="2.14.1+cpu", torch_cuda=None, torch_archs=[], cuda_available=False,
                            gpus=[Gpu("NVIDIA GeForce RTX 2060", 12 * 2**30, (7, 5))])


def levels(findings: list[Finding]) -> list[str]:
    return [f.level for f in findings]


def find(findings: list[Finding], text: str) -> Finding:
    hits = [f for f in findings if text in f.what]
    assert len(hits) == 1, (text, findings)
    return hits[0]


def test_rtx_2060_on_windows_gets_fp16_and_the_sysmem_warning():
    findings = diagnose(RTX_2060)
    assert "error" not in levels(findings)
    bf16 = find(findings, "computes bf16 only by emulation")
    assert bf16.level == "info" and "fp16" in bf16.what
    sysmem = find(findings, "Sysmem Fallback")
    assert sysmem.level == "warn"
    assert sysmem.fix.startswith("NVIDIA Control Panel > Manage 3D settings > CUDA - Sysmem Fallback "
                                 "Policy > Prefer No Sysmem Fallback")
    text = report_text(RTX_2060, findings)
    assert "compute fp16 (bf16 is only emulated at compute capability 7.5" in text
    assert "fp8 matmul: no (needs 8.9)" in text


def test_rtx_3060_and_4090_compute_bf16_with_no_findings():
    for facts, fp8 in ((RTX_3060, "fp8 matmul: no"), (RTX_4090, "fp8 matmul: yes")):
        findings = diagnose(facts)
        assert findings == []
        text = report_text(facts, findings)
        assert "compute bf16 (native at compute capability" in text and fp8 in text
        assert "No problems found." in text


def test_no_gpu_computes_fp32_on_an_avx2_cpu():
    findings = diagnose(NO_GPU)
    assert levels(findings) == ["info"]
    assert "no NVIDIA GPU found" in findings[0].what
    assert "compute fp32" in report_text(NO_GPU, findings)
    amx = dataclasses.replace(NO_GPU, cpu_bf16=True)
    assert "compute bf16 (the CPU has AVX512-BF16/AMX)" in report_text(amx, diagnose(amx))


def test_cpu_only_torch_on_a_gpu_machine_is_an_error_with_the_install_command():
    findings = diagnose(CPU_TORCH_ON_2060)
    error = findings[0]
    assert error.level == "error"
    assert "CPU-only build" in error.what and "RTX 2060" in error.what
    assert error.fix == "run: .venv\\Scripts\\python " + CU130
    text = report_text(CPU_TORCH_ON_2060, findings)
    assert "once torch can use the GPU: compute fp16" in text and "(not used by this torch)" in text
    assert "12.9 GB (12 GiB) VRAM" in text


@pytest.mark.parametrize("driver_cuda, index", [((12, 8), "cu128"), ((12, 6), "cu126"), ((13, 1), "cu130")])
def test_the_index_follows_what_the_driver_runs(driver_cuda, index):
    facts = dataclasses.replace(CPU_TORCH_ON_2060, driver_cuda=driver_cuda)
    assert diagnose(facts)[0].fix.endswith(f"--index-url https://download.pytorch.org/whl/{index}")


def test_cuda_torch_newer_than_the_driver():
    facts = dataclasses.replace(RTX_3060, cuda_available=False, driver_cuda=(12, 4),
                                gpus=[Gpu("NVIDIA GeForce RTX 3060", 12 * 2**30, (8, 6))])
    error = diagnose(facts)[0]
    assert error.level == "error" and "built for CUDA 13.0" in error.what
    assert error.fix.startswith("update the NVIDIA driver (it runs CUDA up to 12.4")
    assert error.fix.endswith("/whl/cu126")
    newer = dataclasses.replace(facts, driver_cuda=(12, 8))
    assert diagnose(newer)[0].fix.endswith("/whl/cu128")


def test_a_gpu_the_build_has_no_kernels_for():
    pascal = dataclasses.replace(RTX_3060, gpus=card("NVIDIA GeForce GTX 1080", (6, 1), 8))
    error = find(diagnose(pascal), "has no kernels")
    assert error.level == "error" and "sm_61" in error.fix
    # a newer minor of the same major runs the older cubin: no finding
    ampere_87 = dataclasses.replace(RTX_3060, gpus=card("Jetson Orin", (8, 7)))
    assert not [f for f in diagnose(ampere_87) if "kernels" in f.what]
    assert doctor._has_kernels((9, 0), ["sm_80", "compute_80"])
    assert not doctor._has_kernels((9, 0), ["sm_80", "sm_86"])


def test_each_missing_piece_has_its_fix():
    facts = machine(bitsandbytes=None, nf4_usable=False, ram_total=None, ram_available=None,
                    t5_tokenizer=None, clip_weights=None,
                    folders=[Folder("models", r"C:\sd\models", False, 400 * GB),
                             Folder("outputs", r"C:\sd\outputs", True, 8 * GB),
                             Folder("cache", r"C:\cache", True, 2 * GB)])
    findings = diagnose(facts)
    assert find(findings, "bitsandbytes is not installed").fix == \
        'run: .venv\\Scripts\\python -m pip install -e ".[nf4]"'
    assert find(findings, "psutil").fix == r"run: .venv\Scripts\python -m pip install psutil"
    t5 = find(findings, "T5-XXL tokenizer")
    assert 'setx WORKBENCH_T5_TOKENIZER "D:\\models\\t5-tokenizer"' in t5.fix
    assert "scores.clip.weights" in find(findings, "CLIP scorer").fix
    assert find(findings, r"C:\sd\models does not exist").fix.startswith("point the dashboard")
    assert find(findings, r"8.0 GB free at C:\sd\outputs").level == "warn"
    assert "setx WORKBENCH_CACHE" in find(findings, "for the cache").fix
    assert all(f.fix for f in findings)
    assert levels(findings) == sorted(levels(findings), key=doctor.LEVELS.index)
    linux = dataclasses.replace(facts, os="Linux")
    assert "export WORKBENCH_T5_TOKENIZER=~/models/t5-tokenizer  to ~/.bashrc" in \
        find(diagnose(linux), "T5-XXL").fix


def test_small_ram_and_vram_and_broken_bitsandbytes():
    facts = machine(ram_total=8 * GB, gpus=card("NVIDIA GeForce GTX 1650", (7, 5), 4),
                    nf4_usable=False, bitsandbytes_problem="it cannot quantize to NF4 on the cuda")
    findings = diagnose(facts)
    assert find(findings, "8.0 GB of RAM").level == "warn"
    assert "weights: fp8" in find(findings, "of VRAM").fix
    assert "--force-reinstall --upgrade bitsandbytes" in find(findings, "not usable").fix


def test_json_round_trip_gives_the_same_diagnosis():
    for facts in (RTX_2060, RTX_3060, NO_GPU, CPU_TORCH_ON_2060):
        data = json.loads(report_json(facts, diagnose(facts)))
        again = Facts.from_json(data["facts"])
        assert again == facts
        assert [Finding(**f) for f in data["findings"]] == diagnose(again)


# ------------------------------------------------------------------------- this machine, for real

@pytest.mark.slow
def test_collect_facts_here(tmp_path, monkeypatch):
    """The real probes on this machine, with nvidia-smi faked as a 2060 whose driver only runs
    CUDA 12.4: this torch (a CUDA build or a CPU one) then cannot use it, and says why."""
    import torch

    (tmp_path / "models" / "sd").mkdir(parents=True)
    (tmp_path / "models" / "sd" / "a.safetensors").write_bytes(b"x")
    (tmp_path / "models" / "notes.txt").write_text("not a model")
    smi = torch_build.DriverFacts("551.86", (12, 4), (torch_build.SmiGpu(0, "NVIDIA GeForce RTX 2060",
                                                                        12288, (7, 5)),))
    monkeypatch.setattr(torch_build, "probe_driver", lambda: smi)
    facts = doctor.collect_facts(AppConfig(home=tmp_path))
    assert facts.torch == torch.__version__ and facts.torch_cuda == torch.version.cuda
    models = [f for f in facts.folders if f.role == "models"]
    assert models == [Folder("models", str(tmp_path / "models"), True, models[0].free_bytes, 1)]
    assert models[0].free_bytes > 0
    outputs = next(f for f in facts.folders if f.role == "outputs")
    assert outputs.path == str(tmp_path / "outputs") and not outputs.exists and outputs.free_bytes > 0
    if not torch.cuda.is_available():
        assert facts.gpus == [Gpu("NVIDIA GeForce RTX 2060", 12288 * 2**20, (7, 5))]
        error = diagnose(facts)[0]
        assert error.level == "error" and "RTX 2060" in error.what
        assert error.fix.endswith("/whl/cu126")


@pytest.mark.slow
def test_cli_doctor_json(tmp_path, capsys):
    code = cli.main(["doctor", "--json", "--home", str(tmp_path)])
    data = json.loads(capsys.readouterr().out)
    errors = [f for f in data["findings"] if f["level"] == "error"]
    assert code == (1 if errors else 0)
    assert data["facts"]["folders"][0]["path"] == str(Path(tmp_path).resolve() / "models")


def test_old_python_and_missing_torch():
    old = diagnose(machine(python="3.9.18"))[0]
    assert old.level == "error" and "Python 3.9.18 is too old" in old.what
    broken = machine(torch=None, torch_problem="ImportError: DLL load failed", torch_cuda=None,
                     cuda_available=False, gpus=[Gpu("NVIDIA GeForce RTX 2060", 12 * 2**30, (7, 5))])
    findings = diagnose(broken)
    assert levels(findings)[0] == "error" and "DLL load failed" in findings[0].what
    assert findings[0].fix == (r"run: .venv\Scripts\python -m pip install --force-reinstall "
                               "torch==2.14.1 torchvision==0.29.1")
    assert "torch" in report_text(broken, findings) and "not importable" in report_text(broken, findings)
